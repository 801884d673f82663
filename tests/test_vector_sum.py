"""``plain`` and ``mask`` updates: exact chunk sizes, refusals, and sums the others keep."""

from __future__ import annotations

import numpy as np
import pytest

from secure_fed.errors import CryptoError, MalformedUpdate
from secure_fed.he.presets import resolve_params
from secure_fed.secagg import ring as pc
from secure_fed.secagg.vector_sum import VectorSum

PARAMS = resolve_params("bfv-fast", clip=1.0, max_total_weight=3 * 4096)


@pytest.mark.parametrize("modulus", [2, 3, 2**20 + 7, PARAMS.plain_modulus, 2**61 - 1])
def test_ring_packing_round_trips_at_the_modulus_width(modulus: int) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, modulus, size=1001, dtype=np.uint64)
    values[:2] = [0, modulus - 1]
    packed = pc.pack_ring(values, modulus)
    assert len(packed) == -(-1001 * pc.ring_width(modulus) // 8)
    assert np.array_equal(pc.unpack_ring(packed, 1001, modulus), values)


def test_unpacking_refuses_a_value_at_or_above_the_modulus_and_a_wrong_length() -> None:
    packed = pc.pack_ring(np.array([5, 6, 7], dtype=np.uint64), 8)  # width 3 bits
    with pytest.raises(CryptoError, match="ring modulus 7"):
        pc.unpack_ring(packed, 3, 7)
    with pytest.raises(CryptoError, match="bytes"):
        pc.unpack_ring(packed + b"\0", 3, 8)


def test_ring_encoding_decodes_to_the_weighted_average_within_one_step() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1, 1, 5000), rng.uniform(-1, 1, 5000)
    t = pc.ring_modulus(PARAMS)
    total = (pc.to_ring(x, 3, PARAMS, rng) + pc.to_ring(y, 5, PARAMS, rng)) % np.uint64(t)
    average = pc.ring_to_average(total, 8, PARAMS)
    assert np.max(np.abs(average - (3 * x + 5 * y) / 8)) < PARAMS.quant_step


def test_plain_sum_refuses_bad_chunks_and_keeps_the_others() -> None:
    size = pc.VALUES_PER_CHUNK + 10  # two chunks, the last one short
    good = pc.float_chunks(np.full(size, 0.5), clip=1.0)
    summed = VectorSum("plain", size, clip=1.0)
    summed.add_chunk("a", 0, good[0])
    summed.add_chunk("a", 1, good[1])
    summed.finish("a", 4)
    too_big = np.full(10, 2.0, dtype="<f4").tobytes()
    nan = np.full(10, np.nan, dtype="<f4").tobytes()
    for index, data, reason in [(1, too_big, "clip range"), (1, nan, "not finite"),
                                (1, good[1][:-4], "bytes"), (2, good[1], "out of range")]:
        with pytest.raises(MalformedUpdate, match=reason):
            summed.add_chunk("b", index, data)
    summed.add_chunk("c", 1, good[1])
    with pytest.raises(MalformedUpdate, match="repeated"):
        summed.add_chunk("c", 1, good[1])
    with pytest.raises(MalformedUpdate, match="incomplete"):
        summed.finish("c", 1)
    summed.discard("b")
    assert summed.contributors == ["a"] and summed.total_weight == 4
    assert np.array_equal(summed.total(), np.full(size, 2.0))  # 4 × 0.5, untouched
    with pytest.raises(MalformedUpdate, match="already"):
        summed.add_chunk("a", 0, good[0])


@pytest.mark.parametrize("clip", [0.1, 1.0, 0.3, 1e-3])
def test_values_at_a_clip_float32_rounds_up_are_still_accepted(clip: float) -> None:
    """0.1 as a float32 is 0.10000000149: a value clipped to 0.1 and sent as float32 must not
    land beyond the range the master checks."""
    vector = np.array([5.0, -5.0, clip, -clip, 0.25 * clip])
    summed = VectorSum("plain", vector.size, clip=clip)
    summed.add_chunk("a", 0, pc.float_chunks(vector, clip)[0])
    summed.finish("a", 2)
    total = summed.total()
    assert np.all(np.abs(total) <= 2 * clip)
    assert np.allclose(total, 2 * np.clip(vector, -clip, clip), rtol=1e-6, atol=0)


def test_mask_sum_adds_modulo_the_ring() -> None:
    t = pc.ring_modulus(PARAMS)
    size = 100
    high = np.full(size, t - 1, dtype=np.uint64)
    summed = VectorSum("mask", size, clip=1.0, modulus=t)
    for slave in ("a", "b"):
        summed.add_chunk(slave, 0, pc.pack_ring(high, t))
        summed.finish(slave, 1)
    assert np.array_equal(summed.total(), np.full(size, t - 2, dtype=np.uint64))


def test_mask_sum_of_many_updates_in_a_wide_ring_is_exact() -> None:
    """In a 61-bit ring a uint64 total holds 8 unreduced updates: 20 updates make the sum
    reduce on the way, and it still equals the exact sum mod m."""
    m, size = 2**61 - 1, 64
    rng = np.random.default_rng(3)
    updates = [rng.integers(m - 2**20, m, size, dtype=np.uint64) for _ in range(20)]
    summed = VectorSum("mask", size, clip=1.0, modulus=m)
    for i, update in enumerate(updates):
        summed.add_chunk(f"s{i}", 0, pc.pack_ring(update, m))
        summed.finish(f"s{i}", 1)
    exact = [sum(int(u[j]) for u in updates) % m for j in range(size)]
    assert [int(v) for v in summed.total()] == exact


def test_a_masked_federation_needs_three_slaves() -> None:
    from pydantic import ValidationError

    from secure_fed.config.settings import EncryptionSettings, MasterConfig

    masked = EncryptionSettings(protection="mask")
    with pytest.raises(ValidationError, match="at least 3 slaves"):
        MasterConfig(federation_id="f", slaves=["a", "b"], min_slaves=2, encryption=masked)
    config = MasterConfig(federation_id="f", slaves=["a", "b", "c"], min_slaves=2,
                          encryption=masked)
    assert config.encryption.protection == "mask"
