import json
import math

from click.testing import CliRunner

from compress.cli import cli
from eval import results
from eval.report import markdown, pareto_front


def _doc(name, size, bits, ppl):
    return {"schema": results.SCHEMA, "model": {"name": name, "path": f"/out/{name}", "bytes_on_disk": size,
                                                 "bits_per_parameter": bits},
            "results": {"wikitext2": {"metric": "perplexity", "value": ppl, "ci95": [ppl * 0.97, ppl * 1.03],
                                      "protocol": {},
                                      "items": [{"id": "window 0", "nll": 100 * math.log(ppl), "tokens": 100}]}}}


def test_pareto_front_lower_is_better():
    pts = [(100, 25.0), (50, 26.0), (30, 40.0), (60, 30.0), (30, 41.0)]
    assert pareto_front(pts, True) == [2, 1, 0]  # (60, 30) is beaten by (50, 26); (30, 41) by (30, 40)
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.7)], False) == [0, 2]


def test_report_table_and_png(tmp_path):
    files = []
    for name, size, bits, ppl in [("fp32", 540e6, 32, 24.9), ("w8", 170e6, 8.1, 24.9), ("w4", 110e6, 4.9, 28.1)]:
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(_doc(name, size, bits, ppl)))
        files.append(str(f))
    table = markdown([(n, results.load(f)) for n, f in zip(["fp32", "w8", "w4"], files, strict=True)])
    assert "| w4 | 110.0 | 4.90 | 28.100 [27.257, 28.943] |" in table
    png = tmp_path / "p.png"
    r = CliRunner().invoke(cli, ["report", *files, "--plot", str(png), "--output", str(tmp_path / "t.md")])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| fp32 |" in (tmp_path / "t.md").read_text()
    r = CliRunner().invoke(cli, ["report", files[0], str(tmp_path / "missing.json")])
    assert r.exit_code != 0 and "not found" in r.output
