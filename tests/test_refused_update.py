"""A refused update never counts: a black-box client that speaks docs/protocol.md sends a last
chunk that its header announces correctly but that is not a ciphertext, as the last slave of
a round. It is rejected, never accepted, and neither its weight nor its values enter the
committed model.

Real TLS 1.3 websockets on 127.0.0.1, real HE, real DP training for the honest slaves.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_plan, started, trial_slave
from test_abuse import client_context, hello, open_raw

from secure_fed.crypto.certificates import sign
from secure_fed.crypto.codec import UpdateEncoder
from secure_fed.master.bundle import MasterBundle
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.protocol.messages import update_signing_bytes
from secure_fed.slave import updates as slave_updates

LIE = 4000  # the attacker's declared weight: near max_weight_per_slave (4096)


def _audit(out: Path) -> list[dict[str, Any]]:
    path = out / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _attacker(url: str, bundle: Path, out: Path, encoder: UpdateEncoder) -> dict[str, Any]:
    """Slave 'a': waits until both honest updates are in, then sends an update whose last
    chunk is one byte short (its size and hash announced accordingly)."""
    ws = await open_raw(url, client_context(bundle))
    await ws.send(hello(bundle))
    task: dict[str, Any] | None = None
    async with asyncio.timeout(120):
        while task is None:
            message = await ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] == "task":
                task = json.loads(message)
        await ws.recv()  # the model's parameters
        deadline = time.monotonic() + 120
        while sum(r["event"] == "update_received" for r in _audit(out)) < 2:
            assert time.monotonic() < deadline, "the honest updates did not arrive"
            await asyncio.sleep(0.2)
    vector = np.full(task["vector_size"], 0.5, dtype=np.float32)
    chunks = await asyncio.get_running_loop().run_in_executor(
        None, lambda: encoder.encrypt(vector, weight=LIE))
    chunks[-1] = chunks[-1][:-1]
    hashes = [hashlib.sha256(c).hexdigest() for c in chunks]
    signed = update_signing_bytes("test-fed", task["round"], task["nonce"], LIE, hashes)
    await ws.send(json.dumps({
        "type": "update", "round": task["round"], "nonce": task["nonce"], "weight": LIE,
        "weight_source": "dp-count", "chunk_sha256": hashes,
        "chunk_bytes": [len(c) for c in chunks],
        "mechanisms": [{"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1}],
        "epsilon_spent": 1.0, "delta": 1e-5, "accountant": "prv",
        "signature": base64.b64encode(sign((bundle / "slave.key").read_bytes(), signed))
        .decode("ascii")}))
    for chunk in chunks:
        await ws.send(chunk)
    answers = []
    async with asyncio.timeout(60):
        while not answers or answers[-1]["type"] == "accepted":
            message = await ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] in (
                    "accepted", "rejected"):
                answers.append(json.loads(message))
    await ws.close()
    return {"answers": answers, "task": task}


@pytest.mark.slow
def test_a_refused_last_update_never_counts(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    trained: dict[str, list[tuple[int, np.ndarray]]] = {}
    real = slave_updates.train_delta

    def observed(model: Any, data: Any, settings: Any, **kwargs: Any) -> Any:
        result = real(model, data, settings, **kwargs)
        trained.setdefault("honest", []).append((result.samples, result.delta_vector.copy()))
        return result

    monkeypatch.setattr(slave_updates, "train_delta", observed)
    fed, out = tmp_path / "fed", tmp_path / "run"
    init_federation(fed, small_plan(["a", "b", "c"], min_slaves=2, rounds=1))
    bundle = MasterBundle.load(fed / "master")
    encoder = UpdateEncoder(bundle.he_params, bundle.public_context.read_bytes(), workers=1)

    async def scenario() -> dict[str, Any]:
        master = Master(bundle, out, port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        attacker = asyncio.create_task(_attacker(url, fed / "slaves" / "a", out, encoder))
        honest = [trial_slave(fed, slave_id, f"{i}/2", url, tmp_path / f"s{slave_id}").run()
                  for i, slave_id in enumerate(("b", "c"))]
        result, *_ = await asyncio.wait_for(asyncio.gather(attacker, *honest), 240)
        await asyncio.wait_for(task, 60)
        return result  # type: ignore[no-any-return]

    with encoder:
        seen = asyncio.run(scenario())
    assert [a["type"] for a in seen["answers"]] == ["rejected"]  # never accepted
    records = _audit(out)
    received = [r["data"] for r in records if r["event"] == "update_received"]
    assert sorted(r["slave"] for r in received) == ["b", "c"]
    (aggregate,) = [r["data"] for r in records if r["event"] == "aggregate_decrypted"]
    assert sorted(aggregate["contributors"]) == ["b", "c"]
    assert aggregate["total_weight"] == sum(r["weight"] for r in received) < LIE
    # The committed model moved by the honest slaves' weighted average, nothing else.
    store = ModelStore(out / "checkpoints")
    change = (parameters_vector(store.load(1).package.build())
              - parameters_vector(store.load(0).package.build()))
    clip = bundle.he_params.clip
    honest = trained["honest"]
    expected = sum(w * np.clip(d, -clip, clip) for w, d in honest) / sum(w for w, _ in honest)
    step = clip / 2 ** (bundle.he_params.quant_bits - 1)
    assert np.max(np.abs(change - expected)) <= step + 1e-6
    assert np.max(np.abs(expected)) > 10 * step
