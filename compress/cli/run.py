"""`compress run`: apply a recipe file to a model and save the artifact."""

from __future__ import annotations

import click

from compress.cli._common import console, echo_json
from compress.cli.options import output_options


@click.command("run")
@click.argument("recipe", type=click.Path())
@click.argument("model", required=False)
@click.option("--format", "fmt", default="safetensors", show_default=True, help="Exporter (see `compress passes`).")
@output_options
def command(recipe, model, fmt, output) -> None:
    """Apply the steps of RECIPE (a YAML file) to MODEL and write the artifact.

    The recipe is validated before the model is loaded.

    \b
    Example:
      compress run recipes/rtn-w4g128.yaml --out out/smollm2-w4
    """
    from compress.recipe import Recipe

    summary = output.run(model, Recipe.from_file(recipe), fmt=fmt)
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB)")
    echo_json(summary)
