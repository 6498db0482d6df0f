"""``Refusal``: a site will not do what was asked.

A leaf module (it imports nothing of ours), so that both the site's policy (``policy.py``, which
raises it) and the secure-aggregation machine (``secagg/client.py``, which lets it through and
leaves the round) know the type without importing each other.  ``asagiri.policy`` re-exports it.
"""

from __future__ import annotations

__all__ = ["Refusal"]


class Refusal(Exception):
    """This site will not do what was asked. ``rule`` says which check failed."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail
