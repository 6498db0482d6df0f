"""``asagiri audit verify RUN_DIR --key coordinator.pub [--receipts FILE --site-key FILE]...``:
check a run's signed audit chain, and compare it with the sites' signed receipts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK

if TYPE_CHECKING:
    from ..wire.crypto import PublicIdentity

__all__ = ["add_parser", "run_audit"]


def add_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="verify a run's signed audit log")
    verbs = a.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("verify", help="check the hash chain and every signature; report the first bad record")
    v.add_argument("run_dir", type=Path, help="the run directory (holding audit.jsonl), or the audit file itself")
    v.add_argument("--key", type=Path, required=True,
                   help="the coordinator's public key file (hex, as `asagiri keygen` writes it), obtained out of band")
    v.add_argument("--receipts", type=Path, action="append", default=[],
                   help="a site's receipts.jsonl (in its state_dir); repeatable, each with its --site-key")
    v.add_argument("--site-key", type=Path, action="append", default=[], help="that site's public key file")
    v.add_argument("--run-id", default=None,
                   help="the run the receipts must cover (default: the one the log's first run_started names)")
    v.add_argument("--models", action="store_true",
                   help="replay the model history: W_0 from the run, then every round's verified sum, checked "
                        "against its survivors' signed vouches, and each model against the log (SPEC §6.9)")


def run_audit(args: argparse.Namespace) -> int:
    from ..observe.audit import check_receipts
    from ..signedlog import verify_log

    path = args.run_dir / "audit.jsonl" if args.run_dir.is_dir() else args.run_dir
    if not path.is_file():
        print(f"error: {path}: no audit log", file=sys.stderr)
        return EXIT_CONFIG
    if len(args.receipts) != len(args.site_key):
        print("error: give each --receipts file its --site-key", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = _public_key(args.key)
        site_keys = [_public_key(k) for k in args.site_key]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    good, error = verify_log(path, key)
    if error is not None:
        print(f"{path}:{error.line}: {error.problem} ({good} records before it verified)")
        return EXIT_FAILED
    print(f"{path}: {good} records, chain intact, every record signed by {key.fingerprint()}")
    failed = False
    if args.models:
        failed |= not _replay(path)
    for receipts, site_key in zip(args.receipts, site_keys, strict=True):
        if not receipts.is_file():
            print(f"error: {receipts}: no such file", file=sys.stderr)
            return EXIT_CONFIG
        check = check_receipts(path, receipts, site_key, key, run_id=args.run_id)
        for problem in check.problems:
            print(problem)
        for note in check.notes:
            print(f"note: {note}")
        failed |= bool(check.problems)
        if not check.problems:
            print(f"{receipts}: {check.checked} receipt(s) of this run, each the coordinator's signed record as the "
                  f"log holds it; the log is pinned up to record {check.pinned}")
    return EXIT_FAILED if failed else EXIT_OK


def _replay(audit: Path) -> bool:
    from ..signedlog import read_log
    from ..site.replay import replay_models

    result = replay_models(audit.parent, read_log(audit))
    for problem in result.problems:
        print(f"models: {problem}")
    if result.rounds:
        keys = ", ".join(f"{i}: {fp}" for i, fp in result.keys.items())
        print(f"models: rounds {result.rounds[0]}-{result.rounds[-1]} ({len(result.rounds)}) replayed from W_0, each "
              f"the server step of a sum every survivor vouched for, and each the model the log records; last "
              f"model {result.final_sha256}; the vouches verified under the site keys {keys} (compare them with "
              f"the sites' keys as you know them)")
    return not result.problems


def _public_key(path: Path) -> PublicIdentity:
    from ..wire.crypto import PublicIdentity

    try:
        return PublicIdentity.from_hex(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a public key file ({exc})") from None
