"""A master run without a socket (``run(listen=False)``) admits slaves through
``Master.accept`` over the in-memory transport with the same checks as over TLS: the
certificate the transport authenticated names the slave, a non-slave certificate is refused,
and a newer connection of a slave ends the older one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cryptography import x509

from secure_fed.audit.verify import read_verified_records
from secure_fed.errors import TransportError
from secure_fed.he.bundle import MasterBundle, context_digest
from secure_fed.master.server import Master
from secure_fed.protocol.messages import PROTOCOL_VERSION, Hello
from secure_fed.transport.channel import Channel
from secure_fed.transport.memory import MemoryListener


async def closed_with(channel: Channel) -> str:
    """The close the channel ends with (after any messages still queued)."""
    try:
        while True:
            await channel.receive(10)
    except TransportError as exc:
        return str(exc)


def test_a_master_run_without_listening_admits_slaves_through_accept(
    federation_dir: Path, tmp_path: Path
) -> None:
    bundle = MasterBundle.load(federation_dir / "master")
    slave_dir = federation_dir / "slaves" / "a"
    slave_certificate = x509.load_pem_x509_certificate((slave_dir / "slave.pem").read_bytes())
    master_certificate = x509.load_pem_x509_certificate(bundle.certificate.read_bytes())
    hello = Hello(protocol=PROTOCOL_VERSION, software="test",
                  public_context_sha256=context_digest(
                      (slave_dir / "he-public.ctx").read_bytes()))
    out = tmp_path / "run"

    async def scenario() -> dict[str, Any]:
        master = Master(bundle, out, port=0)
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(master.run(ready=ready, listen=False))
        listener = MemoryListener(master.accept)
        try:
            port = await asyncio.wait_for(ready, 30)
            first = await listener.connect("a", slave_certificate)
            await first.send(hello)
            welcome = json.loads(await first.receive(10))
            second = await listener.connect("a", slave_certificate)
            await second.send(hello)
            again = json.loads(await second.receive(10))
            replaced = await closed_with(first)
            impostor = await listener.connect("master", master_certificate)
            refused = await closed_with(impostor)
            return {"port": port, "bound_port": master.bound_port, "welcome": welcome,
                    "again": again, "replaced": replaced, "refused": refused}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await listener.close()

    outcome = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert outcome["port"] == 0 and outcome["bound_port"] is None
    assert outcome["welcome"]["type"] == "welcome" and outcome["welcome"]["slave_id"] == "a"
    assert outcome["welcome"]["next_round"] == 1 and outcome["again"]["slave_id"] == "a"
    assert "code 4000" in outcome["replaced"]
    assert "code 1008" in outcome["refused"] and "master certificate" in outcome["refused"]
    events = [(r["event"], r["data"].get("slave")) for r in
              read_verified_records(out / "audit.jsonl")]
    assert events[1:] == [("slave_connected", "a"), ("slave_disconnected", "a"),
                          ("slave_connected", "a")]
