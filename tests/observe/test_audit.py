"""The audit chain detects what it promises to: edits, deletions, reordering, rehashed edits."""

import hashlib
import json

import pytest

from asagiri.observe.audit import AuditLog, verify_chain


@pytest.fixture
def log_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for rnd in range(1, 5):
        log.append({"round": rnd, "status": "completed", "participants": [1, 2, 3], "model_sha256": f"{rnd:064x}"})
    return path, path.read_text().splitlines()


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_an_untouched_log_verifies(log_lines):
    path, _ = log_lines
    assert verify_chain(path) == []
    AuditLog(path).append({"round": 5, "status": "completed"})  # a reopened log continues the chain
    assert verify_chain(path) == []


def test_an_edited_record_is_reported_at_its_line(log_lines):
    path, lines = log_lines
    rec = json.loads(lines[1])
    rec["participants"] = [1, 2]
    lines[1] = json.dumps(rec, sort_keys=True)
    write(path, lines)
    assert [(e.line, e.problem) for e in verify_chain(path)] == [(2, "record hash does not match its contents")]


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(log_lines):
    path, lines = log_lines
    rec = json.loads(lines[1])
    rec["status"] = "aborted"
    del rec["hash"]
    rec["hash"] = hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    lines[1] = json.dumps(rec, sort_keys=True)
    write(path, lines)
    assert [(e.line, e.problem) for e in verify_chain(path)] == [(3, "prev_hash does not match the previous record")]


def test_a_deleted_record_is_reported(log_lines):
    path, lines = log_lines
    write(path, lines[:1] + lines[2:])
    assert [e.line for e in verify_chain(path)] == [2]


def test_reordered_records_are_reported(log_lines):
    path, lines = log_lines
    lines[1], lines[2] = lines[2], lines[1]
    write(path, lines)
    assert {e.line for e in verify_chain(path)} == {2, 3, 4}


def test_a_line_that_is_not_json_is_reported(log_lines):
    path, lines = log_lines
    lines[2] = lines[2][:-5]
    write(path, lines)
    errors = verify_chain(path)
    assert (3, "not JSON") in [(e.line, e.problem) for e in errors]
