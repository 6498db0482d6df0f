"""Recompute every vector of protocol/vectors/ from protocol/SPEC.md alone.

``independent.py`` is a third-party implementation of the protocol that never imports the
package; these tests hold it against every vector, so a spec change the code does not follow, or
the reverse, fails here (``test_vectors_product.py`` checks the package produces the same files).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import struct
from pathlib import Path

import msgpack
import nacl.bindings as sodium
import numpy as np
import pytest

from tests.protocol.independent import (
    FIELD_TYPES,
    MESSAGES,
    REJECT_REASONS,
    TAGS,
    TENSOR_FIELDS,
    Csprng,
    ProtocolError,
    Receiver,
    aead_open,
    aead_seal,
    body_from_wire,
    canonical,
    canonical_value,
    check_header,
    check_round_record,
    coeff_hex,
    compute_round,
    decode_header,
    derive_round,
    encode_message,
    expected_transcript,
    frames_keys,
    graph,
    handshake_keys,
    hashed_form,
    identity_public,
    initial_key,
    initial_tensor,
    json_text,
    key_text,
    keystream,
    le_words,
    load,
    make_ctx,
    model_digest,
    noise_words,
    nonce,
    params_digest,
    plain,
    plan,
    prg_words,
    quantise,
    record_hash,
    round_digest,
    seal_message,
    seal_record,
    shamir_reconstruct,
    shamir_share,
    sign,
    signed_text,
    spec_digest,
    spec_tensors,
    survivor_text,
    tensor_nbytes,
    transcript_message,
    typed,
    unhex,
    vector_message,
    verify,
    verify_record,
    words_hex,
    written_form,
    x25519_pk,
)


def test_table_matches_field_types():
    for tag, (_, fields) in MESSAGES.items():
        assert tuple(FIELD_TYPES[tag]) == fields


# --------------------------------------------------------------------------------------------
# Typed vector values -> Python values
# --------------------------------------------------------------------------------------------


def test_messages_cover_every_type():
    assert sorted(m["tag"] for m in load("messages.json")) == sorted(MESSAGES)


@pytest.mark.parametrize("index", range(len(load("messages.json"))))
def test_message_encoding(index):
    msg = load("messages.json")[index]
    tag, body = vector_message(msg)
    assert tuple(body) == MESSAGES[tag][1]
    header, tensors = encode_message(tag, body)
    assert header.hex() == msg["header_hex"]
    assert [t.hex() for t in tensors] == msg["tensors_hex"]
    for name in TENSOR_FIELDS[tag]:
        for _, dtype, shape, raw in body[name].items:
            assert len(raw) == tensor_nbytes(dtype, shape)
    assert plain(tag, body).hex() == msg["encoded_hex"]
    # msgpack-python agrees with this encoder (§2.1 says the vectors are packb's bytes)
    assert msgpack.packb(msgpack.unpackb(header, raw=False), use_bin_type=True) == header
    # decode the recorded bytes: [version, tag, body] with the §2.3 fields in order
    enc = unhex(msg["encoded_hex"])
    (hlen,) = struct.unpack(">I", enc[:4])
    decoded = msgpack.unpackb(enc[4 : 4 + hlen], raw=False)
    assert decoded[0] == 1 and decoded[1] == tag
    assert tuple(decoded[2]) == MESSAGES[tag][1]
    check_header(decoded, 1 << 30)
    assert enc[4 + hlen :] == b"".join(tensors)


# --------------------------------------------------------------------------------------------
# §2 header validation (a receiver's view)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3))
def test_aead(index):
    v = load("aead.json")[index]
    key, pt, aad = unhex(v["key_hex"]), unhex(v["plaintext_hex"]), unhex(v["aad_hex"])
    n = nonce(v["counter"])
    assert len(n) == 12 and n[:4] == bytes(4) and int.from_bytes(n[4:], "little") == v["counter"]
    ct = aead_seal(key, v["counter"], pt, aad)
    assert ct.hex() == v["ciphertext_hex"]
    assert sodium.crypto_aead_chacha20poly1305_ietf_encrypt(pt, aad, n, key) == ct
    assert sodium.crypto_aead_chacha20poly1305_ietf_decrypt(ct, aad, n, key) == pt
    assert aead_open(key, v["counter"], ct, aad) == pt


@pytest.mark.parametrize("index", range(2))
def test_keystream(index):
    v = load("keystream.json")[index]
    key = unhex(v["key_hex"])
    assert keystream(key, v["length"]).hex() == v["keystream_hex"]
    assert sodium.randombytes_buf_deterministic(v["length"], key).hex() == v["keystream_hex"]


# --------------------------------------------------------------------------------------------
# 2. handshake.json (§3)
# --------------------------------------------------------------------------------------------


def test_handshake():
    v = load("handshake.json")
    k = handshake_keys(v)
    assert k["hello"].hex() == v["client_hello_hex"]
    assert k["server_hello"].hex() == v["server_hello_hex"]
    assert k["client_auth"].hex() == v["client_auth_hex"]
    assert k["site_tx"].hex() == v["site_tx_key_hex"]
    assert k["site_rx"].hex() == v["site_rx_key_hex"]
    assert k["coord_rx"] == k["site_tx"] and k["coord_tx"] == k["site_rx"]
    # the signatures verify the way each peer checks them
    sh = msgpack.unpackb(k["server_hello"][4:], raw=False)[2]
    verify(k["s_pub"], b"asagiri server" + k["h1"], sh["signature"])
    ca = msgpack.unpackb(k["client_auth"][4:], raw=False)[2]
    verify(k["c_pub"], b"asagiri client" + k["h2"], ca["signature"])
    # every handshake message fits the 1024-byte handshake frame limit
    assert max(len(m) - 4 for m in (k["hello"], k["server_hello"], k["client_auth"])) <= 1024
    # the first encrypted message
    first = v["first_message"]
    tag, body = vector_message(first)
    assert tag == first["tag"] == 20
    header, tensors = encode_message(tag, body)
    assert header.hex() == first["header_hex"]
    assert [t.hex() for t in tensors] == first["tensors_hex"]
    assert plain(tag, body).hex() == first["encoded_hex"]
    cb = v["chunk_bytes"]
    frames, _ = seal_message(k["site_tx"], 0, tag, body, lambda rem: min(cb, rem))
    assert [f.hex() for f in frames] == v["site_to_coordinator_frames_hex"]


# --------------------------------------------------------------------------------------------
# 3. frames.json: an independent receiver (§1, §2, §4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(2))
def test_frames_accepted(index):
    v = load("frames.json")
    seq = v["accepted"][index]
    keys = frames_keys()
    key = keys[seq["key"]]
    direction_key = {"coordinator_to_site": "site_rx", "site_to_coordinator": "site_tx"}
    assert seq["key"] == direction_key[seq["direction"]]
    limits = v["limits"]
    rx = Receiver(key, limits["max_frame_bytes"], limits["max_message_bytes"])
    frames = [unhex(f) for f in seq["frames_hex"]]
    for f in frames:
        rx.feed(f)
    assert rx.pending is None
    assert len(rx.messages) == len(seq["messages"])
    for (tag, body, tensors), msg in zip(rx.messages, seq["messages"], strict=True):
        assert tag == msg["tag"]
        rebuilt = body_from_wire(tag, body, tensors)
        assert plain(tag, rebuilt).hex() == msg["encoded_hex"]
        vtag, vbody = vector_message(msg)
        header, vt = encode_message(vtag, vbody)
        assert header.hex() == msg["header_hex"] and [t.hex() for t in vt] == msg["tensors_hex"]
        assert plain(vtag, vbody).hex() == msg["encoded_hex"]
    # re-seal from the messages and the recorded chunking
    if "chunk_bytes" in seq:
        cb = seq["chunk_bytes"]
        sizes = None
    else:
        sizes = list(seq["chunk_sizes"])
    counter = 0
    out: list[bytes] = []
    for msg in seq["messages"]:
        tag, body = vector_message(msg)
        chunker = (lambda rem: min(cb, rem)) if sizes is None else (lambda rem: sizes.pop(0))
        fr, counter = seal_message(key, counter, tag, body, chunker)
        out.extend(fr)
    assert [f.hex() for f in out] == seq["frames_hex"]
    assert not sizes


@pytest.mark.parametrize("index", range(len(load("frames.json")["rejected"])))
def test_frames_rejected(index):
    v = load("frames.json")
    case = v["rejected"][index]
    limits = v["limits"]
    at = v["rejected_at"]
    assert at["receiver"] == "site" and at["first_counter"] == 0
    rx = Receiver(frames_keys()[at["key"]], limits["max_frame_bytes"], limits["max_message_bytes"])
    frames = [unhex(f) for f in case["frames_hex"]]
    for i, f in enumerate(frames):
        if i < case["reject_at"]:
            rx.feed(f)
        else:
            with pytest.raises(ProtocolError) as err:
                rx.feed(f)
            assert str(err.value) == REJECT_REASONS[case["why"]]
            break
    else:
        raise AssertionError("never rejected")
    assert i == case["reject_at"]


# --------------------------------------------------------------------------------------------
# §6.5 Shamir sharing over GF(2^521 - 1)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(4))
def test_shamir(index):
    v = load("shamir.json")[index]
    rng = Csprng(unhex(v["rng_key_hex"]), unhex(v["rng_prefix_hex"]))
    secret = unhex(v["secret_hex"])
    coeffs, shares = shamir_share(secret, v["n"], v["t"], rng)
    assert [coeff_hex(c) for c in coeffs] == v["coefficients_hex"]
    assert [s.hex() for s in shares] == v["shares_hex"]
    t = v["t"]
    assert shamir_reconstruct(shares[:t]) == secret
    assert shamir_reconstruct(shares[-t:]) == secret


# --------------------------------------------------------------------------------------------
# §6.2 / §6.3 / §6.4 PRGs, plans, quantisation, masking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(2))
def test_secagg(index):
    v = load("secagg.json")[index]
    p = v["plan"]
    assert plan(p["bits"], p["clip"], p["max_samples"], p["max_sites"]) == p
    bits, kind = p["bits"], v["prg"]
    d = len(v["delta"])
    n = min(v["num_samples"], p["max_samples"])
    noise = noise_words(unhex(v["noise_seed_hex"]), kind, d)
    assert noise[: len(v["noise_first_u16"])] == v["noise_first_u16"]
    q, clipped = quantise(v["delta"], n, p, noise)
    assert le_words(q, bits).hex() == v["quantized_hex"]
    assert clipped == v["clipped"]
    mod = 2**bits
    self_seed = unhex(v["self_seed_hex"])
    assert prg_words(self_seed, kind, 4, bits) == v["prg_first_words"]
    y = [(a + b) % mod for a, b in zip(q, prg_words(self_seed, kind, d + 1, bits), strict=True)]
    for sign_, seed_hex in v["pair_masks"]:
        m = prg_words(unhex(seed_hex), kind, d + 1, bits)
        y = [(a + sign_ * b) % mod for a, b in zip(y, m, strict=True)]
    assert le_words(y, bits).hex() == v["masked_hex"]


# --------------------------------------------------------------------------------------------
# §6.1 / §6.2 digests, texts, graph, round parameters
# --------------------------------------------------------------------------------------------


def test_binding_canonical():
    v = load("binding.json")["canonical"]
    value = typed(v["value"])
    assert canonical(value).hex() == v["hex"]
    # sorted keys, nothing else changes: msgpack-python on the sorted value agrees
    assert msgpack.packb(canonical_value(value), use_bin_type=True).hex() == v["hex"]


def test_binding_digests_ctx_texts_graph():
    v = load("binding.json")
    p_digest = params_digest(spec_tensors(v["params"]["tensors"]))
    assert p_digest.hex() == v["params"]["digest_hex"]
    s_digest = spec_digest(v["spec"]["spec"])
    assert s_digest.hex() == v["spec"]["digest_hex"]
    r = v["round"]
    assert r["vector_len"] == 1 + sum(math.prod(t["shape"]) for t in v["params"]["tensors"].values())
    d = round_digest(
        r["run_id"],
        r["round"],
        r["attempt"],
        r["participants"],
        r["vector_len"],
        r["quant"],
        r["prg"],
        r["degree"],
        r["threshold"],
        p_digest,
        r["fit_config"],
        s_digest,
    )
    assert d.hex() == r["digest_hex"]
    ctx = make_ctx(r["run_id"], r["round"], r["attempt"], d)
    assert ctx.hex() == r["ctx_hex"]
    # the round's derived values follow from the spec (§6.2)
    secagg = v["spec"]["spec"]["secagg"]
    n = len(r["participants"])
    assert plan(secagg["bits"], secagg["clip"], secagg["max_samples_per_site"], n) == r["quant"]
    assert r["prg"] == secagg["prg"]
    assert derive_round(secagg, n) == (r["degree"], r["threshold"])
    sig = v["signatures"]
    c_pk, s_pk = x25519_pk(unhex(sig["c_sk_hex"])), x25519_pk(unhex(sig["s_sk_hex"]))
    assert c_pk.hex() == sig["c_pk_hex"] and s_pk.hex() == sig["s_pk_hex"]
    seed = unhex(sig["identity_seed_hex"])
    kt = key_text(ctx, sig["site"], c_pk, s_pk)
    assert kt.hex() == sig["keys_text_hex"]
    assert sign(seed, kt).hex() == sig["keys_signature_hex"]
    st = survivor_text(ctx, sig["survivors"], sig["masked_with"])
    assert st.hex() == sig["survivors_text_hex"]
    assert sign(seed, st).hex() == sig["survivors_signature_hex"]
    for g in v["graphs"]:
        gseed, _, ring, nb = graph(ctx, g["advertised"], g["degree"])
        assert gseed.hex() == g["seed_hex"]
        assert ring == g["ring"]
        assert {str(u): x for u, x in nb.items()} == g["neighbours"]


@pytest.mark.parametrize("index", range(len(load("binding.json")["plans"])))
def test_binding_plans(index):
    case = load("binding.json")["plans"][index]
    i = case["inputs"]
    assert plan(i["bits"], i["clip"], i["max_samples"], i["max_sites"]) == case["plan"]


def test_plan_edges():
    # no plan when max_sites * max_samples does not fit
    assert plan(32, 1.0, 2**31, 1) is None
    assert plan(32, 4.0, 100000, 3)["scale"] == 1024.0


# --------------------------------------------------------------------------------------------
# 8. secagg_round.json: whole rounds (§6.4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3))
def test_round_values(index):
    r = load("secagg_round.json")[index]
    c = compute_round(index)
    bits = c["quant"]["bits"]
    assert c["S"].hex() == r["spec_digest_hex"]
    assert c["P"].hex() == r["params_digest_hex"]
    assert c["quant"] == r["quant"]
    assert (c["prg"], c["degree"], c["threshold"], c["vector_len"]) == (
        r["prg"],
        r["degree"],
        r["threshold"],
        r["vector_len"],
    )
    assert c["D"].hex() == r["digest_hex"]
    assert c["ctx"].hex() == r["ctx_hex"]
    assert c["dropped"] == r["dropped"]
    assert (c["U1"], c["U2"], c["U3"], c["U4"]) == (r["advertised"], r["shared"], r["survivors"], r["signed"])
    assert c["graph_seed"].hex() == r["graph_seed_hex"]
    assert {str(u): k.hex() for u, k in c["ring_keys"].items()} == r["ring_keys_hex"]
    assert c["ring"] == r["ring"]
    assert {str(u): v for u, v in c["neighbours"].items()} == r["neighbours"]
    assert set(r["sites"]) == {str(u) for u in c["U1"]}
    for u, s in c["sites"].items():
        sv = r["sites"][str(u)]
        assert s["identity_public"].hex() == sv["identity_public_hex"]
        assert [x.hex() for x in s["rng"].reads] == sv["reads_hex"]
        for k in ("c_sk", "c_pk", "s_sk", "s_pk", "b", "keys_text", "keys_signature"):
            assert s[k].hex() == sv[k + "_hex"], k
        assert [coeff_hex(x) for x in s["b_coefficients"]] == sv["b_coefficients_hex"]
        assert [coeff_hex(x) for x in s["s_coefficients"]] == sv["s_coefficients_hex"]
        assert s["group"] == sv["group"]
        assert [x.hex() for x in s["b_shares"]] == sv["b_shares_hex"]
        assert [x.hex() for x in s["s_shares"]] == sv["s_shares_hex"]
        assert set(s["shares_to"]) == {int(v) for v in sv["shares_to"]}
        for v, st in s["shares_to"].items():
            rec = sv["shares_to"][str(v)]
            assert st["share_key"].hex() == rec["share_key_hex"]
            assert st["plaintext"].hex() == rec["plaintext_hex"]
            assert st["ciphertext"].hex() == rec["ciphertext_hex"]
        if u not in c["senders"]:
            assert "y_hex" not in sv
            continue
        assert s["masked_with"] == sv["masked_with"]
        assert s["noise_seed"].hex() == sv["noise_seed_hex"]
        assert s["noise"][:4] == sv["noise_first_u16"]
        assert s["n"] == sv["n"]
        assert words_hex(s["q"], bits) == sv["q_hex"]
        assert s["clipped"] == sv["clipped"]
        assert {str(v): x.hex() for v, x in s["pair_seeds"].items()} == sv["pair_seeds_hex"]
        first = {str(k): [str(w) for w in ws] for k, ws in s["prg_first_words"].items()}
        assert first == sv["prg_first_words"]
        assert words_hex(s["y"], bits) == sv["y_hex"]
        if u not in c["U3"]:
            assert "survivors_text_hex" not in sv  # its batch was cut (§6.7)
            continue
        assert s["survivors_text"].hex() == sv["survivors_text_hex"]
        assert s["survivors_signature"].hex() == sv["survivors_signature_hex"]
    res = r["result"]
    assert words_hex(c["ring_sum"], bits) == res["ring_sum_hex"]
    assert {str(o): x.hex() for o, x in c["b"].items()} == res["b_hex"]
    assert {str(o): x.hex() for o, x in c["s_sk"].items()} == res["s_sk_hex"]
    for o, x in c["b"].items():
        assert x == c["sites"][o]["b"]
    assert words_hex(c["z"], bits) == res["z_hex"]
    # z is the sum of the survivors' q
    q_sum = [sum(col) % 2**bits for col in zip(*(c["sites"][u]["q"] for u in c["U3"]), strict=True)]
    assert c["z"] == q_sum
    assert c["count"] == res["count"] == sum(c["sites"][u]["n"] for u in c["U3"])
    assert c["weighted_sum"] == res["weighted_sum"]
    # §6.8: the verified sum, every value recomputed here from the spec
    ver, rv = c["verify"], r["verify"]
    assert ver["h"].hex() == rv["sum_digest_hex"] and ver["seed"].hex() == rv["challenge_seed_hex"]
    assert (ver["A"], ver["B"]) == (rv["A"], rv["B"])
    assert [[str(w) for w in row[:4]] for row in ver["u"]] == rv["u_first"]
    assert [[str(w) for w in row[:4]] for row in ver["v"]] == rv["v_first"]
    assert [str(p) for p in ver["proj_z"]] == rv["proj_z"]
    for u in c["U3"]:
        vouch, sv = ver["vouches"][u], r["sites"][str(u)]
        assert [str(z) for z in vouch["z_u"]] == sv["z_u"]
        assert {str(v): k.hex() for v, k in vouch["keys"].items()} == sv["vouch_keys_hex"]
        assert {str(v): [str(m) for m in ms] for v, ms in vouch["pair_scalars"].items()} == sv["pair_scalars"]
        assert vouch["scalars"].hex() == sv["scalars_hex"]
        assert vouch["text"].hex() == sv["vouch_text_hex"]
        assert vouch["signature"].hex() == sv["vouch_signature_hex"]
        verify(c["sites"][u]["identity_public"], vouch["text"], vouch["signature"])


@pytest.mark.parametrize("index", range(3))
def test_round_transcript(index):
    r = load("secagg_round.json")[index]
    c = compute_round(index)
    for entry in r["transcript"]:
        tag = TAGS[entry["type"]]
        body = transcript_message(c, r, entry["from"], entry["to"], entry["type"])
        assert tuple(body) == MESSAGES[tag][1]
        enc = plain(tag, body)
        assert enc.hex() == entry["encoded_hex"], (entry["from"], entry["to"], entry["type"])
        # and a receiver accepts it
        (hlen,) = struct.unpack(">I", enc[:4])
        sizes = check_header(decode_header(enc[4 : 4 + hlen]), 1 << 28)
        assert sum(sizes) == len(enc) - 4 - hlen


@pytest.mark.parametrize("index", range(3))
def test_round_transcript_flow(index):
    r = load("secagg_round.json")[index]
    c = compute_round(index)
    got = sorted(((e["from"], e["to"], e["type"]) for e in r["transcript"]), key=repr)
    assert got == expected_transcript(c, r)


# --------------------------------------------------------------------------------------------
# §9 record.json: round records
# --------------------------------------------------------------------------------------------

# why each rejected record fails, in this implementation's words
RECORD_REJECTS = {
    "edited": "hash",
    "rehashed": "signature",
    "other_key": "signature",
    "not_canonical": "not the written form",
    "not_json": "not JSON",
    "other_domain": "signature",
}


def record_vector() -> tuple[dict, bytes, bytes]:
    """record.json, its record's bytes and the pinned coordinator key (§0: from the seed)."""
    v = load("record.json")
    return v, unhex(v["record_hex"]), identity_public(unhex(v["coordinator_seed_hex"]))


def test_record_model_digest():
    v, raw, public = record_vector()
    model = [(t["name"], t["dtype"], list(t["shape"]), unhex(t["data_hex"])) for t in v["model"]]
    # the vector's model has a 0-d, a 1-d, a 2-d and an empty tensor, listed out of name order
    assert sorted(len(s) for _, _, s, _ in model) == [0, 1, 2, 2]
    assert [n for n, *_ in model] != sorted(n for n, *_ in model)
    assert model_digest(model) == v["model_sha256"]
    assert model_digest(model[::-1]) == v["model_sha256"]
    assert verify_record(raw, public)["model_sha256"] == v["model_sha256"]


def test_record_forms_and_signature():
    v, raw, public = record_vector()
    seed = unhex(v["coordinator_seed_hex"])
    record = verify_record(raw, public)
    assert hashed_form(record).hex() == v["hashed_hex"]
    assert record_hash(record) == v["hash_hex"] == record["hash"]
    assert hashlib.sha256(unhex(v["hashed_hex"])).hexdigest() == v["hash_hex"]
    assert signed_text(record["hash"]).hex() == v["signed_hex"]
    assert unhex(v["signed_hex"]) == b"asagiri-audit-v1\x00" + unhex(v["hash_hex"])
    # Ed25519 is deterministic: the coordinator's key from its seed gives the same signature
    assert sign(seed, unhex(v["signed_hex"])).hex() == v["sig_hex"] == record["sig"]
    verify(public, unhex(v["signed_hex"]), unhex(v["sig_hex"]))
    assert record["signer"] == public.hex()
    # the record is in its written form: re-serialising gives the same bytes
    assert written_form(record) == raw
    assert seal_record(record, seed) == raw
    # §9.1 gives Python's json.dumps as the reference; this serialiser is its own
    unsigned = {k: x for k, x in record.items() if k not in ("hash", "signer", "sig")}
    assert json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode() == hashed_form(record)
    assert json.dumps(record, sort_keys=True, separators=(", ", ": ")).encode() == raw
    check_round_record(record, record["run_id"], record["round"])


def test_record_in_round_record_message():
    """messages.json's RoundRecord carries exactly record.json's record, for its round."""
    v, raw, public = record_vector()
    (msg,) = [m for m in load("messages.json") if m["tag"] == TAGS["RoundRecord"]]
    _, body = vector_message(msg)
    assert body["record"] == raw
    assert body["round"] == verify_record(body["record"], public)["round"]


@pytest.mark.parametrize("index", range(len(load("record.json")["rejected"])))
def test_record_rejected(index):
    v, _, public = record_vector()
    case = v["rejected"][index]
    with pytest.raises(ProtocolError) as err:
        verify_record(unhex(case["record_hex"]), public)
    assert str(err.value) == RECORD_REJECTS[case["name"]], case["why"]


def test_record_rejected_other_key_is_signed():
    """other_key is a well-made record of another key: only the pinned key refuses it (§9.3)."""
    v, _, public = record_vector()
    (case,) = [c for c in v["rejected"] if c["name"] == "other_key"]
    record = json.loads(unhex(case["record_hex"]))
    assert record["signer"] != public.hex()
    verify(unhex(record["signer"]), signed_text(record["hash"]), unhex(record["sig"]))
    assert verify_record(unhex(case["record_hex"]), unhex(record["signer"])) == record


def test_record_hostile_bytes():
    """Whatever the bytes, the verifier refuses with ProtocolError and nothing else."""
    v, raw, public = record_vector()
    seed = unhex(v["coordinator_seed_hex"])
    record = json.loads(raw)
    text = raw.decode()
    cases = {
        b"": "not JSON",
        b"\xff": "not JSON",
        raw + b"\n": "not the written form",
        b" " + raw: "not the written form",
        b"[" * 200000 + b"]" * 200000: "not JSON",
        b"[]": "not an object",
        b"{}": "kind",
        raw.replace(b'"seq": 3', b'"seq": 3, "seq": 3'): "repeated key",
        raw.replace(b"1.25", b"NaN"): "non-finite float",
        raw.replace(b"1.25", b"1e400"): "non-finite float",
        raw.replace(b"1.25", b"1" * 5000): "not JSON",
        raw.replace(b"1.25", b"1.250"): "not the written form",
        raw.replace(b"vector-run", "v\u00e9ctor-run".encode()): "not the written form",
        text.replace(record["sig"], record["sig"].upper()).encode(): "sig",
        text.replace(record["hash"], record["hash"].upper()).encode(): "hash",
        text.replace(record["signer"], "00" * 32).encode(): "signer",
        seal_record({**record, "seq": "3"}, seed): "seq",
        seal_record({**record, "seq": 0}, seed): "seq",
        seal_record({**record, "seq": True}, seed): "seq",
        seal_record({**record, "prev_hash": "0" * 63}, seed): "prev_hash",
        seal_record({k: x for k, x in record.items() if k != "kind"}, seed): "kind",
    }
    for data, why in cases.items():
        with pytest.raises(ProtocolError) as err:
            verify_record(data, public)
        assert str(err.value) == why, (data[:80], why)
    # a record with the first hash, a non-ASCII string (escaped) and odd floats verifies
    first = {**record, "seq": 1, "prev_hash": "0" * 64, "run_id": "r\u00e9\U0001f600\n", "time": 1e16}
    assert verify_record(seal_record(first, seed), public)["run_id"] == "r\u00e9\U0001f600\n"


def test_round_record_checks():
    """§9.3 checks 2 and 4."""
    _, raw, public = record_vector()
    record = verify_record(raw, public)
    run_id, rnd = record["run_id"], record["round"]
    check_round_record(record, run_id, rnd)
    bad = {
        "kind": {"kind": "site_joined"},
        "run_id": {"run_id": "another-run"},
        "round": {"round": 2.0},
        "attempt": {"attempt": "1"},
        "participants": {"participants": [1, "3"]},
        "dropped": {"dropped": {"2": True}},
        "selected": {"selected": [1, True]},
        "declined": {"declined": []},
        "epsilon": {"epsilon": None},
    }
    for why, change in bad.items():
        with pytest.raises(ProtocolError) as err:
            check_round_record({**record, **change}, run_id, rnd)
        assert str(err.value) == why
    for key in ("attempt", "noise_multiplier"):
        with pytest.raises(ProtocolError):
            check_round_record({k: x for k, x in record.items() if k != key}, run_id, rnd)
    with pytest.raises(ProtocolError, match="round"):
        check_round_record(record, run_id, rnd + 1)
    with pytest.raises(ProtocolError, match="run_id"):
        check_round_record(record, "another-run", rnd)


def test_json_text_matches_python():
    """§9.1 defers to json.dumps for escapes and float layout: hold the two together."""
    rng = np.random.default_rng(9)
    floats = [0.0, -0.0, 0.5, 1e-05, 0.0001, 1e15, 1e16, 123456789.0, 5e-324, 1.7976931348623157e308]
    floats += [float(x) for x in rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500)]
    floats += [x for x in rng.integers(0, 2**64, 500, dtype=np.uint64).view(np.float64).tolist()
               if math.isfinite(x)]
    strings = ["".join(map(chr, range(128))), "\u00e9\u2028\ufeff\U0001f600", "\ud800", "/<>&'"]
    value = {"floats": floats, "strings": strings, "ints": [0, -1, 2**64, -(2**70)], "z": {"b": 1, "a": None}}
    for seps in ((",", ":"), (", ", ": ")):
        assert json_text(value, *seps) == json.dumps(value, sort_keys=True, separators=seps)


def test_round_record_bound():
    """RoundRecord.record is bin≤1048576 (§2.3)."""
    check_header([1, 32, {"round": 1, "record": b"{" * (1 << 20)}], 0)
    for bad, why in ((b"{" * ((1 << 20) + 1), "bin"), ("{}", "bin")):
        with pytest.raises(ProtocolError, match=why):
            check_header([1, 32, {"round": 1, "record": bad}], 0)
    with pytest.raises(ProtocolError, match="int"):
        check_header([1, 32, {"round": 0, "record": b"{}"}], 0)


@pytest.mark.parametrize("path", [Path(__file__), Path(__file__).with_name("independent.py")], ids=lambda p: p.name)
def test_no_package_imports(path):
    """The implementation and its tests import no part of the package, not even indirectly."""
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.append(node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            raise AssertionError("dynamic import")
    assert names
    allowed = {"__future__", "ast", "hashlib", "json", "math", "struct", "fractions", "functools", "pathlib",
               "typing", "msgpack", "nacl", "numpy", "pytest", "cryptography", "blake3"}
    for name in names:
        assert name == "tests.protocol.independent" or name.split(".")[0] in allowed, name


@pytest.mark.parametrize("index", range(len(load("derived.json"))))
def test_derived_w0(index):
    """§6.9: the run's key from its id and architecture, each tensor of W_0 from it, and the
    model's params digest (§6.1), as the package derives them."""
    vec = load("derived.json")[index]
    assert canonical(vec["architecture"]).hex() == vec["architecture_canonical_hex"]
    key = initial_key(vec["run_id"], vec["architecture"])
    assert key.hex() == vec["key_hex"]
    model = []
    for t in vec["tensors"]:
        values = initial_tensor(key, t["name"], t["shape"], t["fill"])
        assert values.tobytes().hex() == t["values_hex"], t["name"]
        model.append((t["name"], "<f4", t["shape"], values.tobytes()))
    assert params_digest(model).hex() == vec["params_digest_hex"]
