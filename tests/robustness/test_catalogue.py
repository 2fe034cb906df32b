"""The bad-input catalogue, through the CLI on tiny models: the gate and eval, non-finite numbers produced on the
way, output paths, silent surprises. Damaged files and non-finite checkpoints: test_damaged_files.py; kills
during a save: test_faults.py.

Every case asserts the exit status, one `Error:` line naming the problem, no traceback and no partial output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import no_leftovers, refused
from safetensors.torch import load_file, save_file

EVAL = ("--windows", "2", "--seq-len", "32")


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory, model_dirs):
    """A perplexity and a multiple-choice results file of the tiny Llama (the baseline of the gate cases)."""
    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from compress.runner import evaluate
    from eval import results as res

    d = tmp_path_factory.mktemp("results")
    mc = d / "q.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i), "7", "0"],
                                        "answer": 0}) for i in range(6)) + "\n")
    lm = load_model(model_dirs["llama"])
    r = evaluate(lm, ["wikitext2", f"mc:{mc}"], options={"windows": 3, "seq_len": 32})
    base = d / "base.json"
    write_json_atomic(base, res.document(res.model_identity(lm), r, package_versions()))
    return {"base": base, "mc": mc, "mc_task": f"mc:{mc}", "dir": d}


def tampered(results, name: str, edit) -> Path:
    doc = json.loads(results["base"].read_text())
    edit(doc["results"])
    p = results["dir"] / f"{name}.json"
    p.write_text(json.dumps(doc))  # Python's json writes bare NaN / Infinity, as a careless tool would
    return p


def overflow_model(copy_model) -> Path:
    """Finite weights whose activations overflow float32: a norm scaled to 1e38."""
    d = copy_model("overflow")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.post_attention_layernorm.weight"].fill_(1e38)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


# -- 1. the gate and eval never bless a broken model -------------------------------------------------------------

def _set(task, *path_value):
    def edit(res):
        *path, value = path_value
        node = res[task]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("name,edit,why", [
    ("nan-value", _set("wikitext2", "value", math.nan), "non-finite"),
    ("inf-value", _set("wikitext2", "value", math.inf), "non-finite"),
    ("nan-nll", lambda r: r["wikitext2"]["items"][1].update(nll=math.nan), "window 1"),
    ("inf-nll", lambda r: r["wikitext2"]["items"][0].update(nll=math.inf), "window 0"),
    ("nan-logprob", lambda r: r[next(k for k in r if k.startswith("mc:"))]["items"][2]["logprobs"].__setitem__(
        0, math.nan), "logprobs"),
    ("nan-accuracy", lambda r: r[next(k for k in r if k.startswith("mc:"))].update(value=math.nan), "non-finite"),
    ("better-value-than-items", lambda r: r["wikitext2"].update(value=r["wikitext2"]["value"] / 2), "does not match"),
    ("accuracy-not-its-items", lambda r: r[next(k for k in r if k.startswith("mc:"))].update(value=1.0),
     "does not match"),
])
def test_gate_fails_a_broken_candidate(cli, results, name, edit, why):
    cand = tampered(results, name, edit)
    o = cli("gate", cand, "--baseline", results["base"])
    assert o.traceback is None and o.code == 1, o.text
    assert "FAILED" in o.out and why in o.out


@pytest.mark.parametrize("name,edit,why", [
    ("null-nll", lambda r: r["wikitext2"]["items"][0].update(nll=None), "not a number"),
    ("string-value", _set("wikitext2", "value", "12.5"), "not a number"),
    ("zero-tokens", lambda r: r["wikitext2"]["items"][0].update(tokens=0), "positive integer"),
    ("no-items", _set("wikitext2", "items", []), "no per-item records"),
    ("duplicate-ids", lambda r: r["wikitext2"]["items"].__setitem__(1, r["wikitext2"]["items"][0]), "duplicate id"),
    ("correct-not-bool", lambda r: r[next(k for k in r if k.startswith("mc:"))]["items"][0].update(correct="yes"),
     "true or false"),
])
def test_gate_refuses_a_malformed_candidate(cli, results, name, edit, why):
    cand = tampered(results, name, edit)
    refused(cli("gate", cand, "--baseline", results["base"]), why, code=2)


def test_gate_refuses_a_non_finite_baseline(cli, results):
    base = tampered(results, "nan-base", _set("wikitext2", "value", math.nan))
    refused(cli("gate", results["base"], "--baseline", base), "baseline is unusable", code=2)


@pytest.mark.parametrize("option", [("--max-ppl-rise", "nan"), ("--max-acc-drop", "nan"), ("--max-acc-drop", "inf"),
                                    ("--significance", "nan"), ("--max-ppl-rise", "-inf")])
def test_gate_refuses_non_finite_thresholds(cli, results, option):
    o = cli("gate", results["base"], "--baseline", results["base"], *option)
    assert o.traceback is None and o.code == 2 and "finite" in o.err, o.text


def test_gate_passes_the_untouched_file(cli, results):
    o = cli("gate", results["base"], "--baseline", results["base"])
    assert o.code == 0 and "PASSED" in o.out, o.text


@pytest.mark.parametrize("task", ["wikitext2", "mc"])
def test_eval_of_an_overflowing_model_fails_and_writes_nothing(cli, copy_model, results, tmp_path, task):
    out = tmp_path / "r.json"
    t = results["mc_task"] if task == "mc" else task
    line = refused(cli("eval", overflow_model(copy_model), "--task", t, *(EVAL if task == "wikitext2" else ()),
                       "--output", out), "non-finite score")
    assert ("window 0" in line) if task == "wikitext2" else ("item 0" in line)
    no_leftovers(out)


def test_report_refuses_non_finite_results(cli, results, tmp_path):
    cand = tampered(results, "nan-report", _set("wikitext2", "value", math.nan))
    refused(cli("report", cand, "--output", tmp_path / "t.md"), "non-finite")
    no_leftovers(tmp_path / "t.md")


def test_json_writer_refuses_nan(tmp_path):
    from compress.artifact import write_json_atomic

    with pytest.raises(ValueError, match=r"at a\.b\[1\]"):
        write_json_atomic(tmp_path / "x.json", {"a": {"b": [1.0, math.nan]}})
    no_leftovers(tmp_path / "x.json")


# -- 2. non-finite numbers produced on the way --------------------------------------------------------------------

def test_calibration_activations_that_overflow_are_refused(cli, copy_model, tmp_path):
    out = tmp_path / "q"
    refused(cli("quantize", overflow_model(copy_model), "--method", "gptq", "--calib-samples", "2",
                "--calib-seq-len", "32", "--out", out), "non-finite")
    no_leftovers(out)


@pytest.mark.parametrize("method", ["awq", "gptq", "block_tune", "w8a8"])
def test_every_calibrated_pass_refuses_overflowing_activations(cli, copy_model, tmp_path, method):
    out = tmp_path / "q"
    extra = ("--bits", "8", "--activations", "int8") if method == "w8a8" else ("--method", method)
    refused(cli("quantize", overflow_model(copy_model), *extra, "--calib-samples", "2", "--calib-seq-len", "32",
                "--out", out), "non-finite")
    no_leftovers(out)


def test_prune_refuses_overflowing_activations(cli, copy_model, tmp_path):
    out = tmp_path / "p"
    refused(cli("prune", overflow_model(copy_model), "--method", "wanda", "--calib-samples", "2", "--calib-seq-len",
                "32", "--out", out), "non-finite")
    no_leftovers(out)


def test_a_scale_beyond_float16_is_refused_not_clamped(cli, copy_model, tmp_path):
    d = copy_model("huge")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.weight"][0, :4] = 1e9  # finite, but its group's scale overflows float16
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "q"
    refused(cli("quantize", d, "--method", "rtn", "--out", out), "model.layers.1.self_attn.o_proj", "float32")
    no_leftovers(out)
    o = cli("quantize", d, "--method", "rtn", "--scale-dtype", "float32", "--out", out)
    assert o.code == 0, o.text


def test_a_pass_that_produces_nan_is_caught(tiny, monkeypatch):
    """A pass (here: a plugin that writes NaN into a norm) cannot slip NaN into an artifact."""
    import dataclasses

    import torch

    from compress.models import load_model
    from compress.pipeline import PassReport, apply
    from compress.recipe import Recipe
    from compress.registry import PASSES

    def broken(model, cfg, calib=None):
        model.model.norm.weight.data[3] = torch.nan
        return PassReport(name="rtn", config={})

    monkeypatch.setitem(PASSES._specs, "rtn", dataclasses.replace(PASSES.get("rtn"), run=broken))
    lm = load_model(tiny)
    with pytest.raises(ValueError, match=r"step 1 \(rtn\) produced non-finite values in model\.norm\.weight"):
        apply(lm.model, Recipe.single("rtn"), None)


# -- 5. checked before the work -----------------------------------------------------------------------------------

@pytest.fixture
def unloadable(tmp_path) -> Path:
    """A model directory that fails only when loaded: a check that reports first ran before the load."""
    d = tmp_path / "unloadable"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize("command", [
    ("quantize", "--method", "rtn"), ("prune", "--method", "magnitude"), ("run", "RECIPE"),
    ("merge-lora", "--adapter", "ADAPTER"), ("export", "--format", "onnx"), ("distill", "--steps", "1"),
])
@pytest.mark.parametrize("where", ["under-a-file", "exists", "read-only"])
def test_bad_out_is_refused_before_the_model_loads(cli, unloadable, tmp_path, command, where):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- pass: rtn\n")
    args = [str(recipe) if a == "RECIPE" else str(tmp_path) if a == "ADAPTER" else a for a in command]
    (tmp_path / "file").write_text("x")
    (tmp_path / "exists").mkdir()
    out = {"under-a-file": tmp_path / "file" / "out", "exists": tmp_path / "exists",
           "read-only": Path("/proc/compress-out")}[where]
    if args[0] == "run":
        o = cli("run", args[1], unloadable, "--out", out)
    else:
        o = cli(args[0], unloadable, *args[1:], "--out", out)
    word = {"under-a-file": "is a file", "exists": "--force", "read-only": "not writable"}[where]
    refused(o, str(out) if where != "read-only" else "/proc", word)
    assert "exists" in [p.name for p in tmp_path.iterdir()]  # untouched


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_eval_output_is_checked_before_the_model_loads(cli, unloadable, tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "r.json" if where == "under-a-file" else tmp_path
    refused(cli("eval", unloadable, "--output", out, *EVAL), "cannot write")


@pytest.mark.parametrize("task,word", [("mc:{d}/none.jsonl", "not found"), ("text:{d}/none.txt", "not found"),
                                       ("mc:", "needs a file"), ("wikitext2:extra", "takes no argument"),
                                       ("mc:{d}/bad.jsonl", "bad.jsonl:2"), ("text:{d}/empty.txt", "empty")])
def test_eval_task_files_are_checked_before_the_model_loads(cli, unloadable, tmp_path, task, word):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops\n')
    (tmp_path / "empty.txt").write_text("  \n")
    refused(cli("eval", unloadable, "--task", task.format(d=tmp_path), *EVAL), word)


@pytest.mark.parametrize("option", [("--tolerance", "nan"), ("--tolerance", "-1"), ("--tolerance", "0"),
                                    ("--threads", "0")])
def test_export_options_are_checked_before_the_model_loads(cli, unloadable, tmp_path, option):
    o = cli("export", unloadable, "--format", "onnx", *option, "--out", tmp_path / "e")
    assert o.traceback is None and o.code == 2 and option[0] in o.err, o.text
    no_leftovers(tmp_path / "e")


def test_gate_junit_and_report_outputs_are_checked_first(cli, results, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(cli("gate", results["base"], "--baseline", results["base"], "--junit", tmp_path / "file" / "j.xml"),
            "cannot write", code=2)
    refused(cli("report", results["base"], "--plot", tmp_path / "file" / "p.png"), "cannot write")


def test_a_second_writer_to_the_same_out_is_refused_up_front(cli, tiny, tmp_path):
    from compress.outputs import claim_output

    out = tmp_path / "q"
    with claim_output(out):  # another process (here: this one) is writing `out`
        refused(cli("quantize", tiny, "--method", "rtn", "--out", out), "another compress process", str(out))
        assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))
    o = cli("quantize", tiny, "--method", "rtn", "--out", out)  # and once it is done, the lock is gone
    assert o.code == 0, o.text
    assert not [p for p in tmp_path.iterdir() if "lock" in p.name]


# -- 6. silent surprises become explicit ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (("quantize", "--method", "rtn", "--group-size", "7"), ("group size 7", "gcd(7, 64) = 1")),
    (("quantize", "--method", "gptq", "--group-size", "36"), ("group size 36", "= 4")),
    (("quantize", "--method", "rtn", "--group-size", "0"), ("group_size",)),
    (("quantize", "--method", "rtn", "--group-size", "-2"), ("group_size",)),
    (("quantize", "--target-bits", "99"), ("target_bits 99", "8 bits")),
    (("quantize", "--target-bits", "1"), ("target_bits 1",)),
    (("quantize", "--target-bits", "nan"), ("finite",)),
    (("quantize", "--bits", "8", "--activations", "int8", "--fallback-error", "inf"), ("finite",)),
    (("quantize", "--bits", "8", "--activations", "int8", "--smoothquant", "nan"), ("finite",)),
    (("prune", "--method", "magnitude", "--sparsity", "nan"), ("finite",)),
    (("merge-lora", "--adapter", "A", "--weights", "nan"), ("finite",)),
    (("merge-lora", "--adapter", "A", "--density", "inf"), ("finite",)),
    (("eval", "--seq-len", "512", "--windows", "1"), ("512 tokens", "256 positions")),
    (("distill", "--steps", "1", "--seq-len", "512"), ("seq_len 512", "256 positions")),
    (("eval", "--device", "cuda"), ("cuda",)),
    (("eval", "--device", "tpu:9"), ("tpu",)),
    (("eval", "--windows", "-5"), ("windows",)),
    (("eval", "--batch-size", "0"), ("batch_size",)),
    (("eval", "--threads", "0"), ("--threads",)),
])
def test_surprises_are_refused(cli, tiny, tmp_path, args, words):
    out = tmp_path / "o"
    args = [str(tmp_path) if a == "A" else a for a in args]
    o = cli(args[0], tiny, *args[1:], *(() if args[0] == "eval" else ("--out", out, "--calib-samples", "2",
                                                                      "--calib-seq-len", "32")))
    assert o.traceback is None and o.code in (1, 2), o.text
    assert "Traceback" not in o.text and "internal error" not in o.text
    for w in words:
        assert w.lower() in o.err.lower(), (w, o.err)
    no_leftovers(out)


def test_opt_eval_beyond_its_positions_is_refused_not_an_index_error(cli, model_dirs):
    refused(cli("eval", model_dirs["opt"], "--seq-len", "300", "--windows", "1"), "256 positions")
