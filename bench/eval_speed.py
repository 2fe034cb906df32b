"""Eval speed on the reference model; writes bench/results/eval_speed.json.

Two measurements, each against a baseline measured in the same run:

- wikitext2 under the DESIGN.md protocol (64 x 1024 tokens): the task's wall
  time against the bare forward passes it needs (the same windows through the
  same model, nothing else), as a ratio (issue target: <= 1.3);
- MMLU test, 0-shot letter scoring (14,042 questions unless --mmlu-limit):
  wall time (issue target: <= 10 minutes) and questions per second.

    .venv/bin/python bench/eval_speed.py [--threads 2] [--mmlu-limit N] [--windows 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--mmlu-limit", type=int, default=None, help="first N questions per subject (default: all)")
    ap.add_argument("--skip-mmlu", action="store_true")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args()

    import torch

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from compress.runner import run_tasks
    from eval.backends import TorchBackend

    torch.set_num_threads(args.threads)
    lm = load_model(None)
    backend = TorchBackend(lm.model, lm.tokenizer)
    out: dict = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
                 "model": lm.source, "versions": package_versions()}

    # wikitext2: the task, then the bare forwards of the same windows (after one warm-up forward)
    with torch.inference_mode():
        lm.model(input_ids=torch.zeros(1, 1024, dtype=torch.long), use_cache=False)
    t = time.perf_counter()
    r = run_tasks(backend, ["wikitext2"], options={"windows": args.windows})["wikitext2"]
    task_s = time.perf_counter() - t
    ids = torch.tensor(backend.encode((ROOT / "compress" / "data" / "wikitext-2-raw" / "wiki.test.raw")
                                      .read_text(encoding="utf-8")))
    windows = ids[: r["windows"] * 1024].view(r["windows"], 1024)
    t = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            lm.model(input_ids=w[None], use_cache=False)
    bare_s = time.perf_counter() - t
    out["wikitext2"] = {"perplexity": r["perplexity"], "windows": r["windows"], "task_seconds": round(task_s, 2),
                        "bare_forward_seconds": round(bare_s, 2), "ratio": round(task_s / bare_s, 3),
                        "target_ratio": 1.3}
    print(f"wikitext2: task {task_s:.1f} s, bare forwards {bare_s:.1f} s, ratio {task_s / bare_s:.3f}", flush=True)
    write_json_atomic(Path(args.output), out)

    if not args.skip_mmlu:
        t = time.perf_counter()
        opts = {"scoring": "letter", "shots": 0, "limit": args.mmlu_limit}
        m = run_tasks(backend, ["mmlu"], options=opts)["mmlu"]
        secs = time.perf_counter() - t
        out["mmlu"] = {"questions": m["questions"], "accuracy": m["accuracy"], "accuracy_macro": m["accuracy_macro"],
                       "seconds": round(secs, 1), "questions_per_second": round(m["questions"] / secs, 2),
                       "target_seconds_full_test": 600, "limit_per_subject": args.mmlu_limit}
        print(f"mmlu: {m['questions']} questions in {secs:.0f} s ({m['questions'] / secs:.1f}/s), "
              f"accuracy {100 * m['accuracy']:.2f} %", flush=True)
        write_json_atomic(Path(args.output), out)


if __name__ == "__main__":
    main()
