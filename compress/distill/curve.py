"""The training curve of a distill step, as JSON and as a PNG plot beside the saved student."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from compress.artifact import write_bytes_atomic, write_text_atomic


def plot_curve(curve: list[dict[str, Any]], evals: list[dict[str, Any]]) -> bytes:
    """PNG bytes: the loss (and each weighted term) per step, and the held-out perplexity at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.8, 4.8))
    steps = [r["step"] for r in curve]
    ax.plot(steps, [r["loss"] for r in curve], label="total", color="black")
    for term in ("kd", "ce", "hidden", "attention"):
        if curve and term in curve[0]:
            ax.plot(steps, [r[term] for r in curve], label=term, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    ev = [e for e in evals if "perplexity" in e]
    bx.plot([e["step"] for e in ev], [e["perplexity"] for e in ev], "o-", color="tab:orange")
    bx.set_xlabel("step")
    bx.set_ylabel("perplexity (lower is better)")
    bx.set_title("held-out perplexity")
    bx.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_curve(report: dict[str, Any], out: str | Path) -> list[Path]:
    """Write distill_curve.json and distill_curve.png into `out` from a distill PassReport dict."""
    out = Path(out)
    curve, evals = report["config"]["curve"], report["config"]["evals"]
    js, png = out / "distill_curve.json", out / "distill_curve.png"
    write_text_atomic(js, json.dumps({"curve": curve, "evals": evals, "metrics": report["metrics"]}, indent=1) + "\n")
    write_bytes_atomic(png, plot_curve(curve, evals))
    return [js, png]
