"""The package against protocol/vectors: it still produces every file byte for byte, decodes
every message, and agrees with libsodium where a second library exists.

``test_spec_independent.py`` holds the other half: the same files recomputed from SPEC.md alone.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from asagiri.config import FederationConfig, RunSpec
from asagiri.wire import codec
from asagiri.wire.channel import ClientHandshake, SecureChannel, ServerHandshake
from asagiri.wire.crypto import (
    EphemeralKey,
    Identity,
    StreamCipher,
    chacha20_keystream_into,
)
from asagiri.wire.framing import FrameDecoder
from asagiri.wire.messages import FitIns
from protocol.tools.generate_vectors import OUT, VECTORS, render
from tests.sodium import sodium_chacha20poly1305_seal, sodium_keystream
from tests.vectors import load_vectors


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_package_still_produces_the_vector_file(name):
    """Regenerating with the package gives the committed file: a code change that moves a byte fails here."""
    assert render(name) == (OUT / name).read_text(), f"run python -m protocol.tools.generate_vectors and review {name}"


@pytest.mark.parametrize("vec", load_vectors("messages.json"), ids=lambda v: v["type"])
def test_every_message_type_decodes_and_reencodes(vec):
    data = bytes.fromhex(vec["encoded_hex"])
    msg = codec.decode(data, max_payload_bytes=1 << 20)
    assert type(msg).__name__ == vec["type"] and msg.TAG == vec["tag"]
    assert codec.encode(msg) == data


def test_messages_vector_covers_every_type():
    from asagiri.wire.messages import MESSAGE_TYPES

    assert sorted(v["tag"] for v in load_vectors("messages.json")) == sorted(MESSAGE_TYPES) and len(MESSAGE_TYPES) == 29


def test_spec_table_lists_exactly_the_welcome_spec():
    """SPEC §2.4 names every key of Welcome.spec, in the order the coordinator sends them."""
    text = (Path(__file__).resolve().parents[2] / "protocol" / "SPEC.md").read_text()
    section = text[text.index("### 2.4"):text.index("### 2.5")]
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \|[^|]*\| ([^|]*) \|$", section, flags=re.M)

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    def value(text):
        text = text.strip().strip("`")
        words = {"true": True, "false": False, "nil": None}
        if text in words:
            return words[text]
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    sent = list(leaves(RunSpec.of(FederationConfig(run_id="r")).wire()))
    assert [k for k, _ in rows] == [k for k, _ in sent]
    for (key, default), (_, actual) in zip(rows, sent, strict=True):
        assert value(default) == actual and type(value(default)) is type(actual), key


def test_handshake_vector():
    v = load_vectors("handshake.json")
    h = bytes.fromhex
    site = Identity.from_seed(h(v["site_identity_seed_hex"]))
    coord = Identity.from_seed(h(v["coordinator_identity_seed_hex"]))
    client = ClientHandshake(site, v["site_id"], coord.public,
                             ephemeral=EphemeralKey(h(v["site_ephemeral_secret_hex"])),
                             nonce=h(v["client_nonce_hex"]))
    server = ServerHandshake(coord, {v["site_id"]: site.public},
                             ephemeral=EphemeralKey(h(v["coordinator_ephemeral_secret_hex"])))
    assert client.hello().hex() == v["client_hello_hex"]
    assert server.receive_hello(client.hello()).hex() == v["server_hello_hex"]
    assert client.receive(h(v["server_hello_hex"])).hex() == v["client_auth_hex"]
    assert server.receive_auth(h(v["client_auth_hex"])) == v["site_id"]
    assert client.keys.tx.hex() == v["site_tx_key_hex"] and client.keys.rx.hex() == v["site_rx_key_hex"]
    sent = SecureChannel(client.keys, max_frame_size=1 << 16, max_payload_bytes=1 << 20, chunk_bytes=v["chunk_bytes"])
    frames = [bytes(f).hex() for f in sent.frames(FitIns(1, 1, {"w": np.arange(3, dtype=np.float32)}, {}))]
    assert frames == v["site_to_coordinator_frames_hex"]
    recv = SecureChannel(server.keys, max_frame_size=1 << 16, max_payload_bytes=1 << 20, chunk_bytes=v["chunk_bytes"])
    dec = FrameDecoder(max_frame_size=1 << 16)
    msgs = [recv.receive_frame(p) for f in frames for p in dec.feed(h(f))]
    np.testing.assert_array_equal(msgs[-1].params["w"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("vec", load_vectors("aead.json"))
def test_aead_vectors_agree_across_libraries(vec):
    key, pt, aad = (bytes.fromhex(vec[k]) for k in ("key_hex", "plaintext_hex", "aad_hex"))
    ours = StreamCipher(key).seal(vec["counter"], pt, aad)
    assert ours.hex() == vec["ciphertext_hex"]
    assert sodium_chacha20poly1305_seal(key, vec["counter"], pt, aad) == ours
    assert StreamCipher(key).open(vec["counter"], ours, aad) == pt


@pytest.mark.parametrize("vec", load_vectors("keystream.json"))
def test_keystream_equals_libsodium_deterministic_randombytes(vec):
    key = bytes.fromhex(vec["key_hex"])
    buf = bytearray(vec["length"])
    chacha20_keystream_into(key, memoryview(buf))
    assert bytes(buf).hex() == vec["keystream_hex"]
    assert sodium_keystream(key, vec["length"]) == bytes(buf)


def test_keystream_fast_path_matches_libsodium_across_chunk_boundaries():
    key = bytes(range(32))
    n = (1 << 20) + 4096 + 3
    buf = np.empty(n, dtype=np.uint8)
    chacha20_keystream_into(key, memoryview(buf))
    assert buf.tobytes() == sodium_keystream(key, n)


def test_keystream_fills_typed_views_by_bytes_not_elements():
    key = bytes(range(32))
    words = np.empty(1000, dtype=np.uint32)
    chacha20_keystream_into(key, memoryview(words))
    assert words.tobytes() == sodium_keystream(key, 4000)


def test_keystream_resumes_exactly_across_uneven_fills():
    from asagiri.wire.crypto import Keystream

    key = bytes(range(32))
    ks = Keystream(key)
    out = bytearray(5000)
    view = memoryview(out)
    for start, stop in [(0, 3), (3, 64), (64, 1000), (1000, 1001), (1001, 5000)]:
        ks.fill(view[start:stop])
    assert bytes(out) == sodium_keystream(key, 5000)


@pytest.mark.parametrize("vec", load_vectors("shamir.json"), ids=lambda v: f"{v['t']}-of-{v['n']}")
def test_shamir_vectors(vec):
    from asagiri.secagg import shamir
    from protocol.tools.generate_vectors import deterministic_rng

    secret = bytes.fromhex(vec["secret_hex"])
    shares = shamir.split(secret, vec["n"], vec["t"], rng=deterministic_rng(bytes.fromhex(vec["rng_key_hex"])))
    assert [shamir.encode_share(s).hex() for s in shares] == vec["shares_hex"]
    decoded = [shamir.decode_share(bytes.fromhex(h)) for h in vec["shares_hex"]]
    assert shamir.reconstruct(decoded[-vec["t"] :], vec["t"]) == secret


@pytest.mark.parametrize("v", load_vectors("secagg.json"), ids=lambda v: v["prg"])
def test_quantize_and_mask_vector(v):
    from asagiri.secagg.masking import add_masks
    from asagiri.secagg.prg import expand
    from asagiri.secagg.quantize import QuantPlan, dequantize, quantize

    prg = v["prg"]
    plan = QuantPlan(**v["plan"])
    delta = np.array(v["delta"], dtype=np.float32)
    noise_seed = bytes.fromhex(v["noise_seed_hex"])
    ring, clipped = quantize(delta, v["num_samples"], plan, noise_seed=noise_seed, prg=prg)
    assert ring.tobytes().hex() == v["quantized_hex"] and clipped == v["clipped"]
    pairs = [(s, bytes.fromhex(h)) for s, h in v["pair_masks"]]
    masked = add_masks(ring.copy(), bytes.fromhex(v["self_seed_hex"]), pairs, prg=prg)
    assert masked.tobytes().hex() == v["masked_hex"]
    assert expand(bytes.fromhex(v["self_seed_hex"]), 4, prg=prg).tolist() == v["prg_first_words"]
    # removing the masks again gives the quantised vector back; dequantising it, the clipped update
    add_masks(masked, None, [(-1, bytes.fromhex(v["self_seed_hex"]))] + [(-s, seed) for s, seed in pairs], prg=prg)
    weighted, count = dequantize(masked, plan)
    assert count == v["num_samples"]
    np.testing.assert_allclose(weighted, np.clip(delta, -1, 1) * v["num_samples"], atol=1 / plan.scale)


def test_noise_decides_off_grid_rounding_in_the_vectors():
    """Off-grid values of the vectors round up or down depending on the noise seed, so the vectors
    pin the rounding noise too; and on average the rounding is unbiased."""
    from asagiri.secagg.quantize import QuantPlan, quantize

    for v in load_vectors("secagg.json"):
        plan = QuantPlan(**v["plan"])
        delta = np.array(v["delta"], dtype=np.float32)
        exact = np.clip(delta, -1, 1).astype(np.float64) * v["num_samples"] * plan.scale
        rings = np.stack([
            quantize(delta, v["num_samples"], plan, noise_seed=bytes([i]) * 32, prg=v["prg"])[0][:-1].view(np.int32)
            for i in range(200)
        ])
        off_grid = exact != np.floor(exact)
        assert off_grid.sum() >= 3
        assert (rings[:, off_grid].min(axis=0) < rings[:, off_grid].max(axis=0)).all()
        np.testing.assert_allclose(rings.mean(axis=0), exact, atol=0.15)
