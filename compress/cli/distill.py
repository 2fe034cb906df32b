"""`compress distill`: train a student to imitate a teacher and save it (safetensors)."""

from __future__ import annotations

import click

from compress.cli._common import FINITE, console, echo_json
from compress.cli.options import config_options, output_options
from compress.distill.kd import DistillConfig

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
@click.option("--student-from-pruned", "pruned", default=None, metavar="KIND[:RATIO]",
              help="Student = the teacher structurally pruned: channels, heads or layers, ratio 0.25 by default.")
@click.option("--student-layers", type=int, default=None, help="Student = the teacher with N evenly spaced blocks.")
@click.option("--student-mlp-ratio", type=FINITE, default=None,
              help="... and/or this fraction of MLP channels removed (by weight magnitude).")
@config_options(DistillConfig, into="distill", names={"seed": "train-seed"},
                helps={"teacher": "teacher model directory or .gguf; default: the reference model (with STUDENT) "
                                  "or the model the student is made from"})
@output_options
def command(student, pruned, student_layers, student_mlp_ratio, output, distill) -> None:
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

    made = [o for o, v in (("STUDENT", student), ("--student-from-pruned", pruned),
                           ("--student-layers/--student-mlp-ratio", student_layers or student_mlp_ratio)) if v]
    if len(made) != 1:
        raise click.UsageError("give exactly one student: a STUDENT directory, --student-from-pruned, "
                               f"or --student-layers/--student-mlp-ratio (got {', '.join(made) or 'none'})")
    fields = distill
    teacher = fields.get("teacher")
    if student and teacher is None:  # the default teacher is the reference model, not the student's own source
        from compress.reference import reference_model_dir

        fields["teacher"] = str(reference_model_dir())
    steps_list = [{"pass": "distill", **fields}]
    if pruned:
        steps_list.insert(0, _pruned_student(pruned))
    elif not student:
        steps_list.insert(0, {"pass": "student", "layers": student_layers, "mlp_ratio": student_mlp_ratio})
    recipe = Recipe.from_steps(steps_list, where="distill options")
    summary = output.run(student or teacher, recipe)
    if not summary.get("written", True):
        return  # another process of a distributed run writes the artifact
    from compress.distill.curve import write_curve

    rep = summary["reports"][-1]
    files = write_curve(rep, output.out)
    m = rep["metrics"]
    console.print(f"wrote {summary['out']}: held-out perplexity {m['heldout_perplexity_before']:.3f} -> "
                  f"{m['heldout_perplexity_after']:.3f}; curve in {', '.join(str(f) for f in files)}")
    echo_json({**summary, "reports": [{**r, "config": {k: v for k, v in r["config"].items()
                                                         if k not in ("curve", "evals")}} for r in summary["reports"]]})
