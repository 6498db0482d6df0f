"""The shares a site holds for its group, and the rule for revealing them.

A site holds, for each owner in its group (itself included), a share of the owner's self-mask
seed ``b`` and a share of its masking key ``s_sk``.  The coordinator may learn ``b`` of a
survivor (to remove its self mask) or ``s_sk`` of a dropped site (to remove the pair masks it left
behind), never both of one owner: with both it could unmask that owner's input alone.

``HeldShares.reveal`` is the one place that picks shares to reveal, and it keeps the invariant
itself, whatever the caller checked before: the site machine (``client.py``) also refuses an
unmask request whose survivor and dropout lists overlap and answers one per round attempt, so
through it this guard is defence in depth (``tests/secagg/test_sharing.py`` reaches it directly).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BothShares", "HeldShares"]


class BothShares(Exception):  # noqa: N818 - named after the invariant it guards
    """Asked for the ``b`` share of an owner whose ``s_sk`` share was revealed, or the reverse."""

    def __init__(self, owner: int) -> None:
        super().__init__(f"asked for both kinds of share of site {owner}")
        self.owner = owner


class HeldShares(dict[int, tuple[bytes, bytes]]):
    """owner -> (encoded b share, encoded s_sk share); ``revealed`` says which kind of each left."""

    def __init__(self) -> None:
        super().__init__()
        self.revealed: dict[int, str] = {}  # owner -> "b" or "s"

    def reveal(self, survivors: Iterable[int], dropped: Iterable[int]) -> tuple[list[list], list[list]]:
        """The ``[owner, b share]`` of each held survivor and ``[owner, s_sk share]`` of each held
        dropped site, owners ascending.  Raises :class:`BothShares` (and reveals nothing) when an
        owner would get a second kind, in this call or after an earlier one."""
        survivors, dropped = set(survivors), set(dropped)
        b_out: list[list] = []
        s_out: list[list] = []
        kinds = dict(self.revealed)
        for owner, (b, s) in sorted(self.items()):
            asked = {kind for kind, listed in (("b", survivors), ("s", dropped)) if owner in listed}
            if not asked:
                continue
            before = {kinds[owner]} if owner in kinds else set()
            if len(asked | before) > 1:  # never both shares: the invariant, checked where shares leave
                raise BothShares(owner)
            kinds[owner] = kind = asked.pop()
            if kind == "b":
                b_out.append([owner, b])
            else:
                s_out.append([owner, s])
        self.revealed = kinds
        return b_out, s_out
