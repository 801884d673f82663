"""Encoding, encryption in worker processes, and the weighted-average round trip."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secure_fed.errors import CryptoError
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.codec import UpdateEncoder, decode_plain_sum, encode_plain
from secure_fed.he.keyholder import KeyHolder
from secure_fed.he.keys import generate_contexts
from secure_fed.he.presets import HEParams, ckks_error_bound, resolve_params

SIZE = 9000  # two chunks for BFV (8192 slots), three for CKKS (4096)
WEIGHTS = [3, 1, 7]


@pytest.fixture(scope="module")
def bfv() -> HEParams:
    return resolve_params("bfv-fast", clip=0.5, max_total_weight=64, max_contributions=8)


@pytest.fixture(scope="module")
def ckks() -> HEParams:
    return resolve_params("ckks", clip=0.5, max_total_weight=64)


@pytest.fixture(scope="module")
def bfv_keys(bfv: HEParams) -> tuple[bytes, bytes]:
    return generate_contexts(bfv)


@pytest.fixture(scope="module")
def bfv_encoder(bfv: HEParams, bfv_keys: tuple[bytes, bytes]) -> Iterator[UpdateEncoder]:
    with UpdateEncoder(bfv, bfv_keys[1], workers=1) as encoder:
        yield encoder


def _updates() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(0.0, 0.3, SIZE).astype(np.float32) for _ in WEIGHTS]


def _reference(updates: list[np.ndarray], clip: float) -> np.ndarray:
    total = sum(w * np.clip(u.astype(np.float64), -clip, clip)
                for u, w in zip(updates, WEIGHTS, strict=True))
    return np.asarray(total) / sum(WEIGHTS)


def _round_trip(params: HEParams, keys: tuple[bytes, bytes], encoder: UpdateEncoder,
                updates: list[np.ndarray], spool: Path, seed: int = 0) -> np.ndarray:
    secret, public = keys
    with Aggregator(params, public, SIZE, spool_dir=spool) as aggregator:
        for k, (update, w) in enumerate(zip(updates, WEIGHTS, strict=True)):
            chunks = encoder.encrypt(update, weight=w, seed=seed + k)
            assert len(chunks) == encoder.chunk_count(SIZE)
            for index, chunk in enumerate(chunks):
                aggregator.add_chunk(f"slave-{k}", index, chunk)
            aggregator.finish(f"slave-{k}", w)
        assert aggregator.contributors == ["slave-0", "slave-1", "slave-2"]
        assert aggregator.total_weight == sum(WEIGHTS)
        sums = aggregator.sum_chunks()
    with KeyHolder(params, secret, min_contributions=3) as keyholder:
        return keyholder.decrypt_average(sums, contributors=3, total_weight=sum(WEIGHTS),
                                         vector_size=SIZE)


def test_bfv_weighted_average_within_the_documented_bound(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes], bfv_encoder: UpdateEncoder, tmp_path: Path
) -> None:
    updates = _updates()
    updates[0][:5] = [2.0, -3.0, 0.5, -0.5, 10.0]  # beyond the clip: clipped, not wrapped
    average = _round_trip(bfv, bfv_keys, bfv_encoder, updates, tmp_path)
    assert average.dtype == np.float32 and average.shape == (SIZE,)
    error = np.abs(average.astype(np.float64) - _reference(updates, bfv.clip))
    bound = bfv.quant_step + bfv.clip * 2.0**-23  # |stochastic rounding| < Δ, plus float32
    assert error.max() < bound
    assert error.mean() < bfv.quant_step / 2  # errors are unbiased, not all at the bound


def test_ckks_weighted_average_within_the_documented_bound(
    ckks: HEParams, tmp_path: Path
) -> None:
    keys = generate_contexts(ckks)
    updates = _updates()
    with UpdateEncoder(ckks, keys[1], workers=1) as encoder:
        assert encoder.slots == 4096 and encoder.chunk_count(SIZE) == 3
        average = _round_trip(ckks, keys, encoder, updates, tmp_path)
    error = np.abs(average.astype(np.float64) - _reference(updates, ckks.clip))
    assert error.max() <= ckks_error_bound(ckks) + ckks.clip * 2.0**-23
    assert error.max() < 1e-6


def test_parallel_encoder_decrypts_to_the_same_average(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes], bfv_encoder: UpdateEncoder, tmp_path: Path
) -> None:
    updates = _updates()
    single = _round_trip(bfv, bfv_keys, bfv_encoder, updates, tmp_path / "one", seed=11)
    with UpdateEncoder(bfv, bfv_keys[1], workers=2) as parallel:
        assert parallel.workers == 2
        double = _round_trip(bfv, bfv_keys, parallel, updates, tmp_path / "two", seed=11)
    np.testing.assert_array_equal(single, double)


def test_encryptions_of_zero_made_ahead_give_the_same_average_and_serve_once(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes], bfv_encoder: UpdateEncoder, tmp_path: Path
) -> None:
    """A stocked encryption of zero plus the plaintext decrypts exactly as a fresh encryption
    (same seeds, same average), and each serves one chunk only: a BFV plaintext changes only
    the first polynomial, so a zero used twice would show as two chunks with the same
    second polynomial."""
    from secure_fed.he.chunk_format import parse_chunk

    updates = _updates()
    fresh = _round_trip(bfv, bfv_keys, bfv_encoder, updates, tmp_path / "fresh", seed=5)
    chunks_needed = len(WEIGHTS) * UpdateEncoder.chunk_count_for(bfv, SIZE)
    with UpdateEncoder(bfv, bfv_keys[1], workers=1) as encoder:
        encoder.stock(chunks_needed)
        deadline = time.monotonic() + 60
        while encoder.stocked < chunks_needed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert encoder.stocked == chunks_needed and encoder.stock_cpu_seconds > 0
        stocked = _round_trip(bfv, bfv_keys, encoder, updates, tmp_path / "stocked", seed=5)
        assert encoder.stocked == 0  # every one taken
        np.testing.assert_array_equal(stocked, fresh)
        encoder.stock(2)
        deadline = time.monotonic() + 60
        while encoder.stocked < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        chunks = encoder.encrypt(np.full(SIZE, 0.1), weight=2, seed=3)
        chunks += encoder.encrypt(np.full(SIZE, 0.1), weight=2, seed=3)  # afresh: stock used
    assert encoder.stocked == 0
    layout = bfv_encoder.layout
    second = {parse_chunk(c, layout)[1].tobytes() for c in chunks}
    assert len(second) == len(chunks) == 4


def test_a_stocked_zero_plus_the_plaintext_is_exactly_seals_add_plain(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes]
) -> None:
    """The workers' path (Δ·m from SEAL's add_plain onto the constant ciphertext (0, 1),
    added to the zero's c0 modulo q) gives, byte for byte, the chunk SEAL's own add_plain
    onto that encryption of zero gives; the ahead part and the rest joined are that chunk."""
    import tenseal

    from secure_fed.he import codec
    from secure_fed.he.seal_blob import CiphertextTemplate

    codec._worker_init(bfv.model_dump_json(), bfv_keys[1])
    try:
        layout = codec._WORKER["layout"]
        (zero, c1), = codec._make_zeros(1)
        plain = np.random.default_rng(4).integers(0, bfv.plain_modulus, bfv.slots)
        template = CiphertextTemplate(
            tenseal._ts_cpp.BFVVector(codec._WORKER["ctx"].data, [0] * bfv.slots).serialize(),
            polys=2, moduli_count=1, poly_modulus_degree=bfv.poly_modulus_degree)
        seal = tenseal._ts_cpp.BFVVector(codec._WORKER["ctx"].data, template.build(zero))
        expected = codec.pack_chunk(codec._coefficients(seal.add_plain(plain.tolist()), layout),
                                    layout, 3)
        assert codec._encrypt(3, plain, zero.copy(), rest=False) == expected
        ahead = codec.Reservation(layout, [(zero, c1)]).ahead[0]
        rest = codec._encrypt(0, plain, zero[0].copy(), rest=True)
        assert ahead + rest == codec._encrypt(0, plain, zero.copy(), rest=False)
        assert len(ahead) == layout.ahead_size
    finally:
        codec._WORKER.clear()


def test_a_reservation_gives_its_ahead_parts_and_serves_one_update(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """Reserved zeros leave the stock at once; the update encrypted with them begins, chunk
    by chunk, with the ahead parts given beforehand, and decrypts to the same average as a
    fresh encryption; the reservation cannot serve a second update, and a stock that is short
    reserves nothing."""
    updates = _updates()
    count = UpdateEncoder.chunk_count_for(bfv, SIZE)
    with UpdateEncoder(bfv, bfv_keys[1], workers=1) as encoder:
        assert encoder.reserve(count) is None  # nothing stocked yet
        encoder.stock(len(WEIGHTS) * count)
        deadline = time.monotonic() + 60
        while encoder.stocked < len(WEIGHTS) * count and time.monotonic() < deadline:
            time.sleep(0.02)
        secret, public = bfv_keys
        with Aggregator(bfv, public, SIZE, spool_dir=tmp_path) as aggregator:
            for k, (update, w) in enumerate(zip(updates, WEIGHTS, strict=True)):
                reservation = encoder.reserve(count)
                assert reservation is not None and not reservation.spent
                assert encoder.stocked == (len(WEIGHTS) - k - 1) * count
                chunks = encoder.encrypt(update, weight=w, seed=20 + k, reservation=reservation)
                assert reservation.spent
                assert [c[:encoder.layout.ahead_size] for c in chunks] == reservation.ahead
                for i, chunk in enumerate(chunks):
                    aggregator.add_chunk(f"s{k}", i, chunk)
                aggregator.finish(f"s{k}", w)
                with pytest.raises(CryptoError, match="used already"):
                    encoder.encrypt(update, weight=w, reservation=reservation)
            with KeyHolder(bfv, secret, min_contributions=1) as keyholder:
                reserved = keyholder.decrypt_average(
                    aggregator.sum_chunks(), contributors=len(WEIGHTS),
                    total_weight=aggregator.total_weight, vector_size=SIZE)
        fresh = _round_trip(bfv, bfv_keys, encoder, updates, tmp_path / "fresh", seed=20)
    np.testing.assert_array_equal(reserved, fresh)


def test_chunks_are_compact_and_never_carry_the_context(
    bfv: HEParams, bfv_keys: tuple[bytes, bytes], bfv_encoder: UpdateEncoder
) -> None:
    chunks = bfv_encoder.encrypt(np.full(SIZE, 0.1), weight=2, seed=3)
    assert all(len(c) == bfv_encoder.chunk_bytes for c in chunks)
    assert bfv_encoder.chunk_bytes == UpdateEncoder.max_chunk_bytes_for(bfv)
    assert UpdateEncoder.chunk_count_for(bfv, SIZE) == 2
    assert bfv_encoder.chunk_bytes / bfv_encoder.slots <= 16.0  # 15.006 bytes per value
    assert bfv_encoder.chunk_bytes < len(bfv_keys[1]) / 2
    assert bfv_keys[1][1000:1064] not in b"".join(chunks)
    # fresh randomness: the same update encrypts to different bytes
    assert bfv_encoder.encrypt(np.full(10, 0.1), weight=2, seed=3) != bfv_encoder.encrypt(
        np.full(10, 0.1), weight=2, seed=3)


def test_non_finite_values_and_bad_weights_are_refused(
    bfv: HEParams, bfv_encoder: UpdateEncoder
) -> None:
    vector = np.zeros(SIZE)
    vector[8200] = np.nan
    with pytest.raises(CryptoError, match="index 8200 is nan"):
        bfv_encoder.encrypt(vector, weight=1)
    vector[8200] = 0.0
    vector[7] = -np.inf
    with pytest.raises(CryptoError, match="index 7 is -inf"):
        bfv_encoder.encrypt(vector, weight=1)
    for weight in (0, 65, -3):
        with pytest.raises(CryptoError, match=rf"weight {weight} is outside \[1, 64\]"):
            bfv_encoder.encrypt(np.zeros(4), weight=weight)
    with pytest.raises(CryptoError, match="1-D"):
        bfv_encoder.encrypt(np.zeros((2, 2)), weight=1)
    with pytest.raises(CryptoError, match="empty"):
        bfv_encoder.encrypt(np.zeros(0), weight=1)


def test_stochastic_rounding_is_unbiased_and_within_one_step(bfv: HEParams) -> None:
    step = bfv.quant_step
    x = np.full(200_000, 0.37 * step + 100 * step)
    q = encode_plain(x, 1, bfv, np.random.default_rng(1))
    assert q.dtype == np.int64 and set(np.unique(q)) == {100, 101}
    values = q * step
    assert np.all(np.abs(values - x) < step)
    # E[q·Δ] = x: mean within 5 standard errors (σ ≤ Δ/2)
    assert abs(values.mean() - x[0]) < 5 * (step / 2) / np.sqrt(x.size)
    weighted = encode_plain(np.array([bfv.clip, -bfv.clip, 9.0]), 5, bfv,
                            np.random.default_rng(2))
    assert weighted.tolist() == [5 * 2**15, -5 * 2**15, 5 * 2**15]


def test_decode_plain_sum_and_ckks_encoding(bfv: HEParams, ckks: HEParams) -> None:
    decoded = decode_plain_sum(np.array([2**15 * 4, -(2**14)]), 4, bfv)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, [0.5, -0.5 / 2 / 4])
    plain = encode_plain(np.array([0.2, -9.0]), 3, ckks, np.random.default_rng(0))
    np.testing.assert_allclose(plain, [0.6, -1.5])
    with pytest.raises(CryptoError, match="total weight 65"):
        decode_plain_sum(np.zeros(2), 65, bfv)


def test_closed_encoder_refuses_work(bfv: HEParams, bfv_keys: tuple[bytes, bytes]) -> None:
    encoder = UpdateEncoder(bfv, bfv_keys[1], workers=1)
    encoder.close()
    encoder.close()
    with pytest.raises(CryptoError, match="encoder is closed"):
        encoder.encrypt(np.zeros(3), weight=1)
    with pytest.raises(CryptoError, match="holds a secret key"):
        UpdateEncoder(bfv, bfv_keys[0], workers=1)
