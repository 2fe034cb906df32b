"""What the artifact benches (tf5_rows, embeddings, rotate) share: their common options, a work directory
whose artifacts and scores a rerun reuses, the CLI, and a cached WikiText-2 score under DESIGN.md's protocol."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
_KEEP: list[tempfile.TemporaryDirectory] = []  # temporary work directories, removed at exit


def parser(doc: str, output: str) -> argparse.ArgumentParser:
    """--threads, --windows, --work, --output (default bench/results/OUTPUT) and --note."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--work", help="keep artifacts here (default: a temporary directory)")
    ap.add_argument("--output", default=str(RESULTS / output))
    ap.add_argument("--note", default="", help="what else ran on the machine")
    return ap


def work_dir(args: argparse.Namespace, prefix: str) -> Path:
    """--work, made if missing, or a temporary directory that lives until the process exits."""
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        return work
    _KEEP.append(tempfile.TemporaryDirectory(prefix=prefix))
    return Path(_KEEP[-1].name)


def compress_cli() -> list[str]:
    return [str(Path(sys.executable).parent / "compress")]


def wikitext2(model: Path | None, scored: Path, args: argparse.Namespace, backend: str | None = None) -> dict:
    """The wikitext2 result of `model` (None: the reference model), scored into `scored` unless it is there."""
    if not scored.exists():
        subprocess.run([*compress_cli(), "eval", *([str(model)] if model else []),
                        *(["--backend", backend] if backend else []), "--threads", str(args.threads),
                        "--windows", str(args.windows), "--output", str(scored)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(scored.read_text())["results"]["wikitext2"]


def protocol(windows: int) -> dict:
    return {"task": "wikitext2", "windows": windows, "seq_len": 1024, "prepend_bos": False}
