"""A slave poisons its ciphertexts; the master's key holder refuses the aggregate and retries.

A real federation over mutual TLS on 127.0.0.1 (real TenSEAL, real secure aggregation, real
training), under ``he`` and under ``he+mask`` (where the noise budget is checked before
unmasking and the range after it). Slave ``b`` sends, in the first attempt of each round, one
poisoned update the aggregator cannot tell from a valid one — random coefficients, an honest
encryption under another key with the federation key's id copied into its chunk headers, and
values encoded with weight 65536 under its declared weight — and an honest update in the
second attempt; a fourth round is honest throughout. Every poisoned attempt must end in an
``aggregate_refused`` record naming the contributors and the check, without a model
committed; every round must then be committed from its honest attempt, and ``audit verify``
must accept the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_plan, started, trial_slave

from secure_fed.audit.recompute import check_log
from secure_fed.audit.render import Table, report_sections
from secure_fed.audit.report import build_report
from secure_fed.config.settings import EncryptionSettings, LimitSettings, TrainingPlanSettings
from secure_fed.he.bundle import MasterBundle, SlaveBundle
from secure_fed.he.chunk_format import pack_chunk
from secure_fed.he.codec import UpdateEncoder, encode_plain, encrypt_chunk
from secure_fed.he.keys import ciphertext_layout, generate_contexts, load_public_context
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.slave.client import Slave
from secure_fed.slave.protection import masked_ring
from secure_fed.slave.sources import bundled_part

LIE = 65_536
ATTACKS = ("random-coefficients", "another-key", "weight-lie")
EXPECTED_CHECK = {"random-coefficients": "noise_budget", "another-key": "noise_budget",
                  "weight-lie": "range"}


class PoisoningSlave(Slave):
    """A slave whose n-th update is ``plan[n]`` (``"honest"`` once the plan runs out)."""

    def __init__(self, *args: Any, plan: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.sent: list[str] = []

    def _send_ahead(self, channel: Any, encoder: UpdateEncoder, task: Any, **_: Any) -> None:
        """Its chunks are made here, not from reserved encryptions of zero: they go whole."""
        self._ahead = None

    def _protect(self, encoder: UpdateEncoder, vector: np.ndarray, weight: int,
                 delivery: Any, *, distributed: bool = False, reservation: Any = None,
                 ) -> list[bytes]:
        attack = self.plan[len(self.sent)] if len(self.sent) < len(self.plan) else "honest"
        self.sent.append(attack)
        params, layout = encoder.params, encoder.layout
        count = encoder.chunk_count(vector.size)
        slots = params.slots
        rng = np.random.default_rng(len(self.sent))
        if attack == "random-coefficients":
            moduli = np.array(layout.moduli, dtype=np.uint64).reshape(1, -1, 1)
            return [pack_chunk(rng.integers(0, moduli, size=layout.shape, dtype=np.uint64),
                               layout, i) for i in range(count)]
        if attack == "another-key":
            other = load_public_context(generate_contexts(params)[1], params)
            forged = dataclasses.replace(ciphertext_layout(params, other, update=True),
                                         key_id=layout.key_id)
            plain = self._plaintext(vector, weight, 1, rng, delivery).astype(np.int64)
            return [encrypt_chunk(other, params, forged, i, plain[i * slots:(i + 1) * slots])
                    for i in range(count)]
        if attack == "weight-lie":  # encoded with weight LIE, declared with the true weight
            return encoder.encrypt_ring(self._plaintext(vector, 1, LIE, rng, delivery))
        return super()._protect(encoder, vector, weight, delivery, distributed=distributed)

    def _plaintext(self, vector: np.ndarray, weight: int, factor: int,
                   rng: np.random.Generator, delivery: Any) -> np.ndarray:
        """``factor``·(what an honest slave of weight ``weight`` encodes), in the ring Z_t,
        masked under ``he+mask`` as an honest slave masks it."""
        params = self.bundle.he_params
        t = int(params.plain_modulus or 0)
        ring = np.mod(encode_plain(vector, weight, params, rng) * factor, t).astype(np.uint64)
        if self.config.encryption.protection == "he+mask":
            assert self._secagg is not None and delivery is not None
            ring = masked_ring(self._secagg, delivery, ring)
        return ring


def poisoning_slave(fed: Path, slave_id: str, partition: str, url: str, state: Path,
                    plan: list[str]) -> PoisoningSlave:
    bundle = SlaveBundle.load(fed / "slaves" / slave_id).with_master_url(url)
    return PoisoningSlave(bundle, bundled_part("digits", partition), state_dir=state, workers=1,
                          reconnect_give_up_s=20, source_id=slave_id,
                          budget_epsilon=bundle.config.federation_epsilon, plan=plan)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("protection", "slaves"), [("he", ["a", "b"]),
                                                  ("he+mask", ["a", "b", "c"])])
def test_poisoned_aggregates_are_refused_named_and_retried(
        tmp_path: Path, protection: str, slaves: list[str]) -> None:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        # Seven releases of DP-SGD (a refused attempt is paid for) on a third of digits each.
        # A retry is a release the slaves' plan did not count on: each recalibrates σ for the
        # rounds left, so a retry of the last round would fit only in whatever the rounding
        # of σ left of ε (and the released record count sets the sample rate at random). The
        # attacks stop a round before the end, where a retry still has a round's budget.
        slaves, rounds=4,
        training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=10.0),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection=protection),  # type: ignore[arg-type]
        limits=LimitSettings(join_timeout_s=60, upload_deadline_s=120, open_timeout_s=10,
                             max_round_attempts=2, secagg_phase_timeout_s=30)))
    out = tmp_path / "run"
    # one poisoned update in the first attempt of each round, an honest one in the second
    plan = [step for attack in ATTACKS for step in (attack, "honest")]

    async def scenario() -> tuple[Master, PoisoningSlave]:
        master = Master(MasterBundle.load(fed / "master"), out, port=0)
        task, port = await asyncio.wait_for(started(master), 30)
        url = f"wss://127.0.0.1:{port}"
        parts = len(slaves)
        mallory = poisoning_slave(fed, "b", f"1/{parts}", url, tmp_path / "state-b", plan)
        honest = [trial_slave(fed, s, f"{i}/{parts}", url, tmp_path / f"state-{s}")
                  for i, s in enumerate(slaves) if s != "b"]
        await asyncio.wait_for(asyncio.gather(mallory.run(), *(h.run() for h in honest)), 300)
        await asyncio.wait_for(task, 60)
        return master, mallory

    master, mallory = asyncio.run(scenario())
    records = _records(out)
    refused = [r["data"] for r in records if r["event"] == "aggregate_refused"]
    assert [(d["round"], d["attempt"]) for d in refused] == [(1, 1), (2, 1), (3, 1)]
    assert mallory.sent == [*plan, "honest"]  # and round 4
    assert master.coordinator.committed == 4
    weights = {(d["round"], d["attempt"], d["slave"]): d["weight"]
               for r in records if r["event"] == "update_received" for d in [r["data"]]}
    for data, attack in zip(refused, ATTACKS, strict=True):
        assert data["check"] == EXPECTED_CHECK[attack], (attack, data["reason"])
        assert data["contributors"] == slaves
        assert data["total_weight"] == sum(weights[(data["round"], 1, s)] for s in slaves)
        assert data["protection"] == protection
    # each refused attempt is aborted and retried; only the second attempt is decrypted and
    # committed
    for round_ in (1, 2, 3):
        events = [(r["event"], r["data"].get("attempt")) for r in records
                  if r["data"].get("round") == round_ and r["event"] in (
                      "aggregate_refused", "round_aborted", "aggregate_decrypted",
                      "model_committed")]
        assert events == [("aggregate_refused", 1), ("round_aborted", 1),
                          ("aggregate_decrypted", 2), ("model_committed", None)], events
    aborts = [r["data"] for r in records if r["event"] == "round_aborted"]
    named = "contributors: " + ", ".join(slaves)
    assert len(aborts) == 3 and all(a["will_retry"] and named in a["reason"] for a in aborts)
    store = ModelStore(out / "checkpoints")
    params = master.bundle.he_params
    for round_ in (1, 2, 3):
        checkpoint = store.load(round_)
        assert checkpoint.record["attempt"] == 2
        before = parameters_vector(store.load(round_ - 1).package.build())
        after = parameters_vector(checkpoint.package.build())
        # FedAvg moves the model by the average, which an honest round keeps within the clip
        assert np.max(np.abs(after - before)) <= params.clip + params.quant_step
    verdict = check_log(out)
    assert verdict.ok, verdict
    report = build_report(verdict)
    assert [[x["check"] for x in r["aggregates_refused"]] for r in report["rounds"]] == [
        ["noise_budget"], ["noise_budget"], ["range"], []]
    incidents = [row[1] for section in report_sections(report) for block in section.blocks
                 if isinstance(block, Table) and block.headers == ("round", "what", "detail")
                 for row in block.rows]
    assert (f"aggregate of attempt 1 refused (range check; contributors {', '.join(slaves)})"
            in incidents)
