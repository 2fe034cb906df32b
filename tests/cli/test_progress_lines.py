"""Without a terminal (CI logs, nohup) progress is printed as plain lines: when a phase starts, every 5 % or 30 s,
and when it ends, with elapsed time and an estimate."""

from __future__ import annotations

from click.testing import CliRunner

from compress.cli import cli
from compress.cli._common import ProgressLines


def test_lines_at_start_every_five_percent_and_at_the_end():
    lines: list[str] = []
    t = [0.0]
    p = ProgressLines(echo=lines.append, clock=lambda: t[0])
    for done in range(0, 101):
        t[0] = done * 2.0  # 2 s per step
        p("gptq", done, 100)
    assert lines[0].startswith("gptq: 0/100 (0 %), 0s elapsed")
    assert lines[-1] == "gptq: 100/100 (100 %), 3m20s elapsed"
    assert len(lines) == 1 + 20  # 0 %, then every 5 %
    assert "gptq: 50/100 (50 %), 1m40s elapsed, about 1m40s left" in lines


def test_slow_phases_print_every_thirty_seconds_and_a_new_phase_restarts():
    lines: list[str] = []
    t = [0.0]
    p = ProgressLines(echo=lines.append, clock=lambda: t[0])
    for done in range(0, 1001):
        t[0] = done * 1.0  # 1000 steps of 1 s: 5 % = 50 s, so the 30 s rule decides
        p("awq", done, 1000, "block 3")
    done = [int(ln.split()[1].split("/")[0]) for ln in lines]
    gaps = [b - a for a, b in zip(done, done[1:], strict=False)]
    assert done[0] == 0 and done[-1] == 1000 and max(gaps) <= 30  # (1 s per step)
    assert set(range(0, 1001, 50)) <= set(done)  # and every 5 %
    assert lines[1] == "awq: 30/1000 (3 %), 30s elapsed, about 16m10s left (block 3)"
    lines.clear()
    t[0] = 5000.0
    p("awq", 0, 4)
    assert lines == ["awq: 0/4 (0 %), 0s elapsed"]


def test_a_command_without_a_terminal_logs_its_progress(model_dirs, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(model_dirs["llama"]), "--method", "gptq", "--group-size", "32",
                                 "--calib-samples", "2", "--calib-seq-len", "32", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "gptq: 2/2 (100 %)" in r.stderr, r.stderr


def test_a_fast_phase_prints_little():
    lines: list[str] = []
    t = [0.0]
    p = ProgressLines(echo=lines.append, clock=lambda: t[0])
    for done in range(1, 211):
        t[0] = done * 0.01  # 210 steps in 2 s
        p("rtn", done, 210)
    assert len(lines) == 2 and lines[-1].startswith("rtn: 210/210 (100 %)")
