"""Decoded images on disk: each list of image files decoded and resized once, in parallel worker
processes, into a uint8 array that later loads memory-map.

A cache entry is ``images-<list>-<content>.npy`` plus its ``.json``: ``<list>`` hashes the file
names and the settings (size, channels, whether unreadable files are skipped), ``<content>`` each
file's size and modification time, so a changed file gives a new entry (the old one is removed).
The array is written under a temporary name, fsynced and renamed, and the ``.json`` (which files
were skipped) is written last the same way: an entry without both is not an entry.

Only the files a site asks for are decoded (``ImageFiles.take``), so a site holds, and decodes,
its own partition of a shared data set, never the whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_bytes, commit_durably
from .images import decode_image

__all__ = ["DEFAULT_DECODE", "DecodeSettings", "ImageFiles", "UnreadableImage", "decode_files", "npz_images"]

log = logging.getLogger(__name__)

FORMAT = 1
CHUNK = 64  # files per worker task


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; the message names it."""


@dataclass(frozen=True)
class DecodeSettings:
    """How a site decodes its image files: ``workers`` processes (None: one per core, at most 8;
    1: in this process), ``skip_unreadable``: leave out (and count) a file that cannot be decoded
    instead of stopping with an error naming it."""

    workers: int | None = None
    skip_unreadable: bool = False
    progress: bool | None = None  # a progress bar (None: when stderr is a terminal)


DEFAULT_DECODE = DecodeSettings()


@dataclass(frozen=True)
class Decoded:
    images: np.ndarray  # len(kept) x size x size (x 3), uint8; memory-mapped when cached
    kept: np.ndarray  # positions (into the files given) of the images held, in order
    skipped: list[tuple[str, str]]  # (file, why) for each file left out


def _keys(files: Sequence[Path], size: int, channels: int, skip: bool) -> tuple[str, str]:
    listed = hashlib.sha256(f"asagiri-images|{FORMAT}|{size}|{channels}|{int(skip)}\n".encode())
    content = hashlib.sha256()
    for f in files:
        listed.update(f"{f}\n".encode())
        try:
            st = os.stat(f)
            content.update(f"{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            content.update(b"missing\n")
    return listed.hexdigest()[:20], content.hexdigest()[:20]


def _shape(n: int, size: int, channels: int) -> tuple[int, ...]:
    return (n, size, size) if channels == 1 else (n, size, size, 3)


def _decode_into(out_path: str, start: int, files: list[str], size: int, channels: int) -> list[tuple[int, str]]:
    """Worker: decode ``files`` into rows ``start...`` of the array at ``out_path``; the failures."""
    out = np.load(out_path, mmap_mode="r+")
    failed = []
    for i, f in enumerate(files):
        try:
            out[start + i] = decode_image(Path(f), size, channels)
        except Exception as exc:  # PIL raises many types for a bad file; each is one unreadable image
            failed.append((start + i, f"{type(exc).__name__}: {exc}"))
    out.flush()
    del out
    return failed


def decode_files(files: Sequence[Path], *, size: int, channels: int, cache_dir: Path | None,
                 settings: DecodeSettings = DEFAULT_DECODE) -> Decoded:
    """``files`` decoded to ``size`` x ``size`` (x 3 for ``channels`` 3), through the cache in
    ``cache_dir`` (None: decoded in memory, every time)."""
    files = [Path(f) for f in files]
    listed, content = _keys(files, size, channels, settings.skip_unreadable)
    if cache_dir is not None:
        array, meta = cache_dir / f"images-{listed}-{content}.npy", cache_dir / f"images-{listed}-{content}.json"
        if array.exists() and meta.exists():
            info = json.loads(meta.read_text())
            return Decoded(np.load(array, mmap_mode="r"), np.asarray(info["kept"], dtype=np.int64),
                           [tuple(s) for s in info["skipped"]])
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = cache_dir / f".images-{listed}-{content}.{os.getpid()}.tmp.npy"
    else:
        import tempfile

        fd, name = tempfile.mkstemp(suffix=".npy")
        os.close(fd)
        work = Path(name)
    try:
        out = np.lib.format.open_memmap(work, mode="w+", dtype=np.uint8, shape=_shape(len(files), size, channels))
        del out
        failed = _decode_all(work, files, size, channels, settings)
        decoded = _finish(work, files, failed, size, channels, settings)
        if cache_dir is None:
            return Decoded(np.array(decoded.images), decoded.kept, decoded.skipped)
        return _store(decoded, work, array, meta, cache_dir, listed)
    finally:
        work.unlink(missing_ok=True)


def _decode_all(work: Path, files: list[Path], size: int, channels: int,
                settings: DecodeSettings) -> list[tuple[int, str]]:
    chunks = [(i, [str(f) for f in files[i : i + CHUNK]]) for i in range(0, len(files), CHUNK)]
    workers = settings.workers or min(8, os.cpu_count() or 1)
    workers = min(workers, len(chunks))
    bar = _progress(len(files), settings.progress)
    failed: list[tuple[int, str]] = []
    try:
        if workers <= 1:
            for start, names in chunks:
                failed += _decode_into(str(work), start, names, size, channels)
                bar(len(names))
            return failed
        # forkserver: the workers start from a clean process, not a fork of one holding threads
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_decode_into, str(work), start, names, size, channels): len(names)
                       for start, names in chunks}
            for fut in as_completed(futures):
                failed += fut.result()
                bar(futures[fut])
        return sorted(failed)
    finally:
        bar(0, done=True)


def _finish(work: Path, files: list[Path], failed: list[tuple[int, str]], size: int, channels: int,
            settings: DecodeSettings) -> Decoded:
    if failed and not settings.skip_unreadable:
        index, why = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise UnreadableImage(f"{files[index]}: cannot decode it ({why}){more}; fix or remove the file, or set "
                              f"skip_unreadable_images: true in the site's config to leave such files out")
    images = np.load(work, mmap_mode="r")
    bad = {i for i, _ in failed}
    kept = np.array([i for i in range(len(files)) if i not in bad], dtype=np.int64)
    if failed:
        log.warning("left out %d unreadable image(s) of %d, the first: %s (%s)", len(failed), len(files),
                    files[failed[0][0]], failed[0][1])
        compact = np.lib.format.open_memmap(work.with_suffix(".kept.npy"), mode="w+", dtype=np.uint8,
                                            shape=_shape(len(kept), size, channels))
        for i in range(0, len(kept), 1024):
            compact[i : i + 1024] = images[kept[i : i + 1024]]
        compact.flush()
        del images, compact
        os.replace(work.with_suffix(".kept.npy"), work)
        images = np.load(work, mmap_mode="r")
    return Decoded(images, kept, [(str(files[i]), why) for i, why in failed])


def _store(decoded: Decoded, work: Path, array: Path, meta: Path, cache_dir: Path, listed: str) -> Decoded:
    commit_durably(work, array)
    atomic_write_bytes(meta, json.dumps({"kept": decoded.kept.tolist(), "skipped": decoded.skipped}).encode())
    for stale in cache_dir.glob(f"images-{listed}-*"):  # entries of the same files before they changed
        if stale.name not in (array.name, meta.name):
            stale.unlink(missing_ok=True)
    return Decoded(np.load(array, mmap_mode="r"), decoded.kept, decoded.skipped)


def npz_images(path: Path, member: str, *, size: int, cache_dir: Path,
               resize: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """``member`` (a uint8 image array) of the ``.npz`` at ``path``, resized to ``size`` by
    ``resize``, as a memory-mapped array in ``cache_dir``: built once, streamed from the
    (compressed) archive in blocks, so neither building nor reading it holds the whole array.
    The key covers the file's path, size and modification time, the member and the size."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(json.dumps([FORMAT, str(path), stat.st_size, stat.st_mtime_ns, member, size]).encode())
    array = cache_dir / f"npz-{key.hexdigest()[:24]}.npy"
    if array.exists():
        return np.load(array, mmap_mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f".{array.stem}.{os.getpid()}.tmp.npy"
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{member}.npy") as stream:
            version = np.lib.format.read_magic(stream)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(stream)
            if fortran or dtype != np.uint8 or len(shape) not in (3, 4):
                raise ValueError(f"{path}: {member} is not an array of uint8 images ({dtype}, {shape})")
            out = np.lib.format.open_memmap(work, mode="w+", dtype=np.uint8, shape=(shape[0], size, size, *shape[3:]))
            row = int(np.prod(shape[1:]))
            block = max(1, (32 << 20) // row)
            for start in range(0, shape[0], block):
                n = min(block, shape[0] - start)
                raw = stream.read(n * row)
                if len(raw) != n * row:
                    raise ValueError(f"{path}: {member} ends after {start} of {shape[0]} images")
                out[start : start + n] = resize(np.frombuffer(raw, np.uint8).reshape(n, *shape[1:]), size)
            out.flush()
            del out
        commit_durably(work, array)
    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError) as exc:
        raise ValueError(f"{path}: not a readable .npz ({exc})") from None
    finally:
        work.unlink(missing_ok=True)
    return np.load(array, mmap_mode="r")


def _progress(total: int, show: bool | None) -> Callable[..., None]:
    """``advance(n)`` a rich progress bar on stderr (when it is a terminal, or ``show``)."""
    if not (sys.stderr.isatty() if show is None else show) or total == 0:
        return lambda n, done=False: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("decoding images", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task("decode", total=total)
    bar.start()

    def advance(n: int, done: bool = False) -> None:
        bar.advance(task, n)
        if done:
            bar.stop()

    return advance


class ImageFiles:
    """A split's image files, decoded only when taken: what a source hands the loader instead of
    decoded pixels, so partitioning (by labels and metadata) touches no image."""

    def __init__(self, files: Sequence[Path], *, size: int, channels: int, cache_dir: Path | None,
                 settings: DecodeSettings = DEFAULT_DECODE) -> None:
        self.files = [Path(f) for f in files]
        self.size, self.channels, self.cache_dir, self.settings = size, channels, cache_dir, settings

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return _shape(len(self.files), self.size, self.channels)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def take(self, idx: np.ndarray) -> Decoded:
        """The images at positions ``idx`` (``kept`` is positions into ``idx``)."""
        return decode_files([self.files[i] for i in np.asarray(idx, dtype=np.int64)], size=self.size,
                            channels=self.channels, cache_dir=self.cache_dir, settings=self.settings)

    def __getitem__(self, idx: np.ndarray | slice) -> np.ndarray:
        """Decoded images (every one must decode: use :meth:`take` to allow skips)."""
        positions = np.arange(len(self.files))[idx]
        decoded = self.take(positions)
        if decoded.skipped:
            raise UnreadableImage(f"{decoded.skipped[0][0]}: cannot decode it ({decoded.skipped[0][1]})")
        return np.asarray(decoded.images)
