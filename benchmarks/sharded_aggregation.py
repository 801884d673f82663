"""The master's aggregation in a tree of shards against one aggregator: time and peak memory.

``--slaves`` updates of ``--size`` values under ``he`` (preset ``bfv-fast``) stream into the
master's own aggregation pipeline (:class:`~secure_fed.master.aggregation.AggregationPipeline`
with ``aggregation.shards`` set, as ``secure-fed master --aggregation-shards N`` runs it),
chunk by chunk and interleaved as simultaneous uploads arrive: chunk 0 of every slave, then
chunk 1 of every slave, and so on; then every update is finished and the sum taken for the key
holder. Encrypting 100 updates of 1M values would take longer than summing them, so
``--distinct`` updates are encrypted and slave ``i`` sends update ``i mod distinct`` (the sum
does not care); the decrypted average is checked against the plaintexts.

Reported per shard count: the master's aggregation time (first chunk to the aggregate the key
holder receives) split into collection (chunks added, updates finished) and the root's sum,
the CPU seconds the master process spent in it (all its threads; not the shards'),
and the peak memory of the master process plus its shard processes (the sum of their
proportional set sizes, PSS, so that shared libraries count once), sampled every 20 ms, and
the master's before the first chunk (its imports, and the ``--distinct`` encrypted updates
this driver holds) before the round's sum is opened.

    .venv/bin/python benchmarks/sharded_aggregation.py --slaves 100 --size 1000000 --shards 1,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# The project is imported inside the functions: the shard and encryption processes start with
# ``spawn``, which imports this script again in each of them (and the master's imports, torch
# among them, would weigh on every shard).

if TYPE_CHECKING:
    from secure_fed.he.presets import HEParams


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid``: its resident memory, pages shared with other
    processes (libraries) counted in part, so that a sum over processes counts each once
    (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of a set of processes every ``interval_s`` in a thread."""

    def __init__(self, pids: list[int], interval_s: float = 0.02) -> None:
        self.pids = pids
        self.peak = 0
        self.peak_master = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            master = pss_bytes(self.pids[0])
            self.peak_master = max(self.peak_master, master)
            self.peak = max(self.peak, master + sum(pss_bytes(p) for p in self.pids[1:]))
            self._stop.wait(interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def one_round(shards: int, params: HEParams, keys: tuple[bytes, bytes],
                    updates: list[tuple[np.ndarray, list[bytes]]], slaves: list[str],
                    size: int, spool: Path) -> dict[str, Any]:
    """Stream every slave's update into a pipeline of ``shards`` shards; time and memory."""
    from secure_fed.config.settings import AggregationSettings, EncryptionSettings, MasterConfig
    from secure_fed.he.keyholder import KeyHolder
    from secure_fed.master.aggregation import AggregationPipeline
    from secure_fed.master.connections import Connections
    from secure_fed.protocol import coordinator as co

    config = MasterConfig(federation_id="bench-shards", slaves=slaves, min_slaves=len(slaves),
                          encryption=EncryptionSettings(protection="he"),
                          aggregation=AggregationSettings(shards=shards))
    with KeyHolder(params, keys[0], min_contributions=1) as holder:
        pipeline = AggregationPipeline(config, params, keys[1], holder, vector_size=size,
                                       spool_dir=spool, connections=Connections())
        try:
            start = co.StartRound(round=1, attempt=1, nonce="00" * 16, deadline_s=3600.0,
                                  recipients=tuple(slaves))
            before = pss_bytes(os.getpid())
            state, _ = pipeline.open(start)
            shard_pids = pipeline._shards.pids() if pipeline._shards is not None else []
            with PeakMemory([os.getpid(), *shard_pids]) as memory:
                began, cpu = time.perf_counter(), time.process_time()
                chunks = len(updates[0][1])
                for index in range(chunks):
                    for i, slave in enumerate(slaves):
                        await state.add_chunk(slave, index, updates[i % len(updates)][1][index])
                for slave in slaves:
                    await state.finish(slave, 1)
                collected = time.perf_counter()
                aggregate = await state.sum_chunks()
                summed, cpu = time.perf_counter(), time.process_time() - cpu
            average = holder.decrypt_average(aggregate, contributors=len(slaves),
                                             total_weight=len(slaves), vector_size=size)
            state.close()
        finally:
            pipeline.close()
    expected = np.mean([updates[i % len(updates)][0] for i in range(len(slaves))], axis=0)
    error = float(np.max(np.abs(average - expected)))
    step = params.clip / 2 ** (params.quant_bits - 1)
    if error > step:
        raise SystemExit(f"{shards} shards: decrypted average off by {error:.3g} > {step:.3g}")
    return {"shards": shards, "slaves": len(slaves), "size": size,
            "collect_s": round(collected - began, 2), "sum_s": round(summed - collected, 2),
            "aggregation_s": round(summed - began, 2), "master_cpu_s": round(cpu, 2),
            "peak_pss_mib": round(memory.peak / 2**20), "master_pss_mib":
            round(memory.peak_master / 2**20),
            "master_before_mib": round(before / 2**20), "max_abs_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slaves", type=int, default=100)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--shards", default="1,4", help="shard counts to compare, e.g. 1,4")
    parser.add_argument("--distinct", type=int, default=4,
                        help="distinct encrypted updates the slaves take turns sending")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    from secure_fed.he.codec import UpdateEncoder
    from secure_fed.he.keys import generate_contexts
    from secure_fed.he.presets import resolve_params

    slaves = [f"slave-{i:04d}" for i in range(args.slaves)]
    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=args.slaves,
                            max_contributions=args.slaves)
    keys = generate_contexts(params)
    rng = np.random.default_rng(0)
    with UpdateEncoder(params, keys[1], workers=2) as encoder:
        updates = [(x := rng.uniform(-0.9, 0.9, args.size), encoder.encrypt(x, weight=1, seed=k))
                   for k in range(args.distinct)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for shards in (int(n) for n in args.shards.split(",")):
            rows.append(asyncio.run(one_round(shards, params, keys, updates, slaves, args.size,
                                              Path(tmp) / f"spool-{shards}")))
            if not args.json:
                row = rows[-1]
                print(f"{shards} shard(s): aggregation {row['aggregation_s']:.2f} s (collect "
                      f"{row['collect_s']:.2f} s, sum {row['sum_s']:.2f} s; master CPU "
                      f"{row['master_cpu_s']:.2f} s), peak memory (PSS) "
                      f"of master + shards {row['peak_pss_mib']} MiB (master "
                      f"{row['master_pss_mib']} MiB, {row['master_before_mib']} MiB before)",
                      flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
