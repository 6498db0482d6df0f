"""The sans-IO handshake and channel: authentication, and every tampering the spec promises to catch."""

import numpy as np
import pytest

from asagiri.wire.channel import ClientHandshake, SecureChannel, ServerHandshake, SiteRefused
from asagiri.wire.crypto import AuthenticationFailed, Identity
from asagiri.wire.errors import RemoteProtocolError
from asagiri.wire.framing import FrameDecoder
from asagiri.wire.messages import FitRes, Heartbeat

SITE, COORD, OTHER = Identity.generate(), Identity.generate(), Identity.generate()


def handshake(site=SITE, site_id=1, roster=None, pinned=None):
    roster = roster if roster is not None else {1: SITE.public}
    client = ClientHandshake(site, site_id, pinned or COORD.public)
    server = ServerHandshake(COORD, roster)
    auth = client.receive(server.receive_hello(client.hello()))
    assert server.receive_auth(auth) == site_id
    return client.keys, server.keys


def pair(chunk=64):
    ck, sk = handshake()
    mk = lambda k: SecureChannel(k, max_frame_size=4096, max_payload_bytes=1 << 20, chunk_bytes=chunk)  # noqa: E731
    return mk(ck), mk(sk)


def deliver(sender_frames, receiver):
    dec = FrameDecoder(max_frame_size=4096)
    out = []
    for frame in sender_frames:
        for payload in dec.feed(bytes(frame)):
            msg = receiver.receive_frame(payload)
            if msg is not None:
                out.append(msg)
    return out


def payloads(frames):
    return [bytes(f)[4:] for f in frames]


def test_keys_match_and_differ_per_direction():
    ck, sk = handshake()
    assert ck.tx == sk.rx and ck.rx == sk.tx and ck.tx != ck.rx


def test_tensor_message_crosses_in_chunks():
    a, b = pair(chunk=64)
    update = {"w": np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32), "empty": np.zeros(0, np.float32)}
    frames = list(a.frames(FitRes(1, 1, update, 5, {"loss": 0.5})))
    assert len(frames) == 1 + (50 * 7 * 4 + 63) // 64
    [got] = deliver(frames, b)
    np.testing.assert_array_equal(got.update["w"], update["w"])
    assert got.update["empty"].shape == (0,)


def test_unknown_site_refused_before_any_key_exchange():
    client = ClientHandshake(OTHER, 9, COORD.public)
    server = ServerHandshake(COORD, {1: SITE.public})
    with pytest.raises(SiteRefused, match="not enrolled"):
        server.receive_hello(client.hello())


def test_site_that_cannot_prove_its_key_is_refused():
    # Claims to be site 1 but holds another key.
    client = ClientHandshake(OTHER, 1, COORD.public)
    server = ServerHandshake(COORD, {1: SITE.public})
    auth = client.receive(server.receive_hello(client.hello()))
    with pytest.raises(SiteRefused, match="could not prove"):
        server.receive_auth(auth)


def test_site_refuses_an_impostor_coordinator():
    client = ClientHandshake(SITE, 1, COORD.public)
    impostor = ServerHandshake(OTHER, {1: SITE.public})
    with pytest.raises(AuthenticationFailed):
        client.receive(impostor.receive_hello(client.hello()))


def test_tampered_frame_rejected():
    a, b = pair()
    [p] = payloads(a.frames(Heartbeat(1)))
    bad = bytearray(p)
    bad[-1] ^= 1
    with pytest.raises(RemoteProtocolError, match="authentication"):
        b.receive_frame(bytes(bad))
    # and the channel stays failed
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(p)


def test_tampered_frame_kind_rejected():
    a, b = pair()
    [p] = payloads(a.frames(Heartbeat(1)))
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(b"\x02" + p[1:])


def test_replayed_frame_rejected():
    a, b = pair()
    [p] = payloads(a.frames(Heartbeat(1)))
    assert b.receive_frame(p) == Heartbeat(1)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        b.receive_frame(p)


def test_reordered_frames_rejected():
    a, b = pair()
    p1, p2 = payloads(a.frames(Heartbeat(1))) + payloads(a.frames(Heartbeat(2)))
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(p2)


def test_dropped_chunk_detected():
    a, b = pair(chunk=16)
    frames = payloads(a.frames(FitRes(1, 1, {"w": np.ones(20, np.float32)}, 1, {})))
    b.receive_frame(frames[0])
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(frames[2])


def test_reflected_frame_rejected():
    a, _ = pair()
    [p] = payloads(a.frames(Heartbeat(1)))
    with pytest.raises(RemoteProtocolError):
        a.receive_frame(p)  # our own frame sent back to us


def test_frame_from_another_session_rejected():
    a, _ = pair()
    _, b2 = pair()
    [p] = payloads(a.frames(Heartbeat(1)))
    with pytest.raises(RemoteProtocolError):
        b2.receive_frame(p)


def test_chunk_without_header_rejected():
    a, b = pair(chunk=16)
    frames = payloads(a.frames(FitRes(1, 1, {"w": np.ones(20, np.float32)}, 1, {})))
    with pytest.raises(RemoteProtocolError):
        b.receive_frame(frames[1])


@pytest.mark.parametrize(("sender_chunk", "receiver_chunk"), [(16, 64), (64, 16), (24, 4096 - 64)])
def test_receiver_accepts_the_senders_chunking(sender_chunk, receiver_chunk):
    """chunk_bytes is the sender's choice (SPEC §4): ends configured differently still interoperate."""
    ck, sk = handshake()
    a = SecureChannel(ck, max_frame_size=4096, max_payload_bytes=1 << 20, chunk_bytes=sender_chunk)
    b = SecureChannel(sk, max_frame_size=4096, max_payload_bytes=1 << 20, chunk_bytes=receiver_chunk)
    update = {"w": np.arange(37, dtype=np.float32), "none": np.zeros((0, 3), np.float32), "s": np.float64(2.5)}
    update["s"] = np.asarray(update["s"])
    frames = list(a.frames(FitRes(1, 1, update, 5, {})))
    assert len(frames) == 1 + -(-37 * 4 // sender_chunk) + 1
    [got] = deliver(frames, b)
    for k, v in update.items():
        np.testing.assert_array_equal(got.update[k], v)
        assert got.update[k].shape == v.shape


def test_chunk_past_the_end_of_its_tensor_rejected():
    """Chunks never span tensors: one that is longer than what is left of its tensor closes the channel."""
    ck, sk = handshake()
    a = SecureChannel(ck, max_frame_size=4096, max_payload_bytes=1 << 20, chunk_bytes=64)
    b = SecureChannel(sk, max_frame_size=4096, max_payload_bytes=1 << 20, chunk_bytes=64)
    update = {"w": np.ones(10, np.float32), "v": np.ones(10, np.float32)}
    header, *_ = payloads(a.frames(FitRes(1, 1, update, 1, {})))
    b.receive_frame(header)
    from asagiri.wire.channel import FRAME_CHUNK
    overlong = bytes([FRAME_CHUNK]) + a._tx.seal(1, bytes(80), bytes([FRAME_CHUNK]))
    with pytest.raises(RemoteProtocolError, match="1 to 40"):
        b.receive_frame(overlong)


def test_a_payload_limit_holds_for_messages_that_came_in_the_same_read():
    """The site lowers its payload cap after the Welcome; a FitIns pipelined right behind the
    Welcome, in the same TCP read, must meet the lower cap too (found by a flaky e2e test)."""
    import anyio

    from asagiri.wire.connection import Connection
    from asagiri.wire.memory import memory_stream_pair
    from asagiri.wire.messages import FitIns, Welcome

    async def main():
        ck, sk = handshake()
        coordinator = SecureChannel(sk, max_frame_size=1 << 16, max_payload_bytes=1 << 20, chunk_bytes=4096)
        near, far = memory_stream_pair()
        blob = b"".join(bytes(f) for m in (Welcome("r", 0, 1, {}), FitIns(1, 1, {"w": np.zeros(4096, np.float32)}, {}))
                        for f in coordinator.frames(m))
        await near.send(blob)  # one read at the site holds both messages
        site = Connection(far, SecureChannel(ck, max_frame_size=1 << 16, max_payload_bytes=1 << 20, chunk_bytes=4096),
                          FrameDecoder(max_frame_size=1 << 16), "coordinator")
        assert isinstance(await site.receive(), Welcome)
        site.limit_payload(1024)
        with pytest.raises(RemoteProtocolError, match="maximum payload of 1024"):
            await site.receive()

    anyio.run(main)
