"""The signed, hash-chained audit log and its independent verifier, on real files and keys."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fed.audit.log import AuditLog, genesis_data
from secure_fed.audit.verify import (
    ZERO_HASH,
    canonical_bytes,
    read_verified_records,
    record_hash,
    verify_log,
)
from secure_fed.errors import AuditError
from secure_fed.identity.certificates import (
    certificate_fingerprint,
    generate_ca,
    issue_certificate,
    sign,
    verify_signature,
)


class Federation:
    def __init__(self, key_type: str = "ec") -> None:
        kt: Any = key_type
        self.ca_cert, self.ca_key = generate_ca("fed-audit", key_type=kt)
        self.master_cert, self.master_key = issue_certificate(
            self.ca_cert, self.ca_key, "master", role="master", key_type=kt
        )
        self.slave_cert, self.slave_key = issue_certificate(
            self.ca_cert, self.ca_key, "clinic-a", role="slave", key_type=kt
        )
        self.genesis = genesis_data(
            "fed-audit", ca_cert_pem=self.ca_cert, master_cert_pem=self.master_cert,
            config_sha256="ab" * 32,
        )


@pytest.fixture(scope="module")
def fed() -> Federation:
    return Federation()


def _open(fed: Federation, path: Path) -> AuditLog:
    return AuditLog.open(path, signing_key_pem=fed.master_key, genesis=fed.genesis)


def _write_log(fed: Federation, path: Path, rounds: int = 4) -> AuditLog:
    log = _open(fed, path)
    for number in range(1, rounds + 1):
        log.append("round_committed", {"round": number, "slaves": ["clinic-a", "clinic-b"],
                                       "epsilon": {"clinic-a": 0.25 * number}})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_records_are_chained_signed_and_canonical(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with _write_log(fed, path, rounds=2) as log:
        assert log.records == 3
        head = log.head
    lines = _lines(path)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert [r["event"] for r in records] == ["federation", "round_committed", "round_committed"]
    genesis = records[0]["data"]
    assert genesis["federation_id"] == "fed-audit"
    assert genesis["ca_fingerprint"] == certificate_fingerprint(fed.ca_cert)
    assert genesis["ca_certificate"] == fed.ca_cert.decode()
    assert genesis["master_certificate"] == fed.master_cert.decode()
    assert genesis["config_sha256"] == "ab" * 32
    assert records[0]["prev"] == ZERO_HASH
    for previous, line, record in zip(lines, lines[1:], records[1:], strict=False):
        assert record["prev"] == hashlib.sha256(previous.rstrip(b"\n")).hexdigest()
        assert line.rstrip(b"\n") == canonical_bytes(record)
    for record in records:
        unsigned = {k: v for k, v in record.items() if k != "sig"}
        verify_signature(fed.master_cert, canonical_bytes(unsigned),
                         base64.b64decode(record["sig"]))
        moment = dt.datetime.fromisoformat(record["time"])
        assert moment.utcoffset() == dt.timedelta(0)
    assert head == record_hash(records[-1])

    report = verify_log(path, ca_cert_pem=fed.ca_cert)
    assert (report.ok, report.records, report.first_error) == (True, 3, None)
    assert report.head == head and report.federation_id == "fed-audit"
    assert read_verified_records(path)[2]["data"]["epsilon"] == {"clinic-a": 0.5}


def test_resume_continues_the_chain(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(fed, path, rounds=2).close()
    with _open(fed, path) as log:
        assert log.records == 3
        record = log.append("slave_joined", {"slave": "clinic-c"})
    assert record["seq"] == 3
    assert verify_log(path).records == 4
    assert len(_lines(path)) == 4  # the genesis was not written twice


def test_append_refuses_non_json_and_bad_events(fed: Federation, tmp_path: Path) -> None:
    with _open(fed, tmp_path / "audit.jsonl") as log:
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(AuditError, match="not plain JSON"):
                log.append("round_committed", {"epsilon": bad})
        with pytest.raises(AuditError, match="not plain JSON"):
            log.append("round_committed", {"when": dt.datetime.now()})
        with pytest.raises(AuditError, match="string keys"):
            log.append("round_committed", {1: "a"})  # type: ignore[dict-item]
        with pytest.raises(AuditError, match="invalid audit event name"):
            log.append("Round Committed", {})
        with pytest.raises(AuditError, match="reserved for the first record"):
            log.append("federation", fed.genesis)
        with pytest.raises(AuditError, match="more than the limit"):
            log.append("blob", {"x": "a" * (1 << 20)})
        assert log.records == 1
        record = log.append("round_committed", {"shape": (2, 3)})
        assert record["data"] == {"shape": [2, 3]}  # tuples are written as JSON lists
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_partial_last_line_is_truncated_with_a_warning(
    fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(fed, path, rounds=2).close()
    intact = path.read_bytes()
    # A crash in the middle of an append leaves half a record without its newline.
    with _open(fed, tmp_path / "scratch.jsonl") as other:
        cut = canonical_bytes(other.append("round_committed", {"round": 3}))[:57]
    path.write_bytes(intact + cut)

    report = verify_log(path)
    assert report.ok and report.partial_tail and report.records == 3

    with caplog.at_level(logging.WARNING, logger="secure_fed.audit.log"):
        log = _open(fed, path)
    assert "partial record (57 bytes" in caplog.text
    assert path.read_bytes() == intact
    with log:
        assert log.append("round_committed", {"round": 3})["seq"] == 3
    report = verify_log(path, ca_cert_pem=fed.ca_cert)
    assert report.ok and not report.partial_tail and report.records == 4


def test_partial_genesis_is_dropped_and_rewritten(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"data":{"federation_id":"fed-au')
    with _open(fed, path) as log:
        assert log.records == 1
    assert verify_log(path).ok


def test_missing_final_newline_is_completed(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(fed, path, rounds=1).close()
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert verify_log(path).ok
    with _open(fed, path) as log:
        log.append("round_committed", {"round": 2})
    assert verify_log(path).records == 3


def _tampered(fed: Federation, path: Path, edit: Any) -> tuple[int, str]:
    _write_log(fed, path, rounds=4).close()
    lines = _lines(path)
    path.write_bytes(b"".join(edit(lines)))
    report = verify_log(path, ca_cert_pem=fed.ca_cert)
    assert not report.ok
    assert report.first_error is not None
    return report.first_error


def _edit_epsilon(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[2])
    record["data"]["epsilon"]["clinic-a"] = 0.01
    return [*lines[:2], canonical_bytes(record) + b"\n", *lines[3:]]


def test_edited_record_is_detected(fed: Federation, tmp_path: Path) -> None:
    line, reason = _tampered(fed, tmp_path / "audit.jsonl", _edit_epsilon)
    assert line == 3 and "signature does not verify" in reason


def test_whitespace_edit_is_detected(fed: Federation, tmp_path: Path) -> None:
    def edit(lines: list[bytes]) -> list[bytes]:
        return [*lines[:1], lines[1].replace(b'"round":1', b'"round": 1'), *lines[2:]]

    line, reason = _tampered(fed, tmp_path / "audit.jsonl", edit)
    assert line == 2 and "canonical form" in reason


def test_deleted_record_is_detected(fed: Federation, tmp_path: Path) -> None:
    line, reason = _tampered(fed, tmp_path / "audit.jsonl", lambda ls: [*ls[:2], *ls[3:]])
    assert line == 3 and "seq is 3, expected 2" in reason


def test_inserted_copy_is_detected(fed: Federation, tmp_path: Path) -> None:
    line, reason = _tampered(fed, tmp_path / "audit.jsonl",
                             lambda ls: [*ls[:3], ls[2], *ls[3:]])
    assert line == 4 and "seq is 2, expected 3" in reason


def test_inserted_forgery_is_detected(fed: Federation, tmp_path: Path) -> None:
    """A record with the right seq and prev, signed by a slave's key instead of the master's."""

    def edit(lines: list[bytes]) -> list[bytes]:
        previous = json.loads(lines[-1])
        forged: dict[str, Any] = {
            "seq": previous["seq"] + 1, "time": previous["time"], "event": "budget_reset",
            "data": {"slave": "clinic-a"}, "prev": hashlib.sha256(lines[-1][:-1]).hexdigest(),
        }
        forged["sig"] = base64.b64encode(sign(fed.slave_key, canonical_bytes(forged))).decode()
        return [*lines, canonical_bytes(forged) + b"\n"]

    line, reason = _tampered(fed, tmp_path / "audit.jsonl", edit)
    assert line == 6 and "signature does not verify" in reason


def test_reordered_records_are_detected(fed: Federation, tmp_path: Path) -> None:
    line, reason = _tampered(fed, tmp_path / "audit.jsonl",
                             lambda ls: [ls[0], ls[2], ls[1], *ls[3:]])
    assert line == 2 and "seq is 2, expected 1" in reason


def test_cut_off_tail_is_detected_with_a_pinned_head(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _write_log(fed, path, rounds=4)
    published = log.head
    log.close()
    assert verify_log(path, pinned_head=published).ok
    path.write_bytes(b"".join(_lines(path)[:3]))
    assert verify_log(path).ok  # the chain alone cannot tell
    report = verify_log(path, pinned_head=published)
    assert not report.ok and report.first_error is not None
    assert "cut off the end" in report.first_error[1]


def test_log_of_another_ca_is_refused(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(fed, path, rounds=1).close()
    other_ca, _ = generate_ca("fed-other")
    report = verify_log(path, ca_cert_pem=other_ca)
    assert not report.ok and report.first_error is not None
    assert report.first_error[0] == 1 and "another federation's CA" in report.first_error[1]


def test_garbage_and_empty_logs_do_not_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    assert verify_log(path).first_error == (
        1, "log is empty: expected a first record with event 'federation'")
    path.write_bytes(b'{"seq": NaN}\n')
    report = verify_log(path)
    assert not report.ok and report.first_error is not None
    assert "NaN" in report.first_error[1]
    with pytest.raises(AuditError, match="cannot read audit log"):
        verify_log(tmp_path / "missing.jsonl")
    with pytest.raises(AuditError, match="cannot parse the CA certificate"):
        verify_log(path, ca_cert_pem=b"-----BEGIN CERTIFICATE-----\n")


def test_open_refuses_a_tampered_log(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(fed, path, rounds=3).close()
    path.write_bytes(b"".join(_edit_epsilon(_lines(path))))
    with pytest.raises(AuditError, match="does not verify at line 3"):
        _open(fed, path)
    with pytest.raises(AuditError, match="does not verify at line 3"):
        read_verified_records(path)


def test_open_refuses_wrong_key_other_federation_and_second_writer(
    fed: Federation, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    with pytest.raises(AuditError, match="does not belong to the master certificate"):
        AuditLog.open(path, signing_key_pem=fed.slave_key, genesis=fed.genesis)
    with pytest.raises(AuditError, match="lacks the string field 'ca_fingerprint'"):
        AuditLog.open(path, signing_key_pem=fed.master_key,
                      genesis={"federation_id": "x", "master_certificate": "y"})
    log = _open(fed, path)
    with pytest.raises(AuditError, match="open in another process"):
        _open(fed, path)
    log.close()
    with pytest.raises(AuditError, match="is closed"):
        log.append("round_committed", {})
    renewed_cert, renewed_key = issue_certificate(fed.ca_cert, fed.ca_key, "master",
                                                  role="master")
    renewed = genesis_data("fed-audit", ca_cert_pem=fed.ca_cert, master_cert_pem=renewed_cert)
    with pytest.raises(AuditError, match="another master certificate.*keep using"):
        AuditLog.open(path, signing_key_pem=renewed_key, genesis=renewed)
    with pytest.raises(AuditError, match="not plain JSON"):
        AuditLog.open(tmp_path / "nan.jsonl", signing_key_pem=fed.master_key,
                      genesis={**fed.genesis, "epsilon": float("nan")})
    _open(fed, tmp_path / "nan.jsonl").close()  # the failed open released its lock
    other = Federation()
    with pytest.raises(AuditError, match="started with another ca fingerprint"):
        AuditLog.open(path, signing_key_pem=other.master_key, genesis=other.genesis)


def test_ed25519_master_and_injected_clock(tmp_path: Path) -> None:
    fed = Federation("ed25519")
    moment = dt.datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, signing_key_pem=fed.master_key, genesis=fed.genesis,
                       clock=lambda: moment) as log:
        record = log.append("round_committed", {"round": 1})
    assert record["time"] == "2026-03-04T03:06:07.890000+00:00"
    assert len(base64.b64decode(record["sig"])) == 64
    assert verify_log(path, ca_cert_pem=fed.ca_cert).ok


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=25, deadline=None)
@given(payloads=st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4),
                         min_size=1, max_size=3))
def test_any_json_data_round_trips_and_verifies(
    fed: Federation, tmp_path_factory: pytest.TempPathFactory, payloads: list[dict[str, Any]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "audit.jsonl"
    with _open(fed, path) as log:
        written = [log.append("measurement", payload) for payload in payloads]
    assert verify_log(path).records == len(payloads) + 1
    assert read_verified_records(path)[1:] == written


def test_slave_connected_records_the_presented_certificate(fed: Federation, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with _open(fed, path) as log:
        record = log.append_slave_connected("clinic-a", x509.load_pem_x509_certificate(
            fed.slave_cert))
        bare = log.append_slave_connected("clinic-b", None)
    assert record["event"] == "slave_connected"
    assert record["data"] == {"slave": "clinic-a", "certificate": fed.slave_cert.decode()}
    assert bare["data"] == {"slave": "clinic-b"}
    assert read_verified_records(path, ca_cert_pem=fed.ca_cert)[1] == record


def test_genesis_ca_certificate_must_match_its_fingerprint(
    fed: Federation, tmp_path: Path
) -> None:
    other_ca, _ = generate_ca("fed-other")
    with pytest.raises(AuditError, match="does not match its ca_fingerprint"):
        AuditLog.open(tmp_path / "audit.jsonl", signing_key_pem=fed.master_key,
                      genesis={**fed.genesis, "ca_certificate": other_ca.decode()})
    with pytest.raises(AuditError, match="ca_certificate is not usable"):
        AuditLog.open(tmp_path / "audit.jsonl", signing_key_pem=fed.master_key,
                      genesis={**fed.genesis, "ca_certificate": "not a certificate"})
    other = Federation()  # its master certificate was not issued by fed's CA
    with pytest.raises(AuditError, match="ca_certificate is not usable.*was not issued by"):
        AuditLog.open(tmp_path / "audit.jsonl", signing_key_pem=other.master_key,
                      genesis={**other.genesis, "ca_certificate": fed.ca_cert.decode(),
                               "ca_fingerprint": certificate_fingerprint(fed.ca_cert)})
    # A log started before CA certificates were recorded still opens and verifies.
    older = {k: v for k, v in fed.genesis.items() if k != "ca_certificate"}
    path = tmp_path / "older.jsonl"
    AuditLog.open(path, signing_key_pem=fed.master_key, genesis=older).close()
    with _open(fed, path) as log:  # resumed by a master that records the CA certificate
        assert log.records == 1
    assert verify_log(path, ca_cert_pem=fed.ca_cert).ok
