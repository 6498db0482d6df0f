"""msgpack codec: one type-tag registry, unknown tags rejected, tensors as dtype + shape + raw bytes.

A message is encoded as a *header* (a msgpack array ``[version, tag, {field: value}]``) in which
each tensor field is replaced by its list of ``[name, dtype, shape]`` specs, followed by the raw
little-endian bytes of those tensors in order.  The channel sends the header as one frame and the
tensor bytes as bounded chunk frames, so a 44 MB update never exists as one ``bytes`` object and
lands directly in a preallocated array (see ``channel.py``).  Never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import msgpack
import numpy as np

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import ALLOWED_DTYPES, MESSAGE_TYPES, PROTOCOL_VERSION, Message, MessageError
from .pool import ArrayPool

__all__ = ["PendingMessage", "TensorSpec", "decode", "decode_header", "encode", "encode_header"]

# Bounds on what msgpack may allocate while parsing a header (headers are small).
_UNPACK_LIMITS = dict(
    max_str_len=1 << 16, max_bin_len=1 << 22, max_array_len=1 << 16, max_map_len=1 << 12, max_ext_len=0
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    field: str
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * np.dtype(self.dtype).itemsize


def encode_header(msg: Message) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes and the arrays whose raw bytes follow it, in order."""
    body: dict[str, Any] = {}
    arrays: list[np.ndarray] = []
    for f in fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        if f.name in msg.TENSOR_FIELDS:
            specs = []
            for name, arr in value.items():
                arr = np.require(arr, requirements="C")  # keeps 0-d arrays 0-d
                if arr.dtype.str not in ALLOWED_DTYPES:
                    raise LocalProtocolError(f"dtype {arr.dtype.str} cannot go on the wire")
                specs.append([name, arr.dtype.str, list(arr.shape)])
                arrays.append(arr)
            body[f.name] = specs
        else:
            body[f.name] = value
    header = msgpack.packb([PROTOCOL_VERSION, msg.TAG, body], use_bin_type=True)
    return header, arrays


@dataclass(slots=True)
class PendingMessage:
    """A decoded header whose tensors have not arrived yet."""

    cls: type[Message]
    body: dict[str, Any]
    specs: list[TensorSpec]

    @property
    def payload_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def allocate(self, pool: ArrayPool | None = None) -> list[np.ndarray]:
        if pool is None:
            return [np.empty(s.shape, dtype=np.dtype(s.dtype)) for s in self.specs]
        return [pool.acquire(s.dtype, s.shape) for s in self.specs]

    def finish(self, arrays: list[np.ndarray]) -> Message:
        body = dict(self.body)
        for fname in self.cls.TENSOR_FIELDS:
            body[fname] = {}
        for spec, arr in zip(self.specs, arrays, strict=True):
            body[spec.field][spec.name] = arr
        try:
            return self.cls(**body)
        except (MessageError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"invalid {self.cls.__name__}: {exc}") from None


def decode_header(data: bytes, *, max_payload_bytes: int) -> PendingMessage:
    """Parse and check a header; refuses unknown versions, tags, fields and oversized tensors."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"undecodable message: {exc}") from None
    if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[2], dict)):
        raise RemoteProtocolError("message is not [version, tag, body]")
    version, tag, body = obj
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version!r}")
    cls = MESSAGE_TYPES.get(tag) if type(tag) is int else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {tag!r}")
    expected = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if not all(type(k) is str for k in body):  # msgpack also allows bin keys
        raise RemoteProtocolError(f"{cls.__name__} body has a key that is not text")
    if set(body) != expected:
        raise RemoteProtocolError(f"{cls.__name__} fields {sorted(body)} != {sorted(expected)}")
    specs: list[TensorSpec] = []
    total = 0
    for fname in cls.TENSOR_FIELDS:
        raw_specs = body.pop(fname)
        if not isinstance(raw_specs, list):
            raise RemoteProtocolError(f"{cls.__name__}.{fname} must list tensor specs")
        seen: set[str] = set()
        for raw in raw_specs:
            spec = _tensor_spec(fname, raw)
            if spec.name in seen:
                raise RemoteProtocolError(f"duplicate tensor name {spec.name!r}")
            seen.add(spec.name)
            total += spec.nbytes
            if total > max_payload_bytes:
                raise RemoteProtocolError(f"tensors exceed the maximum payload of {max_payload_bytes} bytes")
            specs.append(spec)
    return PendingMessage(cls=cls, body=body, specs=specs)


def _tensor_spec(fname: str, raw: Any) -> TensorSpec:
    ok = (
        isinstance(raw, list)
        and len(raw) == 3
        and isinstance(raw[0], str)
        and 0 < len(raw[0]) <= 256
        and isinstance(raw[1], str)
        and raw[1] in ALLOWED_DTYPES
        and isinstance(raw[2], list)
        and len(raw[2]) <= 8
        and all(type(d) is int and 0 <= d < (1 << 40) for d in raw[2])
    )
    if not ok:
        raise RemoteProtocolError(f"malformed tensor spec in {fname}")
    return TensorSpec(field=fname, name=raw[0], dtype=raw[1], shape=tuple(raw[2]))


def encode(msg: Message) -> bytes:
    """Header and tensor bytes as one buffer (for small messages, handshakes and test vectors)."""
    header, arrays = encode_header(msg)
    return len(header).to_bytes(4, "big") + header + b"".join(a.tobytes() for a in arrays)


def decode(data: bytes, *, max_payload_bytes: int) -> Message:
    """Inverse of :func:`encode`; every failure is a ``RemoteProtocolError``."""
    if len(data) < 4:
        raise RemoteProtocolError("truncated message")
    hlen = int.from_bytes(data[:4], "big")
    if 4 + hlen > len(data):
        raise RemoteProtocolError("truncated message header")
    pending = decode_header(data[4 : 4 + hlen], max_payload_bytes=max_payload_bytes)
    payload = memoryview(data)[4 + hlen :]
    if len(payload) != pending.payload_bytes:
        raise RemoteProtocolError("tensor payload length does not match the header")
    arrays = pending.allocate()
    pos = 0
    for arr in arrays:
        n = arr.nbytes
        arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(payload[pos : pos + n], dtype=np.uint8)
        pos += n
    return pending.finish(arrays)
