"""Mixture-of-experts layers with one Linear per expert projection, so calibration reaches every expert.

transformers 5 keeps a MoE layer's experts in fused 3-D tensors (Qwen3-MoE, Mixtral: `gate_up_proj`
(experts, 2 * inter, hidden) and `down_proj` (experts, hidden, inter)) and merges the checkpoints'
per-expert tensors into them as it loads. `unfuse_experts(model)` replaces each such module by `Experts`: a
ModuleList of per-expert MLPs whose Linears carry the checkpoint's own per-expert names (read from
transformers' conversion mapping: Qwen-MoE `gate_proj`/`up_proj`/`down_proj`, Mixtral `w1`/`w3`/`w2`), with
the same forward. Every pass then sees an expert's projections as ordinary Linears, a hook on one sees exactly
the tokens the router sent to that expert, and what we save loads in transformers as its own checkpoint.
The router stays what it was (a float module that no "Linear" target selects).

An expert that calibration rarely reaches would be calibrated on a handful of tokens (a rank-deficient
Hessian, a noisy activation range): `count_routes` counts the routed tokens of every expert of a block
before a pass observes it, and an expert below `min_tokens` is calibrated on every token that reaches the
layer instead, as if the router had chosen it for all of them (its output still uses only its routed
tokens). `routing_report` hands the counts and those experts to the pass's report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears named as in the checkpoint."""

    def __init__(self, hidden: int, inter: int, act: nn.Module, names: tuple[str, str, str] = DEFAULT_NAMES,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.names = names
        self.act_fn = act
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden)), strict=True):
            setattr(self, name, nn.Linear(i, o, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """Drop-in for transformers 5's fused experts: forward(hidden (tokens, hidden), top_k_index (tokens, k),
    top_k_weights (tokens, k)) -> (tokens, hidden), the sum of each token's chosen experts by their weights.

    Every expert is called on every forward, an expert without tokens on an empty batch, so the calibration
    walk finds each expert's stages on the first batch whatever the router did there.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.counts: torch.Tensor | None = None  # (experts,) routed tokens, while `count_routes` counts
        self.on_all_tokens: frozenset[int] = frozenset()  # experts calibrated on every token (too few routed)
        self.routed: list[int] | None = None  # the last count, for the pass's report

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)  # (experts, k, tokens)
        for e, expert in enumerate(self):
            slot, tokens = torch.where(mask[e])  # (routed,) each: which of the token's k choices, which token
            if self.counts is not None:
                self.counts[e] += tokens.numel()
            if e in self.on_all_tokens:  # calibration: the expert sees every token, keeps its own
                y = expert(hidden)[tokens]
            else:
                y = expert(hidden[tokens])
            y = y * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _expert_names(model: nn.Module) -> tuple[str, str, str] | None:
    """The per-expert projection names of the checkpoints transformers fuses as it loads `model`, from its
    conversion mapping (source '...experts.*.w1.weight' -> target '...experts.gate_up_proj'); None if none."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    found: dict[str, list[str]] = {}
    for t in get_model_conversion_mapping(model, add_legacy=False):
        if isinstance(t, WeightConverter) and len(t.target_patterns) == 1:
            target = t.target_patterns[0].rpartition(".")[2]
            found[target] = [s.rpartition(".*.")[2].removesuffix(".weight") for s in t.source_patterns]
    if len(found.get("gate_up_proj", ())) == 2 and len(found.get("down_proj", ())) == 1:
        return (*found["gate_up_proj"], found["down_proj"][0])
    return None


def fused_experts(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """name -> every module outside `kinds` holding fused 3-D weights (transformers 5's MoE experts)."""
    return {n: m for n, m in model.named_modules()
            if not isinstance(m, kinds) and any(p.dim() > 2 for p in m.parameters(recurse=False))}


def unfuse_experts(model: nn.Module, *, copy_weights: bool = True) -> int:
    """Replace every fused experts module of `model` by `Experts` (in place); the number replaced. Layouts
    other than transformers' standard one (concatenated gate;up, no bias, not transposed) stay fused, for
    `compress.targets` to refuse with their reason. Without `copy_weights` the new Linears are left
    uninitialised (a skeleton that a state dict fills next)."""
    fused = fused_experts(model)
    names = _expert_names(model) if fused else None
    done = 0
    for name, m in fused.items():
        layout = (getattr(m, "has_gate", None), getattr(m, "has_bias", None), getattr(m, "is_transposed", None),
                  getattr(m, "is_concatenated", None), getattr(m, "has_post_expert_norm", False))
        gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if names is None or layout != (True, False, False, True, False) or gu is None or down is None:
            continue
        n_exp, two_inter, hidden = gu.shape  # (experts, 2 * inter, hidden)
        inter = two_inter // 2
        experts = []
        for e in range(n_exp):
            ex = ExpertMLP(hidden, inter, m.act_fn, names, device=gu.device, dtype=gu.dtype)
            if copy_weights:
                with torch.no_grad():
                    getattr(ex, names[0]).weight.copy_(gu[e, :inter])  # (inter, hidden)
                    getattr(ex, names[1]).weight.copy_(gu[e, inter:])
                    getattr(ex, names[2]).weight.copy_(down[e])  # (hidden, inter)
            experts.append(ex)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Experts(experts))
        done += 1
    return done


def count_routes(block: nn.Module, forward: Callable[[int], object], n_batches: int, min_tokens: int,
                 prefix: str) -> None:
    """Count the tokens the router sends to each expert of `block` over every batch (`forward(i)` runs
    batch i), and mark the experts below `min_tokens` to be calibrated on all tokens (logged by name)."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, Experts)}
    if not layers:
        return
    for m in layers.values():
        m.counts, m.on_all_tokens = torch.zeros(len(m), dtype=torch.long), frozenset()
    try:
        with torch.no_grad():
            for i in range(n_batches):
                forward(i)
    finally:
        for n, m in layers.items():
            m.routed = [int(c) for c in m.counts]
            m.counts = None
            m.on_all_tokens = frozenset(e for e, c in enumerate(m.routed) if c < min_tokens)
            if m.on_all_tokens:
                log.warning("%s%s: experts %s were routed fewer than %d calibration tokens (%s): calibrated on "
                            "all tokens of the layer", prefix, n, sorted(m.on_all_tokens), min_tokens,
                            [m.routed[e] for e in sorted(m.on_all_tokens)])


def routing_report(model: nn.Module, min_tokens: int) -> dict[str, object]:
    """What the last calibration walk counted, for a pass's report (and cleared, with the calibration-only
    state): routed tokens per expert of each layer, and the experts calibrated on all tokens. Empty for a
    model without experts or one no walk went through."""
    tokens: dict[str, list[int]] = {}
    on_all: list[str] = []
    for n, m in model.named_modules():
        if isinstance(m, Experts) and m.routed is not None:
            tokens[n] = m.routed
            on_all += [f"{n}.{e}" for e in sorted(m.on_all_tokens)]
            m.routed, m.on_all_tokens = None, frozenset()
    if not tokens:
        return {}
    return {"expert_tokens": tokens, "experts_on_all_tokens": on_all, "min_expert_tokens": min_tokens}
