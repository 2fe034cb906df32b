"""Students made from their teacher, layer pairing, packed training data, CLI errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from compress.distill.data import pack_text
from compress.distill.student import evenly_spaced, layer_pairs
from compress.pipeline import apply
from compress.recipe import Recipe


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(30, 15)[:3] == [0, 2, 4] and evenly_spaced(30, 15)[-1] == 29
    assert evenly_spaced(30, 15) == sorted(set(evenly_spaced(30, 15))) and len(evenly_spaced(30, 15)) == 15
    assert evenly_spaced(4, 2) == [0, 3] and evenly_spaced(5, 1) == [4]
    with pytest.raises(ValueError):
        evenly_spaced(3, 4)


def test_student_pass_shrinks_depth_and_width_and_records_origins(make_tiny, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from calibrate.blocks import decoder_blocks

    model = make_tiny("llama")
    model.config.num_hidden_layers = 3  # rebuild with three blocks
    model = AutoModelForCausalLM.from_config(model.config)
    calib = torch.randint(0, len(tiny_tokenizer), (2, 16))
    [rep] = apply(model, Recipe.single("student", layers=2, mlp_ratio=0.5), calib)
    assert model.config.num_hidden_layers == 2 and len(decoder_blocks(model)[1]) == 2
    assert model.config.intermediate_size == 80 and model.model.layers[0].mlp.up_proj.out_features == 80
    assert model.config.compress_layer_origin == [0, 2]
    assert layer_pairs(model, 3) == [(0, 0), (1, 2)]
    assert rep.metrics["parameters_removed"] > 0
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.compress_layer_origin == [0, 2]
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_layer_pairs_by_depth_and_by_spec(make_tiny):
    model = make_tiny("llama")  # two blocks, no recorded origin
    assert layer_pairs(model, 4) == [(0, 1), (1, 3)]
    assert layer_pairs(model, 4, "0:0, 1:2") == [(0, 0), (1, 2)]
    with pytest.raises(ValueError, match="STUDENT:TEACHER"):
        layer_pairs(model, 4, "0-1")
    with pytest.raises(ValueError, match="the teacher 4"):
        layer_pairs(model, 4, "1:4")
    with pytest.raises(ValueError, match="layers or mlp_ratio"):
        Recipe.single("student")


def test_packed_data_holds_out_the_tail_and_reads_every_sequence_once_per_epoch(tiny_tokenizer):
    data = pack_text(tiny_tokenizer, "wikitext2", seq_len=64, heldout=3)
    n = data.train.shape[0]
    assert data.train.shape[1] == 64 and data.heldout.shape == (3, 64) and n > 100
    assert data.tokens >= (n + 3) * 64
    first_epoch = torch.cat([data.batch_indices(s, 8, seed=5) for s in range(n // 8)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no repeats within an epoch
    assert torch.equal(data.batch_indices(3, 8, seed=5), data.batch_indices(3, 8, seed=5))
    assert not torch.equal(data.batch_indices(0, 8, seed=5), data.batch_indices(0, 8, seed=6))
    with pytest.raises(ValueError, match="need more than"):
        pack_text(tiny_tokenizer, "wikitext2", seq_len=10**7, heldout=1)


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one student"),
    (["--student-from-pruned", "rows:0.5"], "KIND[:RATIO]"),
    (["--student-layers", "1", "--steps", "0"], "steps must be positive"),
    (["--student-layers", "1", "--batch-size", "3"], "multiple of micro_batch_size"),
    (["--student-layers", "1", "--resume"], "need checkpoint_dir"),
    (["--student-layers", "1", "--divergence", "tvd"], "Invalid value"),
])
def test_distill_cli_errors(args, message, tmp_path):
    from compress.cli import cli

    r = CliRunner().invoke(cli, ["distill", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "o").exists()
