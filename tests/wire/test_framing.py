import pytest
from hypothesis import given
from hypothesis import strategies as st

from asagiri.wire.errors import LocalProtocolError, RemoteProtocolError
from asagiri.wire.framing import FrameDecoder, encode_frame


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50))
def test_round_trip_any_slicing(payloads, step):
    stream = b"".join(encode_frame(p, max_frame_size=1024) for p in payloads)
    dec = FrameDecoder(max_frame_size=1024)
    got = []
    for i in range(0, len(stream), step):
        got.extend(dec.feed(stream[i : i + step]))
    assert got == payloads
    assert dec.buffered == 0


def test_one_byte_at_a_time():
    stream = encode_frame(b"hello", max_frame_size=16) + encode_frame(b"", max_frame_size=16)
    dec = FrameDecoder(max_frame_size=16)
    got = [f for b in stream for f in dec.feed(bytes([b]))]
    assert got == [b"hello", b""]


def test_oversized_frame_rejected_from_the_prefix_alone():
    dec = FrameDecoder(max_frame_size=1000)
    # Only the 4-byte prefix announcing 2**32-1 bytes: refused before any payload is buffered.
    with pytest.raises(RemoteProtocolError, match="maximum is 1000"):
        dec.feed(b"\xff\xff\xff\xff")


def test_refuses_to_send_oversized():
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, max_frame_size=10)


def test_recycled_frame_buffer_is_reused_for_a_same_size_frame():
    dec = FrameDecoder(max_frame_size=64)
    [first] = dec.feed(encode_frame(b"a" * 10, max_frame_size=64))
    dec.recycle(first)
    [second] = dec.feed(encode_frame(b"b" * 10, max_frame_size=64))
    assert second is first and second == b"b" * 10
    dec.recycle(second)
    [third] = dec.feed(encode_frame(b"c" * 3, max_frame_size=64))  # other size: a new buffer
    assert third is not second and third == b"ccc"
