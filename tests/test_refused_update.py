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
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_plan, started, trial_slave
from test_abuse import client_context, hello, next_json, open_raw

from secure_fed.he.bundle import MasterBundle
from secure_fed.he.codec import UpdateEncoder
from secure_fed.identity.certificates import sign
from secure_fed.master.provision import init_federation
from secure_fed.master.server import Master
from secure_fed.master.store import ModelStore
from secure_fed.models.package import parameters_vector
from secure_fed.privacy.accounting import Mechanism, epsilon
from secure_fed.protocol.messages import (
    Decline,
    MechanismRecord,
    UpdateHeader,
    encode,
    signing_bytes,
)
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
    header = UpdateHeader(
        round=task["round"], nonce=task["nonce"], weight=LIE, weight_source="dp-count",
        chunk_sha256=hashes, chunk_bytes=[len(c) for c in chunks],
        mechanisms=[MechanismRecord(noise_multiplier=5.0, sample_rate=1.0, steps=1)],
        epsilon_spent=epsilon([Mechanism(5.0, 1.0, 1)], 1e-5), delta=1e-5, accountant="prv")
    signature = sign((bundle / "slave.key").read_bytes(), signing_bytes("test-fed", header))
    await ws.send(encode(header.model_copy(
        update={"signature": base64.b64encode(signature).decode("ascii")})))
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


def _header(task: dict[str, Any], epsilon_spent: float) -> UpdateHeader:
    return UpdateHeader(
        round=task["round"], nonce=task["nonce"], weight=100, weight_source="dp-count",
        chunk_sha256=["ab" * 32] * task["chunks"], chunk_bytes=[1] * task["chunks"],
        mechanisms=[MechanismRecord(noise_multiplier=1.0, sample_rate=0.1, steps=10)],
        epsilon_spent=epsilon_spent, delta=1e-5, accountant="prv")


def test_an_understated_epsilon_and_an_unsigned_decline_are_refused_live(
    federation_dir: Path, tmp_path: Path
) -> None:
    """What `audit verify` would refuse later, the master refuses at once: an update whose ε
    is below what its mechanisms give (recomputed with dp-accounting's PLD), and a decline
    that its slave did not sign."""
    fed = tmp_path / "fed"
    shutil.copytree(federation_dir, fed)
    true = epsilon([Mechanism(1.0, 0.1, 10)], 1e-5)

    async def scenario() -> tuple[dict[str, Any], str]:
        master = Master(MasterBundle.load(fed / "master"), tmp_path / "run", port=0)
        task, port = await started(master)
        url = f"wss://127.0.0.1:{port}"
        a, b = fed / "slaves" / "a", fed / "slaves" / "b"
        ws_a, ws_b = await open_raw(url, client_context(a)), await open_raw(url, client_context(b))
        try:
            await ws_a.send(hello(a))
            await ws_b.send(hello(b))
            first = await next_json(ws_a, "task")
            header = _header(first, 0.8 * true)
            signature = sign((a / "slave.key").read_bytes(), signing_bytes("test-fed", header))
            await ws_a.send(encode(header.model_copy(
                update={"signature": base64.b64encode(signature).decode("ascii")})))
            rejected = await next_json(ws_a, "rejected")
            second = await next_json(ws_b, "task")
            await ws_b.send(encode(Decline(round=second["round"], nonce=second["nonce"],
                                           reason="no", epsilon_spent=0.0,
                                           epsilon_remaining=3.0)))
            error = await next_json(ws_b, "error")
            return rejected, error["message"]
        finally:
            await ws_a.close()
            await ws_b.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    rejected, error = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert "under-statement" in rejected["reason"] and f"ε={0.8 * true:.4f}" in rejected["reason"]
    assert "decline refused: the decline is not signed" in error
    refused = [r["data"] for r in _audit(tmp_path / "run") if r["event"] == "update_refused"]
    assert refused and refused[0]["slave"] == "a" and "under-statement" in refused[0]["reason"]
