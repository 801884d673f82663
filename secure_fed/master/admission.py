"""Admission of slave connections: who is at the other end, whether it may take part, and
reading its messages for the round until it leaves.

A connection is admitted in three steps, each of which can refuse it with a close code the
slave can act on: a bound on connections still waiting for their ``hello``
(``max_pending_connections``, code 1013), the identity (the certificate the transport
authenticated, or over plain ws:// the one sent in ``hello``; its role, revocation (4005)
and membership (4003)), and the greeting (protocol version 4002, the HE public context
4004). A slave has at most one connection: a newer one ends the older one's part of the
round. What a greeted connection carries goes to the round (:class:`RoundEvents`); no round
logic lives here.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from cryptography import x509

from secure_fed.config.settings import MasterConfig
from secure_fed.costs import MASTER_KINDS, CpuTotals
from secure_fed.errors import IdentityError, ProtocolError, SecureFedError, TransportError
from secure_fed.identity.certificates import certificate_role, party_id_from_certificate
from secure_fed.identity.revocation import Revocations
from secure_fed.master.connections import Connections
from secure_fed.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorMessage,
    Hello,
    Welcome,
    parse_slave_message,
)
from secure_fed.transport.channel import Channel
from secure_fed.transport.tls import load_presented_certificate

log = logging.getLogger(__name__)


class RoundEvents(Protocol):
    """What admission tells the round about a greeted slave, and asks of it."""

    @property
    def next_round(self) -> int:
        """The round a slave greeted now would take part in (sent in ``welcome``)."""
        ...

    def upload_deadline(self, slave_id: str) -> float | None:
        """The monotonic time by which ``slave_id`` must finish its upload, or ``None``."""
        ...

    async def slave_joined(self, channel: Channel) -> None:
        """A greeted slave's connection is now its current one."""
        ...

    async def slave_left(self, slave_id: str) -> None:
        """The current connection of ``slave_id`` ended (or was replaced by a newer one)."""
        ...

    async def receive(self, channel: Channel, message: str | bytes) -> None:
        """One message of a greeted slave; raises :class:`ProtocolError` to close it."""
        ...


class Admission:
    """Admits, greets and reads slave connections for one master.

    Args:
        config: the federation's settings (its slaves, limits and id).
        ca_cert_pem: the federation CA's certificate (PEM), which a certificate sent in
            ``hello`` over plain ws:// must chain to.
        revocations: the revoked certificates; a revoked slave is refused with code 4005.
        public_digest: SHA-256 of the master's HE public context; a slave whose context
            differs is refused with code 4004.
        preset: the HE preset named in ``welcome``.
        connections: where a greeted slave's channel is kept (one per slave).
        rounds: the round the greeted slaves take part in.
        insecure_loopback: the transport authenticates nobody (plain ws://): a slave is
            identified by the certificate it sends in ``hello``.
        costs: the master's CPU seconds, to which identifying and greeting are added.
    """

    def __init__(self, config: MasterConfig, *, ca_cert_pem: bytes, revocations: Revocations,
                 public_digest: str, preset: str, connections: Connections,
                 rounds: RoundEvents, insecure_loopback: bool,
                 costs: CpuTotals | None = None) -> None:
        self.config = config
        self.costs = costs if costs is not None else CpuTotals(MASTER_KINDS)
        self._ca_cert_pem = ca_cert_pem
        self.revocations = revocations
        self._public_digest = public_digest
        self._preset = preset
        self.connections = connections
        self._rounds = rounds
        self.insecure_loopback = insecure_loopback
        self._pending = 0

    async def accept(self, channel: Channel) -> None:
        """Admit, greet and serve one slave connection until it ends."""
        limit = self.config.limits.max_pending_connections
        if self._pending >= limit:
            log.warning("refusing a connection from %s: %d connections are already waiting "
                        "for their 'hello' (max_pending_connections=%d)", channel.address,
                        self._pending, limit)
            await channel.close(1013, "too many pending connections; retry")
            return
        self._pending += 1
        try:
            admitted = await self._admit_connection(channel)
        finally:
            self._pending -= 1
        if admitted:
            await self._serve(channel)

    async def _admit_connection(self, channel: Channel) -> bool:
        """Identify and greet a new connection; ``False`` if it was refused (and closed)."""
        if not self.insecure_loopback:
            try:
                with self.costs.measure("admission_s"):
                    slave_id, certificate = self._identify(channel)
            except ProtocolError as exc:
                log.warning("refusing a connection from %s: %s", channel.address, exc)
                await channel.close(exc.close_code, str(exc))
                return False
            channel.peer = slave_id
            channel.certificate = certificate
        try:
            await self._greet(channel)
        except (ProtocolError, TransportError) as exc:
            log.warning("handshake with '%s' failed: %s", channel.peer, exc)
            await refuse(channel, exc)
            return False
        return True

    def _identify(self, channel: Channel) -> tuple[str, x509.Certificate]:
        """The slave id and certificate the transport authenticated, checked right after the
        handshake."""
        try:
            certificate = channel.authenticated_certificate()
            if certificate is None:
                raise IdentityError("the transport authenticated no certificate")
            slave_id = party_id_from_certificate(certificate)
            if certificate_role(certificate) != "slave":
                raise IdentityError(f"'{slave_id}' holds a {certificate_role(certificate)} "
                                    "certificate where a slave was expected")
        except SecureFedError as exc:
            raise ProtocolError(f"client certificate required: {exc}", 1008) from exc
        return self._admit(slave_id, certificate)

    def _identify_claimed(self, pem: str | None) -> tuple[str, x509.Certificate]:
        """Over plain ws:// only: the certificate a slave sent in ``hello``, fully checked."""
        if pem is None:
            raise ProtocolError("over plain ws:// the 'hello' must carry the slave's "
                                "certificate (PEM) in 'certificate'", 1008)
        try:
            certificate = load_presented_certificate(pem, self._ca_cert_pem)
            slave_id = party_id_from_certificate(certificate)
        except SecureFedError as exc:
            raise ProtocolError(f"the certificate in 'hello' is not usable: {exc}", 1008) from exc
        return self._admit(slave_id, certificate)

    def _admit(self, slave_id: str, certificate: x509.Certificate) -> tuple[str, x509.Certificate]:
        try:
            self.revocations.check(certificate)
        except IdentityError as exc:
            raise ProtocolError(f"slave '{slave_id}' refused: {exc}", 4005) from exc
        if slave_id not in self.config.slaves:
            raise ProtocolError(f"'{slave_id}' is not a slave of this federation", 4003)
        return slave_id, certificate

    async def _greet(self, channel: Channel) -> None:
        limits = self.config.limits
        message = await channel.receive_within(limits.handshake_timeout_s)
        if message is None:
            raise ProtocolError(f"no 'hello' within handshake_timeout_s="
                                f"{limits.handshake_timeout_s:g}", 4008)
        with self.costs.measure("admission_s"):
            welcome = self._check_hello(channel, message)
        await channel.send(welcome)

    def _check_hello(self, channel: Channel, message: str | bytes) -> Welcome:
        """The ``welcome`` for a slave's ``hello``, once its identity, protocol version and
        HE context are checked."""
        hello = parse_slave_message(message)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected 'hello' first, got '{hello.type}'")
        if self.insecure_loopback:
            channel.peer, channel.certificate = self._identify_claimed(hello.certificate)
        if hello.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {hello.protocol} is not supported; this master speaks "
                f"version {PROTOCOL_VERSION}", 4002)
        if channel.peer not in self.config.slaves:
            raise ProtocolError(f"'{channel.peer}' is not a slave of this federation", 4003)
        if hello.public_context_sha256 != self._public_digest:
            raise ProtocolError(
                "the slave's HE public context differs from the master's; install the slave "
                "bundle made by `secure-fed init` for this federation", 4004)
        return Welcome(
            protocol=PROTOCOL_VERSION, federation_id=self.config.federation_id,
            slave_id=channel.peer, preset=self._preset,
            protection=self.config.encryption.protection,
            next_round=self._rounds.next_round)

    async def _serve(self, channel: Channel) -> None:
        """Read a greeted slave's messages until it leaves or breaks a limit."""
        slave_id = channel.peer
        previous = self.connections.replace(slave_id, channel)
        if previous is not None:
            log.info("slave '%s' connected again; closing its older connection", slave_id)
            await previous.close(4000, "replaced by a newer connection")
            # The older connection is gone even if its reader has not noticed yet (it may be
            # busy with the slave's last message): an upload it carried cannot go on here.
            await self._rounds.slave_left(slave_id)
        await self._rounds.slave_joined(channel)
        try:
            while True:
                message = await channel.receive_within(self._receive_timeout(slave_id))
                if message is None:
                    raise ProtocolError(self._timeout_reason(slave_id), 4008)
                await self._rounds.receive(channel, message)
        except TransportError as exc:
            log.info("slave '%s' disconnected: %s", slave_id, exc)
        except ProtocolError as exc:
            await refuse(channel, exc)
        finally:
            if self.connections.release(slave_id, channel):
                await self._rounds.slave_left(slave_id)

    def _receive_timeout(self, slave_id: str) -> float:
        """Seconds the next message of ``slave_id`` may take: the idle timeout, or less
        during an upload (until the upload deadline, plus a second for the tick)."""
        timeout = self.config.limits.idle_timeout_s
        deadline = self._rounds.upload_deadline(slave_id)
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()) + 1.0)
        return timeout

    def _timeout_reason(self, slave_id: str) -> str:
        if self._rounds.upload_deadline(slave_id) is not None:
            return f"'{slave_id}' did not finish its update by the upload deadline"
        return (f"no complete message from '{slave_id}' within idle_timeout_s="
                f"{self.config.limits.idle_timeout_s:g}")


async def refuse(channel: Channel, error: SecureFedError) -> None:
    """Tell the peer why (an ``error`` message, when it still listens) and close with the
    error's close code (1011 for anything that is not a :class:`ProtocolError`)."""
    code = error.close_code if isinstance(error, ProtocolError) else 1011
    try:
        await channel.send(ErrorMessage(code=code, message=str(error)[:2000]))
    except Exception:  # noqa: BLE001 - the peer may already be gone
        log.debug("could not send the error to '%s'", channel.peer)
    await channel.close(code, str(error))
