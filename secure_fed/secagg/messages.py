"""Wire messages of secure aggregation (pairwise masking), and the exact bytes they bind.

The messages follow :mod:`secure_fed.protocol.messages`: JSON text objects with a ``type``,
strict pydantic models that refuse unknown fields, and binary data announced by a header
(the masked vector of :class:`MaskedInput`). Binary values inside JSON (keys, encrypted
shares, revealed shares) are base64 or hex of a fixed length, checked by the schema.
The protocol that produces and consumes them is :mod:`secure_fed.secagg`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from secure_fed.errors import ProtocolError
from secure_fed.protocol.messages import Hex64, PartyId, Round, Signature, parse_json_message
from secure_fed.secagg.masking import SEAL_OVERHEAD, SEED_BYTES
from secure_fed.secagg.shamir import SHARE_BYTES

SECAGG_CONTEXT = "secure-fed-secagg-v2"
MAX_PARTIES = 10_000
"""Most slaves one secure-aggregation round accepts."""
MAX_SECAGG_MESSAGE_BYTES = 4 * 2**20
"""Largest JSON secure-aggregation message accepted, in bytes (4 MiB). A complete-graph
``ShareKeys`` of n slaves is about 200·n bytes; with thousands of slaves use SecAgg+."""
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
"""Plaintext of one encrypted share pair: self-mask-seed share || mask-key share."""
SEALED_SHARES_BYTES = SHARE_PLAINTEXT_BYTES + SEAL_OVERHEAD

Key32 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""Base64 of a 32-byte X25519 public key."""
SealedShares = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{126}==$")]
"""Base64 of :data:`SEALED_SHARES_BYTES` (94) bytes: nonce || ciphertext || tag."""
ShareHex = Annotated[str, Field(pattern=r"^[0-9a-f]{66}$")]
"""Hex of one 33-byte Shamir share value."""
Parties = Annotated[list[PartyId], Field(max_length=MAX_PARTIES)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AdvertiseKeys(_Message):
    """Phase 0, slave -> master (and master -> slaves inside :class:`KeyList`).

    Args:
        round: the round of the federation.
        party: the advertising slave.
        c_pk: X25519 public key for encrypting shares (base64, 32 bytes).
        s_pk: X25519 public key for pairwise masks (base64, 32 bytes).
        b_commitment: :func:`self_mask_commitment` of the slave's self-mask seed b_u (hex):
            the master refuses a b_u rebuilt from revealed shares that does not match it.
        seed_commitment: with SecAgg+, :func:`contribution_commitment` of the slave's fresh
            32-byte contribution to the neighbour graph's seed (hex); ``None`` with the
            complete graph, which needs no seed.
        signature: base64 signature of the slave's certificate key over
            :func:`advertisement_signing_bytes`.
    """

    type: Literal["secagg_advertise"] = "secagg_advertise"
    round: Round
    party: PartyId
    c_pk: Key32
    s_pk: Key32
    b_commitment: Hex64
    seed_commitment: Hex64 | None
    signature: Signature


class KeyList(_Message):
    """Phase 0 result, master -> every slave that advertised: all advertisements (U1)."""

    type: Literal["secagg_keys"] = "secagg_keys"
    round: Round
    advertisements: list[AdvertiseKeys] = Field(min_length=1, max_length=MAX_PARTIES)


class SeedReveal(_Message):
    """SecAgg+ only, slave -> master after the key list: the contribution to the graph seed
    whose commitment the slave signed in its advertisement (hex of 32 bytes)."""

    type: Literal["secagg_reveal"] = "secagg_reveal"
    round: Round
    party: PartyId
    contribution: Hex64


class RevealedContribution(_Message):
    """One slave's revealed contribution to the graph seed, inside :class:`SeedReveals`."""

    party: PartyId
    contribution: Hex64


class SeedReveals(_Message):
    """SecAgg+ only, master -> every slave of the key list: every listed slave's revealed
    contribution, and the graph seed the master derived from them (:func:`graph_seed`),
    which each slave recomputes and refuses if it differs."""

    type: Literal["secagg_reveals"] = "secagg_reveals"
    round: Round
    graph_seed: Hex64
    reveals: list[RevealedContribution] = Field(min_length=1, max_length=MAX_PARTIES)


class EncryptedShares(_Message):
    """Shares of ``sender``'s two secrets for ``recipient``, encrypted to the recipient."""

    sender: PartyId
    recipient: PartyId
    sealed: SealedShares


class ShareKeys(_Message):
    """Phase 1, slave -> master: one :class:`EncryptedShares` per neighbour in U1."""

    type: Literal["secagg_shares"] = "secagg_shares"
    round: Round
    party: PartyId
    shares: list[EncryptedShares] = Field(max_length=MAX_PARTIES)


class ShareDelivery(_Message):
    """Phase 1 result, master -> one slave of U2: the shares addressed to it."""

    type: Literal["secagg_delivery"] = "secagg_delivery"
    round: Round
    shares: list[EncryptedShares] = Field(max_length=MAX_PARTIES)


class MaskedInput(_Message):
    """Phase 2, slave -> master: announces one binary message, the masked vector.

    Args:
        length: number of values; the binary message has ``8 * length`` bytes, each value a
            little-endian unsigned 64-bit integer in ``[0, m)``.
        sha256: SHA-256 (hex) of the binary message.
    """

    type: Literal["secagg_masked"] = "secagg_masked"
    round: Round
    party: PartyId
    length: int = Field(ge=1, le=2**31)
    sha256: Hex64


class UnmaskRequest(_Message):
    """Phase 3, master -> every slave of U3: who survived (U3) and who dropped (U2 \\ U3)."""

    type: Literal["secagg_unmask"] = "secagg_unmask"
    round: Round
    survivors: Parties
    dropped: Parties


class RevealedShare(_Message):
    """One Shamir share of ``owner``'s secret, revealed to the master in phase 3."""

    owner: PartyId
    value: ShareHex


class UnmaskResponse(_Message):
    """Phase 3 answer, slave -> master.

    Args:
        self_mask_shares: shares of the self-mask seed b_v of survivors v.
        mask_key_shares: shares of the mask private key s_sk of dropped slaves v.
    """

    type: Literal["secagg_unmask_shares"] = "secagg_unmask_shares"
    round: Round
    party: PartyId
    self_mask_shares: list[RevealedShare] = Field(max_length=MAX_PARTIES)
    mask_key_shares: list[RevealedShare] = Field(max_length=MAX_PARTIES)


SecAggMessage = Annotated[
    AdvertiseKeys | KeyList | SeedReveal | SeedReveals | ShareKeys | ShareDelivery | MaskedInput
    | UnmaskRequest | UnmaskResponse,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(SecAggMessage)


def is_secagg_text(message: str) -> bool:
    """Whether a text message is a secure-aggregation message: its JSON starts with a ``type``
    of ``secagg_…``, as every message this module encodes does (anything else is parsed by
    :mod:`secure_fed.protocol.messages`, which refuses unknown types)."""
    return message[:64].replace(" ", "").startswith('{"type":"secagg_')


def parse_secagg_message(raw: str | bytes, *, max_bytes: int = MAX_SECAGG_MESSAGE_BYTES) -> Any:
    """Parse and validate one JSON secure-aggregation message (:class:`ProtocolError` if bad).

    Args:
        raw: the text message as received.
        max_bytes: size limit checked before parsing.
    """
    return parse_json_message(raw, _ADAPTER, "peer (secure aggregation)", max_bytes=max_bytes)


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as the schema expects."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, length: int, what: str) -> bytes:
    """Strict base64 of exactly ``length`` bytes, else :class:`ProtocolError`."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{what} is not valid base64") from exc
    if len(data) != length:
        raise ProtocolError(f"{what} has {len(data)} bytes: expected {length}")
    return data


def decode_key(text: str, what: str) -> bytes:
    """A 32-byte public key from its base64 form."""
    return b64decode(text, SEED_BYTES, what)


def advertisement_signing_bytes(settings_digest: str, round_: int, party: str, c_pk: str,
                                s_pk: str, b_commitment: str,
                                seed_commitment: str | None) -> bytes:
    """The exact bytes a slave signs to advertise its keys (ASCII, one ``name=value`` a line).

    ``secure-fed-secagg-v2 advertise\\nsettings=<hex64>\\nround=<decimal>\\nparty=<id>\\n``
    ``c_pk=<base64>\\ns_pk=<base64>\\nb_commitment=<hex64>\\nseed_commitment=<hex64>\\n``
    (``seed_commitment=-`` with the complete graph). ``settings`` is the digest of the round's
    :class:`~secure_fed.secagg.settings.SecAggSettings` before the graph seed is known
    (federation, parties, threshold, ring, neighbours, task nonce, empty seed), so a slave
    accepts only keys of peers that were told the same settings.
    """
    lines = [f"{SECAGG_CONTEXT} advertise", f"settings={settings_digest}", f"round={round_}",
             f"party={party}", f"c_pk={c_pk}", f"s_pk={s_pk}", f"b_commitment={b_commitment}",
             f"seed_commitment={seed_commitment if seed_commitment is not None else '-'}"]
    return ("\n".join(lines) + "\n").encode("ascii")


def self_mask_commitment(b: bytes) -> str:
    """SHA-256 (hex) of ``secure-fed-secagg-v2 self-mask-seed\\n`` followed by the 32 bytes of
    a self-mask seed b_u: what a slave signs so that a b_u rebuilt from corrupted shares is
    detected even from exactly t shares."""
    return hashlib.sha256(f"{SECAGG_CONTEXT} self-mask-seed\n".encode("ascii") + b).hexdigest()


def contribution_commitment(contribution: bytes) -> str:
    """SHA-256 (hex) of ``secure-fed-secagg-v2 graph-seed-contribution\\n`` followed by the 32
    bytes of a slave's contribution to the SecAgg+ graph seed."""
    return hashlib.sha256(f"{SECAGG_CONTEXT} graph-seed-contribution\n".encode("ascii")
                          + contribution).hexdigest()


def graph_seed(settings_digest: str, contributions: Mapping[str, str]) -> bytes:
    """The SecAgg+ graph seed: 32 bytes that no party chose alone.

    SHA-256 of the ASCII text ``secure-fed-secagg-v2 graph-seed\\nsettings=<hex64>\\n``
    followed by one line ``<party>=<contribution hex64>\\n`` per slave of the key list, in
    sorted party order. ``settings_digest`` is the digest the advertisements were signed
    over (the settings before the seed).

    Args:
        settings_digest: hex digest of the settings without a graph seed.
        contributions: each slave of the key list and its revealed contribution (hex).
    """
    lines = [f"{SECAGG_CONTEXT} graph-seed", f"settings={settings_digest}",
             *(f"{party}={contributions[party]}" for party in sorted(contributions))]
    return hashlib.sha256(("\n".join(lines) + "\n").encode("ascii")).digest()


def share_associated_data(settings_digest: str, round_: int, sender: str,
                          recipient: str) -> bytes:
    """Associated data of one :class:`EncryptedShares`: binds settings, round and the pair."""
    lines = [f"{SECAGG_CONTEXT} shares", f"settings={settings_digest}", f"round={round_}",
             f"sender={sender}", f"recipient={recipient}"]
    return ("\n".join(lines) + "\n").encode("ascii")
