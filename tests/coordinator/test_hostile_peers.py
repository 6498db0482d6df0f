"""A live coordinator (in-process, real TCP on loopback) facing hostile or broken peers.

Nothing a peer sends may crash it: each case ends with an honest site still able to join.
"""

import anyio
import msgpack
import numpy as np
import pytest

from asagiri.config import FederationConfig, SiteEntry
from asagiri.coordinator.server import Coordinator
from asagiri.initial import initial_params
from asagiri.wire.channel import SiteRefused
from asagiri.wire.connection import connect_handshake
from asagiri.wire.crypto import Identity
from asagiri.wire.errors import ConnectionLost
from asagiri.wire.messages import FitRes, Welcome

pytestmark = pytest.mark.anyio

SITE, STRANGER, COORD = Identity.generate(), Identity.generate(), Identity.generate()
LIMITS = dict(max_frame_size=1 << 20, max_payload_bytes=1 << 24, chunk_bytes=1 << 16)


@pytest.fixture
def cfg(tmp_path):
    COORD.save(tmp_path / "coord.key")
    return FederationConfig(
        identity_key=tmp_path / "coord.key", run_dir=tmp_path / "run", min_clients=1, rounds=1,
        listen={"host": "127.0.0.1", "port": 0}, data={"dataset": "synthetic"}, model={"width": 4},
        max_frame_bytes=1 << 20, chunk_bytes=1 << 16,
        timeouts={"wait_for_sites": 30, "handshake": 2, "heartbeat_interval": 1, "heartbeat_timeout": 300},
        sites=[SiteEntry(id=1, public_key=SITE.public.hex()), SiteEntry(id=2, public_key=STRANGER.public.hex()[::-1])],
    )


async def honest_join(port):
    stream = await anyio.connect_tcp("127.0.0.1", port)
    conn = await connect_handshake(stream, SITE, 1, COORD.public, **LIMITS)
    assert isinstance(await conn.receive(), Welcome)
    return conn


# How long a case may take before it counts as hung: the work is milliseconds (and one 2 s
# handshake timeout), so these bounds only catch a hang; a busy machine is far inside them.
HUNG_S = 60


async def with_coordinator(cfg, body):
    coord = Coordinator(cfg, initial=initial_params(cfg))
    with anyio.fail_after(2 * HUNG_S):
        async with anyio.create_task_group() as tg:
            port = await tg.start(coord.run)
            await body(port, coord)
            tg.cancel_scope.cancel()


async def test_unknown_site_refused_over_tcp(cfg):
    async def body(port, coord):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        with pytest.raises(SiteRefused, match="not enrolled"):
            await connect_handshake(stream, STRANGER, 99, COORD.public, **LIMITS)
        # claims an enrolled id without its key
        stream = await anyio.connect_tcp("127.0.0.1", port)
        with pytest.raises(SiteRefused, match="could not prove"):
            await connect_handshake(stream, STRANGER, 1, COORD.public, **LIMITS)
        conn = await honest_join(port)
        await conn.aclose()

    await with_coordinator(cfg, body)


def _hello_frame(body: dict) -> bytes:
    """A ClientHello frame with this body (plain encoding, SPEC §2.2)."""
    header = msgpack.packb([1, 1, body], use_bin_type=True)
    payload = len(header).to_bytes(4, "big") + header
    return len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4,
     # found by fuzzing (tests/fuzz): a body key that is bytes once crashed the whole coordinator
     _hello_frame({b"version": 1, "site_id": 1, "ephemeral_key": bytes(32), "nonce": bytes(16)})],
    ids=["oversized-prefix", "not-msgpack", "http", "noise", "bin-key"],
)
async def test_garbage_before_handshake_does_not_hurt(cfg, garbage):
    async def body(port, coord):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(garbage)
        with anyio.fail_after(HUNG_S):
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                pass  # the coordinator hung up on us
        conn = await honest_join(port)
        await conn.aclose()

    await with_coordinator(cfg, body)


async def test_oversized_frame_after_handshake_closes_only_that_channel(cfg):
    async def body(port, coord):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        conn = await connect_handshake(stream, SITE, 1, COORD.public, **LIMITS)
        await conn.receive()
        await stream.send((1 << 31).to_bytes(4, "big"))
        with anyio.fail_after(HUNG_S):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError)):
                while True:
                    await stream.receive()
        assert coord.registry.get_sample_value("asagiri_protocol_violations_total", {"kind": "session"}) == 1
        conn = await honest_join(port)
        await conn.aclose()

    await with_coordinator(cfg, body)


async def test_out_of_stage_message_closes_channel_and_coordinator_survives(cfg):
    async def body(port, coord):
        conn = await honest_join(port)
        # The round may already have asked us for an update; send one for a round never asked.
        await conn.send(FitRes(7, 1, {"w": np.zeros(1, np.float32)}, 1, {}))
        with anyio.fail_after(HUNG_S):
            with pytest.raises(ConnectionLost):  # the coordinator closed the channel
                while True:
                    await conn.receive()
        conn = await honest_join(port)
        await conn.aclose()

    await with_coordinator(cfg, body)


async def test_a_second_connection_with_the_same_identity_replaces_the_first(cfg):
    """Only the holder of the site's key can open one, so the newer is the site itself (say, back
    after a network cut the coordinator has not noticed): the older session is closed."""
    async def body(port, coord):
        first = await honest_join(port)
        second = await honest_join(port)
        with anyio.fail_after(HUNG_S):
            with pytest.raises(ConnectionLost):
                while True:
                    await first.receive()
        assert coord.sessions.connected() == {1}
        await second.aclose()

    await with_coordinator(cfg, body)
