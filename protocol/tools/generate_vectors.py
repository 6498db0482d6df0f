"""Regenerate ``protocol/vectors/*.json`` from fixed keys and messages.

    python protocol/tools/generate_vectors.py

Every value is deterministic: identities from fixed seeds, ephemeral keys from fixed secrets, the
handshake nonce fixed.  ``tests/wire/test_vectors.py`` re-derives each vector with the package and
compares bytes; the AEAD and keystream vectors are also checked against a second library
(libsodium through PyNaCl) so the two implementations agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from asagiri.config import FederationConfig, RunSpec
from asagiri.secagg import shamir
from asagiri.secagg.binding import (
    RoundParams,
    canonical,
    keys_message,
    params_digest,
    spec_digest,
    survivors_message,
)
from asagiri.secagg.graph import graph_seed, neighbours
from asagiri.secagg.masking import add_masks
from asagiri.secagg.prg import PRGS, Prg, expand
from asagiri.secagg.quantize import QuantPlan, quantize
from asagiri.wire import codec
from asagiri.wire.channel import ClientHandshake, SecureChannel, ServerHandshake
from asagiri.wire.crypto import (
    EphemeralKey,
    Identity,
    Keystream,
    StreamCipher,
    chacha20_keystream_into,
    sodium_chacha20poly1305_seal,
    sodium_keystream,
)
from asagiri.wire.messages import EvaluateRes, FitIns, Heartbeat, Shutdown

OUT = Path(__file__).resolve().parents[1] / "vectors"


def seed(byte: int) -> bytes:
    return bytes([byte]) * 32


def codec_vectors() -> list[dict]:
    msgs = [
        Heartbeat(7),
        Shutdown("federation completed", True),
        EvaluateRes(3, "val", 58, {"auc": 0.875, "accuracy": 0.5}),
        FitIns(2, 1, {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.array([1.5], np.float32)},
               {"mu": 0.01, "seed": 42}),
    ]
    out = []
    for m in msgs:
        header, arrays = codec.encode_header(m)
        out.append({
            "type": type(m).__name__,
            "header_hex": header.hex(),
            "tensors_hex": [a.tobytes().hex() for a in arrays],
            "encoded_hex": codec.encode(m).hex(),
        })
    return out


def handshake_vector() -> dict:
    site, coord = Identity.from_seed(seed(1)), Identity.from_seed(seed(2))
    client = ClientHandshake(site, 3, coord.public, ephemeral=EphemeralKey.from_secret(seed(3)), nonce=bytes(range(16)))
    server = ServerHandshake(coord, {3: site.public}, ephemeral=EphemeralKey.from_secret(seed(4)))
    hello = client.hello()
    server_hello = server.receive_hello(hello)
    auth = client.receive(server_hello)
    assert server.receive_auth(auth) == 3
    assert client.keys is not None and server.keys is not None
    chan = SecureChannel(client.keys, max_frame_size=1 << 16, chunk_bytes=8)
    frames = [bytes(f) for f in chan.frames(FitIns(1, 1, {"w": np.arange(3, dtype=np.float32)}, {}))]
    return {
        "site_id": 3,
        "site_identity_seed_hex": seed(1).hex(),
        "coordinator_identity_seed_hex": seed(2).hex(),
        "site_ephemeral_secret_hex": seed(3).hex(),
        "coordinator_ephemeral_secret_hex": seed(4).hex(),
        "client_nonce_hex": bytes(range(16)).hex(),
        "client_hello_hex": hello.hex(),
        "server_hello_hex": server_hello.hex(),
        "client_auth_hex": auth.hex(),
        "site_tx_key_hex": client.keys.tx.hex(),
        "site_rx_key_hex": client.keys.rx.hex(),
        "chunk_bytes": 8,
        "first_message": "FitIns(1, 1, {'w': arange(3, float32)}, {})",
        "site_to_coordinator_frames_hex": [f.hex() for f in frames],
    }


def aead_vectors() -> list[dict]:
    out = []
    for counter, text, aad in [(0, b"", b"\x01"), (1, b"asagiri", b"\x02"), (2**40 + 5, bytes(range(100)), b"")]:
        key = seed(9)
        ours = StreamCipher(key).seal(counter, text, aad)
        assert ours == sodium_chacha20poly1305_seal(key, counter, text, aad)
        out.append({"key_hex": key.hex(), "counter": counter, "plaintext_hex": text.hex(), "aad_hex": aad.hex(),
                    "ciphertext_hex": ours.hex()})
    return out


def keystream_vectors() -> list[dict]:
    out = []
    for key, n in [(seed(5), 64), (bytes(range(32)), 200)]:
        buf = bytearray(n)
        chacha20_keystream_into(key, memoryview(buf))
        assert bytes(buf) == sodium_keystream(key, n)
        out.append({"key_hex": key.hex(), "length": n, "keystream_hex": bytes(buf).hex()})
    return out


def deterministic_rng(key: bytes):  # type: ignore[no-untyped-def]
    """Randomness for vectors only: a ChaCha20 keystream under a fixed key."""
    ks = Keystream(key)

    def rng(n: int) -> bytes:
        buf = bytearray(n)
        ks.fill(memoryview(buf))
        return bytes(buf)

    return rng


def shamir_vectors() -> list[dict]:
    out = []
    for secret, n, t in [(bytes(range(32)), 3, 2), (b"\xff" * 32, 5, 3), (bytes(32), 1, 1)]:
        shares = shamir.split(secret, n, t, rng=deterministic_rng(seed(6)))
        out.append({"secret_hex": secret.hex(), "n": n, "t": t, "rng_key_hex": seed(6).hex(),
                    "shares_hex": [shamir.encode_share(sh).hex() for sh in shares]})
    return out


def secagg_vectors() -> list[dict]:
    return [secagg_vector(prg) for prg in PRGS]


def secagg_vector(prg: Prg) -> dict:
    plan = QuantPlan.plan(bits=32, clip=1.0, max_samples=1000, max_sites=4)
    # On-grid values, clipped ones, and off-grid ones whose rounding the noise decides.
    delta = np.array([0.5, -0.25, 1.5, -3.0, 1e-4, 0.0, 0.1234567, -0.0070001, 1 / 3, -2e-7], dtype=np.float32)
    noise_seed, b_seed, pair = seed(7), seed(8), seed(9)
    ring, clipped = quantize(delta, 10, plan, noise_seed=noise_seed, prg=prg)
    masked = add_masks(ring.copy(), b_seed, [(1, pair), (-1, seed(10))], prg=prg)
    fused, _ = quantize(
        delta, 10, plan, noise_seed=noise_seed, masks=[(1, b_seed), (1, pair), (-1, seed(10))], prg=prg
    )
    assert np.array_equal(masked, fused)
    return {
        "prg": prg,
        "plan": plan.to_dict(),
        "delta": delta.tolist(),
        "num_samples": 10,
        "noise_seed_hex": noise_seed.hex(),
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
    c_pk, s_pk = EphemeralKey.from_secret(seed(12)).public, EphemeralKey.from_secret(seed(13)).public
    keys_text = keys_message(rp.context, 3, c_pk, s_pk)
    survivors_text = survivors_message(rp.context, [3, 1, 2], [2, 1])
    u1 = [1, 2, 3, 4, 5, 6, 7]
    gseed = graph_seed(rp.context, u1)
    return {
        "canonical": {"value_repr": repr(canon), "hex": canonical(canon).hex()},
        "params": {"tensors": {k: {"dtype": v.dtype.str, "shape": list(v.shape), "values": v.ravel().tolist()}
                               for k, v in params.items()},
                   "digest_hex": params_digest(params).hex()},
        "spec": {"spec": spec, "digest_hex": spec_digest(spec).hex()},
        "round": {"run_id": rp.run_id, "round": rp.round, "attempt": rp.attempt,
                  "participants": list(rp.participants), "vector_len": rp.vector_len, "quant": plan.to_dict(),
                  "prg": rp.prg, "degree": rp.degree, "threshold": rp.threshold, "fit_config": config,
                  "digest_hex": rp.digest.hex(), "ctx_hex": rp.context.hex()},
        "signatures": {"identity_seed_hex": seed(11).hex(), "site": 3, "c_pk_hex": c_pk.hex(), "s_pk_hex": s_pk.hex(),
                       "keys_text_hex": keys_text.hex(), "keys_signature_hex": signer.sign(keys_text).hex(),
                       "survivors": [1, 2, 3], "masked_with": [1, 2], "survivors_text_hex": survivors_text.hex(),
                       "survivors_signature_hex": signer.sign(survivors_text).hex()},
        "graph": {"advertised": u1, "degree": 2, "seed_hex": gseed.hex(),
                  "neighbours": {str(u): v for u, v in neighbours(u1, 2, gseed).items()}},
        "plans": [QuantPlan.plan(bits=b, clip=c, max_samples=m, max_sites=n).to_dict()
                  for b, c, m, n in [(64, 4.0, 65536, 4), (64, 0.1, 100_000, 7), (32, 4.0, 100_000, 4),
                                     (32, 1.0, 1000, 4)]],
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sets = {
        "codec.json": codec_vectors(),
        "handshake.json": handshake_vector(),
        "aead.json": aead_vectors(),
        "keystream.json": keystream_vectors(),
        "shamir.json": shamir_vectors(),
        "secagg.json": secagg_vectors(),
        "binding.json": binding_vector(),
    }
    for name, data in sets.items():
        (OUT / name).write_text(json.dumps(data, indent=2) + "\n")
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
