"""Block reconstruction: tune each block's rounding and clipping so the block's output matches the float block's.

Following AutoRound (Cheng, Zhang, Shen, Meng, Guo, Liu, Lu, "Optimize Weight
Rounding via Signed Gradient Descent for the Quantization of LLMs", 2023,
https://arxiv.org/abs/2309.05516), every quantized Linear of a decoder block
gets a learnable rounding offset v in [-0.5, 0.5] per weight and a learnable
shrink factor of its group's range in [0.5, 1]:

    codes = clamp(round(W / s + v) + z, 0, 2^bits - 1),   W_q = s (codes - z)

with rounding passed straight through in the backward pass. The offsets and
factors of the whole block are trained together by signed gradient descent
(p -= lr * sign(grad), the learning rate decaying linearly to 0), minimising
the mean squared error between the quantized block's output on the quantized
model's activations and the float block's output on the float model's
activations (AutoRound's default, so each block also corrects what the blocks
before it got wrong). Two activation streams therefore run through the walk:
the quantized one the walk keeps, and the float one kept here.

Where AutoRound starts from round-to-nearest, `init: gptq` starts from GPTQ:
W is then the weights GPTQ rounded (its error-compensated weights) and v = 0
reproduces GPTQ's codes, so tuning begins from GPTQ's solution rather than
RTN's (`init: rtn` is AutoRound's start). Each block's loss on all calibration
batches is measured before and after; a block whose tuned loss is not lower
keeps its starting codes. Scales are trained in float32 but rounded, straight
through, to the scheme's scale dtype in every forward: what is trained is what
is stored. The result is the same packed format as RTN/GPTQ (`QuantLinear`).

Memory: the block being tuned (streamed from disk for a lazily loaded model,
like GPTQ), the two activation streams and one batch's autograd state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calibrate.blocks import BlockInputs, _first, forward_batch, run_block
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import about, check_fields
from compress.pipeline import PassReport, Progress
from compress.prune.sparsity import pruned_modules
from compress.quantize.gptq import GPTQConfig
from compress.quantize.gptq import quantize_weight as gptq_weight
from compress.quantize.grid import dequantize, grouped, qparams
from compress.quantize.qlinear import PendingSwaps
from compress.quantize.scheme import QuantScheme
from compress.registry import register_pass

log = logging.getLogger(__name__)

INITS = ("rtn", "gptq")
MIN_SHRINK = 0.5  # the smallest range factor (AWQ's clipping search goes as far)


@dataclass(frozen=True, kw_only=True)
class BlockTuneConfig(GPTQConfig):
    """GPTQ's fields (used by `init: gptq`) plus the tuning's own."""

    # signed-gradient steps per block, each on one calibration batch: AutoRound's light setting (its default is 200);
    # W4 g128 sym on the reference model: 27.34 in 28 min on 2 cores (bench/results/block_tune.json)
    iters: int = 50
    lr: float | None = None  # None: 1 / iters (AutoRound's default)
    # the codes tuning starts from: "rtn" (AutoRound's start) or "gptq"; on the reference model's first blocks RTN's
    # start tunes to the lower block error (W4 g128: 0.043 vs 0.046, W3 g64 asym: 0.104 vs 0.112, 50 iterations)
    init: str = "rtn"
    clip: bool = True  # also tune each group's range (AutoRound's min/max scale); False: rounding offsets only
    seed: int = 0  # order of the calibration batches

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("iters",), choices={"init": INITS})
        if self.lr is not None and not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"lr must be a positive number, got {self.lr}")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


class TunedRounding(nn.Module):
    """A Linear whose weight is `base` on `scheme`'s grid with learnable rounding offsets and range factors.

    `scale0`, `zero0` (out, n_groups) are the starting grid; with every offset 0 and every factor 1 the
    weight is exactly `s0 (clamp(round(base / s0) + z0) - z0)`, the starting codes.
    """

    def __init__(self, base: torch.Tensor, scale0: torch.Tensor, zero0: torch.Tensor, scheme: QuantScheme, *,
                 bias: torch.Tensor | None, keep_zero: torch.Tensor | None, clip: bool) -> None:
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, base.shape[1], base.shape[0]
        self.register_buffer("base", grouped(base.detach().float(), scheme))  # (out, ng, g), zero-padded
        self.register_buffer("scale0", scale0.detach().float().clone())
        self.register_buffer("zero0", zero0.detach().float().clone())
        mask = grouped(keep_zero.float(), scheme).bool() if keep_zero is not None else None
        self.register_buffer("keep_zero", mask)
        self.bias = bias
        self.v = nn.Parameter(torch.zeros_like(self.base))
        n_factors = 0 if not clip else (1 if scheme.symmetric else 2)  # sym: |max|; asym: min and max
        self.factors = nn.Parameter(torch.ones(n_factors, *self.scale0.shape)) if n_factors else None

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (rounded to the stored dtype, straight through) and zero point, (out, n_groups) each."""
        s0, z0, qmax = self.scale0, self.zero0, self.scheme.qmax
        if self.factors is None:
            s, z = s0, z0
        elif self.scheme.symmetric:
            s, z = s0 * self.factors[0], z0
        else:  # the range [lo, hi] = [-z0 s0, (qmax - z0) s0], each end shrunk by its own factor
            lo, hi = -z0 * s0 * self.factors[0], (qmax - z0) * s0 * self.factors[1]
            s = (hi - lo) / qmax
            s = s.clamp(min=torch.finfo(self.scheme.torch_scale_dtype).tiny)
            z = _round_ste(-lo / s).clamp(0, qmax)
        stored = s.to(self.scheme.torch_scale_dtype).float()
        return s + (stored - s).detach(), z

    def codes_grouped(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = (_round_ste(self.base / s[..., None] + self.v) + z[..., None]).clamp(0, self.scheme.qmax)
        if self.keep_zero is not None:
            q = torch.where(self.keep_zero, z[..., None].expand_as(q), q)  # a pruned weight stays exactly zero
        return q

    def weight(self) -> torch.Tensor:
        s, z = self.grid()
        w = (self.codes_grouped(s, z) - z[..., None]) * s[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-gradient step, then the offsets and factors clamped to their ranges."""
        if self.v.grad is None:  # not on this batch's path (an expert the router sent no token to)
            return
        self.v.sub_(lr * self.v.grad.sign()).clamp_(-0.5, 0.5)
        if self.factors is not None:
            self.factors.sub_(lr * self.factors.grad.sign()).clamp_(MIN_SHRINK, 1.0)

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    @torch.no_grad()
    def load(self, state: list[torch.Tensor]) -> None:
        for p, t in zip(self.parameters(), state, strict=True):
            p.copy_(t)

    @torch.no_grad()
    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes int32 (out, in), scale, zero (out, n_groups)) as they will be stored."""
        s, z = self.grid()
        q = self.codes_grouped(s, z).reshape(self.out_features, -1)[:, : self.in_features]
        return q.to(torch.int32), s, z


def _block_loss(block: nn.Module, inputs: BlockInputs, targets: list[torch.Tensor], dtype) -> list[float]:
    """The mean squared error of the block's output against `targets`, per calibration batch."""
    with torch.no_grad():
        return [float(F.mse_loss(_first(forward_batch(block, inputs, i, dtype)).float(), targets[i].float()))
                for i in range(len(targets))]


class _Streams:
    """The float model's activations, walked alongside the quantized model's (None while they are equal)."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] | None = None
        self.last: Block | None = None  # the block visited last: its inputs' kwargs are the current block's

    @torch.no_grad()
    def targets(self, block: Block) -> list[torch.Tensor]:
        """The float block's outputs on the float activations, which become the float activations."""
        if self.hidden is None:  # nothing quantized yet: the float activations are the walk's
            self.hidden = [h.clone() for h in block.inputs.hidden]
        self.last = block
        run_block(block.module, BlockInputs(self.hidden, block.inputs.kwargs), dtype=block.dtype)
        return self.hidden

    def skip(self, module: nn.Module) -> None:
        """A block the pass does not quantize: the float activations go through it too (in the walk's dtype)."""
        if self.hidden is not None:
            run_block(module, BlockInputs(self.hidden, self.last.inputs.kwargs), dtype=self.last.dtype)


def _start(block: Block, cfg: BlockTuneConfig, sparse: set[str]) -> dict[str, tuple]:
    """The starting grid of each selected Linear: name -> (base weights, scale, zero, pruned mask).

    RTN: the weights and their grid. GPTQ: stage by stage on the quantized stream's Hessians, each stage's
    Linears then holding their GPTQ weights for the next stage's statistics (as in `gptq`).
    """
    scheme = cfg.scheme
    start: dict[str, tuple] = {}
    if cfg.init == "rtn":
        for n, lin in block.modules.items():
            keep = (lin.weight == 0) if block.name(n) in sparse else None
            with about(block.name(n)):
                scale, zero = qparams(lin.weight.detach().float(), scheme)
            start[n] = (lin.weight.detach().float().clone(), scale, zero, keep)
        return start
    for n, H in block.hessians(sequential=cfg.true_sequential):
        lin = block.modules[n]
        keep = (lin.weight == 0) if block.name(n) in sparse else None
        updated = torch.empty(lin.weight.shape)
        with about(block.name(n)):
            q, scale, zero, _ = gptq_weight(lin.weight, H, scheme, block_size=cfg.block_size,
                                            dampening=cfg.dampening, act_order=cfg.act_order, zeros=keep,
                                            updated=updated)
        del H
        start[n] = (updated, scale, zero, keep)
        with torch.no_grad():  # the stage's output as quantized, for the next stage's Hessians
            lin.weight.copy_(dequantize(q, scale, zero, scheme).to(lin.weight.dtype))
    return start


def tune_block(block: Block, targets: list[torch.Tensor], start: dict[str, tuple], cfg: BlockTuneConfig
               ) -> tuple[dict[str, TunedRounding], dict[str, float]]:
    """Train the block's rounding (in place of its selected Linears while training); return the tuned modules,
    set to the better of their start and their tuned state, and the block's loss before and after."""
    scheme = cfg.scheme
    tuned = {n: TunedRounding(base, scale, zero, scheme, bias=block.modules[n].bias, keep_zero=keep, clip=cfg.clip)
             for n, (base, scale, zero, keep) in start.items()}
    frozen = [p for p in block.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for n, m in tuned.items():
        tg.set_submodule(block.module, n, m)
    inputs, dtype = block.inputs, block.dtype
    try:
        before = _block_loss(block.module, inputs, targets, dtype)
        initial = [m.state() for m in tuned.values()]
        best, best_ratio = initial, 1.0
        gen = torch.Generator().manual_seed(cfg.seed + block.index)
        order: list[int] = []
        lr0 = cfg.step_size
        for it in range(cfg.iters):
            if not order:
                order = torch.randperm(len(targets), generator=gen).tolist()
            i = order.pop()
            with torch.enable_grad():
                out = _first(forward_batch(block.module, inputs, i, dtype)).float()
                loss = F.mse_loss(out, targets[i].float())
                loss.backward()
            ratio = float(loss.detach()) / max(before[i], 1e-30)  # the batch's loss relative to its start
            if ratio < best_ratio:  # (the state this loss was computed with, before the step)
                best, best_ratio = [m.state() for m in tuned.values()], ratio
            lr = lr0 * (1.0 - it / cfg.iters)  # linear decay
            for m in tuned.values():
                m.step(lr)
                m.zero_grad(set_to_none=True)
        for m, st in zip(tuned.values(), best, strict=True):
            m.load(st)
        after = _block_loss(block.module, inputs, targets, dtype)
        if sum(after) >= sum(before):  # tuning did not help on all the batches: the starting codes
            for m, st in zip(tuned.values(), initial, strict=True):
                m.load(st)
            after = before
    finally:
        for n, lin in block.modules.items():
            tg.set_submodule(block.module, n, lin)
        for p in frozen:
            p.requires_grad_(True)
    return tuned, {"loss_before": sum(before) / len(before), "loss_after": sum(after) / len(after)}


@register_pass("block_tune", BlockTuneConfig, needs_calibration=True, streams_blocks=True)
def run(model: nn.Module, cfg: BlockTuneConfig, calib: torch.Tensor, *,
        progress: Progress | None = None) -> PassReport:
    """Quantize selected Linears block by block, tuning rounding and clipping to match the float blocks."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    sparse = pruned_modules(model)
    scheme = cfg.scheme
    pending = PendingSwaps()
    streams = _Streams()
    totals = {"bits": 0, "weights": 0, "before": 0.0, "after": 0.0, "blocks": 0, "improved": 0}
    visited: set[int] = set()
    t0 = time.perf_counter()

    def visit(block: Block) -> None:
        visited.add(id(block.module))
        targets = streams.targets(block)  # before any weight of the block changes
        start = _start(block, cfg, sparse)
        tuned, losses = tune_block(block, targets, start, cfg)
        for n, m in tuned.items():
            q, s, z = m.result()
            pending.add(n, block.modules[n], q, s, z, scheme)  # the Linear now holds the dequantized weights
            totals["weights"] += q.numel()
        run_block(block.module, block.inputs, dtype=block.dtype)  # the quantized activations, for the next block
        block.ran = True
        totals["blocks"] += 1
        totals["before"] += losses["loss_before"]
        totals["after"] += losses["loss_after"]
        totals["improved"] += losses["loss_after"] < losses["loss_before"]
        log.info("block_tune %s: output MSE %.4g -> %.4g", block.prefix.rstrip("."), losses["loss_before"],
                 losses["loss_after"])

    def after(module: nn.Module) -> None:
        if id(module) not in visited:
            streams.skip(module)
        totals["bits"] += pending.commit(module)

    walk(model, selected, calib, visit, label="block_tune", batch_size=cfg.batch_size,
         forward_dtype=cfg.forward_dtype, progress=progress, after=after, min_expert_tokens=cfg.min_expert_tokens)
    n = max(totals["blocks"], 1)
    log.info("block_tune: %d modules in %d blocks (%d improved on their start), %.0f s", len(selected),
             totals["blocks"], totals["improved"], time.perf_counter() - t0)
    return PassReport(name="block_tune", modules=len(selected), metrics={
        "bits_per_weight": totals["bits"] / max(totals["weights"], 1),
        "block_mse_before": totals["before"] / n, "block_mse_after": totals["after"] / n,
        "blocks_improved": float(totals["improved"])})
