"""`secure-fed bench codec` logic on a tiny vector (real encryption, real aggregation)."""

from __future__ import annotations

import pytest

from secure_fed.bench.codec import CLIP, COLUMNS, format_table, run_codec_bench
from secure_fed.errors import CryptoError
from secure_fed.he.codec import UpdateEncoder
from secure_fed.he.params import update_drop_bits
from secure_fed.he.presets import resolve_params


def test_codec_bench_rows_and_table() -> None:
    rows = run_codec_bench(size=5000, preset="bfv-fast", slaves=2, workers=1, compare=True,
                           repeats=2)
    assert [r["preset"] for r in rows] == ["bfv-fast", "compat", "compat-tenseal", "float32"]
    for row in rows:
        assert tuple(row) == COLUMNS and row["size"] == 5000
        assert row["encrypt_serialize_s_per_M"] > 0 and row["aggregate_s_per_M_per_slave"] > 0
    bfv, compat, tenseal, plain = rows
    assert tenseal["bytes_per_value"] > 1.1 * compat["bytes_per_value"]  # TenSEAL's own format
    assert tenseal["max_abs_error"] < 1e-6
    # one padded chunk of an update: without the low-order bits the noise bound leaves (the
    # bench sums 2 slaves of weights 1 and 2)
    params = resolve_params("bfv-fast", clip=CLIP, max_total_weight=3, max_contributions=2)
    assert update_drop_bits(params) != (0, 0)
    assert bfv["bytes_per_value"] == pytest.approx(UpdateEncoder.max_chunk_bytes_for(params)
                                                   / 5000)
    assert bfv["bytes_per_value"] < 122932 / 5000  # a whole ciphertext
    assert compat["bytes_per_value"] > 2 * bfv["bytes_per_value"]
    assert plain["bytes_per_value"] == 4.0 and plain["security_bits"] == 0
    assert bfv["max_abs_error"] < 1.0 / 2**15  # Δ for clip 1, b = 16
    assert compat["max_abs_error"] < 1e-6
    assert (bfv["security_bits"], compat["security_bits"]) == (192, 128)
    two = run_codec_bench(size=5000, preset="bfv-fast", slaves=2, workers=2, compare=True)
    assert [(r["preset"], r["workers"]) for r in two] == [
        ("bfv-fast", 2), ("compat", 1), ("compat-tenseal", 1), ("float32", 1)]
    table = format_table(rows)
    assert "bfv-fast vs compat: encrypt" in table and "float32" in table
    assert "bfv-fast vs compat-tenseal: encrypt" in table
    assert len(table.splitlines()) == 2 + 4 + 2


def test_codec_bench_refuses_bad_arguments() -> None:
    with pytest.raises(CryptoError, match="unknown preset 'x'"):
        run_codec_bench(size=10, preset="x", slaves=1, workers=1, compare=False)
    with pytest.raises(CryptoError, match="at least 1"):
        run_codec_bench(size=0, preset=None, slaves=1, workers=1, compare=False)
