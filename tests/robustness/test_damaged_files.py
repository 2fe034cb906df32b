"""Damaged and foreign files: every one is refused in one line naming the file (and the tensor, for NaN/inf),
through the real CLI, and nothing is written. Also: spill directories of a killed process are swept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import no_leftovers, refused
from safetensors.torch import load_file, save_file

EVAL = ("--windows", "1", "--seq-len", "32")
CALIB = ("--calib-samples", "2", "--calib-seq-len", "32")
PLANTED = "model.layers.1.mlp.up_proj.weight"


# --- ways to damage a file -------------------------------------------------------------------

def truncate(f: Path, keep: float = 0.6) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def garbage_header(f: Path) -> None:
    """The 8-byte length stays plausible; the JSON header is overwritten with binary junk."""
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + min(n, 64)] = bytes(range(128, 128 + min(n, 64)))
    f.write_bytes(bytes(data))


def huge_header_length(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    f.write_bytes(bytes(data))


def plant(f: Path, name: str, value: float, index: tuple[int, ...] = (0, 0)) -> None:
    tensors = load_file(f)
    tensors[name][index] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


# --- shared products (made once) -----------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory) -> Path:
    """An RTN artifact of the tiny model (packed codes, float scales)."""
    from compress.recipe import Recipe
    from compress.runner import compress_model

    out = tmp_path_factory.mktemp("art") / "q"
    compress_model(tiny, Recipe.single("rtn", bits=4, group_size=32), out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter of the tiny model on q/v/down_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("adapter") / "a"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gguf_file(tiny, tmp_path_factory) -> Path:
    """The tiny model exported as GGUF (f16)."""
    pytest.importorskip("gguf")
    from click.testing import CliRunner

    from compress.cli import cli
    from export.gguf import GGUF_FILE

    out = tmp_path_factory.mktemp("gguf") / "g"
    r = CliRunner().invoke(cli, ["export", str(tiny), "--format", "gguf", "--float-type", "f16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / GGUF_FILE


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """A distillation run's checkpoint directory, and the command line that resumes it (minus --out)."""
    from click.testing import CliRunner

    from compress.cli import cli

    root = tmp_path_factory.mktemp("distill")
    args = ["distill", str(tiny), "--teacher", str(tiny), "--steps", "2", "--batch-size", "2",
            "--micro-batch-size", "2", "--seq-len", "32", "--warmup-steps", "0", "--mixed-precision", "no",
            "--checkpoint-every", "1", "--checkpoint-dir", str(root / "ck")]
    r = CliRunner().invoke(cli, [*args, "--out", str(root / "done")])
    assert r.exit_code == 0, r.output
    assert (root / "ck" / "step-00000001" / "state.json").is_file()
    return root / "ck", args


def _resume_args(checkpoint, tmp_path: Path) -> tuple[Path, list[str]]:
    ck, args = checkpoint
    mine = tmp_path / "ck"
    shutil.copytree(ck, mine)
    args = [a if a != str(ck) else str(mine) for a in args]
    return mine / "step-00000001", [*args, "--resume"]


# --- model directories (eager and lazy loads) ------------------------------------------------

@pytest.mark.parametrize("damage, words", [
    (truncate, ("truncated", "promises")),
    (lambda f: f.write_bytes(b""), ("empty",)),
    (garbage_header, ("header is not JSON",)),
    (huge_header_length, ("header length",)),
])
def test_damaged_model_safetensors_eval(cli, copy_model, damage, words):
    m = copy_model()
    damage(m / "model.safetensors")
    refused(cli("eval", m, *EVAL), str(m / "model.safetensors"), "damaged safetensors", *words)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_truncated_model_quantize_lazy(cli, copy_model, tmp_path, method):
    m = copy_model()
    truncate(m / "model.safetensors", 0.95)
    out = tmp_path / "out"
    refused(cli("quantize", m, "--method", method, *CALIB, "--out", out), "model.safetensors", "truncated")
    no_leftovers(out)


def test_config_json_invalid(cli, copy_model, tmp_path):
    m = copy_model()
    (m / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    refused(cli("eval", m, *EVAL), str(m / "config.json"), "not valid JSON")
    out = tmp_path / "out"
    refused(cli("quantize", m, "--method", "rtn", "--out", out), "config.json", "not valid JSON")
    no_leftovers(out)


def test_config_json_not_an_object(cli, copy_model):
    m = copy_model()
    (m / "config.json").write_text("[1, 2]")
    refused(cli("eval", m, *EVAL), "config.json", "not an object")


def test_truncated_tokenizer_json(cli, copy_model):
    m = copy_model()
    truncate(m / "tokenizer.json", 0.5)
    refused(cli("eval", m, *EVAL), str(m / "tokenizer.json"), "damaged tokenizer file", "not valid JSON")


def test_index_naming_a_missing_shard(cli, copy_model, tmp_path):
    m = copy_model()
    names = list(load_file(m / "model.safetensors"))
    weight_map = {n: "model.safetensors" if i % 2 else "model-00002-of-00002.safetensors" for i, n in enumerate(names)}
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    refused(cli("quantize", m, "--method", "rtn", "--out", out), "model.safetensors.index.json",
            "model-00002-of-00002.safetensors", "not in the directory")
    no_leftovers(out)
    (m / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    refused(cli("eval", m, *EVAL), "model.safetensors.index.json", "not valid JSON")


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_nonfinite_weight_eval(cli, copy_model, value, word):
    m = copy_model()
    plant(m / "model.safetensors", PLANTED, value)
    refused(cli("eval", m, *EVAL), PLANTED, "non-finite", word, str(m))


@pytest.mark.parametrize("change", ["drop", "reshape"])
def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_weights(cli, copy_model, tmp_path, change):
    m = copy_model()
    tensors = load_file(m / "model.safetensors")
    if change == "drop":
        del tensors[PLANTED]
    else:
        tensors[PLANTED] = tensors[PLANTED][:, :-1].contiguous()
    save_file(tensors, str(m / "model.safetensors"), metadata={"format": "pt"})
    refused(cli("eval", m, *EVAL), PLANTED, str(m))
    out = tmp_path / "out"
    refused(cli("quantize", m, "--method", "gptq", *CALIB, "--out", out), PLANTED)
    no_leftovers(out)


def test_nonfinite_weight_refused_by_the_lazy_store(cli, copy_model, tmp_path):
    m = copy_model()
    plant(m / "model.safetensors", PLANTED, float("-inf"), (3, 7))
    out = tmp_path / "out"
    refused(cli("quantize", m, "--method", "gptq", *CALIB, "--out", out), PLANTED, "non-finite", "1 inf")
    no_leftovers(out)


def test_garbage_bin_with_allow_pickle(cli, copy_model, tmp_path):
    m = copy_model()
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a torch checkpoint" * 10)
    refused(cli("eval", m, *EVAL, "--allow-pickle"), "pytorch_model.bin", "not a loadable PyTorch checkpoint")
    (m / "pytorch_model.bin").write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    o = cli("quantize", m, "--method", "rtn", "--allow-pickle", "--out", out)
    line = refused(o, "pytorch_model.bin", "not a loadable PyTorch checkpoint")
    assert "TF 2.0" not in line
    no_leftovers(out)


# --- compress artifacts ------------------------------------------------------------------------

def test_truncated_artifact(cli, artifact, tmp_path, copy_model):
    a = copy_model("art", src=artifact)
    truncate(a / "model.safetensors", 0.99)
    refused(cli("eval", a, *EVAL), str(a / "model.safetensors"), "truncated")
    out = tmp_path / "out"
    refused(cli("quantize", a, "--method", "rtn", "--out", out), "model.safetensors", "truncated")
    no_leftovers(out)


def test_nan_in_artifact_weight_scale(cli, artifact, copy_model):
    a = copy_model("art", src=artifact)
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    assert name in load_file(a / "model.safetensors")
    plant(a / "model.safetensors", name, float("nan"))
    refused(cli("eval", a, *EVAL), name, "non-finite", "NaN", str(a))


# --- LoRA adapters -------------------------------------------------------------------------------

def _merge(cli, tiny, adapter_dir, out):
    return cli("merge-lora", tiny, "--adapter", adapter_dir, "--out", out)


@pytest.mark.parametrize("damage, words", [(truncate, ("truncated",)), (garbage_header, ("not JSON",)),
                                           (huge_header_length, ("header length",))])
def test_damaged_adapter_weights(cli, tiny, adapter, tmp_path, damage, words):
    a = tmp_path / "a"
    shutil.copytree(adapter, a)
    damage(a / "adapter_model.safetensors")
    out = tmp_path / "out"
    refused(_merge(cli, tiny, a, out), str(a / "adapter_model.safetensors"), *words)
    no_leftovers(out)


def test_nan_in_adapter(cli, tiny, adapter, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(adapter, a)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    plant(a / "adapter_model.safetensors", name, float("nan"))
    out = tmp_path / "out"
    refused(_merge(cli, tiny, a, out), "adapter", str(a / "adapter_model.safetensors"), name, "non-finite")
    no_leftovers(out)


def test_adapter_config_invalid_json(cli, tiny, adapter, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(adapter, a)
    (a / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    out = tmp_path / "out"
    refused(_merge(cli, tiny, a, out), str(a / "adapter_config.json"), "not valid JSON")
    no_leftovers(out)


@pytest.mark.parametrize("targets, words", [
    (["q_proj", "k_proj"], ("down_proj", "v_proj", "not selected")),  # tensors for modules it does not name
    ("o_proj", ("'o_proj'", "not selected")),  # a regex that matches none of them
])
def test_adapter_target_modules_disagree_with_its_tensors(cli, tiny, adapter, tmp_path, targets, words):
    a = tmp_path / "a"
    shutil.copytree(adapter, a)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["target_modules"] = targets
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    refused(_merge(cli, tiny, a, out), "target_modules", *words)
    no_leftovers(out)


def test_peft_target_matching_rules():
    from compress.lora.adapter import _targeted

    name = "model.layers.1.self_attn.q_proj"
    assert _targeted({"target_modules": ["q_proj"]}, name)
    assert _targeted({"target_modules": [name]}, name)
    assert not _targeted({"target_modules": ["proj"]}, name)  # a suffix after a dot, not any suffix
    assert _targeted({"target_modules": r".*\.(q|v)_proj"}, name)
    assert not _targeted({"target_modules": "q_proj"}, name)  # a string is a full match
    assert _targeted({"target_modules": "all-linear"}, name)
    assert not _targeted({"target_modules": ["q_proj"], "layers_to_transform": [0]}, name)
    assert _targeted({"target_modules": ["q_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}, name)
    assert not _targeted({"target_modules": ["q_proj"], "exclude_modules": ["self_attn.q_proj"]}, name)


# --- GGUF and ONNX -------------------------------------------------------------------------------

def test_corrupt_gguf(cli, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF" + os.urandom(2000))
    refused(cli("eval", f, *EVAL), str(f), "damaged or not a GGUF file")
    f.write_bytes(b"not gguf at all" * 10)
    refused(cli("eval", f, *EVAL), str(f), "GGUF", "magic")


def test_truncated_gguf(cli, gguf_file, tmp_path):
    f = tmp_path / "t.gguf"
    shutil.copy(gguf_file, f)
    truncate(f, 0.7)
    refused(cli("eval", f, *EVAL), str(f), "damaged or not a GGUF file")
    out = tmp_path / "out"
    refused(cli("quantize", f, "--method", "rtn", "--out", out), "t.gguf", "GGUF")
    no_leftovers(out)


@pytest.mark.parametrize("content", [b"", b"\x08\x07" + os.urandom(3000)])
def test_corrupt_onnx(cli, copy_model, content):
    pytest.importorskip("onnxruntime")
    m = copy_model()
    (m / "model.onnx").write_bytes(content)
    refused(cli("eval", m, *EVAL), str(m / "model.onnx"), "not an ONNX model")


# --- calibration and question files --------------------------------------------------------------

@pytest.mark.parametrize("lines, words", [
    (['{"text": "a b c"}', "42"], ("d.jsonl:2", "JSON object", "int")),
    (['{"text": "a b c"}', "", '["a", "b"]'], ("d.jsonl:3", "JSON object", "list")),
    (['{"text": "a b c"}', '{"text": "broken'], ("d.jsonl:2", "not valid JSON")),
    (['{"text": 7}'], ("d.jsonl:1", "'text'", "not text")),
])
def test_bad_calibration_jsonl(cli, tiny, tmp_path, lines, words):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    refused(cli("quantize", tiny, "--method", "gptq", "--calib", f"{f}:text", *CALIB, "--out", out), *words)
    no_leftovers(out)


def test_calibration_jsonl_with_invalid_utf8(cli, tiny, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "out"
    refused(cli("quantize", tiny, "--method", "gptq", "--calib", f"{f}:text", *CALIB, "--out", out),
            "d.jsonl:2", "not UTF-8")
    no_leftovers(out)


def test_calibration_text_not_utf8(cli, tiny, tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"plain words\n" * 50 + "na\u00efve\n".encode("latin-1"))
    out = tmp_path / "out"
    refused(cli("quantize", tiny, "--method", "gptq", "--calib", f, *CALIB, "--out", out), "c.txt:51", "not UTF-8")
    no_leftovers(out)


def test_multiple_choice_files(cli, tiny, tmp_path):
    good = json.dumps({"question": "Sky?", "choices": ["blue", "red"], "answer": 0})
    f = tmp_path / "q.jsonl"
    f.write_text(good + "\n" + '{"question": "x", "choices": [\n')
    out = tmp_path / "r.json"
    refused(cli("eval", tiny, "--task", f"mc:{f}", "--output", out), "q.jsonl:2", "not valid JSON")
    f.write_text(good + "\n" + "[1, 2, 3]\n")
    refused(cli("eval", tiny, "--task", f"mc:{f}", "--output", out), "q.jsonl:2", "JSON object")
    c = tmp_path / "q.csv"
    c.write_text("question,A,B,answer\nSky?,blue,red,A\nTwo plus two, times one?,3,4,B\n")
    refused(cli("eval", tiny, "--task", f"mc:{c}", "--output", out), "q.csv:3", "5 fields")
    c.write_text("prompt,first,second,solution\nSky?,blue,red,A\n")
    refused(cli("eval", tiny, "--task", f"mc:{c}", "--output", out), "q.csv:1", "needs question")
    no_leftovers(out)


# --- distillation ----------------------------------------------------------------------------------

def test_corrupt_checkpoint_state(cli, checkpoint, tmp_path):
    step, args = _resume_args(checkpoint, tmp_path)
    (step / "state.json").write_text('{"step": 1, "optimizer": {"param_gr')
    out = tmp_path / "out"
    refused(cli(*args, "--out", out), str(step / "state.json"), "damaged checkpoint state")
    no_leftovers(out)
    (step / "state.json").write_text('{"step": 1}')
    refused(cli(*args, "--out", out), "state.json", "damaged checkpoint state", "optimizer")
    no_leftovers(out)


@pytest.mark.parametrize("name", ["model", "optimizer", "rng"])
def test_truncated_checkpoint_tensors(cli, checkpoint, tmp_path, name):
    step, args = _resume_args(checkpoint, tmp_path)
    truncate(step / f"{name}.safetensors", 0.9)
    out = tmp_path / "out"
    refused(cli(*args, "--out", out), str(step / f"{name}.safetensors"), "truncated")
    no_leftovers(out)


def test_layer_map_without_a_hidden_loss(cli, tiny, tmp_path):
    out = tmp_path / "out"
    o = cli("distill", tiny, "--teacher", tiny, "--steps", "1", "--layer-map", "0:0,1:1", "--out", out)
    refused(o, "layer_map", "--hidden-weight", "--attention-weight")
    no_leftovers(out)


def test_damaged_teacher_cache(tmp_path):
    from compress.distill.cache import TeacherCache

    fp = {"teacher": "t", "teacher_sha256": "0", "tokens_sha256": "0", "seq_len": 4, "heldout": 0, "topk": 2,
          "temperature": 1.0}
    cache = TeacherCache(tmp_path, fp)
    save_file({"logprobs": torch.zeros(4, 2), "indices": torch.zeros(4, 2, dtype=torch.int32)},
              str(tmp_path / "train-0000000.safetensors"))
    assert cache.load("train", [0], torch.device("cpu"))[0].shape == (1, 4, 2)
    truncate(tmp_path / "train-0000000.safetensors")
    with pytest.raises(ValueError, match=r"train-0000000\.safetensors: damaged .*truncated.*delete it"):
        cache.load("train", [0], torch.device("cpu"))
    (tmp_path / "cache.json").write_text("{")
    with pytest.raises(ValueError, match=r"cache\.json: damaged teacher cache description \(not valid JSON"):
        TeacherCache(tmp_path, fp)


# --- the framing check itself ------------------------------------------------------------------------

def _framed(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, data, words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "starts at byte 4"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "4 bytes after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"", "no dtype, shape and data_offsets"),
    ({"__metadata__": {"format": "pt"}, "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
      "b": {"dtype": "I8", "shape": [3], "data_offsets": [8, 11]}}, b"\0" * 11, None),
])
def test_safetensors_framing(tmp_path, header, data, words):
    from compress.files import check_safetensors

    f = tmp_path / "x.safetensors"
    f.write_bytes(_framed(header, data))
    if words is None:
        check_safetensors(f)
    else:
        with pytest.raises(ValueError, match=words):
            check_safetensors(f)


# --- what a pass produced, and spill directories -----------------------------------------------------

def test_a_pass_that_produces_nan_is_refused_before_spilling(tiny):
    from compress.lazy import store_of
    from compress.models import load_model

    lm = load_model(tiny, lazy=True)
    store = store_of(lm.model)
    block = lm.model.model.layers[0]
    with pytest.raises(ValueError, match=r"produced non-finite values in tensor model\.layers\.0\.mlp\.up_proj"):
        with store.loaded("model.layers.0", block):
            with torch.no_grad():
                block.mlp.up_proj.weight[0, 0] = float("nan")
    assert not list(store.spill_dir.glob("*.safetensors"))  # nothing was spilled
    assert all(p.is_meta for p in block.parameters())  # and the block was freed
    store.close()
    assert not store.spill_dir.exists()


def test_spill_dirs_of_a_killed_process_are_swept(tiny, tmp_path):
    from compress.spill import SPILL_PREFIX, SpillDir

    code = ("import sys, time; from pathlib import Path; from compress.lazy import load_lazy, store_of; "
            f"m = load_lazy(Path({str(tiny)!r}), [Path({str(tiny / 'model.safetensors')!r})], __import__('torch')"
            ".float32); print(store_of(m).spill_dir, flush=True); time.sleep(120)")
    env = {**os.environ, "COMPRESS_SPILL_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        spill = Path(proc.stdout.readline().strip())
        assert spill.parent == tmp_path and spill.name.startswith(SPILL_PREFIX) and spill.is_dir()
        alive = SpillDir(tmp_path)  # the owner is alive: its directory stays
        assert spill.is_dir()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert spill.is_dir()  # kill -9: no cleanup ran
        for _ in range(50):  # the kernel releases the lock as the process goes
            other = SpillDir(tmp_path)
            if not spill.exists():
                break
            other.cleanup()
            time.sleep(0.1)
        assert not spill.exists()
        assert alive.path.is_dir() and other.path.is_dir()  # live stores' directories are untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.path.name, other.path.name])
        alive.cleanup()
        other.cleanup()
        assert not list(tmp_path.iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
