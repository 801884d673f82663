"""The privacy boundary: every field a slave sends is classified, and the classes hold.

A *public* field must not depend on the records: for two datasets that differ in one record
(same size, the count declared public) it is bitwise identical. A *DP output* must have its
mechanism in the slave's ledger before it is sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from secure_fed.data.datasets import Dataset
from secure_fed.he.bundle import SlaveBundle
from secure_fed.he.codec import UpdateEncoder
from secure_fed.models.package import ModelPackage
from secure_fed.models.registry import build_model
from secure_fed.privacy.ledger import PrivacyLedger
from secure_fed.protocol import release
from secure_fed.protocol.messages import (
    PROTOCOL_VERSION,
    Decline,
    ModelHeader,
    Plan,
    Task,
    UpdateHeader,
    Welcome,
    encode,
)
from secure_fed.slave.client import Slave
from secure_fed.slave.sources import bundled_part
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


def test_every_field_a_slave_sends_is_classified() -> None:
    assert release.unclassified() == []
    for cls in release.SLAVE_MESSAGES:
        for name in cls.model_fields:
            assert release.classify(cls, name).why


def test_an_unclassified_field_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # take the classification of one field away: the walk over the schemas names it
    monkeypatch.delitem(release.FIELDS, ("UpdateHeader", "weight"))
    assert release.unclassified() == ["UpdateHeader.weight"]


def test_privacy_md_shows_the_classification() -> None:
    assert release.boundary_table() in (REPO / "docs" / "privacy.md").read_text("utf-8")


class _Capture:
    """The master's end of a connection, reduced to what a slave sends in one task."""

    def __init__(self) -> None:
        self.sent: list[BaseModel | bytes] = []

    async def send(self, message: BaseModel) -> None:
        self.sent.append(message)

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


def _neighbours() -> tuple[Dataset, Dataset]:
    """Part 0 of digits, and the same with its first record replaced by another one."""
    data = bundled_part("digits", "0/2")
    other = bundled_part("digits", "1/2")
    features, labels = data.features.copy(), data.labels.copy()
    features[0], labels[0] = other.features[0], other.labels[0]
    assert not np.array_equal(features, data.features)
    return data, Dataset(data.name, features, labels, data.num_classes, data.feature_names,
                         data.class_names, data.preprocessing)


def _answer(federation_dir: Path, state: Path, data: Dataset, *, epsilon: float = 3.0,
            **slave_options: Any) -> tuple[list[BaseModel | bytes], Slave]:
    """What slave ``a`` sends for one delta task of the tiny model, and the slave."""
    bundle = SlaveBundle.load(federation_dir / "slaves" / "a")
    slave = Slave(bundle, data, state_dir=state, budget_epsilon=10.0, workers=1,
                  **slave_options)
    torch.manual_seed(0)
    kwargs = TINY_MODEL.kwargs
    package = ModelPackage.from_module("mlp", kwargs, build_model("mlp", **kwargs))
    size = sum(p.numel() for p in build_model("mlp", **kwargs).parameters())
    task = Task(round=1, attempt=1, nonce="ab" * 16, deadline_s=60.0,
                model=ModelHeader(architecture="mlp", kwargs=package.kwargs,
                                  digest=package.digest, params_bytes=len(package.params)),
                plan=Plan(mode="delta", epochs=1, batch_size=64, lr=0.5, momentum=0.0,
                          max_grad_norm=1.0, epsilon=epsilon, delta=1e-5, rounds_total=2,
                          data_schema=bundle.config.data_schema),
                vector_size=size, chunks=UpdateEncoder.chunk_count_for(bundle.he_params, size))
    channel = _Capture()
    with UpdateEncoder(bundle.he_params, bundle.public_context.read_bytes(),
                       workers=1) as encoder:
        asyncio.run(_deliver(slave, channel, encoder, [encode(task), package.params]))
    return channel.sent, slave


async def _deliver(slave: Slave, channel: _Capture, encoder: UpdateEncoder,
                   messages: list[str | bytes]) -> None:
    """Feed ``messages`` to a slave just welcomed by its master, as its session would."""
    config = slave.config
    slave.machine.receive_connected()
    slave.machine.receive_message(encode(Welcome(
        protocol=PROTOCOL_VERSION, federation_id=config.federation_id, slave_id=config.slave_id,
        preset=slave.bundle.he_params.preset, protection=config.encryption.protection,
        next_round=1)))
    for raw in messages:
        await slave._deliver(channel, encoder, raw)  # type: ignore[arg-type]


def test_public_fields_are_identical_for_neighbouring_datasets(
    federation_dir: Path, tmp_path: Path
) -> None:
    data, neighbour = _neighbours()
    sent = [_answer(federation_dir, tmp_path / name, d, public_count=len(d), source_id="clinic")[0]
            for name, d in (("d", data), ("d2", neighbour))]
    headers = [s[0] for s in sent]
    assert all(isinstance(h, UpdateHeader) for h in headers)
    for name in UpdateHeader.model_fields:
        kind = release.classify(UpdateHeader, name).release
        values = [getattr(h, name) for h in headers]
        if kind is release.Release.PUBLIC:
            assert values[0] == values[1], name
    assert headers[0].weight_source == "declared-public"  # type: ignore[union-attr]
    # the update itself is a DP output: it depends on the record, as DP-SGD's output does
    assert sent[0][1:] != sent[1][1:]


def test_every_dp_output_has_its_mechanism_in_the_ledger(
    federation_dir: Path, tmp_path: Path
) -> None:
    data, _ = _neighbours()
    sent, slave = _answer(federation_dir, tmp_path / "d", data, source_id="clinic")
    header = sent[0]
    assert isinstance(header, UpdateHeader)
    ledger = PrivacyLedger.open(tmp_path / "d", budget_epsilon=None, delta=1e-5,
                                source_id="clinic")
    count, run = ledger.entries
    # weight: the count's Gaussian release, with its mechanism, never the exact count's
    assert header.weight_source == "dp-count"
    assert count.mode == "count" and count.value == header.weight and count.noise_multiplier > 1
    # the chunks: the DP-SGD run of this task, recorded before they were sent
    assert run.mode == "delta" and run.task_nonce == "ab" * 16
    assert [(m.noise_multiplier, m.sample_rate, m.steps, m.kind) for m in header.mechanisms] == [
        (count.noise_multiplier, 1.0, 1, "count"),
        (run.noise_multiplier, run.sample_rate, run.steps, "dp-sgd")]
    # the sample rate follows the released count, not the exact one
    assert run.sample_rate == pytest.approx(64 / header.weight)
    assert header.epsilon_spent == pytest.approx(ledger.spent_in(slave.ledger_federation))


def test_a_decline_names_no_fingerprint_of_the_data(federation_dir: Path, tmp_path: Path) -> None:
    # A plan whose ε cannot fit a round: both datasets decline, with the same public reason.
    data, neighbour = _neighbours()
    declines = [_answer(federation_dir, tmp_path / name, d, epsilon=0.01,
                        public_count=len(d))[0]
                for name, d in (("d", data), ("d2", neighbour))]
    assert all(len(d) == 1 and isinstance(d[0], Decline) for d in declines)
    first, second = declines[0][0], declines[1][0]
    # reason, ε spent and remaining: nothing of the records (signatures are randomized)
    assert first.model_dump(exclude={"signature"}) == second.model_dump(exclude={"signature"})
    assert isinstance(first, Decline) and first.final and "budget" in first.reason
    assert "data-" not in first.reason  # the default source id is a hash of the data


def test_a_federation_that_takes_another_ones_name_sees_nothing_of_it(
    federation_dir: Path, tmp_path: Path
) -> None:
    # Two federations named 'test-fed' (two `secure-fed init`, two CAs) over the same data
    # source: the second is told only its own releases, and draws its own count.
    from conftest import small_plan

    from secure_fed.master.provision import init_federation

    other = tmp_path / "other-fed"
    init_federation(other, small_plan(["a", "b"]))
    data, _ = _neighbours()
    first, _ = _answer(federation_dir, tmp_path / "state", data, source_id="clinic")
    second, slave = _answer(other, tmp_path / "state", data, source_id="clinic")
    for sent in (first, second):
        header = sent[0]
        assert isinstance(header, UpdateHeader)
        assert [m.kind for m in header.mechanisms] == ["count", "dp-sgd"]  # its own only
    ledger = PrivacyLedger.open(tmp_path / "state", budget_epsilon=None, delta=1e-5,
                                source_id="clinic")
    keys = {e.federation_id for e in ledger.entries}
    assert len(ledger.entries) == 4 and len(keys) == 2
    assert all(k.startswith("test-fed@") for k in keys) and slave.ledger_federation in keys
    # the lifetime composes both
    assert ledger.spent() > ledger.spent_in(slave.ledger_federation)


def test_add_remove_neighbours_with_the_same_released_count_send_the_same_header(
    federation_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # D has N records, D' has N + 1. When their DP count releases come out equal (pinned
    # here), every field of the update but the chunks and what signs them is identical:
    # nothing that leaves depends on the exact N except through the released count.
    import secure_fed.slave.privacy_plan as privacy_plan

    monkeypatch.setattr(privacy_plan, "release_count", lambda records, sigma, *, upper: 250)
    data, _ = _neighbours()
    other = bundled_part("digits", "1/2")
    larger = Dataset(data.name, np.concatenate([data.features, other.features[:1]]),
                     np.concatenate([data.labels, other.labels[:1]]), data.num_classes,
                     data.feature_names, data.class_names, data.preprocessing)
    assert len(larger) == len(data) + 1
    headers = [_answer(federation_dir, tmp_path / name, d, source_id="clinic")[0][0]
               for name, d in (("d", data), ("d2", larger))]
    assert all(isinstance(h, UpdateHeader) for h in headers)
    fields = [h.model_dump(exclude={"chunk_sha256", "signature"}) for h in headers]
    assert fields[0] == fields[1]
    assert fields[0]["weight"] == 250
