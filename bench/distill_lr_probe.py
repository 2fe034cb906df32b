"""How fast the distillation losses move a student at a few learning rates; writes bench/results/distill_lr_probe.json.

A diagnostic for issue 7, not the benchmark (that is bench/distill_recovery.py):
each spec LR:KD_WEIGHT:CE_WEIGHT trains a fresh copy of --student for --steps
optimizer steps (4 x 512 tokens of the WikiText-2 validation split, warm-up 1,
float32) against --teacher, and records the per-step losses and the held-out
perplexity and KL to the teacher every --eval-every steps.

    .venv/bin/python bench/distill_lr_probe.py --student S --teacher T 1e-4:1:0 3e-4:1:0 3e-4:0:1

Session 16 used the tcp+kd+ce row's corrected teacher (4 cross-entropy steps)
and its pruned copy from the run in bench/results/distill_probe_order.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="LR:KD_WEIGHT:CE_WEIGHT")
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(HERE / "results" / "distill_lr_probe.json"))
    args = ap.parse_args()

    import torch

    from compress.artifact import package_versions, write_json_atomic
    from compress.distill.kd import DistillConfig
    from compress.distill.train import train
    from compress.models import load_model

    torch.set_num_threads(args.threads)
    doc = {"command": " ".join(["python", *sys.argv]), "versions": package_versions(), "rows": []}
    teacher = load_model(args.teacher).model  # never trained: one copy serves every spec
    for spec in args.specs:
        lr, kd, ce = (float(x) for x in spec.split(":"))
        student = load_model(args.student)
        cfg = DistillConfig(teacher=args.teacher, steps=args.steps, batch_size=4, micro_batch_size=2, seq_len=512,
                            lr=lr, warmup_steps=1, eval_every=args.eval_every, mixed_precision="no", kd_weight=kd,
                            ce_weight=ce)
        t0 = time.perf_counter()
        rec = train(student.model, teacher, student.tokenizer, cfg)["record"]
        row = {"lr": lr, "kd_weight": kd, "ce_weight": ce, "seconds": round(time.perf_counter() - t0, 1),
               "curve": [{k: c[k] for k in ("step", "loss", "kd", "ce") if k in c} for c in rec["curve"]],
               "evals": rec["evals"]}
        doc["rows"].append(row)
        write_json_atomic(Path(args.output), doc)
        print(spec, " ".join(f"step {e['step']}: ppl {e['perplexity']:.2f} kl {e.get('kl_to_teacher', 0):.3f}"
                             for e in row["evals"]), flush=True)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
