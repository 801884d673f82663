"""The key holder checks what it opens: noise budget before decoding, the clip after.

Real TenSEAL contexts, a real aggregator and key holder. Each poisoned contribution below is
accepted by the aggregator (its format, parameters and key id are valid) and refused by the
key holder, naming the check that caught it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secure_fed.errors import UnusableAggregate
from secure_fed.he.aggregate_checks import NOISE_BUDGET_CHECK, RANGE_CHECK
from secure_fed.he.aggregator import Aggregator
from secure_fed.he.chunk_format import CiphertextLayout, pack_chunk, parse_chunk
from secure_fed.he.codec import encode_plain, encrypt_chunk
from secure_fed.he.decrypter import Decrypter
from secure_fed.he.keyholder import KeyHolder
from secure_fed.he.keys import ciphertext_layout, generate_contexts, load_public_context
from secure_fed.he.presets import HEParams, resolve_params
from secure_fed.secagg import ring as pc

SIZE = 10_000  # two chunks of 8192 slots
LIE = 65_536  # the weight a lying slave encodes while it declares weight 1


@pytest.fixture(scope="module")
def params() -> HEParams:
    # room for an honest total weight of 3 and for the lie's declared weight 1
    return resolve_params("bfv-fast", clip=1.0, max_total_weight=64, max_contributions=8)


@pytest.fixture(scope="module")
def keys(params: HEParams) -> tuple[bytes, bytes]:
    return generate_contexts(params)


@pytest.fixture(scope="module")
def decrypter(params: HEParams, keys: tuple[bytes, bytes]) -> Decrypter:
    return Decrypter(params, keys[0])


@pytest.fixture(scope="module")
def keyholder(params: HEParams, keys: tuple[bytes, bytes]) -> Iterator[KeyHolder]:
    with KeyHolder(params, keys[0], min_contributions=2) as holder:
        yield holder


@pytest.fixture
def aggregator(params: HEParams, keys: tuple[bytes, bytes], tmp_path: Path
               ) -> Iterator[Aggregator]:
    with Aggregator(params, keys[1], SIZE, spool_dir=tmp_path / "spool") as agg:
        yield agg


def _values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.9, 0.9, SIZE)


def _update_layout(decrypter: Decrypter, params: HEParams) -> CiphertextLayout:
    """The layout of a slave's chunks (rounded: update_drop_bits) under the federation key."""
    return ciphertext_layout(params, decrypter.ctx, update=True)


def _encrypt(decrypter: Decrypter, params: HEParams, plain: np.ndarray) -> list[bytes]:
    """Chunks of an integer plaintext (already weighted), encrypted under the federation key."""
    slots, layout = params.slots, _update_layout(decrypter, params)
    return [encrypt_chunk(decrypter.ctx, params, layout, i, plain[i * slots:(i + 1) * slots])
            for i in range((plain.size + slots - 1) // slots)]


def _honest(decrypter: Decrypter, params: HEParams, seed: int) -> list[bytes]:
    plain = encode_plain(_values(seed), 1, params, np.random.default_rng(100 + seed))
    return _encrypt(decrypter, params, plain)


def _add(agg: Aggregator, slave: str, chunks: list[bytes], weight: int) -> None:
    for index, chunk in enumerate(chunks):
        agg.add_chunk(slave, index, chunk)
    agg.finish(slave, weight)


def _open(holder: KeyHolder, agg: Aggregator) -> np.ndarray:
    return holder.decrypt_average(agg.sum_chunks(), contributors=len(agg.contributors),
                                  total_weight=agg.total_weight, vector_size=SIZE)


def _with_honest_pair(agg: Aggregator, decrypter: Decrypter, params: HEParams) -> None:
    _add(agg, "a", _honest(decrypter, params, 1), 1)
    _add(agg, "b", _honest(decrypter, params, 2), 1)


def test_an_honest_sum_keeps_its_noise_budget_and_passes(
        params: HEParams, decrypter: Decrypter, keyholder: KeyHolder,
        aggregator: Aggregator) -> None:
    _with_honest_pair(aggregator, decrypter, params)
    _add(aggregator, "c", _honest(decrypter, params, 3), 1)
    average = _open(keyholder, aggregator)
    expected = np.mean([_values(s) for s in (1, 2, 3)], axis=0)
    assert np.abs(average - expected).max() < params.quant_step + 1e-7
    budgets = [decrypter.open(parse_chunk(c, decrypter.layout, index=i))[1]
               for i, c in enumerate(aggregator.sum_chunks())]
    fresh = decrypter.open(parse_chunk(_honest(decrypter, params, 4)[0],
                                       _update_layout(decrypter, params), index=0))[1]
    assert fresh is not None and all(b is not None and 0 < b <= fresh for b in budgets)


def test_random_coefficients_from_one_slave_are_refused_by_the_noise_budget(
        params: HEParams, decrypter: Decrypter, keyholder: KeyHolder,
        aggregator: Aggregator) -> None:
    rng = np.random.default_rng(7)
    layout = _update_layout(decrypter, params)
    moduli = np.array(layout.moduli, dtype=np.uint64).reshape(1, -1, 1)
    random = [pack_chunk(rng.integers(0, moduli, size=layout.shape, dtype=np.uint64), layout, i)
              for i in range(2)]
    _with_honest_pair(aggregator, decrypter, params)
    _add(aggregator, "mallory", random, 1)  # the aggregator cannot tell
    with pytest.raises(UnusableAggregate) as info:
        _open(keyholder, aggregator)
    assert info.value.check == NOISE_BUDGET_CHECK
    assert "2 of 2 decrypted chunk(s) have no invariant noise budget" in str(info.value)


def test_an_encryption_under_another_key_with_the_key_id_copied_is_refused(
        params: HEParams, decrypter: Decrypter, keyholder: KeyHolder,
        aggregator: Aggregator) -> None:
    other = load_public_context(generate_contexts(params)[1], params)
    # the other key's ciphertexts, labelled with the federation key's id
    forged = dataclasses.replace(ciphertext_layout(params, other, update=True),
                                 key_id=decrypter.layout.key_id)
    plain = encode_plain(_values(5), 1, params, np.random.default_rng(5))
    chunks = [encrypt_chunk(other, params, forged, i, plain[i * params.slots:
                                                            (i + 1) * params.slots])
              for i in range(2)]
    _with_honest_pair(aggregator, decrypter, params)
    _add(aggregator, "mallory", chunks, 1)
    with pytest.raises(UnusableAggregate) as info:
        _open(keyholder, aggregator)
    assert info.value.check == NOISE_BUDGET_CHECK


def test_a_weight_lie_is_refused_by_the_range_check(
        params: HEParams, decrypter: Decrypter, keyholder: KeyHolder,
        aggregator: Aggregator) -> None:
    t = int(params.plain_modulus or 0)
    lie = np.mod(encode_plain(_values(6), 1, params, np.random.default_rng(6)) * LIE, t)
    _with_honest_pair(aggregator, decrypter, params)
    _add(aggregator, "mallory", _encrypt(decrypter, params, lie), 1)  # declares weight 1
    with pytest.raises(UnusableAggregate) as info:
        _open(keyholder, aggregator)
    # the lie keeps the noise small: only the range check can see it
    assert info.value.check == RANGE_CHECK
    assert "lie outside [−1, 1]" in str(info.value)


def test_a_sum_with_no_noise_budget_is_refused_even_when_its_values_look_in_range(
        params: HEParams, decrypter: Decrypter, keyholder: KeyHolder,
        aggregator: Aggregator) -> None:
    """Noise of q/(2t) on the constant coefficient of c0 exhausts the budget and moves every
    slot by 0 or 1 quantization step: the range check alone would accept this sum."""
    _with_honest_pair(aggregator, decrypter, params)
    sums = aggregator.sum_chunks()
    layout = decrypter.layout
    t = int(params.plain_modulus or 0)
    coeffs = parse_chunk(sums[0], layout, index=0).copy()
    for j, q in enumerate(layout.moduli):
        coeffs[0, j, 0] = np.uint64((int(coeffs[0, j, 0]) + q // (2 * t)) % q)
    slots, budget = decrypter.open(coeffs)
    assert budget == 0
    honest = decrypter.slots(parse_chunk(sums[0], layout, index=0))
    assert np.abs(slots - honest).max() <= 1  # values barely moved, all within the clip
    edged = [pack_chunk(coeffs, layout, 0), sums[1]]
    with pytest.raises(UnusableAggregate) as info:
        keyholder.decrypt_average(edged, contributors=2, total_weight=2, vector_size=SIZE)
    assert info.value.check == NOISE_BUDGET_CHECK
    assert "1 of 2 decrypted chunk(s)" in str(info.value) and "chunk 0" in str(info.value)


def test_a_weight_lie_under_masking_is_refused_when_the_ring_sum_is_decoded(
        params: HEParams) -> None:
    rng = np.random.default_rng(9)
    t = pc.ring_modulus(params)
    honest = [pc.to_ring(_values(s), 1, params, rng) for s in (1, 2)]
    total = np.mod(honest[0] + honest[1], np.uint64(t))
    average = pc.ring_to_average(total, 2, params)
    assert np.abs(average - (_values(1) + _values(2)) / 2).max() < params.quant_step + 1e-7
    lie = np.mod(encode_plain(_values(6), 1, params, rng) * LIE, t).astype(np.uint64)
    with pytest.raises(UnusableAggregate) as info:
        pc.ring_to_average(np.mod(total + lie, np.uint64(t)), 3, params)
    assert info.value.check == RANGE_CHECK


def test_ckks_a_weight_lie_is_refused_and_an_honest_sum_passes() -> None:
    params = resolve_params("ckks", clip=1.0, max_total_weight=64, max_contributions=8)
    secret, _ = generate_contexts(params)
    decrypter = Decrypter(params, secret)
    with KeyHolder(params, secret, min_contributions=2) as holder:
        x, y = _values(1)[: params.slots], _values(2)[: params.slots]
        a = parse_chunk(encrypt_chunk(decrypter.ctx, params, decrypter.layout, 0, x),
                        decrypter.layout, index=0)
        b = parse_chunk(encrypt_chunk(decrypter.ctx, params, decrypter.layout, 0, y),
                        decrypter.layout, index=0)
        lie = parse_chunk(encrypt_chunk(decrypter.ctx, params, decrypter.layout, 0,
                                        np.clip(y, -1, 1) * LIE), decrypter.layout, index=0)
        moduli = decrypter.layout.moduli_column()

        def total(*parts: np.ndarray) -> list[bytes]:
            out = parts[0].copy()
            for part in parts[1:]:
                out = (out + part) % moduli
            return [pack_chunk(out, decrypter.layout, 0)]

        average = holder.decrypt_average(total(a, b), contributors=2, total_weight=2,
                                         vector_size=params.slots)
        assert np.abs(average - (x + y) / 2).max() < 1e-4
        with pytest.raises(UnusableAggregate) as info:
            holder.decrypt_average(total(a, lie), contributors=2, total_weight=2,
                                   vector_size=params.slots)
        assert info.value.check == RANGE_CHECK
