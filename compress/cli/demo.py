"""`compress demo`: int4 RTN on the reference model, fp32 vs int4 perplexity and size."""

from __future__ import annotations

import click

from compress.cli._common import console, progress_bar


@click.command("demo")
@click.option("--out", default="out/smollm2-rtn-w4g128", show_default=True, type=click.Path())
@click.option("--windows", type=int, default=64, show_default=True, help="WikiText-2 windows of 1024 tokens.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--output", type=click.Path(), help="Also write the comparison to this JSON file.")
def command(out, windows, threads, output) -> None:
    """Quantize the reference model to int4 (g128), save it, and compare with fp32.

    \b
    Example:
      compress demo --windows 64
    """
    from rich.table import Table

    from compress.artifact import write_json_atomic
    from compress.demo import run_demo
    from compress.runner import set_threads

    set_threads(threads)
    with progress_bar() as progress:
        r = run_demo(out, windows=windows, force=True, progress=progress)
    t = Table(title=f"{r['model']}: WikiText-2 perplexity ({windows} x 1024 tokens) and size")
    for col in ("model", "perplexity", "weights on disk", "bits / quantized weight"):
        t.add_column(col)
    t.add_row("fp32", f"{r['fp32']['perplexity']:.2f}", f"{r['fp32']['bytes'] / 2**20:.1f} MiB", "32")
    t.add_row("int4 RTN g128", f"{r['int4']['perplexity']:.2f}", f"{r['int4']['bytes'] / 2**20:.1f} MiB",
              f"{r['int4']['bits_per_weight']:.3f}")
    console.print(t)
    click.echo(f"fp32 perplexity {r['fp32']['perplexity']:.4f}, {r['fp32']['bytes']} bytes; "
               f"int4 perplexity {r['int4']['perplexity']:.4f}, {r['int4']['bytes']} bytes; artifact {r['artifact']}")
    if output:
        write_json_atomic(output, r)
