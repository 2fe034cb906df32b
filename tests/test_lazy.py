"""Low-memory processing: the artifact equals the in-memory one, with one block in memory at a time."""

import json

import pytest
import torch
from safetensors.torch import load_file

from calibrate.data import CalibConfig
from compress.lazy import store_of
from compress.models import load_model
from compress.pipeline import apply
from compress.recipe import Recipe
from compress.runner import compress_model


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("steps", [
    [{"pass": "rtn", "bits": 4, "group_size": 32}],
    [{"pass": "gptq", "bits": 3, "group_size": 32}],
    [{"pass": "block_tune", "bits": 3, "group_size": 32, "iters": 10, "symmetric": False}],
    [{"pass": "awq", "bits": 4, "group_size": 32, "quantize": False}, {"pass": "gptq", "bits": 4, "group_size": 32}],
])
def test_low_memory_artifact_is_identical(model_dir, tmp_path, steps):
    calib = CalibConfig(samples=8, seq_len=64)
    for low in (False, True):
        compress_model(model_dir, Recipe.from_steps(steps), tmp_path / str(low), calib=calib, low_memory=low)
    a, b = _tensors(tmp_path / "False"), _tensors(tmp_path / "True")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ja, jb = (json.loads((tmp_path / str(x) / "config.json").read_text()) for x in (False, True))
    assert ja["quantization_config"] == jb["quantization_config"]
    assert (tmp_path / "True" / "model.safetensors").exists()


@pytest.mark.parametrize("step", [{"pass": "gptq"}, {"pass": "block_tune", "iters": 4}])
def test_lazy_model_holds_no_block_weights(model_dir, step):
    lm = load_model(model_dir, lazy=True)
    assert store_of(lm.model) is not None
    assert all(p.is_meta for p in lm.model.parameters())  # nothing read yet
    seen = []
    orig = store_of(lm.model).load
    blocks = lm.model.model.layers if hasattr(lm.model.model, "layers") else lm.model.model.decoder.layers

    def spy(prefix, module):
        # when a block is read, every other block is still on meta
        seen.append(all(p.is_meta for blk in blocks for p in blk.parameters()))
        orig(prefix, module)

    store_of(lm.model).load = spy
    apply(lm.model, Recipe.from_steps([{**step, "bits": 4, "group_size": 32}]), torch.randint(0, 100, (4, 32)))
    assert seen and all(seen)
    assert all(t.is_meta for t in lm.model.state_dict().values())  # everything written back to disk


def test_sharded_streaming_save_loads(model_dir, tmp_path, monkeypatch):

    from compress import tensorfile

    monkeypatch.setattr(tensorfile, "CHUNK_BYTES", 1000)  # every large tensor is written in several row slices
    lm = load_model(model_dir, lazy=True)
    apply(lm.model, Recipe.single("rtn", bits=4, group_size=32))
    store_of(lm.model).save(tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    ref = tmp_path / "ref"
    compress_model(model_dir, Recipe.single("rtn", bits=4, group_size=32), ref, low_memory=False)
    a, b = _tensors(ref), _tensors(tmp_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_source_is_saved_like_a_full_load(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(model_dirs["llama"]).save_pretrained(src)
    for low in (False, True):
        compress_model(src, Recipe.single("rtn", bits=8), tmp_path / str(low), low_memory=low)
    a, b = _tensors(tmp_path / "False"), _tensors(tmp_path / "True")
    assert a["model.norm.weight"].dtype == torch.float32
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_capture_reads_only_what_runs_before_the_first_block(model_dir):
    from calibrate.blocks import decoder_blocks
    from calibrate.capture import capture_first_block_inputs

    lm = load_model(model_dir, lazy=True)
    store = store_of(lm.model)
    read, orig = [], store.load
    store.load = lambda prefix, module: (read.append(prefix), orig(prefix, module))[1]
    got = capture_first_block_inputs(lm.model, torch.randint(0, 100, (2, 16)))
    assert len(got.hidden) == 1 and got.hidden[0].shape[:2] == (2, 16) and not got.hidden[0].is_meta
    assert any("embed_tokens" in p for p in read)
    assert not any("norm" in p or "lm_head" in p for p in read)  # after the blocks: never read
    path, _ = decoder_blocks(lm.model)
    assert all(t.is_meta for k, t in lm.model.state_dict().items() if not k.startswith(path))  # released


def test_a_checkpoint_transformers_converts_on_load_is_loaded_whole(tmp_path, tiny_tokenizer):
    """GPT-NeoX's head is stored as `embed_out` and renamed by transformers as it loads: no streaming, same model."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from compress.lazy import store_of
    from compress.models import load_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128))
    model.save_pretrained(tmp_path / "neox")
    tiny_tokenizer.save_pretrained(tmp_path / "neox")
    lm = load_model(tmp_path / "neox", lazy=True)
    assert store_of(lm.model) is None
    assert torch.equal(lm.model.get_output_embeddings().weight, model.get_output_embeddings().weight)
