"""`compress prune`: set weights to zero (unstructured or N:M) and save the sparse model."""

from __future__ import annotations

import click

from compress.cli._common import calib_config, calib_options, console, echo_json, progress_bar

METHODS = ("sparsegpt", "wanda", "magnitude")


@click.command("prune")
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(METHODS), default="sparsegpt", show_default=True,
              help="sparsegpt (OBS weight update), wanda (|W| x ||X||, no update) or magnitude (data-free).")
@click.option("--sparsity", type=float, default=None, help="Fraction of each layer's weights to zero [default: 0.5].")
@click.option("--pattern", default=None, help="N:M sparsity instead: N non-zeros in every M inputs, e.g. 2:4.")
@click.option("--ignore", multiple=True, help="Modules to keep dense (repeatable); default: lm_head.")
@click.option("--out", required=True, type=click.Path(), help="Model directory to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin checkpoints (loaded with weights_only=True).")
@calib_options
def command(model, method, sparsity, pattern, ignore, out, force, allow_pickle, calib_source, calib_samples,
            calib_seq_len, seed) -> None:
    """Prune MODEL's Linear weights and save the sparse model (safetensors).

    MODEL is a Hugging Face directory or a .gguf file; without it, the default
    reference model (SmolLM2-135M-Instruct) is used. Pruned weights stay zero
    through a later `compress quantize` of the result.

    \b
    Example:
      compress prune --method wanda --sparsity 0.5 --out out/smollm2-wanda50
      compress prune --method sparsegpt --pattern 2:4 --out out/smollm2-2of4
    """
    from compress.recipe import Recipe
    from compress.runner import compress_model

    fields = {"sparsity": sparsity, "pattern": pattern}
    if ignore:
        fields["ignore"] = list(ignore)
    recipe = Recipe.single(method, **{k: v for k, v in fields.items() if v is not None})
    with progress_bar() as progress:
        summary = compress_model(model, recipe, out, force=force, allow_pickle=allow_pickle,
                                 calib=calib_config(calib_source, calib_samples, calib_seq_len, seed), progress=progress)
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB, "
                  f"sparsity {summary['reports'][0]['metrics']['sparsity']:.4f})")
    echo_json(summary)
