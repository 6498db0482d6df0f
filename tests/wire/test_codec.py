import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asagiri.causes import Rule
from asagiri.wire import codec
from asagiri.wire.errors import RemoteProtocolError
from asagiri.wire.messages import (
    ClientHello,
    Decline,
    EvaluateRes,
    FitIns,
    FitRes,
    Heartbeat,
    MessageError,
    Shutdown,
    Welcome,
)

arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint32, np.uint8]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
)
params = st.dictionaries(st.text(min_size=1, max_size=12), arrays, max_size=4)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


def assert_same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert list(x) == list(y)
            for k in x:
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                np.testing.assert_array_equal(x[k], y[k])
        else:
            assert x == y


@given(params, st.integers(1, 10**6), st.integers(1, 100), st.dictionaries(st.text(max_size=8), finite, max_size=4))
def test_fit_messages_round_trip(p, rnd, attempt, metrics):
    for msg in (FitIns(rnd, attempt, p, {"mu": 0.5}), FitRes(rnd, attempt, p, 10, metrics)):
        assert_same(codec.decode(codec.encode(msg), max_payload_bytes=1 << 20), msg)


@pytest.mark.parametrize(
    "msg",
    [
        Heartbeat(0),
        Shutdown("done", True),
        Decline(3, 1, Rule.PRIVACY_BUDGET, True),
        EvaluateRes(1, "test", 10, {"auc": 0.5}),
        Welcome("run", 0, 4, {"model": {"name": "small_cnn"}, "x": [1, 2.5, None]}),
        ClientHello(1, 2, b"\1" * 32, b"\2" * 16),
    ],
)
def test_small_messages_round_trip(msg):
    assert_same(codec.decode(codec.encode(msg), max_payload_bytes=1 << 20), msg)


def _raw(obj) -> bytes:
    header = msgpack.packb(obj, use_bin_type=True)
    return len(header).to_bytes(4, "big") + header


@pytest.mark.parametrize(
    "obj, match",
    [
        ([2, 11, {"seq": 1}], "version"),
        ([1, 999, {"seq": 1}], "unknown message type"),
        ([1, 11, {"seq": 1, "extra": 2}], "fields"),
        ([1, 11, {"seq": "one"}], "invalid Heartbeat"),
        ([1, 11, {"seq": -1}], "invalid Heartbeat"),
        ([1, 11], "not \\[version, tag, body\\]"),
        ("hello", "not \\[version, tag, body\\]"),
        ([1, 31, {"round": 1, "split": "val", "num_examples": 3, "metrics": {"auc": float("nan")}, "predictions": []}],
         "finite"),
        ([1, 20, {"round": 1, "attempt": 1, "params": [["w", "O", [1]]], "config": {}}], "tensor spec"),
        ([1, 20, {"round": 1, "attempt": 1, "params": [["w", "<f4", [-1]]], "config": {}}], "tensor spec"),
        ([1, 20, {"round": 1, "attempt": 1, "params": [["w", "<f4", [1]], ["w", "<f4", [1]]], "config": {}}],
         "duplicate"),
    ],
)
def test_malformed_messages_are_remote_protocol_errors(obj, match):
    data = _raw(obj)
    with pytest.raises(RemoteProtocolError, match=match):
        codec.decode(data + (b"\0" * 8 if "duplicate" in match else b""), max_payload_bytes=1 << 20)


def test_oversized_tensor_announcement_refused_before_allocation():
    header = msgpack.packb([1, 20, {"round": 1, "attempt": 1, "params": [["w", "<f8", [1 << 39]]], "config": {}}])
    with pytest.raises(RemoteProtocolError, match="maximum payload"):
        codec.decode_header(header, max_payload_bytes=1 << 30)


def test_garbage_is_an_error_not_a_crash():
    for data in (b"", b"\0\0\0\5abc", b"\0\0\0\1\xc1", bytes(range(256))):
        with pytest.raises(RemoteProtocolError):
            codec.decode(data, max_payload_bytes=1 << 20)


@given(st.binary(max_size=200))
def test_fuzz_decode_never_raises_anything_else(data):
    try:
        codec.decode(data, max_payload_bytes=1 << 20)
    except RemoteProtocolError:
        pass


def test_messages_validate_on_construction():
    with pytest.raises(MessageError):
        FitIns(0, 1, {}, {})
    with pytest.raises(MessageError):
        FitRes(1, 1, {"w": np.zeros(2, dtype=object)}, 3, {})
    with pytest.raises(MessageError):
        ClientHello(1, 2, b"short", b"\2" * 16)
