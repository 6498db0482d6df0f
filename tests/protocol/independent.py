"""A third party's implementation of the Asagiri wire protocol, version 1, written from
protocol/SPEC.md alone: encodings, the handshake, frames, Shamir sharing, quantisation, masking,
the round and its verified sum, and the coordinator's signed round records (§9).  It imports
only the standard library, PyNaCl, pyca/cryptography, blake3, msgpack and NumPy, never the package;
``test_spec_independent.py`` holds it against every vector.

One file on purpose, over 400 lines: it is read side by side with SPEC.md, section by section.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import blake3
import msgpack
import nacl.bindings as sodium
import nacl.signing
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.exceptions import BadSignatureError

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
    22: ("Decline", ("round", "attempt", "rule", "permanent")),
    30: ("EvaluateIns", ("round", "params", "split")),
    31: ("EvaluateRes", ("round", "split", "num_examples", "metrics", "predictions")),
    32: ("RoundRecord", ("round", "record")),
    40: ("RoundAborted", ("round", "attempt", "cause", "detail")),
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
    60: ("SumAnnounce", ("round", "attempt", "total")),
    61: ("SumVouch", ("round", "attempt", "scalars", "signature")),
    62: ("SumProof", ("round", "attempt", "vouches")),
    63: ("SumRecord", ("round", "attempt", "participants", "config", "survivors", "total", "vouches")),
    64: ("ModelAt", ("round", "digest")),
}
TAGS = {name: tag for tag, (name, _) in MESSAGES.items()}

ROUND = ("int", 1, 2**32 - 1)
ATTEMPT = ("int", 1, 65536)
ID = ("int", 0, 2**31 - 1)
REASON = ("str", 4096)
SPLIT = ("enum", ("val", "test"))
# §7: the rules a Decline may name; §4: the causes of an aborted round attempt
RULE = ("enum", ("run_id", "require_secagg", "pinned_peers", "require_dp", "max_epsilon", "max_delta", "spec",
                 "setup", "spec_changed", "model", "train_bounds", "secagg_bounds", "dp_bounds", "min_participants",
                 "min_group", "min_threshold", "min_examples", "batches", "round_params", "replay", "quorum",
                 "component", "stage", "signature", "shares", "survivors", "malformed", "sum", "derive_models", "record",
                 "privacy_budget"))
CAUSE = ("enum", ("too_few_sites", "no_quorum", "threshold", "unmask_failed", "unverified"))

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
    22: {"round": ROUND, "attempt": ("int", 0, 65536), "rule": RULE, "permanent": ("bool",)},
    30: {"round": ("int", 0, 2**32 - 1), "params": ("tensors",), "split": SPLIT},
    31: {
        "round": ("int", 0, 2**32 - 1),
        "split": SPLIT,
        "num_examples": ("int", 0, 2**40),
        "metrics": ("metrics",),
        "predictions": ("tensors",),
    },
    # the record is JSON text, but it travels as bin: its bytes are what the site verifies (§9.1)
    32: {"round": ROUND, "record": ("binle", 1 << 20)},
    40: {"round": ROUND, "attempt": ATTEMPT, "cause": CAUSE, "detail": REASON},
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
    60: {"round": ROUND, "attempt": ATTEMPT, "total": ("tensors",)},
    61: {"round": ROUND, "attempt": ATTEMPT, "scalars": ("binof", (24, 48)), "signature": ("bin", 64)},
    62: {"round": ROUND, "attempt": ATTEMPT, "vouches": ("rows", (ID, ("binof", (24, 48)), ("bin", 64)))},
    63: {"round": ROUND, "attempt": ATTEMPT, "participants": ("ids",), "config": ("map",), "survivors": ("ids",),
         "total": ("tensors",), "vouches": ("rows", (ID, ("binof", (24, 48)), ("bin", 64)))},
    64: {"round": ("int", 0, 2**32 - 1), "digest": ("bin", 32)},
}
TENSOR_FIELDS = {
    tag: [f for f, t in types.items() if t == ("tensors",)] for tag, types in FIELD_TYPES.items()
}

DTYPES = {"<f2": 2, "<f4": 4, "<f8": 8, "|i1": 1, "|u1": 1, "<i4": 4, "<u4": 4, "<i8": 8, "<u8": 8, "|b1": 1}


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
    elif kind == "binof":
        require(isinstance(v, bytes) and len(v) in t[1], "bin")
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
    if tag in (55, 60):
        field, name = ("vector", "y") if tag == 55 else ("total", "s")
        vec = body[field]
        require(len(vec) == 1 and vec[0][0] == name and len(vec[0][2]) == 1, field)
        require(vec[0][1] in ("<u4", "<u8"), f"{field} dtype")
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
    "a cause outside its set": "enum",
    "a repeated id": "repeated id",
    "tensors above max_message_bytes": "max_message_bytes",
    "a big-endian dtype": "dtype",
    "a repeated tensor name": "name",
    "a header that is not [version, type, body]": "not [version, type, body]",
}


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


def prg(seed: bytes, kind: str, nbytes: int) -> bytes:
    """PRG(seed), SPEC §6.1: AES-128-CTR or libsodium's deterministic ChaCha20 under a key hashed from the seed."""
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


def whole_batches(ids: list[int], batch_of: dict[int, set[int]] | None) -> list[int]:
    """The members of `ids` whose whole batch is in `ids` (§6.7); all of them without batches."""
    return sorted(u for u in ids if batch_of is None or batch_of.get(u, {u, -1}) <= set(ids))


def mates(u: int, present: list[int], batch_of: dict[int, set[int]] | None) -> set[int]:
    """The other members of `u`'s batch among `present` (§6.7)."""
    return set() if batch_of is None else (batch_of.get(u, set()) & set(present)) - {u}


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
    # the scenario: everyone advertises and shares; drop_after_share never sends its masked input,
    # and with batches (§6.7) its batch is cut from U3 though the others sent theirs
    batches = secagg.get("batches")
    batch_of = None if batches is None else {u: set(b) for b in batches for u in b}
    u1 = u2 = whole_batches(participants, batch_of)
    senders = sorted(set(u2) - set(r["drop_after_share"]))
    u3 = u4 = whole_batches(senders, batch_of)
    assert [u1, u2, u3, u4] == [sorted(r[k]) for k in ("advertised", "shared", "survivors", "signed")]
    dropped = sorted(set(u2) - set(u3))
    out.update(U1=u1, U2=u2, U3=u3, U4=u4, dropped=dropped, senders=senders)
    gseed, ring_keys, ring, nb = graph(ctx, u1, degree)
    out["roster"] = {u: sorted(set(nb[u]) | mates(u, u1, batch_of)) for u in u1}
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
        s["share_senders"] = [v for v in nb[u] if v in u2]
        s["masked_with"] = sorted(set(s["share_senders"]) | mates(u, u1, batch_of))  # §6.7: its whole batch
        for v in s["share_senders"]:  # the receiver opens what it was sent
            st = sites[v]["shares_to"][u]
            assert aead_open(st["share_key"], 0, st["ciphertext"], ctx) == st["plaintext"]
            decoded = msgpack.unpackb(st["plaintext"], raw=False)
            assert decoded[:5] == [run_id, rnd, attempt, v, u]
    for u in senders:
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
        if u not in u3:
            continue  # its batch was cut (§6.7): it is asked for nothing more
        s["survivors_text"] = survivor_text(ctx, u3, s["masked_with"])
        s["survivors_signature"] = sign(s["identity_seed"], s["survivors_text"])
    out["sites"] = sites
    # Unmask: each signer reveals what it holds
    for u in u4:
        s = sites[u]
        held = [o for o in s["group"] if o == u or o in s["share_senders"]]

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
    out["verify"] = verified_sum(out, ctx, z, u3, bits)
    return out


def challenge_words(seed: bytes, length: int) -> tuple[int, int, list[list[int]], list[list[int]]]:
    """§6.8: (A, B, u, v) of the challenge, each u_k / v_k a list of u64 words."""
    b = math.isqrt(length - 1) + 1
    a = -(-length // b)
    raw = prg(seed, "chacha20", 8 * 3 * (a + b))
    words = [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(3 * (a + b))]
    v = [words[k * b : (k + 1) * b] for k in range(3)]
    u = [words[3 * b + k * a : 3 * b + (k + 1) * a] for k in range(3)]
    return a, b, u, v


def projection(values: list[int], bits: int, u: list[list[int]], v: list[list[int]], b: int) -> list[int]:
    """proj_k of a ring vector (§6.8): signed lifts, modulo 2^(2 bits)."""
    mod = 1 << (2 * bits)
    return [sum(u[k][i // b] * v[k][i % b] * signed_int(x, bits) for i, x in enumerate(values)) % mod
            for k in range(3)]


def verified_sum(c: dict[str, Any], ctx: bytes, z: list[int], u3: list[int], bits: int) -> dict[str, Any]:
    """Steps 9-12 of §6.8: every survivor's vouch for z, and the check each site makes."""
    width = 2 * bits // 8
    mod = 1 << (2 * bits)
    h = blake3.blake3(b"asagiri-sum\0" + le_words(z, bits)).digest()
    seed = H("asagiri-verify", b"asagiri-verify\0" + ctx + h + ids(u3))
    a, b, u, v = challenge_words(seed, len(z))
    proj_z = projection(z, bits, u, v, b)
    vouches = {}
    for site in u3:
        s = c["sites"][site]
        own = projection(s["q"], bits, u, v, b)
        keys, scalars_of = {}, {}
        total = list(own)
        for peer in s["masked_with"]:
            if peer not in u3:
                continue
            lo, hi = min(site, peer), max(site, peer)
            key = H("asagiri-vpair", dh(s["s_sk"], c["sites"][peer]["s_pk"]) + ctx + u32(lo) + u32(hi))
            assert key == H("asagiri-vpair", dh(c["sites"][peer]["s_sk"], s["s_pk"]) + ctx + u32(lo) + u32(hi))
            raw = hashlib.blake2b(seed, digest_size=3 * width, key=key, person=b"asagiri-vmask").digest()
            m = [int.from_bytes(raw[k * width : (k + 1) * width], "big") for k in range(3)]
            sigma = 1 if site < peer else -1
            total = [t + sigma * x for t, x in zip(total, m, strict=True)]
            keys[peer], scalars_of[peer] = key, m
        scalars = b"".join((t % mod).to_bytes(width, "big") for t in total)
        text = b"asagiri-secagg-vouch\0" + ctx + seed + u32(site) + scalars
        vouches[site] = {"z_u": own, "keys": keys, "pair_scalars": scalars_of, "scalars": scalars, "text": text,
                         "signature": sign(s["identity_seed"], text)}
    # the check every survivor makes: the vouches' scalars add up to proj(z)
    for k in range(3):
        added = sum(int.from_bytes(vouches[site]["scalars"][k * width : (k + 1) * width], "big") for site in u3)
        assert added % mod == proj_z[k]
    return {"h": h, "seed": seed, "A": a, "B": b, "u": u, "v": v, "proj_z": proj_z, "vouches": vouches}


def words_hex(values: list[int], bits: int) -> str:
    return le_words(values, bits).hex()


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
                for v in c["roster"][u]
            ]
            return {**head, "advertised": c["U1"], "entries": entries}
        if name == "ShareDelivery":
            return {
                **head,
                "shares": [[v, sites[v]["shares_to"][u]["ciphertext"]] for v in sites[u]["share_senders"]],
            }
        if name == "ConsistencyCheck":
            return {**head, "survivors": c["U3"]}
        if name == "UnmaskRequest":
            sigs = [[v, sites[v]["masked_with"], sites[v]["survivors_signature"]] for v in c["U4"]]
            return {**head, "survivors": c["U3"], "dropped": c["dropped"], "signatures": sigs}
        if name == "SumAnnounce":
            bits = c["quant"]["bits"]
            dtype = {32: "<u4", 64: "<u8"}[bits]
            return {**head, "total": Tensors([("s", dtype, [c["vector_len"]], le_words(c["z"], bits))])}
        if name == "SumProof":
            vouches = c["verify"]["vouches"]
            return {**head, "vouches": [[v, vouches[v]["scalars"], vouches[v]["signature"]] for v in c["U3"]]}
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
    if name == "SumVouch":
        vouch = c["verify"]["vouches"][sender]
        return {**head, "scalars": vouch["scalars"], "signature": vouch["signature"]}
    raise AssertionError(name)


def expected_transcript(c: dict[str, Any], r: dict[str, Any]) -> list[tuple[Any, Any, str]]:
    """The message flow of §6.4 for this scenario (who sends what to whom), as a multiset."""
    flow = []
    for u in sorted(r["participants"]):
        flow += [("coordinator", u, "FitIns"), ("coordinator", u, "SecAggStart")]
    for u in c["U1"]:
        flow += [(u, "coordinator", "AdvertiseKeys"), ("coordinator", u, "KeyRoster")]
    for u in c["U2"]:
        flow += [(u, "coordinator", "ShareKeys"), ("coordinator", u, "ShareDelivery")]
    for u in c["senders"]:
        flow.append((u, "coordinator", "MaskedInput"))
    for u in c["U3"]:
        flow.append(("coordinator", u, "ConsistencyCheck"))
    for u in c["U4"]:
        flow += [
            (u, "coordinator", "ConsistencySig"),
            ("coordinator", u, "UnmaskRequest"),
            (u, "coordinator", "UnmaskResponse"),
        ]
    for u in c["U3"]:  # §6.8: every survivor vouches and gets the proof
        flow += [("coordinator", u, "SumAnnounce"), (u, "coordinator", "SumVouch"), ("coordinator", u, "SumProof")]
    return sorted(flow, key=repr)




# --------------------------------------------------------------------------------------------
# §9 round records
# --------------------------------------------------------------------------------------------

AUDIT_DOMAIN = b"asagiri-audit-v1\x00"
UNHASHED = ("hash", "signer", "sig")  # the keys the hashed form leaves out (§9.1)


def shape_text(shape: list[int]) -> str:
    """A shape as Python writes a tuple (§9.2): a 1-tuple keeps its trailing comma."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join(str(d) for d in shape) + ")"


def model_digest(tensors: list[tuple[str, str, list[int], bytes]]) -> str:
    """`model_sha256` (§9.2): `name|dtype|shape|` ‖ raw bytes, per tensor in name order."""
    h = hashlib.sha256()
    for name, dtype, shape, raw in sorted(tensors, key=lambda t: t[0]):
        h.update(f"{name}|{dtype}|{shape_text(shape)}|".encode())
        h.update(raw)
    return h.hexdigest()


JSON_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        c = ord(ch)
        if ch in JSON_SHORT_ESCAPES:
            out.append(JSON_SHORT_ESCAPES[ch])
        elif 0x20 <= c < 0x7F:
            out.append(ch)
        elif c > 0xFFFF:
            # \uXXXX holds 16 bits: a character outside the BMP is written as its UTF-16
            # surrogate pair (SPEC leaves this, and the hex digits' case, to Python's json)
            c -= 0x10000
            out.append(f"\\u{0xD800 | (c >> 10):04x}\\u{0xDC00 | (c & 0x3FF):04x}")
        else:  # other controls, DEL, and the rest of the BMP beyond ASCII
            out.append(f"\\u{c:04x}")
    out.append('"')
    return "".join(out)


def json_float(x: float) -> str:
    """The shortest decimal that reads back to `x`, laid out as Python's repr lays it out (§9.1).

    The digits come from NumPy's Dragon4 rather than from repr itself, so the layout rule
    below is this file's own: fixed notation with at least one fractional digit for
    1e-4 ≤ |x| < 1e16 (and zero), otherwise `d[.ddd]e±XX` with at least two exponent digits.
    """
    require(math.isfinite(x), "non-finite float")
    mantissa, exp_text = np.format_float_scientific(x, unique=True, trim="-").split("e")
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "")
    e = int(exp_text)
    if -4 <= e < 16:
        if e >= 0:
            whole, frac = digits[: e + 1].ljust(e + 1, "0"), digits[e + 1 :] or "0"
        else:
            whole, frac = "0", "0" * (-e - 1) + digits
        return f"{sign}{whole}.{frac}"
    rest = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{rest}e{'-' if e < 0 else '+'}{abs(e):02d}"


def json_text(o: Any, item_sep: str, key_sep: str) -> str:
    """§9.1's serialisation: keys sorted by code point, ASCII only, the given separators."""
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):
        return str(o)
    if isinstance(o, float):
        return json_float(o)
    if isinstance(o, str):
        return json_string(o)
    if isinstance(o, list):
        return "[" + item_sep.join(json_text(x, item_sep, key_sep) for x in o) + "]"
    if isinstance(o, dict):
        require(all(isinstance(k, str) for k in o), "key not a str")
        items = (json_string(k) + key_sep + json_text(o[k], item_sep, key_sep) for k in sorted(o))
        return "{" + item_sep.join(items) + "}"
    raise ProtocolError("not a JSON value")


def hashed_form(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in UNHASHED}
    return json_text(body, ",", ":").encode("ascii")


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(hashed_form(record)).hexdigest()


def written_form(record: dict[str, Any]) -> bytes:
    """The one line of the log that `RoundRecord.record` carries: every key, `, ` and `: `."""
    return json_text(record, ", ", ": ").encode("ascii")


def signed_text(hash_hex: str) -> bytes:
    return AUDIT_DOMAIN + unhex(hash_hex)


def seal_record(fields: dict[str, Any], seed: bytes) -> bytes:
    """The coordinator's side, for building test records: hash, sign and write `fields`."""
    record = {k: v for k, v in fields.items() if k not in UNHASHED}
    record["hash"] = record_hash(record)
    record["signer"] = identity_public(seed).hex()
    record["sig"] = sign(seed, signed_text(record["hash"])).hex()
    return written_form(record)


def is_hex(s: Any, nbytes: int) -> bool:
    # lowercase only: an uppercase sig would be a second spelling of one record (§9.1)
    return isinstance(s, str) and len(s) == 2 * nbytes and all(c in "0123456789abcdef" for c in s)


def parse_record(raw: bytes) -> Any:
    """RFC 8259 JSON with unique keys and finite numbers; anything else is refused."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        require(len({k for k, _ in pairs}) == len(pairs), "repeated key")
        return dict(pairs)

    def finite(text: str) -> float:
        x = float(text)
        require(math.isfinite(x), "non-finite float")  # 1e400 reads as inf
        return x

    def constant(text: str) -> Any:
        raise ProtocolError("non-finite float")  # NaN, Infinity: Python's json, not RFC 8259

    try:
        # decoded here, as UTF-8: json.loads on bytes would also guess UTF-16 and UTF-32
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_float=finite, parse_constant=constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, too deep, too many digits
        raise ProtocolError("not JSON") from exc


def verify_record(raw: bytes, coordinator_public: bytes) -> dict[str, Any]:
    """§9.3 check 1 with §9.1: the record `RoundRecord.record` carries, or ProtocolError.

    Hostile bytes raise nothing but ProtocolError.
    """
    record = parse_record(raw)
    require(isinstance(record, dict), "not an object")
    try:
        written = written_form(record)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("not the written form") from exc
    require(written == raw, "not the written form")
    # §9.1: what every record has
    for key in ("kind", "prev_hash", "hash", "signer", "sig"):
        require(isinstance(record.get(key), str), key)
    require(is_int(record.get("seq")) and record["seq"] >= 1, "seq")
    require(is_hex(record["prev_hash"], 32), "prev_hash")
    require(record["hash"] == record_hash(record), "hash")
    require(is_hex(record["sig"], 64), "sig")
    try:
        # the pinned key, never the one the record names
        verify(coordinator_public, signed_text(record["hash"]), unhex(record["sig"]))
    except BadSignatureError as exc:
        raise ProtocolError("signature") from exc
    # `signer` is outside the hash and the signature, so nothing above binds it: a record that
    # names another signer misstates who signed it (SPEC does not say; this file refuses it)
    require(record["signer"] == coordinator_public.hex(), "signer")
    return record


def check_round_record(record: dict[str, Any], run_id: str, rnd: int) -> None:
    """§9.3 checks 2 and 4 on a verified record of `RoundRecord(rnd, …)` in run `run_id`."""
    require(record.get("kind") == "round_completed", "kind")
    require(isinstance(record.get("run_id"), str) and record["run_id"] == run_id, "run_id")
    # an int, not 2.0 or true, which compare equal in Python
    require(is_int(record.get("round")) and record["round"] == rnd, "round")
    require(is_int(record.get("attempt")), "attempt")
    require(is_int(record.get("started")), "started")
    for key in ("model_sha256", "log_id"):
        require(isinstance(record.get(key), str), key)
    for key in ("selected", "participants", "dropped"):
        value = record.get(key)
        require(isinstance(value, list) and all(is_int(x) for x in value), key)
    for key in ("declined", "epsilon", "noise_multiplier"):
        require(isinstance(record.get(key), dict), key)


# --------------------------------------------------------------------------------------------
# §6.9 W_0, derived from the run
# --------------------------------------------------------------------------------------------


def initial_key(run_id: str, architecture: dict[str, Any]) -> bytes:
    """key = H("asagiri-init", run_id || 0x00 || canonical(architecture))."""
    return H("asagiri-init", run_id.encode() + b"\0" + canonical(architecture))


def initial_tensor(key: bytes, name: str, shape: list[int], fill: Any) -> np.ndarray:
    """A tensor of W_0: uniform on +-1/sqrt(fan_in) from ChaCha20 words, or constant ones or zeros."""
    count = math.prod(shape)
    if fill == "ones":
        return np.ones(shape, np.float32)
    if fill == "zeros":
        return np.zeros(shape, np.float32)
    fan_in = fill["uniform"]["fan_in"]
    raw = prg(H("asagiri-w0", key + name.encode()), "chacha20", 4 * count)
    words = np.frombuffer(raw, dtype="<u4")
    u = (words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    bound = np.float32(1 / math.sqrt(fan_in))
    return ((np.float32(2) * u - np.float32(1)) * bound).reshape(shape)
