"""`compress report`: several eval results files -> a Markdown table and a size/quality Pareto plot.

Each model is one row (and one point per task): its size on disk, bits per
parameter, and each task's metric with its 95 % interval. The plot puts size
(or bits per parameter) on x and the metric on y, one panel per task, labels
every point with its model's name next to it (no legend to hunt through), and
draws the Pareto front: the models no other model beats on both size and
quality.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from eval.results import MEANS, METRICS, PERPLEXITIES

X_AXES = {"size": ("bytes_on_disk", "size on disk (MB)", 1e-6),
          "bits": ("bits_per_parameter", "bits per parameter on disk", 1.0)}


def label_of(doc: dict[str, Any], path: str | Path) -> str:
    """A short name for a results file's model: its artifact directory or model name."""
    m = doc["model"]
    p = m.get("path")
    return Path(p).name if p else str(m.get("name") or Path(path).stem)


def markdown(docs: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per (label, results document), one column per task seen in any of them."""
    tasks = list(dict.fromkeys(t for _, d in docs for t in d["results"]))
    head = ["model", "size (MB)", "bits/param"] + [
        f"{t} {docs_metric(docs, t)} ({METRICS[docs_metric(docs, t)]} is better)" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, d in docs:
        m = d["model"]
        cells = [label, f"{m['bytes_on_disk'] / 1e6:.1f}", f"{m['bits_per_parameter']:.2f}"]
        for t in tasks:
            r = d["results"].get(t)
            if r is None:
                cells.append("")
                continue
            lo, hi = r.get("ci95") or (None, None)
            fmt = _fmt(r["metric"])
            cells.append(fmt(r["value"]) + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def docs_metric(docs: list[tuple[str, dict[str, Any]]], task: str) -> str:
    metrics = {d["results"][task]["metric"] for _, d in docs if task in d["results"]}
    if len(metrics) != 1:
        raise ValueError(f"task {task!r} has different metrics across the files: {sorted(metrics)}")
    return metrics.pop()


def _fmt(metric: str):
    if metric in MEANS:  # a cosine near 1: its change shows in the later decimals
        return lambda v: f"{v:.5f}"
    return (lambda v: f"{v:.3f}") if metric in PERPLEXITIES else (lambda v: f"{100 * v:.1f} %")


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both x (smaller) and y, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1] if lower_is_better else -points[i][1]))
    front, best = [], None
    for i in order:
        y = points[i][1]
        if best is None or (y < best if lower_is_better else y > best):
            front.append(i)
            best = y
    return front


def plot(docs: list[tuple[str, dict[str, Any]]], *, x: str = "size") -> bytes:
    """PNG bytes: one panel per task, metric against size (or bits per parameter), Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"x axis must be one of {', '.join(X_AXES)}, got {x!r}")
    key, xlabel, mult = X_AXES[x]
    tasks = list(dict.fromkeys(t for _, d in docs for t in d["results"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = docs_metric(docs, task)
        rows = [(lbl, d["model"][key] * mult, d["results"][task]) for lbl, d in docs if task in d["results"]]
        scale = 100.0 if metric == "accuracy" else 1.0
        pts = [(xv, r["value"] * scale) for _, xv, r in rows]
        for (lbl, xv, r), (_, yv) in zip(rows, pts, strict=True):
            lo, hi = r.get("ci95") or (r["value"], r["value"])
            ax.errorbar([xv], [yv], yerr=[[yv - lo * scale], [hi * scale - yv]], fmt="o", color="tab:blue",
                        ecolor="tab:gray", capsize=3)
            ax.annotate(lbl, (xv, yv), textcoords="offset points", xytext=(6, 5), fontsize=9)
        front = pareto_front(pts, METRICS[metric] == "lower")
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:orange",
                label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{task} {metric}" + (" (%)" if metric == "accuracy" else "") +
                      f" ({METRICS[metric]} is better)")
        ax.set_title(f"{task}: {metric} vs {xlabel.split(' (')[0]}")
        ax.legend(loc="best", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15, y=0.12)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
