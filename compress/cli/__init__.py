"""`compress` command line: one module per command group, each a thin wrapper over one library call."""

from __future__ import annotations

import click

from compress import __version__


class _Group(click.Group):
    """Turns library user errors (ValueError) into one-line click errors with exit status 1; 2 for a model
    compress does not take at all (`archs.UnsupportedModel`)."""

    def invoke(self, ctx: click.Context):
        from compress.archs import UnsupportedModel

        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            err = click.ClickException(str(e))
            err.exit_code = 2 if isinstance(e, UnsupportedModel) else 1
            raise err from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compress")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Compress transformers: quantize, prune, distill, merge LoRA; export; evaluate; gate.

    \b
    Example:
      compress quantize --bits 4 --group-size 128 --out out/smollm2-w4
      compress eval out/smollm2-w4 --task wikitext2
    """
    import logging

    from compress.plugins import load_plugins

    load_plugins()  # built-in and installed passes, exporters and tasks, registered once
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _register_commands() -> None:
    import importlib

    for name in ("passes", "quantize", "prune", "distill", "lora", "run", "export", "evaluate", "gate", "report",
                 "demo"):  # one module per command, each defining `command`
        cli.add_command(importlib.import_module(f"compress.cli.{name}").command)


_register_commands()


def main() -> None:
    from compress.cli._common import run_cli

    run_cli(cli)
