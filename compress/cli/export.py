"""`compress export`: write a model or artifact in another format (ONNX with MatMulNBits, GGUF, safetensors)."""

from __future__ import annotations

import click

from compress.cli._common import FINITE, console, echo_json


@click.command("export")
@click.argument("model", required=False)
@click.option("--format", "fmt", default="onnx", show_default=True, help="Exporter (see `compress passes`).")
@click.option("--out", required=True, type=click.Path(), help="Directory to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--accuracy-level", type=click.IntRange(0, 4),
              help="ONNX: MatMulNBits accuracy_level (0 float activations, exact; 4 int8 activations, the only "
                   "fast kernel for 2- and 8-bit weights, less accurate).  [default: 0]")
@click.option("--float-type", type=click.Choice(["f32", "f16"]),
              help="GGUF: type of the float matrices (embeddings, layers left unquantized).  [default: f32]")
@click.option("--requantize", is_flag=True, default=None,
              help="GGUF: round again (our RTN, 32-wide blocks) the layers whose layout GGUF cannot hold "
                   "exactly, instead of refusing; the added error is recorded.")
@click.option("--tolerance", type=FINITE, help="Built-in check. ONNX: largest |logit difference| to the torch model "
                                              "[default 0.01, 0.5 with --accuracy-level 4]. GGUF in llama.cpp: "
                                              "largest KL divergence (nats) of its next-token distributions from "
                                              "the torch model's [default 0.1 for quantized files, 0.001 float].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for the check.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin checkpoints (loaded with weights_only=True).")
def command(model, fmt, out, force, accuracy_level, float_type, requantize, tolerance, threads,
            allow_pickle) -> None:
    """Export MODEL (a compress artifact or model directory; default: the reference model) as --format.

    The ONNX exporter writes a decoder graph of ONNX Runtime's fused operators (KV cache) with every
    quantized Linear as an ONNX Runtime MatMulNBits node holding the
    artifact's own integer weights; the GGUF exporter writes a llama.cpp file
    (DIR/model.gguf) with them as Q8_0/Q4_0/Q4_1 blocks. Both check the result
    (ONNX Runtime's or llama.cpp's logits against the torch model; the GGUF
    file also read back tensor by tensor) before anything appears at --out.

    \b
    Example:
      compress export out/smollm2-w4 --format onnx --out out/smollm2-w4-onnx
      compress eval out/smollm2-w4-onnx --task wikitext2
      compress quantize --method rtn --bits 4 --group-size 32 --out out/w4g32
      compress export out/w4g32 --format gguf --out out/w4g32-gguf
    """
    import inspect

    from compress.models import load_model
    from compress.outputs import claim_output
    from compress.registry import EXPORTERS
    from compress.runner import check_exporter_config, set_threads, weights_bytes

    exporter = EXPORTERS.get(fmt)  # a bad format fails before the model loads
    opts = {k: v for k, v in {"accuracy_level": accuracy_level, "float_type": float_type, "requantize": requantize,
                              "tolerance": tolerance, "threads": threads}.items() if v is not None}
    takes = inspect.signature(exporter.export).parameters
    for name in opts:
        if name not in takes:
            formats = [e.name for e in EXPORTERS if name in inspect.signature(e.export).parameters]
            raise click.UsageError(f"--{name.replace('_', '-')} applies to --format {' or '.join(formats)} only")
    if tolerance is not None and not tolerance > 0:
        raise click.UsageError(f"--tolerance must be positive, got {tolerance}")
    set_threads(threads)
    with claim_output(out, force=force):  # an unwritable --out or a second writer fails before the model loads
        check_exporter_config(exporter, model)  # a format that cannot hold it: before loading it
        lm = load_model(model, allow_pickle=allow_pickle)
        path = exporter.export(lm, out, recipe=[], force=force, **opts)
    summary = {"model": lm.source, "out": str(path), "format": fmt, "bytes": weights_bytes(path)}
    console.print(f"wrote {path} ({summary['bytes'] / 2**20:.1f} MiB)")
    echo_json(summary)
