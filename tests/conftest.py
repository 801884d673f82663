"""Shared fixtures: small real federations (real TLS, real TenSEAL, real Opacus)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.data.scaling import bundled_schema
from secure_fed.master.bundle import MasterBundle, SlaveBundle
from secure_fed.master.provision import FederationPlan, init_federation
from secure_fed.master.server import Master
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part


def pytest_configure(config: pytest.Config) -> None:
    """Keep every data source's default ledger folder (and the list of them) out of the
    user's own $XDG_DATA_HOME: one folder for the session, inherited by subprocesses."""
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="secure-fed-data-home-")


TINY_MODEL = ModelSpec(architecture="mlp",
                       kwargs={"in_features": 64, "num_classes": 10, "hidden": [16]})


def small_plan(slaves: list[str], **overrides: object) -> FederationPlan:
    settings: dict[str, object] = dict(
        federation_id="test-fed", slaves=slaves, host="127.0.0.1", port=0, rounds=2,
        min_slaves=len(slaves), model=TINY_MODEL,
        training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=3.0),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1),
        limits=LimitSettings(join_timeout_s=60, upload_deadline_s=120, open_timeout_s=10),
        evaluation=EvaluationSettings(dataset="digits"),
        data_schema=bundled_schema("digits"),
    )
    settings.update(overrides)
    return FederationPlan(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def federation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-slave federation's bundles, made once per test session."""
    fed_dir = tmp_path_factory.mktemp("fed")
    init_federation(fed_dir, small_plan(["a", "b"]))
    return fed_dir


def trial_slave(fed: Path, slave_id: str, partition: str, url: str, state: Path,
                **options: Any) -> Slave:
    """Slave ``slave_id`` of the bundles in ``fed``, dialing ``url``, on a part of digits (its
    data source named ``slave_id``, its owner's lifetime budget the ε the bundle grants the
    federation, unless given)."""
    bundle = SlaveBundle.load(fed / "slaves" / slave_id).with_master_url(url)
    settings: dict[str, Any] = {"state_dir": state, "workers": 1, "reconnect_give_up_s": 20,
                                "budget_epsilon": bundle.config.federation_epsilon,
                                "source_id": slave_id}
    settings.update(options)
    return Slave(bundle, bundled_part("digits", partition), **settings)


async def started(master: Master) -> tuple[asyncio.Task[Any], int]:
    """Run ``master`` in a task; return the task and the port the OS chose."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(master.run(ready=ready))
    return task, await ready


async def run_federation(fed: Path, out: Path, states: dict[str, Path], *,
                         timeout_s: float = 300, **slave_options: Any) -> tuple[Master, list[Any]]:
    """Run the master of ``fed`` and one trial slave per entry of ``states`` (slave id → state
    folder, each on its part of digits; ``slave_options`` as for :func:`trial_slave`) until the
    federation ends; the master and the slaves' reports."""
    master = Master(MasterBundle.load(fed / "master"), out, port=0)
    task, port = await asyncio.wait_for(started(master), 30)
    runners = [trial_slave(fed, slave_id, f"{i}/{len(states)}", f"wss://127.0.0.1:{port}",
                           state, **slave_options).run()
               for i, (slave_id, state) in enumerate(states.items())]
    reports = await asyncio.wait_for(asyncio.gather(*runners), timeout_s)
    await asyncio.wait_for(task, 60)
    return master, list(reports)
