"""One error tree for the protocol, rooted in :class:`ProtocolError` (as h11 roots its own).

- :class:`~asagiri.wire.errors.WireError` and its children: the channel (a peer that broke
  framing, the handshake or the codec; a lost connection; our own misuse).
- :class:`Refusal`: a site will not do what the coordinator asked; ``rule`` names the check.  It
  is raised by the site's policy only (``SitePolicy.refuse``), and becomes a ``Decline`` at the
  site's session boundary.
- :class:`ProtocolViolation`: the coordinator's view of a site that broke a round (a message of
  the wrong stage, a bad signature); the runtime closes that site's channel.

Each is converted where a session meets its peer, and nowhere else: a refusal into a
``Decline``, a violation or a wire error into a closed session.  A leaf module.
"""

from __future__ import annotations

from .causes import Rule

__all__ = ["ProtocolError", "ProtocolViolation", "Refusal"]


class ProtocolError(Exception):
    """Base of every error the protocol raises."""


class Refusal(ProtocolError):
    """This site will not do what was asked. ``rule`` says which check failed; ``detail`` stays
    in the site's log (it could describe the site's data, so it never goes on the wire)."""

    def __init__(self, rule: Rule | str, detail: str) -> None:
        self.rule = Rule(rule)
        self.detail = detail
        super().__init__(f"{self.rule}: {detail}")


class ProtocolViolation(ProtocolError):
    """A site sent something the round does not allow; the runtime closes that site's channel."""

    def __init__(self, site: int, reason: str) -> None:
        super().__init__(f"site {site}: {reason}")
        self.site = site
        self.reason = reason
