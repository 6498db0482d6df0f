"""Vectors of SPEC §1-4: every message type's encoding, the handshake, encrypted frames, the AEAD
and the keystream, produced by the package from fixed inputs."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgpack
import nacl.bindings as sodium
import numpy as np

from asagiri.causes import AbortCause, Rule
from asagiri.config import FederationConfig, RunSpec
from asagiri.secagg.quantize import QuantPlan
from asagiri.wire import codec
from asagiri.wire.channel import FRAME_CHUNK, FRAME_HEADER, ClientHandshake, SecureChannel, ServerHandshake
from asagiri.wire.crypto import (
    EphemeralKey,
    Identity,
    SessionKeys,
    StreamCipher,
    chacha20_keystream_into,
    counter_nonce,
)
from asagiri.wire.errors import RemoteProtocolError
from asagiri.wire.framing import FrameDecoder
from asagiri.wire.messages import (
    AdvertiseKeys,
    ClientAuth,
    ClientHello,
    ConsistencyCheck,
    ConsistencySig,
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Heartbeat,
    KeyRoster,
    MaskedInput,
    Message,
    ModelAt,
    Reject,
    RoundAborted,
    RoundRecord,
    SecAggStart,
    ServerHello,
    ShareDelivery,
    ShareKeys,
    Shutdown,
    SumAnnounce,
    SumProof,
    SumRecord,
    SumVouch,
    UnmaskRequest,
    UnmaskResponse,
    Welcome,
)

__all__ = ["aead_vectors", "handshake_vector", "keystream_vectors", "message_vectors", "seed", "typed",
           "typed_message", "frame_vectors"]


def seed(byte: int) -> bytes:
    return bytes([byte]) * 32


def _bytes(tag: int, n: int) -> bytes:
    """Recognisable filler: ``n`` bytes counting up from ``tag``."""
    return bytes((tag + i) % 256 for i in range(n))


def typed(value: Any) -> dict:
    """A value with its msgpack type spelled out, so JSON's own types lose nothing (SPEC §8)."""
    if value is None:
        return {"type": "nil", "value": None}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, bytes):
        return {"type": "bin", "value": value.hex()}
    if isinstance(value, dict):
        return {"type": "map", "value": [[k, typed(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"type": "list", "value": [typed(v) for v in value]}
    raise TypeError(f"no typed form for {type(value).__name__}")


def _tensors(params: dict[str, np.ndarray]) -> dict:
    return {"type": "tensors", "value": [
        {"name": k, "dtype": a.dtype.str, "shape": list(a.shape), "data_hex": np.ascontiguousarray(a).tobytes().hex()}
        for k, a in params.items()
    ]}


def typed_message(msg: Message) -> dict:
    """The message's type, its fields in body order with their types, and its encodings."""
    header, arrays = codec.encode_header(msg)
    return {
        "type": type(msg).__name__,
        "tag": msg.TAG,
        "fields": [[f.name, _tensors(getattr(msg, f.name)) if f.name in msg.TENSOR_FIELDS else typed(getattr(msg, f.name))]
                   for f in fields(msg)],  # type: ignore[arg-type]
        "header_hex": header.hex(),
        "tensors_hex": [a.tobytes().hex() for a in arrays],
        "encoded_hex": codec.encode(msg).hex(),
    }


def sample_params() -> dict[str, np.ndarray]:
    """Tensors in wire order that is not name order, an empty one and a scalar."""
    return {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
        "bias": np.array([1.5, -2.0], np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "scale": np.array(0.5, np.float64),
    }


def sample_messages() -> list[Message]:
    from .record_vectors import sample_record  # it builds on this module's samples

    spec = RunSpec.of(FederationConfig(run_id="vector-run")).wire()
    plan = QuantPlan.plan(bits=32, clip=4.0, max_samples=100_000, max_sites=3).to_dict()
    sig = _bytes(0x40, 64)
    share = _bytes(0x80, 68)
    params = sample_params()
    return [
        ClientHello(1, 3, _bytes(1, 32), _bytes(0x21, 16)),
        ServerHello(1, _bytes(2, 32), sig),
        ClientAuth(sig),
        Reject("site 9 is not enrolled in this federation"),
        Welcome("vector-run", 1, 3, spec),
        Heartbeat(70000),
        FitIns(2, 1, params, {"mu": 0.01, "seed": 2**40 + 7}),
        FitRes(2, 1, {k: np.asarray(v * 3, v.dtype) for k, v in params.items()}, 58, {"train_loss": 0.25, "steps": 3, "delta": -3}),
        Decline(2, 1, Rule.QUORUM, False),
        EvaluateIns(3, params, "val"),
        EvaluateRes(3, "test", 2, {"auc": 0.875, "accuracy": 0.5},
                    {"scores": np.array([[0.1, 0.9], [0.8, 0.2]], np.float32), "labels": np.array([1, 0], np.int64)}),
        RoundRecord(2, sample_record()[1]),
        RoundAborted(2, 1, AbortCause.TOO_FEW_SITES, "2 updates arrived, fewer than min_clients=3; nothing aggregated"),
        Shutdown("federation completed", True),
        SecAggStart(2, 1, [1, 2, 3], 10, plan, "aes128-ctr", 0, 2),
        AdvertiseKeys(2, 1, _bytes(3, 32), _bytes(4, 32), sig),
        KeyRoster(2, 1, [1, 2, 3], [[2, _bytes(5, 32), _bytes(6, 32), sig], [3, _bytes(7, 32), _bytes(8, 32), sig]]),
        ShareKeys(2, 1, [[2, _bytes(9, 176)], [3, _bytes(10, 176)]]),
        ShareDelivery(2, 1, [[2, _bytes(11, 176)], [3, _bytes(12, 176)]]),
        MaskedInput(2, 1, {"y": np.array([0, 1, 2**31, 2**32 - 1, 7, 8, 9, 10, 11, 58], np.uint32)}),
        ConsistencyCheck(2, 1, [1, 2, 3]),
        ConsistencySig(2, 1, [2, 3], sig),
        UnmaskRequest(2, 1, [1, 2, 3], [4], [[1, [2, 3], sig], [2, [1, 3], sig]]),
        UnmaskResponse(2, 1, [[1, share], [2, share]], [[4, share]]),
        SumAnnounce(2, 1, {"s": np.array([7, 2**32 - 3, 0, 1], dtype="<u4")}),
        SumVouch(2, 1, bytes(range(24)), sig),
        SumProof(2, 1, [[1, bytes(range(24)), sig], [3, bytes(range(1, 25)), sig]]),
        SumRecord(2, 1, [1, 2, 3], {"mu": 0.0, "seed": 2}, [1, 3], {"s": np.array([7, 2**32 - 3, 0, 1], dtype="<u4")},
                  [[1, bytes(range(24)), sig], [3, bytes(range(1, 25)), sig]]),
        ModelAt(1, _bytes(0x13, 32)),
    ]


def message_vectors() -> list[dict]:
    return [typed_message(m) for m in sample_messages()]


def _handshake() -> tuple[dict, SessionKeys, SessionKeys]:
    site, coord = Identity.from_seed(seed(1)), Identity.from_seed(seed(2))
    client = ClientHandshake(site, 3, coord.public, ephemeral=EphemeralKey(seed(3)), nonce=bytes(range(16)))
    server = ServerHandshake(coord, {3: site.public}, ephemeral=EphemeralKey(seed(4)))
    hello = client.hello()
    server_hello = server.receive_hello(hello)
    auth = client.receive(server_hello)
    assert server.receive_auth(auth) == 3
    assert client.keys is not None and server.keys is not None
    record = {
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
    }
    return record, client.keys, server.keys


def handshake_vector() -> dict:
    record, site_keys, _ = _handshake()
    chan = SecureChannel(site_keys, max_frame_size=1 << 16, max_payload_bytes=1 << 20, chunk_bytes=8)
    msg = FitIns(1, 1, {"w": np.arange(3, dtype=np.float32)}, {})
    return {
        **record,
        "chunk_bytes": 8,
        "first_message": typed_message(msg),
        "site_to_coordinator_frames_hex": [bytes(f).hex() for f in chan.frames(msg)],
    }


# ---- encrypted frames ---------------------------------------------------------------------------

def _seal(key: bytes, counter: int, kind: int, plaintext: bytes, *, kind_byte: int | None = None) -> bytes:
    payload = bytes([kind if kind_byte is None else kind_byte]) + StreamCipher(key).seal(counter, plaintext, bytes([kind]))
    return len(payload).to_bytes(4, "big") + payload


def _frames(key: bytes, header: bytes, chunks: list[bytes], *, counter: int = 0) -> list[bytes]:
    out = [_seal(key, counter, FRAME_HEADER, header)]
    out += [_seal(key, counter + 1 + i, FRAME_CHUNK, c) for i, c in enumerate(chunks)]
    return out


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos : pos + n])
        pos += n
    assert pos == len(data)
    return out


def _receive(frames: list[bytes], keys: SessionKeys, *, max_frame: int, max_message: int) -> tuple[list[Message], int | None]:
    """What the package's receiver makes of ``frames``: the messages, and the frame it closed on."""
    chan = SecureChannel(keys, max_frame_size=max_frame, max_payload_bytes=max_message, chunk_bytes=1024)
    dec = FrameDecoder(max_frame_size=max_frame)
    got: list[Message] = []
    for i, frame in enumerate(frames):
        try:
            for payload in dec.feed(frame):
                msg = chan.receive_frame(bytes(payload))
                if msg is not None:
                    got.append(msg)
        except RemoteProtocolError:
            return got, i
    return got, None


def _header(tag: int, body: dict, *, version: int = 1) -> bytes:
    return msgpack.packb([version, tag, body], use_bin_type=True)


def frame_vectors() -> dict:
    _, site_keys, coord_keys = _handshake()
    max_frame, max_message = 4096, 1024
    limits = {"max_frame_bytes": max_frame, "max_message_bytes": max_message}

    welcome = Welcome("vector-run", 1, 3, RunSpec.of(FederationConfig(run_id="vector-run")).wire())
    fit = FitIns(2, 1, sample_params(), {"mu": 0.0, "seed": 5})
    to_site = SecureChannel(coord_keys, max_frame_size=max_frame, max_payload_bytes=1 << 20, chunk_bytes=16)
    down = [bytes(f) for m in (welcome, fit) for f in to_site.frames(m)]

    res = FitRes(2, 1, {k: np.asarray(v * 3, v.dtype) for k, v in sample_params().items()}, 58, {"train_loss": 0.25})
    header, arrays = codec.encode_header(res)
    chunks = _cut(arrays[0].tobytes(), [3, 13, 1, 7]) + _cut(arrays[1].tobytes(), [8]) + _cut(arrays[3].tobytes(), [5, 3])
    up = _frames(site_keys.tx, header, chunks)
    accepted = [
        {"direction": "coordinator_to_site", "key": "site_rx", "chunk_bytes": 16, "frames_hex": [f.hex() for f in down],
         "messages": [typed_message(welcome), typed_message(fit)]},
        {"direction": "site_to_coordinator", "key": "site_tx", "chunk_sizes": [3, 13, 1, 7, 8, 5, 3],
         "frames_hex": [f.hex() for f in up], "messages": [typed_message(res)]},
    ]
    for case, keys in zip(accepted, (site_keys, coord_keys), strict=True):
        got, closed = _receive([bytes.fromhex(f) for f in case["frames_hex"]], keys, max_frame=1 << 16, max_message=1 << 20)
        assert closed is None and [typed_message(m) for m in got] == case["messages"]

    # Rejections, at a site whose receive counter is 0; each defect alone makes the frame fail.
    k = site_keys.rx
    small = FitIns(1, 1, {"a": np.arange(6, dtype=np.float32), "b": np.arange(3, dtype=np.float32)}, {})
    small_header, small_arrays = codec.encode_header(small)
    a_bytes, b_bytes = (x.tobytes() for x in small_arrays)
    good = _frames(k, small_header, [a_bytes[:8], a_bytes[8:], b_bytes])
    hb = codec.encode_header(Heartbeat(1))[0]
    tampered = bytearray(good[1])
    tampered[10] ^= 1
    fit_body = {"round": 1, "attempt": 1, "params": [], "config": {}}
    cases: list[tuple[str, list[bytes], int]] = [
        ("a ciphertext byte flipped", [good[0], bytes(tampered)], 1),
        ("a header sealed as kind 2 and sent as kind 1: the kind is the aad",
         [_seal(k, 0, FRAME_CHUNK, hb, kind_byte=FRAME_HEADER)], 0),
        ("a replayed frame", [good[0], good[1], good[1]], 2),
        ("reordered frames", [good[0], good[2], good[1]], 1),
        ("a frame reflected back: sealed with the site's own tx key", [_seal(site_keys.tx, 0, FRAME_HEADER, hb)], 0),
        ("a chunk with no pending header", [_seal(k, 0, FRAME_CHUNK, a_bytes)], 0),
        ("a header while chunks are due", [good[0], _seal(k, 1, FRAME_HEADER, hb)], 1),
        ("a chunk longer than what its tensor lacks", [good[0], _seal(k, 1, FRAME_CHUNK, a_bytes + b_bytes[:4])], 1),
        ("a chunk of 0 bytes", [good[0], _seal(k, 1, FRAME_CHUNK, b"")], 1),
        ("an unknown frame kind", [_seal(k, 0, 3, hb)], 0),
        ("a payload shorter than kind and tag", [(10).to_bytes(4, "big") + bytes(10)], 0),
        ("a length prefix above max_frame_bytes", [(max_frame + 1).to_bytes(4, "big")], 0),
        ("protocol version 2", [_seal(k, 0, FRAME_HEADER, _header(11, {"seq": 1}, version=2))], 0),
        ("an unknown message type", [_seal(k, 0, FRAME_HEADER, _header(99, {"seq": 1}))], 0),
        ("a missing field", [_seal(k, 0, FRAME_HEADER, _header(20, {"round": 1, "attempt": 1, "params": []}))], 0),
        ("an extra field", [_seal(k, 0, FRAME_HEADER, _header(11, {"seq": 1, "extra": 0}))], 0),
        ("str where an integer is due", [_seal(k, 0, FRAME_HEADER, _header(11, {"seq": "1"}))], 0),
        ("float where an integer is due", [_seal(k, 0, FRAME_HEADER, _header(11, {"seq": 1.0}))], 0),
        ("bin where str is due",
         [_seal(k, 0, FRAME_HEADER, _header(40, {"round": 1, "attempt": 1, "cause": "no_quorum", "detail": b"x"}))], 0),
        ("an attempt out of range",
         [_seal(k, 0, FRAME_HEADER, _header(40, {"round": 1, "attempt": 0, "cause": "no_quorum", "detail": ""}))], 0),
        ("a cause outside its set",
         [_seal(k, 0, FRAME_HEADER, _header(40, {"round": 1, "attempt": 1, "cause": "declined", "detail": ""}))], 0),
        ("a repeated id", [_seal(k, 0, FRAME_HEADER, _header(56, {"round": 1, "attempt": 1, "survivors": [1, 1]}))], 0),
        ("tensors above max_message_bytes",
         [_seal(k, 0, FRAME_HEADER, _header(20, {**fit_body, "params": [["w", "<f4", [257]]]}))], 0),
        ("a big-endian dtype", [_seal(k, 0, FRAME_HEADER, _header(20, {**fit_body, "params": [["w", ">f4", [1]]]}))], 0),
        ("a repeated tensor name",
         [_seal(k, 0, FRAME_HEADER, _header(20, {**fit_body, "params": [["w", "<f4", [1]], ["w", "<f4", [1]]]}))], 0),
        ("a header that is not [version, type, body]", [_seal(k, 0, FRAME_HEADER, msgpack.packb([1, 11]))], 0),
    ]
    rejected = []
    for why, frames, at in cases:
        got, closed = _receive(frames, site_keys, max_frame=max_frame, max_message=max_message)
        assert closed == at, (why, closed)
        rejected.append({"why": why, "frames_hex": [f.hex() for f in frames], "reject_at": at})
    return {"limits": limits, "accepted": accepted,
            "rejected_at": {"receiver": "site", "key": "site_rx", "first_counter": 0}, "rejected": rejected}


def aead_vectors() -> list[dict]:
    out = []
    for counter, text, aad in [(0, b"", b"\x01"), (1, b"asagiri", b"\x02"), (2**40 + 5, bytes(range(100)), b"")]:
        key = seed(9)
        ours = StreamCipher(key).seal(counter, text, aad)
        assert ours == sodium.crypto_aead_chacha20poly1305_ietf_encrypt(text, aad, counter_nonce(counter), key)
        out.append({"key_hex": key.hex(), "counter": counter, "plaintext_hex": text.hex(), "aad_hex": aad.hex(),
                    "ciphertext_hex": ours.hex()})
    return out


def keystream_vectors() -> list[dict]:
    out = []
    for key, n in [(seed(5), 64), (bytes(range(32)), 200)]:
        buf = bytearray(n)
        chacha20_keystream_into(key, memoryview(buf))
        assert bytes(buf) == sodium.randombytes_buf_deterministic(n, key)  # libsodium agrees
        out.append({"key_hex": key.hex(), "length": n, "keystream_hex": bytes(buf).hex()})
    return out
