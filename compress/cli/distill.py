"""`compress distill`: train a student to imitate a teacher and save it (safetensors)."""

from __future__ import annotations

import click

from compress.cli._common import (
    FINITE,
    calib_config,
    calib_options,
    console,
    echo_json,
    progress_bar,
)

PRUNED = {"channels": "prune_channels", "heads": "prune_heads", "layers": "prune_layers"}


def _pruned_student(spec: str) -> dict:
    kind, sep, ratio = spec.partition(":")
    try:
        value = float(ratio) if sep else 0.25
    except ValueError:
        value = None
    if kind not in PRUNED or value is None:
        raise click.BadParameter(f"expected KIND[:RATIO] with KIND one of {', '.join(PRUNED)}, got {spec!r}",
                                 param_hint="--student-from-pruned")
    return {"pass": PRUNED[kind], "ratio": value}


@click.command("distill")
@click.argument("student", required=False)
@click.option("--teacher", default=None, help="Teacher model directory or .gguf [default: the reference model].")
@click.option("--student-from-pruned", "pruned", default=None, metavar="KIND[:RATIO]",
              help="Student = the teacher structurally pruned: channels, heads or layers, ratio 0.25 by default.")
@click.option("--student-layers", type=int, default=None, help="Student = the teacher with N evenly spaced blocks.")
@click.option("--student-mlp-ratio", type=FINITE, default=None,
              help="... and/or this fraction of MLP channels removed (by weight magnitude).")
@click.option("--data", default=None, help="Training text: wikitext2 (validation split), a .txt file, or FILE.jsonl:FIELD.")
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: 100].")
@click.option("--batch-size", type=int, default=None, help="Sequences per step over all processes [default: 8].")
@click.option("--micro-batch-size", type=int, default=None, help="Sequences per forward per process [default: 2].")
@click.option("--seq-len", type=int, default=None, help="Tokens per training sequence [default: 512].")
@click.option("--lr", type=FINITE, default=None, help="Peak learning rate (AdamW, warm-up then cosine) [default: 5e-5].")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps [default: 10].")
@click.option("--temperature", type=FINITE, default=None, help="Softmax temperature of the logit loss [default: 1].")
@click.option("--divergence", type=click.Choice(["forward", "reverse", "js"]), default=None,
              help="Logit divergence: forward KL (default), reverse KL or Jensen-Shannon.")
@click.option("--kd-weight", type=FINITE, default=None, help="Weight of the logit loss [default: 1].")
@click.option("--ce-weight", type=FINITE, default=None, help="Weight of the hard-label cross-entropy [default: 0].")
@click.option("--hidden-weight", type=FINITE, default=None, help="Weight of the hidden-state loss [default: 0].")
@click.option("--hidden-loss", type=click.Choice(["mse", "cosine"]), default=None, help="Hidden-state loss [default: mse].")
@click.option("--layer-map", default=None, help="Student:teacher block pairs, e.g. 0:0,1:2 [default: automatic].")
@click.option("--attention-weight", type=FINITE, default=None, help="Weight of the attention-map loss [default: 0].")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default=None,
              help="auto: bf16 where the device has it natively [default: auto].")
@click.option("--eval-every", type=int, default=None, help="Held-out perplexity every N steps [default: only at the end].")
@click.option("--checkpoint-dir", type=click.Path(), default=None, help="Directory for periodic checkpoints.")
@click.option("--checkpoint-every", type=int, default=None, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --checkpoint-dir.")
@click.option("--train-seed", type=int, default=None, help="Seed of the data order and projections [default: 0].")
@click.option("--teacher-cache", type=click.Path(), default=None,
              help="Cache the teacher's top-k log-probs here (filled once; later runs need no teacher forward).")
@click.option("--cache-topk", type=int, default=None, help="Tokens per position in the teacher cache [default: 64].")
@click.option("--out", required=True, type=click.Path(), help="Model directory to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin checkpoints (loaded with weights_only=True).")
@calib_options
def command(student, teacher, pruned, student_layers, student_mlp_ratio, data, steps, batch_size, micro_batch_size,
            seq_len, lr, warmup_steps, temperature, divergence, kd_weight, ce_weight, hidden_weight, hidden_loss,
            layer_map, attention_weight, mixed_precision, eval_every, checkpoint_dir, checkpoint_every, resume,
            train_seed, teacher_cache, cache_topk, out, force, allow_pickle, calib_source, calib_samples, calib_seq_len, seed) -> None:
    """Distill TEACHER into STUDENT (a model directory) or into a student made from the teacher.

    The student is trained on the text to match the teacher's next-token
    distributions (and, with --hidden-weight, its hidden states); the result
    is a standard Hugging Face directory with the training curve beside it
    (distill_curve.json, distill_curve.png). Runs unchanged under
    `accelerate launch` on several processes or GPUs.

    \b
    Example:
      compress distill --student-from-pruned channels:0.25 --steps 200 --out out/mlp75-kd
      compress distill out/small --teacher out/big --ce-weight 0.5 --out out/small-kd
      accelerate launch --num_processes 2 --cpu -m compress distill --student-layers 20 --out out/l20
    """
    from compress.recipe import Recipe
    from compress.runner import compress_model

    made = [o for o, v in (("STUDENT", student), ("--student-from-pruned", pruned),
                           ("--student-layers/--student-mlp-ratio", student_layers or student_mlp_ratio)) if v]
    if len(made) != 1:
        raise click.UsageError("give exactly one student: a STUDENT directory, --student-from-pruned, "
                               f"or --student-layers/--student-mlp-ratio (got {', '.join(made) or 'none'})")
    fields = {"teacher": teacher, "data": data, "steps": steps, "batch_size": batch_size,
              "micro_batch_size": micro_batch_size, "seq_len": seq_len, "lr": lr, "warmup_steps": warmup_steps,
              "temperature": temperature, "divergence": divergence, "kd_weight": kd_weight, "ce_weight": ce_weight,
              "hidden_weight": hidden_weight, "hidden_loss": hidden_loss, "layer_map": layer_map,
              "attention_weight": attention_weight, "mixed_precision": mixed_precision, "eval_every": eval_every,
              "checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every, "resume": resume or None,
              "seed": train_seed, "teacher_cache": teacher_cache, "cache_topk": cache_topk}
    if student and teacher is None:  # the default teacher is the reference model, not the student's own source
        from compress.reference import reference_model_dir

        fields["teacher"] = str(reference_model_dir())
    steps_list = [{"pass": "distill", **{k: v for k, v in fields.items() if v is not None}}]
    if pruned:
        steps_list.insert(0, _pruned_student(pruned))
    elif not student:
        steps_list.insert(0, {"pass": "student", "layers": student_layers, "mlp_ratio": student_mlp_ratio})
    recipe = Recipe.from_steps(steps_list, where="distill options")
    with progress_bar() as progress:
        summary = compress_model(student or teacher, recipe, out, force=force, allow_pickle=allow_pickle,
                                 calib=calib_config(calib_source, calib_samples, calib_seq_len, seed), progress=progress)
    if not summary.get("written", True):
        return  # another process of a distributed run writes the artifact
    from compress.distill.curve import write_curve

    rep = summary["reports"][-1]
    files = write_curve(rep, out)
    m = rep["metrics"]
    console.print(f"wrote {summary['out']}: held-out perplexity {m['heldout_perplexity_before']:.3f} -> "
                  f"{m['heldout_perplexity_after']:.3f}; curve in {', '.join(str(f) for f in files)}")
    echo_json({**summary, "reports": [{**r, "config": {k: v for k, v in r["config"].items()
                                                         if k not in ("curve", "evals")}} for r in summary["reports"]]})
