"""Secure aggregation overhead per round, in-process (all sites and the coordinator in one process,
one after another, no network), against plain aggregation done the same way.

    python benchmarks/secagg_overhead.py --clients 10 --dim 1000000 --graph sparse --json
    python benchmarks/secagg_overhead.py --table            # the grid recorded in docs/benchmarks.md
    python benchmarks/secagg_overhead.py --tcp --clients 5  # real processes over loopback TCP

Plain: each site scales its float32 update by its sample count (the sum-ready form the runtime
sends) and the coordinator adds it into a float64 running sum.  Secure: the full protocol of
``asagiri.secagg`` (key advertisement, Shamir shares, quantisation, masking, consistency check,
unmasking), with ``--dropout`` of the sites vanishing after sharing keys, which is the most
expensive case for the coordinator (their pairwise masks must be rebuilt).

Reported (medians over ``--repeat``):
- ``plain_s`` and ``secagg_s``, the whole round;
- ``stages``: seconds per stage, split into ``client_*`` (summed over sites) and ``server_*``;
- ``prg_floor_s``: the mask bytes the round generated divided by the keystream throughput
  measured in the same run;
- ``upload_bytes_per_client`` / ``plain_upload_bytes_per_client``: encoded message bytes a
  site sends (all its secure-aggregation messages, against one ``FitRes``);
- ``server_peak_bytes``: peak memory allocated inside the coordinator's machine, measured with
  tracemalloc in one extra round that is not timed (tracing slows every allocation);
- ``peak_rss_bytes``: the process's peak resident set.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import tracemalloc
from collections import defaultdict
from functools import partial

import numpy as np

from asagiri.config import PolicyConfig, SecAggConfig
from asagiri.config.spec import SpecStrategy
from asagiri.policy import Refusal, SitePolicy
from asagiri.secagg import verify
from asagiri.secagg.binding import params_digest
from asagiri.secagg.inmemory import LocalRound
from asagiri.secagg.prg import DEFAULT_PRG, PRGS, expand_into
from asagiri.secagg.quantize import QuantPlan
from asagiri.secagg.rules import sharing_group
from asagiri.secagg.server import ServerStage
from asagiri.site.trajectory import next_model
from asagiri.wire import codec
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import FitRes

RUN = "bench"
CLIENT_STAGE = {
    "SecAggStart": "client_advertise",
    "KeyRoster": "client_share",
    "ShareDelivery": "client_mask",
    "ConsistencyCheck": "client_consistency",
    "UnmaskRequest": "client_unmask",
    "SumAnnounce": "client_vouch",
    "SumProof": "client_verify",
}
# The verified sum's own stage (SPEC §6.8): the sites' vouches and checks and the coordinator's
# check; its hash of the sum and the challenge, made as UNMASK closes, are timed apart in run().
VERIFY_STAGES = ("client_vouch", "client_verify", "server_verify")


def message_bytes(msg) -> int:
    header, arrays = codec.encode_header(msg)
    return len(header) + sum(a.nbytes for a in arrays)


def plain_round(updates: list[tuple[np.ndarray, int]]) -> tuple[float, int]:
    t = time.perf_counter()
    acc = np.zeros(updates[0][0].size, dtype=np.float64)
    total = 0
    for delta, n in updates:
        sent = delta * np.float32(n)  # site side: the sum-ready update
        acc += sent  # coordinator side
        total += n
    elapsed = time.perf_counter() - t
    up = message_bytes(FitRes(1, 1, {"u": updates[0][0]}, 1, {}))
    return elapsed, up


def secure_round(updates, identities, *, secagg, dropout, repeat_index, trace=False):
    n = len(updates)
    ids = list(range(1, n + 1))
    d = updates[0][0].size
    # Set-up outside the timed round: the machines, and each site hashing the global model it was
    # sent into the round digest (measured on its own as "bind_s" in run()).
    local = LocalRound(ids, dim=d, secagg=secagg, identities=identities, run_id=RUN, rnd=1 + repeat_index,
                       policy=partial(SitePolicy, PolicyConfig(min_participants=2, min_group=2)))
    server, clients, plan = local.server, local.clients, local.plan
    n_drop = int(round(dropout * n))
    rng = np.random.default_rng(repeat_index)
    drop = set(rng.choice(ids, size=n_drop, replace=False).tolist()) if n_drop else set()
    stages: dict[str, float] = defaultdict(float)
    upload: dict[int, int] = defaultdict(int)
    # The coordinator's memory: what it keeps between calls (its running sum from the start,
    # shares, keys) plus the transient peak inside each call.  Sites' allocations, made outside
    # its calls, are not counted.
    server_peak = 0
    retained = server.sum.nbytes if trace else 0
    t_round = time.perf_counter()
    queue = list(server.start())
    dead: set[int] = set()

    def server_call(fn, *args):
        nonlocal server_peak, retained
        if trace:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        stage = server.stage.value  # the call's work belongs to the stage it was made in
        t = time.perf_counter()
        out = fn(*args)
        stages[f"server_{stage}"] += time.perf_counter() - t
        if trace:
            current, peak = tracemalloc.get_traced_memory()
            server_peak = max(server_peak, retained + peak - base)
            retained += current - base
        return out

    while queue or not server.finished:  # after DONE, the sites check the SumProof
        if not queue:
            queue = server_call(server.stage_timed_out)
            continue
        out = queue.pop(0)
        if server.stage is ServerStage.MASKED_INPUT and drop - dead:
            for s in sorted(drop - dead):  # vanish after sharing keys, before sending input
                dead.add(s)
                queue += server_call(server.site_lost, s)
        if out.site in dead:
            continue
        client = clients[out.site]
        name = CLIENT_STAGE[type(out.msg).__name__]
        t = time.perf_counter()
        try:
            replies = client.receive(out.msg)
            if client.stage.value == "ready":
                replies += client.set_input(*updates[out.site - 1], trained_on=(local.params.params_digest, {}))
        except Refusal:
            replies = []  # the site leaves the round, as the runtime's sites do; the stage times out
        stages[name] += time.perf_counter() - t
        for reply in replies:
            upload[out.site] += message_bytes(reply)
            queue += server_call(server.receive, out.site, reply)
    elapsed = time.perf_counter() - t_round
    if server.stage is not ServerStage.DONE:
        return elapsed, dict(stages), 0, 0, server_peak, server.abort_reason
    # Mask bytes generated: each surviving site's self mask + its pairwise masks; the server's
    # self-mask removals and rebuilt pairwise masks of the dropped.
    graph = server.nbrs
    pairs = sum(len(server.delivered_from[u]) for u in server.u2 if u not in drop)
    server_pairs = sum(1 for v in drop for u in graph[v] if u not in drop)
    noise = len(server.u3)  # stochastic-rounding noise, 2 bytes per value
    ring_bytes = plan.bits // 8
    mask_bytes = (d + 1) * ring_bytes * (len(server.u3) + pairs + len(server.u3) + server_pairs) + noise * d * 2
    full_upload = [upload[i] for i in ids if i not in drop]
    return elapsed, dict(stages), mask_bytes, statistics.median(full_upload), server_peak, None


def keystream_throughput(prg: str, nbytes: int = 64 << 20) -> float:
    """Bytes per second of one PRG stream written into a buffer (best of 3)."""
    buf = np.empty(nbytes // 4, dtype=np.uint32)
    expand_into(b"warm", buf, prg)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        expand_into(b"measure", buf, prg)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def tcp_round_times(clients: int, width: int, rounds: int, secure: bool, root) -> dict:
    """Median round time of a real federation (separate processes, loopback TCP), from metrics.jsonl."""
    import socket
    import subprocess

    from asagiri.launcher import (
        pinned_site_settings,
        start_coordinator,
        start_site,
        write_federation,
        write_site_config,
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [
        f"listen.port={port}", "data.dataset=synthetic", "data.synthetic_samples=64", "data.partition.scheme=iid",
        f"model.width={width}", "train.augment=false", f"secagg.enabled={str(secure).lower()}",
        f"min_clients={min(clients, 3)}",
    ]
    fed_path, cfg = write_federation(root, sites=clients, rounds=rounds, overrides=overrides)
    pub = (root / "keys" / "coordinator.pub").read_text().strip()
    coord, status, port = start_coordinator(fed_path, "--log-level", "warning", stdout=subprocess.DEVNULL, stderr=None)
    def settings(i: int) -> dict:  # the benchmark trains without augmentation: its sites allow that
        out = pinned_site_settings(cfg, i)
        out["policy"] = {**out.get("policy", {}), "bounds": {"require_augment": "never"}}
        return out

    sites = [start_site(write_site_config(root, i, port, pub, settings(i)), i, "--log-level", "warning", log=None)
             for i in range(1, clients + 1)]
    status.until("FederationEnded", timeout=600)
    coord.wait(timeout=600)
    status.close()
    for site in sites:
        site.wait(timeout=60)
    recs = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    params = sum(v.size for v in _initial(cfg).values())
    return {"round_s": statistics.median(r["duration_s"] for r in recs[1:] or recs), "params": params}


def _initial(cfg):  # type: ignore[no-untyped-def]
    from asagiri.initial import initial_params

    return initial_params(cfg)


def tcp_mode(clients: int, width: int, rounds: int) -> dict:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        plain = tcp_round_times(clients, width, rounds, False, Path(tmp) / "plain")
        secure = tcp_round_times(clients, width, rounds, True, Path(tmp) / "secure")
    return {
        "mode": "tcp", "clients": clients, "params": plain["params"], "rounds": rounds,
        "plain_round_s": round(plain["round_s"], 3), "secagg_round_s": round(secure["round_s"], 3),
        "ratio": round(secure["round_s"] / plain["round_s"], 2),
    }


def mask_generation_ratio(dim: int, prg: str, streams: int = 3) -> float:
    """Masking throughput (keystream + ring adds, block-wise) over raw keystream throughput, same bytes."""
    from asagiri.secagg.masking import add_masks

    vec = np.zeros(dim + 1, dtype=np.uint32)
    seeds = [(1 if i % 2 else -1, bytes([i]) * 32) for i in range(streams)]
    add_masks(vec, None, seeds, prg=prg)
    t = time.perf_counter()
    add_masks(vec, None, seeds, prg=prg)
    masked = time.perf_counter() - t
    buf = np.empty(dim + 1, dtype=np.uint32)
    t = time.perf_counter()
    for _, seed in seeds:
        expand_into(seed, buf, prg)
    raw = time.perf_counter() - t
    return raw / masked


def warm_up(plan: QuantPlan, prg: str) -> None:
    """Compile the numba kernels (or load them from numba's cache) before anything is timed."""
    from asagiri.secagg.kernels import warm
    from asagiri.secagg.quantize import quantize

    warm(plan.bits)
    quantize(np.zeros(8, dtype=np.float32), 1, plan, noise_seed=bytes(32), masks=[(1, bytes(32)), (-1, bytes(32))],
             prg=prg)


def run(clients: int, dim: int, dropout: float, graph: str, repeat: int, shares: int | None,
        threshold: int | None, prg: str = DEFAULT_PRG) -> dict:
    rng = np.random.default_rng(0)
    updates = [(rng.normal(0, 0.01, dim).astype(np.float32), int(rng.integers(100, 1000))) for _ in range(clients)]
    identities = {i: Identity.generate() for i in range(1, clients + 1)}
    # The runtime's own policy: shares None picks about 2 log2 n, threshold None a majority.
    secagg = SecAggConfig(mode=graph, shares=shares, threshold=threshold, clip=2.0, max_samples_per_site=20_000,
                          prg=prg)
    degree, thr = sharing_group(secagg, clients)
    plan = QuantPlan.plan(bits=32, clip=2.0, max_samples=20_000, max_sites=clients)
    plain, secure, stage_runs, floors, uploads = [], [], [], [], []
    plain_up = 0
    warm_up(plan, prg)
    throughput = keystream_throughput(prg)
    for r in range(repeat):
        p, plain_up = plain_round(updates)
        plain.append(p)
        s, stages, mask_bytes, up, peak, aborted = secure_round(
            updates, identities, secagg=secagg, dropout=dropout, repeat_index=r,
        )
        if aborted:
            return {"clients": clients, "dim": dim, "dropout": dropout, "graph": graph, "shares": shares,
                    "threshold": threshold, "aborted": aborted}
        secure.append(s)
        stage_runs.append(stages)
        floors.append(mask_bytes / throughput)
        uploads.append(up)
    # Memory in one more round, traced: tracemalloc slows every allocation, so it never runs
    # while a round is being timed.
    tracemalloc.start()
    *_, peak, _ = secure_round(updates, identities, secagg=secagg, dropout=dropout, repeat_index=repeat,
                               trace=True)
    tracemalloc.stop()
    keys = sorted({k for st in stage_runs for k in st})
    model = {"w": updates[0][0]}
    t = time.perf_counter()
    params_digest(model)
    bind_s = time.perf_counter() - t
    total = np.zeros(dim + 1, dtype=plan.dtype)
    t = time.perf_counter()
    next_model(model, None, total, plan, SpecStrategy(), clients)
    derive_s = time.perf_counter() - t  # a site's step to the next model from a verified sum (SPEC §6.9)
    t = time.perf_counter()
    seed = verify.challenge_seed(b"ctx", verify.sum_digest(total), list(range(clients)))
    verify.challenge(seed, dim + 1)
    announce_s = time.perf_counter() - t  # the coordinator's, inside server_unmask
    verify_s = statistics.median(sum(st.get(k, 0.0) for k in VERIFY_STAGES) for st in stage_runs) + announce_s
    result = {
        "clients": clients,
        "dim": dim,
        "dropout": dropout,
        "graph": graph,
        "prg": prg,
        "group": None if degree is None else degree + 1,
        "threshold_used": thr,
        "repeat": repeat,
        "plain_s": round(statistics.median(plain), 5),
        "secagg_s": round(statistics.median(secure), 5),
        "ratio_to_plain": round(statistics.median(secure) / statistics.median(plain), 2),
        "prg_floor_s": round(statistics.median(floors), 5),
        "bind_s_per_site": round(bind_s, 5),  # hashing the global model into the round digest
        "derive_s_per_site": round(derive_s, 5),
        "verify_s": round(verify_s, 5),  # the verified sum's stage, all sites and the coordinator
        "verify_share": round(verify_s / statistics.median(secure), 4),
        "keystream_GBps": round(throughput / 1e9, 2),
        "stages": {k: round(statistics.median(st.get(k, 0.0) for st in stage_runs), 5) for k in keys},
        "mask_vs_keystream": round(mask_generation_ratio(dim, prg), 3),
        "upload_bytes_per_client": int(statistics.median(uploads)),
        "plain_upload_bytes_per_client": plain_up,
        "upload_ratio": round(statistics.median(uploads) / plain_up, 4),
        "server_peak_bytes": int(peak),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return result


def markdown(path: str) -> str:
    """The docs/benchmarks.md table from a --table JSONL file."""
    rows = [json.loads(line) for line in open(path)]
    out = ["| n | d | dropout | graph (group) | plain s | secure s | secure / plain | PRG floor s | "
           "upload / float32 | coordinator peak MB |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for r in rows:
        if "aborted" in r:
            graph = f"sparse ({r['shares'] or 'default'} shares)"
            out.append(f"| {r['clients']} | {r['dim']:.0e} | {r['dropout']} | {graph} | | | **aborted**: {r['aborted']} | | | |")
            continue
        graph = "complete" if r["group"] is None else f"sparse ({r['group']})"
        if r.get("prg", DEFAULT_PRG) != DEFAULT_PRG:
            graph += f", {r['prg']}"
        key = (r["clients"], r["dim"], r["dropout"], graph, r.get("group"))
        if key in seen:
            continue  # sparse with a group as large as the round is the complete graph
        seen.add(key)
        out.append(
            f"| {r['clients']} | {r['dim']:.1e} | {r['dropout']} | {graph} | {r['plain_s']:.4f} | {r['secagg_s']:.3f} "
            f"| {r['ratio_to_plain']:.1f} | {r['prg_floor_s']:.3f} | {r['upload_ratio']:.4f} | {r['server_peak_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--dim", type=float, default=1e6)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--graph", choices=["complete", "sparse"], default="sparse")
    p.add_argument("--shares", type=int, default=None,
                   help="sparse: size of each sharing group, the site included (default: the runtime's, ~2 log2 n)")
    p.add_argument("--threshold", type=int, default=None, help="shares needed to reconstruct (default: majority)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prg", choices=PRGS, default=DEFAULT_PRG, help="the mask PRG (secagg.prg)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--table", action="store_true",
                   help="run the grid of docs/benchmarks.md (n x d x dropout, sparse 2-of-3; complete for small n), "
                        "printing one JSON line per setting")
    p.add_argument("--tcp", action="store_true",
                   help="instead: a real federation over loopback TCP (separate processes), secure vs plain")
    p.add_argument("--width", type=int, default=32, help="--tcp: SmallCNN width (32: 93k parameters)")
    p.add_argument("--rounds", type=int, default=4, help="--tcp: rounds per run (the first is not counted)")
    p.add_argument("--markdown", metavar="JSONL", help="render a --table output file as the docs table")
    args = p.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    if args.tcp:
        print(json.dumps(tcp_mode(args.clients, args.width, args.rounds), indent=None if args.json else 2))
        return
    if args.table:
        for dim in (100_000, 1_000_000, 11_000_000):
            for clients in (4, 10, 25, 100):
                for dropout in (0.0, 0.1, 0.3):
                    repeat = 3 if dim * clients <= 25_000_000 else 1
                    graphs = ["sparse"] + (["complete"] if clients <= 25 and dim <= 1_000_000 else [])
                    for graph in graphs:
                        res = run(clients, dim, dropout, graph, repeat, args.shares, args.threshold, args.prg)
                        print(json.dumps(res), flush=True)
                        if graph == "sparse" and dropout >= 0.3 and clients > 10:
                            # 30% random dropout exceeds a default group's tolerance (group - t) now
                            # and then; a group about twice as large holds.
                            default_group = sharing_group(SecAggConfig(), clients)[0] or clients - 1
                            bigger = min(clients, 2 * (default_group + 1) + 1)
                            print(json.dumps(run(clients, dim, dropout, graph, repeat, bigger, None, args.prg)),
                                  flush=True)
        # The settings measured for Flower 1.42's SecAgg+ (sparse 2-of-3, no dropout).
        for clients, dim in ((10, 1_000_000), (25, 11_000_000)):
            for prg in PRGS:
                print(json.dumps(run(clients, dim, 0.0, "sparse", 3, 3, 2, prg)), flush=True)
        return
    result = run(args.clients, int(args.dim), args.dropout, args.graph, args.repeat, args.shares, args.threshold,
                 args.prg)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
