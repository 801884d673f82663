"""The slave's protocol machine alone: no sockets, no clocks, no training.

Every transition of :data:`secure_fed.protocol.slave_states.TRANSITIONS` is driven here
(the last test checks that none is missed), with real secure-aggregation messages from a
real :class:`MasterSecAgg` where a masked round needs them.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from secure_fed.config.settings import LimitSettings
from secure_fed.errors import ProtocolError, TransportError
from secure_fed.identity.certificates import generate_ca, issue_certificate, sign, verify_signature
from secure_fed.protocol import slave_actions as act
from secure_fed.protocol.messages import (
    Accepted,
    ErrorMessage,
    Finished,
    Hello,
    ModelHeader,
    Plan,
    Rejected,
    RoundEnd,
    SecAggTask,
    Task,
    Welcome,
    encode,
)
from secure_fed.protocol.slave_machine import SlaveMachine
from secure_fed.protocol.slave_states import TRANSITIONS, SlaveState
from secure_fed.secagg.master_machine import MasterSecAgg
from secure_fed.secagg.messages import (
    AdvertiseKeys,
    KeyList,
    RevealedContribution,
    SeedReveal,
    SeedReveals,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.slave_machine import SlaveSecAgg, SlaveStage

S = SlaveState
FED = "fed-1"
NONCE = "ab" * 16
MODULUS = 2**61 - 1
VALUES = 8
HELLO = Hello(protocol=4, software="test", public_context_sha256="0" * 64)
_IDENTITIES: dict[str, tuple[bytes, bytes]] = {}


def identity(party: str) -> tuple[bytes, bytes]:
    """A certificate (PEM) and key of ``party`` under one test CA."""
    if not _IDENTITIES:
        _IDENTITIES["ca"] = generate_ca(FED)
    if party not in _IDENTITIES:
        ca_cert, ca_key = _IDENTITIES["ca"]
        _IDENTITIES[party] = issue_certificate(ca_cert, ca_key, party, role="slave")
    return _IDENTITIES[party]


def verify(party: str, data: bytes, signature: bytes) -> None:
    verify_signature(identity(party)[0], data, signature)


def machine(slave_id: str = "a", *, protection: str = "he", min_mask_parties: int = 3,
            jitter: Callable[[float], float] = lambda most: most,
            max_model_bytes: int = 2**20) -> SlaveMachine:
    return SlaveMachine(
        hello=HELLO, federation_id=FED, slave_id=slave_id, protection=protection,
        limits=LimitSettings(max_model_bytes=max_model_bytes), min_mask_parties=min_mask_parties,
        ring_modulus=lambda: MODULUS, sign=functools.partial(sign, identity(slave_id)[1]),
        verifier=lambda info: verify, reconnect_give_up_s=60.0, jitter=jitter)


def task(*, parties: tuple[str, ...] = (), neighbours: int | None = None,
         threshold: int | None = None, student: bool = False, mode: str = "delta",
         params_bytes: int = 16) -> Task:
    header = ModelHeader(architecture="mlp", kwargs={}, digest="0" * 64,
                         params_bytes=params_bytes)
    secagg = (SecAggTask(parties=list(parties), neighbours=neighbours, threshold=threshold,
                         certificates={p: identity(p)[0].decode() for p in parties})
              if parties else None)
    return Task(round=1, attempt=1, nonce=NONCE, deadline_s=60.0, model=header,
                plan=Plan(mode=mode, epochs=1, batch_size=8, lr=0.1, momentum=0.0,  # type: ignore[arg-type]
                          max_grad_norm=1.0, epsilon=3.0, delta=1e-5, rounds_total=2,
                          temperature=2.0 if mode == "distill" else None,
                          alpha=0.5 if mode == "distill" else None),
                student=header if student else None, secagg=secagg, vector_size=VALUES,
                chunks=1)


def welcome(m: SlaveMachine, **overrides: Any) -> list[act.Action]:
    values: dict[str, Any] = dict(protocol=4, federation_id=FED, slave_id=m.slave_id,
                                  preset="bfv-fast", protection=m.protection, next_round=1)
    values.update(overrides)
    return m.receive_message(encode(Welcome(**values)))


def connected(m: SlaveMachine) -> SlaveMachine:
    assert m.receive_connected() == [act.Send(HELLO)]
    welcome(m)
    assert m.state is S.IDLE
    return m


def tasked(m: SlaveMachine, t: Task) -> list[act.Action]:
    """Send ``t`` and its payloads to a connected machine; the actions after the last one."""
    assert m.receive_message(encode(t)) == []
    if t.student is not None:
        assert m.receive_message(b"m" * t.model.params_bytes) == []
        assert m.state is S.AWAITING_STUDENT
        return m.receive_message(b"s" * t.student.params_bytes)
    return m.receive_message(b"m" * t.model.params_bytes)


def only(actions: list[act.Action], kind: type) -> Any:
    assert len(actions) == 1 and isinstance(actions[0], kind), actions
    return actions[0]


def sent(actions: list[act.Action], kind: type[BaseModel]) -> Any:
    message = only(actions, act.Send).message
    assert isinstance(message, kind), message
    return message


def trained_and_uploaded(m: SlaveMachine) -> act.Upload:
    record = only(m.receive_trained("update", VALUES), act.RecordRelease)
    assert record.trained == "update" and m.state is S.RECORDING
    protect = only(m.receive_release_recorded(), act.Protect)
    assert m.state is S.PROTECTING
    upload = only(m.receive_protected([b"chunk"]), act.Upload)
    assert upload.chunks == [b"chunk"] and upload.trained == "update" and m.state is S.IDLE
    assert protect.task == upload.task
    return upload


# --- scenarios (each test runs one; the last test runs them all and checks the table) ------


def scenario_plain_round() -> None:
    m = connected(machine())
    check = only(tasked(m, task()), act.CheckTask)
    assert check.params == b"m" * 16 and check.student_params is None and m.state is S.CHECKING
    train = only(m.receive_task_checked("prepared"), act.Train)
    assert train.prepared == "prepared" and m.state is S.TRAINING
    upload = trained_and_uploaded(m)
    assert upload.task.nonce == NONCE
    note = only(m.receive_message(encode(Accepted(round=1, nonce=NONCE))), act.Notify)
    assert note.event == "accepted" and m.state is S.IDLE
    note = only(m.receive_message(encode(RoundEnd(round=1, committed=True, reason="ok"))),
                act.Notify)
    assert note.event == "round_end"
    note = only(m.receive_message(encode(Finished(rounds=2, reason="all done"))), act.Notify)
    assert note.data == {"reason": "all done"} and m.state is S.FINISHED
    assert m.finished_reason == "all done" and m.receive_timeout() is None


def scenario_student() -> None:
    m = connected(machine())
    check = only(tasked(m, task(student=True, mode="distill")), act.CheckTask)
    assert check.params == b"m" * 16 and check.student_params == b"s" * 16


def scenario_declined_at_each_work() -> None:
    for steps in range(4):
        m = connected(machine())
        only(tasked(m, task()), act.CheckTask)
        if steps > 0:
            only(m.receive_task_checked(None), act.Train)
        if steps > 1:
            only(m.receive_trained(None, VALUES), act.RecordRelease)
        if steps > 2:
            only(m.receive_release_recorded(), act.Protect)
        decline = only(m.receive_declined("budget", final=steps == 1), act.Decline)
        assert (decline.task.nonce, decline.reason, decline.final) == (NONCE, "budget", steps == 1)
        assert m.state is S.IDLE
        # the next task is answered as if nothing had happened
        only(tasked(m, task()), act.CheckTask)


def scenario_rejected_then_retried() -> None:
    m = connected(machine())
    only(tasked(m, task()), act.CheckTask)
    only(m.receive_task_checked(None), act.Train)
    trained_and_uploaded(m)
    note = only(m.receive_message(encode(Rejected(round=1, nonce=NONCE, reason="late"))),
                act.Notify)
    assert note.event == "rejected" and note.data["nonce"] == NONCE and m.state is S.IDLE
    # the master retries the round with a new attempt: a new task, trained again
    retry = task().model_copy(update={"attempt": 2, "nonce": "cd" * 16})
    assert only(tasked(m, retry), act.CheckTask).task.nonce == "cd" * 16


def scenario_reconnect() -> None:
    m = machine(jitter=lambda most: most / 2)
    m.start(0.0)
    waits = [only(m.receive_connect_failed("refused", t), act.Wait).seconds
             for t in (1.0, 2.0, 3.0)]
    assert waits == [0.25, 0.5, 1.0] and m.state is S.DISCONNECTED
    connected(m)
    only(tasked(m, task()), act.CheckTask)
    assert m.receive_connection_lost("reset", 10.0) == [] and m.state is S.DISCONNECTED
    # the backoff starts over after a connection, the give-up clock after losing it
    assert only(m.receive_connect_failed("refused", 69.0), act.Wait).seconds == 0.25
    with pytest.raises(TransportError, match="gave up reaching the master after 60 s"):
        m.receive_connect_failed("refused", 70.0)


def scenario_masked_round(parties: tuple[str, ...] = ("a", "b", "c"),
                          neighbours: int | None = None) -> None:
    settings = SecAggSettings(federation_id=FED, round=1, parties=parties,
                              vector_length=VALUES, modulus=MODULUS, neighbours=neighbours,
                              task_nonce=NONCE)
    master = MasterSecAgg(settings, verify=verify)
    machines = {p: connected(machine(p, protection="he+mask")) for p in parties}
    t = task(parties=parties, neighbours=neighbours)
    for party, m in machines.items():
        only(tasked(m, t), act.CheckTask)
        advert = sent(m.receive_task_checked(party), AdvertiseKeys)
        assert m.state is S.AWAITING_KEYS and m.receive_timeout() == 600.0
        # a message of a later phase is out of order: ignored
        assert m.receive_message(encode(UnmaskRequest(round=1, survivors=[], dropped=[]))) == []
        master.receive_advertisement(party, advert)
    key_list = encode(master.close_advertising())
    if neighbours is not None:
        for party, m in machines.items():
            master.receive_reveal(party, sent(m.receive_message(key_list), SeedReveal))
            assert m.state is S.AWAITING_REVEALS
        key_list = encode(master.close_revealing())
    for party, m in machines.items():
        master.receive_shares(party, sent(m.receive_message(key_list), ShareKeys))
        assert m.state is S.AWAITING_SHARES
    deliveries = master.close_sharing()
    ring = np.arange(VALUES, dtype=np.uint64)
    for party, m in machines.items():
        assert only(m.receive_message(encode(deliveries[party])), act.Train).prepared == party
        only(m.receive_trained(party, VALUES), act.RecordRelease)
        protect = only(m.receive_release_recorded(), act.Protect)
        assert protect.secagg is m.secagg and protect.delivery == deliveries[party]
        # the shares were opened when they arrived, before training; the masks are the shell's
        assert protect.secagg.stage is SlaveStage.ACCEPTED
        protect.secagg.prepare_masks()
        header, payload = protect.secagg.mask_input(ring)
        master.receive_masked(party, header, payload)
        only(m.receive_protected([payload]), act.Upload)
    request = master.close_masking()
    for party, m in machines.items():
        unmask = only(m.receive_message(encode(request)), act.Unmask)
        master.receive_unmask(party, sent(m.receive_unmask_go(unmask.request), UnmaskResponse))
        assert m.secagg is None  # shares are revealed once
    # the masks cancel: the master obtains exactly the sum of the slaves' ring vectors
    total = np.asarray(master.finish(), dtype=np.uint64)
    assert np.array_equal(total, ring * len(parties))


def scenario_masked_refusals() -> None:
    # a key list with too few advertisements for this slave's minimum: declined, nothing spent
    m = connected(machine("a", protection="he+mask"))
    only(tasked(m, task(parties=("a", "b", "c"))), act.CheckTask)
    advert = sent(m.receive_task_checked(None), AdvertiseKeys)
    thin = KeyList(round=1, advertisements=[advert])
    decline = only(m.receive_message(encode(thin)), act.Decline)
    assert "secure aggregation refused" in decline.reason and "min_mask_parties" in decline.reason
    assert m.state is S.IDLE and m.secagg is None
    # a key list that does not parse: declined the same way, the slave stays connected
    m = connected(machine("a", protection="he+mask"))
    only(tasked(m, task(parties=("a", "b", "c"))), act.CheckTask)
    sent(m.receive_task_checked(None), AdvertiseKeys)
    garbled = '{"type":"secagg_keys","round":1,"advertisements":"none"}'
    decline = only(m.receive_message(garbled), act.Decline)
    assert "secure aggregation refused" in decline.reason
    assert m.state is S.IDLE and m.secagg is None
    # a round of fewer parties than min_mask_parties: declined before advertising
    m = connected(machine("a", protection="he+mask", min_mask_parties=4))
    only(tasked(m, task(parties=("a", "b", "c"))), act.CheckTask)
    decline = only(m.receive_task_checked(None), act.Decline)
    assert "min_mask_parties=4" in decline.reason and m.secagg is None
    # a masked federation's task without secure aggregation: declined before any work
    m = connected(machine("a", protection="mask"))
    decline = only(tasked(m, task()), act.Decline)
    assert "carries no secure aggregation" in decline.reason
    # seed reveals that do not open the signed commitments: declined (SecAgg+)
    m = secagg_plus_revealed()
    bad = SeedReveals(round=1, graph_seed="0" * 64, reveals=[
        RevealedContribution(party=p, contribution="1" * 64) for p in ("a", "b", "c", "d")])
    decline = only(m.receive_message(encode(bad)), act.Decline)
    assert "secure aggregation refused" in decline.reason and m.state is S.IDLE
    assert m.secagg is None
    # fewer peers shared keys than this slave's minimum, or than the threshold: declined
    # before training
    for keep, match in ((0, "the round has 1 slaves that shared keys"),
                        (1, "only 1 peers shared keys, threshold 3")):
        m, delivery = shares_delivered(threshold=3)
        thin = delivery.model_copy(update={"shares": delivery.shares[:keep]})
        decline = only(m.receive_message(encode(thin)), act.Decline)
        assert match in decline.reason and m.state is S.IDLE and m.secagg is None
    # a share that does not open (corrupted by the master or a peer): declined before training
    m, delivery = shares_delivered()
    item = delivery.shares[0]
    sealed = bytearray(base64.b64decode(item.sealed))
    sealed[-1] ^= 1
    forged = delivery.model_copy(update={"shares": [
        item.model_copy(update={"sealed": base64.b64encode(bytes(sealed)).decode("ascii")}),
        *delivery.shares[1:]]})
    decline = only(m.receive_message(encode(forged)), act.Decline)
    assert "secure aggregation refused" in decline.reason and m.state is S.IDLE
    assert m.secagg is None


def shares_delivered(threshold: int | None = None) -> tuple[SlaveMachine, ShareDelivery]:
    """Slave ``a`` of a masked round of three (its peers real :class:`SlaveSecAgg`), waiting
    for its shares, and the delivery its master would send."""
    parties = ("a", "b", "c")
    settings = masked_settings(parties, threshold=threshold)
    m = connected(machine("a", protection="he+mask", min_mask_parties=2))
    only(tasked(m, task(parties=parties, threshold=threshold)), act.CheckTask)
    master = MasterSecAgg(settings, verify=verify)
    peers = {p: SlaveSecAgg(settings, p, sign=functools.partial(sign, identity(p)[1]),
                            verify=verify) for p in parties[1:]}
    master.receive_advertisement("a", sent(m.receive_task_checked(None), AdvertiseKeys))
    for p, peer in peers.items():
        master.receive_advertisement(p, peer.advertise())
    key_list = master.close_advertising()
    master.receive_shares("a", sent(m.receive_message(encode(key_list)), ShareKeys))
    for p, peer in peers.items():
        master.receive_shares(p, peer.share_keys(key_list))
    return m, master.close_sharing()["a"]


def masked_settings(parties: tuple[str, ...], neighbours: int | None = None,
                    threshold: int | None = None) -> SecAggSettings:
    return SecAggSettings(federation_id=FED, round=1, parties=parties, vector_length=VALUES,
                          modulus=MODULUS, neighbours=neighbours, threshold=threshold,
                          task_nonce=NONCE)


def advertisement(party: str, parties: tuple[str, ...],
                  neighbours: int | None = None) -> AdvertiseKeys:
    """A peer's real key advertisement for the round of :func:`task`."""
    return SlaveSecAgg(masked_settings(parties, neighbours), party,
                       sign=functools.partial(sign, identity(party)[1]),
                       verify=verify).advertise()


def secagg_plus_revealed() -> SlaveMachine:
    """Slave ``a`` of a SecAgg+ round of four, waiting for the seed reveals."""
    parties = ("a", "b", "c", "d")
    m = connected(machine("a", protection="mask"))
    only(tasked(m, task(parties=parties, neighbours=2)), act.CheckTask)
    master = MasterSecAgg(masked_settings(parties, 2), verify=verify)
    master.receive_advertisement("a", sent(m.receive_task_checked(None), AdvertiseKeys))
    for p in parties[1:]:
        master.receive_advertisement(p, advertisement(p, parties, 2))
    sent(m.receive_message(encode(master.close_advertising())), SeedReveal)
    assert m.state is S.AWAITING_REVEALS
    return m


def scenario_round_ends_during_key_exchange() -> None:
    # keys
    m = connected(machine("a", protection="mask"))
    only(tasked(m, task(parties=("a", "b", "c"))), act.CheckTask)
    sent(m.receive_task_checked(None), AdvertiseKeys)
    note = only(m.receive_message(encode(RoundEnd(round=1, committed=False, reason="x"))),
                act.Notify)
    assert note.event == "round_end" and m.state is S.IDLE and m.secagg is None
    # reveals: a new task ends the old exchange and starts over
    m = secagg_plus_revealed()
    assert m.receive_message(encode(task().model_copy(update={"nonce": "cd" * 16}))) == []
    assert m.state is S.AWAITING_MODEL and m.secagg is None
    # shares
    m = connected(machine("a", protection="he+mask", min_mask_parties=2))
    only(tasked(m, task(parties=("a", "b"))), act.CheckTask)
    master = MasterSecAgg(masked_settings(("a", "b")), verify=verify)
    master.receive_advertisement("a", sent(m.receive_task_checked(None), AdvertiseKeys))
    master.receive_advertisement("b", advertisement("b", ("a", "b")))
    sent(m.receive_message(encode(master.close_advertising())), ShareKeys)
    only(m.receive_message(encode(Finished(rounds=0, reason="stopped"))), act.Notify)
    assert m.state is S.FINISHED and m.secagg is None


def scenario_connection_lost_in_every_state() -> None:
    reached: dict[SlaveState, Callable[[], SlaveMachine]] = {
        S.AWAITING_WELCOME: lambda: _after(machine(), lambda m: m.receive_connected()),
        S.IDLE: lambda: connected(machine()),
        S.AWAITING_MODEL: lambda: _after(connected(machine()),
                                         lambda m: m.receive_message(encode(task()))),
        S.CHECKING: lambda: _after(connected(machine()), lambda m: tasked(m, task())),
        S.AWAITING_KEYS: lambda: _after(
            _after(connected(machine(protection="mask")),
                   lambda m: tasked(m, task(parties=("a", "b", "c")))),
            lambda m: m.receive_task_checked(None)),
        S.AWAITING_REVEALS: secagg_plus_revealed,
    }
    for state, reach in reached.items():
        m = reach()
        assert m.state is state
        assert m.receive_connection_lost("reset", 1.0) == []
        assert m.state is S.DISCONNECTED and m.secagg is None
        connected(m)  # and the next connection starts afresh


def _after(m: SlaveMachine, step: Callable[[SlaveMachine], object]) -> SlaveMachine:
    step(m)
    return m


SCENARIOS = [scenario_plain_round, scenario_student, scenario_declined_at_each_work,
             scenario_rejected_then_retried, scenario_reconnect, scenario_masked_round,
             functools.partial(scenario_masked_round, ("a", "b", "c", "d"), 2),
             scenario_masked_refusals, scenario_round_ends_during_key_exchange,
             scenario_connection_lost_in_every_state]


@pytest.mark.parametrize("scenario", SCENARIOS,
                         ids=lambda s: getattr(s, "__name__", "scenario_secagg_plus_round"))
def test_scenario(scenario: Callable[[], None]) -> None:
    scenario()


def test_every_transition_of_the_table_is_exercised(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: set[tuple[SlaveState, str]] = set()
    real = SlaveMachine._go

    def go(self: SlaveMachine, event: str) -> None:
        seen.add((self.state, event))
        real(self, event)

    monkeypatch.setattr(SlaveMachine, "_go", go)
    for scenario in SCENARIOS:
        scenario()
    table = {(state, event) for state, events in TRANSITIONS.items() for event in events}
    assert table - seen == set()


# --- protocol errors -----------------------------------------------------------------------


def test_a_welcome_for_another_federation_or_protection_is_refused() -> None:
    for overrides, match in (({"federation_id": "fed-2"}, "serves federation 'fed-2'"),
                             ({"protection": "plain"}, "protects updates with 'plain'")):
        m = machine()
        m.receive_connected()
        with pytest.raises(ProtocolError, match=match):
            welcome(m, **overrides)


def test_the_master_s_error_or_another_first_message_is_a_protocol_error() -> None:
    m = machine()
    m.receive_connected()
    with pytest.raises(ProtocolError, match="refused this slave: no room") as caught:
        m.receive_message(encode(ErrorMessage(code=4003, message="no room")))
    assert caught.value.close_code == 4003
    m = machine()
    m.receive_connected()
    with pytest.raises(ProtocolError, match="expected 'welcome', got 'task'"):
        m.receive_message(encode(task()))
    m = connected(machine())
    with pytest.raises(ProtocolError, match="reported an error: bad"):
        m.receive_message(encode(ErrorMessage(code=1008, message="bad")))


def test_a_repeated_welcome_is_ignored_and_garbage_is_a_protocol_error() -> None:
    m = connected(machine())
    assert welcome(m) == [] and m.state is S.IDLE
    with pytest.raises(ProtocolError, match="expected a JSON text message"):
        connected(machine()).receive_message(b"\x00")


@pytest.mark.parametrize("payload, match", [
    ("{}", "model parameters did not follow as announced"),
    (b"m" * 15, "model parameters did not follow as announced"),
])
def test_a_model_payload_that_does_not_match_its_header_is_refused(
        payload: str | bytes, match: str) -> None:
    m = connected(machine())
    m.receive_message(encode(task()))
    with pytest.raises(ProtocolError, match=match):
        m.receive_message(payload)


def test_a_model_over_the_slave_s_limit_is_refused_even_when_announced() -> None:
    m = connected(machine(max_model_bytes=1024))
    m.receive_message(encode(task(params_bytes=2048)))
    with pytest.raises(ProtocolError, match="model of 2048 bytes exceeds this slave's limit"):
        m.receive_message(b"m" * 2048)


def test_a_student_payload_that_does_not_follow_is_refused() -> None:
    m = connected(machine())
    m.receive_message(encode(task(student=True, mode="distill")))
    m.receive_message(b"m" * 16)
    with pytest.raises(ProtocolError, match="student parameters did not follow"):
        m.receive_message(b"s" * 3)


def test_a_distill_task_without_its_settings_is_declined_before_any_work() -> None:
    m = connected(machine())
    incomplete = task(mode="distill")
    incomplete = incomplete.model_copy(update={"plan": incomplete.plan.model_copy(
        update={"alpha": None})})
    decline = only(tasked(m, incomplete), act.Decline)
    assert "temperature and an alpha" in decline.reason and m.state is S.IDLE


def test_an_update_of_another_size_than_announced_is_a_protocol_error() -> None:
    m = connected(machine())
    only(tasked(m, task()), act.CheckTask)
    only(m.receive_task_checked(None), act.Train)
    with pytest.raises(ProtocolError, match="the update has 7 values, the task announced 8"):
        m.receive_trained(None, VALUES - 1)


def test_an_unmask_request_without_a_masked_update_reveals_nothing() -> None:
    m = connected(machine(protection="he+mask"))
    assert m.receive_message(encode(UnmaskRequest(round=1, survivors=["a", "b", "c"],
                                                  dropped=[]))) == []
    assert m.state is S.IDLE


def test_an_unmask_request_with_too_few_survivors_reveals_nothing() -> None:
    parties = ("a", "b", "c")
    m = connected(machine("a", protection="he+mask"))
    only(tasked(m, task(parties=parties)), act.CheckTask)
    master = MasterSecAgg(masked_settings(parties), verify=verify)
    master.receive_advertisement("a", sent(m.receive_task_checked(None), AdvertiseKeys))
    for p in parties[1:]:
        master.receive_advertisement(p, advertisement(p, parties))
    sent(m.receive_message(encode(master.close_advertising())), ShareKeys)
    assert m.secagg is not None
    request = UnmaskRequest(round=1, survivors=["a", "b"], dropped=["c"])
    m.exchange.delivery = ShareDelivery(round=1, shares=[])  # type: ignore[union-attr]
    m.state = S.IDLE  # as after an upload
    unmask = only(m.receive_message(encode(request)), act.Unmask)
    assert m.receive_unmask_go(unmask.request) == [] and m.secagg is None


def test_results_nobody_asked_for_are_refused() -> None:
    m = connected(machine())
    with pytest.raises(RuntimeError):
        m.receive_task_checked(None)
    with pytest.raises(RuntimeError):
        m.receive_declined("x", final=False)
    with pytest.raises(RuntimeError):
        m.receive_protected([])
    with pytest.raises(ProtocolError):
        m.receive_connected()


def test_receive_timeouts_follow_the_state() -> None:
    m = machine()
    m.receive_connected()
    assert m.receive_timeout() == 10.0
    welcome(m)
    assert m.receive_timeout() is None
    m.receive_message(encode(task()))
    assert m.receive_timeout() == 60.0




def test_the_machine_imports_no_training_encryption_transport_or_clock() -> None:
    import subprocess
    import sys

    code = ("import sys, secure_fed.protocol.slave_machine; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'opacus', 'tenseal', 'websockets', 'asyncio') "
            "or m.startswith(('secure_fed.privacy', 'secure_fed.transport', "
            "'secure_fed.slave', 'secure_fed.master'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def transitions_markdown() -> str:
    """The slave's transition table as docs/protocol.md shows it."""
    rows = ["| state | event | next state |", "| --- | --- | --- |"]
    for state, events in TRANSITIONS.items():
        rows += [f"| `{state.value}` | {event.replace('_', ' ')} | `{after.value}` |"
                 for event, after in events.items()]
    return "\n".join(rows)


def test_protocol_md_shows_the_slave_transition_table() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text("utf-8")
    assert transitions_markdown() in doc
