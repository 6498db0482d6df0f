"""Vectors of SPEC §6: Shamir sharing, quantisation and masking, the round binding, and whole
rounds run by the package's own state machines from fixed identities and a fixed CSPRNG."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import msgpack
import numpy as np

from asagiri.config import FederationConfig, PolicyConfig, RunSpec, SecAggConfig
from asagiri.policy import SitePolicy
from asagiri.secagg import shamir, verify
from asagiri.secagg.binding import (
    RoundParams,
    canonical,
    keys_message,
    params_digest,
    spec_digest,
    survivors_message,
)
from asagiri.secagg.client import ClientStage, ClientStateMachine, share_key
from asagiri.secagg.graph import batch_mates, graph_seed, neighbours, ring_order
from asagiri.secagg.masking import add_masks, pair_seed
from asagiri.secagg.prg import PRGS, Prg, expand, stream
from asagiri.secagg.quantize import QuantisationError, QuantPlan, dequantize, quantize
from asagiri.secagg.rules import batch_map
from asagiri.secagg.server import ServerStateMachine
from asagiri.wire import codec
from asagiri.wire.crypto import EphemeralKey, Identity, Keystream, StreamCipher, blake2b
from asagiri.wire.messages import (
    AdvertiseKeys,
    ConsistencySig,
    FitIns,
    MaskedInput,
    Message,
    ShareDelivery,
    ShareKeys,
    SumVouch,
    UnmaskResponse,
)

from .wire_vectors import seed, typed

__all__ = ["binding_vector", "deterministic_rng", "round_vectors", "secagg_vectors", "shamir_vectors"]

COEFFICIENT_BYTES = 66


class Draws:
    """The CSPRNG stand-in of the vectors: ``prefix`` then the ChaCha20 keystream of ``key``
    (libsodium's ``randombytes_buf_deterministic``), with every read kept."""

    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        self._ks = Keystream(key)
        self._prefix = prefix
        self.reads: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        head, self._prefix = self._prefix[:n], self._prefix[n:]
        buf = bytearray(n - len(head))
        self._ks.fill(memoryview(buf))
        out = head + bytes(buf)
        self.reads.append(out)
        return out


def deterministic_rng(key: bytes) -> Callable[[int], bytes]:
    return Draws(key)


def _coefficients(reads: list[bytes]) -> list[int]:
    """The coefficients SPEC §6.5 makes of 66-byte reads: low 521 bits, values >= p rejected."""
    values = [int.from_bytes(r, "big") & ((1 << 521) - 1) for r in reads if len(r) == COEFFICIENT_BYTES]
    return [v for v in values if v < shamir.P]


def _hex66(v: int) -> str:
    return v.to_bytes(COEFFICIENT_BYTES, "big").hex()


def shamir_vectors() -> list[dict]:
    out = []
    cases = [(bytes(range(32)), 3, 2, b""), (b"\xff" * 32, 5, 3, b""), (bytes(32), 1, 1, b""),
             (bytes(range(32, 64)), 4, 3, b"\xff" * COEFFICIENT_BYTES)]  # the first draw is p itself: rejected
    for secret, n, t, prefix in cases:
        rng = Draws(seed(6), prefix)
        shares = shamir.split(secret, n, t, rng=rng)
        out.append({"secret_hex": secret.hex(), "n": n, "t": t, "rng_prefix_hex": prefix.hex(),
                    "rng_key_hex": seed(6).hex(), "coefficients_hex": [_hex66(c) for c in _coefficients(rng.reads)],
                    "shares_hex": [shamir.encode_share(sh).hex() for sh in shares]})
    return out


def secagg_vectors() -> list[dict]:
    return [secagg_vector(prg) for prg in PRGS]


def secagg_vector(prg: Prg) -> dict:
    plan = QuantPlan.plan(bits=32, clip=1.0, max_samples=1000, max_sites=4)
    # On-grid values, clipped ones, and off-grid ones whose rounding the noise decides.
    delta = np.array([0.5, -0.25, 1.5, -3.0, 1e-4, 0.0, 0.1234567, -0.0070001, 1 / 3, -2e-7, 0.3, -0.7, 0.01,
                      -0.011, 0.2718, -0.5772], dtype=np.float32)
    noise_seed, b_seed, pair = seed(7), seed(8), seed(9)
    ring, clipped = quantize(delta, 10, plan, noise_seed=noise_seed, prg=prg)
    masked = add_masks(ring.copy(), b_seed, [(1, pair), (-1, seed(10))], prg=prg)
    fused, _ = quantize(
        delta, 10, plan, noise_seed=noise_seed, masks=[(1, b_seed), (1, pair), (-1, seed(10))], prg=prg
    )
    assert np.array_equal(masked, fused)
    u16 = np.empty(8, np.uint16)
    stream(noise_seed, prg).fill(memoryview(u16))
    return {
        "prg": prg,
        "plan": plan.to_dict(),
        "delta": delta.tolist(),
        "num_samples": 10,
        "noise_seed_hex": noise_seed.hex(),
        "noise_first_u16": [int(w) for w in u16],
        "quantized_hex": ring.tobytes().hex(),
        "clipped": clipped,
        "self_seed_hex": b_seed.hex(),
        "pair_masks": [[1, pair.hex()], [-1, seed(10).hex()]],
        "masked_hex": masked.tobytes().hex(),
        "prg_first_words": [int(w) for w in expand(b_seed, 4, prg=prg)],
    }


def binding_vector() -> dict:
    """The round digest and everything signed in a round, from fixed inputs (SPEC §6.1-6.2)."""
    canon = {"b": 1, "a": [1.5, None, True, "x", b"\x00", -3, 2**40], "A": {}}
    params = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.array([1.5], np.float32)}
    spec = RunSpec.of(FederationConfig(run_id="vector-run")).wire()
    plan = QuantPlan.plan(bits=32, clip=4.0, max_samples=100_000, max_sites=3)
    config = {"mu": 0.0, "seed": 7}
    rp = RoundParams(
        run_id="vector-run", round=2, attempt=1, participants=(3, 1, 2), vector_len=8, plan=plan,
        prg="aes128-ctr", degree=0, threshold=2, params_digest=params_digest(params), fit_config=config,
        spec_digest=spec_digest(spec),
    )
    signer = Identity.from_seed(seed(11))
    c_pk, s_pk = EphemeralKey(seed(12)).public, EphemeralKey(seed(13)).public
    keys_text = keys_message(rp.context, 3, c_pk, s_pk)
    survivors_text = survivors_message(rp.context, [3, 1, 2], [2, 1])
    graphs = []
    # even degree; odd degree over an odd and an even count; sparse but complete (degree >= |U1| - 1)
    for u1, degree in [([1, 2, 3, 4, 5, 6, 7], 2), ([1, 2, 3, 4, 5, 6, 7], 3), ([2, 4, 6, 8, 10, 12, 14, 16], 3),
                       ([5, 9, 11, 20], 3)]:
        gseed = graph_seed(rp.context, u1)
        graphs.append({"advertised": u1, "degree": degree, "seed_hex": gseed.hex(), "ring": ring_order(u1, gseed),
                       "neighbours": {str(u): v for u, v in neighbours(u1, degree, gseed).items()}})
    return {
        "canonical": {"value": typed(canon), "hex": canonical(canon).hex()},
        "params": {"tensors": {k: {"dtype": v.dtype.str, "shape": list(v.shape), "values": v.ravel().tolist()}
                               for k, v in params.items()},
                   "digest_hex": params_digest(params).hex()},
        "spec": {"spec": spec, "digest_hex": spec_digest(spec).hex()},
        "round": {"run_id": rp.run_id, "round": rp.round, "attempt": rp.attempt,
                  "participants": list(rp.participants), "vector_len": rp.vector_len, "quant": plan.to_dict(),
                  "prg": rp.prg, "degree": rp.degree, "threshold": rp.threshold, "fit_config": config,
                  "digest_hex": rp.digest.hex(), "ctx_hex": rp.context.hex()},
        "signatures": {"identity_seed_hex": seed(11).hex(), "site": 3, "c_sk_hex": seed(12).hex(),
                       "s_sk_hex": seed(13).hex(), "c_pk_hex": c_pk.hex(), "s_pk_hex": s_pk.hex(),
                       "keys_text_hex": keys_text.hex(), "keys_signature_hex": signer.sign(keys_text).hex(),
                       "survivors": [1, 2, 3], "masked_with": [1, 2], "survivors_text_hex": survivors_text.hex(),
                       "survivors_signature_hex": signer.sign(survivors_text).hex()},
        "graphs": graphs,
        "plans": [_plan_case(b, c, m, n) for b, c, m, n in [
            (64, 4.0, 65536, 4), (64, 0.1, 100_000, 7), (32, 4.0, 100_000, 4), (32, 1.0, 1000, 4),
            (32, 0.3, 7, 3),  # clip is not a float32: float32(clip) > clip
            (32, 1e6, 100_000, 4),  # no scale >= 1 fits: no plan
            (32, 1.0, 2**30, 3),  # the count alone cannot be summed: no plan
        ]],
    }


def _plan_case(bits: int, clip: float, max_samples: int, max_sites: int) -> dict:
    try:
        plan: dict | None = QuantPlan.plan(bits=bits, clip=clip, max_samples=max_samples, max_sites=max_sites).to_dict()
    except QuantisationError:
        plan = None
    return {"inputs": {"bits": bits, "clip": clip, "max_samples": max_samples, "max_sites": max_sites}, "plan": plan}


# ---- whole rounds ---------------------------------------------------------------------------------

def _replay(reads: list[bytes]) -> Callable[[int], bytes]:
    it: Iterator[bytes] = iter(reads)
    return lambda n: next(it)


def _words(seed_: bytes, bits: int, prg: str) -> list[str]:
    """The first four PRG elements, as decimal strings (u64 does not fit every JSON reader)."""
    return [str(int(w)) for w in expand(seed_, 4, np.uint32 if bits == 32 else np.uint64, prg=prg)]  # type: ignore[arg-type]


def _round(*, run_id: str, rnd: int, attempt: int, sites: dict[int, tuple[list[float], int]],
           secagg: SecAggConfig, drop_after_share: set[int]) -> dict:
    """Run one round attempt with the package's site and coordinator machines; record all of it."""
    ids = sorted(sites)
    identities = {u: Identity.from_seed(bytes([0x60 + u]) * 32) for u in ids}
    pubs = {u: k.public for u, k in identities.items()}
    spec = RunSpec.of(FederationConfig(run_id=run_id, secagg=secagg)).wire()
    parsed = RunSpec.model_validate(spec)
    s_digest = spec_digest(spec)
    global_params = {"conv.weight": (np.arange(6, dtype=np.float32).reshape(2, 3) - 2) / 8,
                     "bias": np.array([0.25, -0.5], np.float32)}
    fit = FitIns(rnd, attempt, global_params, {"mu": 0.0, "seed": 11})
    rngs = {u: Draws(bytes([0xA0 + u]) * 32) for u in ids}
    clients = {u: ClientStateMachine(site_id=u, identity=identities[u], run_id=run_id, secagg=parsed.secagg,
                                     spec_digest=s_digest, policy=SitePolicy(PolicyConfig(), pubs),
                                     random_bytes=rngs[u]) for u in ids}
    params = RoundParams.derive(run_id=run_id, round=rnd, attempt=attempt, participants=ids, secagg=parsed.secagg,
                                params_digest=params_digest(fit.params), fit_config=fit.config,
                                vector_len=sum(a.size for a in global_params.values()) + 1, spec_digest=s_digest)
    batches = batch_map(parsed.secagg.batches)
    server = ServerStateMachine(params=params, min_clients=parsed.min_clients, identities=pubs, batches=batches)
    transcript: list[dict] = []
    sent: dict[tuple[int, type], Message] = {}

    def record(frm: int | str, to: int | str, msg: Message) -> None:
        transcript.append({"from": frm, "to": to, "type": type(msg).__name__, "encoded_hex": codec.encode(msg).hex()})

    for u in ids:
        record("coordinator", u, fit)
        assert clients[u].receive(fit) == []
    queue = deque(server.start())
    gone: set[int] = set()
    while queue or not server.finished:  # after DONE, the survivors check the SumProof
        if not queue:
            queue.extend(server.stage_timed_out())  # the dropped sites' deadline passes
            continue
        out = queue.popleft()
        if out.site in gone:
            continue
        record("coordinator", out.site, out.msg)
        client = clients[out.site]
        replies = client.receive(out.msg)
        if isinstance(out.msg, ShareDelivery) and out.site in drop_after_share:
            gone.add(out.site)
            continue
        if client.stage is ClientStage.READY:
            delta, n = sites[out.site]
            assert client.fit_binding is not None
            replies += client.set_input(np.array(delta, np.float32), n, trained_on=client.fit_binding)
        for reply in replies:
            record(out.site, "coordinator", reply)
            sent[(out.site, type(reply))] = reply
            queue.extend(server.receive(out.site, reply))
    assert server.result is not None, server.abort_reason
    plan, prg, ctx = params.plan, params.prg, params.context
    u1 = server.stage_sites["advertised"]
    gseed = graph_seed(ctx, u1)
    nbrs = neighbours(u1, params.degree or None, gseed)
    u3 = server.result.survivors
    dropped = sorted(set(server.u2) - set(u3))
    sum_h = verify.sum_digest(server.result.total)
    vseed = verify.challenge_seed(ctx, sum_h, u3)
    cu, cv = verify.challenge(vseed, params.vector_len)

    per_site = {}
    for u in ids:
        reads = rngs[u].reads
        c_sk, s_sk, b = reads[0], reads[1], reads[2]
        coeff_reads = [r for r in reads[3:] if len(r) == COEFFICIENT_BYTES]
        half = len(coeff_reads) // 2
        group = [u, *nbrs[u]]
        b_shares = shamir.split(b, len(group), params.threshold, rng=_replay(coeff_reads[:half]))
        s_shares = shamir.split(s_sk, len(group), params.threshold, rng=_replay(coeff_reads[half:]))
        adv = sent[(u, AdvertiseKeys)]
        assert isinstance(adv, AdvertiseKeys)
        c, s = EphemeralKey(c_sk), EphemeralKey(s_sk)
        assert (adv.c_pk, adv.s_pk) == (c.public, s.public)
        shares_msg = sent[(u, ShareKeys)]
        assert isinstance(shares_msg, ShareKeys)
        outgoing = {}
        for v, ct in shares_msg.shares:
            x = group.index(v)
            plain = msgpack.packb([run_id, rnd, attempt, u, v, shamir.encode_share(b_shares[x]),
                                   shamir.encode_share(s_shares[x])], use_bin_type=True)
            key = share_key(c, server.keys[v].c_pk, u, v, ctx)
            assert StreamCipher(key).open(0, ct, ctx) == plain
            outgoing[str(v)] = {"share_key_hex": key.hex(), "plaintext_hex": plain.hex(), "ciphertext_hex": ct.hex()}
        entry: dict = {
            "identity_seed_hex": identities[u].seed().hex(), "identity_public_hex": pubs[u].hex(),
            "rng_key_hex": (bytes([0xA0 + u]) * 32).hex(), "reads_hex": [r.hex() for r in reads],
            "delta": sites[u][0], "num_samples": sites[u][1], "n": min(sites[u][1], plan.max_samples),
            "c_sk_hex": c_sk.hex(), "c_pk_hex": c.public.hex(), "s_sk_hex": s_sk.hex(), "s_pk_hex": s.public.hex(),
            "b_hex": b.hex(), "keys_text_hex": keys_message(ctx, u, c.public, s.public).hex(),
            "keys_signature_hex": adv.signature.hex(),
            "b_coefficients_hex": [_hex66(v) for v in _coefficients(coeff_reads[:half])],
            "s_coefficients_hex": [_hex66(v) for v in _coefficients(coeff_reads[half:])],
            "group": group,
            "b_shares_hex": [shamir.encode_share(x).hex() for x in b_shares],
            "s_shares_hex": [shamir.encode_share(x).hex() for x in s_shares],
            "shares_to": outgoing,
        }
        if u in drop_after_share:
            per_site[str(u)] = entry
            continue
        masked = sent[(u, MaskedInput)]
        assert isinstance(masked, MaskedInput)
        masked_with = sorted(set(server.delivered_from[u]) | set(batch_mates(u, u1, batches)))
        noise_seed = reads[-1]
        delta = np.array(sites[u][0], np.float32)
        q, clipped = quantize(delta, entry["n"], plan, noise_seed=noise_seed, prg=prg)  # type: ignore[arg-type]
        pairs = {v: pair_seed(s, server.keys[v].s_pk, u, v, ctx) for v in masked_with}
        y = add_masks(q.copy(), b, [(1 if u < v else -1, pairs[v]) for v in masked_with], prg=prg)  # type: ignore[arg-type]
        assert np.array_equal(y, masked.vector["y"])
        u16 = np.empty(4, np.uint16)
        stream(noise_seed, prg).fill(memoryview(u16))  # type: ignore[arg-type]
        entry.update({
            "masked_with": masked_with, "noise_seed_hex": noise_seed.hex(),
            "noise_first_u16": [int(w) for w in u16], "q_hex": q.tobytes().hex(), "clipped": clipped,
            "pair_seeds_hex": {str(v): pairs[v].hex() for v in masked_with},
            "prg_first_words": {"b": _words(b, plan.bits, prg), **{str(v): _words(pairs[v], plan.bits, prg)
                                                                   for v in masked_with}},
            "y_hex": y.tobytes().hex(),
        })
        sig = sent.get((u, ConsistencySig))
        if sig is not None:
            assert isinstance(sig, ConsistencySig)
            entry["survivors_text_hex"] = survivors_message(ctx, u3, masked_with).hex()
            entry["survivors_signature_hex"] = sig.signature.hex()
        vouch = sent.get((u, SumVouch))
        if vouch is not None:  # the verified sum (SPEC §6.8)
            assert isinstance(vouch, SumVouch)
            own = verify.project(q, u=cu, v=cv)[0]
            keys = {v: verify.vouch_key(s, server.keys[v].s_pk, u, v, ctx) for v in masked_with if v in u3}
            masked = verify.masked_scalars(own, u, keys, vseed, plan.bits)
            assert verify.encode_scalars(masked, plan.bits) == vouch.scalars
            entry.update({
                "z_u": [str(z) for z in own],
                "vouch_keys_hex": {str(v): k.hex() for v, k in keys.items()},
                "pair_scalars": {str(v): [str(m) for m in verify.pair_scalars(k, vseed, plan.bits)]
                                 for v, k in keys.items()},
                "scalars_hex": vouch.scalars.hex(),
                "vouch_text_hex": verify.vouch_message(ctx, vseed, u, vouch.scalars).hex(),
                "vouch_signature_hex": vouch.signature.hex(),
            })
        per_site[str(u)] = entry

    ring_sum = np.zeros(params.vector_len, plan.dtype)
    for u in u3:
        ring_sum += sent[(u, MaskedInput)].vector["y"]  # type: ignore[attr-defined]
    b_shares_in: dict[int, list] = {}
    s_shares_in: dict[int, list] = {}
    for (_, kind), msg in sent.items():
        if kind is UnmaskResponse:
            for owner, raw in msg.b_shares:  # type: ignore[attr-defined]
                b_shares_in.setdefault(owner, []).append(shamir.decode_share(raw))
            for owner, raw in msg.s_shares:  # type: ignore[attr-defined]
                s_shares_in.setdefault(owner, []).append(shamir.decode_share(raw))
    z = server.result.total
    weighted, count = dequantize(z, plan)
    return {
        "run_id": run_id, "round": rnd, "attempt": attempt, "participants": ids,
        "drop_after_share": sorted(drop_after_share),
        "spec": spec, "spec_digest_hex": s_digest.hex(),
        "fit_ins": {
            "params": [{"name": k, "dtype": a.dtype.str, "shape": list(a.shape), "data_hex": a.tobytes().hex()}
                       for k, a in global_params.items()],
            "config": typed(fit.config)},
        "params_digest_hex": params.params_digest.hex(), "quant": plan.to_dict(), "prg": prg,
        "degree": params.degree, "threshold": params.threshold, "vector_len": params.vector_len,
        "digest_hex": params.digest.hex(), "ctx_hex": ctx.hex(),
        "advertised": u1, "graph_seed_hex": gseed.hex(),
        "ring_keys_hex": {str(u): _ring_key(gseed, u) for u in u1}, "ring": ring_order(u1, gseed),
        "neighbours": {str(u): v for u, v in nbrs.items()},
        "shared": server.u2, "survivors": u3, "dropped": dropped, "signed": server.u4,
        "sites": per_site,
        "transcript": transcript,
        "result": {
            "ring_sum_hex": ring_sum.tobytes().hex(),
            "b_hex": {str(o): shamir.reconstruct(v, params.threshold).hex() for o, v in sorted(b_shares_in.items())},
            "s_sk_hex": {str(o): shamir.reconstruct(v, params.threshold).hex() for o, v in sorted(s_shares_in.items())},
            "z_hex": z.tobytes().hex(), "count": count, "weighted_sum": [float(x) for x in weighted],
        },
        "verify": {
            "sum_digest_hex": sum_h.hex(), "challenge_seed_hex": vseed.hex(),
            "A": int(cu.shape[1]), "B": int(cv.shape[1]),
            "u_first": [[str(int(w)) for w in row[:4]] for row in cu],
            "v_first": [[str(int(w)) for w in row[:4]] for row in cv],
            "proj_z": [str(p) for p in verify.project(z, u=cu, v=cv)[0]],
        },
    }


def _ring_key(gseed: bytes, u: int) -> str:
    return blake2b(gseed + u.to_bytes(4, "big"), person=b"asagiri-ring").hex()


def _f32(sites: dict[int, tuple[list[float], int]]) -> dict[int, tuple[list[float], int]]:
    """Updates as exact float32 values, so the JSON says precisely what each site quantised."""
    return {u: (np.array(d, np.float32).tolist(), n) for u, (d, n) in sites.items()}


def round_vectors() -> list[dict]:
    a = {3: ([0.1, -0.2, 0.3, 0.75, -0.9, 0.0, 0.015625, -0.001], 120),
         5: ([-0.05, 0.125, 0.6, -0.3, 0.2, 0.4, -0.7, 0.33], 75),
         8: ([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], 300),
         11: ([0.0, 0.0, -0.49, 0.49, 1e-3, -1e-3, 0.25, -0.25], 42),
         14: ([0.3, -0.3, 0.31, -0.31, 0.0625, 0.5, -0.5, 0.123], 1500)}
    b = {1: ([0.5, -1.5, 3.0, -6.0, 0.001, 0.1, -0.2, 2.5], 10),
         2: ([-4.5, 4.0, 0.0, 1e-6, -1e-6, 0.75, 1.25, -3.9], 20000),
         4: ([1.0, 2.0, -3.0, 0.4, -0.4, 0.0, 0.0, 0.0], 7),
         7: ([0.01, -0.02, 0.03, -0.04, 0.05, -0.06, 0.07, -0.08], 65535)}
    return [
        _round(run_id="vector-round-32", rnd=2, attempt=1, sites=_f32(a), drop_after_share={8},
               secagg=SecAggConfig(mode="sparse", shares=3, bits=32, clip=0.5, max_samples_per_site=1000,
                                   prg="aes128-ctr")),
        _round(run_id="vector-round-64", rnd=5, attempt=2, sites=_f32(b), drop_after_share=set(),
               secagg=SecAggConfig(mode="complete", bits=64, clip=4.0, max_samples_per_site=65536, prg="chacha20")),
        # participation batches (§6.7): every site masks with its batch-mates too (keys in its
        # roster, no shares), and site 5's drop cuts its batch [5, 8] (8 sent its input)
        _round(run_id="vector-round-batched", rnd=3, attempt=1, sites=_f32({**a, 1: b[1], 2: b[2]}),
               drop_after_share={5},
               secagg=SecAggConfig(mode="sparse", shares=3, bits=32, clip=0.5, max_samples_per_site=1000,
                                   prg="aes128-ctr", batches=[[1, 2, 3], [5, 8], [11, 14]])),
    ]
