"""Recompute every vector of protocol/vectors/ from protocol/SPEC.md alone.

This file is a third-party implementation of the Asagiri wire protocol, version 1. It imports
only the standard library, PyNaCl, pyca/cryptography, msgpack, NumPy and pytest, never the
package itself: it proves that the specification is enough to interoperate.

Exception: SPEC.md does not define PRG(seed) (§6.3, §6.4). The derivation in prg() below was
recovered from the vectors, not from the text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import struct
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.signing
import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


@cache
def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def unhex(s: str) -> bytes:
    return bytes.fromhex(s)


# --------------------------------------------------------------------------------------------
# §0 primitives
# --------------------------------------------------------------------------------------------


def H(person: str, data: bytes) -> bytes:  # noqa: N802
    return hashlib.blake2b(data, digest_size=32, person=person.encode()).digest()


def H128(person: str, data: bytes) -> bytes:  # noqa: N802
    return hashlib.blake2b(data, digest_size=16, person=person.encode()).digest()


def HK(key: bytes, person: str, data: bytes) -> bytes:  # noqa: N802
    return hashlib.blake2b(data, digest_size=32, key=key, person=person.encode()).digest()


def u32(x: int) -> bytes:
    return struct.pack(">I", x)


def ids(values) -> bytes:
    vs = sorted(values)
    return u32(len(vs)) + b"".join(u32(v) for v in vs)


def nonce(counter: int) -> bytes:
    return b"\x00" * 4 + struct.pack("<Q", counter)


def x25519_pk(sk: bytes) -> bytes:
    return sodium.crypto_scalarmult_base(sk)


def dh(sk: bytes, pk: bytes) -> bytes:
    out = sodium.crypto_scalarmult(sk, pk)
    assert out != bytes(32)
    return out


def sign(seed: bytes, message: bytes) -> bytes:
    return nacl.signing.SigningKey(seed).sign(message).signature


def verify(public: bytes, message: bytes, signature: bytes) -> None:
    nacl.signing.VerifyKey(public).verify(message, signature)


def aead_seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, aad)


def aead_open(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).decrypt(nonce(counter), ciphertext, aad)


def keystream(key: bytes, length: int) -> bytes:
    """The CSPRNG stand-in: ChaCha20-IETF, nonce "LibsodiumDRG", counter 0 (pyca/cryptography)."""
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 4 + b"LibsodiumDRG"), mode=None)
    return cipher.encryptor().update(b"\x00" * length)


class Csprng:
    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.key = key
        self.pos = 0
        self.reads: list[bytes] = []

    def read(self, n: int) -> bytes:
        end = self.pos + n
        need = max(0, end - len(self.prefix))
        data = (self.prefix + keystream(self.key, need))[self.pos : end]
        self.pos = end
        self.reads.append(data)
        return data


# --------------------------------------------------------------------------------------------
# §2.1 msgpack encoder (own implementation)
# --------------------------------------------------------------------------------------------


def pack(o: Any) -> bytes:
    if o is None:
        return b"\xc0"
    if o is True:
        return b"\xc3"
    if o is False:
        return b"\xc2"
    if isinstance(o, int):
        if 0 <= o < 0x80:
            return bytes([o])
        if -32 <= o < 0:
            return bytes([o & 0xFF])
        if o >= 0:
            for tag, fmt, lim in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32)):
                if o < lim:
                    return bytes([tag]) + struct.pack(fmt, o)
            assert o < 1 << 64
            return b"\xcf" + struct.pack(">Q", o)
        for tag, fmt, lim in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15), (0xD2, ">i", 1 << 31)):
            if o >= -lim:
                return bytes([tag]) + struct.pack(fmt, o)
        assert o >= -(1 << 63)
        return b"\xd3" + struct.pack(">q", o)
    if isinstance(o, float):
        assert math.isfinite(o)
        return b"\xcb" + struct.pack(">d", o)
    if isinstance(o, str):
        raw = o.encode()
        n = len(raw)
        if n < 32:
            head = bytes([0xA0 | n])
        elif n < 1 << 8:
            head = b"\xd9" + struct.pack(">B", n)
        elif n < 1 << 16:
            head = b"\xda" + struct.pack(">H", n)
        else:
            head = b"\xdb" + struct.pack(">I", n)
        return head + raw
    if isinstance(o, bytes | bytearray):
        n = len(o)
        if n < 1 << 8:
            head = b"\xc4" + struct.pack(">B", n)
        elif n < 1 << 16:
            head = b"\xc5" + struct.pack(">H", n)
        else:
            head = b"\xc6" + struct.pack(">I", n)
        return head + bytes(o)
    if isinstance(o, list | tuple):
        n = len(o)
        head = bytes([0x90 | n]) if n < 16 else (b"\xdc" + struct.pack(">H", n))
        return head + b"".join(pack(x) for x in o)
    if isinstance(o, dict):
        n = len(o)
        head = bytes([0x80 | n]) if n < 16 else (b"\xde" + struct.pack(">H", n))
        return head + b"".join(pack(k) + pack(v) for k, v in o.items())
    raise TypeError(type(o))


def canonical_value(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: canonical_value(o[k]) for k in sorted(o)}
    if isinstance(o, list | tuple):
        return [canonical_value(x) for x in o]
    return o


def canonical(o: Any) -> bytes:
    return pack(canonical_value(o))


# --------------------------------------------------------------------------------------------
# §2.3 the message table, transcribed from the spec
# --------------------------------------------------------------------------------------------

MESSAGES: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("ClientHello", ("version", "site_id", "ephemeral_key", "nonce")),
    2: ("ServerHello", ("version", "ephemeral_key", "signature")),
    3: ("ClientAuth", ("signature",)),
    4: ("Reject", ("reason",)),
    10: ("Welcome", ("run_id", "site_index", "num_sites", "spec")),
    11: ("Heartbeat", ("seq",)),
    20: ("FitIns", ("round", "attempt", "params", "config")),
    21: ("FitRes", ("round", "attempt", "update", "num_samples", "metrics")),
    22: ("Decline", ("round", "attempt", "reason", "permanent")),
    30: ("EvaluateIns", ("round", "params", "split")),
    31: ("EvaluateRes", ("round", "split", "num_examples", "metrics", "predictions")),
    40: ("RoundAborted", ("round", "attempt", "reason")),
    41: ("Shutdown", ("reason", "final")),
    50: (
        "SecAggStart",
        ("round", "attempt", "participants", "vector_len", "quant", "prg", "degree", "threshold"),
    ),
    51: ("AdvertiseKeys", ("round", "attempt", "c_pk", "s_pk", "signature")),
    52: ("KeyRoster", ("round", "attempt", "advertised", "entries")),
    53: ("ShareKeys", ("round", "attempt", "shares")),
    54: ("ShareDelivery", ("round", "attempt", "shares")),
    55: ("MaskedInput", ("round", "attempt", "vector")),
    56: ("ConsistencyCheck", ("round", "attempt", "survivors")),
    57: ("ConsistencySig", ("round", "attempt", "masked_with", "signature")),
    58: ("UnmaskRequest", ("round", "attempt", "survivors", "dropped", "signatures")),
    59: ("UnmaskResponse", ("round", "attempt", "b_shares", "s_shares")),
}
TAGS = {name: tag for tag, (name, _) in MESSAGES.items()}

ROUND = ("int", 1, 2**63 - 1)
ATTEMPT = ("int", 1, 65536)
ID = ("int", 0, 2**31 - 1)
REASON = ("str", 4096)
SPLIT = ("enum", ("val", "test"))

# field -> type, per tag (§2.3); compound types are tuples interpreted by check_value()
FIELD_TYPES: dict[int, dict[str, Any]] = {
    1: {"version": ("int", 0, 65535), "site_id": ID, "ephemeral_key": ("bin", 32), "nonce": ("bin", 16)},
    2: {"version": ("int", 0, 65535), "ephemeral_key": ("bin", 32), "signature": ("bin", 64)},
    3: {"signature": ("bin", 64)},
    4: {"reason": REASON},
    10: {
        "run_id": ("str", 128),
        "site_index": ("int", 0, 2**20),
        "num_sites": ("int", 1, 2**20),
        "spec": ("map",),
    },
    11: {"seq": ("int", 0, 2**63 - 1)},
    20: {"round": ROUND, "attempt": ATTEMPT, "params": ("tensors",), "config": ("map",)},
    21: {
        "round": ROUND,
        "attempt": ATTEMPT,
        "update": ("tensors",),
        "num_samples": ("int", 1, 2**40),
        "metrics": ("metrics",),
    },
    22: {"round": ROUND, "attempt": ATTEMPT, "reason": REASON, "permanent": ("bool",)},
    30: {"round": ("int", 0, 2**63 - 1), "params": ("tensors",), "split": SPLIT},
    31: {
        "round": ("int", 0, 2**63 - 1),
        "split": SPLIT,
        "num_examples": ("int", 0, 2**40),
        "metrics": ("metrics",),
        "predictions": ("tensors",),
    },
    40: {"round": ROUND, "attempt": ATTEMPT, "reason": REASON},
    41: {"reason": REASON, "final": ("bool",)},
    50: {
        "round": ROUND,
        "attempt": ATTEMPT,
        "participants": ("ids",),
        "vector_len": ("int", 1, 2**34),
        "quant": ("map",),
        "prg": ("str", 32),
        "degree": ("int", 0, 65536),
        "threshold": ("int", 1, 65536),
    },
    51: {
        "round": ROUND,
        "attempt": ATTEMPT,
        "c_pk": ("bin", 32),
        "s_pk": ("bin", 32),
        "signature": ("bin", 64),
    },
    52: {
        "round": ROUND,
        "attempt": ATTEMPT,
        "advertised": ("ids",),
        "entries": ("rows", (ID, ("bin", 32), ("bin", 32), ("bin", 64))),
    },
    53: {"round": ROUND, "attempt": ATTEMPT, "shares": ("rows", (ID, ("binle", 4096)))},
    54: {"round": ROUND, "attempt": ATTEMPT, "shares": ("rows", (ID, ("binle", 4096)))},
    55: {"round": ROUND, "attempt": ATTEMPT, "vector": ("tensors",)},
    56: {"round": ROUND, "attempt": ATTEMPT, "survivors": ("ids",)},
    57: {"round": ROUND, "attempt": ATTEMPT, "masked_with": ("ids",), "signature": ("bin", 64)},
    58: {
        "round": ROUND,
        "attempt": ATTEMPT,
        "survivors": ("ids",),
        "dropped": ("ids",),
        "signatures": ("rows", (ID, ("ids",), ("bin", 64))),
    },
    59: {
        "round": ROUND,
        "attempt": ATTEMPT,
        "b_shares": ("rows", (ID, ("bin", 68))),
        "s_shares": ("rows", (ID, ("bin", 68))),
    },
}
TENSOR_FIELDS = {
    tag: [f for f, t in types.items() if t == ("tensors",)] for tag, types in FIELD_TYPES.items()
}

DTYPES = {"<f2": 2, "<f4": 4, "<f8": 8, "|i1": 1, "|u1": 1, "<i4": 4, "<u4": 4, "<i8": 8, "<u8": 8, "|b1": 1}


def test_table_matches_field_types():
    for tag, (_, fields) in MESSAGES.items():
        assert tuple(FIELD_TYPES[tag]) == fields


# --------------------------------------------------------------------------------------------
# Typed vector values -> Python values
# --------------------------------------------------------------------------------------------


class Tensors:
    """A tensor field: header specs plus raw bytes, in spec order."""

    def __init__(self, items: list[tuple[str, str, list[int], bytes]]) -> None:
        self.items = items

    def specs(self) -> list[list[Any]]:
        return [[name, dtype, list(shape)] for name, dtype, shape, _ in self.items]

    def data(self) -> list[bytes]:
        return [raw for *_, raw in self.items]


def typed(tv: dict[str, Any]) -> Any:
    t, v = tv["type"], tv["value"]
    if t == "int":
        assert isinstance(v, int) and not isinstance(v, bool)
        return v
    if t == "float":
        return float(v)
    if t == "str":
        assert isinstance(v, str)
        return v
    if t == "bool":
        assert isinstance(v, bool)
        return v
    if t == "nil":
        assert v is None
        return None
    if t == "bin":
        return unhex(v)
    if t == "map":
        return {k: typed(x) for k, x in v}
    if t == "list":
        return [typed(x) for x in v]
    if t == "tensors":
        return Tensors([(x["name"], x["dtype"], list(x["shape"]), unhex(x["data_hex"])) for x in v])
    raise AssertionError(t)


def encode_message(tag: int, body: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    """The header (§2.1) and the tensor bytes (§2.2) of a message."""
    wire: dict[str, Any] = {}
    tensors: list[bytes] = []
    for name, value in body.items():
        if isinstance(value, Tensors):
            wire[name] = value.specs()
            tensors.extend(value.data())
        else:
            wire[name] = value
    return pack([1, tag, wire]), tensors


def plain(tag: int, body: dict[str, Any]) -> bytes:
    header, tensors = encode_message(tag, body)
    return u32(len(header)) + header + b"".join(tensors)


def vector_message(msg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    tag = msg["tag"]
    assert MESSAGES[tag][0] == msg["type"]
    return tag, {name: typed(tv) for name, tv in msg["fields"]}


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    return DTYPES[dtype] * math.prod(shape)


# --------------------------------------------------------------------------------------------
# 1. messages.json
# --------------------------------------------------------------------------------------------


def test_messages_cover_every_type():
    assert sorted(m["tag"] for m in load("messages.json")) == sorted(MESSAGES)


@pytest.mark.parametrize("index", range(23))
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


class ProtocolError(Exception):
    pass


def require(cond: bool, why: str = "violation") -> None:
    if not cond:
        raise ProtocolError(why)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_scalar_map(v: Any, depth: int = 1) -> None:
    require(isinstance(v, dict) and len(v) <= 256 and depth <= 4, "map")
    for k, x in v.items():
        require(isinstance(k, str) and len(k) <= 256, "map key")
        check_scalar(x, depth)


def check_scalar(x: Any, depth: int) -> None:
    if x is None or isinstance(x, bool | int | str):
        return
    if isinstance(x, float):
        require(math.isfinite(x), "non-finite")
    elif isinstance(x, list):
        require(len(x) <= 4096, "list")
        for y in x:
            require(not isinstance(y, list), "nested list")
            check_scalar(y, depth)
    elif isinstance(x, dict):
        check_scalar_map(x, depth + 1)
    else:
        raise ProtocolError("scalar type")


def check_value(t: tuple, v: Any) -> None:
    kind = t[0]
    if kind == "int":
        require(is_int(v) and t[1] <= v <= t[2], "int")
    elif kind == "bin":
        require(isinstance(v, bytes) and len(v) == t[1], "bin")
    elif kind == "binle":
        require(isinstance(v, bytes) and len(v) <= t[1], "bin")
    elif kind == "str":
        require(isinstance(v, str) and len(v) <= t[1], "str")
    elif kind == "enum":
        require(isinstance(v, str) and v in t[1], "enum")
    elif kind == "bool":
        require(isinstance(v, bool), "bool")
    elif kind == "map":
        check_scalar_map(v)
    elif kind == "metrics":
        require(isinstance(v, dict) and len(v) <= 64, "metrics")
        for k, x in v.items():
            require(isinstance(k, str) and len(k) <= 256, "metrics key")
            require(is_int(x) or (isinstance(x, float) and math.isfinite(x)), "metrics value")
    elif kind == "ids":
        require(isinstance(v, list) and len(v) <= 65536, "ids")
        for x in v:
            check_value(ID, x)
        require(len(set(v)) == len(v), "repeated id")
    elif kind == "rows":
        require(isinstance(v, list) and len(v) <= 65536, "rows")
        for row in v:
            require(isinstance(row, list) and len(row) == len(t[1]), "row")
            for sub, x in zip(t[1], row, strict=True):
                check_value(sub, x)
        require(len({row[0] for row in v}) == len(v), "repeated id")
    elif kind == "tensors":
        require(isinstance(v, list), "tensors")
        names = set()
        for spec in v:
            require(isinstance(spec, list) and len(spec) == 3, "tensor spec")
            name, dtype, shape = spec
            require(isinstance(name, str) and 1 <= len(name) <= 256 and name not in names, "name")
            names.add(name)
            require(isinstance(dtype, str) and dtype in DTYPES, "dtype")
            require(isinstance(shape, list) and len(shape) <= 8, "shape")
            for d in shape:
                require(is_int(d) and 0 <= d < 2**40, "dim")
    else:
        raise AssertionError(kind)


def check_header(h: Any, max_message_bytes: int) -> list[int]:
    """Validate a decoded header; return the byte sizes of its tensors, in order."""
    require(isinstance(h, list) and len(h) == 3, "not [version, type, body]")
    version, tag, body = h
    require(is_int(version) and version == 1, "version")
    require(is_int(tag) and tag in MESSAGES, "unknown type")
    require(isinstance(body, dict), "body")
    types = FIELD_TYPES[tag]
    require(set(body) == set(types), "field set")
    for name, t in types.items():
        check_value(t, body[name])
    if tag == 10:
        require(body["site_index"] < body["num_sites"], "site_index")
    if tag == 55:
        vec = body["vector"]
        require(len(vec) == 1 and vec[0][0] == "y" and len(vec[0][2]) == 1, "vector")
        require(vec[0][1] in ("<u4", "<u8"), "vector dtype")
    if tag == 31:
        preds = body["predictions"]
        if body["split"] == "val":
            require(preds == [], "predictions")
        else:
            require([p[0] for p in preds] == ["scores", "labels"], "predictions")
    if tag == 59:
        require(not {r[0] for r in body["b_shares"]} & {r[0] for r in body["s_shares"]}, "both")
    sizes = [tensor_nbytes(dtype, shape) for f in TENSOR_FIELDS[tag] for _, dtype, shape in body[f]]
    require(sum(sizes) <= max_message_bytes, "max_message_bytes")
    return sizes


def decode_header(raw: bytes) -> Any:
    def no_ext(code, data):
        raise ProtocolError("ext")

    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            ext_hook=no_ext,
            max_str_len=65536,
            max_bin_len=4194304,
            max_array_len=65536,
            max_map_len=4096,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"decode: {exc}") from exc


def body_from_wire(tag: int, body: dict[str, Any], tensors: list[bytes]) -> dict[str, Any]:
    """A decoded body with its tensor fields rebuilt as Tensors, in the §2.3 order."""
    out: dict[str, Any] = {}
    it = iter(tensors)
    for name in MESSAGES[tag][1]:
        value = body[name]
        if name in TENSOR_FIELDS[tag]:
            value = Tensors([(n, d, list(s), next(it)) for n, d, s in value])
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# 4. aead.json, keystream.json
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


def identity_public(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def handshake_keys(v: dict[str, Any]) -> dict[str, bytes]:
    site_seed = unhex(v["site_identity_seed_hex"])
    coord_seed = unhex(v["coordinator_identity_seed_hex"])
    ec_sk = unhex(v["site_ephemeral_secret_hex"])
    es_sk = unhex(v["coordinator_ephemeral_secret_hex"])
    ec, es = x25519_pk(ec_sk), x25519_pk(es_sk)
    c_pub, s_pub = identity_public(site_seed), identity_public(coord_seed)
    hello = plain(
        1, {"version": 1, "site_id": v["site_id"], "ephemeral_key": ec, "nonce": unhex(v["client_nonce_hex"])}
    )
    h1 = H("asagiri-hs1", hello + es + s_pub)
    server_hello = plain(
        2, {"version": 1, "ephemeral_key": es, "signature": sign(coord_seed, b"asagiri server" + h1)}
    )
    h2 = H("asagiri-hs2", h1 + c_pub)
    client_auth = plain(3, {"signature": sign(site_seed, b"asagiri client" + h2)})
    rx, tx = sodium.crypto_kx_client_session_keys(ec, ec_sk, es)
    srx, stx = sodium.crypto_kx_server_session_keys(es, es_sk, ec)
    assert (rx, tx) == (stx, srx)
    bind = lambda k: HK(k, "asagiri-session", h2)  # noqa: E731
    return {
        "hello": hello,
        "server_hello": server_hello,
        "client_auth": client_auth,
        "site_tx": bind(tx),
        "site_rx": bind(rx),
        "coord_tx": bind(stx),
        "coord_rx": bind(srx),
        "h1": h1,
        "h2": h2,
        "c_pub": c_pub,
        "s_pub": s_pub,
    }


def seal_message(key: bytes, counter: int, tag: int, body: dict[str, Any], chunks=None):
    """Frames (u32 length ‖ payload) of one message (§4); returns (frames, next counter)."""
    header, tensors = encode_message(tag, body)
    frames = []

    def frame(kind: int, pt: bytes) -> None:
        nonlocal counter
        payload = bytes([kind]) + aead_seal(key, counter, pt, bytes([kind]))
        frames.append(u32(len(payload)) + payload)
        counter += 1

    frame(1, header)
    for data in tensors:
        pos = 0
        while pos < len(data):
            n = chunks(len(data) - pos)
            frame(2, data[pos : pos + n])
            pos += n
    return frames, counter


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


class Receiver:
    def __init__(self, key: bytes, max_frame_bytes: int, max_message_bytes: int) -> None:
        self.key = key
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self.counter = 0
        self.pending: tuple[Any, list[int], list[bytes]] | None = None  # header, sizes, chunks
        self.messages: list[tuple[int, dict[str, Any], list[bytes]]] = []

    def feed(self, frame: bytes) -> None:
        require(len(frame) >= 4, "short prefix")
        (n,) = struct.unpack(">I", frame[:4])
        require(n <= self.max_frame_bytes, "frame too big")  # before reading (allocating) it
        payload = frame[4:]
        require(len(payload) == n, "truncated")
        require(n >= 17, "payload shorter than kind and tag")
        kind = payload[0]
        require(kind in (1, 2), "kind")
        try:
            pt = aead_open(self.key, self.counter, payload[1:], bytes([kind]))
        except InvalidTag as exc:
            raise ProtocolError("aead") from exc
        self.counter += 1
        if kind == 1:
            require(self.pending is None, "header while chunks are due")
            header = decode_header(pt)
            sizes = check_header(header, self.max_message_bytes)
            self.pending = (header, sizes, [b"" for _ in sizes])
        else:
            require(self.pending is not None, "chunk with no pending header")
            assert self.pending is not None
            _, sizes, got = self.pending
            i = next(j for j in range(len(sizes)) if len(got[j]) < sizes[j])
            remaining = sizes[i] - len(got[i])
            require(1 <= len(pt) <= remaining, "chunk size")
            got[i] += pt
        self._complete()

    def _complete(self) -> None:
        assert self.pending is not None
        header, sizes, got = self.pending
        if all(len(g) == s for g, s in zip(got, sizes, strict=True)):
            _, tag, body = header
            self.messages.append((tag, body, got))
            self.pending = None


def frames_keys() -> dict[str, bytes]:
    return handshake_keys(load("handshake.json"))


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


REJECT_REASONS = {
    "a ciphertext byte flipped": "aead",
    "a header sealed as kind 2 and sent as kind 1: the kind is the aad": "aead",
    "a replayed frame": "aead",
    "reordered frames": "aead",
    "a frame reflected back: sealed with the site's own tx key": "aead",
    "a chunk with no pending header": "chunk with no pending header",
    "a header while chunks are due": "header while chunks are due",
    "a chunk longer than what its tensor lacks": "chunk size",
    "a chunk of 0 bytes": "chunk size",
    "an unknown frame kind": "kind",
    "a payload shorter than kind and tag": "payload shorter than kind and tag",
    "a length prefix above max_frame_bytes": "frame too big",
    "protocol version 2": "version",
    "an unknown message type": "unknown type",
    "a missing field": "field set",
    "an extra field": "field set",
    "str where an integer is due": "int",
    "float where an integer is due": "int",
    "bin where str is due": "str",
    "an attempt out of range": "int",
    "a repeated id": "repeated id",
    "tensors above max_message_bytes": "max_message_bytes",
    "a big-endian dtype": "dtype",
    "a repeated tensor name": "name",
    "a header that is not [version, type, body]": "not [version, type, body]",
}


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

PRIME = 2**521 - 1


def draw_coefficient(rng: Csprng) -> int:
    while True:
        a = int.from_bytes(rng.read(66), "big") & PRIME
        if a < PRIME:
            return a


def shamir_share(secret: bytes, n: int, t: int, rng: Csprng) -> tuple[list[int], list[bytes]]:
    s = int.from_bytes(secret, "big")
    coeffs = [draw_coefficient(rng) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed([s, *coeffs]):
            y = (y * x + c) % PRIME
        shares.append(struct.pack(">H", x) + y.to_bytes(66, "big"))
    return coeffs, shares


def shamir_reconstruct(shares: list[bytes]) -> bytes:
    points = [(int.from_bytes(sh[:2], "big"), int.from_bytes(sh[2:], "big")) for sh in shares]
    assert all(len(sh) == 68 for sh in shares)
    assert len({x for x, _ in points}) == len(points)
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    assert total < 2**256
    return total.to_bytes(32, "big")


def coeff_hex(c: int) -> str:
    return c.to_bytes(66, "big").hex()


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


def prg(seed: bytes, kind: str, nbytes: int) -> bytes:
    """PRG(seed). NOT IN THE SPEC: the key derivations below were recovered from the vectors."""
    if kind == "aes128-ctr":
        key = H128("asagiri-prg-aes", seed)
        return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))
    if kind == "chacha20":
        return keystream(H("asagiri-prg", seed), nbytes)
    raise AssertionError(kind)


def prg_words(seed: bytes, kind: str, count: int, bits: int) -> list[int]:
    w = bits // 8
    raw = prg(seed, kind, w * count)
    return [int.from_bytes(raw[w * i : w * (i + 1)], "little") for i in range(count)]


def plan(bits: int, clip: float, max_samples: int, max_sites: int) -> dict[str, Any] | None:
    limit = 2 ** (bits - 1) - 1
    if max_sites * max_samples > limit:
        return None
    c32 = Fraction(float(np.float32(clip)))
    eps = 1 + Fraction(1, 2**51)

    def fits(k: int) -> bool:
        x = max_samples * c32 * 2**k
        return max_sites * (math.floor(x * eps) + 1) <= limit

    if not fits(0):
        return None
    k = 0
    while fits(k + 1):
        k += 1
    return {
        "bits": bits,
        "clip": clip,
        "scale": float(2**k),
        "max_samples": max_samples,
        "max_sites": max_sites,
    }


def quantise(delta, n: int, q_plan: dict[str, Any], noise: list[int]) -> tuple[list[int], int]:
    bits, scale = q_plan["bits"], q_plan["scale"]
    big_c = np.float32(q_plan["clip"])
    f = float(n) * scale
    out, clipped = [], 0
    for i, d in enumerate(np.asarray(delta, dtype=np.float32)):
        assert not math.isnan(d)
        c = d
        if d > big_c:
            c, clipped = big_c, clipped + 1
        elif d < -big_c:
            c, clipped = -big_c, clipped + 1
        v = float(c) * f
        v2 = v + noise[i] * 2.0**-16
        q = math.floor(v2)
        assert abs(q) < 2 ** (bits - 1)
        out.append(q % 2**bits)
    out.append(n)
    return out, clipped


def le_words(values: list[int], bits: int) -> bytes:
    return b"".join(x.to_bytes(bits // 8, "little") for x in values)


def noise_words(seed: bytes, kind: str, d: int) -> list[int]:
    raw = prg(seed, kind, 2 * d)
    return [int.from_bytes(raw[2 * i : 2 * i + 2], "little") for i in range(d)]


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


def params_digest(tensors: list[tuple[str, str, list[int], bytes]]) -> bytes:
    ordered = sorted(tensors, key=lambda t: t[0])
    specs = [[name, dtype, list(shape)] for name, dtype, shape, _ in ordered]
    return H("asagiri-params", canonical(specs) + b"".join(raw for *_, raw in ordered))


def spec_digest(spec: dict[str, Any]) -> bytes:
    return H("asagiri-spec", canonical(spec))


def round_digest(
    run_id,
    rnd,
    attempt,
    participants,
    vector_len,
    quant,
    prg_name,
    degree,
    threshold,
    p_digest,
    config,
    s_digest,
) -> bytes:
    q = [quant["bits"], float(quant["clip"]), float(quant["scale"]), quant["max_samples"], quant["max_sites"]]
    value = [
        run_id,
        rnd,
        attempt,
        sorted(participants),
        vector_len,
        q,
        prg_name,
        degree,
        threshold,
        p_digest,
        config,
        s_digest,
    ]
    return H("asagiri-round", canonical(value))


def make_ctx(run_id: str, rnd: int, attempt: int, digest: bytes) -> bytes:
    return run_id.encode() + b"\x00" + u32(rnd) + u32(attempt) + digest


def key_text(ctx: bytes, u: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"asagiri-secagg-keys\x00" + ctx + u32(u) + c_pk + s_pk


def survivor_text(ctx: bytes, survivors, masked_with) -> bytes:
    return b"asagiri-secagg-survivors\x00" + ctx + ids(survivors) + ids(masked_with)


def graph(ctx: bytes, advertised: list[int], degree: int):
    """(graph seed, ring keys, ring, neighbours) over U1 (§6.4 step 2)."""
    seed = H("asagiri-graph", ctx + ids(advertised))
    ring_keys = {u: H("asagiri-ring", seed + u32(u)) for u in advertised}
    ring = sorted(advertised, key=lambda u: ring_keys[u])
    n = len(advertised)
    nb: dict[int, set[int]] = {u: set() for u in advertised}
    if degree == 0 or degree >= n - 1:
        for u in advertised:
            nb[u] = set(advertised) - {u}
    else:
        for i, u in enumerate(ring):
            js = [(i + j) % n for j in range(1, degree // 2 + 1)]
            js += [(i - j) % n for j in range(1, degree // 2 + 1)]
            if degree % 2:
                js.append((i + n // 2) % n)
            for k in js:
                if ring[k] != u:
                    nb[u].add(ring[k])
                    nb[ring[k]].add(u)
    return seed, ring_keys, ring, {u: sorted(v) for u, v in nb.items()}


def derive_round(secagg: dict[str, Any], n: int) -> tuple[int, int]:
    """(degree, threshold) of §6.2."""
    if secagg["mode"] == "complete":
        degree = 0
    else:
        k = secagg["shares"]
        if k is None:
            k = max(3, 2 * (max(n, 2) - 1).bit_length() + 1)
        degree = k - 1 if k < n else 0
    g = n if degree == 0 else degree + 1
    m = g // 2 + 1
    spec_t = secagg["threshold"]
    return degree, min(g, max(m, m if spec_t is None else spec_t))


def spec_tensors(entries: dict[str, Any]) -> list[tuple[str, str, list[int], bytes]]:
    return [
        (name, t["dtype"], list(t["shape"]), np.asarray(t["values"], dtype=t["dtype"]).tobytes())
        for name, t in entries.items()
    ]


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


def signed_int(x: int, bits: int) -> int:
    return x - 2**bits if x >= 2 ** (bits - 1) else x


@cache
def compute_round(index: int) -> dict[str, Any]:
    """Every value of round `index`, computed from its inputs only."""
    r = load("secagg_round.json")[index]
    run_id, rnd, attempt = r["run_id"], r["round"], r["attempt"]
    participants = sorted(r["participants"])
    spec = r["spec"]
    secagg = spec["secagg"]
    params = [(t["name"], t["dtype"], list(t["shape"]), unhex(t["data_hex"])) for t in r["fit_ins"]["params"]]
    config = typed(r["fit_ins"]["config"])
    out: dict[str, Any] = {"params": params, "config": config}
    out["S"] = s_digest = spec_digest(spec)
    out["P"] = p_digest = params_digest(params)
    n_sites = len(participants)
    degree, threshold = derive_round(secagg, n_sites)
    quant = plan(secagg["bits"], secagg["clip"], secagg["max_samples_per_site"], n_sites)
    assert quant is not None
    vector_len = 1 + sum(math.prod(shape) for _, _, shape, _ in params)
    prg_name = secagg["prg"]
    bits = quant["bits"]
    mod = 2**bits
    out.update(degree=degree, threshold=threshold, quant=quant, vector_len=vector_len, prg=prg_name)
    out["D"] = digest = round_digest(
        run_id,
        rnd,
        attempt,
        participants,
        vector_len,
        quant,
        prg_name,
        degree,
        threshold,
        p_digest,
        config,
        s_digest,
    )
    out["ctx"] = ctx = make_ctx(run_id, rnd, attempt, digest)
    # the scenario: everyone advertises and shares; drop_after_share never sends its masked input
    u1 = u2 = sorted(participants)
    u3 = u4 = sorted(set(u2) - set(r["drop_after_share"]))
    assert [u1, u2, u3, u4] == [sorted(r[k]) for k in ("advertised", "shared", "survivors", "signed")]
    dropped = sorted(set(u2) - set(u3))
    out.update(U1=u1, U2=u2, U3=u3, U4=u4, dropped=dropped)
    gseed, ring_keys, ring, nb = graph(ctx, u1, degree)
    out.update(graph_seed=gseed, ring_keys=ring_keys, ring=ring, neighbours=nb)
    d = vector_len - 1
    sites: dict[int, dict[str, Any]] = {}
    # Advertise and Share
    for u in u1:
        sv = r["sites"][str(u)]
        s: dict[str, Any] = sites.setdefault(u, {})
        s["identity_seed"] = unhex(sv["identity_seed_hex"])
        s["identity_public"] = identity_public(s["identity_seed"])
        rng = Csprng(unhex(sv["rng_key_hex"]))
        s["rng"] = rng
        s["c_sk"], s["s_sk"], s["b"] = rng.read(32), rng.read(32), rng.read(32)
        s["c_pk"], s["s_pk"] = x25519_pk(s["c_sk"]), x25519_pk(s["s_sk"])
        s["keys_text"] = key_text(ctx, u, s["c_pk"], s["s_pk"])
        s["keys_signature"] = sign(s["identity_seed"], s["keys_text"])
        s["group"] = group = [u, *nb[u]]
        s["b_coefficients"], s["b_shares"] = shamir_share(s["b"], len(group), threshold, rng)
        s["s_coefficients"], s["s_shares"] = shamir_share(s["s_sk"], len(group), threshold, rng)
    for u in u1:
        s = sites[u]
        verify(s["identity_public"], s["keys_text"], s["keys_signature"])
        s["shares_to"] = {}
        for x, v in enumerate(s["group"][1:], start=2):
            shared = dh(s["c_sk"], sites[v]["c_pk"])
            assert shared == dh(sites[v]["c_sk"], s["c_pk"])
            key = H("asagiri-share", shared + ctx + u32(u) + u32(v))
            pt = pack([run_id, rnd, attempt, u, v, s["b_shares"][x - 1], s["s_shares"][x - 1]])
            ct = aead_seal(key, 0, pt, ctx)
            s["shares_to"][v] = {"share_key": key, "plaintext": pt, "ciphertext": ct}
    # Deliver and Mask
    for u in u2:
        s = sites[u]
        s["masked_with"] = [v for v in nb[u] if v in u2]
        for v in s["masked_with"]:  # the receiver opens what it was sent
            st = sites[v]["shares_to"][u]
            assert aead_open(st["share_key"], 0, st["ciphertext"], ctx) == st["plaintext"]
            decoded = msgpack.unpackb(st["plaintext"], raw=False)
            assert decoded[:5] == [run_id, rnd, attempt, v, u]
    for u in u3:
        s = sites[u]
        sv = r["sites"][str(u)]
        s["noise_seed"] = s["rng"].read(32)
        s["noise"] = noise_words(s["noise_seed"], prg_name, d)
        s["n"] = min(sv["num_samples"], quant["max_samples"])
        s["q"], s["clipped"] = quantise(sv["delta"], s["n"], quant, s["noise"])
        s["pair_seeds"] = {}
        for v in s["masked_with"]:
            lo, hi = min(u, v), max(u, v)
            seed = H("asagiri-pair", dh(s["s_sk"], sites[v]["s_pk"]) + ctx + u32(lo) + u32(hi))
            assert seed == H("asagiri-pair", dh(sites[v]["s_sk"], s["s_pk"]) + ctx + u32(lo) + u32(hi))
            s["pair_seeds"][v] = seed
        s["prg_first_words"] = {"b": prg_words(s["b"], prg_name, 4, bits)}
        self_mask = prg_words(s["b"], prg_name, vector_len, bits)
        y = [(a + b) % mod for a, b in zip(s["q"], self_mask, strict=True)]
        for v, seed in s["pair_seeds"].items():
            s["prg_first_words"][v] = prg_words(seed, prg_name, 4, bits)
            sigma = 1 if u < v else -1
            m = prg_words(seed, prg_name, vector_len, bits)
            y = [(a + sigma * b) % mod for a, b in zip(y, m, strict=True)]
        s["y"] = y
        s["survivors_text"] = survivor_text(ctx, u3, s["masked_with"])
        s["survivors_signature"] = sign(s["identity_seed"], s["survivors_text"])
    out["sites"] = sites
    # Unmask: each signer reveals what it holds
    for u in u4:
        s = sites[u]
        held = [o for o in s["group"] if o == u or o in s["masked_with"]]

        def share_of(o: int, which: str, holder: int = u) -> bytes:
            return sites[o][which][sites[o]["group"].index(holder)]

        s["unmask_b"] = [[o, share_of(o, "b_shares")] for o in sorted(held) if o in u3]
        s["unmask_s"] = [[o, share_of(o, "s_shares")] for o in sorted(held) if o in dropped]
    revealed_b: dict[int, list[bytes]] = {}
    revealed_s: dict[int, list[bytes]] = {}
    for u in u4:
        for o, sh in sites[u]["unmask_b"]:
            revealed_b.setdefault(o, []).append(sh)
        for o, sh in sites[u]["unmask_s"]:
            revealed_s.setdefault(o, []).append(sh)
    out["b"] = {o: shamir_reconstruct(revealed_b[o][:threshold]) for o in u3}
    out["s_sk"] = {o: shamir_reconstruct(revealed_s[o][:threshold]) for o in dropped}
    for o, sk in out["s_sk"].items():
        assert x25519_pk(sk) == sites[o]["s_pk"]
    ring_sum = [sum(col) % mod for col in zip(*(sites[u]["y"] for u in u3), strict=True)]
    out["ring_sum"] = ring_sum
    z = list(ring_sum)
    for u in u3:
        self_mask = prg_words(out["b"][u], prg_name, vector_len, bits)
        z = [(a - b) % mod for a, b in zip(z, self_mask, strict=True)]
    for o in dropped:
        for u in u3:
            if o in sites[u]["masked_with"]:
                lo, hi = min(u, o), max(u, o)
                seed = H("asagiri-pair", dh(out["s_sk"][o], sites[u]["s_pk"]) + ctx + u32(lo) + u32(hi))
                sigma = 1 if u < o else -1
                m = prg_words(seed, prg_name, vector_len, bits)
                z = [(a - sigma * b) % mod for a, b in zip(z, m, strict=True)]
    out["z"] = z
    out["count"] = signed_int(z[-1], bits)
    out["weighted_sum"] = [signed_int(x, bits) / quant["scale"] for x in z[:-1]]
    return out


def words_hex(values: list[int], bits: int) -> str:
    return le_words(values, bits).hex()


@pytest.mark.parametrize("index", range(2))
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
        if u not in c["U3"]:
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


def transcript_message(c: dict[str, Any], r: dict[str, Any], sender, recipient, name: str):
    """Rebuild one message of the round from the computed values (§6.4)."""
    rnd, attempt = r["round"], r["attempt"]
    head = {"round": rnd, "attempt": attempt}
    sites = c["sites"]
    if sender == "coordinator":
        u = recipient
        if name == "FitIns":
            return {**head, "params": Tensors(c["params"]), "config": c["config"]}
        if name == "SecAggStart":
            q = c["quant"]
            quant = {k: q[k] for k in ("bits", "clip", "scale", "max_samples", "max_sites")}
            return {
                **head,
                "participants": sorted(r["participants"]),
                "vector_len": c["vector_len"],
                "quant": quant,
                "prg": c["prg"],
                "degree": c["degree"],
                "threshold": c["threshold"],
            }
        if name == "KeyRoster":
            entries = [
                [v, sites[v]["c_pk"], sites[v]["s_pk"], sites[v]["keys_signature"]]
                for v in c["neighbours"][u]
            ]
            return {**head, "advertised": c["U1"], "entries": entries}
        if name == "ShareDelivery":
            return {
                **head,
                "shares": [[v, sites[v]["shares_to"][u]["ciphertext"]] for v in sites[u]["masked_with"]],
            }
        if name == "ConsistencyCheck":
            return {**head, "survivors": c["U3"]}
        if name == "UnmaskRequest":
            sigs = [[v, sites[v]["masked_with"], sites[v]["survivors_signature"]] for v in c["U4"]]
            return {**head, "survivors": c["U3"], "dropped": c["dropped"], "signatures": sigs}
        raise AssertionError(name)
    assert recipient == "coordinator"
    s = sites[sender]
    if name == "AdvertiseKeys":
        return {**head, "c_pk": s["c_pk"], "s_pk": s["s_pk"], "signature": s["keys_signature"]}
    if name == "ShareKeys":
        return {**head, "shares": [[v, s["shares_to"][v]["ciphertext"]] for v in c["neighbours"][sender]]}
    if name == "MaskedInput":
        bits = c["quant"]["bits"]
        dtype = {32: "<u4", 64: "<u8"}[bits]
        y = np.asarray(s["y"], dtype=np.dtype(dtype)).tobytes()
        assert y == le_words(s["y"], bits)
        return {**head, "vector": Tensors([("y", dtype, [c["vector_len"]], y)])}
    if name == "ConsistencySig":
        return {**head, "masked_with": s["masked_with"], "signature": s["survivors_signature"]}
    if name == "UnmaskResponse":
        return {**head, "b_shares": s["unmask_b"], "s_shares": s["unmask_s"]}
    raise AssertionError(name)


@pytest.mark.parametrize("index", range(2))
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


def expected_transcript(c: dict[str, Any], r: dict[str, Any]) -> list[tuple[Any, Any, str]]:
    """The message flow of §6.4 for this scenario (who sends what to whom), as a multiset."""
    flow = []
    for u in sorted(r["participants"]):
        flow += [("coordinator", u, "FitIns"), ("coordinator", u, "SecAggStart")]
    for u in c["U1"]:
        flow += [(u, "coordinator", "AdvertiseKeys"), ("coordinator", u, "KeyRoster")]
    for u in c["U2"]:
        flow += [(u, "coordinator", "ShareKeys"), ("coordinator", u, "ShareDelivery")]
    for u in c["U3"]:
        flow += [(u, "coordinator", "MaskedInput"), ("coordinator", u, "ConsistencyCheck")]
    for u in c["U4"]:
        flow += [
            (u, "coordinator", "ConsistencySig"),
            ("coordinator", u, "UnmaskRequest"),
            (u, "coordinator", "UnmaskResponse"),
        ]
    return sorted(flow, key=repr)


@pytest.mark.parametrize("index", range(2))
def test_round_transcript_flow(index):
    r = load("secagg_round.json")[index]
    c = compute_round(index)
    got = sorted(((e["from"], e["to"], e["type"]) for e in r["transcript"]), key=repr)
    assert got == expected_transcript(c, r)


def test_no_package_imports():
    tree = ast.parse(Path(__file__).read_text())
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
    for name in names:
        root = name.split(".")[0]
        assert root not in ("asagiri", "protocol"), name
        assert root in {
            "__future__",
            "ast",
            "hashlib",
            "json",
            "math",
            "struct",
            "fractions",
            "functools",
            "pathlib",
            "typing",
            "msgpack",
            "nacl",
            "numpy",
            "pytest",
            "cryptography",
        }, name
