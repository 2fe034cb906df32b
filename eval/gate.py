"""`compress gate`: does a candidate's eval result regress against a baseline's?

For every task of the baseline, the candidate must have the same task, scored
under the same protocol on the same items (anything else is an error, never a
silent comparison). Each task is then compared item by item:

- perplexity: relative rise, paired bootstrap over windows (`eval.stats`);
- accuracy: drop in points, exact McNemar test on the questions they disagree on;
- embedding cosine (an encoder without a head): absolute drop of the mean
  cosine to the float reference, paired bootstrap over windows.

A task fails when its change is worse than the threshold *and* the change is
statistically significant at `significance` (one-sided p-value below it), so a
gate can be strict about real regressions without failing on noise; with
significance 1 every change beyond the threshold fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from compress.checks import finite_number
from eval.results import MEANS, METRICS, PERPLEXITIES, inconsistent, nonfinite
from eval.stats import PairedResult, mcnemar, paired_mean_drop, paired_perplexity


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    max_ppl_rise: float = 0.05  # relative perplexity rise allowed (0.05 = +5 %)
    max_acc_drop: float = 1.0  # accuracy drop allowed, in points
    max_cos_drop: float = 0.01  # mean embedding cosine drop allowed, absolute (0.01 = from 1.00 to 0.99)
    significance: float = 0.05  # a change fails only if its one-sided p-value is below this

    def __post_init__(self) -> None:
        for name in ("max_ppl_rise", "max_acc_drop", "max_cos_drop", "significance"):
            finite_number(getattr(self, name), name)  # a NaN threshold would compare False and pass everything
        if self.max_ppl_rise < 0 or self.max_acc_drop < 0 or self.max_cos_drop < 0:
            raise ValueError("max_ppl_rise, max_acc_drop and max_cos_drop must be >= 0")
        if not 0 < self.significance <= 1:
            raise ValueError(f"significance must be in (0, 1], got {self.significance}")

    def threshold(self, metric: str) -> float:
        """The change a task of `metric` may show before it can fail."""
        if metric in PERPLEXITIES:
            return self.max_ppl_rise
        return self.max_cos_drop if metric in MEANS else self.max_acc_drop


@dataclass
class Row:
    task: str
    metric: str
    baseline: float
    candidate: float
    paired: PairedResult
    threshold: float
    failed: bool
    note: str


@dataclass
class GateReport:
    rows: list[Row] = field(default_factory=list)
    cfg: GateConfig = field(default_factory=GateConfig)
    # sha256 of the scored artifacts' weights (None where a results file does not record one)
    candidate_sha256: str | None = None
    baseline_sha256: str | None = None

    @property
    def same_artifact(self) -> bool | None:
        """Whether both results score byte-identical weights (None when unknown)."""
        if not (self.candidate_sha256 and self.baseline_sha256):
            return None
        return self.candidate_sha256 == self.baseline_sha256

    @property
    def passed(self) -> bool:
        return not any(r.failed for r in self.rows)


def compare(candidate: dict[str, Any], baseline: dict[str, Any], cfg: GateConfig = GateConfig()) -> GateReport:
    """Compare two results documents (`eval.results.load`); mismatches are ValueErrors.

    A baseline holding a NaN or infinite number is bad input (ValueError); a
    candidate holding one, or a headline value its own items cannot have
    produced, fails its task: such a result never passes.
    """
    report = GateReport(cfg=cfg, candidate_sha256=(candidate.get("model") or {}).get("sha256"),
                        baseline_sha256=(baseline.get("model") or {}).get("sha256"))
    cres, bres = candidate["results"], baseline["results"]
    missing = [t for t in bres if t not in cres]
    if missing:
        raise ValueError(f"the candidate has no result for task(s) {', '.join(missing)} of the baseline")
    for task, b in bres.items():
        bad = nonfinite(b) or inconsistent(b)
        if bad:
            raise ValueError(f"{task}: the baseline is unusable: {bad}")
    for task, b in bres.items():
        c = cres[task]
        if c["metric"] != b["metric"]:
            raise ValueError(f"{task}: metric {c['metric']!r} in the candidate, {b['metric']!r} in the baseline")
        # files written before protocols recorded the dtype were all float32
        pc, pb = {"dtype": "float32", **c["protocol"]}, {"dtype": "float32", **b["protocol"]}
        if pc != pb:
            diff = sorted(k for k in pc.keys() | pb.keys() if pc.get(k) != pb.get(k))
            raise ValueError(f"{task}: candidate and baseline were scored under different protocols "
                             f"(differ in {', '.join(diff)}: candidate "
                             f"{ {k: pc.get(k) for k in diff} }, baseline { {k: pb.get(k) for k in diff} }); "
                             "re-run both with the same options")
        ids_c, ids_b = [it["id"] for it in c["items"]], [it["id"] for it in b["items"]]
        if ids_c != ids_b:
            only = sorted(set(ids_c) ^ set(ids_b))[:5]
            raise ValueError(f"{task}: the candidate and baseline scored different items "
                             f"({len(ids_c)} vs {len(ids_b)}; e.g. {only or 'same ids, other order'})")
        bad = nonfinite(c)
        bad = f"non-finite number in the candidate ({bad})" if bad else inconsistent(c)
        report.rows.append(_broken(task, c, b, cfg, bad) if bad else _compare_task(task, c, b, cfg))
    return report


def _broken(task: str, c: dict[str, Any], b: dict[str, Any], cfg: GateConfig, why: str) -> Row:
    """A failing row for a candidate result that cannot be trusted."""
    threshold = cfg.threshold(b["metric"])
    paired = PairedResult(float("nan"), (float("nan"), float("nan")), 0.0, "none: the candidate's result is broken")
    return Row(task, b["metric"], float(b["value"]), float(c["value"]), paired, threshold, True, why)


def _compare_task(task: str, c: dict[str, Any], b: dict[str, Any], cfg: GateConfig) -> Row:
    metric = b["metric"]
    if metric in PERPLEXITIES:
        tok_c = np.array([it["tokens"] for it in c["items"]])
        tok_b = np.array([it["tokens"] for it in b["items"]])
        if not np.array_equal(tok_c, tok_b):
            raise ValueError(f"{task}: per-window token counts differ between candidate and baseline")
        paired = paired_perplexity(np.array([it["nll"] for it in c["items"]]),
                                   np.array([it["nll"] for it in b["items"]]), tok_b)
    elif metric in MEANS:
        key = MEANS[metric]
        paired = paired_mean_drop(np.array([it[key] for it in c["items"]]), np.array([it[key] for it in b["items"]]))
    else:
        paired = mcnemar(np.array([bool(it["correct"]) for it in c["items"]]),
                         np.array([bool(it["correct"]) for it in b["items"]]))
    threshold = cfg.threshold(metric)
    beyond = paired.change > threshold
    significant = paired.p_value < cfg.significance
    failed = beyond and significant
    if failed:
        note = "regression beyond the threshold, significant"
    elif beyond:
        note = f"beyond the threshold but not significant (p = {paired.p_value:.3g})"
    else:
        note = "within the threshold"
    return Row(task, metric, float(b["value"]), float(c["value"]), paired, threshold, failed, note)


def _fmt_change(row: Row) -> str:
    if not np.isfinite(row.paired.change):
        return "n/a"
    if row.metric in PERPLEXITIES:
        lo, hi = row.paired.ci95
        return f"{100 * row.paired.change:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    lo, hi = row.paired.ci95
    if row.metric in MEANS:
        return f"{-row.paired.change:+.5f} [{-hi:+.5f}, {-lo:+.5f}]"
    return f"{-row.paired.change:+.2f} pt [{-hi:+.2f}, {-lo:+.2f}]"


def _fmt_threshold(row: Row) -> str:
    if row.metric in PERPLEXITIES:
        return f"rise <= {100 * row.threshold:g} %"
    return f"drop <= {row.threshold:g}" + ("" if row.metric in MEANS else " pt")


def _fmt_value(metric: str, v: float) -> str:
    """A headline value: a cosine near 1 needs more digits than a perplexity to show its change."""
    return f"{v:.5f}" if metric in MEANS else f"{v:.4g}"


def markdown(report: GateReport, candidate: str = "candidate", baseline: str = "baseline") -> str:
    """The verdict as a Markdown table (what the CLI prints and writes to the CI step summary)."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"### compress gate: {verdict}", "",
             f"candidate `{candidate}` against baseline `{baseline}` "
             f"(a task fails when worse than its threshold with one-sided p < {report.cfg.significance:g})", "",
             "| task | metric | baseline | candidate | change [95 % CI] | p | threshold | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        better = METRICS[r.metric]
        lines.append(f"| {r.task} | {r.metric} ({better} is better) | {_fmt_value(r.metric, r.baseline)} | "
                     f"{_fmt_value(r.metric, r.candidate)} | "
                     f"{_fmt_change(r)} | {r.paired.p_value:.3g} | {_fmt_threshold(r)} | "
                     f"{'**FAIL**' if r.failed else 'pass'}: {r.note} |")
    lines += ["", "Tests: " + "; ".join(f"{r.task}: {r.paired.test}" for r in report.rows)]
    if report.same_artifact is not None:
        c, b = report.candidate_sha256[:12], report.baseline_sha256[:12]  # type: ignore[index]
        lines += ["", f"Artifacts: the same weights (sha256 {c}...)" if report.same_artifact else
                  f"Artifacts: different weights (sha256 {c}... vs {b}...): the code, the recipe or the "
                  "build's arithmetic changed"]
    return "\n".join(lines) + "\n"


def junit_xml(report: GateReport) -> str:
    """JUnit XML: one test case per task, a <failure> for each failed one."""
    cases = []
    for r in report.rows:
        body = ""
        if r.failed:
            msg = f"{r.task} {r.metric}: {_fmt_change(r)}, p = {r.paired.p_value:.3g}, {_fmt_threshold(r)}"
            body = f"<failure message={quoteattr(msg)}>{escape(r.note)}</failure>"
        cases.append(f'  <testcase classname="compress.gate" name={quoteattr(r.task)}>{body}</testcase>')
    fails = sum(r.failed for r in report.rows)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n'
            f'<testsuite name="compress gate" tests="{len(report.rows)}" failures="{fails}">\n'
            + "\n".join(cases) + "\n</testsuite>\n")


def write_step_summary(text: str) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when set (GitHub Actions); return whether it was written."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    with open(Path(path), "a", encoding="utf-8") as f:
        f.write(text)
    return True
