"""Secure aggregation (pairwise masking, SecAgg and SecAgg+): whole rounds with real crypto.

Every message crosses a JSON round trip through :func:`parse_secagg_message`, as it would on
the wire; signatures use real federation certificates.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import BaseModel
from scipy import stats

from secure_fed.errors import ConfigError, CryptoError, ProtocolError
from secure_fed.identity.certificates import (
    generate_ca,
    issue_certificate,
    sign,
    verify_signature,
)
from secure_fed.secagg import masking as mk
from secure_fed.secagg.master_machine import MasterSecAgg, MasterStage
from secure_fed.secagg.messages import (
    AdvertiseKeys,
    EncryptedShares,
    KeyList,
    MaskedInput,
    SeedReveal,
    SeedReveals,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    advertisement_signing_bytes,
    contribution_commitment,
    graph_seed,
    parse_secagg_message,
    self_mask_commitment,
)
from secure_fed.secagg.settings import SecAggSettings, harary_graph
from secure_fed.secagg.shamir import Share, reconstruct_secret, secret_to_bytes
from secure_fed.secagg.slave_machine import SlaveSecAgg, SlaveStage

M = TypeVar("M", bound=BaseModel)
PARTIES = tuple(f"s{i}" for i in range(8))
M61 = 2**61 - 1  # a Mersenne prime, the size of a BFV plain modulus
LENGTH = 16
PHASES = ("advertise", "share", "mask", "unmask")


@pytest.fixture(scope="module")
def identities() -> dict[str, tuple[bytes, bytes]]:
    ca_cert, ca_key = generate_ca("fed-1")
    return {p: issue_certificate(ca_cert, ca_key, p, role="slave") for p in PARTIES}


def _verifier(identities: dict[str, tuple[bytes, bytes]]) -> Callable[[str, bytes, bytes], None]:
    def verify(party: str, data: bytes, signature: bytes) -> None:
        verify_signature(identities[party][0], data, signature)
    return verify


def wire(message: M) -> M:
    """``message`` after a JSON round trip through the wire parser."""
    parsed = parse_secagg_message(message.model_dump_json())
    assert type(parsed) is type(message) and parsed == message
    return parsed


def settings_for(**overrides: Any) -> SecAggSettings:
    values: dict[str, Any] = dict(federation_id="fed-1", round=3, parties=PARTIES,
                                  vector_length=LENGTH, modulus=M61, task_nonce="0" * 32)
    values.update(overrides)
    return SecAggSettings(**values)


@dataclass
class Round:
    """Drives one round in memory; a party in ``drops[phase]`` falls silent at that phase.

    With ``tolerate_refusals`` a slave that refuses a step (ProtocolError) falls silent too,
    as the real driver would treat it; otherwise the refusal propagates to the test.
    """

    settings: SecAggSettings
    identities: dict[str, tuple[bytes, bytes]]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    drops: dict[str, set[str]] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)
    tolerate_refusals: bool = False
    refused: set[str] = field(default_factory=set)
    reveals: SeedReveals | None = None

    def __post_init__(self) -> None:
        verify = _verifier(self.identities)
        self.master = MasterSecAgg(self.settings, verify=verify)
        self.slaves = {p: SlaveSecAgg(self.settings, p, verify=verify,
                                      sign=functools.partial(sign, self.identities[p][1]))
                       for p in self.settings.parties}
        rng = np.random.default_rng(7)
        for p in self.settings.parties:
            self.inputs.setdefault(p, rng.integers(0, min(self.settings.modulus, 2**63),
                                                   LENGTH, dtype=np.uint64))
        self.alive = set(self.settings.parties)

    def _phase(self, name: str) -> list[str]:
        self.alive -= self.drops.get(name, set())
        return sorted(self.alive)

    def _slave(self, party: str, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except ProtocolError:
            if not self.tolerate_refusals:
                raise
            self.refused.add(party)
            self.alive.discard(party)
            return None

    def advertise(self) -> KeyList:
        """Phase 0, and with SecAgg+ phase 0b (every slave reveals its seed contribution)."""
        for p in self._phase("advertise"):
            self.master.receive_advertisement(p, wire(self.slaves[p].advertise()))
        key_list = wire(self.master.close_advertising())
        if self.settings.needs_graph_seed:
            for p in self._phase("reveal"):
                self.master.receive_reveal(p, wire(self.slaves[p].reveal_seed(key_list)))
            self.reveals = wire(self.master.close_revealing())
        return key_list

    def share(self, key_list: KeyList) -> dict[str, ShareDelivery]:
        for p in self._phase("share"):
            shares = self._slave(p, functools.partial(self.slaves[p].share_keys, key_list,
                                                      self.reveals))
            if shares is not None:
                self.master.receive_shares(p, wire(shares))
        return {p: wire(d) for p, d in self.master.close_sharing().items()}

    def mask(self, deliveries: dict[str, ShareDelivery]) -> UnmaskRequest:
        for p in self._phase("mask"):
            masked = self._slave(p, functools.partial(self.slaves[p].mask, deliveries[p],
                                                      self.inputs[p]))
            if masked is not None:
                self.payloads[p] = masked[1]
                self.master.receive_masked(p, wire(masked[0]), masked[1])
        return wire(self.master.close_masking())

    def unmask(self, request: UnmaskRequest) -> np.ndarray:
        for p in self._phase("unmask"):
            response = self._slave(p, functools.partial(self.slaves[p].unmask, request))
            if response is not None:
                self.master.receive_unmask(p, wire(response))
        return self.master.finish()

    def run(self) -> np.ndarray:
        return self.unmask(self.mask(self.share(self.advertise())))

    def expected(self) -> list[int]:
        m = self.settings.modulus
        return [sum(int(self.inputs[p][i]) for p in self.master.survivors) % m
                for i in range(self.settings.vector_length)]


@pytest.mark.parametrize("phase, count", [("advertise", 0)] + [
    (phase, count) for phase in PHASES for count in (1, 3)])
def test_exact_sum_with_dropouts(identities: dict[str, tuple[bytes, bytes]], phase: str,
                                 count: int) -> None:
    """0, 1 and the maximum tolerated number (n - t = 3) of slaves fall silent at a phase."""
    settings = settings_for()
    assert (settings.t, settings.max_dropouts) == (5, 3)
    dropped = set(PARTIES[1:1 + count])
    run = Round(settings, identities, drops={phase: dropped})
    result = run.run()
    assert result.dtype == np.uint64 and [int(v) for v in result] == run.expected()
    stage = {"advertise": MasterStage.ADVERTISING, "share": MasterStage.SHARING,
             "mask": MasterStage.MASKING}.get(phase)
    assert run.master.dropped_at == ({p: stage for p in dropped} if stage else {})
    assert set(run.master.survivors) == set(PARTIES) - (dropped if stage else set())
    assert run.master.stage is MasterStage.DONE


def test_exact_sum_with_dropouts_at_every_phase(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(modulus=2**32), identities,
                drops={"advertise": {"s1"}, "share": {"s4"}, "mask": {"s6"}})
    assert [int(v) for v in run.run()] == run.expected()
    assert run.master.survivors == ("s0", "s2", "s3", "s5", "s7")
    assert run.master.dropped_at == {"s1": MasterStage.ADVERTISING, "s4": MasterStage.SHARING,
                                     "s6": MasterStage.MASKING}


@pytest.mark.parametrize("modulus", [2**64, 251])
def test_exact_sum_in_other_rings(identities: dict[str, tuple[bytes, bytes]],
                                  modulus: int) -> None:
    run = Round(settings_for(parties=PARTIES[:4], modulus=modulus), identities,
                drops={"mask": {"s2"}})
    assert [int(v) for v in run.run()] == run.expected()


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fate=st.lists(st.sampled_from([None] * 8 + list(PHASES)), min_size=8, max_size=8),
       graph=st.booleans())
def test_random_dropouts_give_the_exact_sum_or_abort(
        identities: dict[str, tuple[bytes, bytes]], fate: list[str | None],
        graph: bool) -> None:
    """Each slave drops at a random phase (or never). Complete graph: the round succeeds
    exactly when at least t slaves complete every phase. SecAgg+: either the exact sum or an
    abort (slaves whose neighbourhood fell below t refuse); never a wrong sum."""
    plus: dict[str, Any] = {"neighbours": 4} if graph else {}
    s = settings_for(**plus)
    drops = {phase: {p for p, f in zip(PARTIES, fate, strict=True) if f == phase}
             for phase in PHASES}
    run = Round(s, identities, drops=drops, tolerate_refusals=graph)
    remaining = [sum(f is None or PHASES.index(f) > i for f in fate) for i in range(4)]
    try:
        result = run.run()
    except ProtocolError as exc:
        event(f"aborted, graph={graph}")
        assert "round aborted" in str(exc)
        assert graph or min(remaining) < s.t
        return
    event(f"exact sum, graph={graph}")
    assert graph or min(remaining) >= s.t
    assert [int(v) for v in result] == run.expected()


@pytest.mark.parametrize("phase", ["advertise", "share", "mask"])
def test_below_threshold_the_round_aborts(identities: dict[str, tuple[bytes, bytes]],
                                          phase: str) -> None:
    run = Round(settings_for(), identities, drops={phase: set(PARTIES[:4])})
    with pytest.raises(ProtocolError, match="round aborted.*threshold 5; nothing was unmasked"):
        run.run()
    assert run.master.stage is MasterStage.ABORTED
    with pytest.raises(ProtocolError, match="aborted"):
        run.master.finish()


def test_too_few_unmask_responses_reveal_nothing(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities, drops={"mask": {"s7"}, "unmask": {"s0", "s1", "s2"}})
    with pytest.raises(ProtocolError, match="4 shares of the self-mask seed of 's0', threshold 5"):
        run.run()
    assert run.master.stage is MasterStage.ABORTED
    with pytest.raises(ProtocolError):
        run.master.finish()


def _masked_round(identities: dict[str, tuple[bytes, bytes]],
                  **overrides: object) -> tuple[Round, UnmaskRequest]:
    run = Round(settings_for(**overrides), identities)
    return run, run.mask(run.share(run.advertise()))


def test_slave_refuses_to_reveal_both_secrets_of_a_party(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run, honest = _masked_round(identities)
    greedy = UnmaskRequest(round=3, survivors=list(PARTIES), dropped=["s3"])
    with pytest.raises(ProtocolError, match=r"both the self-mask and the mask key of \['s3'\]"):
        run.slaves["s0"].unmask(greedy)
    assert run.slaves["s0"].stage is SlaveStage.FAILED
    with pytest.raises(ProtocolError, match="stage failed"):
        run.slaves["s0"].unmask(honest)  # one answer per round, never a second one


@pytest.mark.parametrize("survivors, dropped, reason", [
    (list(PARTIES[:4]), list(PARTIES[4:]), "only 4 holders survived, threshold 5"),
    (list(PARTIES[:7]), [], r"disagrees.*\['s7'\]"),
    (["s0", "s1", "s2", "s3", "s4", "s5", "s6"], ["s7", "s7"], "more than once"),
    (list(PARTIES[1:]), ["s0"], "inconsistent"),
])
def test_slave_refuses_inconsistent_unmask_requests(
        identities: dict[str, tuple[bytes, bytes]], survivors: list[str], dropped: list[str],
        reason: str) -> None:
    run, _ = _masked_round(identities)
    with pytest.raises(ProtocolError, match=reason):
        run.slaves["s0"].unmask(UnmaskRequest(round=3, survivors=survivors, dropped=dropped))


def test_slave_refuses_to_name_a_peer_that_never_shared_as_dropped(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities, drops={"share": {"s7"}})
    run.mask(run.share(run.advertise()))
    forged = UnmaskRequest(round=3, survivors=list(PARTIES[:7]), dropped=["s7"])
    with pytest.raises(ProtocolError, match=r"disagrees.*\['s7'\]"):
        run.slaves["s1"].unmask(forged)


def _shares_of(responses: list[UnmaskResponse], owner: str, settings: SecAggSettings,
               kind: str) -> list[Share]:
    return [Share(settings.x_coordinates[r.party], int(s.value, 16))
            for r in responses for s in getattr(r, kind) if s.owner == owner]


@pytest.mark.parametrize("threshold, learns", [(5, False), (4, True)])
def test_split_view_attack_needs_a_minority_threshold(
        identities: dict[str, tuple[bytes, bytes]], threshold: int, learns: bool) -> None:
    """A master tells s0..s3 that s0 survived and s4..s7 that it dropped, hoping to get both
    of s0's secrets. With the default majority threshold it gets 4 shares of each, too few;
    with t=4 (allowed only on request) it unmasks s0's individual input."""
    run, _ = _masked_round(identities, threshold=threshold,
                           allow_minority_threshold=threshold == 4)
    s = run.settings
    told_alive = UnmaskRequest(round=3, survivors=list(PARTIES), dropped=[])
    told_dropped = UnmaskRequest(round=3, survivors=list(PARTIES[1:]), dropped=["s0"])
    responses = [run.slaves[p].unmask(told_alive) for p in PARTIES[:4]]
    responses += [run.slaves[p].unmask(told_dropped) for p in PARTIES[4:]]
    b_shares = _shares_of(responses, "s0", s, "self_mask_shares")
    k_shares = _shares_of(responses, "s0", s, "mask_key_shares")
    assert len(b_shares) == len(k_shares) == 4
    if not learns:
        for shares in (b_shares, k_shares):
            with pytest.raises(CryptoError, match="at least 5 are needed"):
                reconstruct_secret(shares, threshold)
        return
    b_0 = secret_to_bytes(reconstruct_secret(b_shares, threshold))
    s_sk = secret_to_bytes(reconstruct_secret(k_shares, threshold))
    y = np.frombuffer(run.payloads["s0"], dtype="<u8").astype(np.uint64)
    x = mk.sub_mod(y, mk.expand_mask(b_0, LENGTH, M61), M61)
    for peer in PARTIES[1:]:
        s_pk = run.slaves[peer]._s_pk
        seed = mk.derive_key(mk.agree(s_sk, s_pk), mk.PURPOSE_MASK, s.digest.encode())
        x = mk.sub_mod(x, mk.expand_mask(seed, LENGTH, M61), M61)  # s0 < peer: it added +
    assert np.array_equal(x, run.inputs["s0"])


def test_tampered_or_misrouted_shares_are_refused(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities)
    deliveries = run.share(run.advertise())
    original = deliveries["s0"].shares[0]
    raw = bytearray(base64.b64decode(original.sealed))
    raw[40] ^= 0x01
    tampered = original.model_copy(update={"sealed": base64.b64encode(raw).decode()})
    with pytest.raises(CryptoError, match="do not authenticate"):
        run.slaves["s0"].mask(ShareDelivery(round=3, shares=[tampered]),
                              run.inputs["s0"])
    assert run.slaves["s0"].stage is SlaveStage.FAILED
    # A ciphertext of s2 for s1 relabelled as coming from s3: wrong key and associated data.
    from_s2 = next(e for e in deliveries["s1"].shares if e.sender == "s2")
    relabelled = EncryptedShares(sender="s3", recipient="s1", sealed=from_s2.sealed)
    with pytest.raises(CryptoError, match="do not authenticate"):
        run.slaves["s1"].mask(ShareDelivery(round=3, shares=[relabelled]), run.inputs["s1"])
    # Shares addressed to somebody else.
    with pytest.raises(ProtocolError, match="cannot accept"):
        run.slaves["s4"].mask(deliveries["s5"], run.inputs["s4"])


def test_slave_refuses_to_mask_with_too_few_shares(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities)
    deliveries = run.share(run.advertise())
    withheld = ShareDelivery(round=3, shares=deliveries["s0"].shares[:3])
    with pytest.raises(ProtocolError, match="only 3 peers sent shares, threshold 5"):
        run.slaves["s0"].mask(withheld, run.inputs["s0"])
    assert run.slaves["s0"].stage is SlaveStage.FAILED


def test_master_refuses_incomplete_shares_and_abort_is_final(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities)
    key_list = run.advertise()
    shares = run.slaves["s0"].share_keys(key_list)
    partial = shares.model_copy(update={"shares": shares.shares[1:]})
    with pytest.raises(ProtocolError, match="exactly its neighbours"):
        run.master.receive_shares("s0", partial)
    run.master.receive_shares("s0", shares)
    run.master.abort()
    assert run.master.stage is MasterStage.ABORTED
    with pytest.raises(ProtocolError, match="aborted"):
        run.master.close_sharing()


def test_wrong_signatures_are_refused(identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities)
    genuine = run.slaves["s1"].advertise()
    # The right bytes, signed by another slave's certificate key.
    signed = advertisement_signing_bytes(run.settings.digest, 3, "s1", genuine.c_pk,
                                         genuine.s_pk, genuine.b_commitment, None)
    forged = genuine.model_copy(update={"signature": base64.b64encode(
        sign(identities["s2"][1], signed)).decode()})
    with pytest.raises(ProtocolError, match="invalid signature"):
        run.master.receive_advertisement("s1", forged)
    run.master.receive_advertisement("s1", genuine)  # the refusal left no trace
    for p in PARTIES[2:] + ("s0",):
        run.master.receive_advertisement(p, run.slaves[p].advertise())
    key_list = run.master.close_advertising()
    # A master that swaps s1's mask key for its own cannot re-sign it.
    _, own_pk = mk.generate_keypair()
    swapped = genuine.model_copy(update={"s_pk": base64.b64encode(own_pk).decode()})
    adverts = [swapped if a.party == "s1" else a for a in key_list.advertisements]
    with pytest.raises(ProtocolError, match="'s1' has an invalid signature"):
        run.slaves["s0"].share_keys(KeyList(round=3, advertisements=adverts))


def test_slaves_with_different_settings_cannot_mix(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    verify = _verifier(identities)
    master = MasterSecAgg(settings_for(), verify=verify)
    other = SlaveSecAgg(settings_for(threshold=6), "s1", verify=verify,
                        sign=functools.partial(sign, identities["s1"][1]))
    with pytest.raises(ProtocolError, match="invalid signature"):
        master.receive_advertisement("s1", other.advertise())


def test_master_refuses_bad_messages(identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities)
    deliveries = run.share(run.advertise())
    m = run.master
    late = AdvertiseKeys(round=3, party="s0", c_pk="A" * 43 + "=", s_pk="B" * 43 + "=",
                         b_commitment="0" * 64, seed_commitment=None, signature="C" * 8)
    with pytest.raises(ProtocolError, match="not advertising"):
        m.receive_advertisement("s0", late)
    header, payload = run.slaves["s0"].mask(deliveries["s0"], run.inputs["s0"])
    with pytest.raises(ProtocolError, match="claims to come from"):
        m.receive_masked("s1", header, payload)
    with pytest.raises(ProtocolError, match="SHA-256"):
        m.receive_masked("s0", header, payload[::-1])
    with pytest.raises(ProtocolError, match="expected 16 values"):
        m.receive_masked("s0", header, payload[:-8])
    too_big = np.full(LENGTH, M61, dtype="<u8").tobytes()
    bad_header = MaskedInput(round=3, party="s0", length=LENGTH,
                             sha256=hashlib.sha256(too_big).hexdigest())
    with pytest.raises(ProtocolError, match=">= the ring modulus"):
        m.receive_masked("s0", bad_header, too_big)
    m.receive_masked("s0", header, payload)
    with pytest.raises(ProtocolError, match="repeated"):
        m.receive_masked("s0", header, payload)
    for p in PARTIES[1:]:
        h, data = run.slaves[p].mask(deliveries[p], run.inputs[p])
        m.receive_masked(p, h, data)
    request = m.close_masking()
    response = run.slaves["s1"].unmask(request)
    greedy = response.model_copy(update={"mask_key_shares": response.self_mask_shares[:1]})
    with pytest.raises(ProtocolError, match="cannot hold"):
        m.receive_unmask("s1", greedy)
    m.receive_unmask("s1", response)
    for p in PARTIES[2:]:
        m.receive_unmask(p, run.slaves[p].unmask(request))
    assert [int(v) for v in m.finish()] == [
        int(v) % M61 for v in sum(run.inputs[p].astype(object) for p in PARTIES
                                  if p != "s0") + run.inputs["s0"].astype(object)]


def _with_a_flipped_self_mask_share(response: Any) -> Any:
    """``response`` with one bit of its first revealed self-mask share flipped."""
    first = response.self_mask_shares[0]
    bad = first.model_copy(update={"value": f"{int(first.value, 16) ^ 1:066x}"})
    return response.model_copy(
        update={"self_mask_shares": [bad, *response.self_mask_shares[1:]]})


def test_corrupted_revealed_share_is_detected(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run, request = _masked_round(identities)
    for p in PARTIES:
        response = run.slaves[p].unmask(request)
        if p == "s6":
            response = _with_a_flipped_self_mask_share(response)
        run.master.receive_unmask(p, response)
    with pytest.raises(CryptoError, match="inconsistent"):
        run.master.finish()
    assert run.master.stage is MasterStage.ABORTED


def test_steps_run_once_and_in_order(identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(), identities)
    slave = run.slaves["s0"]
    with pytest.raises(ProtocolError, match="cannot accept the peers' shares at stage ready"):
        slave.mask(ShareDelivery(round=3, shares=[]), run.inputs["s0"])
    with pytest.raises(ProtocolError, match="cannot mask its input at stage ready"):
        slave.mask_input(run.inputs["s0"])
    slave.advertise()
    with pytest.raises(ProtocolError, match="cannot advertise keys at stage advertised"):
        slave.advertise()
    with pytest.raises(CryptoError, match="shape"):
        Round(settings_for(), identities).slaves["s1"].mask_input(np.zeros(3, dtype=np.uint64))


def test_masks_made_ahead_are_used_once(identities: dict[str, tuple[bytes, bytes]]) -> None:
    """Masks made before the input (while a slave trains) hide each input, cancel in the sum,
    and are applied to one input only."""
    run = Round(settings_for(), identities)
    deliveries = run.share(run.advertise())
    for p in sorted(run.alive):
        run.slaves[p].accept_shares(deliveries[p])
        run.slaves[p].prepare_masks()
    with pytest.raises(ProtocolError, match="cannot accept the peers' shares at stage prepared"):
        run.slaves["s0"].accept_shares(deliveries["s0"])
    with pytest.raises(ProtocolError, match="cannot make its masks at stage prepared"):
        run.slaves["s0"].prepare_masks()
    for p in sorted(run.alive):
        header, payload = run.slaves[p].mask_input(run.inputs[p])
        masked = np.frombuffer(payload, dtype="<u8")
        assert not np.any(masked == run.inputs[p])  # hidden (m = 2^61 - 1: no value by chance)
        run.master.receive_masked(p, wire(header), payload)
    with pytest.raises(ProtocolError, match="cannot mask its input at stage masked"):
        run.slaves["s0"].mask_input(np.zeros_like(run.inputs["s0"]))
    assert [int(v) for v in run.unmask(wire(run.master.close_masking()))] == run.expected()


def test_settings_validation() -> None:
    assert settings_for().t == 5
    assert settings_for(parties=PARTIES[:3]).t == 2
    with pytest.raises(ConfigError, match="not a majority.*allow_minority_threshold=True"):
        settings_for(threshold=4)
    assert settings_for(threshold=4, allow_minority_threshold=True).max_dropouts == 4
    cases: list[tuple[dict[str, Any], str]] = [
        ({"threshold": 1, "allow_minority_threshold": True}, "impossible"),
        ({"threshold": 9}, "impossible"),
        ({"parties": ("s0", "s0", "s1")}, "duplicate"),
        ({"parties": ("s0",)}, "2 to"),
        ({"parties": ("S0", "s1")}, "invalid party id"),
        ({"modulus": 1}, "modulus"),
        ({"vector_length": 0}, "vector length"),
        ({"round": 0}, "round"),
        ({"neighbours": 3, "graph_seed": b"\x00" * 32}, "even k"),
        ({"neighbours": 8, "graph_seed": b"\x00" * 32}, "even k"),
        ({"neighbours": 4, "graph_seed": b"\x00" * 31}, "graph_seed"),
        ({"graph_seed": b"\x00" * 32}, "without neighbours"),
    ]
    for bad, match in cases:
        with pytest.raises(ConfigError, match=match):
            settings_for(**bad)
    assert settings_for(parties=("s1", "s0")).parties == ("s0", "s1")
    assert settings_for().digest != settings_for(round=4).digest


def test_harary_graph_is_regular_symmetric_and_seeded() -> None:
    parties = tuple(f"p{i}" for i in range(10))
    graph = harary_graph(parties, 4, b"\x01" * 32)
    assert all(len(neighbours) == 4 and p not in neighbours
               for p, neighbours in graph.items())
    assert all(p in graph[q] for p, neighbours in graph.items() for q in neighbours)
    assert graph == harary_graph(parties, 4, b"\x01" * 32)
    assert graph != harary_graph(parties, 4, b"\x02" * 32)
    plus = settings_for(neighbours=4, graph_seed=b"\x01" * 32)
    assert (plus.t, plus.max_dropouts, len(plus.holders("s0"))) == (3, 2, 5)


@pytest.mark.parametrize("drops", [{}, {"share": {"s2"}, "mask": {"s5"}}])
def test_secagg_plus_gives_the_exact_sum(identities: dict[str, tuple[bytes, bytes]],
                                         drops: dict[str, set[str]]) -> None:
    run = Round(settings_for(neighbours=4), identities, drops=drops)
    deliveries = run.share(run.advertise())
    graph = run.master.settings.graph  # fixed by the slaves' contributions
    for p, delivery in deliveries.items():  # shares travel along graph edges only
        assert {e.sender for e in delivery.shares} == graph[p] - drops.get("share", set())
    assert [int(v) for v in run.unmask(run.mask(deliveries))] == run.expected()


def test_masked_vector_is_independent_of_the_input(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    """s0's masked vector for an all-zero input and for an all-(m-1) input: both pass a
    chi-square test of uniformity on Z_251, and a two-sample chi-square test cannot tell
    them apart (random keys each run; significance 1e-6)."""
    m, length = 251, 20_000
    histograms = []
    for value in (0, m - 1):
        settings = settings_for(parties=PARTIES[:3], modulus=m, vector_length=length)
        inputs = {p: np.full(length, value, dtype=np.uint64) for p in PARTIES[:3]}
        run = Round(settings, identities, inputs=inputs)
        run.mask(run.share(run.advertise()))
        masked = np.frombuffer(run.payloads["s0"], dtype="<u8")
        counts = np.bincount(masked.astype(np.int64), minlength=m)
        assert stats.chisquare(counts).pvalue > 1e-6
        histograms.append(counts)
    assert stats.chi2_contingency(np.array(histograms)).pvalue > 1e-6


def test_parser_refuses_malformed_messages() -> None:
    cases: list[tuple[str | bytes, str]] = [
        (b"{}", "binary"), ("x" * (5 * 2**20), "exceeds"), ("[1]", "object"),
        ("{", "not valid JSON"),
        ('{"type": "secagg_unmask", "round": 1, "survivors": ["A"], "dropped": []}',
         "survivors"),
    ]
    for raw, match in cases:
        with pytest.raises(ProtocolError, match=match):
            parse_secagg_message(raw)


def test_masked_vectors_summed_outside_the_master(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    """``he+mask``: the masked vectors are added elsewhere (under encryption); the master only
    learns who contributed and unmasks the sum it is given."""
    run = Round(settings_for(), identities, drops={"mask": {"s3"}})
    deliveries = run.share(run.advertise())
    external = np.zeros(LENGTH, dtype=np.uint64)
    for p in sorted(run._phase("mask")):
        _, payload = run.slaves[p].mask(deliveries[p], run.inputs[p])
        external = mk.add_mod(external, np.frombuffer(payload, dtype="<u8").astype(np.uint64),
                              M61)
        run.master.note_masked(p)
    with pytest.raises(ProtocolError, match="summed outside"):
        run.master.receive_masked("s3", MaskedInput(round=3, party="s3", length=LENGTH,
                                                    sha256="0" * 64), bytes(8 * LENGTH))
    request = run.master.close_masking()
    for p in sorted(run.alive):
        run.master.receive_unmask(p, run.slaves[p].unmask(request))
    with pytest.raises(ProtocolError, match="needs the masked sum"):
        run.master.finish()
    assert [int(v) for v in run.master.finish(external)] == run.expected()


def test_nothing_of_one_attempt_is_valid_in_another_attempt_of_the_round(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    # Same federation, round and parties: only the task nonce of the attempt differs. A master
    # replaying an advertisement of an earlier attempt (whose secrets it may have rebuilt from
    # the shares of that attempt's survivors) is refused.
    first, second = settings_for(task_nonce="a" * 32), settings_for(task_nonce="b" * 32)
    assert first.digest != second.digest
    verify = _verifier(identities)
    earlier = SlaveSecAgg(first, "s1", verify=verify,
                          sign=functools.partial(sign, identities["s1"][1]))
    with pytest.raises(ProtocolError, match="invalid signature"):
        MasterSecAgg(second, verify=verify).receive_advertisement("s1", earlier.advertise())


def test_a_flipped_bit_in_a_self_mask_share_is_caught_with_exactly_t_responders(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    # t = 5 of 8 and only 5 slaves answer the unmask request: every self-mask seed is rebuilt
    # from exactly t shares, so no spare share can show the corruption. The commitment each
    # slave signed in its advertisement does.
    run, request = _masked_round(identities)
    responders = PARTIES[3:]
    assert len(responders) == run.settings.t
    for p in responders:
        response = run.slaves[p].unmask(request)
        if p == "s6":
            response = _with_a_flipped_self_mask_share(response)
        run.master.receive_unmask(p, wire(response))
    with pytest.raises(CryptoError, match=r"self-mask seed of 's0' rebuilt .* does not match "
                                          "the commitment 's0' signed"):
        run.master.finish()
    assert run.master.stage is MasterStage.ABORTED


def test_the_graph_seed_is_fixed_by_every_slave_and_not_by_the_master(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    run = Round(settings_for(neighbours=4), identities)
    key_list = run.advertise()
    reveals = run.reveals
    assert reveals is not None and {r.party for r in reveals.reveals} == set(PARTIES)
    assert run.master.settings.graph_seed.hex() == reveals.graph_seed
    # A master that substitutes a seed of its own (one that surrounds s0 with its colluders,
    # say) is refused by each slave, which derives the seed itself.
    chosen = reveals.model_copy(update={"graph_seed": "ab" * 32})
    with pytest.raises(ProtocolError, match="master's graph seed abababab.* differs"):
        run.slaves["s0"].share_keys(key_list, wire(chosen))
    # Steering the seed through a contribution, or leaving one out, is refused as well.
    forged = reveals.reveals[1].model_copy(update={"contribution": "cd" * 32})
    steered = reveals.model_copy(update={"reveals": [reveals.reveals[0], forged,
                                                     *reveals.reveals[2:]]})
    with pytest.raises(ProtocolError, match="contribution of 's1' does not match"):
        run.slaves["s2"].share_keys(key_list, wire(steered))
    partial = reveals.model_copy(update={"reveals": reveals.reveals[1:]})
    with pytest.raises(ProtocolError, match="every advertising slave"):
        run.slaves["s3"].share_keys(key_list, wire(partial))
    assert all(run.slaves[p].stage is SlaveStage.FAILED for p in ("s0", "s2", "s3"))


def test_the_master_cannot_fix_or_steer_the_graph_seed_itself(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    verify = _verifier(identities)
    with pytest.raises(ConfigError, match="starts with its graph seed open"):
        MasterSecAgg(settings_for(neighbours=4, graph_seed=b"\x05" * 32), verify=verify)
    with pytest.raises(ConfigError, match="starts with its graph seed open"):
        SlaveSecAgg(settings_for(neighbours=4, graph_seed=b"\x05" * 32), "s0", verify=verify,
                    sign=functools.partial(sign, identities["s0"][1]))
    run = Round(settings_for(neighbours=4), identities, drops={"reveal": {"s5"}})
    # A contribution that does not match the signed commitment is refused.
    run.master.receive_advertisement("s0", wire(run.slaves["s0"].advertise()))
    for p in PARTIES[1:]:
        run.master.receive_advertisement(p, wire(run.slaves[p].advertise()))
    key_list = run.master.close_advertising()
    other = SeedReveal(round=3, party="s0", contribution="ef" * 32)
    with pytest.raises(ProtocolError, match="contribution of 's0' does not match"):
        run.master.receive_reveal("s0", other)
    for p in PARTIES:
        if p != "s5":
            run.master.receive_reveal(p, wire(run.slaves[p].reveal_seed(key_list)))
    # A slave that advertised but did not reveal ends the round: a seed over a subset would let
    # the master choose among seeds by calling slaves late.
    with pytest.raises(ProtocolError, match=r"round aborted at revealing: \['s5'\]"):
        run.master.close_revealing()
    assert run.master.stage is MasterStage.ABORTED
    assert run.master.dropped_at == {"s5": MasterStage.REVEALING}


def test_each_secagg_plus_round_derives_a_fresh_graph_seed(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    first = Round(settings_for(neighbours=4), identities)
    assert [int(v) for v in first.run()] == first.expected()
    second = Round(settings_for(neighbours=4), identities)
    second.run()
    # Fresh contributions every round: another seed, another graph.
    assert first.master.settings.graph_seed != second.master.settings.graph_seed
    assert first.master.settings.digest != second.master.settings.digest


def test_the_worked_example_of_docs_secagg_md() -> None:
    # docs/secagg.md gives these values so that another implementation can be checked.
    assert graph_seed("0" * 64, {"b": "22" * 32, "a": "11" * 32}).hex() == (
        "caa774a45baa2398a315a079b9e154542dbe013d36d780848db1c3236e1e7539")
    assert contribution_commitment(b"\x11" * 32) == (
        "e0310cb5457241cfc7555da9d2ba7a1f1bd10fd3c5a58c1e42ddee97ce71e4db")
    assert self_mask_commitment(bytes(32)) == (
        "26c8b46f05b7c5a0648e780e7a49da7dc1ab998e605acdd03a46a3e236ba2eb5")


def test_under_distributed_dp_a_slave_reveals_nothing_for_fewer_than_min_survivors(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    """Its input carries only a share of the noise: a sum of fewer than ``min_survivors``
    would not carry all of it, so the slave refuses the unmask request (and a round with
    fewer parties from the start)."""
    run = Round(settings_for(), identities, drops={"mask": {"s6", "s7"}})
    request = run.mask(run.share(run.advertise()))
    assert sorted(request.survivors) == list(PARTIES[:6])
    strict = run.slaves["s0"]
    strict.min_survivors = 7
    with pytest.raises(ProtocolError, match="only 6 slaves survived, fewer than the 7"):
        strict.unmask(request)
    run.slaves["s1"].min_survivors = 6  # exactly m survivors: it answers
    assert run.slaves["s1"].unmask(request).party == "s1"
    verify = _verifier(identities)
    with pytest.raises(ConfigError, match="the round has 8 parties, fewer than the 9"):
        SlaveSecAgg(settings_for(), "s0", verify=verify, min_survivors=9,
                    sign=functools.partial(sign, identities["s0"][1]))


def test_slaves_given_different_plans_cannot_mix(
        identities: dict[str, tuple[bytes, bytes]]) -> None:
    """Under distributed DP the plan's digest is part of the settings: a slave given another
    grid or σ than its peers cannot complete a round with them."""
    verify = _verifier(identities)
    master = MasterSecAgg(settings_for(plan_sha256="a" * 64), verify=verify)
    other = SlaveSecAgg(settings_for(plan_sha256="b" * 64), "s1", verify=verify,
                        sign=functools.partial(sign, identities["s1"][1]))
    with pytest.raises(ProtocolError, match="invalid signature"):
        master.receive_advertisement("s1", other.advertise())
    same = SlaveSecAgg(settings_for(plan_sha256="a" * 64), "s2", verify=verify,
                       sign=functools.partial(sign, identities["s2"][1]))
    master.receive_advertisement("s2", same.advertise())
    assert settings_for().digest != settings_for(plan_sha256="a" * 64).digest
