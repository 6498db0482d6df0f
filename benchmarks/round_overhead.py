"""What the runtime adds to a round: a real loopback federation, each round's wall time split into
training, evaluation and everything else, with secure aggregation on and then off.

    python benchmarks/round_overhead.py                    # 4 sites, resnet18 at 64 px, 4 rounds
    python benchmarks/round_overhead.py --rounds 2 --width 16 --json

A coordinator and ``--sites`` site processes (``asagiri.launcher``, as ``asagiri demo`` starts them)
on the bundled chest X-rays resized to ``--size`` px.  For each round:

- ``wall``: from the coordinator's RoundStarted to the next round's (the last round: to its
  RoundCompleted), as its status pipe reports them: selection, training, every secure-aggregation stage, evaluation, the
  checkpoint, the signed records and the round record sent to the sites;
- ``train``: the longest local training of the round, from each site's log ("trained on about N examples (K steps)
  in S s"; the sites train at once, so the slowest is what the round waits for);
- ``evaluate``: the evaluation stage, from ``metrics.jsonl``;
- ``other`` = wall - train - evaluate: selection, key set-up, masking, transport, unmasking,
  checkpoint and audit, with its share of the wall time (the goal: at most 5% with secure
  aggregation on).

Round 1 is reported but left out of the means (it pays the sites' model set-up).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from asagiri.launcher import (
    pinned_site_settings,
    start_coordinator,
    start_site,
    write_federation,
    write_site_config,
)

TRAINED = re.compile(r"round (\d+): trained on about \d+ examples \(\d+ steps\) in ([\d.]+)s")


def run(out: Path, *, secure: bool, sites: int, rounds: int, size: int, width: int) -> list[dict]:
    fed_path, cfg = write_federation(out, sites=sites, rounds=rounds, overrides=[
        "data.dataset=pneumoniamnist", f"data.image_size={size}", "data.partition.scheme=iid", "model.name=resnet18",
        f"model.width={width}", f"secagg.enabled={str(secure).lower()}", f"min_clients={sites}",
        "train.augment=false",
    ])
    (out / "logs").mkdir(exist_ok=True)
    log = open(out / "logs" / "coordinator.log", "ab")
    coordinator, status, port = start_coordinator(fed_path, stdout=log, stderr=log)
    pub = (out / "keys" / "coordinator.pub").read_text().strip()
    procs = []
    for s in range(1, sites + 1):
        settings = pinned_site_settings(cfg, s)
        # the benchmark times training without augmentation: its sites allow that
        settings["policy"] = {**settings.get("policy", {}), "bounds": {"require_augment": "never"}}
        path = write_site_config(out, s, port, pub, settings)
        procs.append(start_site(path, s, "--log-level", "info", log=open(out / "logs" / f"site-{s}.log", "ab")))
    starts: dict[int, float] = {}
    completed: dict[int, float] = {}  # (the status line comes after the checkpoint and the audit record)
    try:
        while (event := status.next(timeout=3600)) is not None:
            if event["event"] == "RoundStarted":
                starts.setdefault(event["round"], time.monotonic())
            elif event["event"] == "RoundCompleted":
                completed[event["record"]["round"]] = time.monotonic()
        assert coordinator.wait(timeout=120) == 0, f"the coordinator failed: see {out / 'logs'}"
    finally:
        for p in [coordinator, *procs]:
            if p.poll() is None:
                p.kill()
    train: dict[int, float] = {}
    for s in range(1, sites + 1):
        for rnd, secs in TRAINED.findall((out / "logs" / f"site-{s}.log").read_text()):
            train[int(rnd)] = max(train.get(int(rnd), 0.0), float(secs))
    metrics = {m["round"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    rows = []
    for rnd in sorted(starts):
        # to the next round's start (the round record sent to the sites included); the last
        # round to its completion (the final test that follows is not a round's)
        wall = starts.get(rnd + 1, completed[rnd]) - starts[rnd]
        evaluate = metrics[rnd]["stage_s"].get("evaluate", 0.0)
        other = wall - train[rnd] - evaluate
        rows.append({"secure": secure, "round": rnd, "wall_s": round(wall, 3), "train_s": train[rnd],
                     "evaluate_s": round(evaluate, 3), "other_s": round(other, 3),
                     "other_share": round(other / wall, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="ResNet-18's base width (64 is the standard network)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="asagiri-overhead-") as tmp:
        for secure in (True, False):
            rows += run(Path(tmp) / ("secure" if secure else "plain"), secure=secure, sites=args.sites,
                        rounds=args.rounds, size=args.size, width=args.width)
    summary = {}
    for secure in (True, False):
        later = [r for r in rows if r["secure"] is secure and r["round"] > 1] or [r for r in rows if r["secure"] is secure]
        summary["secure" if secure else "plain"] = {
            k: round(sum(r[k] for r in later) / len(later), 3) for k in ("wall_s", "train_s", "evaluate_s", "other_s")}
        s = summary["secure" if secure else "plain"]
        s["other_share"] = round(s["other_s"] / s["wall_s"], 4)
    if args.json:
        print(json.dumps({"rounds": rows, "mean_after_round_1": summary}))
    else:
        for r in rows:
            print(f"secure={str(r['secure']):5s} round {r['round']}: wall {r['wall_s']:7.2f}s  train {r['train_s']:6.1f}s  "
                  f"evaluate {r['evaluate_s']:6.2f}s  other {r['other_s']:6.2f}s ({100 * r['other_share']:.1f}%)")
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
