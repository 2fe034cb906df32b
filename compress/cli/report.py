"""`compress report`: eval results files -> Markdown table and Pareto plot."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("results_files", nargs=-1, required=True, type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG Pareto plot (quality vs size) here.")
@click.option("--x", "x_axis", type=click.Choice(["size", "bits"]), default="size", show_default=True,
              help="Plot x axis: size on disk or bits per parameter.")
@click.option("--output", type=click.Path(), help="Write the Markdown table here (default: print it).")
@click.option("--label", "labels", multiple=True,
              help="Name for each file's model, in order (default: its directory name).")
def command(results_files, plot_path, x_axis, output, labels) -> None:
    """Tabulate several `compress eval --output` files and plot quality against size.

    \b
    Example:
      compress report fp32.json w8.json w4.json --plot docs/pareto.png
    """
    from compress.artifact import write_bytes_atomic, write_text_atomic
    from compress.outputs import check_output_file
    from eval import report, results

    if labels and len(labels) != len(results_files):
        raise click.UsageError(f"--label given {len(labels)} times for {len(results_files)} files")
    for path in (output, plot_path):
        if path:
            check_output_file(path)
    docs = [results.load(f) for f in results_files]
    for f, d in zip(results_files, docs, strict=True):
        for task, r in d["results"].items():
            bad = results.nonfinite(r)
            if bad:
                raise click.ClickException(f"{f}: task {task} has a non-finite number ({bad}); re-run its eval")
    names = list(labels) or [report.label_of(d, f) for d, f in zip(docs, results_files, strict=True)]
    pairs = list(zip(names, docs, strict=True))
    table = report.markdown(pairs)
    png = report.plot(pairs, x=x_axis) if plot_path else None  # both built before anything is written
    if output:
        write_text_atomic(output, table)
    else:
        click.echo(table)
    if png is not None:
        write_bytes_atomic(plot_path, png)
        click.echo(f"plot written to {plot_path}", err=True)
