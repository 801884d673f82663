"""Load: one master process and many slaves on 127.0.0.1, every update counted exactly once.

The slaves here are protocol-level clients: asyncio tasks in a few separate processes, each
with its own certificate, speaking the real protocol over mutual TLS, signing its update and
encrypting it with TenSEAL under the federation's preset, exactly as ``secure-fed slave`` does,
but encrypting a KNOWN vector instead of a DP-SGD update. So the test can check that every
committed model moved by exactly the weighted average of all the updates of its round:
an update lost or counted twice changes that average by more than the tolerance (checked).
The master's peak resident memory (``ru_maxrss`` of its process) must stay within 1.5× of a
run of the same federation with two slaves.

``make test`` runs a small version (8 slaves in 2 processes, a 9,610-parameter model, two
rounds). ``SECURE_FED_LOAD_FULL=1`` runs the full size (32 slaves in 4 processes, a
993,930-parameter model under the default preset) and prints the figures recorded in
docs/benchmarks.md (section "Load"):

    SECURE_FED_LOAD_FULL=1 .venv/bin/python -m pytest tests/test_load.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_plan

from secure_fed.config.settings import (
    EncryptionSettings,
    EvaluationSettings,
    LimitSettings,
    ModelSpec,
    TrainingPlanSettings,
)
from secure_fed.he.bundle import MasterBundle, SlaveBundle, context_digest
from secure_fed.master.provision import init_federation
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector

FULL = os.environ.get("SECURE_FED_LOAD_FULL") == "1"
SLAVES, PROCESSES, ROUNDS = (32, 4, 2) if FULL else (8, 2, 2)
HIDDEN = [1024, 896] if FULL else [128]


def known_units(index: int, round_: int, size: int) -> np.ndarray:
    """Slave ``index``'s update in round ``round_``, in units of the codec's quantization step
    (integers in [-500, 500], so that BFV encodes it exactly, far inside the clipping range)."""
    j = np.arange(size, dtype=np.int64)
    return (j * 7 + index * 13 + round_ * 5) % 1001 - 500


def weight_of(index: int) -> int:
    return 1 + index


# --- the protocol-level slaves (run in their own processes) -----------------------------------


async def _one_slave(bundle_dir: Path, index: int, url: str, encoder: Any) -> int:
    from secure_fed import __version__
    from secure_fed.identity.certificates import sign
    from secure_fed.privacy.accounting import Mechanism, epsilon
    from secure_fed.protocol.messages import (
        PROTOCOL_VERSION,
        Finished,
        Hello,
        MechanismRecord,
        Task,
        UpdateHeader,
        Welcome,
        parse_master_message,
        signing_bytes,
    )
    from secure_fed.transport.channel import WebSocketChannel, open_connection
    from secure_fed.transport.tls import client_ssl_context

    bundle = SlaveBundle.load(bundle_dir)
    public = bundle.public_context.read_bytes()
    params = bundle.he_params
    fed = bundle.config.federation_id
    ssl_context = client_ssl_context(bundle.certificate, bundle.key, bundle.ca_cert)
    for _ in range(200):  # the master may still be starting
        try:
            connection = await open_connection(url, ssl_context=ssl_context,
                                               limits=bundle.config.limits)
            break
        except Exception:  # noqa: BLE001 - retried, bounded
            await asyncio.sleep(0.25)
    else:
        raise RuntimeError(f"slave {index} could not connect to {url}")
    channel = WebSocketChannel(connection, "master")
    await channel.send(Hello(protocol=PROTOCOL_VERSION, software=f"secure-fed {__version__}",
                             public_context_sha256=context_digest(public)))
    welcome = parse_master_message(await channel.receive(30))
    assert isinstance(welcome, Welcome), welcome
    uploads = 0
    while True:
        message = parse_master_message(await channel.receive(600))
        if isinstance(message, Finished):
            await channel.close()
            return uploads
        if not isinstance(message, Task):
            continue
        await channel.receive(60)  # the model parameters (not needed: the update is known)
        if message.student is not None:
            await channel.receive(60)
        vector = known_units(index, message.round, message.vector_size) * params.quant_step
        weight = weight_of(index)
        chunks = await asyncio.get_running_loop().run_in_executor(
            None, lambda v=vector, w=weight: encoder.encrypt(v, weight=w))
        hashes = [hashlib.sha256(c).hexdigest() for c in chunks]
        mechanisms = [MechanismRecord(noise_multiplier=2.0, sample_rate=0.1, steps=10)
                      ] * message.round
        header = UpdateHeader(
            round=message.round, nonce=message.nonce, weight=weight, chunk_sha256=hashes,
            chunk_bytes=[len(c) for c in chunks], weight_source="dp-count", mechanisms=mechanisms,
            epsilon_spent=epsilon([Mechanism(2.0, 0.1, 10)] * message.round, 1e-5, "rdp"),
            delta=1e-5, accountant="rdp")
        signature = base64.b64encode(
            sign(bundle.key.read_bytes(), signing_bytes(fed, header))).decode()
        await channel.send(header.model_copy(update={"signature": signature}))
        for chunk in chunks:
            await channel.send_bytes(chunk)
        uploads += 1


def client_process_main(spec_json: str) -> None:
    """Entry of one client process: run its share of the protocol-level slaves."""
    from secure_fed.he.codec import UpdateEncoder

    spec = json.loads(spec_json)
    first = SlaveBundle.load(Path(spec["fed"]) / "slaves" / "s00")
    encoder = UpdateEncoder(first.he_params, first.public_context.read_bytes(), workers=1)

    async def all_of_them() -> list[int]:
        return await asyncio.gather(*(
            _one_slave(Path(spec["fed"]) / "slaves" / f"s{i:02d}", i, spec["url"], encoder)
            for i in spec["indices"]))

    try:
        uploads = asyncio.run(asyncio.wait_for(all_of_them(), spec["timeout"]))
    finally:
        encoder.close()
    print(json.dumps({"uploads": uploads}))


_CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from test_load import client_process_main
client_process_main(sys.argv[2])
"""


# --- the test -------------------------------------------------------------------------------


def _federation(fed: Path, slaves: int) -> None:
    init_federation(fed, small_plan(
        [f"s{i:02d}" for i in range(slaves)], rounds=ROUNDS, min_slaves=slaves,
        model=ModelSpec(architecture="mlp",
                        kwargs={"in_features": 64, "num_classes": 10, "hidden": HIDDEN}),
        training=TrainingPlanSettings(epochs=1, batch_size=64, epsilon=3.0),
        encryption=EncryptionSettings(preset="bfv-fast", max_weight_per_slave=4096, workers=1),
        limits=LimitSettings(join_timeout_s=300, upload_deadline_s=600, open_timeout_s=30,
                             keepalive_timeout_s=120),
        evaluation=EvaluationSettings(dataset=None)))


def _run(tmp: Path, slaves: int, processes: int, timeout: float) -> dict[str, Any]:
    """Run a federation of ``slaves`` protocol-level slaves; return its figures."""
    fed, out = tmp / "fed", tmp / "run"
    _federation(fed, slaves)
    port_file = tmp / "master.port"
    log = (tmp / "master.log").open("wb")
    started = time.monotonic()
    master = subprocess.Popen(  # noqa: S603 - our own command line
        [sys.executable, "-m", "secure_fed.cli.main", "master", str(fed / "master"), "--out",
         str(out), "--port", "0", "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT)
    clients: list[subprocess.Popen[str]] = []
    try:
        end = time.monotonic() + 120
        while not port_file.exists():
            assert master.poll() is None, (tmp / "master.log").read_text()[-3000:]
            assert time.monotonic() < end, "the master did not listen within 120 s"
            time.sleep(0.1)
        url = f"wss://127.0.0.1:{int(port_file.read_text())}"
        for p in range(processes):
            spec = {"fed": str(fed), "url": url, "timeout": timeout,
                    "indices": list(range(p, slaves, processes))}
            clients.append(subprocess.Popen(  # noqa: S603 - our own helper
                [sys.executable, "-c", _CLIENT, str(Path(__file__).parent), json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        uploads: list[int] = []
        for client in clients:
            stdout, stderr = client.communicate(timeout=timeout + 60)
            assert client.returncode == 0, stderr[-3000:]
            uploads += json.loads(stdout.strip().splitlines()[-1])["uploads"]
        _, status, usage = os.wait4(master.pid, 0)
        master.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
    finally:
        for proc in [master, *clients]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        log.close()
    assert master.returncode == 0, (tmp / "master.log").read_text()[-3000:]
    assert uploads == [ROUNDS] * slaves
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "model_committed"]
    received = [r["data"] for r in records if r["event"] == "update_received"]
    return {"slaves": slaves, "out": out, "fed": fed, "seconds": seconds,
            "max_rss_mib": usage.ru_maxrss / 1024,
            "round_seconds": [r["data"]["seconds"] for r in rounds],
            "upload_bytes": sum(u["bytes"] for u in received)}


def _check_every_update_counted_once(result: dict[str, Any]) -> None:
    fed, out, slaves = result["fed"], result["out"], result["slaves"]
    params = MasterBundle.load(fed / "master").he_params
    store = ModelStore(out / "checkpoints")
    weights = np.array([weight_of(i) for i in range(slaves)], dtype=np.float64)
    for round_ in range(1, ROUNDS + 1):
        before = parameters_vector(store.load(round_ - 1).package.build()).astype(np.float64)
        after = parameters_vector(store.load(round_).package.build()).astype(np.float64)
        units = np.stack([known_units(i, round_, before.size) for i in range(slaves)])
        expected = (weights @ units) * params.quant_step / weights.sum()
        moved = after - before
        tolerance = 1e-6
        assert np.max(np.abs(moved - expected)) <= tolerance, round_
        # Non-vacuous: losing or doubling any single update would have been seen.
        for i in range(slaves):
            lost = (weights @ units - weights[i] * units[i]) * params.quant_step / (
                weights.sum() - weights[i])
            twice = (weights @ units + weights[i] * units[i]) * params.quant_step / (
                weights.sum() + weights[i])
            assert np.max(np.abs(moved - lost)) > 10 * tolerance
            assert np.max(np.abs(moved - twice)) > 10 * tolerance


@pytest.mark.skipif(not FULL and os.cpu_count() == 1, reason="needs two cores")
def test_many_slaves_every_update_counted_once_and_master_memory_flat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timeout = 3000.0 if FULL else 300.0
    baseline = _run(tmp_path / "two", 2, 1, timeout)
    loaded = _run(tmp_path / "many", SLAVES, PROCESSES, timeout)
    _check_every_update_counted_once(baseline)
    _check_every_update_counted_once(loaded)
    assert loaded["max_rss_mib"] <= 1.5 * baseline["max_rss_mib"], (baseline, loaded)
    figures = {
        name: {"slaves": r["slaves"], "master_max_rss_mib": round(r["max_rss_mib"], 1),
               "rounds_per_minute": round(60 * ROUNDS / sum(r["round_seconds"]), 2),
               "round_seconds": r["round_seconds"], "upload_bytes": r["upload_bytes"],
               "wall_seconds": round(r["seconds"], 1)}
        for name, r in (("two", baseline), ("many", loaded))}
    with capsys.disabled():
        print("\nload figures:", json.dumps(figures))
