"""Aggregator and key holder: malformed chunks, discards, refusals, and memory O(model)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secure_fed.errors import CryptoError, MalformedUpdate
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.chunk_format import HEADER_SIZE
from secure_fed.he.codec import UpdateEncoder
from secure_fed.he.keyholder import KeyHolder
from secure_fed.he.keys import generate_contexts
from secure_fed.he.params import data_moduli, update_drop_bits
from secure_fed.he.presets import HEParams, resolve_params

SIZE = 10_000  # two BFV chunks


@pytest.fixture(scope="module")
def params() -> HEParams:
    return resolve_params("bfv-fast", clip=1.0, max_total_weight=40, max_contributions=25)


@pytest.fixture(scope="module")
def keys(params: HEParams) -> tuple[bytes, bytes]:
    return generate_contexts(params)


@pytest.fixture(scope="module")
def encoder(params: HEParams, keys: tuple[bytes, bytes]) -> Iterator[UpdateEncoder]:
    with UpdateEncoder(params, keys[1], workers=1) as enc:
        yield enc


@pytest.fixture(scope="module")
def keyholder(params: HEParams, keys: tuple[bytes, bytes]) -> Iterator[KeyHolder]:
    with KeyHolder(params, keys[0], min_contributions=1) as holder:
        yield holder


@pytest.fixture(scope="module")
def updates(encoder: UpdateEncoder) -> dict[str, tuple[np.ndarray, list[bytes]]]:
    rng = np.random.default_rng(3)
    out = {}
    for k, name in enumerate(["a", "b", "c"]):
        x = rng.uniform(-0.9, 0.9, SIZE)
        out[name] = (x, encoder.encrypt(x, weight=2, seed=k))
    return out


@pytest.fixture
def aggregator(params: HEParams, keys: tuple[bytes, bytes], tmp_path: Path
               ) -> Iterator[Aggregator]:
    with Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "spool") as agg:
        yield agg


def _send(agg: Aggregator, slave: str, chunks: list[bytes], weight: int | None = 2) -> None:
    for index, chunk in enumerate(chunks):
        agg.add_chunk(slave, index, chunk)
    if weight is not None:
        agg.finish(slave, weight)


def _decrypt(holder: KeyHolder, agg: Aggregator) -> np.ndarray:
    return holder.decrypt_average(agg.sum_chunks(), contributors=len(agg.contributors),
                                  total_weight=agg.total_weight, vector_size=SIZE)


def _expect(updates: dict[str, tuple[np.ndarray, list[bytes]]], *names: str) -> np.ndarray:
    return np.mean([updates[n][0] for n in names], axis=0)


def _bad_chunks(params: HEParams, updates: dict[str, tuple[np.ndarray, list[bytes]]]
                ) -> dict[str, tuple[int, bytes, str]]:
    """Malformed chunk for index 0/1 and the reason the aggregator must give."""
    good = updates["b"][1]
    # an update leaves low-order bits out (update_drop_bits); a coefficient of all ones is
    # out of range where round(q / 2^d) < 2^(bits − d), else every value is one (rounded
    # chunks of these parameters have no value to refuse: tests/test_he_chunk_format.py)
    flipped, bad_range = bytearray(good[1]), {}
    q, drops = data_moduli(params)[0], update_drop_bits(params)
    at = HEADER_SIZE
    for poly, drop in enumerate(drops):
        if (q + (1 << drop >> 1)) >> drop < 2 ** (q.bit_length() - drop):
            flipped[at:at + 8] = b"\xff" * 8
            bad_range = {"out of range": (1, bytes(flipped), f"of polynomial {poly} is")}
            break
        at += params.poly_modulus_degree * (q.bit_length() - drop) // 8
    other_key = generate_contexts(params)[1]
    with UpdateEncoder(params, other_key, workers=1) as other:
        foreign = other.encrypt(np.zeros(SIZE), weight=1)[1]
    other_params = resolve_params("bfv-fast", clip=1.0, max_total_weight=4000)
    with UpdateEncoder(other_params, generate_contexts(other_params)[1], workers=1) as other:
        other_t = other.encrypt(np.zeros(SIZE), weight=1)[1]
    ckks = resolve_params("ckks", clip=1.0, max_total_weight=4)
    with UpdateEncoder(ckks, generate_contexts(ckks)[1], workers=1) as other:
        ckks_chunk = other.encrypt(np.zeros(10), weight=1)[0]
    return {
        "truncated": (1, good[1][:-100], "expected exactly"),
        "garbage": (1, bytes(np.random.default_rng(0).integers(0, 256, len(good[1]),
                                                              dtype=np.uint8)), "magic"),
        "another key": (1, foreign, "another public key"),
        # its chunks leave out other bits, so their size already differs
        "other parameters": (1, other_t, "or other parameters"),
        "other scheme": (1, ckks_chunk, "or other parameters"),  # whole: longer
        "index mismatch": (1, good[0], "carries index 0"),
        **bad_range,
    }


def test_malformed_chunks_are_refused_and_the_sum_is_untouched(
    params: HEParams, aggregator: Aggregator, keyholder: KeyHolder,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    _send(aggregator, "a", updates["a"][1])
    before = aggregator.sum_chunks()
    good = updates["b"][1]
    aggregator.add_chunk("b", 0, good[0])
    for label, (index, data, reason) in _bad_chunks(params, updates).items():
        with pytest.raises(MalformedUpdate) as info:
            aggregator.add_chunk("b", index, data)
        assert info.value.slave_id == "b" and info.value.chunk == index, label
        assert reason in str(info.value) and "slave 'b'" in str(info.value), label
    with pytest.raises(MalformedUpdate, match=r"chunk 2\).*out of range"):
        aggregator.add_chunk("b", 2, good[1])
    with pytest.raises(MalformedUpdate, match=r"chunk -1\).*out of range"):
        aggregator.add_chunk("b", -1, good[1])
    with pytest.raises(MalformedUpdate, match=r"slave 'b' refused \(chunk 0\).*repeated"):
        aggregator.add_chunk("b", 0, good[0])
    # b's partial update is still in the sum; removing it restores the aggregate of a, bit
    # for bit, and b may send its whole update again
    aggregator.discard("b")
    assert aggregator.sum_chunks() == before
    _send(aggregator, "b", good)
    average = _decrypt(keyholder, aggregator)
    assert np.abs(average - _expect(updates, "a", "b")).max() < params.quant_step + 1e-7


def test_discard_of_a_partial_update(
    params: HEParams, aggregator: Aggregator, keyholder: KeyHolder,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    _send(aggregator, "a", updates["a"][1])
    _send(aggregator, "c", updates["c"][1])
    aggregator.add_chunk("b", 1, updates["b"][1][1])  # b vanishes mid-stream
    assert aggregator.pending == ["b"]
    with pytest.raises(CryptoError, match="unfinished updates"):
        aggregator.sum_chunks()
    with pytest.raises(MalformedUpdate, match=r"1 of 2 chunks missing \(0\)"):
        aggregator.finish("b", 2)
    aggregator.discard("b")
    aggregator.discard("never-seen")  # no-op
    assert aggregator.pending == [] and aggregator.contributors == ["a", "c"]
    average = _decrypt(keyholder, aggregator)
    assert np.abs(average - _expect(updates, "a", "c")).max() < params.quant_step + 1e-7
    # b may start over after the discard
    _send(aggregator, "b", updates["b"][1])
    average = _decrypt(keyholder, aggregator)
    assert np.abs(average - _expect(updates, "a", "b", "c")).max() < params.quant_step + 1e-7


def test_a_finished_update_stays_in_the_sum(
    params: HEParams, aggregator: Aggregator, keyholder: KeyHolder,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    for name in "abc":
        _send(aggregator, name, updates[name][1])
    assert aggregator.total_weight == 6
    before = aggregator.sum_chunks()
    with pytest.raises(CryptoError, match="slave 'b' is finished"):
        aggregator.discard("b")
    assert aggregator.total_weight == 6 and aggregator.contributors == ["a", "b", "c"]
    assert aggregator.sum_chunks() == before
    average = _decrypt(keyholder, aggregator)
    assert np.abs(average - _expect(updates, "a", "b", "c")).max() < params.quant_step + 1e-7
    with pytest.raises(MalformedUpdate, match="already finished"):
        aggregator.add_chunk("a", 0, updates["a"][1][0])


@pytest.mark.parametrize("in_memory", [0, 1, 2])
def test_interleaved_uploads_beyond_the_memory_budget_are_spooled(
    params: HEParams, keys: tuple[bytes, bytes], keyholder: KeyHolder, tmp_path: Path,
    updates: dict[str, tuple[np.ndarray, list[bytes]]], in_memory: int,
) -> None:
    chunk_bytes = len(updates["a"][1][0])
    with Aggregator(params, keys[1], SIZE, spool_dir=tmp_path,
                    pending_in_memory=in_memory) as agg:
        for index in range(2):  # three slaves upload at once, chunk by chunk
            for name in "abc":
                data = updates[name][1][index]
                if name == "b":  # a mutable buffer, reused by its owner once added
                    buffer = bytearray(data)
                    agg.add_chunk(name, index, buffer)
                    buffer[:] = bytes(len(buffer))
                else:
                    agg.add_chunk(name, index, data)
        spool = next(tmp_path.rglob("*.spool"))
        # each update is two chunks; the budget holds `in_memory` updates, the rest is spooled
        assert spool.stat().st_size == max(0, 6 - 2 * in_memory) * chunk_bytes
        agg.discard("b")  # some of b's chunks are in memory, some in the spool
        agg.finish("a", 2)
        agg.finish("c", 2)
        average = _decrypt(keyholder, agg)
        assert np.abs(average - _expect(updates, "a", "c")).max() < params.quant_step + 1e-7
        # finish and discard released their chunks: b's new update fits the budget again
        size = spool.stat().st_size
        _send(agg, "b", updates["b"][1])
        assert spool.stat().st_size == size + max(0, 2 - 2 * in_memory) * chunk_bytes
        average = _decrypt(keyholder, agg)
    assert np.abs(average - _expect(updates, "a", "b", "c")).max() < params.quant_step + 1e-7


def test_pending_in_memory_must_not_be_negative(
    params: HEParams, keys: tuple[bytes, bytes], tmp_path: Path
) -> None:
    with pytest.raises(CryptoError, match="pending_in_memory must be at least 0, got -1"):
        Aggregator(params, keys[1], SIZE, spool_dir=tmp_path, pending_in_memory=-1)


def test_finish_refuses_weights_beyond_the_parameters(
    aggregator: Aggregator, updates: dict[str, tuple[np.ndarray, list[bytes]]]
) -> None:
    _send(aggregator, "a", updates["a"][1], weight=None)
    with pytest.raises(MalformedUpdate, match="above max_total_weight 40"):
        aggregator.finish("a", 41)
    with pytest.raises(MalformedUpdate, match="integer ≥ 1"):
        aggregator.finish("a", 0)
    with pytest.raises(MalformedUpdate, match="no chunks received"):
        aggregator.finish("z", 1)
    aggregator.finish("a", 40)
    with pytest.raises(MalformedUpdate, match="already finished"):
        aggregator.finish("a", 1)


def test_aggregator_refuses_a_secret_context(
    params: HEParams, keys: tuple[bytes, bytes], tmp_path: Path
) -> None:
    with pytest.raises(CryptoError, match="holds a secret key"):
        Aggregator(params, keys[0], SIZE, spool_dir=tmp_path)


def test_keyholder_refuses_too_few_contributions_and_too_much_weight(
    params: HEParams, keys: tuple[bytes, bytes], aggregator: Aggregator,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    _send(aggregator, "a", updates["a"][1])
    _send(aggregator, "b", updates["b"][1])
    sums = aggregator.sum_chunks()
    with (
        KeyHolder(params, keys[0], min_contributions=3) as strict,
        pytest.raises(CryptoError, match=r"2 contribution\(s\): at least 3"),
    ):
        strict.decrypt_average(sums, contributors=2, total_weight=4, vector_size=SIZE)
    with KeyHolder(params, keys[0], min_contributions=2) as holder:
        with pytest.raises(CryptoError, match="total weight 41"):
            holder.decrypt_average(sums, contributors=2, total_weight=41, vector_size=SIZE)
        with pytest.raises(CryptoError, match="needs 1"):
            holder.decrypt_average(sums, contributors=2, total_weight=4, vector_size=100)
        with pytest.raises(CryptoError, match="aggregate chunk 1 refused"):
            holder.decrypt_average([sums[0], sums[1][:-1]], contributors=2, total_weight=4,
                                   vector_size=SIZE)
        average = holder.decrypt_average(sums, contributors=2, total_weight=4,
                                         vector_size=SIZE)
    assert np.abs(average - _expect(updates, "a", "b")).max() < params.quant_step + 1e-7
    with pytest.raises(CryptoError, match="holds no secret key"):
        KeyHolder(params, keys[1], min_contributions=1)


def test_keyholder_with_worker_processes_decrypts_the_same(
    params: HEParams, keys: tuple[bytes, bytes], keyholder: KeyHolder, aggregator: Aggregator,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    _send(aggregator, "c", updates["c"][1])
    sums = aggregator.sum_chunks()
    with KeyHolder(params, keys[0], min_contributions=1, workers=2) as parallel:
        got = parallel.decrypt_average(sums, contributors=1, total_weight=2, vector_size=SIZE)
    np.testing.assert_array_equal(
        got, keyholder.decrypt_average(sums, contributors=1, total_weight=2, vector_size=SIZE))


def _peak_bytes(params: HEParams, public: bytes, chunks: list[bytes], slaves: int,
                spool: Path) -> int:
    tracemalloc.start()
    try:
        with Aggregator(params, public, SIZE, spool_dir=spool) as agg:
            tracemalloc.reset_peak()  # the running sum stays traced; key loading does not count
            for k in range(slaves):
                _send(agg, f"slave-{k}", chunks, weight=1)
            assert len(agg.contributors) == slaves
            agg.add_chunk("late", 0, chunks[0])
            agg.discard("late")
            return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_o_model_not_o_slaves(
    params: HEParams, keys: tuple[bytes, bytes], tmp_path: Path,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    chunks = updates["a"][1]
    two = _peak_bytes(params, keys[1], chunks, 2, tmp_path / "two")
    twenty = _peak_bytes(params, keys[1], chunks, 20, tmp_path / "twenty")
    model_bytes = sum(len(c) for c in chunks)
    assert twenty <= 1.5 * two, (two, twenty)
    assert twenty < 10 * model_bytes  # far below 20 slaves' updates (20 × model_bytes)


def test_close_deletes_the_spool(
    params: HEParams, keys: tuple[bytes, bytes], tmp_path: Path,
    updates: dict[str, tuple[np.ndarray, list[bytes]]],
) -> None:
    agg = Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "spool", pending_in_memory=0)
    agg.add_chunk("a", 0, updates["a"][1][0])
    spooled = list((tmp_path / "spool").rglob("*.spool"))
    assert len(spooled) == 1 and spooled[0].stat().st_size == len(updates["a"][1][0])
    assert spooled[0].stat().st_mode & 0o077 == 0  # private to the master's user
    agg.close()
    agg.close()
    assert list((tmp_path / "spool").iterdir()) == []
    with pytest.raises(CryptoError, match="aggregator is closed"):
        agg.add_chunk("a", 1, updates["a"][1][1])


def test_twenty_contributions_with_discards_in_between_sum_exactly(
    keyholder: KeyHolder, updates: dict[str, tuple[np.ndarray, list[bytes]]],
    aggregator: Aggregator,
) -> None:
    names = ["a", "b", "c"]
    for k in range(20):
        _send(aggregator, f"s{k}", updates[names[k % 3]][1])
        if k % 4 == 0:  # an unfinished update, then discarded (subtracted modulo q)
            _send(aggregator, f"gone{k}", updates["c"][1], weight=None)
            aggregator.discard(f"gone{k}")
    expected = np.mean([updates[names[k % 3]][0] for k in range(20)], axis=0)
    assert np.max(np.abs(_decrypt(keyholder, aggregator) - expected)) < 2e-4


def test_a_sum_of_rounded_values_is_reduced_before_it_could_wrap(
    params: HEParams, keys: tuple[bytes, bytes], keyholder: KeyHolder,
    updates: dict[str, tuple[np.ndarray, list[bytes]]], tmp_path: Path,
) -> None:
    """A rounded update is summed as plain 64-bit integers and a discard adds q − r (about
    2^60) to them: forty discards would pass 2^64 many times over unless the running sum is
    reduced modulo q before each addition that could."""
    with Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "spool") as agg:
        assert agg.layout.drop_bits != (0, 0)
        for k in range(40):
            _send(agg, f"gone{k}", updates["c"][1], weight=None)
            agg.discard(f"gone{k}")
        _send(agg, "a", updates["a"][1])
        _send(agg, "b", updates["b"][1])
        assert np.max(np.abs(_decrypt(keyholder, agg) - _expect(updates, "a", "b"))) < 2e-4


@pytest.mark.parametrize("pending_in_memory", [1, 0])
def test_ahead_parts_then_rests_sum_as_the_chunks_and_discard_exactly(
    params: HEParams, keys: tuple[bytes, bytes], updates: dict[str, tuple[np.ndarray, list[bytes]]],
    tmp_path: Path, pending_in_memory: int,
) -> None:
    """A chunk added as its ahead part then its rest gives the sum, bit for bit, that the
    whole chunk gives; a slave that sent only ahead parts (or ahead parts and some rests) is
    discarded exactly, from memory or from the spool; its update needs every rest to finish."""
    ahead = Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "a").layout.ahead_size
    assert ahead > HEADER_SIZE
    with Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "whole") as whole, \
            Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "parts",
                       pending_in_memory=pending_in_memory) as parts:
        _send(whole, "a", updates["a"][1])
        _send(whole, "b", updates["b"][1])
        for index, chunk in enumerate(updates["a"][1]):
            parts.add_ahead("a", index, chunk[:ahead])
        for index, chunk in enumerate(updates["c"][1]):  # c: ahead parts only, then gone
            parts.add_ahead("c", index, chunk[:ahead])
        parts.add_ahead("b", 0, updates["b"][1][0][:ahead])
        parts.add_chunk("b", 0, updates["b"][1][0][ahead:])
        for index, chunk in enumerate(updates["a"][1]):
            parts.add_chunk("a", index, chunk[ahead:])
        parts.add_chunk("b", 1, updates["b"][1][1])  # b's second chunk whole
        parts.add_ahead("d", 1, updates["c"][1][1][:ahead])  # d: one ahead part and its rest
        parts.add_chunk("d", 1, updates["c"][1][1][ahead:])
        with pytest.raises(MalformedUpdate, match="1 of 2 chunks missing"):
            parts.finish("d", 2)
        with pytest.raises(MalformedUpdate, match="ahead part repeated"):
            parts.add_ahead("a", 0, updates["a"][1][0][:ahead])
        with pytest.raises(MalformedUpdate, match="the rest of a chunk"):
            parts.add_chunk("c", 0, updates["c"][1][0])  # a whole chunk after its ahead part
        parts.finish("a", 2)
        parts.finish("b", 2)
        assert sorted(parts.pending) == ["c", "d"]
        parts.discard("c")
        parts.discard("d")
        assert parts.sum_chunks() == whole.sum_chunks()


def test_whole_coefficient_chunks_have_no_ahead_part(tmp_path: Path) -> None:
    ckks = resolve_params("ckks", clip=1.0, max_total_weight=40)
    ckks_keys = generate_contexts(ckks)
    with Aggregator(ckks, ckks_keys[1], SIZE, spool_dir=tmp_path) as agg:
        assert agg.layout.ahead_size == 0
        with pytest.raises(MalformedUpdate, match="no ahead part"):
            agg.add_ahead("a", 0, b"\0" * 100)
        assert agg.pending == []
