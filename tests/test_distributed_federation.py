"""Distributed DP end to end: a ``gradient`` federation whose slaves add noise shares.

Three slaves in one event loop over the in-memory transport (as
``tests/test_federation_in_process.py``), under ``he+mask`` and ``mask``: every committed step
is exactly ``−lr·γ·Rᵀ(Σ contributions) / (q·Σ N)`` of what the slaves released, the ledgers
hold both views, the audit log verifies. Then the refusals: a round with fewer than
``min_survivors`` is never opened, a slave declines distributed DP under a protection that
opens single updates, in another mode or with a foreign ring, and ``init`` refuses the same.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_MODEL, small_plan
from test_federation_in_process import run_in_memory

from secure_fed.audit.recompute import check_log
from secure_fed.config.settings import (
    DistributedDPSettings,
    EncryptionSettings,
    LimitSettings,
    TrainingPlanSettings,
)
from secure_fed.errors import ConfigError, PrivacyError, SecureFedError
from secure_fed.he.bundle import MasterBundle
from secure_fed.master.aggregation import RoundAggregation
from secure_fed.master.distributed_plan import check_distributed_config, distributed_plan
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.privacy.distributed import DistributedMechanism, DistributedSettings
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.protocol import coordinator as co
from secure_fed.protocol.messages import SecAggTask
from secure_fed.secagg.vector_sum import VectorSum
from secure_fed.slave import updates as slave_updates
from secure_fed.slave.privacy_plan import distributed_mechanism

SLAVES = ["a", "b", "c"]


def training(**distributed: Any) -> TrainingPlanSettings:
    return TrainingPlanSettings(
        mode="gradient", batch_size=4096, lr=2.0, max_grad_norm=1.0, epsilon=3.0,
        dp_mechanism="distributed",
        distributed=DistributedDPSettings(**{"min_survivors": 3, "expected_records": 480,
                                             **distributed}))


def federation(tmp_path: Path, protection: str, **distributed: Any) -> Path:
    fed = tmp_path / "fed"
    init_federation(fed, small_plan(
        SLAVES, model=TINY_MODEL, training=training(**distributed),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1,
                                      protection=protection),  # type: ignore[arg-type]
        limits=LimitSettings(join_timeout_s=30, upload_deadline_s=60, open_timeout_s=10,
                             secagg_phase_timeout_s=30)))
    return fed


@pytest.mark.parametrize("protection", ["he+mask", "mask"])
def test_each_step_is_the_decoded_sum_of_the_shares_over_the_expected_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protection: str
) -> None:
    released: dict[str, list[tuple[int, np.ndarray]]] = {}  # nonce -> (N, contribution)
    lock = threading.Lock()
    real = slave_updates.train_distributed

    def observed(model: Any, data: Any, settings: Any, mechanism: Any, nonce: str,
                 **kwargs: Any) -> Any:
        result = real(model, data, settings, mechanism, nonce, **kwargs)
        with lock:
            released.setdefault(nonce, []).append((result.samples, result.contribution.copy()))
        return result

    monkeypatch.setattr(slave_updates, "train_distributed", observed)
    fed = federation(tmp_path, protection)
    out = tmp_path / "run"
    states = {s: tmp_path / f"state-{s}" for s in SLAVES}
    master, reports = asyncio.run(run_in_memory(fed, out, states))
    assert master.coordinator.committed == 2

    config = MasterBundle.load(fed / "master").config
    plan = distributed_plan(config.training, len(SLAVES))
    assert plan is not None and plan.ring_modulus == master.bundle.he_params.plain_modulus
    store = ModelStore(out / "checkpoints")
    d = int(parameters_vector(store.load(0).package.build()).size)
    mechanism = DistributedMechanism(DistributedSettings.from_fields(plan.model_dump()), 1.0, d)
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    nonces = [r["data"]["nonce"] for r in audit if r["event"] == "round_start"]
    assert len(nonces) == 2 and all(len(released[n]) == 3 for n in nonces)
    for round_, nonce in enumerate(nonces, start=1):
        before = parameters_vector(store.load(round_ - 1).package.build()).astype(np.float64)
        after = parameters_vector(store.load(round_).package.build()).astype(np.float64)
        total = sum(c for _, c in released[nonce])
        records = sum(n for n, _ in released[nonce])
        expected = -2.0 * mechanism.decode(total, nonce) / (plan.sample_rate * records)
        assert np.max(np.abs((after - before) - expected)) < 1e-5
        assert np.max(np.abs(expected)) > 1e-2  # the step is not vacuous

    share = plan.noise_multiplier / np.sqrt(plan.min_survivors - plan.tolerated_colluders)
    for slave_id, report in reports.items():
        ledger = PrivacyLedger.open(states[slave_id], budget_epsilon=None, delta=1e-5,
                                    source_id=slave_id)
        runs = [e for e in ledger.entries if e.mode == "gradient"]
        assert len(runs) == 2 and report.rounds_trained == [1, 2]
        assert all(e.noise_multiplier == pytest.approx(plan.noise_multiplier)
                   and e.share_noise_multiplier == pytest.approx(share)
                   and (e.min_survivors, e.tolerated_colluders) == (3, 0) for e in runs)
        assert ledger.spent_alone_in(ledger.entries[0].federation_id) > ledger.spent()
    full = check_log(out)
    assert full.ok, full


def test_slaves_check_the_task_themselves(tmp_path: Path) -> None:
    fed = federation(tmp_path, "he+mask")
    config = MasterBundle.load(fed / "master").config
    plan = distributed_plan(config.training, len(SLAVES))
    assert plan is not None
    ring = plan.ring_modulus
    from secure_fed.master.task import training_plan
    from secure_fed.protocol.messages import ModelHeader, Task

    task = Task(round=1, attempt=1, nonce="0" * 32, deadline_s=10.0,
                model=ModelHeader(architecture="mlp", kwargs={}, digest="0" * 64,
                                  params_bytes=1),
                plan=training_plan(config), vector_size=1, chunks=1,
                secagg=SecAggTask(parties=SLAVES, certificates={}))
    dimension = 1210
    assert distributed_mechanism(task, protection="he+mask", ring_modulus=ring,
                                 dimension=dimension) is not None
    for protection in ("he", "plain"):
        with pytest.raises(PrivacyError, match="open a single update"):
            distributed_mechanism(task, protection=protection, ring_modulus=ring,
                                  dimension=dimension)
    with pytest.raises(PrivacyError, match="ring"):
        distributed_mechanism(task, protection="mask", ring_modulus=ring + 2,
                              dimension=dimension)
    two = task.model_copy(update={"secagg": SecAggTask(parties=SLAVES[:2], certificates={})})
    with pytest.raises(PrivacyError, match="min_survivors=3"):
        distributed_mechanism(two, protection="mask", ring_modulus=ring, dimension=dimension)
    plus = task.model_copy(update={"secagg": SecAggTask(parties=SLAVES, certificates={},
                                                        neighbours=2)})
    with pytest.raises(PrivacyError, match="SecAgg\\+ neighbours"):
        distributed_mechanism(plus, protection="mask", ring_modulus=ring, dimension=dimension)
    delta = task.model_copy(update={"plan": task.plan.model_copy(update={"mode": "delta"})})
    with pytest.raises(PrivacyError, match="gradient mode"):
        distributed_mechanism(delta, protection="mask", ring_modulus=ring, dimension=dimension)


@pytest.mark.parametrize(("protection", "mode", "match"), [
    ("he", "gradient", "refused under 'he'"), ("plain", "gradient", "refused under 'plain'"),
    ("he+mask", "delta", "refused in 'delta' mode"),
    ("mask", "distill", "refused in 'distill' mode")])
def test_init_refuses_distributed_dp_where_it_does_not_hold(
        tmp_path: Path, protection: str, mode: str, match: str) -> None:
    plan = small_plan(SLAVES, training=training().model_copy(update={"mode": mode}),
                      encryption=EncryptionSettings(protection=protection))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        init_federation(tmp_path / "fed", plan)


def test_the_master_never_opens_a_sum_of_fewer_than_min_survivors(tmp_path: Path) -> None:
    fed = federation(tmp_path, "mask")
    master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
    pipeline = master.aggregation
    try:
        ring = master.bundle.he_params.plain_modulus
        opened: list[str] = []
        vector_sum = VectorSum("mask", pipeline.vector_size, clip=1.0, modulus=ring)
        vector_sum.total = lambda: opened.append("opened")  # type: ignore[method-assign]
        state = RoundAggregation(vector_sum, None, master.connections, 0.0,  # type: ignore[arg-type]
                                 unit_weights=True)
        action = co.Aggregate(round=1, attempt=1, contributors=("a", "b"), total_weight=900,
                              headers={}, declines={})
        with pytest.raises(SecureFedError, match="min_survivors=3"):
            asyncio.run(pipeline.average(state, action))
        assert opened == []
    finally:
        pipeline.close()


def test_init_refuses_secagg_plus_and_the_master_a_federation_grown_since(
        tmp_path: Path) -> None:
    plus = small_plan(SLAVES + ["d", "e"], training=training(),
                      encryption=EncryptionSettings(protection="mask", mask_neighbours=2))
    with pytest.raises(ConfigError, match="refused with SecAgg\\+"):
        init_federation(tmp_path / "plus", plus)
    fed = federation(tmp_path, "mask")
    bundle = MasterBundle.load(fed / "master")
    check_distributed_config(bundle.config, bundle.he_params)  # as init made it
    grown = bundle.config.model_copy(update={"slaves": [*SLAVES, *(f"x{i}" for i in range(40))]})
    with pytest.raises(ConfigError, match="Re-run `secure-fed init`"):
        check_distributed_config(grown, bundle.he_params)
    edited = bundle.config.model_copy(update={"encryption": bundle.config.encryption.model_copy(
        update={"protection": "he"})})
    with pytest.raises(ConfigError, match="refused under 'he'"):
        check_distributed_config(edited, bundle.he_params)
