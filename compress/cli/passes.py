"""`compress passes`: list registered passes with their config fields and defaults."""

from __future__ import annotations

import click

from compress.cli.options import default_of, field_comments, show_default


@click.command("passes")
def command() -> None:
    """List every pass (built-in and plugin) with its config fields, defaults and what they mean (the same
    defaults and texts as the commands' --help: both come from the config dataclasses).

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
        comments = field_comments(spec.config_cls)
        for f in spec.fields():
            note = f"  # {comments[f.name]}" if f.name in comments else ""
            click.echo(f"    {f.name} = {show_default(default_of(f))}{note}")
    click.echo(f"exporters: {', '.join(EXPORTERS.names())}")
    click.echo(f"eval tasks: {', '.join(TASKS.names())}")
    click.echo(f"plugins: {', '.join(plugin_names())}")
