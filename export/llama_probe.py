"""Run a GGUF file in llama.cpp in a child process: how `compress export --format gguf` checks its file.

llama.cpp runs native code in our process when imported directly; a file it
cannot handle can crash it (a segfault), which would take the whole command
down with no message. The check therefore runs here, in a subprocess:

    python -m export.llama_probe REQUEST.json RESULT.npz

REQUEST holds {"path", "threads", "items": [{"text", "ids"}]}; RESULT gets,
for item i, `tokens_i` (llama.cpp's tokenization of the text) and `logits_i`
(its logits at every position of `ids`, from an empty cache).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def probe(path: Path, items: list[tuple[str, list[int]]], *, threads: int | None = None,
          timeout: float = 600.0) -> list[tuple[list[int], np.ndarray]]:
    """llama.cpp's (tokenization of text, logits of ids) for each (text, ids), computed in a child process; a
    crash or failure there is a ValueError naming it."""
    with tempfile.TemporaryDirectory(prefix="compress-llama-probe-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.npz"
        req.write_text(json.dumps({"path": str(path), "threads": threads,
                                   "items": [{"text": t, "ids": list(map(int, i))} for t, i in items]}))
        try:
            p = subprocess.run([sys.executable, "-m", "export.llama_probe", str(req), str(res)],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ValueError(f"llama.cpp did not finish running {path} within {timeout:.0f} s") from None
        if p.returncode < 0:
            try:
                name = signal.Signals(-p.returncode).name
            except ValueError:
                name = f"signal {-p.returncode}"
            raise ValueError(f"llama.cpp crashed ({name}) loading or running {path}: the file is not usable in "
                             f"this llama.cpp build{_tail(p.stderr)}")
        if p.returncode != 0:
            raise ValueError(f"llama.cpp could not run {path} (exit {p.returncode}){_tail(p.stderr)}")
        with np.load(res) as z:
            return [(z[f"tokens_{i}"].tolist(), z[f"logits_{i}"]) for i in range(len(items))]


def _tail(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return (": " + " | ".join(lines[-3:])) if lines else ""


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m export.llama_probe REQUEST.json RESULT.npz", file=sys.stderr)
        return 2
    from eval.llamacpp_backend import LlamaCppBackend

    req = json.loads(Path(argv[0]).read_text())
    longest = max((len(it["ids"]) for it in req["items"]), default=1)
    backend = LlamaCppBackend(req["path"], threads=req["threads"], n_ctx=max(256, longest))
    out: dict[str, np.ndarray] = {}
    try:
        for i, it in enumerate(req["items"]):
            out[f"tokens_{i}"] = np.asarray(backend.encode(it["text"]), dtype=np.int64)
            out[f"logits_{i}"] = backend.logits(it["ids"])
    finally:
        backend.close()
    tmp = Path(argv[1]).with_suffix(".partial.npz")
    np.savez(tmp, **out)
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
