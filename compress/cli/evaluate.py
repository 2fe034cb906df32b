"""`compress eval`: score a model or artifact on perplexity tasks."""

from __future__ import annotations

import click

from compress.cli._common import echo_json, progress_bar
from compress.cli.options import PICKLE_HELP, config_options
from eval.multiple_choice import MCConfig
from eval.perplexity import PerplexityConfig
from eval.results import MEANS, PERPLEXITIES


@click.command("eval")
@click.argument("model", required=False)
@click.option("--task", "tasks", multiple=True, default=["wikitext2"], show_default=True,
              help="wikitext2; text:PATH (a text file, or FILE.jsonl:FIELD); mmlu; arc_easy; "
                   "mc:FILE.jsonl|.csv (your multiple-choice questions). Repeatable.")
@config_options(PerplexityConfig, into="perplexity", skip=("prepend_bos", "batch_size"))
@click.option("--prepend-bos/--no-prepend-bos", default=None,
              help="BOS before each perplexity window (unscored) or prompt.  [default: as the tokenizer does by "
                   "default, as lm-evaluation-harness; recorded in each result's protocol (the reference model's "
                   "tokenizer adds none)]")
@config_options(MCConfig, into="multiple_choice", skip=("subjects", "prepend_bos"))
@click.option("--subjects", help="MMLU: comma-separated subjects (default: all 57).")
@click.option("--batch-size", type=int, help="Windows (perplexity) or contexts (multiple choice) per forward pass.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Precision the torch model computes in (recorded in each task's protocol). bfloat16 is about "
                   "2x faster on CPUs with AVX512-BF16/AMX; ONNX models run in their own precision.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "llama.cpp"]), default="auto",
              show_default=True,
              help="What runs the model. auto: ONNX in ONNX Runtime, GGUF in llama.cpp when llama-cpp-python is "
                   "installed (else dequantized into torch), everything else in torch.")
@click.option("--reference", type=click.Path(),
              help="An encoder without a masked-LM head is scored by embedding_cosine against this float model "
                   "[default: the model an artifact was made from (its compress.json); a float model: itself].")
@click.option("--output", type=click.Path(), help="Write the results file (compress.eval/1 JSON) here.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
def command(model, tasks, prepend_bos, subjects, batch_size, threads, device, dtype, backend, reference, output,
            allow_pickle, perplexity, multiple_choice) -> None:
    """Evaluate MODEL (directory, artifact, .gguf, or ONNX; default: the reference model) and write a results file.

    The results file (model identity, metric with 95 % interval, protocol,
    per-item records) is what `compress gate` and `compress report` read.
    A masked-LM encoder is scored by pseudo-perplexity, an encoder without a
    head by embedding cosine to its float reference (`--reference`).

    \b
    Example:
      compress eval out/smollm2-w4 --task wikitext2 --task arc_easy --output w4.json
      compress eval --task mmlu --subjects anatomy,astronomy --shots 5
      compress eval out/minilm-w4 --task wikitext2 --seq-len 254 --reference models/minilm
    """
    from compress.artifact import package_versions, write_json_atomic
    from compress.checks import check_device
    from compress.outputs import check_output_file
    from compress.runner import open_for_eval, plan_tasks, run_tasks, set_threads
    from eval import results as eval_results

    opts = {**perplexity, **multiple_choice, "prepend_bos": prepend_bos, "batch_size": batch_size,
            "subjects": tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else None}
    plan_tasks(list(tasks), opts)  # validate tasks, their files and options before loading the model
    if output:
        check_output_file(output)
    check_device(device)
    set_threads(threads)
    backend, identity = open_for_eval(model, allow_pickle=allow_pickle, device=device, batch_size=batch_size,
                                      threads=threads, dtype=dtype, backend=backend, reference=reference)
    with progress_bar() as progress:
        results = run_tasks(backend, list(tasks), options=opts, progress=progress)
    for name, r in results.items():
        lo, hi = r["ci95"]
        if r["metric"] in PERPLEXITIES:
            line = (f"perplexity {r['value']:.4f} (95 % CI {lo:.3f}-{hi:.3f}; {r['tokens_scored']} tokens, "
                    f"{r['windows']} windows)")
        elif r["metric"] in MEANS:
            line = (f"{r['metric']} {r['value']:.6f} (95 % CI {lo:.6f}-{hi:.6f}; lowest {r['min_cosine']:.6f}; "
                    f"{r['windows']} windows)")
        else:
            line = (f"accuracy {100 * r['value']:.2f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f}; "
                    f"{r['questions']} questions, macro {100 * r['accuracy_macro']:.2f} %)")
        click.echo(f"{name}: {line}, {r['seconds']:.1f} s", err=not output)
    doc = eval_results.document(identity, results, package_versions())
    if output:
        write_json_atomic(output, doc)
    else:
        echo_json(doc)
