"""Peak RSS of scale tuning on the reference model, whole-window loss (loss_chunk 0: the model's full logits, no
checkpointing) beside the streamed loss (blocks checkpointed, logits in chunks of positions), each run in its own
process: RTN W4 g128 then `scale_tune` for --steps steps, the same calibration windows.

    .venv/bin/python bench/scale_tune_memory.py [--steps 4] [--chunks 0 128] [--note TEXT]

RTN rather than the default AWQ+GPTQ start: what tuning holds (the packed model, its float reference, the
activations) does not depend on how the codes were found, and RTN takes seconds instead of nine minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runs import RESULTS, ROOT  # bench/runs.py (this script's directory is on sys.path)


def one(steps: int, chunk: int) -> dict:
    """In this process: quantize and tune through the runner; peak RSS of the process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from compress.recipe import Recipe
    from compress.runner import compress_model

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        s = compress_model(None, Recipe.from_steps([{"pass": "rtn", "bits": 4, "group_size": 128},
                                                    {"pass": "scale_tune", "steps": steps, "loss_chunk": chunk}]),
                           Path(d) / "a")
    rep = s["reports"][-1]
    return {"loss_chunk": chunk, "steps": steps, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            * 1024, "scale_tune_seconds": round(rep["seconds"], 1), "wall_seconds": round(time.perf_counter() - t0, 1),
            **rep["metrics"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 128])
    ap.add_argument("--output", default=str(RESULTS / "scale_tune_memory.json"))
    ap.add_argument("--note", default="")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one chunk setting, print JSON
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.steps, args.one)))
        return
    rows = []
    for chunk in args.chunks:
        p = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--one", str(chunk)],
                           check=True, capture_output=True, text=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    sys.path.insert(0, str(ROOT))
    from compress.artifact import package_versions, write_json_atomic

    write_json_atomic(Path(args.output), {
        "command": " ".join(["python", *sys.argv]), "recipe": "rtn W4 g128 sym, then scale_tune (batch 4 windows, "
        "128 x 512 calibration windows, 16 held out)", "machine_note": args.note, "versions": package_versions(),
        "results": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
