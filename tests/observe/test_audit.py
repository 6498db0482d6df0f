"""The signed audit chain catches what it promises to: an edited, deleted, inserted, reordered or
re-signed record, each reported at its line with the reason; and `asagiri audit verify` says so."""

import json

import pytest

from asagiri.cli.main import main
from asagiri.signedlog import AUDIT_DOMAIN, RECEIPT_DOMAIN, SignedLog, read_log, record_hash, verify_log
from asagiri.wire.crypto import Identity

COORDINATOR = Identity.from_seed(bytes(range(32)))
MALLORY = Identity.from_seed(bytes(range(1, 33)))


@pytest.fixture
def log_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = SignedLog(path, COORDINATOR)
    log.append("run_started", first_round=1, resumed=False, model_sha256="0" * 64, config_sha256="1" * 64)
    for rnd in range(1, 5):
        log.append("round_completed", round=rnd, participants=[1, 2, 3], model_sha256=f"{rnd:064x}")
    return path, path.read_text().splitlines()


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def verdict(path, key=COORDINATOR.public):
    good, error = verify_log(path, key)
    return good, (error.line, error.problem.split(":")[0]) if error else None


def resign(rec, identity):
    """What the holder of ``identity`` writes for ``rec``: rehashed and signed."""
    rec["hash"] = record_hash(rec)
    rec["signer"] = identity.public.raw.hex()
    rec["sig"] = identity.sign(AUDIT_DOMAIN + bytes.fromhex(rec["hash"])).hex()
    return json.dumps(rec, sort_keys=True)


def test_an_untouched_log_verifies_and_a_reopened_one_continues_the_chain(log_lines):
    path, _ = log_lines
    assert verdict(path) == (5, None)
    SignedLog(path, COORDINATOR).append("round_completed", round=5)
    assert verdict(path) == (6, None)
    assert [r["seq"] for r in read_log(path)] == [1, 2, 3, 4, 5, 6]


def test_an_edited_record_is_reported_at_its_line(log_lines):
    path, lines = log_lines
    rec = json.loads(lines[2])
    rec["participants"] = [1, 2]
    lines[2] = json.dumps(rec, sort_keys=True)
    write(path, lines)
    assert verdict(path) == (2, (3, "hash does not match the contents"))


def test_an_edit_rehashed_but_not_signable_fails_its_signature(log_lines):
    path, lines = log_lines
    rec = json.loads(lines[2])
    rec["participants"] = [1, 2]
    rec["hash"] = record_hash(rec)
    lines[2] = json.dumps(rec, sort_keys=True)
    write(path, lines)
    assert verdict(path) == (2, (3, "signature does not verify under the given key"))


def test_a_record_resigned_with_another_key_is_reported(log_lines):
    path, lines = log_lines
    rec = json.loads(lines[3])
    rec["model_sha256"] = "f" * 64
    lines[3] = resign(rec, MALLORY)
    write(path, lines)
    assert verdict(path) == (3, (4, "signer is not the given key (signed by another key)"))
    # and a whole log written by another key verifies only under that key
    assert verdict(path, MALLORY.public)[1] == (1, "signer is not the given key (signed by another key)")
    # naming the right signer does not help a signature by another key
    rec = json.loads(lines[3])
    rec["signer"] = COORDINATOR.public.raw.hex()
    lines[3] = json.dumps(rec, sort_keys=True)
    write(path, lines)
    assert verdict(path) == (3, (4, "signature does not verify under the given key"))


def test_a_record_has_one_spelling_signer_and_signature_included(log_lines):
    """``signer`` and ``sig`` are outside the hash: another value in either, with the hash and
    signature still good, would be a second spelling of the record."""
    path, lines = log_lines
    rec = json.loads(lines[1])
    write(path, lines[:1] + [json.dumps({**rec, "signer": rec["signer"].upper()}, sort_keys=True)] + lines[2:])
    assert verdict(path) == (1, (2, "signer is not the given key (signed by another key)"))
    write(path, lines[:1] + [json.dumps({**rec, "sig": rec["sig"].upper()}, sort_keys=True)] + lines[2:])
    assert verdict(path) == (1, (2, "signature is not 64 bytes of hex"))


def test_a_deleted_record_is_reported_where_the_gap_is(log_lines):
    path, lines = log_lines
    write(path, lines[:2] + lines[3:])
    assert verdict(path) == (2, (3, "seq is 4, expected 3"))


def test_an_inserted_record_is_reported(log_lines):
    path, lines = log_lines
    forged = {"kind": "site_refused", "site": 2, "rule": "min_participants", "seq": 3,
              "prev_hash": json.loads(lines[1])["hash"]}
    write(path, lines[:2] + [resign(forged, MALLORY)] + lines[2:])
    assert verdict(path) == (2, (3, "signer is not the given key (signed by another key)"))
    # an old record of this same chain replayed at another place
    write(path, lines[:2] + [lines[0]] + lines[2:])
    assert verdict(path) == (2, (3, "seq is 1, expected 3"))


def test_reordered_records_are_reported(log_lines):
    path, lines = log_lines
    lines[2], lines[3] = lines[3], lines[2]
    write(path, lines)
    assert verdict(path) == (2, (3, "seq is 4, expected 3"))


def test_a_record_moved_with_its_seq_rewritten_breaks_the_link(log_lines):
    path, lines = log_lines
    a, b = json.loads(lines[2]), json.loads(lines[3])
    a["seq"], b["seq"] = 4, 3
    lines[2], lines[3] = json.dumps(b, sort_keys=True), json.dumps(a, sort_keys=True)
    write(path, lines)
    assert verdict(path) == (2, (3, "prev_hash is not the previous record's hash"))


def test_garbage_lines_are_reported_not_raised(log_lines):
    path, lines = log_lines
    for bad, reason in (("{not json", "not JSON"), ("[1, 2]", "not a JSON object"),
                        ('{"seq": 2}', "missing prev_hash, hash, sig, kind"), ("[" * 100_000, "not JSON"),
                        ('{"seq": ' + "9" * 5000 + "}", "not JSON"), ('{"seq": "2"}', "missing prev_hash, hash, sig, kind")):
        write(path, lines[:1] + [bad] + lines[2:])
        assert verdict(path) == (1, (2, reason))
    path.write_bytes(lines[0].encode() + b"\n\xff\xfe\n")
    assert verdict(path) == (1, (2, "not UTF-8"))
    path.write_bytes(lines[0].encode() + b"\n" + b"x" * (2 << 20) + b"\n")
    assert verdict(path) == (1, (2, "longer than 1048576 bytes"))
    rec = json.loads(lines[1])
    rec["seq"] = True  # == 1 in Python, but not an integer
    write(path, [json.dumps(rec, sort_keys=True)] + lines[1:])
    assert verdict(path)[1] == (1, "seq is True, expected 1")


def test_a_second_spelling_of_a_record_is_refused(log_lines):
    """A duplicate key in front of the real one parses to the same record in Python, but another
    reader may take the first value: only the writer's exact form verifies."""
    path, lines = log_lines
    lines[2] = '{"round": 99, ' + lines[2][1:]
    write(path, lines)
    assert verdict(path) == (2, (3, "not in the canonical form (keys sorted, each once)"))


def test_a_receipt_signature_never_stands_for_an_audit_record(tmp_path):
    path = tmp_path / "receipts.jsonl"
    SignedLog(path, COORDINATOR, domain=RECEIPT_DOMAIN).append("round_receipt", round=1)
    assert verify_log(path, COORDINATOR.public, domain=RECEIPT_DOMAIN) == (1, None)
    assert verdict(path) == (0, (1, "signature does not verify under the given key"))


def test_reopening_drops_a_last_line_cut_short_and_refuses_other_damage(log_lines):
    path, lines = log_lines
    path.write_text("\n".join(lines) + "\n" + lines[0][:30])  # a crash in the middle of a write
    log = SignedLog(path, COORDINATOR)
    log.append("round_completed", round=5)
    assert verdict(path) == (6, None)
    write(path, lines[:2] + lines[3:])
    with pytest.raises(ValueError, match="seq is 4, expected 3"):
        SignedLog(path, COORDINATOR)


def test_the_command_reports_the_first_bad_line_and_fails(log_lines, tmp_path, capsys):
    path, lines = log_lines
    key = tmp_path / "coordinator.pub"
    key.write_text(COORDINATOR.public.hex() + "\n")
    assert main(["audit", "verify", str(path.parent), "--key", str(key)]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out
    write(path, lines[:1] + lines[2:])
    assert main(["audit", "verify", str(path.parent), "--key", str(key)]) == 3
    assert f"{path}:2: seq is 3, expected 2" in capsys.readouterr().out
    other = tmp_path / "other.pub"
    other.write_text("zz\n")
    assert main(["audit", "verify", str(path), "--key", str(other)]) == 2
