"""`compress gate`: fail CI when a candidate's eval results regress against a baseline's."""

from __future__ import annotations

import sys

import click

from compress.cli._common import FINITE


def _percent(value: str) -> float:
    """'5%' or '5' -> 0.05."""
    v = value.strip().removesuffix("%")
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"--max-ppl-rise: expected a percentage like 5% or 2.5, got {value!r}") from None
    return x / 100


@click.command("gate")
@click.argument("candidate", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(), help="Results file of the baseline (compress eval --output).")
@click.option("--max-ppl-rise", default="5%", show_default=True, help="Largest relative perplexity rise allowed, in percent.")
@click.option("--max-acc-drop", type=FINITE, default=1.0, show_default=True, help="Largest accuracy drop allowed, in points.")
@click.option("--max-cos-drop", type=FINITE, default=0.01, show_default=True,
              help="Largest drop of an encoder's mean embedding cosine to its float reference (absolute).")
@click.option("--significance", type=FINITE, default=0.05, show_default=True,
              help="A change fails only if significant at this level (one-sided p below it); 1 = threshold only.")
@click.option("--junit", type=click.Path(), help="Also write JUnit XML here.")
def command(candidate, baseline, max_ppl_rise, max_acc_drop, max_cos_drop, significance, junit) -> None:
    """Compare CANDIDATE's eval results with the baseline's, task by task; exit 0 (pass), 1 (fail), 2 (bad input).

    Both files come from `compress eval --output`. Tasks must match in protocol
    and items. The verdict is printed as a Markdown table (and appended to
    $GITHUB_STEP_SUMMARY when set).

    \b
    Example:
      compress gate out/w4.json --baseline baselines/fp32.json --max-ppl-rise 5% --max-acc-drop 1.0
    """
    from compress.artifact import write_text_atomic
    from compress.outputs import check_output_file
    from eval import gate, results

    try:
        if junit:
            check_output_file(junit)
        cfg = gate.GateConfig(max_ppl_rise=_percent(max_ppl_rise), max_acc_drop=max_acc_drop,
                              max_cos_drop=max_cos_drop, significance=significance)
        report = gate.compare(results.load(candidate), results.load(baseline), cfg)
    except ValueError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    text = gate.markdown(report, candidate, baseline)
    click.echo(text)
    gate.write_step_summary(text)
    if junit:
        write_text_atomic(junit, gate.junit_xml(report))
    sys.exit(0 if report.passed else 1)
