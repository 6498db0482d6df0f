"""Serving a Prometheus registry over HTTP on an anyio listener: a minimal HTTP/1.0 responder
keeps every socket in the structured-concurrency tree (prometheus_client's own server would start
a daemon thread).  A leaf module, so the coordinator and the sites both serve their metrics with it."""

from __future__ import annotations

import anyio
import anyio.abc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["MetricsPortTaken", "metrics_listener", "serve_metrics"]


class MetricsPortTaken(OSError):
    """The metrics port cannot be bound: raised before any task starts, so callers report it as
    the configuration problem it is, not as a failure inside a task group."""


async def metrics_listener(host: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    try:
        return await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise MetricsPortTaken(exc.errno, f"cannot listen on {host}:{port} (metrics_port): "
                                          f"{exc.strerror or exc}") from None


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
) -> None:
    """Serve ``registry`` on ``listener`` (bound with :func:`metrics_listener` beforehand), or on
    one bound here to ``host``:``port``."""
    if listener is None:
        listener = await metrics_listener(host, port)
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
