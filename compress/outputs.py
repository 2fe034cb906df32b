"""Output paths checked before the work, and one writer per output at a time.

A run that can only fail at its very end (a read-only directory, a path under
a file, an existing artifact without --force, another process writing the same
place) is refused before the model loads: `claim_output` checks the path and
takes an exclusive lock beside it for the whole run. Locks are `flock`s, so a
killed process releases its lock with its file descriptors, and a stale lock
file never blocks anyone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _existing_ancestor(p: Path) -> Path:
    a = p.parent
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def _check_writable(user: str | Path, p: Path) -> Path:
    """The nearest existing ancestor of `p`, checked to be a directory we can create files in."""
    a = _existing_ancestor(p)
    if not a.is_dir():
        raise ValueError(f"cannot write {user}: {a} is a file, not a directory")
    try:  # a real probe: as root, os.access says yes to read-only mounts and to chmod 555 alike
        fd, probe = tempfile.mkstemp(prefix=".compress-probe-", dir=a)
    except OSError as e:
        raise ValueError(f"cannot write {user}: {a} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return a


def check_output_dir(out: str | Path, *, force: bool = False) -> Path:
    """Refuse an output directory that cannot be written (before any work); return its absolute path."""
    p = Path(out).expanduser().absolute()
    if p.exists():
        if not force:
            raise ValueError(f"{out} already exists; pass --force to overwrite it")
        if not p.is_dir():
            raise ValueError(f"{out} exists and is not a directory")
    _check_writable(out, p)
    return p


def check_output_file(path: str | Path) -> Path:
    """Refuse an output file path that cannot be written (a directory, under a file, read-only)."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    _check_writable(path, p)
    return p


@contextlib.contextmanager
def output_lock(dest: Path, user: str | Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock on output `dest` (absolute) while the block runs; refuse if another process holds it.

    The lock file lives in the nearest existing directory above `dest` (so
    nothing is created where the output will be), named after `dest`.
    """
    a = _existing_ancestor(dest)
    tag = hashlib.sha1(str(dest).encode()).hexdigest()[:12]
    lock = a / f".{dest.name}.compress-lock-{tag}"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise ValueError(f"{user or dest} is being written by another compress process (pid {holder}); "
                             "wait for it to finish or choose another output") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # the file we locked is still the lock file (its last holder did not just remove it)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # still holding it: a waiter that opened the old file sees it go stale
    finally:
        os.close(fd)


@contextlib.contextmanager
def claim_output(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """`check_output_dir` then `output_lock` for the duration of a run; yields the absolute path."""
    dest = check_output_dir(out, force=force)
    with output_lock(dest, out):
        yield dest
