"""Scale tuning: refit the per-group scales of packed modules so the model's outputs match a float reference.

After a module is (re-)quantized its integer codes are fixed, but each group's
scale is a free float that rounding-based methods (RTN, GPTQ) only ever set
from the weights. Following the end-to-end step of EfficientQAT (Chen et al.,
"EfficientQAT: Efficient Quantization-Aware Training for Large Language
Models", 2024, https://arxiv.org/abs/2407.11062, "E2E-QP": train only the
quantization parameters, codes frozen), the scales are trained with AdamW, but
against a reference model instead of labels, like `kd`'s teacher: the loss is
the forward KL from the reference's next-token distribution to the packed
model's, on the calibration windows. The codes, zero points and every other
weight stay as they are, so the result is the same artifact format with new
scale values (stored in the scheme's scale dtype).

The reference is the model the recipe started from (or `reference`), with the
LoRA merges the packed model records since then applied to it in float: what
the model would be without quantization error (after a `lora_merge` into a
packed artifact, the exact float merge). The modules tuned are the packed ones
whose counterpart in the reference is float (one that is packed there too has
no error of its own to fit).

Scales are trained in log space (s = s0 * exp(u), u from 0), so one learning
rate suits layers whose scales differ by orders of magnitude. A held-out share
of the calibration windows is scored before and after; when tuning did not
lower the held-out KL the original scales are put back.

Memory: the whole model trains at once, so what autograd keeps decides the
peak. Each decoder block is checkpointed (only its input is kept; its
activations are recomputed in the backward pass, one block at a time), and
the loss is computed over `loss_chunk` positions at a time from the final
hidden states, each chunk's vocabulary-wide logits recomputed in the backward
pass too (a 49,152-token vocabulary makes a batch's logits and their softmax
the largest tensors of all), and the many-MiB tensors that recomputation
allocates and frees are mapped one by one rather than left as heap holes
(`calibrate.streaming.large_allocations_mapped`). On the reference model
(RTN W4, 4 steps) the peak RSS goes from 9.03 GB to 2.73 GB, tuning time
from 241 s to 270 s (bench/results/scale_tune_memory.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from calibrate.blocks import decoder_blocks, forwards_replaced
from calibrate.forward import native_bf16
from calibrate.streaming import large_allocations_mapped
from compress import targets as tg
from compress.archs import require_lm_head
from compress.checks import check_fields
from compress.distill.losses import logit_divergence
from compress.pipeline import PassReport, Progress, recipe_history
from compress.quantize.qlinear import QuantLinear, dequantized_once
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ScaleTuneConfig(tg.Selection):
    steps: int = 64  # optimizer steps
    batch_size: int = 4  # calibration windows per step
    lr: float = 2e-3  # AdamW learning rate of the log-scales (cosine decay to 0 after a 10 % warm-up)
    heldout: float = 0.125  # share of the calibration windows kept out of training to score the result
    forward_dtype: str = "auto"  # "auto": bf16 autocast where the hardware has native bf16, else float32
    reference: str | None = None  # model dir or .gguf to match; None: the model the recipe started from
    targets: tuple[str, ...] = ("QuantLinear",)  # the packed modules that may be tuned
    ignore: tuple[str, ...] = ()
    loss_chunk: int = 128  # positions whose logits are computed at once (0: the whole window, no checkpointing)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        check_fields(self, positive=("steps", "batch_size", "lr"), share=("heldout",),
                     choices={"forward_dtype": ("auto", "float32", "bfloat16")})


class TunedScales(nn.Module):
    """A QuantLinear's forward with its scales as trainable log-offsets: W = s0 exp(u) (codes - zero)."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        g = q.scheme.group_len(q.in_features)
        self.group, self.in_features, self.out_features = g, q.in_features, q.out_features
        zero = q.zero_point().repeat_interleave(g, dim=1)[:, : q.in_features]
        # (out, in) codes minus zero point: integers within +-255, exact in bfloat16 (half of float32's memory)
        self.register_buffer("centered", (q.codes().float() - zero).to(torch.bfloat16))
        self.register_buffer("scale0", q.weight_scale.float().clone())  # (out, n_groups)
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale0))
        self.bias = q.bias

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.log_gain.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale().repeat_interleave(self.group, dim=1)[:, : self.in_features]
        return F.linear(x, (s * self.centered.float()).to(x.dtype), self.bias)

    @torch.no_grad()
    def round_to(self, dtype: torch.dtype) -> None:
        """Fold the trained gain into the base scales, rounded to the dtype they are stored in."""
        self.scale0.copy_(self.scale().to(dtype).float())
        self.log_gain.zero_()


def tune_scales(model: nn.Module, reference: nn.Module, names: list[str], calib: torch.Tensor,
                cfg: ScaleTuneConfig, *, progress: Progress | None = None) -> dict[str, float]:
    """Tune the scales of `model`'s packed modules `names`, in place, so that its next-token distributions match
    `reference`'s on calibration windows `calib` (windows, seq_len). Returns the held-out KL before and after,
    and whether the result was kept."""
    if calib is None or calib.ndim != 2 or calib.shape[0] < 2:
        raise ValueError("scale tuning needs at least 2 calibration windows (a (windows, seq_len) tensor)")
    packed = {n: model.get_submodule(n) for n in names}
    for n, q in packed.items():
        if not isinstance(q, QuantLinear):
            raise ValueError(f"scale tuning: {n} is not a packed (QuantLinear) module")
    device = next(iter(packed.values())).weight_packed.device
    n_held = max(1, round(calib.shape[0] * cfg.heldout))
    train_ids, held_ids = calib[:-n_held], calib[-n_held:]
    bf16 = cfg.forward_dtype == "bfloat16" or (cfg.forward_dtype == "auto" and native_bf16(device.type))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    tuned = {n: TunedScales(q) for n, q in packed.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def use(mods: dict[str, nn.Module]) -> None:
        for n, m in mods.items():
            tg.set_submodule(model, n, m)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    chunked = cfg.loss_chunk > 0 and head_last(model) and head_last(reference)

    def divergence(ids: torch.Tensor) -> torch.Tensor:
        """KL from the reference's next-token distributions to the model's on windows `ids` (autocast by the caller)."""
        if not chunked:
            return logit_divergence(logits(ids), reference_logits(ids))
        with torch.no_grad():
            t_hidden = final_hidden(reference, ids.to(device))
        with checkpointed_blocks(model):
            hidden = final_hidden(model, ids.to(device))
        return chunked_divergence(model.get_output_embeddings(), reference.get_output_embeddings(), hidden,
                                  t_hidden, cfg.loss_chunk)

    @torch.no_grad()
    def reference_logits(ids: torch.Tensor) -> torch.Tensor:
        with autocast:
            return reference(input_ids=ids.to(device), use_cache=False).logits

    @torch.no_grad()
    def heldout_kl() -> float:
        total = 0.0
        for a in range(0, held_ids.shape[0], cfg.batch_size):
            ids = held_ids[a:a + cfg.batch_size]
            with autocast:
                total += float(divergence(ids)) * ids.shape[0]
        return total / held_ids.shape[0]

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    reference.eval()
    use(tuned)
    try:  # the packed modules not tuned, in both models: unpacked once, not per forward
        with dequantized_once(model), dequantized_once(reference), large_allocations_mapped():
            before = heldout_kl()
            params = [m.log_gain for m in tuned.values()]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            warm = max(1, cfg.steps // 10)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(
                math.pi * max(0, i + 1 - warm) / max(1, cfg.steps - warm)))))
            order = torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(0))
            for step in range(cfg.steps):
                at = (step * cfg.batch_size) % train_ids.shape[0]
                idx = order[torch.arange(at, at + cfg.batch_size) % train_ids.shape[0]]
                ids = train_ids[idx]
                with torch.enable_grad(), autocast:
                    loss = divergence(ids)
                    loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if progress:
                    progress("scale tuning", step + 1, cfg.steps)
                log.debug("scale tuning step %d/%d: KL %.5f", step + 1, cfg.steps, float(loss.detach()))
            for n, m in tuned.items():  # scored as it will be stored
                m.round_to(packed[n].weight_scale.dtype)
            after = heldout_kl()
    finally:
        use(packed)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    kept = after < before
    if kept:
        with torch.no_grad():
            for n, q in packed.items():
                q.weight_scale.copy_(tuned[n].scale0.to(q.weight_scale.dtype))
    log.info("scale tuning: held-out KL to the float reference %.5f -> %.5f (%s), %d modules, %.0f s",
             before, after, "kept" if kept else "not lower: original scales kept", len(packed),
             time.perf_counter() - t0)
    return {"kl_before": before, "kl_after": after if kept else before, "kl_tuned": after, "kept": float(kept),
            "seconds": time.perf_counter() - t0}


# config fields of models whose logits are not the output layer's output (Gemma 2's soft cap, Cohere's scale)
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def head_last(model: nn.Module) -> bool:
    """Whether the model's logits are its output layer's output, unchanged (so they can be computed in chunks)."""
    cfg = getattr(model, "config", None)
    return model.get_output_embeddings() is not None and not any(
        getattr(cfg, k, None) not in (None, 1.0) for k in LOGIT_POSTPROCESSING)


class _Captured(Exception):
    """Raised by the output layer's stand-in once it has the final hidden states."""


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the model's output layer reads (after the final norm), without computing the logits."""
    head = model.get_output_embeddings()
    got: list[torch.Tensor] = []

    def grab(mod, args):
        got.append(args[0])
        raise _Captured

    handle = head.register_forward_pre_hook(grab)
    try:
        model(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(model).__name__} never called its output layer")
    return got[0]


def chunked_divergence(head: nn.Module, reference_head: nn.Module, hidden: torch.Tensor, reference_hidden: torch.Tensor,
                       chunk: int) -> torch.Tensor:
    """`logit_divergence(head(hidden), reference_head(reference_hidden))`, `chunk` positions at a time, each chunk's
    logits recomputed in the backward pass instead of kept (one chunk's logits in memory at once)."""
    n = hidden.shape[-2]

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = reference_head(t)
        return logit_divergence(head(h), t_logits) * (h.shape[-2] / n)

    return sum(checkpoint(part, hidden[..., a:a + chunk, :], reference_hidden[..., a:a + chunk, :],
                          use_reentrant=False) for a in range(0, n, chunk))


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, each decoder block keeps only its inputs for the backward pass and recomputes its
    activations there (activation checkpointing): one block's activations in memory instead of all of them."""
    _, blocks = decoder_blocks(model)
    with forwards_replaced(blocks, lambda j, blk: functools.partial(checkpoint, blk.forward, use_reentrant=False)):
        yield


def _tunable(model: nn.Module, cfg: ScaleTuneConfig) -> dict[str, nn.Module]:
    """The packed modules the selection names (none on a model without packed modules)."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return {}
    return tg.select(model, cfg.targets, cfg.ignore, kinds=(QuantLinear,))


def load_reference(model: nn.Module, cfg: ScaleTuneConfig) -> nn.Module:
    """The float model `model` approximates: `cfg.reference` (None: the reference model; the runner binds the
    recipe's input model), with the LoRA merges `model` records beyond the reference's own history applied in
    float (`compress.lora.merge.merge_in_float`)."""
    from compress.lora.merge import LoraMergeConfig, merge_in_float
    from compress.models import load_model

    reference = load_model(cfg.reference).model
    done = len(recipe_history(reference))
    for step in recipe_history(model)[done:]:
        if step.get("pass") == "lora_merge":
            fields = {f.name for f in dataclasses.fields(LoraMergeConfig)}
            merge_in_float(reference, LoraMergeConfig(**{k: v for k, v in step.items() if k in fields}))
    return reference


@register_pass("scale_tune", ScaleTuneConfig, needs_calibration=lambda cfg, model: bool(_tunable(model, cfg)))
def run(model: nn.Module, cfg: ScaleTuneConfig, calib: torch.Tensor | None, *,
        progress: Progress | None = None) -> PassReport:
    """Train the group scales of the packed modules so the model's outputs match its float reference."""
    selected = _tunable(model, cfg)
    if not selected:
        log.info("scale_tune: no packed module to tune")
        return PassReport(name="scale_tune", modules=0)
    require_lm_head(model.config, "scale_tune (it matches the reference's logits)")
    reference = load_reference(model, cfg)
    in_reference = dict(reference.named_modules())
    missing = [n for n in selected if n not in in_reference]
    if missing:
        raise ValueError(f"scale_tune: the reference model has no module {missing[0]} (a reference must have the "
                         "tuned model's module names)")
    names = [n for n in selected if not isinstance(in_reference[n], QuantLinear)]
    if not names:
        log.info("scale_tune: every selected module is packed in the reference too: nothing to tune")
        return PassReport(name="scale_tune", modules=0)
    reference.to(next(iter(selected.values())).weight_packed.device)
    metrics = tune_scales(model, reference, names, calib, cfg, progress=progress)
    return PassReport(name="scale_tune", modules=len(names), metrics=metrics)
