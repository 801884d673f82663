"""A loopback TCP relay that counts the bytes a party puts on the wire, for benchmarks.

``bench round --wire`` puts one relay between each slave and the master. The counts are
everything the connection carried: TLS records, websocket framing, the handshake, every
protocol message (including the key exchange of the masking modes) and every update chunk.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["ByteCountingRelay"]

_READ_BYTES = 2**16


class ByteCountingRelay:
    """Forwards connections on 127.0.0.1 to ``target_port`` and counts bytes each way.

    Args:
        target_port: the port on 127.0.0.1 that every accepted connection is relayed to.

    Attributes:
        upstream: bytes from the connecting party to the target (e.g. slave → master).
        downstream: bytes from the target back to the connecting party.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = 0
        self.downstream = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on an OS-chosen port of 127.0.0.1; returns that port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1",
                                                                         self.target_port)
        except OSError:
            writer.close()
            return
        pumps = [asyncio.create_task(self._pump(reader, target_writer, upstream=True)),
                 asyncio.create_task(self._pump(target_reader, writer, upstream=False))]
        self._pumps.update(pumps)
        await asyncio.gather(*pumps)
        self._pumps.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    upstream: bool) -> None:
        try:
            while data := await reader.read(_READ_BYTES):
                if upstream:
                    self.upstream += len(data)
                else:
                    self.downstream += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening and end the connections still open."""
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
