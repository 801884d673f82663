"""Secure aggregation: mask expansion speed (a mask made, and a mask added to a sum as it is
made), one whole round, and message sizes.

Run the pytest-benchmark suite with
``.venv/bin/python -m pytest benchmarks/bench_secagg.py --benchmark-enable`` (the project's
pytest options disable benchmarking by default, which runs each body once), or print the
figures of docs/benchmarks.md as JSON with ``.venv/bin/python benchmarks/bench_secagg.py``.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from secure_fed.identity.certificates import generate_ca, issue_certificate, sign, verify_signature
from secure_fed.secagg.masking import MaskSum, expand_mask, mask_bound
from secure_fed.secagg.master_machine import MasterSecAgg
from secure_fed.secagg.settings import SecAggSettings
from secure_fed.secagg.slave_machine import SlaveSecAgg

MODULI = {"prime-2^61-1": 2**61 - 1, "prime-30-bit": 1_073_479_681, "2^32": 2**32}
MASK_VALUES = 1_000_000


@pytest.mark.parametrize("ring", list(MODULI))
def test_expand_mask(benchmark: BenchmarkFixture, ring: str) -> None:
    benchmark.group = "secagg-expand-mask-1M"
    mask = benchmark(expand_mask, os.urandom(32), MASK_VALUES, MODULI[ring])
    assert mask.shape == (MASK_VALUES,) and int(mask.max()) < MODULI[ring]


def run_round(parties: int, length: int, modulus: int, neighbours: int | None = None
              ) -> dict[str, Any]:
    """One round without dropouts; returns the JSON sizes of every message and the sum."""
    ids = tuple(f"s{i}" for i in range(parties))
    ca_cert, ca_key = generate_ca("bench")
    identity = {p: issue_certificate(ca_cert, ca_key, p, role="slave") for p in ids}

    def verify(party: str, data: bytes, signature: bytes) -> None:
        verify_signature(identity[party][0], data, signature)

    settings = SecAggSettings(
        federation_id="bench", round=1, parties=ids, vector_length=length, modulus=modulus,
        neighbours=neighbours, task_nonce="0" * 32)
    master = MasterSecAgg(settings, verify=verify)
    slaves = {p: SlaveSecAgg(settings, p, verify=verify,
                             sign=functools.partial(sign, identity[p][1])) for p in ids}
    sizes: dict[str, list[int]] = {}

    def note(message: Any) -> Any:
        sizes.setdefault(message.type, []).append(len(message.model_dump_json()))
        return message

    rng = np.random.default_rng(0)
    inputs = {p: rng.integers(0, modulus, length, dtype=np.uint64) for p in ids}
    for p in ids:
        master.receive_advertisement(p, note(slaves[p].advertise()))
    key_list = note(master.close_advertising())
    reveals = None
    if neighbours is not None:
        for p in ids:
            master.receive_reveal(p, note(slaves[p].reveal_seed(key_list)))
        reveals = note(master.close_revealing())
    for p in ids:
        master.receive_shares(p, note(slaves[p].share_keys(key_list, reveals)))
    deliveries = master.close_sharing()
    payload_bytes = 0
    for p in ids:
        header, payload = slaves[p].mask(note(deliveries[p]), inputs[p])
        payload_bytes = len(payload)
        master.receive_masked(p, note(header), payload)
    request = note(master.close_masking())
    for p in ids:
        master.receive_unmask(p, note(slaves[p].unmask(request)))
    total = master.finish()
    expected = [sum(int(inputs[p][i]) for p in ids) % modulus for i in range(length)]
    assert [int(v) for v in total] == expected
    return {"json_bytes_max": {k: max(v) for k, v in sizes.items()},
            "masked_payload_bytes": payload_bytes}


def test_round_8_slaves(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "secagg-round"
    result = benchmark.pedantic(run_round, args=(8, 10_000, 2**61 - 1), rounds=1)
    assert result["masked_payload_bytes"] == 80_000


def _values_per_s(work: Callable[[], object]) -> int:
    """Values of a 1M-value mask per second: the median of 5 runs of ``work``."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return round(MASK_VALUES / statistics.median(times))


def main() -> None:
    speed, added = {}, {}
    for ring, modulus in MODULI.items():
        expand_mask(os.urandom(32), 1000, modulus)
        speed[ring] = _values_per_s(lambda m=modulus: expand_mask(os.urandom(32), MASK_VALUES, m))
        total = MaskSum(np.zeros(MASK_VALUES, dtype=np.uint64), modulus,
                        bound=mask_bound(modulus))
        added[ring] = _values_per_s(lambda t=total: t.add_mask(os.urandom(32)))
    report = {
        "expand_mask_values_per_s": speed,
        "mask_sum_add_mask_values_per_s": added,
        "messages_n8_complete": run_round(8, 1000, 2**61 - 1),
        "messages_n8_secagg_plus_k4": run_round(8, 1000, 2**61 - 1, neighbours=4),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
