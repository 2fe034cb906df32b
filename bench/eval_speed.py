"""Eval speed on the reference model; writes bench/results/eval_speed.json.

Two measurements, each against a baseline measured in the same run:

- wikitext2 under the DESIGN.md protocol (64 x 1024 tokens): the task's wall
  time against the bare forward passes it needs (the same windows through the
  same model, nothing else), as a ratio (issue target: <= 1.3);
- MMLU test, 0-shot letter scoring (14,042 questions unless --mmlu-limit):
  wall time (issue target: <= 10 minutes) and questions per second, with
  the model in --mmlu-dtype (float32 as the reference protocol, or bfloat16),
  and the tokens the forwards processed, against the machine's measured
  matmul peak in that dtype (a lower bound on the time any implementation
  needs).

    .venv/bin/python bench/eval_speed.py [--threads 2] [--mmlu-limit N] [--windows 64] [--mmlu-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--skip-wikitext2", action="store_true")
    ap.add_argument("--mmlu-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args()

    import torch

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from eval.backends import TorchBackend

    torch.set_num_threads(args.threads)
    lm = load_model(None)
    backend = TorchBackend(lm.model, lm.tokenizer)
    out: dict = {"threads": args.threads, "model": lm.source, "versions": package_versions()}
    if Path(args.output).is_file():  # keep the other measurement of an earlier run with --skip-*
        old = json.loads(Path(args.output).read_text())
        out.update({k: old[k] for k in ("wikitext2", "mmlu") if k in old})
    if not args.skip_wikitext2:
        wikitext2(lm, backend, args, out)
        write_json_atomic(Path(args.output), out)
    if not args.skip_mmlu:
        mmlu(lm, args, out)
        write_json_atomic(Path(args.output), out)


def matmul_peak(dtype, n: int = 2048) -> float:
    """Measured GFLOP/s of one large square matmul in `dtype` (the threads set by the caller)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 2 * n**3 * 5 / (time.perf_counter() - t) / 1e9


def wikitext2(lm, backend, args, out: dict) -> None:
    import torch

    from compress.runner import run_tasks

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
                        "target_ratio": 1.3, "command": " ".join(["python", *sys.argv])}
    print(f"wikitext2: task {task_s:.1f} s, bare forwards {bare_s:.1f} s, ratio {task_s / bare_s:.3f}", flush=True)


def mmlu(lm, args, out: dict) -> None:
    import torch

    from compress.runner import run_tasks
    from eval.backends import TorchBackend

    dtype = getattr(torch, args.mmlu_dtype)
    backend = TorchBackend(lm.model.to(dtype), lm.tokenizer)
    seen = [0]  # tokens through the model: count them by wrapping its forward
    fwd = lm.model.forward

    def counting(*a, input_ids=None, **kw):
        seen[0] += input_ids.numel()
        return fwd(*a, input_ids=input_ids, **kw)

    lm.model.forward = counting
    t = time.perf_counter()
    m = run_tasks(backend, ["mmlu"], options={"scoring": "letter", "shots": 0, "limit": args.mmlu_limit})["mmlu"]
    secs = time.perf_counter() - t
    lm.model.forward = fwd
    # matmul FLOPs per token: 2 x the decoder's Linear weights (the lm_head runs on the last position only)
    per_token = 2 * sum(p.numel() for n, p in lm.model.named_parameters() if ".layers." in n and p.dim() == 2)
    peak = matmul_peak(dtype)
    floor = seen[0] * per_token / (peak * 1e9)
    out["mmlu"] = {"dtype": args.mmlu_dtype, "questions": m["questions"], "accuracy": m["accuracy"],
                   "accuracy_macro": m["accuracy_macro"], "seconds": round(secs, 1),
                   "questions_per_second": round(m["questions"] / secs, 2), "tokens_forwarded": seen[0],
                   "tokens_per_second": round(seen[0] / secs), "matmul_peak_gflops": round(peak, 1),
                   "seconds_at_matmul_peak": round(floor, 1), "target_seconds_full_test": 600,
                   "limit_per_subject": args.mmlu_limit, "command": " ".join(["python", *sys.argv])}
    print(f"mmlu ({args.mmlu_dtype}): {m['questions']} questions in {secs:.0f} s ({m['questions'] / secs:.1f}/s, "
          f"{seen[0] / secs:.0f} tokens/s), accuracy {100 * m['accuracy']:.2f} %; the decoder's matmuls alone "
          f"need {floor:.0f} s at this machine's {peak:.0f} GFLOP/s peak", flush=True)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
