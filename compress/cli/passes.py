"""`compress passes`: list registered passes with their config fields and defaults."""

from __future__ import annotations

import dataclasses

import click


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return repr(list(v) if isinstance(v, tuple) else v)


@click.command("passes")
def command() -> None:
    """List every pass (built-in and plugin) with its config fields and defaults.

    \b
    Example:
      compress passes
    """
    from compress.plugins import plugin_names
    from compress.registry import EXPORTERS, PASSES, TASKS

    for spec in PASSES:
        calib = (" [calibration: depends on the model]" if callable(spec.needs_calibration)
                 else " [needs calibration]" if spec.needs_calibration else "")
        click.echo(f"{spec.name}{calib}: {spec.summary}")
        for f in spec.fields():
            click.echo(f"    {f.name} = {_default(f)}")
    click.echo(f"exporters: {', '.join(EXPORTERS.names())}")
    click.echo(f"eval tasks: {', '.join(TASKS.names())}")
    click.echo(f"plugins: {', '.join(plugin_names())}")
