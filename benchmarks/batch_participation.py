"""What participation batches cost when sites drop: the share of sites whose input is summed.

    python benchmarks/batch_participation.py                  # 12 sites, 300 rounds per cell
    python benchmarks/batch_participation.py --rounds 50 --json

Each round attempt runs the real site and coordinator machines in memory
(``asagiri.secagg.inmemory.LocalRound``: X25519, Shamir, masks, the sites' policy checks) with
``--sites`` sites, SecAgg+ groups (``secagg.mode: sparse``, the default), ``min_clients`` 3 and the
sites' default policy (``min_participants`` 3).  Every site, independently with probability ``q``,
vanishes at one stage of the round drawn uniformly from the five (key advertisement, sharing,
masked input, consistency, unmasking), as the soak run's dropout model does.  For each ``q`` and
batch size (none, or the enrolled sites cut into batches of at least ``b``,
``FederationConfig.participation_batches``) it reports, over ``--rounds`` attempts:

- ``participation``: the mean share of the enrolled sites whose input is in the sum (0 for an
  attempt that aborted);
- ``aborted``: the share of attempts that aborted;
- ``expected_batches``: the share a batch rule alone would keep, ``(1 - 3q/5)^b`` (a site lost
  before its masked input takes its batch out; one lost later is still summed).

Numbers from this machine go to benchmarks/results/ with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from functools import partial

import numpy as np

from asagiri.config import FederationConfig, PolicyConfig
from asagiri.policy import SitePolicy
from asagiri.secagg.inmemory import STAGES, LocalRound
from asagiri.secagg.server import ServerStage

BEFORE_INPUT = ("advertise", "share", "masked_input")


def one_attempt(n: int, batch_size: int | None, q: float, rng: np.random.Generator, rnd: int) -> tuple[float, bool]:
    cfg = FederationConfig.model_validate({
        "sites": [{"id": i, "public_key": secrets.token_hex(32)} for i in range(1, n + 1)],
        "secagg": {"batch_size": batch_size}, "min_clients": 3,
    })
    batches = cfg.participation_batches()
    sa = cfg.secagg.model_copy(update={"batches": batches})
    fed = LocalRound(ids=list(range(1, n + 1)), dim=64, secagg=sa, rnd=rnd, min_clients=3,
                     policy=partial(SitePolicy, PolicyConfig()))
    drops: dict[str, set[int]] = {}
    for site in fed.ids:
        if rng.random() < q:
            drops.setdefault(STAGES[int(rng.integers(len(STAGES)))], set()).add(site)
    ring = {i: rng.integers(0, 2**32, size=65, dtype=np.uint64).astype(np.uint32) for i in fed.ids}
    server = fed.deliver(ring, drops)
    if server.stage is not ServerStage.DONE:
        return 0.0, True
    return len(server.result.survivors) / n, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[0, 3, 4, 6], help="0: no batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # the sites' refusals of groups that drops left too small
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    rows = []
    for q in args.dropout:
        for b in args.batch_sizes:
            results = [one_attempt(args.sites, b or None, q, rng, r + 1) for r in range(args.rounds)]
            rows.append({
                "sites": args.sites, "dropout": q, "batch_size": b or None, "rounds": args.rounds,
                "participation": round(float(np.mean([p for p, _ in results])), 4),
                "aborted": round(float(np.mean([a for _, a in results])), 4),
                "expected_batches": round((1 - q * len(BEFORE_INPUT) / len(STAGES)) ** (b or 1), 4),
            })
    out = {"command": " ".join(["python", "benchmarks/batch_participation.py", *(argv or sys.argv[1:])]),
           "seconds": round(time.monotonic() - t0, 1), "rows": rows}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'q':>5} {'batch':>6} {'participation':>14} {'aborted':>8} {'(1-3q/5)^b':>11}")
        for r in rows:
            print(f"{r['dropout']:5.2f} {str(r['batch_size'] or '-'):>6} {r['participation']:14.3f} "
                  f"{r['aborted']:8.3f} {r['expected_batches']:11.3f}")
        print(f"({out['seconds']} s; {out['command']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
