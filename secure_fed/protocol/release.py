"""The privacy boundary: every field and byte a slave sends, and why it may leave.

A slave's promise to its data owner is that whatever leaves the machine depends on any one
record by at most (ε, δ). This module is the one place that says, for every field of every
slave → master message and for the binary payloads, which of three classes it belongs to:

* **DP output** — computed from the records *through a mechanism recorded in the slave's
  ledger* (and composed into its ε), or a post-processing of such outputs (everything that
  follows from the released record count: σ, the sample rate, the steps, ε);
* **public** — a function of the plan, the bundle, the ledger's public mechanisms, or of
  metadata the data owner explicitly declared public; never computed from the records;
* **protocol** — nonces, hashes, keys, signatures and shares of fresh randomness, which are
  independent of the records (hashes and signatures of DP outputs are post-processing).

``tests/test_release_boundary.py`` walks the message schemas and fails on any field that is
not classified here, so a field added later must be placed; it also checks that two datasets
differing in one record give bitwise identical public fields, that two datasets of N and N+1
records whose count releases came out equal give identical headers (so nothing but the
released count carries N), and that every DP-output field has its mechanism in the ledger.
``docs/privacy.md`` shows :func:`boundary_table`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydantic import BaseModel

from secure_fed.protocol import messages as m
from secure_fed.secagg import messages as sm


class Release(enum.Enum):
    """Why a value may leave a slave."""

    DP_OUTPUT = "DP output"
    PUBLIC = "public"
    PROTOCOL = "protocol"


@dataclass(frozen=True)
class Classified:
    """A field's class and the reason it holds."""

    release: Release
    why: str


DP, PUBLIC, PROTOCOL = Release.DP_OUTPUT, Release.PUBLIC, Release.PROTOCOL

SLAVE_MESSAGES: tuple[type[BaseModel], ...] = (
    m.Hello, m.UpdateAhead, m.UpdateHeader, m.MechanismRecord, m.EvaluationRelease, m.Decline,
    sm.AdvertiseKeys, sm.ShareKeys, sm.EncryptedShares, sm.MaskedInput, sm.UnmaskResponse,
    sm.RevealedShare, sm.SeedReveal,
)
"""Every message (and nested model) a slave sends to the master."""

_TYPE = Classified(PROTOCOL, "the message type")
_ROUND = Classified(PUBLIC, "the round of the master's task")
_NONCE = Classified(PUBLIC, "the nonce of the master's task")
_PARTY = Classified(PUBLIC, "a party id from the bundle")

FIELDS: dict[tuple[str, str], Classified] = {
    ("Hello", "type"): _TYPE,
    ("Hello", "protocol"): Classified(PUBLIC, "the protocol version of the software"),
    ("Hello", "software"): Classified(PUBLIC, "the name and version of the software"),
    ("Hello", "public_context_sha256"): Classified(PUBLIC, "hash of the bundle's public HE "
                                                   "context"),
    ("Hello", "certificate"): Classified(PUBLIC, "the slave's certificate from its bundle"),
    ("UpdateAhead", "type"): _TYPE,
    ("UpdateAhead", "round"): _ROUND,
    ("UpdateAhead", "nonce"): _NONCE,
    ("UpdateAhead", "parts"): Classified(PUBLIC, "the update's chunk count, fixed by the "
                                         "model's size and the preset"),
    ("UpdateHeader", "type"): _TYPE,
    ("UpdateHeader", "round"): _ROUND,
    ("UpdateHeader", "nonce"): _NONCE,
    ("UpdateHeader", "weight"): Classified(
        DP, "the record count's Gaussian release (mechanism kind 'count' in the ledger and in "
        "`mechanisms`), clamped to [1, max_weight_per_slave]; public metadata instead when "
        "the data owner declared the count public (`weight_source`), or the exact count in a "
        "run without DP, which no ε bounds"),
    ("UpdateHeader", "weight_source"): Classified(PUBLIC, "the owner's choice (a declared "
                                                  "count or not) and the plan's `dp`"),
    ("UpdateHeader", "chunk_sha256"): Classified(PROTOCOL, "hashes of the chunks (DP output "
                                                 "after encryption or masking)"),
    ("UpdateHeader", "chunk_bytes"): Classified(PUBLIC, "chunk sizes, fixed by the model's "
                                                "size and the preset"),
    ("UpdateHeader", "mechanisms"): Classified(
        DP, "post-processing of the count release: σ, q and steps follow from the plan, the "
        "released (or declared) count and the ledger's earlier such mechanisms"),
    ("UpdateHeader", "epsilon_spent"): Classified(DP, "ε of `mechanisms` (post-processing "
                                                  "of them)"),
    ("UpdateHeader", "delta"): Classified(PUBLIC, "δ of the bundle"),
    ("UpdateHeader", "accountant"): Classified(PUBLIC, "the accountant of the bundle"),
    ("UpdateHeader", "epsilon_alone"): Classified(DP, "ε of `mechanisms` with their share "
                                                  "σ (post-processing of them)"),
    ("UpdateHeader", "evaluation"): Classified(
        DP, "the task's model measured on the held-out records with discrete Gaussian noise "
        "(mechanism kind 'evaluation' in the ledger and in `mechanisms`); see its fields"),
    ("UpdateHeader", "signature"): Classified(PROTOCOL, "signature over the fields above"),
    ("MechanismRecord", "noise_multiplier"): Classified(DP, "σ, calibrated from the plan "
                                                        "and the released count"),
    ("MechanismRecord", "sample_rate"): Classified(DP, "q = batch / released count (1 for "
                                                   "the count release)"),
    ("MechanismRecord", "steps"): Classified(DP, "steps from the plan and the released count"),
    ("MechanismRecord", "kind"): Classified(PUBLIC, "which release the mechanism is"),
    ("EvaluationRelease", "statistic"): Classified(PUBLIC, "the plan's statistic"),
    ("EvaluationRelease", "model_digest"): Classified(PUBLIC, "the digest of the task's "
                                                      "model"),
    ("EvaluationRelease", "values"): Classified(
        DP, "the exact statistic of the task (correct and total held-out predictions, L2 "
        "sensitivity √2; score histograms, 1; squared-error sum and L·total, L·√2; under "
        "add/remove-one) plus discrete Gaussian noise: the evaluation release (kind "
        "'evaluation', σ from the plan's ε share), recorded before it is sent"),
    ("EvaluationRelease", "noise_scale"): Classified(
        PUBLIC, "hypot(σ·Δ, τ) with σ from the plan's ε, share and rounds and the bundle's δ"),
    ("MechanismRecord", "share_noise_multiplier"): Classified(
        PUBLIC, "σ/√(m − c) of the plan's distributed settings"),
    ("MechanismRecord", "min_survivors"): Classified(PUBLIC, "m of the plan"),
    ("MechanismRecord", "tolerated_colluders"): Classified(PUBLIC, "c of the plan"),
    ("Decline", "type"): _TYPE,
    ("Decline", "round"): _ROUND,
    ("Decline", "nonce"): _NONCE,
    ("Decline", "reason"): Classified(
        DP, "why, from the task, the bundle, the released count and this federation's ledger "
        "entries (a lifetime budget is named without its figures)"),
    ("Decline", "epsilon_spent"): Classified(DP, "ε of this federation's mechanisms "
                                             "(post-processing)"),
    ("Decline", "epsilon_remaining"): Classified(DP, "the plan's ε minus `epsilon_spent`"),
    ("Decline", "final"): Classified(DP, "whether this federation's budget is exhausted "
                                     "(post-processing)"),
    ("Decline", "signature"): Classified(PROTOCOL, "signature over the fields above"),
    ("AdvertiseKeys", "type"): _TYPE,
    ("AdvertiseKeys", "round"): _ROUND,
    ("AdvertiseKeys", "party"): _PARTY,
    ("AdvertiseKeys", "c_pk"): Classified(PROTOCOL, "a fresh X25519 public key"),
    ("AdvertiseKeys", "s_pk"): Classified(PROTOCOL, "a fresh X25519 public key"),
    ("AdvertiseKeys", "b_commitment"): Classified(PROTOCOL, "hash of a fresh random "
                                                  "self-mask seed"),
    ("AdvertiseKeys", "seed_commitment"): Classified(PROTOCOL, "hash of fresh randomness "
                                                     "for the graph seed"),
    ("AdvertiseKeys", "signature"): Classified(PROTOCOL, "signature over the keys and "
                                               "commitments"),
    ("SeedReveal", "type"): _TYPE,
    ("SeedReveal", "round"): _ROUND,
    ("SeedReveal", "party"): _PARTY,
    ("SeedReveal", "contribution"): Classified(PROTOCOL, "fresh randomness for the graph "
                                               "seed"),
    ("ShareKeys", "type"): _TYPE,
    ("ShareKeys", "round"): _ROUND,
    ("ShareKeys", "party"): _PARTY,
    ("ShareKeys", "shares"): Classified(PROTOCOL, "sealed Shamir shares of fresh random "
                                        "secrets"),
    ("EncryptedShares", "sender"): _PARTY,
    ("EncryptedShares", "recipient"): _PARTY,
    ("EncryptedShares", "sealed"): Classified(PROTOCOL, "authenticated encryption of shares "
                                              "of fresh random secrets"),
    ("MaskedInput", "type"): _TYPE,
    ("MaskedInput", "round"): _ROUND,
    ("MaskedInput", "party"): _PARTY,
    ("MaskedInput", "length"): Classified(PUBLIC, "the model's size"),
    ("MaskedInput", "sha256"): Classified(PROTOCOL, "hash of the masked vector"),
    ("UnmaskResponse", "type"): _TYPE,
    ("UnmaskResponse", "round"): _ROUND,
    ("UnmaskResponse", "party"): _PARTY,
    ("UnmaskResponse", "self_mask_shares"): Classified(PROTOCOL, "Shamir shares of fresh "
                                                       "random self-mask seeds"),
    ("UnmaskResponse", "mask_key_shares"): Classified(PROTOCOL, "Shamir shares of fresh "
                                                      "random mask keys"),
    ("RevealedShare", "owner"): _PARTY,
    ("RevealedShare", "value"): Classified(PROTOCOL, "a Shamir share of fresh randomness"),
}
"""Every field of every slave → master message, keyed by (model name, field name)."""

PAYLOADS: dict[str, Classified] = {
    "update chunk header": Classified(PUBLIC, "format, scheme, chunk index, key id and value "
                                      "count: fixed by the preset and the model's size"),
    "update ahead part": Classified(
        PROTOCOL, "a chunk's header and c1, the second polynomial of a fresh public-key "
        "encryption of zero (p1·u + e1 with fresh u and e1): independent of the records, sent "
        "before training"),
    "update chunk body": Classified(
        DP, "the encrypted (he), masked (mask) or encrypted masked (he+mask) fixed-point "
        "encoding of the DP-SGD update times the public weight: DP-SGD's output, recorded in "
        "the ledger before it is sent; in plain protection, the same values unencrypted"),
}
"""The binary messages a slave sends (the update's chunks)."""


def classify(model: type[BaseModel], field: str) -> Classified:
    """The class of ``model.field``; ``KeyError`` for a field nobody has classified."""
    return FIELDS[(model.__name__, field)]


def unclassified() -> list[str]:
    """``Model.field`` of every slave message field missing from :data:`FIELDS`, and of
    every entry of :data:`FIELDS` that names no field (both must be empty)."""
    known = {(cls.__name__, name) for cls in SLAVE_MESSAGES for name in cls.model_fields}
    missing = sorted(f"{c}.{f}" for c, f in known - FIELDS.keys())
    stale = sorted(f"{c}.{f} (no such field)" for c, f in FIELDS.keys() - known)
    return missing + stale


def boundary_table() -> str:
    """The classification as a Markdown table (shown in ``docs/privacy.md``)."""
    rows = ["| message | field | class | why |", "| --- | --- | --- | --- |"]
    for cls in SLAVE_MESSAGES:
        for field in cls.model_fields:
            item = classify(cls, field)
            rows.append(f"| `{cls.__name__}` | `{field}` | {item.release.value} | {item.why} |")
    for name, item in PAYLOADS.items():
        rows.append(f"| binary | {name} | {item.release.value} | {item.why} |")
    return "\n".join(rows)
