"""The bad-input catalogue's harness: run the real CLI entry point in-process and judge the outcome.

`cli(*args)` calls `compress.cli.main()` exactly as the console script does
(argv, the top-level error handling, the exit status), so an exception that
escapes it is what a user would see as a traceback. `refused(outcome, words)`
asserts the catalogue's contract for bad input: a non-zero exit, one
`Error:` line naming the problem, no traceback.
"""

from __future__ import annotations

import logging
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    traceback: str | None

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(capsys, monkeypatch):
    from compress.cli import main

    def run(*args: str | Path) -> Outcome:
        monkeypatch.setattr(sys, "argv", ["compress", *map(str, args)])
        root = logging.getLogger()
        for h in list(root.handlers):  # basicConfig binds to the stderr of its time: let it bind to this capture
            root.removeHandler(h)
        capsys.readouterr()
        tb = None
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - this is what a user would see as a traceback
            tb = traceback.format_exc()
            code = -1
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err, tb)

    return run


def refused(o: Outcome, *words: str, code: int | tuple[int, ...] = 1) -> str:
    """Assert bad input was refused cleanly; return the error line."""
    assert o.traceback is None, o.traceback
    assert "Traceback" not in o.text, o.text
    codes = code if isinstance(code, tuple) else (code,)
    assert o.code in codes, (o.code, o.text)
    errors = [ln for ln in o.err.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, o.err
    line = errors[0]
    assert "internal error" not in line, line
    for w in words:
        assert w.lower() in line.lower(), (w, line)
    return line


def no_leftovers(*paths: Path) -> None:
    """Neither the outputs nor any temporary sibling of theirs exists."""
    for p in paths:
        assert not p.exists(), f"{p} was written"
        assert not list(p.parent.glob(f".{p.name}*")), list(p.parent.glob(f".{p.name}*"))


@pytest.fixture(scope="session")
def tiny(model_dirs) -> Path:
    """The tiny Llama model directory (read-only: copy before damaging)."""
    return model_dirs["llama"]


@pytest.fixture
def copy_model(tiny, tmp_path):
    """copy_model(name="m") -> a fresh copy of the tiny Llama directory to damage."""

    def make(name: str = "m", src: Path | None = None) -> Path:
        d = tmp_path / name
        shutil.copytree(src or tiny, d)
        return d

    return make
