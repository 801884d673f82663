"""Wire messages: validation of untrusted headers, and the protocol document agrees with code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from secure_fed.errors import ProtocolError
from secure_fed.protocol.messages import (
    MAX_HEADER_BYTES,
    MESSAGE_TYPES,
    Hello,
    encode,
    parse_master_message,
    parse_slave_message,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_every_message_type_and_field_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    for name, cls in MESSAGE_TYPES.items():
        assert re.search(rf"`{name}`", text), f"message type {name!r} missing from protocol.md"
        for field in cls.model_fields:
            assert f"`{field}`" in text, f"field {name}.{field} missing from protocol.md"


def test_round_trip_and_refusals() -> None:
    hello = Hello(protocol=1, software="x", public_context_sha256="0" * 64)
    assert parse_slave_message(encode(hello)) == hello
    bad = [
        b"\x00binary",
        "not json",
        "[1, 2]",
        json.dumps({"type": "hello"}),
        json.dumps({"type": "welcome", "protocol": 1}),  # a master message from a slave
        json.dumps({**hello.model_dump(), "extra": 1}),
        json.dumps({**hello.model_dump(), "protocol": "1"}),
        json.dumps({**hello.model_dump(), "public_context_sha256": "Z" * 64}),
        "x" * (MAX_HEADER_BYTES + 1),
    ]
    for raw in bad:
        with pytest.raises(ProtocolError):
            parse_slave_message(raw)
    with pytest.raises(ProtocolError):
        parse_master_message(encode(hello))


def test_non_finite_numbers_are_refused() -> None:
    raw = ('{"type":"decline","round":1,"nonce":"' + "a" * 32 + '","reason":"x",'
           '"epsilon_spent":NaN,"epsilon_remaining":1}')
    with pytest.raises(ProtocolError):
        parse_slave_message(raw)


def test_an_update_header_of_a_ten_million_parameter_model_fits_the_header_limit() -> None:
    from secure_fed.protocol.messages import UpdateHeader

    chunks = 1222  # 10M values in 8,192-slot bfv-fast ciphertexts
    header = UpdateHeader(round=1, nonce="0" * 32, weight=5, chunk_sha256=["a" * 64] * chunks,
                          chunk_bytes=[122_932] * chunks, weight_source="dp-count",
                          mechanisms=[{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}],
                          epsilon_spent=1.0, delta=1e-5, accountant="prv")
    text = encode(header)
    assert 64 * 1024 < len(text) < MAX_HEADER_BYTES
    assert parse_slave_message(text) == header


def test_plan_sends_dp_only_when_off_and_epsilon_may_be_unbounded() -> None:
    from secure_fed.protocol.messages import Decline, Plan

    plan = Plan(mode="delta", epochs=1, batch_size=8, lr=1.0, momentum=0.0, max_grad_norm=1.0,
                epsilon=3.0, delta=1e-5, rounds_total=2)
    assert "dp" not in json.loads(plan.model_dump_json())  # as a build without the field sent
    assert plan.dp and Plan.model_validate_json(plan.model_dump_json()) == plan
    off = plan.model_copy(update={"dp": False})
    assert json.loads(off.model_dump_json())["dp"] is False
    assert Plan.model_validate_json(off.model_dump_json()).dp is False
    decline = Decline(round=1, nonce="a" * 32, reason="x", epsilon_spent=None,
                      epsilon_remaining=0.0)
    assert parse_slave_message(encode(decline)) == decline  # null: no ε bounds this slave


def test_the_worked_signing_example_of_protocol_md_is_what_the_code_signs() -> None:
    import hashlib

    from secure_fed.protocol.messages import UpdateHeader, signing_bytes

    text = DOC.read_text(encoding="utf-8")
    example = text[text.index("Worked example"):]
    header_json = re.search(r"```json\n(.*?)\n```", example, re.S).group(1)  # type: ignore[union-attr]
    signed = re.search(r"```\n(secure-fed-update-v2\n.*?)\n```", example, re.S).group(1)  # type: ignore[union-attr]
    digest = re.search(r"whose SHA-256 is `([0-9a-f]{64})`", example).group(1)  # type: ignore[union-attr]
    fields = json.loads(header_json)
    fields.pop("signature")
    ours = signing_bytes("demo", UpdateHeader.model_validate(fields))
    assert ours == signed.encode("utf-8")
    assert hashlib.sha256(ours).hexdigest() == digest
    # a change to any stated field changes what is signed
    for change in ({"weight": 518}, {"epsilon_spent": 0.8813}, {"chunk_bytes": [122933]}):
        assert signing_bytes("demo", UpdateHeader.model_validate({**fields, **change})) != ours
