"""`compress merge-lora`: fold PEFT LoRA adapters into a model (float or a quantized compress artifact)."""

from __future__ import annotations

import click

from compress.cli._common import console, echo_json
from compress.cli.options import config_options, output_options
from compress.lora.merge import LoraMergeConfig


@click.command("merge-lora")
@click.argument("model", required=False)
@config_options(LoraMergeConfig, into="merge", skip=("allow_pickle",), names={"adapters": "adapter"},
                helps={"adapters": "PEFT adapter directory (adapter_config.json + adapter_model.safetensors); "
                                   "repeatable"})
@click.option("--tune-steps", type=click.IntRange(min=0), default=32, show_default=True,
              help="Quantized base: steps of scale tuning after re-quantization (a scale_tune step), fitting the "
                   "re-quantized modules' scales so the model matches the exact float merge on the calibration "
                   "data; 0 turns it off.")
@output_options(pickle_help="Allow pickled checkpoints and adapter_model.bin (loaded with weights_only=True).")
def command(model, tune_steps, output, merge) -> None:
    """Merge LoRA ADAPTERs into MODEL and save the result.

    MODEL is a Hugging Face directory, a .gguf file or a quantized compress
    artifact (without it, the reference model). Plain LoRA, rsLoRA and DoRA
    adapters merge as W + (alpha/r) B A (DoRA rescales rows to its magnitudes).
    Into a quantized artifact, the layers an adapter touches are dequantized,
    merged and quantized again (GPTQ with calibration for GPTQ artifacts), so
    the result is again packed.

    \b
    Example:
      compress merge-lora base/ --adapter my-lora --out out/merged
      compress merge-lora out/smollm2-w4 --adapter my-lora --out out/merged-w4
      compress merge-lora --adapter a --adapter b --weights 0.7,0.3 --method ties --out out/ab
    """
    from compress.recipe import Recipe

    if not merge.get("adapters"):
        raise click.UsageError("give at least one --adapter")
    steps = [{"pass": "lora_merge", **merge, "allow_pickle": output.allow_pickle}]
    if tune_steps:  # (nothing to tune, and no calibration, on a float base)
        steps.append({"pass": "scale_tune", "steps": tune_steps})
    summary = output.run(model, Recipe.from_steps(steps))
    rep, tune = summary["reports"][0], summary["reports"][1:]
    extra = ""
    if "requantization_relative_error" in rep["metrics"]:
        m = rep["metrics"]
        extra = (f", {rep['config']['requantized']['modules']} re-quantized with {rep['config']['requantized']['method']}"
                 f" (relative weight error {m['requantization_relative_error']:.4f})")
        if tune and "kl_before" in tune[0]["metrics"]:
            m = tune[0]["metrics"]
            extra += f"; scale tuning: KL to the float merge {m['kl_before']:.4f} -> {m['kl_after']:.4f}"
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB, {rep['modules']} modules merged{extra})")
    echo_json(summary)
