"""ONNX artifact: a KV-cache decoder graph (or a masked-LM encoder's graph), our integer weights in
`MatMulNBits` nodes.

The graph is built from the modules directly, out of ONNX Runtime's fused
operators (`export.onnx_fused` for decoders, `export.onnx_encoder` for
BERT); architectures they cannot express are refused with the reason. How the artifact is written:

1. The model is saved as a compress artifact in a scratch directory and
   loaded back whole, so a model streamed from disk exports like any other.
2. Each quantized Linear becomes an ONNX Runtime `com.microsoft.MatMulNBits`
   node whose initializers hold *our* codes, scales and zero points, in
   MatMulNBits' layout: codes packed along K, low bits first, into uint8
   [N, n_blocks, block_size * bits / 8]; scales [N, n_blocks] in the graph's
   float type; zero points packed the same way per row (left out for
   symmetric schemes whose zero is MatMulNBits' default 2^(bits-1)).
   Nothing is re-quantized: (q - zero) * scale is the same number in both.
3. The result is run in ONNX Runtime on a few prompts and its logits are
   compared with the torch model's; beyond the tolerance the export fails
   and nothing is written. Then the directory appears atomically.

Layout mapping. MatMulNBits holds 2, 4 or 8 bits with a power-of-two block
size >= 16. Our 3-bit codes are stored as 4-bit codes (the same integers,
with their zero points written out). A group size that is not a power of
two is split into power-of-two blocks that repeat the group's scale (a
per-channel scheme too); a last group shorter than the others is
MatMulNBits' padded last block, whose padding the kernel ignores. A group
size with no power-of-two divisor >= 16 is refused.

Kernels. ONNX Runtime runs 4-bit blocks with fast kernels at any accuracy
level; 2- and 8-bit blocks only at `accuracy_level` 4 (activations
quantized to int8 per block on the fly), and otherwise dequantize the
whole weight on every call. The default is 0 (float activations: the
artifact's own numbers) for every width; on the reference model, level 4
moved the int8 artifact's logits by up to 3.0, so it is opt-in
(`accuracy_level=4`, with a `tolerance` to match).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import artifact
from compress.archs import require_lm_head
from compress.lazy import store_of
from compress.models import LoadedModel, load_model, save_model
from compress.registry import register_exporter
from export import VERIFY_PROMPTS, reference_logits
from export.matmulnbits import ORT_BITS, block_size_for

# W8A8 graphs quantize activations at run time: a float difference upstream (ONNX Runtime's fused
# norm and attention kernels against PyTorch's) can move a value across a rounding boundary, which
# changes that code by one step; the check allows for the logit change that causes. On a real model
# one such step can grow through the layers into logit changes of several units (the reference model's
# static W8A8 artifact moves by up to 3.0 when PyTorch itself is fed activations scaled by 1 +- 1e-6),
# so the tolerance is the larger of W8A8_TOLERANCE and W8A8_FLOOR_FACTOR x that measured noise floor.
W8A8_TOLERANCE = 0.25
W8A8_JITTER = 1e-6
W8A8_FLOOR_FACTOR = 2.0


def w8a8_noise_floor(lm: LoadedModel, refs: list | None = None) -> float:
    """Max |logit change| of `lm` in torch over the check prompts when the input of every W8A8 Linear is
    scaled by 1 + W8A8_JITTER and by 1 - W8A8_JITTER before it is rounded to int8: how far float noise of
    the size that separates two runtimes' kernels moves these logits through activation rounding.
    `refs`: `reference_logits(lm)` when the caller already has them."""
    from compress.quantize.w8a8linear import W8A8Linear

    mods = [m for m in lm.model.modules() if isinstance(m, W8A8Linear)]
    refs = refs if refs is not None else reference_logits(lm)
    worst = 0.0
    for sign in (1.0, -1.0):
        factor = 1.0 + sign * W8A8_JITTER
        hooks = [m.register_forward_pre_hook(lambda _m, args, f=factor: (args[0] * f, *args[1:])) for m in mods]
        try:
            for _, ids, ref in refs:
                with torch.inference_mode():
                    got = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
                worst = max(worst, float((got - ref).abs().max()))
        finally:
            for h in hooks:
                h.remove()
    return worst


@contextlib.contextmanager
def _float_config(lm: LoadedModel):
    """The model's config without its quantization_config while the body saves a plain float model."""
    cfg = lm.model.config
    qcfg = getattr(cfg, "quantization_config", None)
    if qcfg is not None:
        del cfg.quantization_config
    try:
        yield cfg
    finally:
        if qcfg is not None:
            cfg.quantization_config = qcfg


def _save_side_files(lm: LoadedModel, dest: Path) -> None:
    """config.json (float: no quantization_config), generation config and tokenizer beside the graph."""
    dest.mkdir(parents=True, exist_ok=True)
    with _float_config(lm) as cfg:
        cfg.save_pretrained(dest)
    if getattr(lm.model, "generation_config", None) is not None:
        lm.model.generation_config.save_pretrained(dest)
    lm.tokenizer.save_pretrained(dest)


def verify(onnx_dir: Path, lm: LoadedModel | None, *, threads: int | None = None, refs: list | None = None) -> float:
    """Max |logit difference| between ONNX Runtime on `onnx_dir` and `lm` in torch over VERIFY_PROMPTS (or the
    torch logits `refs` already computed: `reference_logits(lm)`)."""
    from eval.onnx_backend import OrtBackend

    ort_lm = OrtBackend(onnx_dir, threads=threads)
    worst = 0.0
    for _, ids, ref in refs if refs is not None else reference_logits(lm):
        got = ort_lm.session.run(["logits"], ort_lm._feeds(np.array([ids], np.int64)))[0][0]
        worst = max(worst, float(np.abs(got.astype(np.float32) - ref.numpy()).max()))
    return worst


def check_onnx_config(cfg: Any) -> None:
    """Refuse, from the config alone (before the model loads), a model no ONNX graph here can express."""
    from compress.archs import is_masked_lm
    from export.fused_arch import fused_config_supported
    from export.onnx_encoder import encoder_config_supported

    require_lm_head(cfg, "ONNX export (a graph computing logits)")
    why = (encoder_config_supported if is_masked_lm(cfg) else fused_config_supported)(cfg)
    if why is not None:
        raise ValueError(f"ONNX export does not support {why}")


@register_exporter("onnx", check_config=check_onnx_config)
def export_onnx(lm: LoadedModel, out: str | Path, *, recipe: list[dict[str, Any]] | None = None,
                reports: list[Any] = (), force: bool = False, accuracy_level: int = 0,
                tolerance: float | None = None, threads: int | None = None) -> Path:
    """ONNX Runtime directory: a KV-cache decoder graph with our integer weights as MatMulNBits nodes."""
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the check runs the graph)
    except ImportError as e:
        raise ValueError(f"the onnx exporter needs onnx and onnxruntime: pip install 'compress[onnx]' ({e})") \
            from None
    from compress.archs import is_masked_lm
    from export.onnx_encoder import build_encoder_graph, encoder_supported
    from export.onnx_fused import build_fused_graph, fused_supported

    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it")
    check_onnx_config(lm.model.config)  # before the scratch save; what only the modules show is checked below
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0-4, got {accuracy_level}")
    with tempfile.TemporaryDirectory(prefix="compress-onnx-") as tmp:
        work = Path(tmp)
        save_model(lm, work / "artifact", recipe=recipe, reports=reports)  # its provenance, in our own format
        # a model streamed from disk is read back whole; one in memory is used as it is (no second copy)
        full = load_model(work / "artifact") if store_of(lm.model) is not None else lm
        encoder = is_masked_lm(full.model.config)
        why = (encoder_supported if encoder else fused_supported)(full.model)
        if why is not None:
            raise ValueError(f"ONNX export does not support {why}")
        _check_layouts(full)
        from compress.quantize.w8a8linear import W8A8Linear

        w8a8 = sum(isinstance(m, W8A8Linear) for m in full.model.modules())
        refs = reference_logits(full)  # the torch logits, shared by the check and the noise floor
        floor = w8a8_noise_floor(full, refs) if w8a8 else None
        graph_file = work / "onnx" / "model.onnx"
        proto, used = (build_encoder_graph if encoder else build_fused_graph)(full.model, accuracy_level=accuracy_level)
        _save_side_files(full, work / "onnx")
        del full  # (a copy read back from disk is freed before ONNX Runtime loads the graph)
        big = proto.ByteSize() > 1.8 * 2**30  # protobuf's 2 GiB limit: weights go to a side file
        onnx.save(proto, str(graph_file), save_as_external_data=big, all_tensors_to_one_file=True,
                  location="model.onnx_data")
        del proto
        diff = verify(work / "onnx", None, threads=threads, refs=refs)
        if tolerance is not None:
            tol = tolerance
        elif accuracy_level == 4 and used:
            tol = 0.5
        elif w8a8:
            tol = max(W8A8_TOLERANCE, W8A8_FLOOR_FACTOR * floor)
        else:
            tol = 1e-2
        if not diff <= tol:
            why = (f"; the torch model itself moves by up to {floor:.3g} when its int8 inputs are scaled by "
                   f"1 +- {W8A8_JITTER:g}" if floor is not None else "")
            raise ValueError(f"ONNX export check failed: logits differ from the torch model by up to {diff:.3g} "
                             f"(tolerance {tol:g}{why}); nothing was written")
        prov = artifact.read_provenance(work / "artifact")
        prov["format_exported"] = {"format": "onnx", "graph": "fused encoder" if encoder else "fused",
                                   "op": "com.microsoft.MatMulNBits" if used else None,
                                   "matmulnbits_by_bits": {str(k): v for k, v in sorted(used.items())},
                                   "w8a8_matmuls": w8a8,
                                   "accuracy_level": accuracy_level, "verify_max_abs_logit_diff": diff,
                                   "verify_tolerance": tol, "verify_w8a8_noise_floor": floor,
                                   "verify_prompts": len(VERIFY_PROMPTS)}
        with artifact.atomic_dir(out, force=force) as dest:
            for f in (work / "onnx").iterdir():
                shutil.copy2(f, dest / f.name)
            artifact.write_json_atomic(dest / artifact.PROVENANCE_FILE, prov)
    return out


def _check_layouts(lm: LoadedModel) -> None:
    from compress.quantize.qlinear import QuantLinear

    for name, m in lm.model.named_modules():
        if isinstance(m, QuantLinear):
            if m.scheme.bits not in ORT_BITS:
                raise ValueError(f"{name}: {m.scheme.bits}-bit weights have no MatMulNBits layout")
            try:
                block_size_for(m.scheme.group_len(m.in_features))
            except ValueError as e:
                raise ValueError(f"{name} (in_features {m.in_features}): {e}") from None
