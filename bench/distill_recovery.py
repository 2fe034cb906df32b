"""Distillation recovery on the reference model; writes bench/results/distill_recovery.json.

The student is the reference model with 25 % of its MLP channels removed
(`prune_channels`, activation importance and least-squares refit, calibrated
on 128 x 512 tokens of the WikiText-2 validation split). It is then trained
on that same validation split for a fixed number of steps twice, each in a
fresh subprocess through the product path (`compress_model` with one
`distill` step):
  kd   logit distillation from the unpruned reference model (forward KL, T = 1)
  ce   plain fine-tuning: the same steps, data order, schedule and optimizer,
       with the next-token cross-entropy instead of the teacher
  tc+kd  Minitron's teacher correction (Sreenivas et al. 2024, "LLM Pruning and
       Distillation in Practice", https://arxiv.org/abs/2408.11796): the teacher
       is first fine-tuned with cross-entropy on the same data for
       --correction-steps of the budget (another data order), then the student
       is distilled from the corrected teacher (logit KD) for the remaining steps;
       the correction's time counts in the row's train_seconds
  tc+kd+ce  the same teacher correction, then logit KD plus cross-entropy (1 : 1)
  tcp+kd+ce  Minitron's full order: correct the teacher, prune the corrected
       teacher (as the pruned row was; the pruning's time counts), then KD + CE
       from the corrected teacher; tcp+ce trains that same student with
       cross-entropy only, so the ordering's gain and the distillation's are told apart
  --correction-extra: the corrected rows' students train for all --steps and the teacher's correction comes on
       top (Minitron's accounting: it prepares the teacher; its time still counts in train_seconds); row
       ce-long then gives plain fine-tuning --steps + --correction-steps, the same total optimizer steps
and every model (teacher, pruned, kd, ce) is scored under the DESIGN.md
perplexity protocol (WikiText-2 test, 64 x 1024), and with --arc-questions N also on
ARC-Easy (cloze accuracy on the first N test questions, out of the distillation data's domain). The recovered fraction is
(ppl_pruned - ppl_student) / (ppl_pruned - ppl_teacher); the issue asks for
at least 0.5 from a KD run of at most 30 minutes, and KD beating CE.

    .venv/bin/python bench/distill_recovery.py [--steps 60] [--lr 1e-4] [--windows 64] [--rows kd,ce] [--keep-rows]

--keep-rows keeps the trained rows of an earlier run in --output that this run
does not redo, when they were trained with exactly this run's settings (the
rows of a long benchmark can then be run one at a time, alone on the machine);
every command that contributed is listed in "commands".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from run_peer import rss_bytes  # noqa: E402  (stdlib only)

# kd: logits only; kd+ce: Hinton's mix of soft and hard targets; ce: the plain fine-tuning baseline;
# tc+kd: Minitron's teacher correction (the teacher fine-tuned on the distillation data first, --correction-steps
# of the --steps budget) then logit KD from the corrected teacher for the remaining steps
# tc+kd+ce: the same corrected teacher, then Hinton's mix (soft and hard targets) for the remaining steps;
# tc+rkd+ce: the same with the reverse KL (mode-seeking, as in MiniLLM) in place of the forward KL
# tcp+...: Minitron's order (correct the teacher, prune the corrected teacher, distill from it): the student is the
# corrected teacher pruned as the pruned row was (pruning time counted); tcp+ce trains that student with
# cross-entropy only, which tells the ordering's gain apart from the distillation's
TRAIN = {"kd": {"kd_weight": 1.0, "ce_weight": 0.0}, "kd+ce": {"kd_weight": 1.0, "ce_weight": 1.0},
         "ce": {"kd_weight": 0.0, "ce_weight": 1.0}, "tc+kd": {"kd_weight": 1.0, "ce_weight": 0.0},
         "tc+kd+ce": {"kd_weight": 1.0, "ce_weight": 1.0},
         "tc+rkd+ce": {"kd_weight": 1.0, "ce_weight": 1.0, "divergence": "reverse"},
         "tcp+kd+ce": {"kd_weight": 1.0, "ce_weight": 1.0}, "tcp+kd": {"kd_weight": 1.0, "ce_weight": 0.0},
         "tcp+ce": {"kd_weight": 0.0, "ce_weight": 1.0}, "ce-long": {"kd_weight": 0.0, "ce_weight": 1.0}}
CORRECTED = ("tc+", "tcp+")  # rows whose budget starts with --correction-steps of teacher correction
# ce-long: plain fine-tuning for --steps + --correction-steps, the total optimizer steps of a corrected row under
# --correction-extra (the strict comparison when the teacher's correction is not taken from the student's budget)


def score(model_dir: str | None, args: argparse.Namespace) -> dict:
    """WikiText-2 test perplexity (the protocol, --windows), and ARC-Easy cloze accuracy on the first
    --arc-questions questions when asked: a task out of the distillation data's domain, which tells whether a
    student kept the teacher's abilities or traded them for WikiText-2's style."""
    from compress.models import load_model
    from compress.runner import evaluate

    lm = load_model(model_dir)
    r = evaluate(lm, ["wikitext2"], options={"windows": args.windows})["wikitext2"]
    out = {"perplexity": r["perplexity"], "protocol": r["protocol"]}
    if args.arc_questions:
        a = evaluate(lm, ["arc_easy"], options={"limit": args.arc_questions})["arc_easy"]
        out["arc_easy"] = {"accuracy": a["accuracy"], "ci95": a["ci95"], "questions": a["questions"],
                           "correct": [i["correct"] for i in a["items"]]}  # per question, for paired comparisons
    return out


def one(kind: str, student: str, out: str, args: argparse.Namespace) -> dict:
    """Train `student` (a directory) with the `kind` loss, save to `out`, score it."""
    import torch

    from compress.recipe import Recipe
    from compress.reference import reference_model_dir
    from compress.runner import compress_model

    torch.set_num_threads(args.threads)
    step = _step(kind, args)
    teacher, correction = str(reference_model_dir()), {}  # the unpruned reference model
    t0, scoring_seconds = time.perf_counter(), 0.0
    if kind.startswith(CORRECTED):  # teacher correction: plain fine-tuning of the teacher; its time always counts
        fix = _correction_step(args)
        teacher = out + "-teacher"
        rep = compress_model(None, Recipe.from_steps([fix]), teacher)["reports"][0]
        t1 = time.perf_counter()
        correction = {"teacher_correction": {"step": fix, "train_seconds": round(rep["seconds"], 1),
                                             "evals": rep["config"]["evals"], **score(teacher, args)}}
        scoring_seconds = time.perf_counter() - t1  # not part of the budget
        print(f"  corrected teacher ppl {correction['teacher_correction']['perplexity']:.3f} "
              f"({rep['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if kind.startswith("tcp+"):  # the student is the corrected teacher pruned as the pruned row was
            t2 = time.perf_counter()
            student = out + "-pruned"
            compress_model(teacher, Recipe.single("prune_channels", ratio=0.25), student)
            correction["teacher_correction"]["prune_seconds"] = round(time.perf_counter() - t2, 1)
            t3 = time.perf_counter()
            correction["teacher_correction"]["pruned"] = score(student, args)
            scoring_seconds += time.perf_counter() - t3
    if step["kd_weight"] > 0:
        step["teacher"] = teacher
    summary = compress_model(student, Recipe.from_steps([step]), out)
    seconds = time.perf_counter() - t0 - scoring_seconds
    rep = summary["reports"][0]
    cfg = rep["config"]
    tc = correction.get("teacher_correction", {})
    train_seconds = rep["seconds"] + tc.get("train_seconds", 0.0) + tc.get("prune_seconds", 0.0)
    row = {"row": kind, "step": step, **correction, "train_seconds": round(train_seconds, 1),
           "wall_seconds": round(seconds, 1), "peak_rss_bytes": rss_bytes(), "metrics": rep["metrics"],
           "curve": cfg["curve"], "evals": cfg["evals"], "precision": cfg["precision"], "processes": cfg["processes"]}
    row.update(score(out, args))
    return row


def _kept_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """Trained rows of an earlier run in `path` with the same step settings as this run, not redone now."""
    if not path.is_file():
        return []
    redo = set(args.rows.split(","))
    rows = [r for r in json.loads(path.read_text())["rows"] if r["row"] in TRAIN and r["row"] not in redo]
    for r in rows:
        mine = {k: v for k, v in _step(r["row"], args).items() if k != "teacher"}
        theirs = {k: v for k, v in r["step"].items() if k != "teacher"}
        if mine != theirs:
            sys.exit(f"--keep-rows: row {r['row']} in {path} was trained with {theirs}, this run uses {mine}")
        if r["protocol"]["windows"] != args.windows:
            sys.exit(f"--keep-rows: row {r['row']} in {path} was scored on {r['protocol']['windows']} windows")
        if args.arc_questions and r.get("arc_easy", {}).get("questions") != args.arc_questions:
            sys.exit(f"--keep-rows: row {r['row']} in {path} has no ARC-Easy score on {args.arc_questions} questions")
    return rows


def _correction_step(args: argparse.Namespace) -> dict:
    """tc+kd's first part: the teacher fine-tuned (cross-entropy) for --correction-steps on the same data."""
    return {**_step("ce", args), "steps": args.correction_steps, "seed": 1}


def _step(kind: str, args: argparse.Namespace) -> dict:
    steps = args.steps
    if kind.startswith(CORRECTED) and not args.correction_extra:
        steps -= args.correction_steps  # the correction is taken from the budget
    elif kind == "ce-long":
        steps += args.correction_steps
    return {"pass": "distill", "steps": steps, "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "warmup_steps": args.warmup_steps, "eval_every": args.eval_every, "seed": 0, **TRAIN[kind],
            **({"mixed_precision": args.precision} if args.precision != "auto" else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="kd+ce,ce")
    ap.add_argument("--correction-steps", type=int, default=10,
                    help="tc+kd: steps of the budget spent fine-tuning the teacher (the rest distil the student)")
    ap.add_argument("--correction-extra", action="store_true",
                    help="corrected rows train the student for all --steps; the teacher's --correction-steps come on "
                         "top (Minitron's accounting: the correction prepares the teacher, its time still counts in "
                         "train_seconds); row ce-long gives plain fine-tuning those extra steps too")
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                    help="the distill pass's mixed_precision for every row (auto: bf16 where the CPU has it, so rows "
                         "from different machines may differ; each row records what it ran)")
    ap.add_argument("--arc-questions", type=int, default=0,
                    help="also score every model's ARC-Easy cloze accuracy on the first N test questions (0: no)")
    ap.add_argument("--pruned-dir", help="keep the pruned student here, or reuse it if it exists")
    ap.add_argument("--output", default=str(HERE / "results" / "distill_recovery.json"))
    ap.add_argument("--keep-rows", action="store_true", help="keep --output's trained rows made with the same settings")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # KIND STUDENT OUT
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args)))
        return

    import torch

    from compress.distill.precision import bf16_emulated

    if args.precision == "bf16" and bf16_emulated(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        sys.exit("--precision bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); it would be emulated, "
                 "about 20x slower than float32, and no row would fit its budget. Use --precision no (or auto).")

    from compress.artifact import package_versions, write_json_atomic
    from compress.recipe import Recipe
    from compress.runner import compress_model

    torch.set_num_threads(args.threads)
    doc: dict = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "versions": package_versions(),
                 "student": "reference model, prune_channels ratio 0.25 (activation importance, refit)",
                 "data": "wikitext2 validation split, packed 512-token sequences, last 8 held out", "rows": []}
    kept = _kept_rows(Path(args.output), args) if args.keep_rows else []
    old = json.loads(Path(args.output).read_text()) if args.keep_rows and Path(args.output).is_file() else {"rows": []}
    if old["rows"]:
        doc["commands"] = [*old.get("commands", [old["command"]]), doc["command"]]

    def save() -> None:
        rows = {r["row"]: r for r in doc["rows"]}
        if {"teacher", "pruned"} <= rows.keys():
            gap = rows["pruned"]["perplexity"] - rows["teacher"]["perplexity"]
            for r in doc["rows"]:
                if r["row"] in TRAIN and "perplexity" in r:
                    r["recovered_fraction"] = (rows["pruned"]["perplexity"] - r["perplexity"]) / gap
        write_json_atomic(Path(args.output), doc)

    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        student = Path(args.pruned_dir) if args.pruned_dir else Path(tmp) / "pruned"
        reused = student.joinpath("config.json").is_file()
        # with --keep-rows the teacher's score, and the pruned student's when it is reused, come from --output too
        earlier = {r["row"]: r for r in old["rows"]
                   if r["row"] in ("teacher", "pruned") and r["protocol"]["windows"] == args.windows
                   and (not args.arc_questions or r.get("arc_easy", {}).get("questions") == args.arc_questions)}
        doc["rows"].append(earlier.get("teacher") or {"row": "teacher", **score(None, args)})
        t0 = time.perf_counter()
        if not reused:
            compress_model(None, Recipe.single("prune_channels", ratio=0.25), student)
        doc["rows"].append(earlier["pruned"] if reused and "pruned" in earlier else
                           {"row": "pruned", "prune_seconds": round(time.perf_counter() - t0, 1),
                            **score(str(student), args)})
        doc["rows"].extend(kept)
        save()
        for kind in args.rows.split(","):
            p = subprocess.run([sys.executable, __file__, "--one", kind, str(student), str(Path(tmp) / kind.replace("+", "_")),
                                *sys.argv[1:]], capture_output=True, text=True)
            row = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                   {"row": kind, "error": f"exited {p.returncode}", "stderr_tail": p.stderr[-3000:]})
            doc["rows"].append(row)
            save()
        for r in doc["rows"]:
            print(f"{r['row']:8s} ppl {r.get('perplexity', float('nan')):8.3f}  "
                  f"recovered {r.get('recovered_fraction', float('nan')):6.3f}  "
                  f"train {r.get('train_seconds', 0):7.0f} s  {r.get('precision', ''):4s} "
                  + (f"arc {r['arc_easy']['accuracy']:.3f}  " if "arc_easy" in r else "") + r.get("error", ""),
                  flush=True)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
