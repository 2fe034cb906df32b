"""Shared CLI pieces: model argument, progress bars, JSON output, error handling."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and inf (click's FLOAT takes both, and NaN passes every range check)."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


FINITE = FiniteFloat()


def refuse(options: dict[str, Any], why: str) -> None:
    """A usage error naming the options that were given (option -> value; None, False and () mean not given):
    "--ratio, --unit apply to --structure only"."""
    given = [o for o, v in options.items() if v not in (None, False, ())]
    if given:
        raise click.UsageError(f"{', '.join(given)} {why}")


LOG_EVERY_SECONDS = 30.0  # without a terminal: a progress line at least this often while work advances
LOG_EVERY_FRACTION = 0.05  # ... and at every 5 % of a phase
LOG_MIN_SECONDS = 5.0  # ... though a fast phase prints only its start, every 5 s and its end


class ProgressLines:
    """The (label, done, total[, info]) callback as plain lines on stderr, for CI logs and nohup: a line when a
    phase starts, every 5 % (at most one per 5 s) or 30 s of progress, and when it ends, each with the elapsed
    time and an estimate of what remains (from the rate so far)."""

    def __init__(self, echo=None, clock=None) -> None:
        import time

        self.echo = echo or (lambda line: click.echo(line, err=True))
        self.clock = clock or time.monotonic
        self.phases: dict[str, tuple[float, float, int]] = {}  # label -> (start, last printed, its 5 % step)

    def __call__(self, label: str, done: int, total: int, info: str = "") -> None:
        now = self.clock()
        start, last, step = self.phases.setdefault(label, (now, float("-inf"), -1))
        f = done / total if total else 1.0
        finished = done >= total
        now_step = int(done * round(1 / LOG_EVERY_FRACTION) // total) if total else 0
        if not (finished or step < 0 or now - last >= LOG_EVERY_SECONDS
                or (now_step > step and now - last >= LOG_MIN_SECONDS)):
            return
        elapsed = now - start
        known = not finished and done > 0 and elapsed >= 1.0  # (a rate from the first instant means nothing)
        eta = f", about {_duration(elapsed * (total - done) / done)} left" if known else ""
        self.echo(f"{label}: {done}/{total} ({100 * f:.0f} %), {_duration(elapsed)} elapsed{eta}"
                  f"{f' ({info})' if info else ''}")
        if finished:
            self.phases.pop(label)  # a later phase with the same label starts again
        else:
            self.phases[label] = (start, now, now_step)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextlib.contextmanager
def progress_bar() -> Iterator[Any]:
    """Yield a (label, done, total[, info]) callback that drives one rich bar per label, or, when stderr is not
    a terminal (CI logs, nohup), prints `ProgressLines`.

    `info` is a short status shown after the bar (a training loop's loss and tokens/s).
    """
    if not console.is_terminal:
        yield ProgressLines()
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int, info: str = "") -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total, info=info)
            bar.update(tasks[label], completed=done, total=total, info=info)
            if done >= total:
                tasks.pop(label)  # a later phase with the same label gets a new bar

        yield update


def echo_json(data: Any) -> None:
    from compress.artifact import json_text

    click.echo(json_text(data), nl=False)


def _sigterm(signum, frame):  # turn SIGTERM into an exception so atomic writes clean up
    raise SystemExit(128 + signum)


def run_cli(group: click.Group) -> None:
    """Run the click group; user errors become one line on stderr and exit status 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, or a failure no check foresaw: still one line, never a traceback
        if os.environ.get("COMPRESS_DEBUG"):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        click.echo(f"Error: internal error: {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno}; "
                   "set COMPRESS_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(1)
