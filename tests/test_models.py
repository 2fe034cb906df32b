import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from compress.artifact import atomic_dir
from compress.models import load_model, save_model
from compress.pipeline import apply
from compress.quantize.qlinear import QuantLinear
from compress.recipe import Recipe


@pytest.mark.parametrize("sym", [True, False])
def test_save_load_gives_identical_logits(model_dir, tmp_path, tokens, sym):
    lm = load_model(model_dir)
    recipe = Recipe.single("rtn", bits=4, group_size=48, symmetric=sym)  # 48 does not divide 64 or 160
    reports = apply(lm.model, recipe)
    with torch.no_grad():
        ref = lm.model(tokens).logits
    out = save_model(lm, tmp_path / "art", recipe=recipe.to_list(), reports=reports)
    back = load_model(out)
    assert sum(isinstance(m, QuantLinear) for m in back.model.modules()) == reports[0].modules
    with torch.no_grad():
        assert torch.equal(back.model(tokens).logits, ref)
    prov = json.loads((out / "compress.json").read_text())
    assert prov["recipe"][0]["pass"] == "rtn" and prov["recipe"][0]["symmetric"] is sym
    assert len(prov["source"]["sha256"]) == 64 and prov["versions"]["torch"]
    assert prov["reports"][0]["modules"] == reports[0].modules
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"


def test_provenance_accumulates_over_two_runs(model_dir, tmp_path):
    lm = load_model(model_dir)
    r1 = Recipe.single("rtn", bits=8, targets=["re:.*layers\\.0\\."])
    save_model(lm, tmp_path / "a", recipe=r1.to_list(), reports=apply(lm.model, r1))
    lm2 = load_model(tmp_path / "a")
    r2 = Recipe.single("rtn", bits=4)
    save_model(lm2, tmp_path / "b", recipe=r2.to_list(), reports=apply(lm2.model, r2))
    prov = json.loads((tmp_path / "b" / "compress.json").read_text())
    assert [s["bits"] for s in prov["recipe"]] == [8, 4]
    assert prov["source"]["sha256"] == lm.source_sha256()
    assert len(prov["history"]) == 1


def test_refuses_overwrite_without_force(model_dir, tmp_path):
    lm = load_model(model_dir)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="--force"):
        save_model(lm, tmp_path / "x")
    save_model(lm, tmp_path / "x", force=True)
    assert (tmp_path / "x" / "model.safetensors").is_file()


def test_missing_path_and_pickle_refusal(model_dir, tmp_path):
    with pytest.raises(ValueError, match="model path not found"):
        load_model(tmp_path / "nope")
    d = tmp_path / "pickled"
    lm = load_model(model_dir)
    d.mkdir()  # a pickled checkpoint (transformers 5 saves only safetensors)
    torch.save(lm.model.state_dict(), d / "pytorch_model.bin")
    lm.model.config.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    assert (d / "pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match="--allow-pickle"):
        load_model(d)
    back = load_model(d, allow_pickle=True)
    a = dict(lm.model.named_parameters())
    for n, p in back.model.named_parameters():
        assert torch.equal(p, a[n])


def test_failed_save_leaves_nothing(model_dir, tmp_path, monkeypatch):
    lm = load_model(model_dir)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_model(lm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_killed_save_leaves_no_destination(tmp_path):
    code = (
        "import time, sys\n"
        "from compress.artifact import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'part').write_text('x')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    dest = tmp_path / "dest"
    for sig in (signal.SIGKILL, signal.SIGTERM):
        p = subprocess.Popen([sys.executable, "-c", code, str(dest)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(sig)
        p.wait(timeout=30)
        assert not dest.exists()
    # the killed writer's hidden temporary directory is swept by the next write
    with atomic_dir(dest) as tmp:
        (tmp / "ok").write_text("1")
    assert sorted(os.listdir(tmp_path)) == ["dest"]


def test_sigterm_during_cli_save_cleans_up(model_dir, tmp_path):
    """The CLI turns SIGTERM into an exit that removes the temporary directory."""
    code = (
        "import sys, time, signal\n"
        "from compress.cli._common import _sigterm\n"
        "from compress.artifact import atomic_dir\n"
        "signal.signal(signal.SIGTERM, _sigterm)\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "d")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    p.terminate()
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_quantized_lm_head_of_tied_model_round_trips(model_dirs, tmp_path, tokens):
    lm = load_model(model_dirs["llama"])  # tie_word_embeddings=True
    apply(lm.model, Recipe.single("rtn", bits=8, ignore=[]))
    assert isinstance(lm.model.lm_head, QuantLinear)
    with torch.no_grad():
        ref = lm.model(tokens).logits
    back = load_model(save_model(lm, tmp_path / "o"))
    assert isinstance(back.model.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(back.model(tokens).logits, ref)


@pytest.mark.parametrize("lazy", [False, True])
def test_quantized_tied_head_is_untied_and_survives_save_and_load(model_dirs, tmp_path, tokens, lazy):
    """Quantizing a tied lm_head (ignore list without it) keeps the packed head and the float embedding."""
    from compress.lazy import store_of

    src = model_dirs["llama"]  # tie_word_embeddings=True
    lm = load_model(src, lazy=lazy)
    recipe = Recipe.single("rtn", bits=4, group_size=32, ignore=["model.embed_tokens"])
    reports = apply(lm.model, recipe)
    if not lazy:  # a lazy model's weights are on disk: compare it after loading
        with torch.no_grad():
            ref = lm.model(tokens).logits
    out = save_model(lm, tmp_path / "art", recipe=recipe.to_list(), reports=reports)
    if lazy:
        store_of(lm.model).close()
    assert reports[0].modules == 15  # 2 layers x 7 + lm_head
    back = load_model(out)
    assert isinstance(back.model.lm_head, QuantLinear) and not back.model.config.tie_word_embeddings
    float_model = load_model(src).model
    assert torch.equal(back.model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    err = (back.model.lm_head.dequantize_weight() - float_model.lm_head.weight).abs().max()
    assert 0 < err < 0.05  # the head's own 4-bit codes, not the embedding
    if not lazy:
        with torch.no_grad():
            assert torch.equal(back.model(tokens).logits, ref)


def test_a_single_files_checksum_is_its_own_sha256(tmp_path):
    """What a user compares with a published SHA256SUMS: a single file's hash is `sha256sum`'s, not a hash of its
    name and bytes; several files are hashed with their names (a renamed shard changes the hash)."""
    import hashlib

    from compress import artifact

    a, b = tmp_path / "model.gguf", tmp_path / "b.bin"
    a.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    b.write_bytes(b"x" * 10)
    assert artifact.sha256_files([a]) == hashlib.sha256(a.read_bytes()).hexdigest()
    both = artifact.sha256_files([a, b])
    assert both != artifact.sha256_files([a]) and both == artifact.sha256_files([b, a])
    c = tmp_path / "c.bin"
    b.rename(c)
    assert artifact.sha256_files([a, c]) != both


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_leaves_no_spill_directory(tmp_path, sig):
    """SIGTERM (turned into an exit by the CLI's handler) and SIGINT (KeyboardInterrupt) both remove the lazy
    store's spill directory and an unfinished output directory."""
    code = (
        "import sys, time, signal\n"
        "from compress.cli._common import _sigterm\n"
        "from compress.artifact import atomic_dir\n"
        "from compress.spill import SpillDir\n"
        "signal.signal(signal.SIGTERM, _sigterm)\n"
        "spill = SpillDir(sys.argv[1])\n"
        "(spill.path / '000001.safetensors').write_bytes(b'x' * 100)\n"
        "with atomic_dir(sys.argv[1] + '/out') as tmp:\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    p.send_signal(sig)
    assert p.wait(timeout=30) != 0
    assert list(tmp_path.iterdir()) == []
