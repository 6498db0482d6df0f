"""The verified sums of the run's recorded rounds, kept in ``run_dir/sums/`` (protocol/SPEC.md §6.9).

Each site derives the global model itself from ``W_0`` and the sums it verified; a site that was
not among a round's survivors, or not connected, needs that round's :class:`SumRecord` to keep
deriving, and asks for it with ``ModelAt``.  A record is written before its round's checkpoint
and audit record commit it; on resume, records past the checkpoint's round (a round that was
never committed, and is run again) are removed.  The records are also the run's portable model
history: with the pinned keys, anyone can replay ``W_0 -> W_T`` from them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from ..fsutil import atomic_write_bytes
from ..wire.codec import decode, encode
from ..wire.errors import RemoteProtocolError
from ..wire.messages import SumRecord

__all__ = ["SumHistory"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"round-(\d{6,})\.msg")  # six digits at least, more past round 999999


class SumHistory:
    def __init__(self, folder: Path, *, vector_len: int) -> None:
        self.folder = folder
        self.max_bytes = 8 * vector_len  # the largest sum a model of this run makes: 64-bit ring words

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.fullmatch(p.name)))

    def _path(self, rnd: int) -> Path:
        return self.folder / f"round-{rnd:06d}.msg"

    def keep(self, record: SumRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(record.round), encode(record))

    def forget_after(self, rnd: int) -> None:
        """Remove the records of rounds after ``rnd`` (never committed: they will be run again)."""
        for r in self._rounds():
            if r > rnd:
                self._path(r).unlink()
                log.info("removed the sum of round %d, which was never recorded", r)

    def after(self, rnd: int) -> Iterator[SumRecord]:
        """The records of the rounds after ``rnd``, oldest first (one in memory at a time)."""
        for r in self._rounds():
            if r <= rnd:
                continue
            try:
                record = decode(self._path(r).read_bytes(), max_payload_bytes=self.max_bytes)
            except (OSError, RemoteProtocolError) as exc:
                log.error("the sum of round %d cannot be read (%s): sites behind it cannot catch up", r, exc)
                return
            if not isinstance(record, SumRecord) or record.round != r:
                log.error("%s does not hold round %d's sum: sites behind it cannot catch up", self._path(r), r)
                return
            yield record
