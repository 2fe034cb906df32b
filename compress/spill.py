"""Spill directories of the lazy tensor store: private, owner-locked, swept after their process died.

A `compress-spill-*` directory holds the spill files of one `compress.lazy.TensorStore`;
its store holds an exclusive lock (flock) on it for its lifetime, and a store
that opens sweeps the directories of stores whose process died (kill -9
leaves no `finally`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: spill directories are not locked, nor swept
    fcntl = None

log = logging.getLogger(__name__)

SPILL_PREFIX = "compress-spill-"
LOCK_FILE = "owner.lock"


class SpillDir:
    """A private temp directory, locked (flock) by its owner for its lifetime, removed on close or exit.

    It is made under a hidden name, locked, then renamed to `compress-spill-*`, so
    every directory with that name has a lock file: one whose lock can be taken
    belongs to a dead process (the kernel drops flocks with their process) and
    `sweep` removes it.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        root = Path(root if root is not None else tempfile.gettempdir())
        sweep(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{SPILL_PREFIX}new-", dir=root))
        self._fd: int | None = None
        if fcntl is not None:
            self._fd = os.open(staging / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=root))
        os.replace(staging, self.path)  # onto the empty directory just made: the name is ours, atomically
        self._finalizer = weakref.finalize(self, _remove_spill, self.path, self._fd)

    def cleanup(self) -> None:
        self._finalizer()


def _remove_spill(path: Path, fd: int | None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)  # releases the lock, after the files are gone


def sweep(root: str | Path) -> list[Path]:
    """Remove the `compress-spill-*` directories under `root` whose owner died; return them."""
    if fcntl is None:
        return []
    removed = []
    for d in Path(root).glob(f"{SPILL_PREFIX}*"):
        try:
            fd = os.open(d / LOCK_FILE, os.O_RDWR)
        except OSError:  # no lock file (not ours, or already being removed): leave it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its store is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            log.info("removed %s, left behind by a process that died", d)
        finally:
            os.close(fd)
    return removed
