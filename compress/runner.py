"""The library calls behind the CLI commands: load -> passes -> export, and load -> eval."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

from calibrate.data import CalibConfig, load_calibration
from compress.data import read_source_text
from compress.lazy import store_of, trim_memory
from compress.models import LoadedModel, load_model
from compress.outputs import claim_output
from compress.pipeline import Progress, apply
from compress.plugins import load_plugins
from compress.recipe import Recipe
from compress.registry import EXPORTERS, TASKS
from eval.results import nonfinite

log = logging.getLogger(__name__)


def weights_bytes(path: str | Path) -> int:
    """Bytes of the weight files (safetensors / gguf / onnx) of a model directory or file."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.onnx", "*.onnx_data", "*.gguf") for f in p.glob(pat))


def compress_model(model: str | Path | None, recipe: Recipe, out: str | Path, *,
                   fmt: str = "safetensors", force: bool = False, allow_pickle: bool = False,
                   calib: CalibConfig | None = None, progress: Progress | None = None,
                   low_memory: bool = True) -> dict[str, Any]:
    """Load `model`, apply `recipe`, write the artifact to `out`; return a summary.

    With `low_memory` (the default) and a recipe of block-wise passes, a
    safetensors model is processed one decoder block at a time, its other
    weights left on disk; the result is the same as loading it whole.

    Calibration windows are drawn (per `calib`, default: 128 x 512 tokens of
    the WikiText-2 validation split) only when a step needs them.
    """
    load_plugins()
    exporter = EXPORTERS.get(fmt)  # fail on a bad format before loading anything
    # a path that cannot be written, or a second writer, fails now; in a distributed run only the process
    # that writes claims the output (the others train beside it)
    with claim_output(out, force=force) if main_process() else contextlib.nullcontext():
        return _compress(model, recipe, Path(out), exporter, fmt=fmt, force=force, allow_pickle=allow_pickle,
                         calib=calib, progress=progress, low_memory=low_memory)


def _compress(model, recipe: Recipe, out: Path, exporter, *, fmt: str, force: bool, allow_pickle: bool,
              calib: CalibConfig | None, progress: Progress | None, low_memory: bool) -> dict[str, Any]:
    calib = calib or CalibConfig()
    recipe = _bind_teacher(recipe, model)
    may_calib = any(s.spec.needs_calibration for s in recipe.steps)  # (a pass may need it only on some models)
    # read once, before the model loads, so a missing calibration file fails early
    text = read_source_text(calib.source) if may_calib or calib.source != "wikitext2" else None
    # passes that work block by block leave the weights on disk until they need them
    lazy = low_memory and all(s.spec.streams(s.config) for s in recipe.steps)
    check_exporter_config(exporter, model)
    lm = load_model(model, allow_pickle=allow_pickle, lazy=lazy)
    warn_requantizing(lm, recipe)
    store = store_of(lm.model)
    try:
        # what a config can check on the model (a group size that fits) fails before any work; only up to the
        # first step that cannot check itself, which may change the shapes the later ones see (pruning)
        for step in recipe.steps:
            check = getattr(step.config, "check_model", None)
            if check is None:
                break
            check(lm.model)
        needs_calib = recipe_calibrates(recipe, lm.model)
        if needs_calib:
            calib = _fit_positions(calib, lm.model)
        ids = load_calibration(lm.tokenizer, calib, text or read_source_text(calib.source)) if needs_calib else None
        trim_memory()  # tokenizing the calibration text leaves ~0.15 GB of freed heap behind
        reports = apply(lm.model, recipe, ids, progress=progress)
        written = main_process()
        if written:  # in a distributed run (accelerate launch) every process trains, one writes
            exporter.export(lm, out, recipe=recipe.to_list(), reports=reports, force=force)
    finally:
        if store is not None:
            store.close()
    return {
        "model": lm.source,
        "out": str(out),
        "format": fmt,
        "reports": [r.to_dict() for r in reports],
        "calibration": dataclasses.asdict(calib) if needs_calib else None,
        "bytes": weights_bytes(out) if written else 0,
        "written": written,
        "source_quantization": lm.source_quantization,
    }


def check_exporter_config(exporter, model: str | Path | None) -> None:
    """Refuse, from the model directory's config.json, before anything loads, a model the format cannot hold
    (`ExporterSpec.check_config`)."""
    if exporter.check_config is not None and model is not None and (Path(model) / "config.json").is_file():
        from compress.files import load_model_config

        exporter.check_config(load_model_config(model))


def recipe_calibrates(recipe: Recipe, model) -> bool:
    """Whether some step of `recipe` needs calibration data on `model`. A step that needs it only on some
    models (scale_tune: on a model with packed modules) is judged on the model as it is now, unless a
    quantizing step comes before it: then it will see packed modules and needs the data."""
    for i, s in enumerate(recipe.steps):
        if s.spec.calibrates(s.config, model):
            return True
        if callable(s.spec.needs_calibration) and any(t.name in QUANTIZING for t in recipe.steps[:i]):
            return True
    return False


QUANTIZING = ("rtn", "gptq", "block_tune", "awq", "mixed", "w8a8", "quantize_embeddings")  # built-in passes that round weights


def warn_requantizing(lm: LoadedModel, recipe: Recipe) -> None:
    """Say, before the work, that a quantizing recipe is about to round weights that were already rounded (a
    GGUF of quantized blocks, dequantized as it loaded): the artifact then carries two rounding errors, and
    comparisons with the source's own file mislead. The source's types also go into the artifact's provenance
    and the summary (`source_quantization`)."""
    q = lm.source_quantization
    if not q or not any(s.name in QUANTIZING for s in recipe.steps):
        return
    types = ", ".join(f"{t} x{n}" for t, n in sorted(q["tensor_types"].items(), key=lambda kv: -kv[1]))
    log.warning("%s: its weights were already quantized (%s %s: %s); they load as dequantized values, and "
                "quantizing them again rounds them a second time (start from the float checkpoint if you have it)",
                lm.source, q["format"].upper(), q["file"], types)


def main_process() -> bool:
    """False in the non-zero ranks of a distributed run (torch.distributed, or RANK set by a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# config fields naming a model that default (None) to the model the recipe started from: distill's teacher,
# scale_tune's reference
FROM_INPUT = ("teacher", "reference")


def _bind_teacher(recipe: Recipe, model: str | Path | None) -> Recipe:
    """A step with `teacher: None` (distill) or `reference: None` (scale_tune) learns from the model the recipe
    started from."""
    if model is None:
        return recipe  # the reference model, which None loads as well

    def bind(config):
        unset = {k: str(model) for k in FROM_INPUT if k in {f.name for f in dataclasses.fields(config)}
                 and getattr(config, k) is None}
        return dataclasses.replace(config, **unset) if unset else config

    return dataclasses.replace(recipe, steps=tuple(dataclasses.replace(s, config=bind(s.config))
                                                   for s in recipe.steps))


def _fit_positions(calib: CalibConfig, model: torch.nn.Module) -> CalibConfig:
    """Calibration windows no longer than the model's position table (a small model may have 256)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and calib.seq_len > limit:
        log.warning("calibration windows shortened from %d to the model's %d positions", calib.seq_len, limit)
        return dataclasses.replace(calib, seq_len=limit)
    return calib


def plan_tasks(tasks: list[str], options: dict[str, Any] | None = None) -> list[tuple[str, Any, str, Any]]:
    """Check eval tasks and their options before any model loads: [(label, spec, argument, config)].

    `options` is one flat dict of task options (windows, seq_len, shots,
    scoring, ...); each task takes the fields of its own config, None meaning
    the task's default. An option no task takes is an error.
    """
    load_plugins()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    runs = []
    used: set[str] = set()
    for t in tasks:
        name, _, arg = t.partition(":")
        spec = TASKS.get(name)
        cfg = None
        if spec.config is not None:
            names = {f.name for f in dataclasses.fields(spec.config)}
            mine = {k: v for k, v in options.items() if k in names}
            used |= mine.keys()
            params = list(inspect.signature(spec.run).parameters.values())
            default = params[1].default if len(params) > 1 else None
            cfg = (dataclasses.replace(default, **mine) if isinstance(default, spec.config)
                   else spec.config(**mine))
        takes_path = "path" in inspect.signature(spec.run).parameters
        if arg and not takes_path:
            raise ValueError(f"task {name} takes no argument (got {t!r})")
        if spec.check is not None and takes_path:
            spec.check(arg)  # its file exists and parses, before any model loads
        runs.append((t, spec, arg, cfg))
    unused = sorted(options.keys() - used - {"batch_size"})
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} apply to none of the tasks {', '.join(tasks)}")
    return runs


def evaluate(lm: LoadedModel, tasks: list[str], *, options: dict[str, Any] | None = None,
             device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """Run eval tasks ("wikitext2", "text:PATH", "mmlu", "arc_easy", "mc:PATH") on a loaded model.

    Options as in `plan_tasks`; `batch_size` also sets the multiple-choice batch. Returns {task: result}.
    """
    backend = torch_backend(lm, device=device, batch_size=(options or {}).get("batch_size"))
    return run_tasks(backend, tasks, options=options, progress=progress)


def run_tasks(backend, tasks: list[str], *, options: dict[str, Any] | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Run eval tasks on any scoring backend (`eval.backends.Backend`); returns {task: result}."""
    results = {}
    plan = plan_tasks(tasks, options)
    evaluating = getattr(backend, "evaluating", contextlib.nullcontext)
    with evaluating():
        for label, spec, arg, cfg in plan:
            kwargs: dict[str, Any] = {"progress": progress}
            if arg:
                kwargs["path"] = arg
            r = spec.run(backend, cfg, **kwargs) if cfg is not None else spec.run(backend, **kwargs)
            r["protocol"]["dtype"] = getattr(backend, "dtype", "float32")  # the numbers the model computes in
            bad = nonfinite(r)
            if bad:  # a NaN perplexity or log-probability is a broken model, never a score
                raise ValueError(f"{label}: the model produced a non-finite score ({bad}); no results written "
                                 "(NaN/inf weights, or activations that overflow in this dtype)")
            results[label] = r
    return results


EVAL_DTYPES = ("float32", "bfloat16", "float16")


BACKENDS = ("auto", "torch", "onnxruntime", "llama.cpp")


def open_for_eval(model: str | Path | None, *, allow_pickle: bool = False, device: str = "cpu",
                  batch_size: int | None = None, threads: int | None = None,
                  dtype: str = "float32", backend: str = "auto",
                  reference: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The scoring backend for what `model` is, and the identity of what it scores.

    `backend="auto"`: an .onnx file or a directory with model.onnx runs in ONNX
    Runtime (in the graph's own precision); a GGUF file or artifact runs in
    llama.cpp when llama-cpp-python is installed; anything else (model
    directory, compress artifact, a GGUF file without llama.cpp, None = the
    reference model) is loaded into torch in `dtype` (float32, bfloat16 or
    float16). Naming a backend forces it. `reference`: the float model an
    encoder without a head is compared with (`eval.embedding`; default: the
    model an artifact was made from).
    """
    from compress.models import gguf_file
    from eval import results
    from eval.onnx_backend import onnx_files, ort_backend_for

    if dtype not in EVAL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    is_onnx = model is not None and onnx_files(model) is not None
    is_gguf = model is not None and gguf_file(model) is not None
    if backend == "auto":
        from export.gguf import llama_cpp_available

        backend = ("onnxruntime" if is_onnx else "llama.cpp" if is_gguf and llama_cpp_available() else "torch")
    if backend != "torch" and dtype != "float32":
        raise ValueError(f"--dtype {dtype} applies to torch; {backend} runs the model in its own precision")
    if backend != "torch" and reference is not None:
        raise ValueError(f"--reference applies to encoders scored in torch, not to the {backend} backend")
    if backend == "onnxruntime":
        if not is_onnx:
            raise ValueError(f"{model}: the onnxruntime backend needs an .onnx file or a directory with model.onnx")
        ort_backend = ort_backend_for(model, threads=threads)
        return ort_backend, ort_backend.identity()
    if backend == "llama.cpp":
        if not is_gguf:
            raise ValueError(f"{model}: the llama.cpp backend needs a .gguf file or a GGUF artifact directory")
        from eval.llamacpp_backend import LlamaCppBackend

        ll = LlamaCppBackend(model, threads=threads)
        return ll, ll.identity()
    if is_onnx:
        raise ValueError(f"{model} is an ONNX model: torch cannot load it (use the onnxruntime backend)")
    lm = load_model(model, allow_pickle=allow_pickle, dtype=getattr(torch, dtype))
    tb = torch_backend(lm, device=device, batch_size=batch_size, reference=reference)
    return tb, results.model_identity(lm)


def torch_backend(lm: LoadedModel, *, device: str = "cpu", batch_size: int | None = None,
                  reference: str | Path | None = None):
    """The scoring backend of a model in torch: a causal LM's, a masked LM's pseudo-likelihood one, or for an
    encoder without a head the embedding-fidelity one, against `reference` (`eval.embedding.resolve_reference`)."""
    from compress.archs import is_bare_encoder, is_masked_lm

    if is_bare_encoder(lm.model.config):
        from eval.embedding import EmbeddingBackend, resolve_reference

        return EmbeddingBackend(lm.model, lm.tokenizer, reference=resolve_reference(lm, reference), device=device,
                                batch_size=batch_size)
    if reference is not None:
        raise ValueError(f"--reference applies to encoders without a masked-LM head (scored by embedding_cosine); "
                         f"{type(lm.model).__name__} is scored by its own token probabilities")
    if is_masked_lm(lm.model.config):
        from eval.masked import MaskedLMBackend

        return MaskedLMBackend(lm.model, lm.tokenizer, device=device, batch_size=batch_size)
    from eval.backends import TorchBackend

    return TorchBackend(lm.model, lm.tokenizer, device=device, batch_size=batch_size)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
