"""Aggregation that shards: a tree of shards and a root gives the single aggregator's sum.

Under ``he``, ``he+mask`` and ``mask`` the total is the same bytes; under ``plain`` it is the
float64 sum in the tree's fixed order, which is the single sum's bits whenever the sums are
exact. A slave dropping mid-upload, or sending a malformed chunk, leaves its shard's sum as if
it had never sent anything; shard processes end with the master.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secure_fed.config.settings import AggregationSettings, MasterConfig
from secure_fed.errors import MalformedUpdate
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.codec import UpdateEncoder
from secure_fed.he.keyholder import KeyHolder
from secure_fed.he.keys import generate_contexts
from secure_fed.he.presets import HEParams, resolve_params
from secure_fed.master.aggregation import AggregationPipeline
from secure_fed.master.connections import Connections
from secure_fed.master.shards import (
    ProcessShards,
    RayShards,
    ShardBackend,
    ShardedSum,
    shard_index,
)
from secure_fed.protocol import coordinator as co
from secure_fed.secagg import ring as pc
from secure_fed.secagg.vector_sum import VectorSum

SLAVES = ["a", "b", "c", "d", "e"]
HE_SIZE = 10_000  # two BFV chunks
RING_SIZE = pc.VALUES_PER_CHUNK + 10  # two plain/mask chunks, the last one short
SHARDS = 3


@pytest.fixture(scope="module")
def params() -> HEParams:
    return resolve_params("bfv-fast", clip=1.0, max_total_weight=40, max_contributions=25)


@pytest.fixture(scope="module")
def keys(params: HEParams) -> tuple[bytes, bytes]:
    return generate_contexts(params)


@pytest.fixture(scope="module")
def shards(params: HEParams, keys: tuple[bytes, bytes]) -> Iterator[ProcessShards]:
    backend = ProcessShards(SHARDS, params, keys[1])
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def encrypted(params: HEParams, keys: tuple[bytes, bytes]
              ) -> dict[str, tuple[np.ndarray, list[bytes]]]:
    rng = np.random.default_rng(5)
    with UpdateEncoder(params, keys[1], workers=1) as encoder:
        return {s: (x := rng.uniform(-0.9, 0.9, HE_SIZE), encoder.encrypt(x, weight=2, seed=k))
                for k, s in enumerate(SLAVES)}


def ring_updates(protection: str, params: HEParams, *, exact: bool) -> dict[str, list[bytes]]:
    """Chunks of every slave: random ring values (``mask``), or float32 values (``plain``;
    multiples of 2^-8 when ``exact``, so that every partial sum is exact)."""
    rng = np.random.default_rng(7)
    out = {}
    for s in SLAVES:
        if protection == "mask":
            m = pc.ring_modulus(params)
            values = rng.integers(0, m, RING_SIZE, dtype=np.uint64)
            out[s] = [pc.pack_ring(values[i:i + pc.VALUES_PER_CHUNK], m)
                      for i in range(0, RING_SIZE, pc.VALUES_PER_CHUNK)]
        else:
            x = rng.uniform(-1, 1, RING_SIZE)
            out[s] = pc.float_chunks(np.round(x * 256) / 256 if exact else x, clip=1.0)
    return out


def sharded(backend: ShardBackend, protection: str, params: HEParams, size: int,
            tmp_path: Path) -> ShardedSum:
    return ShardedSum(backend, f"test-{protection}-{time.monotonic_ns()}", protection, params,
                      size, spool_dir=str(tmp_path / "spool"),
                      shard_of=lambda s: shard_index(s, SLAVES, backend.count))


async def stream(single: Aggregator | VectorSum, tree: ShardedSum,
                 updates: dict[str, list[bytes]], *, weights: dict[str, int],
                 dropped: str | None = None, malformed: str | None = None) -> None:
    """Feed both sums the same chunks, interleaved as they would stream in; ``dropped`` leaves
    after its first chunk, ``malformed`` sends a truncated last chunk; both are discarded."""
    chunks = len(next(iter(updates.values())))
    for index in range(chunks):
        for slave, sent in updates.items():
            if slave == dropped and index > 0:
                continue
            data = sent[index][:-1] if slave == malformed and index == chunks - 1 else sent[index]
            refused = []
            for target in (single, tree):
                try:
                    if isinstance(target, ShardedSum):
                        await target.add_chunk(slave, index, data)
                    else:
                        target.add_chunk(slave, index, data)
                except MalformedUpdate as exc:
                    refused.append(exc)
            assert (slave == malformed and index == chunks - 1) or not refused
    for slave in updates:
        if slave == dropped:
            single.discard(slave)
            await tree.discard(slave)
            continue
        if slave == malformed:
            with pytest.raises(MalformedUpdate, match=f"slave '{slave}'.*chunk {chunks - 1}"):
                await tree.finish(slave, weights[slave])
            single.discard(slave)
            await tree.discard(slave)
            continue
        single.finish(slave, weights[slave])
        await tree.finish(slave, weights[slave])
    assert tree.contributors == single.contributors
    assert tree.total_weight == single.total_weight


@pytest.mark.parametrize("protection", ["he", "he+mask"])
def test_the_tree_sums_ciphertexts_to_the_same_bytes_and_drops_partial_updates(
        protection: str, params: HEParams, keys: tuple[bytes, bytes], shards: ProcessShards,
        encrypted: dict[str, tuple[np.ndarray, list[bytes]]], tmp_path: Path) -> None:
    updates = {s: chunks for s, (_, chunks) in encrypted.items()}

    async def run(dropped: str | None, malformed: str | None) -> tuple[list[bytes], list[bytes]]:
        tree = sharded(shards, protection, params, HE_SIZE, tmp_path)
        with Aggregator(params, keys[1], HE_SIZE, spool_dir=tmp_path / "single") as single:
            try:
                await stream(single, tree, updates, weights=dict.fromkeys(SLAVES, 2),
                             dropped=dropped, malformed=malformed)
                return single.sum_chunks(), await tree.sum_chunks()
            finally:
                tree.close()

    single, tree = asyncio.run(run(None, None))
    assert tree == single
    single, tree = asyncio.run(run("b", "d"))  # b on shard 1, d on shard 0
    assert tree == single
    with KeyHolder(params, keys[0], min_contributions=1) as holder:
        average = holder.decrypt_average(tree, contributors=3, total_weight=6,
                                         vector_size=HE_SIZE)
    expected = np.mean([encrypted[s][0] for s in ("a", "c", "e")], axis=0)
    assert np.max(np.abs(average - expected)) <= params.clip / 2 ** (params.quant_bits - 1)


def test_ahead_parts_go_to_their_shard_and_sum_as_the_whole_chunks(
        params: HEParams, keys: tuple[bytes, bytes], shards: ProcessShards,
        encrypted: dict[str, tuple[np.ndarray, list[bytes]]], tmp_path: Path) -> None:
    """Ahead parts handed to the tree, then the rests, give the bytes whole chunks give; a
    slave that sent only ahead parts (or a malformed one) is discarded from its shard."""
    updates = {s: chunks for s, (_, chunks) in encrypted.items()}

    async def run() -> tuple[list[bytes], list[bytes]]:
        tree = sharded(shards, "he", params, HE_SIZE, tmp_path)
        with Aggregator(params, keys[1], HE_SIZE, spool_dir=tmp_path / "single") as single:
            cut = single.layout.ahead_size
            try:
                for slave, chunks in updates.items():
                    if slave in ("b", "d"):
                        for index, chunk in enumerate(chunks):
                            part = chunk[:cut - 1] if slave == "d" and index else chunk[:cut]
                            await tree.add_ahead(slave, index, part)
                        with pytest.raises(MalformedUpdate):
                            await tree.finish(slave, 2)
                        await tree.discard(slave)
                        continue
                    for index, chunk in enumerate(chunks):
                        await tree.add_ahead(slave, index, chunk[:cut])
                    for index, chunk in enumerate(chunks):
                        await tree.add_chunk(slave, index, chunk[cut:])
                        single.add_chunk(slave, index, chunk)
                    await tree.finish(slave, 2)
                    single.finish(slave, 2)
                return single.sum_chunks(), await tree.sum_chunks()
            finally:
                tree.close()

    single, tree = asyncio.run(run())
    assert tree == single


@pytest.mark.parametrize("protection", ["mask", "plain"])
def test_the_tree_sums_ring_and_exact_float_values_to_the_same_bits(
        protection: str, params: HEParams, shards: ProcessShards, tmp_path: Path) -> None:
    updates = ring_updates(protection, params, exact=True)
    weights = {s: k + 1 for k, s in enumerate(SLAVES)}

    async def run() -> tuple[np.ndarray, np.ndarray]:
        tree = sharded(shards, protection, params, RING_SIZE, tmp_path)
        single = VectorSum(protection, RING_SIZE, clip=1.0, modulus=(
            pc.ring_modulus(params) if protection == "mask" else None))
        try:
            await stream(single, tree, updates, weights=weights, dropped="c", malformed="a")
            return single.total(), await tree.total()
        finally:
            tree.close()

    single, tree = asyncio.run(run())
    assert tree.dtype == single.dtype and tree.tobytes() == single.tobytes()
    assert np.any(tree != 0)


def test_a_plain_tree_adds_in_its_stated_order(params: HEParams, shards: ProcessShards,
                                               tmp_path: Path) -> None:
    """Arbitrary float32 values: each shard in finish order, then the shards in order."""
    updates = ring_updates("plain", params, exact=False)

    async def run() -> np.ndarray:
        tree = sharded(shards, "plain", params, RING_SIZE, tmp_path)
        try:
            for slave in SLAVES:
                for index, chunk in enumerate(updates[slave]):
                    await tree.add_chunk(slave, index, chunk)
                await tree.finish(slave, 3)
            return await tree.total()
        finally:
            tree.close()

    vectors = {s: np.concatenate([np.frombuffer(c, "<f4") for c in updates[s]]).astype(
        np.float64) for s in SLAVES}
    expected = np.zeros(RING_SIZE)
    for shard in range(SHARDS):
        partial = np.zeros(RING_SIZE)
        for s in SLAVES:
            if shard_index(s, SLAVES, SHARDS) == shard:
                partial = partial + 3.0 * vectors[s]
        expected = expected + partial
    assert asyncio.run(run()).tobytes() == expected.tobytes()


def test_shard_processes_end_with_a_killed_master(tmp_path: Path, params: HEParams,
                                                 keys: tuple[bytes, bytes]) -> None:
    (tmp_path / "context").write_bytes(keys[1])
    script = (
        "import sys, time\n"
        "from secure_fed.he.presets import HEParams\n"
        "from secure_fed.master.shards import ProcessShards\n"
        "params = HEParams.model_validate_json(sys.argv[1])\n"
        "shards = ProcessShards(2, params, open(sys.argv[2], 'rb').read())\n"
        "print(*shards.pids(), flush=True)\n"
        "time.sleep(120)\n")
    master = subprocess.Popen([sys.executable, "-c", script, params.model_dump_json(),
                               str(tmp_path / "context")], stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout is not None
        pids = [int(p) for p in master.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        master.send_signal(signal.SIGKILL)
        master.wait(10)
    end = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ray_actors_sum_to_the_same_bytes(params: HEParams, keys: tuple[bytes, bytes],
                                          encrypted: dict[str, tuple[np.ndarray, list[bytes]]],
                                          tmp_path: Path) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed (pip install 'secure-fed[sim]'); `make test` "
                    "installs it")
    updates = {s: chunks for s, (_, chunks) in encrypted.items()}
    backend = RayShards(2, params, keys[1])
    try:
        async def run() -> tuple[list[bytes], list[bytes]]:
            tree = sharded(backend, "he", params, HE_SIZE, tmp_path)
            with Aggregator(params, keys[1], HE_SIZE, spool_dir=tmp_path / "single") as single:
                try:
                    await stream(single, tree, updates, weights=dict.fromkeys(SLAVES, 2),
                                 dropped="e")
                    return single.sum_chunks(), await tree.sum_chunks()
                finally:
                    tree.close()

        single, tree = asyncio.run(run())
        assert tree == single and len(single) == 2
    finally:
        backend.close()


def test_the_masters_pipeline_sums_in_the_shards_of_its_settings(
        params: HEParams, keys: tuple[bytes, bytes],
        encrypted: dict[str, tuple[np.ndarray, list[bytes]]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """``aggregation.shards = 2``: the master's pipeline starts two shard processes, sums a
    round in them (one slave dropped mid-upload) and opens the average; ``close`` ends them."""
    config = MasterConfig(federation_id="shards", slaves=SLAVES,
                          aggregation=AggregationSettings(shards=2))
    caplog.set_level(logging.INFO, logger="secure_fed.master.aggregation")

    async def run() -> tuple[np.ndarray, list[int]]:
        with KeyHolder(params, keys[0], min_contributions=1) as holder:
            pipeline = AggregationPipeline(config, params, keys[1], holder,
                                           vector_size=HE_SIZE, spool_dir=tmp_path / "spool",
                                           connections=Connections())
            try:
                start = co.StartRound(round=1, attempt=1, nonce="ab" * 16, deadline_s=60.0,
                                      recipients=tuple(SLAVES))
                state, task = pipeline.open(start)
                assert task is None and isinstance(state.aggregator, ShardedSum)
                assert pipeline._shards is not None
                pids = pipeline._shards.pids()
                for slave, (_, chunks) in encrypted.items():
                    for index, chunk in enumerate(chunks):
                        await state.add_chunk(slave, index, chunk)
                        if slave == "c":
                            break
                    if slave == "c":
                        await state.discard(slave)
                    else:
                        await state.finish(slave, 2)
                contributors = ("a", "b", "d", "e")
                average = await pipeline.average(state, co.Aggregate(
                    round=1, attempt=1, contributors=contributors, total_weight=8, headers={},
                    declines={}))
                # the shards' CPU seconds (they did all the adding) are the master's costs
                costs = pipeline.costs.take()
                # the bytes each slave's chunks brought, c's up to its drop (after chunk 0)
                assert state.bytes_by_slave == {
                    s: len(encrypted[s][1][0]) if s == "c" else sum(map(len, encrypted[s][1]))
                    for s in encrypted}
                state.close()
            finally:
                pipeline.close()
            return average, pids, costs

    average, pids, costs = asyncio.run(run())
    assert costs["aggregation_s"] > 0 and costs["decryption_s"] > 0
    assert costs["arrival_s"] == 0  # the shards' CPU is counted whole, none as on arrival
    assert "aggregation runs in 2 shards (processes)" in caplog.messages
    expected = np.mean([encrypted[s][0] for s in ("a", "b", "d", "e")], axis=0)
    assert np.max(np.abs(average - expected)) <= params.clip / 2 ** (params.quant_bits - 1)
    assert len(set(pids)) == 2 and not any(alive(p) for p in pids)
