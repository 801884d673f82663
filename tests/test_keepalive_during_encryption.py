"""Encryption never stalls the event loop: keep-alive pings with a short timeout survive it.

TenSEAL holds the GIL while it encrypts, so :class:`UpdateEncoder` does it in worker
processes. Here a websocket client with a 1-second ping timeout encrypts several million
values while connected; the connection must stay open and the loop must keep ticking.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from secure_fed.he.codec import UpdateEncoder
from secure_fed.he.keys import generate_contexts
from secure_fed.he.presets import resolve_params

VALUES = 3_000_000


def test_keepalive_survives_encrypting_millions_of_values() -> None:
    params = resolve_params("bfv-fast", clip=1.0, max_total_weight=4, max_contributions=4)
    _, public = generate_contexts(params)
    vector = np.random.default_rng(0).uniform(-1, 1, VALUES).astype(np.float32)

    async def scenario() -> tuple[int, float, int]:
        async def echo(ws):  # type: ignore[no-untyped-def]
            async for message in ws:
                await ws.send(message)

        async with serve(echo, "127.0.0.1", 0, compression=None, ping_interval=0.2,
                         ping_timeout=1.0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=0.2,
                               ping_timeout=1.0) as ws:
                gaps: list[float] = []
                stop = asyncio.Event()

                async def ticker() -> None:
                    last = time.monotonic()
                    while not stop.is_set():
                        await asyncio.sleep(0.01)
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

                tick = asyncio.create_task(ticker())
                with UpdateEncoder(params, public, workers=2) as encoder:
                    chunks = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: encoder.encrypt(vector, weight=1))
                stop.set()
                await tick
                await ws.send("still here")
                reply = await asyncio.wait_for(ws.recv(), 5)
                assert reply == "still here"
                return len(chunks), max(gaps), len(gaps)

    chunks, worst_gap, ticks = asyncio.run(scenario())
    assert chunks == UpdateEncoder.chunk_count_for(params, VALUES)
    assert ticks > 50  # the loop kept running while the workers encrypted
    assert worst_gap < 1.0, f"event loop stalled for {worst_gap:.2f} s"
