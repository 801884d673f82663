"""pytest-benchmark suite of the encryption codec: encrypt, aggregate, decrypt per preset.

Run with ``.venv/bin/python -m pytest benchmarks/bench_codec.py --benchmark-enable``
(the project's pytest options disable benchmarking by default, which runs each body once).
For the 1M-value comparison table use ``secure-fed bench codec --size 1000000 --compare``;
``-k aggregate`` compares aggregation with the chunks of the pending update held in memory (what
the table measures: the slaves send one after the other) and with every chunk spooled to disk,
and, for simultaneous uploads of freshly allocated chunks, the default (one update's worth
held, the rest spooled) with every chunk held.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from secure_fed.he.aggregator import Aggregator
from secure_fed.he.codec import UpdateEncoder
from secure_fed.he.keyholder import KeyHolder
from secure_fed.he.keys import generate_contexts
from secure_fed.he.presets import PRESETS, HEParams, resolve_params

SIZE = 50_000
SLAVES = 3


@dataclass
class Setup:
    params: HEParams
    secret: bytes
    public: bytes
    encoder: UpdateEncoder
    updates: list[np.ndarray]
    chunks: list[list[bytes]]


@pytest.fixture(scope="module", params=sorted(PRESETS))
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    params = resolve_params(request.param, clip=1.0, max_total_weight=SLAVES,
                            max_contributions=SLAVES)
    secret, public = generate_contexts(params)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0.0, 0.3, SIZE).astype(np.float32) for _ in range(SLAVES)]
    with UpdateEncoder(params, public, workers=1) as encoder:
        chunks = [encoder.encrypt(u, weight=1) for u in updates]
        yield Setup(params, secret, public, encoder, updates, chunks)


def _aggregate(s: Setup, spool: Path, pending_in_memory: int = 1) -> list[bytes]:
    with Aggregator(s.params, s.public, SIZE, spool_dir=spool,
                    pending_in_memory=pending_in_memory) as aggregator:
        for k, chunks in enumerate(s.chunks):
            for index, chunk in enumerate(chunks):
                aggregator.add_chunk(f"slave-{k}", index, chunk)
            aggregator.finish(f"slave-{k}", 1)
        return aggregator.sum_chunks()


def test_encrypt(benchmark: BenchmarkFixture, setup: Setup) -> None:
    chunks = benchmark(setup.encoder.encrypt, setup.updates[0], weight=1)
    assert len(chunks) == setup.encoder.chunk_count(SIZE)


def test_aggregate(benchmark: BenchmarkFixture, setup: Setup, tmp_path: Path) -> None:
    sums = benchmark(_aggregate, setup, tmp_path)
    assert len(sums) == setup.encoder.chunk_count(SIZE)


def test_aggregate_spooled(benchmark: BenchmarkFixture, setup: Setup, tmp_path: Path) -> None:
    """Every chunk through the spool file, as when more updates arrive at once than the
    aggregator keeps in memory."""
    sums = benchmark(_aggregate, setup, tmp_path, 0)
    assert sums == _aggregate(setup, tmp_path)


def _aggregate_arriving(s: Setup, spool: Path, pending_in_memory: int) -> list[bytes]:
    """The updates interleaved chunk index by chunk index, as simultaneous uploads arrive,
    each chunk a fresh copy of its bytes, as a websocket delivers it."""
    with Aggregator(s.params, s.public, SIZE, spool_dir=spool,
                    pending_in_memory=pending_in_memory) as aggregator:
        for index in range(len(s.chunks[0])):
            for k, chunks in enumerate(s.chunks):
                aggregator.add_chunk(f"slave-{k}", index, bytes(bytearray(chunks[index])))
        for k in range(len(s.chunks)):
            aggregator.finish(f"slave-{k}", 1)
        return aggregator.sum_chunks()


@pytest.mark.parametrize("pending_in_memory", [1, SLAVES], ids=["spooled", "held"])
def test_aggregate_arriving(benchmark: BenchmarkFixture, setup: Setup, tmp_path: Path,
                            pending_in_memory: int) -> None:
    """Simultaneous uploads of fresh chunks: one update's worth held and the rest spooled (the
    default), or every chunk held."""
    sums = benchmark(_aggregate_arriving, setup, tmp_path, pending_in_memory)
    assert sums == _aggregate(setup, tmp_path)


def test_decrypt(benchmark: BenchmarkFixture, setup: Setup, tmp_path: Path) -> None:
    sums = _aggregate(setup, tmp_path)
    with KeyHolder(setup.params, setup.secret, min_contributions=SLAVES) as keyholder:
        average = benchmark(
            keyholder.decrypt_average, sums, contributors=SLAVES, total_weight=SLAVES,
            vector_size=SIZE,
        )
    expected = np.mean([np.clip(u, -1.0, 1.0) for u in setup.updates], axis=0)
    bound = setup.params.quant_step if setup.params.scheme == "bfv" else 1e-6
    assert float(np.max(np.abs(average - expected))) < bound + 1e-6
