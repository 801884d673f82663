"""Protection modes end to end: ``plain``, ``mask`` and ``he+mask`` over TLS.

The sums are checked bit for bit: each slave's exact plaintext (its clipped float update, or
its quantized ring vector before masking) is observed where the slave computes it, and the
master's committed model must differ from the previous one by exactly the decoded average.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_audit_slave_signatures import resign

from secure_fed.audit.recompute import check_log
from secure_fed.config.settings import EncryptionSettings, LimitSettings
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.secagg import ring as pc
from secure_fed.secagg.master_machine import MasterSecAgg
from secure_fed.secagg.messages import SeedReveals, contribution_commitment, graph_seed
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.slave import client as slave_client
from tests.conftest import run_federation, small_plan, started, trial_slave

SLAVES = ["a", "b", "c"]


def federation(tmp_path: Path, protection: str, slaves: list[str] = SLAVES,
               neighbours: int | None = None, **limits: Any) -> Path:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        slaves, min_slaves=2,
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection=protection,  # type: ignore[arg-type]
                                      mask_neighbours=neighbours),
        limits=LimitSettings(join_timeout_s=limits.get("join", 60),
                             upload_deadline_s=limits.get("deadline", 120),
                             max_round_attempts=limits.get("attempts", 3),
                             open_timeout_s=10, secagg_phase_timeout_s=30)))
    return fed


def run(fed: Path, out: Path, tmp_path: Path, slaves: list[str] = SLAVES) -> Master:
    """Run the federation with every slave of ``slaves``, states under ``tmp_path``."""
    states = {s: tmp_path / f"state-{s}" for s in slaves}
    master, _ = asyncio.run(run_federation(fed, out, states, timeout_s=240))
    return master


def model_change(out: Path, round_: int) -> np.ndarray:
    store = ModelStore(out / "checkpoints")
    before = parameters_vector(store.load(round_ - 1).package.build())
    after = parameters_vector(store.load(round_).package.build())
    change: np.ndarray = after - before
    return change


def observe_ring(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, np.ndarray]]:
    """Record (weight, ring vector before masking) of every slave update."""
    seen: list[tuple[int, np.ndarray]] = []
    lock = threading.Lock()
    real = pc.to_ring

    def wrapper(vector: Any, weight: int, params: Any, rng: Any) -> np.ndarray:
        ring = real(vector, weight, params, rng)
        with lock:
            seen.append((weight, ring.copy()))
        return ring

    monkeypatch.setattr(pc, "to_ring", wrapper)
    return seen


def test_plain_protection_sums_the_clipped_float_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[tuple[int, str], tuple[int, np.ndarray]] = {}
    real = slave_client.Slave._protect

    def protect(self: Any, encoder: Any, vector: Any, weight: int, delivery: Any,
                **options: Any) -> Any:
        chunks = real(self, encoder, vector, weight, delivery, **options)
        sent = np.frombuffer(b"".join(chunks), dtype="<f4").astype(np.float64)
        seen[(len([k for k in seen if k[1] == self.config.slave_id]) + 1,
              self.config.slave_id)] = (weight, sent)
        return chunks

    monkeypatch.setattr(slave_client.Slave, "_protect", protect)
    out = tmp_path / "out"
    master = run(federation(tmp_path, "plain"), out, tmp_path)
    assert master.coordinator.committed == 2
    for round_ in (1, 2):
        updates = [seen[(round_, s)] for s in SLAVES]
        total = sum(w for w, _ in updates)
        expected = sum(w * v for w, v in updates) / total
        assert np.max(np.abs(model_change(out, round_) - expected)) < 1e-6
        assert all(np.max(np.abs(v)) <= master.params.clip for _, v in updates)
    assert _updates(out, 1)[0]["bytes"] == 4 * master.vector_size  # one float32 per value


def test_mask_protection_sum_is_exact_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = observe_ring(monkeypatch)
    out = tmp_path / "out"
    master = run(federation(tmp_path, "mask"), out, tmp_path)
    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    t = pc.ring_modulus(params)
    for round_ in (1, 2):
        rings = seen[3 * (round_ - 1): 3 * round_]
        total = sum(w for w, _ in rings)
        ring_sum = np.zeros_like(rings[0][1])
        for _, ring in rings:
            ring_sum = (ring_sum + ring) % np.uint64(t)
        expected = pc.ring_to_average(ring_sum, total, params)
        change = model_change(out, round_)
        # The master adds the decoded average to float32 parameters: equal up to that rounding.
        assert np.max(np.abs(change - expected)) < 1e-6
        assert np.max(np.abs(expected)) > 100 * params.quant_step
    # Each masked update costs about one plaintext float: ring bits / 8 bytes per value.
    record = _updates(out, 1)[0]
    size = master.vector_size
    assert record["bytes"] == pc.chunk_bytes("mask", size, 0, t) * pc.chunk_count(size)
    assert record["bytes"] <= 4 * size


def test_secagg_plus_neighbour_graph_sum_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = observe_ring(monkeypatch)
    slaves = ["a", "b", "c", "d"]
    out = tmp_path / "out"
    master = run(federation(tmp_path, "mask", slaves, neighbours=2), out, tmp_path, slaves)
    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    t = pc.ring_modulus(params)
    for round_ in (1, 2):
        rings = seen[4 * (round_ - 1): 4 * round_]
        ring_sum = np.zeros_like(rings[0][1])
        for _, ring in rings:
            ring_sum = (ring_sum + ring) % np.uint64(t)
        expected = pc.ring_to_average(ring_sum, sum(w for w, _ in rings), params)
        assert np.max(np.abs(model_change(out, round_) - expected)) < 1e-6
    decrypted = [r["data"] for r in _records(out) if r["event"] == "aggregate_decrypted"]
    assert [d["secagg"]["neighbours"] for d in decrypted] == [2, 2]
    # Each round's graph seed came from all four slaves' contributions, fresh every round.
    derivations = [d["secagg"]["seed_derivation"] for d in decrypted]
    assert all(sorted(x["contributions"]) == slaves for x in derivations)
    assert decrypted[0]["secagg"]["graph_seed"] != decrypted[1]["secagg"]["graph_seed"]
    _audit_recomputes_the_graph_seed(out, tmp_path)


def _audit_recomputes_the_graph_seed(out: Path, tmp_path: Path) -> None:
    """``audit verify`` passes the genuine log and fails each rewrite a master could make of
    a recorded graph seed, even after re-signing the whole chain with its own key."""
    ca = (tmp_path / "fed" / "master" / "ca.pem").read_bytes()
    master_key = (tmp_path / "fed" / "master" / "master.key").read_bytes()
    assert check_log(out, ca_cert_pem=ca).ok

    def seed_of(data: dict[str, Any]) -> dict[str, Any]:
        secagg: dict[str, Any] = data["secagg"]
        return secagg

    def other_seed(secagg: dict[str, Any]) -> None:
        secagg["graph_seed"] = "00" * 32

    def other_contribution(secagg: dict[str, Any]) -> None:
        # The forgery that keeps the seed consistent with the contributions it records.
        derivation = secagg["seed_derivation"]
        derivation["contributions"]["a"] = "11" * 32
        digest = SecAggSettings(**{**derivation["settings"], "parties": tuple(
            derivation["settings"]["parties"])}).digest
        secagg["graph_seed"] = graph_seed(digest, derivation["contributions"]).hex()

    def other_commitment(secagg: dict[str, Any]) -> None:
        other_contribution(secagg)
        advert = secagg["seed_derivation"]["advertisements"][0]
        assert advert["party"] == "a"
        advert["seed_commitment"] = contribution_commitment(bytes.fromhex("11" * 32))

    cases = [(other_seed, "recorded graph seed"),
             (other_contribution, "contribution recorded for 'a' does not match"),
             (other_commitment, "advertisement of 'a' does not verify")]
    for edit, reason in cases:
        forged = tmp_path / f"forged-{edit.__name__}"
        forged.mkdir()
        records = _records(out)
        line = next(i for i, r in enumerate(records) if r["event"] == "aggregate_decrypted")
        (forged / "audit.jsonl").write_bytes((out / "audit.jsonl").read_bytes())
        resign(forged / "audit.jsonl", master_key,
               lambda rs, line=line, edit=edit: edit(seed_of(rs[line]["data"])))
        verdict = check_log(forged, ca_cert_pem=ca)
        assert [(f.line, f.event) for f in verdict.failures] == [
            (line + 1, "aggregate_decrypted")], verdict.failures
        assert reason in verdict.failures[0].reason


def test_slaves_refuse_a_graph_seed_the_master_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A master that replaces the derived seed by one of its choice (one that surrounds a
    # slave with colluders, say) and tells every slave so: each slave derives the seed itself,
    # refuses the round before training, and spends nothing.
    real = MasterSecAgg.close_revealing

    def choose_the_seed(self: MasterSecAgg) -> SeedReveals:
        honest = real(self)
        chosen = b"\x42" * 32
        self.settings = self.advertised_settings.with_graph_seed(chosen)
        return honest.model_copy(update={"graph_seed": chosen.hex()})

    monkeypatch.setattr(MasterSecAgg, "close_revealing", choose_the_seed)
    slaves = ["a", "b", "c", "d"]
    out = tmp_path / "out"
    master = run(federation(tmp_path, "mask", slaves, neighbours=2, attempts=1, deadline=20),
                 out, tmp_path, slaves)
    assert master.coordinator.committed == 0
    declines = [r["data"] for r in _records(out) if r["event"] == "decline"]
    assert sorted(d["slave"] for d in declines) == slaves
    assert all("master's graph seed 4242424242424242… differs" in d["reason"]
               for d in declines)
    assert not [r for r in _records(out) if r["event"] == "update_received"]
    for slave_id in slaves:
        ledger = PrivacyLedger.open(tmp_path / f"state-{slave_id}", budget_epsilon=3.0,
                                    delta=1e-5, source_id=slave_id)
        assert not ledger.mechanisms()


def test_he_mask_protection_sum_is_exact_with_a_slave_dropping_after_sharing_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = observe_ring(monkeypatch)
    real_protect = slave_client.Slave._protect
    dropped: list[str] = []

    def protect(self: Any, encoder: Any, vector: Any, weight: int, delivery: Any,
                **options: Any) -> Any:
        if self.config.slave_id == "c" and len(dropped) < 1:
            dropped.append("c")  # 'c' shared its keys, then vanishes before masking (round 1)
            from secure_fed.errors import ProtocolError
            raise ProtocolError("simulated drop after key sharing")
        return real_protect(self, encoder, vector, weight, delivery, **options)

    monkeypatch.setattr(slave_client.Slave, "_protect", protect)
    out = tmp_path / "out"
    # Four slaves: after c drops, three survive, the fewest a slave unmasks for by default.
    slaves = ["a", "b", "c", "d"]
    master = run(federation(tmp_path, "he+mask", slaves, deadline=25), out, tmp_path, slaves)
    assert master.coordinator.committed == 2
    params = master.bundle.he_params
    t = pc.ring_modulus(params)
    round1 = _updates(out, 1)
    assert sorted(u["slave"] for u in round1) == ["a", "b", "d"]
    # Round 1: c's pairwise masks were rebuilt from the shares it gave before dropping.
    rings = seen[:3]
    ring_sum = np.zeros_like(rings[0][1])
    for _, ring in rings:
        ring_sum = (ring_sum + ring) % np.uint64(t)
    expected = pc.ring_to_average(ring_sum, sum(w for w, _ in rings), params)
    assert np.max(np.abs(model_change(out, 1) - expected)) < 1e-6


def _updates(out: Path, round_: int | None = None) -> list[dict[str, Any]]:
    import json

    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    return [r["data"] for r in records if r["event"] == "update_received"
            and (round_ is None or r["data"]["round"] == round_)]


def test_a_slave_refuses_a_master_whose_protection_differs_from_its_bundle(
    tmp_path: Path,
) -> None:
    from secure_fed.errors import ProtocolError
    from secure_fed.he.bundle import SlaveBundle
    from secure_fed.privacy.ledger import PrivacyLedger
    from secure_fed.slave.client import Slave
    from secure_fed.slave.sources import bundled_part

    fed = federation(tmp_path, "plain")

    async def go() -> None:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "out", port=0)
        task, port = await asyncio.wait_for(started(master), 30)
        loaded = SlaveBundle.load(fed / "slaves" / "a").with_master_url(
            f"wss://127.0.0.1:{port}")
        # This data owner agreed to encrypted, masked updates only.
        stricter = loaded.config.model_copy(update={
            "encryption": loaded.config.encryption.model_copy(update={"protection": "he+mask"})})
        slave = Slave(SlaveBundle(loaded.directory, stricter, loaded.he_params),
                      bundled_part("digits", "0/3"), state_dir=tmp_path / "state-a", workers=1,
                      budget_epsilon=3.0, source_id="a", reconnect_give_up_s=5)
        try:
            with pytest.raises(ProtocolError, match="protects updates with 'plain'"):
                await asyncio.wait_for(slave.run(), 60)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())
    ledger = PrivacyLedger.open(tmp_path / "state-a", budget_epsilon=3.0, delta=1e-5,
                                source_id="a")
    assert ledger.spent() == 0.0 and not ledger.mechanisms()


def test_slaves_decline_a_masked_round_smaller_than_their_minimum_and_spend_nothing(
    tmp_path: Path,
) -> None:
    fed = federation(tmp_path, "mask", join=2, attempts=2)
    out = tmp_path / "out"

    async def go() -> Master:
        master = Master(MasterBundle.load(fed / "master"), out, port=0)
        task, port = await asyncio.wait_for(started(master), 30)
        # Only two of the three slaves come: the master tasks a round of two parties.
        runners = [trial_slave(fed, s, f"{i}/3", f"wss://127.0.0.1:{port}",
                               tmp_path / f"state-{s}").run() for i, s in enumerate("ab")]
        await asyncio.wait_for(asyncio.gather(*runners), 120)
        await asyncio.wait_for(task, 60)
        return master

    master = asyncio.run(go())
    assert master.coordinator.committed == 0
    declines = [r["data"] for r in _records(out) if r["event"] == "decline"]
    assert declines and all("min_mask_parties=3" in d["reason"] for d in declines)
    for slave_id in "ab":
        ledger = PrivacyLedger.open(tmp_path / f"state-{slave_id}", budget_epsilon=3.0,
                                    delta=1e-5, source_id=slave_id)
        assert not ledger.mechanisms()


def _records(out: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
