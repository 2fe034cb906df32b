"""`compress prune`: set weights to zero (unstructured or N:M) and save the sparse model."""

from __future__ import annotations

import click

from compress.cli._common import FINITE, console, echo_json, refuse
from compress.cli.options import output_options

METHODS = ("sparsegpt", "wanda", "magnitude")
STRUCTURES = {"channels": "prune_channels", "heads": "prune_heads", "layers": "prune_layers"}


@click.command("prune")
@click.argument("model", required=False)
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="Unstructured/N:M: sparsegpt (OBS weight update; the default), wanda (|W| x ||X||, no update) "
                   "or magnitude (data-free).")
@click.option("--sparsity", type=FINITE, default=None, help="Fraction of each layer's weights to zero [default: 0.5].")
@click.option("--pattern", default=None, help="N:M sparsity instead: N non-zeros in every M inputs, e.g. 2:4.")
@click.option("--structure", type=click.Choice(list(STRUCTURES)), default=None,
              help="Remove whole MLP channels, attention heads or decoder layers instead (a smaller dense model).")
@click.option("--ratio", type=FINITE, default=None, help="With --structure: fraction of the units to remove [default: 0.25].")
@click.option("--importance", type=click.Choice(["activation", "magnitude", "cosine", "loss"]), default=None,
              help="With --structure: activation (default for channels/heads) or magnitude; "
                   "cosine (default for layers) or loss.")
@click.option("--unit", type=click.Choice(["query", "kv"]), default=None,
              help="With --structure heads: query heads in every KV group (default) or whole KV groups.")
@click.option("--ignore", multiple=True,
              help="Modules to keep dense (repeatable); default: the output head (lm_head, an encoder's MLM head).")
@output_options
def command(model, method, sparsity, pattern, structure, ratio, importance, unit, ignore, output) -> None:
    """Prune MODEL's Linear weights and save the sparse model (safetensors).

    MODEL is a Hugging Face directory or a .gguf file; without it, the default
    reference model (SmolLM2-135M-Instruct) is used. Pruned weights stay zero
    through a later `compress quantize` of the result.

    \b
    Example:
      compress prune --method wanda --sparsity 0.5 --out out/smollm2-wanda50
      compress prune --method sparsegpt --pattern 2:4 --out out/smollm2-2of4
      compress prune --structure channels --ratio 0.25 --out out/smollm2-mlp75
    """
    from compress.recipe import Recipe

    if structure is None:
        refuse({"--ratio": ratio, "--importance": importance, "--unit": unit}, "apply to --structure only")
        fields = {"sparsity": sparsity, "pattern": pattern, "ignore": list(ignore) or None}
        name = method or "sparsegpt"
    else:
        refuse({"--method": method, "--sparsity": sparsity, "--pattern": pattern, "--ignore": ignore,
                "--unit": unit if structure != "heads" else None}, f"do not apply to --structure {structure}")
        fields = {"ratio": ratio, "importance": importance, "unit": unit}
        if importance == "magnitude":
            fields["reconstruct"] = False  # the refit needs activation statistics
        name = STRUCTURES[structure]
    recipe = Recipe.single(name, **{k: v for k, v in fields.items() if v is not None})
    summary = output.run(model, recipe)
    metrics = summary["reports"][0]["metrics"]
    what = (f"sparsity {metrics['sparsity']:.4f}" if "sparsity" in metrics
            else f"{metrics['parameters_removed'] / 1e6:.2f} M parameters removed")
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB, {what})")
    echo_json(summary)
