"""Encrypted channel vs raw loopback socket, moving one ResNet-18-sized float32 update.

    python benchmarks/transport.py [--mb 44] [--repeat 5] [--json]

A receiver process (the "coordinator") and this process (the "site") run on separate cores. Per
repeat the site sends the update and the receiver acknowledges with one byte once the whole
message sits in memory: through the authenticated channel (handshake done beforehand, a
``FitRes`` decrypted into arrays from the connection's pool, released after each message as the
coordinator does), and as raw bytes over a plain anyio TCP stream copied into a preallocated buffer.  Prints medians (after one warm-up transfer) and their ratio as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import anyio
import numpy as np

from asagiri.wire.connection import accept_handshake
from asagiri.wire.crypto import Identity
from asagiri.wire.messages import FitRes

SITE_SEED, COORD_SEED = b"\x01" * 32, b"\x02" * 32
LIMITS = dict(max_frame_size=4 << 20, max_payload_bytes=1 << 31, chunk_bytes=1 << 20)


async def receiver(repeat: int, nbytes: int) -> None:
    site, coord = Identity.from_seed(SITE_SEED), Identity.from_seed(COORD_SEED)
    raw_listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    enc_listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    ports = [lst.extra(anyio.abc.SocketAttribute.local_port) for lst in (raw_listener, enc_listener)]
    print(json.dumps(ports), flush=True)
    raw = await raw_listener.listeners[0].accept()
    buf = np.empty(nbytes, dtype=np.uint8)
    for _ in range(repeat):
        pos = 0
        while pos < nbytes:
            chunk = await raw.receive(1 << 20)
            buf[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            pos += len(chunk)
        await raw.send(b"k")
    stream = await enc_listener.listeners[0].accept()
    _, conn = await accept_handshake(stream, coord, {1: site.public}, **LIMITS)
    for _ in range(repeat):
        msg = await conn.receive()
        assert isinstance(msg, FitRes)
        await stream.send(b"k")
        conn.pool.release(msg.update.values())  # as the coordinator does once the update is summed


async def sender(repeat: int, nbytes: int, ports: list[int]) -> dict:
    site, coord = Identity.from_seed(SITE_SEED), Identity.from_seed(COORD_SEED)
    update = {"w": np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)}
    payload = memoryview(update["w"].view(np.uint8))
    raw = await anyio.connect_tcp("127.0.0.1", ports[0])
    raw_times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for pos in range(0, nbytes, 1 << 20):
            await raw.send(payload[pos : pos + (1 << 20)])
        await raw.receive(1)
        raw_times.append(time.perf_counter() - t)
    stream = await anyio.connect_tcp("127.0.0.1", ports[1])
    conn = await _connect_without_welcome(stream, site, coord)
    enc_times = []
    msg = FitRes(1, 1, update, 1, {})
    for _ in range(repeat):
        t = time.perf_counter()
        await conn.send(msg)
        await stream.receive(1)
        enc_times.append(time.perf_counter() - t)
    mb = nbytes / 1e6
    # The first transfer of each kind warms the allocator and the socket buffers; it is reported
    # in the lists but left out of the medians.
    raw_s, enc_s = statistics.median(raw_times[1:]), statistics.median(enc_times[1:])
    return {
        "megabytes": round(mb, 1),
        "repeat": repeat,
        "raw_MBps": round(mb / raw_s, 1),
        "channel_MBps": round(mb / enc_s, 1),
        "ratio": round(raw_s / enc_s, 3),
        "raw_s": [round(x, 4) for x in raw_times],
        "channel_s": [round(x, 4) for x in enc_times],
    }


async def _connect_without_welcome(stream, site, coord):  # type: ignore[no-untyped-def]
    """The client half of the handshake; this receiver sends no Welcome, so skip waiting for one."""
    from asagiri.wire.channel import ClientHandshake, SecureChannel
    from asagiri.wire.connection import Connection, _receive_plain, _send_plain
    from asagiri.wire.framing import FrameDecoder

    hs = ClientHandshake(site, 1, coord.public)
    dec = FrameDecoder(max_frame_size=1024)
    await _send_plain(stream, hs.hello())
    await _send_plain(stream, hs.receive(await _receive_plain(stream, dec)))
    channel = SecureChannel(hs.keys, max_frame_size=LIMITS["max_frame_size"], max_payload_bytes=1 << 20, chunk_bytes=LIMITS["chunk_bytes"])
    return Connection(stream, channel, FrameDecoder(max_frame_size=LIMITS["max_frame_size"]), "receiver")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=44.7, help="update size in MB (ResNet-18: 11.18 M float32 = 44.7 MB)")
    p.add_argument("--repeat", type=int, default=9, help="transfers of each kind; the first is a warm-up")
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", default="sender", help=argparse.SUPPRESS)
    args = p.parse_args()
    nbytes = int(args.mb * 1e6) // 4 * 4
    if args.role == "receiver":
        anyio.run(receiver, args.repeat, nbytes)
        return
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--mb", str(args.mb),
                             "--repeat", str(args.repeat)], stdout=subprocess.PIPE, text=True)
    ports = json.loads(proc.stdout.readline())
    result = anyio.run(sender, args.repeat, nbytes, ports)
    proc.wait(timeout=60)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
