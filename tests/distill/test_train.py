"""The distillation loop on tiny models: it learns, it resumes exactly after kill -9, and two processes
(accelerate launch, gloo) follow the same loss curve as one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.distill.kd import DistillConfig
from compress.distill.losses import logit_divergence
from compress.distill.train import train
from compress.recipe import Recipe

FAST = {"seq_len": 32, "batch_size": 4, "micro_batch_size": 2, "mixed_precision": "no", "heldout": 4}


@torch.no_grad()
def _kl_to_teacher(student, teacher, seqs: torch.Tensor) -> float:
    return logit_divergence(student(input_ids=seqs).logits, teacher(input_ids=seqs).logits).item()


def test_kd_loss_falls_and_the_student_moves_toward_the_teacher(tiny_tokenizer, make_tiny):
    from compress.distill.data import pack_text

    teacher, student = make_tiny("llama", 0), make_tiny("llama", 1)
    held = pack_text(tiny_tokenizer, "wikitext2", seq_len=32, heldout=4).heldout
    before = _kl_to_teacher(student, teacher, held)
    out = train(student, teacher, tiny_tokenizer, DistillConfig(steps=30, lr=3e-3, warmup_steps=2, **FAST))
    kd = [r["kd"] for r in out["record"]["curve"]]
    after = _kl_to_teacher(student, teacher, held)
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5
    assert after < 0.8 * before  # on held-out text the student's distributions are closer to the teacher's
    assert out["metrics"]["heldout_perplexity_after"] < out["metrics"]["heldout_perplexity_before"]
    assert not any(p.requires_grad is False for p in student.parameters())  # handed back trainable


def test_hidden_states_of_another_width_are_projected(tiny_tokenizer, make_tiny):
    from transformers import AutoModelForCausalLM, LlamaConfig

    teacher = make_tiny("llama", 0)
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True))
    out = train(student, teacher, tiny_tokenizer,
                DistillConfig(steps=8, lr=3e-3, warmup_steps=2, hidden_weight=1.0, attention_weight=0.5, **FAST))
    assert out["record"]["layer_pairs"] == [(0, 1)]  # relative depth: the one block learns from the last
    first, last = out["record"]["curve"][0], out["record"]["curve"][-1]
    assert {"kd", "hidden", "attention"} <= first.keys() and last["hidden"] < first["hidden"]


def test_plain_fine_tuning_needs_no_teacher(tiny_tokenizer, make_tiny):
    student = make_tiny("llama", 1)
    out = train(student, None, tiny_tokenizer,
                DistillConfig(steps=10, kd_weight=0, ce_weight=1, lr=3e-3, warmup_steps=1, train_embeddings=True,
                              **FAST))
    ce = [r["ce"] for r in out["record"]["curve"]]
    assert sum(ce[-3:]) < 0.98 * sum(ce[:3]) and "kd" not in out["record"]["curve"][0]
    assert out["metrics"]["heldout_perplexity_after"] < 0.95 * out["metrics"]["heldout_perplexity_before"]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(native, monkeypatch, caplog):
    from compress.distill import precision as training

    monkeypatch.setattr(training, "native_bf16", lambda device_type: native)
    with caplog.at_level("WARNING", logger="compress.distill.precision"):
        assert training.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: kept, but said
        assert training.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "no")
    assert ("emulated" in caplog.text) is not native


def test_embeddings_stay_frozen_by_default(tiny_tokenizer, make_tiny):
    teacher, student = make_tiny("llama", 0), make_tiny("llama", 1)
    emb = student.get_input_embeddings().weight.detach().clone()
    q = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    train(student, teacher, tiny_tokenizer, DistillConfig(steps=2, lr=1e-2, warmup_steps=0, **FAST))
    assert torch.equal(student.get_input_embeddings().weight, emb)
    assert not torch.equal(student.model.layers[0].self_attn.q_proj.weight, q)


@pytest.fixture
def pair_dirs(tmp_path_factory, tiny_tokenizer, make_tiny) -> tuple[Path, Path]:
    """Saved tiny teacher (seed 0) and student (seed 1) directories."""
    dirs = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"distill-{seed}")
        make_tiny("llama", seed).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs[0], dirs[1]


def _cli(teacher: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "compress", "distill", str(student), "--teacher", str(teacher), "--seq-len", "32",
            "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--mixed-precision", "no",
            "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_kill_9_then_resume_gives_the_uninterrupted_weights(pair_dirs, tmp_path):
    teacher, student = pair_dirs
    steps = ["--steps", "40", "--micro-batch-size", "2", "--checkpoint-every", "2"]
    ref = subprocess.run([sys.executable, *_cli(teacher, student, tmp_path / "ref", *steps,
                                                "--checkpoint-dir", str(tmp_path / "ck-ref"))],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ck = tmp_path / "ck"
    args = _cli(teacher, student, tmp_path / "run", *steps, "--checkpoint-dir", str(ck))
    proc = subprocess.Popen([sys.executable, *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(ck.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "run").exists()  # nothing half-written where the student goes
    killed_at = sorted(p.name for p in ck.glob("step-*"))
    assert killed_at and killed_at[-1] < "step-00000040"
    res = subprocess.run([sys.executable, *args, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got, want = _weights(tmp_path / "run"), _weights(tmp_path / "ref")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
    curve = json.loads((tmp_path / "run" / "distill_curve.json").read_text())["curve"]
    ref_curve = json.loads((tmp_path / "ref" / "distill_curve.json").read_text())["curve"]
    assert [r["step"] for r in curve] == list(range(1, 41))
    assert [r["loss"] for r in curve] == pytest.approx([r["loss"] for r in ref_curve], abs=1e-6)


def test_resume_refuses_other_settings(pair_dirs, tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    teacher, student = pair_dirs
    ck = tmp_path / "ck"
    base = _cli(teacher, student, tmp_path / "a", "--steps", "4", "--micro-batch-size", "2",
                "--checkpoint-every", "2", "--checkpoint-dir", str(ck))[2:]
    r = CliRunner().invoke(cli, base)
    assert r.exit_code == 0, r.output
    again = [a if a != "3e-3" else "1e-3" for a in base]
    again[again.index("--out") + 1] = str(tmp_path / "b")
    r = CliRunner().invoke(cli, [*again, "--resume"])
    assert r.exit_code != 0 and "different settings (lr)" in r.output
    r = CliRunner().invoke(cli, [*base[:-2], "--out", str(tmp_path / "c"), "--resume", "--checkpoint-dir",
                                 str(tmp_path / "empty")])
    assert r.exit_code != 0 and "no checkpoint" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_follow_the_one_process_curve(pair_dirs, tmp_path):
    """Global batch 4: one process (2 micro-batches of 2) vs accelerate launch, 2 gloo CPU processes (1 x 2 each)."""
    teacher, student = pair_dirs
    common = ["--steps", "6", "--micro-batch-size", "2", "--hidden-weight", "0.5"]
    one = subprocess.run([sys.executable, *_cli(teacher, student, tmp_path / "one", *common)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # accelerate 1.x starts several CPU processes only through mpirun with --cpu; --multi_gpu starts them with
    # torchrun, and on a machine without CUDA the Accelerator runs them on the CPU with gloo
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(_free_port()),
                          *_cli(teacher, student, tmp_path / "two", *common)],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    c1 = json.loads((tmp_path / "one" / "distill_curve.json").read_text())
    c2 = json.loads((tmp_path / "two" / "distill_curve.json").read_text())
    assert c2["metrics"] and json.loads((tmp_path / "two" / "compress.json").read_text())["reports"][0]["config"][
        "processes"] == 2
    assert [r["loss"] for r in c2["curve"]] == pytest.approx([r["loss"] for r in c1["curve"]], rel=1e-4, abs=1e-5)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k


def test_prune_then_distill_recipe_learns_from_the_unpruned_model(model_dirs, tmp_path):
    from calibrate.data import CalibConfig
    from compress.models import load_model
    from compress.runner import compress_model

    src = model_dirs["llama"]
    recipe = Recipe.from_steps([{"pass": "prune_channels", "ratio": 0.5},
                                {"pass": "distill", "steps": 20, "lr": 1e-3, "warmup_steps": 0, **FAST}])
    summary = compress_model(src, recipe, tmp_path / "out", calib=CalibConfig(samples=4, seq_len=32))
    rep = summary["reports"][1]
    assert rep["config"]["teacher"] == str(src) and rep["config"]["teacher_source"] == str(src)
    m = rep["metrics"]  # the pruned student closes in on the model it was pruned from
    assert m["heldout_kl_to_teacher_after"] < 0.95 * m["heldout_kl_to_teacher_before"]
    lm = load_model(tmp_path / "out")
    assert lm.model.config.intermediate_size == 80
    prov = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert [s["pass"] for s in prov["recipe"]] == ["prune_channels", "distill"]
