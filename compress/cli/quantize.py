"""`compress quantize`: weight-only quantization of a model into a packed artifact."""

from __future__ import annotations

import click

from compress.cli._common import calib_config, calib_options, console, echo_json, progress_bar


@click.command("quantize")
@click.argument("model", required=False)
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="Input columns per scale; -1 = per output channel.")
@click.option("--sym/--asym", "symmetric", default=True, show_default=True, help="Symmetric (no zero point) or asymmetric.")
@click.option("--method", default=None,
              help="A quantization pass (see `compress passes`) or awq+gptq (the default: AWQ scales, GPTQ rounding).")
@click.option("--target-bits", type=float, default=None,
              help="Average stored bits per weight: bits per layer chosen from measured sensitivity (GPTQ).")
@click.option("--scale-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
@click.option("--ignore", multiple=True, help="Modules to keep in float (repeatable); default: lm_head.")
@click.option("--out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin checkpoints (loaded with weights_only=True).")
@calib_options
def command(model, bits, group_size, symmetric, method, target_bits, scale_dtype, ignore, out, force, allow_pickle, calib_source, calib_samples, calib_seq_len, seed) -> None:
    """Quantize MODEL's Linear weights and save a packed artifact (safetensors).

    MODEL is a Hugging Face directory or a .gguf file; without it, the default
    reference model (SmolLM2-135M-Instruct) is used.

    \b
    Example:
      compress quantize --bits 4 --group-size 128 --out out/smollm2-w4
      compress quantize --target-bits 3.5 --group-size 64 --asym --out out/smollm2-mixed
    """
    from compress.quantize.presets import quantize_recipe
    from compress.runner import compress_model

    fields = {"group_size": group_size, "symmetric": symmetric, "scale_dtype": scale_dtype}
    if ignore:
        fields["ignore"] = list(ignore)
    recipe = quantize_recipe(method, bits=int(bits), target_bits=target_bits, **fields)
    with progress_bar() as progress:
        summary = compress_model(model, recipe, out, force=force, allow_pickle=allow_pickle,
                                   calib=calib_config(calib_source, calib_samples, calib_seq_len, seed), progress=progress)
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB)")
    echo_json(summary)
