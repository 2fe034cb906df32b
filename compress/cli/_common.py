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


@contextlib.contextmanager
def progress_bar() -> Iterator[Any]:
    """Yield a (label, done, total[, info]) callback that drives one rich bar per label.

    `info` is a short status shown after the bar (a training loop's loss and tokens/s).
    """
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False, disable=not console.is_terminal) as bar:
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
