"""The eval results file: one versioned JSON document per evaluated model.

    {"schema": "compress.eval/1", "created": ..., "model": {identity},
     "results": {task: {"metric", "value", "ci95", "protocol", "items": [...], ...}},
     "versions": {...}}

`model` says what was scored: path, sha256 and bytes of its weight files,
parameter count and bits per parameter on disk, and for a compress artifact
its recipe and the bits per quantized weight. Every task result carries its
metric ("perplexity", lower is better; "accuracy", higher is better), the 95 %
interval, the protocol it was measured under, and per-item records (per-window
NLL, per-question choice and correctness) so that two files can be compared
item by item (`eval.gate`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from compress import artifact

SCHEMA = "compress.eval/1"
METRICS = {"perplexity": "lower", "accuracy": "higher"}  # which direction is better


def parameter_count(model) -> int:
    """Logical parameters: a quantized Linear counts its out x in weights (not its packed words), and
    tied weights count once."""
    from compress.quantize.qlinear import QuantLinear
    from compress.quantize.w8a8linear import W8A8Linear

    n = sum(p.numel() for p in model.parameters())  # parameters() lists a tied tensor once
    return n + sum(m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, QuantLinear | W8A8Linear))


def model_identity(lm) -> dict[str, Any]:
    """What was evaluated: a `LoadedModel`'s files, hash, size and (for an artifact) its compression."""
    files = [Path(f) for f in lm.source_files]
    n_params = parameter_count(lm.model)
    size = sum(f.stat().st_size for f in files)
    if lm.provenance:  # an artifact: its own files, not the model it came from
        sha = artifact.sha256_files(files)
    else:
        sha = lm.source_sha256()
    ident: dict[str, Any] = {
        "name": lm.source,
        "path": (str(files[0]) if files[0].suffix == ".gguf" else str(files[0].parent)) if files else None,
        "files": [f.name for f in files],
        "sha256": sha,
        "bytes_on_disk": size,
        "parameters": n_params,
        "bits_per_parameter": 8 * size / max(n_params, 1),
    }
    if lm.provenance:
        prov = lm.provenance
        bpw = [r["metrics"]["bits_per_weight"] for r in prov.get("reports", [])
               if "bits_per_weight" in r.get("metrics", {})]
        ident["artifact"] = {"source": prov["source"], "recipe": prov.get("recipe"),
                             "bits_per_quantized_weight": bpw[-1] if bpw else None}
    return ident


def document(model: dict[str, Any], results: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model, "results": results, "versions": versions}


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a results file; a file that is not one is a ValueError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"results file not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{p}: not a compress eval results file (schema {got!r}, expected {SCHEMA!r}); "
                         "write one with `compress eval ... --output FILE`")
    results = doc.get("results")
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{p}: no task results")
    for task, r in results.items():
        missing = [k for k in ("metric", "value", "protocol", "items") if k not in r]
        if missing:
            raise ValueError(f"{p}: task {task!r} lacks {', '.join(missing)}")
        if r["metric"] not in METRICS:
            raise ValueError(f"{p}: task {task!r} has unknown metric {r['metric']!r} "
                             f"(known: {', '.join(METRICS)})")
    return doc
