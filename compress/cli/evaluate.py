"""`compress eval`: score a model or artifact on perplexity tasks."""

from __future__ import annotations

import click

from compress.cli._common import echo_json, progress_bar, write_json


@click.command("eval")
@click.argument("model", required=False)
@click.option("--task", "tasks", multiple=True, default=["wikitext2"], show_default=True,
              help="wikitext2, or text:PATH (a text file, or FILE.jsonl:FIELD). Repeatable.")
@click.option("--windows", type=int, default=64, show_default=True, help="First N windows; -1 = all.")
@click.option("--seq-len", type=int, default=1024, show_default=True, help="Tokens per window.")
@click.option("--prepend-bos", is_flag=True, help="Prepend BOS to each window as unscored context.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--output", type=click.Path(), help="Write the results (with the protocol) to this JSON file.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin checkpoints (loaded with weights_only=True).")
def command(model, tasks, windows, seq_len, prepend_bos, batch_size, threads, device, output, allow_pickle) -> None:
    """Evaluate MODEL (directory, artifact or .gguf; default: the reference model).

    \b
    Example:
      compress eval out/smollm2-w4 --task wikitext2 --output results.json
    """
    from compress.artifact import package_versions
    from compress.models import load_model
    from compress.runner import evaluate, set_threads
    from eval import results as eval_results
    from eval.perplexity import PerplexityConfig

    opts = {"windows": windows, "seq_len": seq_len, "prepend_bos": prepend_bos, "batch_size": batch_size}
    PerplexityConfig(**opts)  # validate before loading the model
    set_threads(threads)
    lm = load_model(model, allow_pickle=allow_pickle)
    with progress_bar() as progress:
        results = evaluate(lm, list(tasks), options=opts, device=device, progress=progress)
    for name, r in results.items():
        lo, hi = r["ci95"]
        click.echo(f"{name}: perplexity {r['perplexity']:.4f} (95 % CI {lo:.3f}-{hi:.3f}; {r['tokens_scored']} "
                   f"tokens, {r['windows']} x {seq_len}, {r['seconds']:.1f} s)", err=bool(not output))
    doc = eval_results.document(eval_results.model_identity(lm), results, package_versions())
    if output:
        write_json(output, doc)
    else:
        echo_json(doc)
