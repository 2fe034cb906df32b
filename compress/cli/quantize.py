"""`compress quantize`: weight-only quantization of a model into a packed artifact."""

from __future__ import annotations

import click

from compress.cli._common import FINITE, console, echo_json, refuse
from compress.cli.options import config_options, output_options
from compress.quantize.scheme import QuantScheme
from compress.recipe import Recipe


@click.command("quantize")
@click.argument("model", required=False)
@config_options(QuantScheme, into="scheme", names={"symmetric": "sym/--asym"})
@click.option("--method", default=None,
              help="A quantization pass (see `compress passes`) or a preset chain in recipes/ (awq+gptq, the "
                   "default: AWQ scales, GPTQ rounding).")
@click.option("--target-bits", type=FINITE, default=None,
              help="Average stored bits per weight: bits per layer chosen from measured sensitivity (GPTQ).")
@click.option("--activations", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="int8: W8A8, int8 weights per channel and int8 activations (with --bits 8).")
@click.option("--dynamic", is_flag=True, help="W8A8: per-token activation scales at run time instead of calibrated ones.")
@click.option("--observer", type=click.Choice(["minmax", "percentile", "mse", "kl"]), default=None,
              help="W8A8 static: how calibration picks the activation range.  [default: minmax]")
@click.option("--smoothquant", default=None, metavar="ALPHA|search",
              help="W8A8: migrate activation outliers into the weights first (alpha in [0, 1], or search per block).")
@click.option("--fallback-error", type=FINITE, default=None, metavar="E",
              help="W8A8 static: keep in float every stage whose relative output error on calibration data exceeds E "
                   "(e.g. 0.01); the report lists each stage's error.")
@click.option("--tune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="After rounding, a scale_tune step: train the packed group scales for N steps so the model's "
                   "logits match the input model's (codes fixed; EfficientQAT's E2E-QP). 0 = off.")
@click.option("--rotate", is_flag=True,
              help="Experimental: first fold the norms and random orthogonal rotations of the residual stream and "
                   "of each head's values into the weights (QuaRot/SpinQuant's R1, R2): the same float model, fewer "
                   "outliers; on the reference model it costs quality (bench/results/rotate.json).")
@click.option("--embeddings", type=click.Choice(["float", "int8", "int4"]), default="float", show_default=True,
              help="The token embedding (and an output layer tied to it, stored once): int8 / int4 = symmetric "
                   "groups of 32 with float16 scales (llama.cpp's Q8_0 / Q4_0 numbers).")
@click.option("--ignore", multiple=True,
              help="Modules to keep in float (repeatable); default: the output head (lm_head, an encoder's MLM head).")
@output_options
def command(model, method, target_bits, activations, dynamic, observer, smoothquant, fallback_error, tune_steps,
            rotate, embeddings, ignore, output, scheme) -> None:
    """Quantize MODEL's Linear weights and save a packed artifact (safetensors).

    MODEL is a Hugging Face directory or a .gguf file; without it, the default
    reference model (SmolLM2-135M-Instruct) is used.

    \b
    Example:
      compress quantize --bits 4 --group-size 128 --out out/smollm2-w4
      compress quantize --target-bits 3.5 --group-size 64 --asym --out out/smollm2-mixed
      compress quantize --bits 8 --activations int8 --observer mse --smoothquant 0.5 --out out/smollm2-w8a8
    """
    recipe = _recipe(scheme, method, target_bits, activations=activations, dynamic=dynamic,
                     observer=observer, smoothquant=smoothquant, ignore=ignore, fallback_error=fallback_error,
                     tune_steps=tune_steps)
    steps = recipe.to_list()
    if rotate:  # first: every quantizer then sees the rotated weights
        steps.insert(0, {"pass": "rotate"})
    if embeddings != "float":  # last: the weight passes calibrate with the float embedding
        steps.append({"pass": "quantize_embeddings", "bits": int(embeddings[3:])})
    if rotate or embeddings != "float":
        recipe = Recipe.from_steps(steps, where="quantize options")
    summary = output.run(model, recipe)
    console.print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB)")
    echo_json(summary)


DEFAULT_METHOD = "awq+gptq"  # the best W4 measured on the reference model (bench/results/quantize_vs_peers.json)


def _recipe(scheme: dict, method: str | None = None, target_bits: float | None = None, *, activations: str = "none",
            dynamic: bool = False, observer: str | None = None, smoothquant: str | None = None, ignore=(),
            fallback_error: float | None = None, tune_steps: int = 0):
    """The recipe `compress quantize` runs; `scheme` holds the QuantScheme fields given on the command line."""
    from compress.quantize.w8a8 import w8a8_recipe
    from compress.recipe import Recipe

    if activations == "int8":
        if scheme.get("bits") != 8:
            raise click.UsageError("--activations int8 quantizes weights to 8 bits too: pass --bits 8")
        refuse({"--group-size": scheme.get("group_size"), "--sym/--asym": "symmetric" in scheme,
                "--scale-dtype": scheme.get("scale_dtype"), "--method": method, "--target-bits": target_bits,
                "--tune-steps": tune_steps > 0},
               "do not apply to W8A8 (int8 weights per output channel, symmetric, float32 scales)")
        if dynamic:
            refuse({"--observer": observer, "--smoothquant": smoothquant, "--fallback-error": fallback_error},
                   "need calibrated (static) activations: --dynamic computes activation scales at run time")
        sq = smoothquant
        if sq is not None and sq != "search":
            try:
                sq = float(sq)
            except ValueError:
                raise click.UsageError(f"--smoothquant takes an alpha in [0, 1] or 'search', got {sq!r}") from None
        return Recipe.from_steps(w8a8_recipe(
            activations="dynamic" if dynamic else "static", observer=observer or "minmax", smoothquant=sq,
            ignore=list(ignore) or None, **({"fallback_error": fallback_error} if fallback_error is not None else {})),
            where="W8A8 options")
    refuse({"--dynamic": dynamic, "--observer": observer, "--smoothquant": smoothquant,
            "--fallback-error": fallback_error}, "apply to activation quantization: add --activations int8")
    fields = {k: v for k, v in scheme.items() if k != "bits"}
    if ignore:
        fields["ignore"] = list(ignore)
    if target_bits is not None:  # bits per layer under a budget: the mixed pass (GPTQ at each layer's width)
        if method not in (None, "gptq", "mixed"):
            raise click.UsageError(f"--target-bits chooses bits per layer with GPTQ; it does not combine with "
                                   f"--method {method}")
        steps = [{"pass": "mixed", "target_bits": target_bits, **fields}]
    else:
        steps = Recipe.for_method(method or DEFAULT_METHOD, **{**scheme, **fields}).to_list()
    if tune_steps:
        steps.append({"pass": "scale_tune", "steps": tune_steps})
    return Recipe.from_steps(steps, where="quantize options")
