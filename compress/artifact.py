"""Atomic directory writes, provenance and source hashing for saved artifacts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from compress.outputs import check_output_dir

PROVENANCE_FILE = "compress.json"
PROVENANCE_FORMAT = "compress-artifact/1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(dest: Path) -> None:
    """Remove temporary siblings left by killed writers (their pid is gone)."""
    for p in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it becomes `dest` by rename.

    On any exception (or a signal the caller turns into one) the temporary
    directory is removed and `dest` is untouched. A process killed outright
    leaves only a hidden `.NAME.tmp-PID-*` sibling, which the next write to the
    same destination removes. Without `force` an existing `dest` is refused.
    """
    dest = check_output_dir(dest, force=force)  # the same checks as before the work (a caller may skip those)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; an artifact is an ordinary directory
        yield tmp
        if dest.exists():  # force: move the old one aside, swap, then delete it
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_user_path(e, dest)
        raise


def _name_user_path(e: BaseException, dest: Path) -> None:
    """A failed write (disk full, file too large, permissions) is reported on the user's path, not on the
    temporary file it happened in."""
    if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(" at path ")[0]
        raise ValueError(f"could not write {dest}: {reason} (nothing was written)") from None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _name_user_path(e, path)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(data: Any) -> str:
    """Strict JSON (indented, newline-terminated): a NaN or infinity is refused, naming where it is, since
    JSON has no such values and Python's bare `NaN` makes the file unreadable elsewhere."""
    from compress.checks import nonfinite_in

    bad = nonfinite_in(data)
    if bad:
        raise ValueError(f"refusing to write a non-finite number to JSON (at {bad})")
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """`json_text(data)`, written atomically."""
    write_text_atomic(path, json_text(data))


def sha256_files(files: Iterable[Path]) -> str:
    """The sha256 of one file's bytes (what `sha256sum` prints and a published SHA256SUMS lists), or for several
    one sha256 over each file's name and bytes, in sorted name order."""
    paths = sorted(Path(p) for p in files)
    h = hashlib.sha256()
    for f in paths:
        if len(paths) > 1:
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("compress", "torch", "transformers", "safetensors", "accelerate", "gguf",
                 "onnxruntime", "llama-cpp-python"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def provenance(*, source: dict[str, Any], recipe: list[dict[str, Any]], reports: list[dict[str, Any]],
               quantization: dict[str, Any] | None, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The provenance record of an artifact; the history of earlier artifacts is kept."""
    history = list(previous.get("history", [])) if previous else []
    if previous:
        history.append({k: previous[k] for k in ("created", "recipe", "reports") if k in previous})
    return {
        "format": PROVENANCE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "recipe": recipe,
        "reports": reports,
        "versions": package_versions(),
        "quantization": quantization,
        "history": history,
    }


def read_provenance(path: Path) -> dict[str, Any] | None:
    f = Path(path) / PROVENANCE_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    if data.get("format") != PROVENANCE_FORMAT:
        raise ValueError(f"{f}: unknown artifact format {data.get('format')!r}, expected {PROVENANCE_FORMAT}")
    return data
