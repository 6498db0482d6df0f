"""What the site's secure-aggregation machine asks of the site's policy, as a protocol.

The machine (``client.py``) decides nothing about what the site accepts: every check ends in the
policy object it is given, which names the rule and raises :class:`~asagiri.errors.Refusal`.
``asagiri.policy.SitePolicy`` is that object in the product; it satisfies :class:`SiteChecks`
structurally, so ``secagg`` never imports ``policy`` (or the configuration it is built from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn, Protocol

from ..wire.crypto import PublicIdentity

__all__ = ["PolicyLimits", "SiteChecks"]


class PolicyLimits(Protocol):
    """The two numbers of the site's policy the machine needs to work out its masking component."""

    @property
    def min_participants(self) -> int: ...

    @property
    def colluders(self) -> int: ...


class SiteChecks(Protocol):
    """The site's policy as the secure-aggregation machine uses it (``policy.SitePolicy``)."""

    @property
    def cfg(self) -> PolicyLimits: ...

    @property
    def peers(self) -> Mapping[int, PublicIdentity]: ...

    def refuse(self, rule: str, detail: str) -> NoReturn: ...

    def require(self, ok: bool, rule: str, detail: str) -> None: ...

    def check_participants(self, what: str, ids: Sequence[int]) -> None: ...

    def check_pinned(self, ids: Sequence[int]) -> None: ...

    def check_whole_batches(self, what: str, ids: Sequence[int], batches: Mapping[int, frozenset[int]] | None) -> None: ...

    def check_group(self, size: int, threshold: int) -> None: ...

    def check_component(self, ok: bool, detail: str) -> None: ...

    def quorum(self, participants: int) -> int: ...
