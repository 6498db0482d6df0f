"""Crash-safe file writes (write temp, fsync, rename, fsync the folder).

A write that fails (a full disk, a read-only mount) raises ``OSError`` and leaves the file as it
was: the temporary file is removed, the target never half-written, an append cut back."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["append_durably", "atomic_write_bytes", "commit_durably", "replace_durably"]


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError from a write names no file, or the temporary one: name ``path``, the file the
    caller asked for, so the error says which failed."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _naming(path), open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    replace_durably(tmp, path)


def replace_durably(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` and fsync the folder, so the rename survives a power cut."""
    with _naming(dst):
        os.replace(src, dst)
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def commit_durably(src: Path, dst: Path) -> None:
    """A file written in place under a temporary name (a memory-mapped array): its contents
    fsynced, then renamed over ``dst`` as :func:`replace_durably` does."""
    with _naming(dst), open(src, "rb") as fh:
        os.fsync(fh.fileno())
    replace_durably(src, dst)


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` and fsync; if the write fails part-way, cut the file back to where it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path), open(path, "ab") as fh:
        end = fh.tell()
        try:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                fh.truncate(end)
            raise
