"""A slave's held-out records: a deterministic, keyed split of its data source.

Federated evaluation measures each committed model on records the federation never trained
on. The split is per record: a record is held out when the BLAKE2b hash of its content (its
features as float32 and its label), keyed with a secret of the data source, falls below
``fraction`` of the hash range. So

- the same data source gives the same split in every run (the key is kept in the ledger's
  folder), and a held-out record is never trained on by a later federation either;
- whether one record is held out depends on that record alone: adding or removing a record
  changes no other record's side, so under add/remove-one each neighbouring dataset differs
  in exactly one of the two parts (training releases and evaluation releases each see one
  record more or less, never a reshuffle);
- without the key, nobody (the master included) can tell which side a record is on.

Identical records share a side.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import replace
from pathlib import Path

import numpy as np

from secure_fed.data.datasets import Dataset
from secure_fed.errors import DataError

KEY_FILE = "held-out.key"
"""The split's secret, next to the data source's ledger."""
KEY_BYTES = 32


def split_key(folder: Path) -> bytes:
    """The data source's split key in ``folder`` (created once, readable by its owner only)."""
    path = Path(folder) / KEY_FILE
    if not path.exists():
        key = secrets.token_bytes(KEY_BYTES)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # never replaces a key another process wrote first
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise DataError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte split key; "
                        "restore it from a backup (a new key would move held-out records into "
                        "training)")
    return key


def held_out_mask(data: Dataset, key: bytes, fraction: float) -> np.ndarray:
    """Boolean mask of the held-out records of ``data`` (``fraction`` of them, in expectation)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    if len(key) != KEY_BYTES:
        raise DataError(f"the split key must have {KEY_BYTES} bytes, got {len(key)}")
    features = np.ascontiguousarray(data.features, dtype=np.float32)
    labels = np.asarray(data.labels, dtype=np.int64)
    threshold = int(fraction * 2**64)
    mask = np.empty(len(labels), dtype=bool)
    for i in range(len(labels)):
        digest = hashlib.blake2b(features[i].tobytes() + labels[i].tobytes(), key=key,
                                 digest_size=8, person=b"sf-held-out").digest()
        mask[i] = int.from_bytes(digest, "big") < threshold
    return mask


def split_held_out(data: Dataset, key: bytes, fraction: float) -> tuple[Dataset, Dataset]:
    """``(training, held_out)`` parts of ``data``; both must hold records."""
    mask = held_out_mask(data, key, fraction)
    if mask.all() or not mask.any():
        raise DataError(f"holding out {fraction:.0%} of {len(mask)} records leaves "
                        f"{'no training' if mask.all() else 'no held-out'} records; use more "
                        "records or another evaluation_fraction")
    training = replace(data, features=data.features[~mask], labels=data.labels[~mask])
    held_out = replace(data, features=data.features[mask], labels=data.labels[mask])
    return training, held_out
