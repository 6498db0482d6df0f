"""Prometheus metrics on a registry passed in (never the global one), served over anyio.

A minimal HTTP/1.0 responder on an anyio listener keeps every socket in the structured
concurrency tree (prometheus_client's own server would start a daemon thread).
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CoordinatorMetrics", "serve_metrics"]

log = logging.getLogger(__name__)


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rounds_completed = Counter("asagiri_rounds_completed", "Rounds aggregated", registry=registry)
        self.rounds_aborted = Counter("asagiri_rounds_aborted", "Round attempts aborted below k", registry=registry)
        self.round_seconds = Histogram(
            "asagiri_round_seconds", "Wall time of a completed round", registry=registry,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.connected_sites = Gauge("asagiri_connected_sites", "Authenticated site sessions", registry=registry)
        self.participants = Gauge("asagiri_round_participants", "Updates in the last round", registry=registry)
        self.dropped = Counter("asagiri_sites_dropped", "Sites dropped from a round", registry=registry)
        self.protocol_violations = Counter(
            "asagiri_protocol_violations", "Channels closed for protocol violations", registry=registry
        )
        self.refused = Counter("asagiri_handshakes_refused", "Handshakes refused", registry=registry)
        self.bytes_received = Counter("asagiri_bytes_received", "Bytes received from sites", registry=registry)
        self.bytes_sent = Counter("asagiri_bytes_sent", "Bytes sent to sites", registry=registry)
        self.metric = Gauge("asagiri_eval_metric", "Weighted evaluation metric", ["name"], registry=registry)


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    task_status.started(bound)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(5):
                try:
                    await stream.receive(4096)
                    body = generate_latest(registry)
                    head = (
                        f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n"
                    ).encode()
                    await stream.send(head + body)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass

    await listener.serve(handle)
