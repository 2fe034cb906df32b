"""`compress run`: apply a recipe file to a model and save the artifact."""

from __future__ import annotations

import click

from compress.cli._common import console, echo_json, progress_bar
from compress.cli.options import calib_config, calib_options


@click.command("run")
@click.argument("recipe", type=click.Path())
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--format", "fmt", default="safetensors", show_default=True, help="Exporter (see `compress passes`).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin checkpoints (loaded with weights_only=True).")
@calib_options
def command(recipe, model, out, fmt, force, allow_pickle, calib_source, calib_samples, calib_seq_len, seed) -> None:
    """Apply the steps of RECIPE (a YAML file) to MODEL and write the artifact.

    The recipe is validated before the model is loaded.

    \b
    Example:
      compress run recipes/rtn-w4g128.yaml --out out/smollm2-w4
    """
    from compress.recipe import Recipe
    from compress.runner import compress_model

    r = Recipe.from_file(recipe)
    with progress_bar() as progress:
        summary = compress_model(model, r, out, fmt=fmt, force=force, allow_pickle=allow_pickle,
                                   calib=calib_config(calib_source, calib_samples, calib_seq_len, seed), progress=progress)
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB)")
    echo_json(summary)
