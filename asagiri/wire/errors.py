"""Wire errors, split by whose fault it was (as in h11).

``LocalProtocolError``: we tried to send something the protocol forbids (a bug on our side).
``RemoteProtocolError``: the peer broke the protocol; the channel is closed and the peer dropped.
``ConnectionLost``: the peer went away (EOF, reset); not a protocol violation.
"""

from __future__ import annotations

from ..errors import ProtocolError

__all__ = ["ConnectionLost", "LocalProtocolError", "RemoteProtocolError", "WireError"]


class WireError(ProtocolError):
    """Base of every error the wire layer raises."""


class LocalProtocolError(WireError):
    """We were about to violate the protocol."""


class RemoteProtocolError(WireError):
    """The peer violated the protocol: malformed, oversized, unauthenticated or out-of-order data."""


class ConnectionLost(WireError):
    """The peer closed or reset the connection."""
