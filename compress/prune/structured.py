"""Structured pruning of MLP channels and attention heads: a smaller dense model, same architecture.

Importance is measured as in Minitron (Muralidharan et al., "Compact Language
Models via Pruning and Knowledge Distillation", 2024,
https://arxiv.org/abs/2407.14679) from activations on calibration data, here as
each unit's output energy: for MLP channel j, E[a_j^2] ||W_down[:, j]||^2; for a
head h, tr(W_o,h H_hh W_o,h^T) with H the Hessian of o_proj's input. Every
block keeps the same number of units (a Hugging Face config has one
intermediate size and one head count), chosen per block. The consumer Linear
(down_proj, o_proj) is then refit by least squares on the kept inputs,
W' = W H[:, K] H[K, K]^-1, so the block output moves as little as possible
(the structured analogue of SparseGPT's update; SlimGPT, Ling et al. 2024,
https://arxiv.org/abs/2412.18110). Blocks are processed in turn, each on the
outputs of the pruned blocks before it. `importance: magnitude` uses weight
norms instead and needs no forwards.

Which Linears form a unit is found from the block's execution order, not from
names: the last two input stages are the MLP (producers, consumer), the first
two the attention (q/k/v, o).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import decoder_blocks
from calibrate.experts import Experts
from calibrate.forward import ForwardOptions
from calibrate.stats import HessianCollector
from calibrate.walk import Block, block_linears, walk
from compress.archs import auto_model_class
from compress.checks import check_fields
from compress.files import brief
from compress.pipeline import PassReport, Progress
from compress.registry import register_pass
from compress.targets import refuse_uncompressible

log = logging.getLogger(__name__)

IMPORTANCE = ("activation", "magnitude")
HEAD_UNITS = ("query", "kv")
# config keys holding the MLP width, one per architecture family
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True, kw_only=True)
class StructuredConfig(ForwardOptions):
    ratio: float = 0.25  # fraction of the units (channels, heads) each block loses
    importance: str = "activation"  # output energy on calibration data, or "magnitude" (weight norms, no data)
    reconstruct: bool = True  # refit the consumer Linear on the kept inputs (needs importance: activation)
    dampening: float = 0.01  # fraction of mean diag(H) added before the least-squares solve

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, share=("ratio",), fraction=("dampening",), choices={"importance": IMPORTANCE})
        if self.reconstruct and self.importance != "activation":
            raise ValueError("reconstruct needs calibration statistics: use importance: activation, "
                             "or reconstruct: false")


@dataclass(frozen=True, kw_only=True)
class HeadsConfig(StructuredConfig):
    unit: str = "query"  # "query": query heads within every KV group; "kv": whole KV groups with their queries

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, choices={"unit": HEAD_UNITS})


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """Least-squares weights (out, |keep|) on inputs `keep` that best reproduce x W^T, with H = E[x x^T] (in, in)."""
    Hk = H[keep][:, keep].double()  # (k, k)
    Hk.diagonal().add_(dampening * Hk.diagonal().mean())
    rhs = (W.double() @ H[:, keep].double()).T  # (k, out)
    return torch.linalg.solve(Hk, rhs).T.to(W.dtype)  # (out, k) = W H[:, K] H[K, K]^-1


def slice_linear(lin: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with output rows `rows` and input columns `cols` of `lin` (or the given `weight`)."""
    W = lin.weight.detach() if weight is None else weight
    if weight is None:
        W = W[rows] if rows is not None else W
        W = W[:, cols] if cols is not None else W
    b = lin.bias.detach() if lin.bias is not None else None
    if b is not None and rows is not None:
        b = b[rows]
    new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if b is not None:
            new.bias.copy_(b)
    return new


def _set(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _units(block: Block, which: str) -> tuple[list[str], str]:
    """(producers, consumer) of the block's attention (`which="attention"`) or MLP."""
    stages = block.stages
    if len(stages) < 4:
        raise ValueError(f"expected attention and MLP stages in a decoder block, found {stages}")
    producers, consumer = (stages[0], stages[1]) if which == "attention" else (stages[-2], stages[-1])
    if len(consumer) != 1:
        raise ValueError(f"the {which} output should be one Linear, found {consumer}")
    return producers, consumer[0]


def _energy(W: torch.Tensor, H: torch.Tensor | None, unit: int) -> torch.Tensor:
    """Output energy of each group of `unit` consecutive input columns of W (out, in): tr(W_g H_gg W_g^T)."""
    out, n = W.shape
    if H is None:  # data-free: squared column norms
        return W.float().square().sum(0).reshape(n // unit, unit).sum(1)
    Wg = W.float().reshape(out, n // unit, unit).transpose(0, 1)  # (groups, out, unit)
    Hg = torch.stack([H[g * unit:(g + 1) * unit, g * unit:(g + 1) * unit] for g in range(n // unit)])
    return torch.einsum("gou,guv,gov->g", Wg, Hg, Wg)


def _run(model: nn.Module, cfg: StructuredConfig, calib: torch.Tensor, label: str, which: str, prune_block,
         progress: Progress | None) -> int:
    """Per block: find the units, measure the consumer's input Hessian, prune; returns the parameters removed."""
    removed = 0

    def visit(block: Block) -> None:
        nonlocal removed
        producers, consumer = _units(block, which)
        H = None
        if cfg.importance == "activation":
            H = block.observe([[consumer]], HessianCollector.of)[consumer][0].hessian
        before = sum(p.numel() for p in block.module.parameters())
        prune_block(block.module, producers, consumer, block.modules, H)
        removed += before - sum(p.numel() for p in block.module.parameters())

    walk(model, block_linears(model), calib, visit, label=label, batch_size=cfg.batch_size,
         forward_dtype=cfg.forward_dtype, progress=progress)
    return removed


def _refit_or_slice(block, consumer: str, lin: nn.Linear, H, keep: torch.Tensor, cfg: StructuredConfig) -> None:
    W = refit(lin.weight.detach().float(), H, keep, cfg.dampening).to(lin.weight.dtype) if cfg.reconstruct else None
    _set(block, consumer, slice_linear(lin, cols=keep, weight=W))


@register_pass("prune_channels", StructuredConfig, needs_calibration=True, streams_blocks=True)
@torch.no_grad()
def run_channels(model: nn.Module, cfg: StructuredConfig, calib: torch.Tensor, *,
                 progress: Progress | None = None) -> PassReport:
    """Remove a fraction of every block's MLP channels (intermediate size) by output energy."""
    refuse_uncompressible(model)
    experts = next((n for n, m in model.named_modules() if isinstance(m, Experts)), None)
    if experts is not None:
        raise ValueError(f"{type(model).__name__} keeps its MLPs in mixture-of-experts experts ({experts}): channel "
                         "pruning would give each expert its own width, which the config cannot hold; "
                         "prune heads or layers instead")
    config = model.config
    key = next((k for k in MLP_WIDTH_KEYS if isinstance(getattr(config, k, None), int)), None)
    if key is None:
        raise ValueError(f"{type(config).__name__} has none of {', '.join(MLP_WIDTH_KEYS)}: cannot record the new MLP width")
    width = getattr(config, key)
    n_keep = width - round(cfg.ratio * width)
    if n_keep in (0, width):
        raise ValueError(f"ratio {cfg.ratio} of {width} channels removes {width - n_keep}: choose a ratio in "
                         f"[{0.5 / width:.4f}, {1 - 0.5 / width:.4f})")

    def prune_block(block, producers, consumer, lins, H):
        down = lins[consumer]
        fused = [p for p in producers if lins[p].out_features > width and lins[p].out_features % width == 0]
        if fused:
            raise ValueError(f"{fused[0]} holds {lins[fused[0]].out_features // width} fused projections of the MLP "
                             f"width {width} (Phi-3's gate_up_proj): channel pruning of fused projections is not "
                             "supported yet")
        if down.in_features != width or any(lins[p].out_features != width for p in producers):
            raise ValueError(f"MLP Linears {producers} -> {consumer} do not have the config's width {width}")
        score = _energy(down.weight.detach(), H, 1)
        if H is None:  # data-free: the channel's producer rows count too
            for p in producers:
                score = score * lins[p].weight.detach().float().norm(dim=1)
        keep = torch.topk(score, n_keep).indices.sort().values
        for p in producers:
            _set(block, p, slice_linear(lins[p], rows=keep))
        _refit_or_slice(block, consumer, down, H, keep, cfg)

    removed = _run(model, cfg, calib, "prune_channels", "mlp", prune_block, progress)
    setattr(config, key, n_keep)
    log.info("prune_channels: %s %d -> %d", key, width, n_keep)
    return _report("prune_channels", model, removed, {key: [width, n_keep]})


@register_pass("prune_heads", HeadsConfig, needs_calibration=True, streams_blocks=True)
@torch.no_grad()
def run_heads(model: nn.Module, cfg: HeadsConfig, calib: torch.Tensor, *,
              progress: Progress | None = None) -> PassReport:
    """Remove query heads (evenly in every KV group) or whole KV groups from every block's attention."""
    refuse_uncompressible(model)  # before the head plan: the weights it cannot reach are named first
    config = model.config
    n_h, n_kv, hd, new_rep, new_kv = _head_plan(config, cfg)
    rep = n_h // n_kv

    def prune_block(block, producers, consumer, lins, H):
        o = lins[consumer]
        q = next((p for p in producers if lins[p].out_features == o.in_features == n_h * hd), None)
        kv = [p for p in producers if p != q and lins[p].out_features == n_kv * hd]
        if q is None or len(kv) != 2:
            raise ValueError(f"attention Linears {producers} -> {consumer} do not match {n_h} heads, "
                             f"{n_kv} KV heads of size {hd}")
        head = _energy(o.weight.detach(), H, hd)  # (n_h,)
        if H is None:
            head = head * lins[q].weight.detach().float().reshape(n_h, -1).square().sum(1)
        by_group = head.reshape(n_kv, rep)  # query head h uses KV head h // rep
        if cfg.unit == "query":
            keep_q = torch.topk(by_group, new_rep, dim=1).indices.sort(dim=1).values  # (n_kv, new_rep)
            heads = (keep_q + torch.arange(n_kv)[:, None] * rep).reshape(-1)
            groups = torch.arange(n_kv)
        else:
            groups = torch.topk(by_group.sum(1), new_kv).indices.sort().values
            heads = (groups[:, None] * rep + torch.arange(rep)).reshape(-1)
        cols = lambda idx: (idx[:, None] * hd + torch.arange(hd)).reshape(-1)  # noqa: E731
        _set(block, q, slice_linear(lins[q], rows=cols(heads)))
        for p in kv:
            _set(block, p, slice_linear(lins[p], rows=cols(groups)))
        _refit_or_slice(block, consumer, o, H, cols(heads), cfg)
        attn = block.get_submodule(consumer.rpartition(".")[0]) if "." in consumer else block
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = new_rep

    removed = _run(model, cfg, calib, "prune_heads", "attention", prune_block, progress)
    # head_dim written out: a config that derived it from hidden_size / heads would derive another one now
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = new_kv * new_rep, new_kv, hd
    log.info("prune_heads: heads %d -> %d, KV heads %d -> %d", n_h, new_kv * new_rep, n_kv, new_kv)
    return _report("prune_heads", model, removed,
                   {"num_attention_heads": [n_h, new_kv * new_rep], "num_key_value_heads": [n_kv, new_kv]})


def _head_plan(config, cfg: HeadsConfig) -> tuple[int, int, int, int, int]:
    """(heads, KV heads, head size, query heads per KV group after, KV heads after) of the config and ratio."""
    derives = f"{type(config).__name__} derives its head size from hidden_size: pruning heads would need custom " \
              "code to load (supported: configs with num_key_value_heads whose model reads head_dim, e.g. Llama, " \
              "Mistral, Qwen2)"
    if getattr(config, "num_key_value_heads", None) is None:
        raise ValueError(derives)
    hd = getattr(config, "head_dim", None)
    if hd is None:  # derived from hidden_size; kept after pruning only if the model reads an explicit head_dim
        hd = config.hidden_size // config.num_attention_heads
        if not _reads_head_dim(config, hd):
            raise ValueError(derives)
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    rep = n_h // n_kv
    per, units = (rep, "query heads per KV group") if cfg.unit == "query" else (n_kv, "KV groups")
    drop = round(cfg.ratio * per)
    if not 0 < drop < per:
        raise ValueError(f"ratio {cfg.ratio} of {per} {units} removes {drop}: with unit {cfg.unit!r} the ratio "
                         f"moves in steps of 1/{per} ({', '.join(f'{k / per:.3f}' for k in range(1, per))})")
    new_rep, new_kv = (rep - drop, n_kv) if cfg.unit == "query" else (rep, n_kv - drop)
    trial = copy.deepcopy(config)
    trial.num_attention_heads, trial.num_key_value_heads, trial.head_dim = new_kv * new_rep, new_kv, hd
    try:
        trial.validate()  # what transformers checks whenever the pruned model loads
    except Exception as e:  # noqa: BLE001  (huggingface_hub's validation errors are not ValueErrors)
        raise ValueError(f"{new_kv * new_rep} attention heads ({new_kv} KV) would not load as a "
                         f"{type(config).__name__}: {brief(e.__cause__ or e)}") from None
    return n_h, n_kv, hd, new_rep, new_kv


def _reads_head_dim(config, hd: int) -> bool:
    """Whether a model of `config` sizes its heads by `config.head_dim` (set to `hd`) rather than hidden_size /
    heads: a copy with half the heads is built on the meta device and its attention projections are measured."""
    from accelerate import init_empty_weights

    trial = copy.deepcopy(config)
    trial.num_hidden_layers, trial.num_attention_heads, trial.num_key_value_heads, trial.head_dim = (
        1, max(1, config.num_attention_heads // 2), max(1, config.num_key_value_heads // 2), hd)
    if getattr(trial, "layer_types", None) is not None:
        trial.layer_types = trial.layer_types[:1]
    try:
        with init_empty_weights():
            model = auto_model_class(trial).from_config(trial)
    except Exception:  # noqa: BLE001  (a config that cannot take half the heads cannot take an explicit head size)
        return False
    outs = {m.out_features for m in decoder_blocks(model)[1][0].modules() if isinstance(m, nn.Linear)}
    return trial.num_attention_heads * hd in outs and trial.num_key_value_heads * hd in outs


def _report(name: str, model: nn.Module, removed: int, shape: dict) -> PassReport:
    return PassReport(name=name, config={"config_changes": shape}, modules=len(decoder_blocks(model)[1]),
                      metrics={"parameters_removed": float(removed)})
