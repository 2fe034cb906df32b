"""The eval results file: one versioned JSON document per evaluated model.

    {"schema": "compress.eval/1", "created": ..., "model": {identity},
     "results": {task: {"metric", "value", "ci95", "protocol", "items": [...], ...}},
     "versions": {...}}

`model` says what was scored: path, sha256 and bytes of its weight files,
parameter count and bits per parameter on disk, and for a compress artifact
its recipe and the bits per quantized weight. Every task result carries its
metric ("perplexity" and "pseudo_perplexity", lower is better; "accuracy" and
"embedding_cosine", higher is better), the 95 % interval, the protocol it was
measured under, and per-item records (per-window NLL or embedding cosine,
per-question choice and correctness) so that two files can be compared item by
item (`eval.gate`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from compress import artifact
from compress.checks import nonfinite_in

SCHEMA = "compress.eval/1"
METRICS = {"perplexity": "lower", "pseudo_perplexity": "lower", "accuracy": "higher",
           "embedding_cosine": "higher"}  # which way is better
PERPLEXITIES = ("perplexity", "pseudo_perplexity")  # per-window NLL records: compared the same way
MEANS = {"embedding_cosine": "cosine"}  # metric -> the per-window field whose mean is the task's value


def parameter_count(model) -> int:
    """Logical parameters: a quantized Linear counts its out x in weights (not its packed words), and
    tied weights count once."""
    from compress.quantize.packed import PackedLinear

    n = sum(p.numel() for p in model.parameters())  # parameters() lists a tied tensor once
    return n + sum(m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, PackedLinear) and m.storage_bits())  # (a tied head: the embedding's weights)


def model_identity(lm) -> dict[str, Any]:
    """What was evaluated: a `LoadedModel`'s files, hash, size and (for an artifact) its compression."""
    files = [Path(f) for f in lm.source_files]
    n_params = parameter_count(lm.model)
    size = sum(f.stat().st_size for f in files)
    sha = weights_sha256(lm)
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


def weights_sha256(lm) -> str:
    """sha256 of the weights a `LoadedModel` runs: an artifact's own files, not those of the model it came from
    (which `source_sha256` names)."""
    return artifact.sha256_files([Path(f) for f in lm.source_files]) if lm.provenance else lm.source_sha256()


def document(model: dict[str, Any], results: dict[str, Any], versions: dict[str, str]) -> dict[str, Any]:
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model, "results": results, "versions": versions}


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a results file; a file that is not one is a ValueError naming what is wrong.

    Non-finite numbers (JSON's non-standard NaN / Infinity) are read, not
    refused here: `nonfinite` finds them, and the gate fails a candidate that
    has any (a baseline with them is bad input).
    """
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
        _check_task(p, task, r)
    return doc


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_task(p: Path, task: str, r: Any) -> None:
    """The fields the gate and report rely on are there and of the right kind (values may be non-finite)."""
    if not isinstance(r, dict):
        raise ValueError(f"{p}: task {task!r} is not an object")
    missing = [k for k in ("metric", "value", "protocol", "items") if k not in r]
    if missing:
        raise ValueError(f"{p}: task {task!r} lacks {', '.join(missing)}")
    if r["metric"] not in METRICS:
        raise ValueError(f"{p}: task {task!r} has unknown metric {r['metric']!r} (known: {', '.join(METRICS)})")
    if not _number(r["value"]):
        raise ValueError(f"{p}: task {task!r}: value {r['value']!r} is not a number")
    if not isinstance(r["protocol"], dict):
        raise ValueError(f"{p}: task {task!r}: protocol is not an object")
    items = r["items"]
    if not isinstance(items, list) or not items:
        raise ValueError(f"{p}: task {task!r} has no per-item records (items)")
    ids = set()
    for i, it in enumerate(items):
        where = f"{p}: task {task!r} item {i}"
        if not isinstance(it, dict) or "id" not in it:
            raise ValueError(f"{where}: not an object with an 'id'")
        if it["id"] in ids:
            raise ValueError(f"{where}: duplicate id {it['id']!r}")
        ids.add(it["id"])
        if r["metric"] in PERPLEXITIES:
            if not _number(it.get("nll")):
                raise ValueError(f"{where} ({it['id']}): nll {it.get('nll')!r} is not a number")
            tokens = it.get("tokens")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                raise ValueError(f"{where} ({it['id']}): tokens {tokens!r} is not a positive integer")
        elif r["metric"] in MEANS:
            key = MEANS[r["metric"]]
            if not _number(it.get(key)):
                raise ValueError(f"{where} ({it['id']}): {key} {it.get(key)!r} is not a number")
        elif not isinstance(it.get("correct"), bool):
            raise ValueError(f"{where} ({it['id']}): correct {it.get('correct')!r} is not true or false")


def nonfinite(result: dict[str, Any]) -> str | None:
    """Where one task's result holds a NaN or infinite number ('value', 'item window 3: nll'), else None."""
    for i, it in enumerate(result.get("items") or []):
        found = nonfinite_in(it)
        if found:
            return f"item {it.get('id', i) if isinstance(it, dict) else i}: {found}"
    return nonfinite_in({k: v for k, v in result.items() if k != "items"})


def inconsistent(result: dict[str, Any]) -> str | None:
    """Why a task's headline value disagrees with its own items (None when it agrees): a value that the
    per-item records cannot have produced is not trusted."""
    items = result["items"]
    if result["metric"] in PERPLEXITIES:
        tokens = sum(it["tokens"] for it in items)
        expect = math.exp(min(sum(it["nll"] for it in items) / tokens, 700.0))
    elif result["metric"] in MEANS:
        expect = sum(it[MEANS[result["metric"]]] for it in items) / len(items)
    else:
        expect = sum(it["correct"] for it in items) / len(items)
    value = result["value"]
    if not math.isclose(value, expect, rel_tol=1e-6, abs_tol=1e-9):
        return f"value {value:.6g} does not match its {len(items)} items ({expect:.6g})"
    return None
