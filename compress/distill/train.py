"""The distillation loop on accelerate: one CPU process, several (`accelerate launch`), or GPUs.

Each optimizer step reads one global batch (`distill.data`: a function of
seed and step), split evenly over processes and micro-batches; gradients are
averaged by DDP across processes and by scaling across micro-batches, so the
step is the same whatever the split. AdamW, linear warm-up then cosine decay,
global-norm clipping. Checkpoints (`distill.checkpoint`) hold everything the
next step depends on, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.distill import losses
from compress.distill.cache import TeacherCache
from compress.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from compress.distill.data import pack_text
from compress.distill.precision import resolve_precision
from compress.distill.student import layer_pairs
from compress.pipeline import Progress

if TYPE_CHECKING:  # (kd.run calls train: the config class is only a type here)
    from compress.distill.kd import DistillConfig

log = logging.getLogger(__name__)

# fields that may differ between a run and the run it resumes (they do not change the trajectory)
RESUME_FREE = ("resume", "checkpoint_every", "eval_every", "checkpoint_dir", "teacher_cache")


class Distillee(nn.Module):
    """The student plus the projections of its hidden states onto the teacher's widths (what DDP wraps)."""

    def __init__(self, student: nn.Module, pairs: list[tuple[int, int]], widths: tuple[int, int]) -> None:
        super().__init__()
        self.student = student
        self.pairs = pairs
        s, t = widths
        self.proj = nn.ModuleList([nn.Linear(s, t, bias=False) for _ in pairs] if s != t else [])

    def forward(self, ids: torch.Tensor, hidden: bool, attentions: bool):
        out = self.student(input_ids=ids, output_hidden_states=hidden, output_attentions=attentions, use_cache=False)
        hs = []
        if hidden:  # hidden_states[i + 1] is block i's output
            hs = [out.hidden_states[s + 1] for s, _ in self.pairs]
            if len(self.proj):
                hs = [p(h) for p, h in zip(self.proj, hs, strict=True)]
        return out.logits, hs, out.attentions


def _trainable(student: nn.Module, cfg: DistillConfig) -> None:
    frozen = set()
    if not cfg.train_embeddings:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            mod = getattr(student, get)()
            if mod is not None:
                frozen.add(id(mod.weight))
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)


@torch.no_grad()
def heldout_eval(step: int, student: nn.Module, teacher: nn.Module | None, seqs: torch.Tensor, micro: int,
                 device: torch.device, cache: TeacherCache | None = None,
                 temperature: float = 1.0) -> dict[str, float]:
    """The student's perplexity (exp of the mean next-token NLL) on `seqs` (n, seq_len), and its mean
    KL(teacher || student) per token there when there is a teacher (from a teacher cache: the top-k
    coarsened KL at the cache's temperature, `kl_to_teacher_topk`); float32, no autocast."""
    row: dict[str, float] = {"step": step}
    if seqs.shape[0] == 0:
        return row
    was = student.training
    student.eval()
    nll = kl = 0.0
    for i in range(0, seqs.shape[0], micro):
        ids = seqs[i : i + micro].to(device)
        logits = student(input_ids=ids, use_cache=False).logits
        nll += losses.cross_entropy(logits, ids).item() * ids.shape[0]
        if teacher is not None:
            kl += losses.logit_divergence(logits, teacher(input_ids=ids, use_cache=False).logits).item() * ids.shape[0]
        elif cache is not None:
            lp, ix = cache.load("heldout", range(i, i + ids.shape[0]), device)
            kl += losses.topk_forward_kl(logits, lp, ix, temperature=temperature).item() / temperature**2 * ids.shape[0]
    student.train(was)
    row["perplexity"] = math.exp(nll / seqs.shape[0])
    if teacher is not None or cache is not None:
        row["kl_to_teacher" if teacher is not None else "kl_to_teacher_topk"] = kl / seqs.shape[0]
    return row


def _fingerprint(cfg: DistillConfig, world: int) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}
    return {**d, "processes": world}


def train(student: nn.Module, teacher: nn.Module | Callable[[], nn.Module] | None, tokenizer, cfg: DistillConfig, *,
          progress: Progress | None = None, teacher_id: tuple[str, str] | None = None) -> dict[str, Any]:
    """Distill `teacher` into `student` (changed in place); return the curve, evals and summary metrics.

    `teacher` may be a function that loads it, called only if the teacher has to run. With
    `cfg.teacher_cache`, `teacher_id` (source, sha256 of its weights) identifies it in the cache.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    data = pack_text(tokenizer, cfg.data, seq_len=cfg.seq_len, heldout=cfg.heldout)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=resolve_precision(cfg.mixed_precision, device))
    try:
        cache = None
        if cfg.teacher_cache:
            cache = _prepare_cache(acc, teacher, teacher_id, data, cfg, progress)
            teacher = None  # every position the run reads is in the cache
        elif teacher is not None and not isinstance(teacher, nn.Module):
            teacher = teacher()
        return _train(acc, student, teacher, data, cfg, progress, cache)
    finally:  # accelerate keeps one precision per process; a later run here may want another
        AcceleratorState._reset_state()


def _prepare_cache(acc, teacher, teacher_id: tuple[str, str] | None, data, cfg: DistillConfig,
                   progress: Progress | None) -> TeacherCache:
    """Open the teacher cache and fill what this run will read and it lacks (each process a share)."""
    if teacher_id is None:
        raise ValueError("a teacher cache needs the teacher's identity (teacher_id) to tell caches apart")
    fp = TeacherCache.fingerprint(teacher=teacher_id[0], teacher_sha256=teacher_id[1],
                                  tokens=torch.cat([data.train, data.heldout]), seq_len=cfg.seq_len,
                                  heldout=cfg.heldout, topk=cfg.cache_topk, temperature=cfg.temperature)
    cache = TeacherCache(cfg.teacher_cache, fp)
    read = sorted({int(i) for s in range(cfg.steps) for i in data.batch_indices(s, cfg.batch_size, cfg.seed)})
    todo = {"train": cache.missing("train", read), "heldout": cache.missing("heldout", range(data.heldout.shape[0]))}
    if any(todo.values()):
        model = teacher if isinstance(teacher, nn.Module) else teacher()
        model.to(acc.device).eval().requires_grad_(False)
        log.info("filling the teacher cache %s: %d sequences", cfg.teacher_cache, sum(map(len, todo.values())))
        for split, seqs in (("train", data.train), ("heldout", data.heldout)):
            mine = todo[split][acc.process_index::acc.num_processes]
            cache.fill(model, split, seqs, mine, temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size,
                       device=acc.device, on_batch=lambda d, n, s=split: progress and progress(f"teacher cache ({s})",
                                                                                              d, n))
        acc.wait_for_everyone()
    return cache


def _train(acc, student: nn.Module, teacher: nn.Module | None, data, cfg: DistillConfig,
           progress: Progress | None, cache: TeacherCache | None = None) -> dict[str, Any]:
    from transformers import get_cosine_schedule_with_warmup

    world, rank = acc.num_processes, acc.process_index
    per_step = cfg.micro_batch_size * world
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size x processes "
                         f"= {per_step}")
    accum = cfg.batch_size // per_step
    torch.manual_seed(cfg.seed)

    attn = cfg.attention_weight > 0
    if attn:  # attention maps come only from the eager implementation
        for m in (student, teacher):
            m.set_attn_implementation("eager")
    hidden = cfg.hidden_weight > 0
    pairs = layer_pairs(student, teacher.config.num_hidden_layers, cfg.layer_map) if hidden or attn else []
    widths = (student.config.hidden_size, teacher.config.hidden_size) if hidden else (0, 0)
    module = Distillee(student, pairs if hidden else [], widths)
    _trainable(student, cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    module.to(acc.device)
    if teacher is not None:
        teacher.to(acc.device).eval().requires_grad_(False)

    start, curve, evals = 0, [], []
    fp = _fingerprint(cfg, world)
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume:
        ck = latest_checkpoint(root) if root.is_dir() else None
        if ck is None:
            raise ValueError(f"--resume: no checkpoint in {root}")
        state = load_checkpoint(ck, module, opt, sched)
        if state["fingerprint"] != fp:
            diff = sorted(k for k in set(fp) | set(state["fingerprint"]) if fp.get(k) != state["fingerprint"].get(k))
            raise ValueError(f"cannot resume from {ck}: it was made with different settings ({', '.join(diff)})")
        start, curve, evals = state["step"], state["curve"], state["evals"]
        log.info("resuming from %s at step %d", ck, start)
    model, opt = acc.prepare(module, opt)
    if not evals:
        evals.append(heldout_eval(0, student, teacher, data.heldout, cfg.micro_batch_size, acc.device, cache,
                                  cfg.temperature))

    terms = [("kd", cfg.kd_weight), ("ce", cfg.ce_weight), ("hidden", cfg.hidden_weight),
             ("attention", cfg.attention_weight)]
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        idx = data.batch_indices(step, cfg.batch_size, cfg.seed)
        sums = torch.zeros(len(terms) + 1, device=acc.device)  # per-term losses of this process, then the total
        for a in range(accum):
            first = (a * world + rank) * cfg.micro_batch_size
            rows = idx[first : first + cfg.micro_batch_size]
            ids = data.train[rows].to(acc.device)
            cached = cache.load("train", rows.tolist(), acc.device) if cache is not None else None
            sync = a == accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):  # DDP all-reduces on the last one
                parts = _losses(model, teacher, ids, cfg, acc, pairs, attn, cached)
                total = sum(w * parts[name] for name, w in terms if w > 0)
                acc.backward(total / accum)
            sums += torch.stack([parts.get(name, torch.zeros(())).detach().float() for name, _ in terms]
                                + [total.detach().float()]).to(acc.device) / accum
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sums = acc.reduce(sums, reduction="mean")
        seconds = time.perf_counter() - t0
        row = {"step": step + 1, "loss": sums[-1].item(), "lr": sched.get_last_lr()[0],
               "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds}
        row.update({name: sums[i].item() for i, (name, w) in enumerate(terms) if w > 0})
        curve.append(row)
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            evals.append(heldout_eval(done, student, teacher, data.heldout, cfg.micro_batch_size, acc.device, cache,
                                      cfg.temperature))
        if root is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            if acc.is_main_process:
                save_checkpoint(root, done, acc.unwrap_model(model), opt, sched,
                                {"fingerprint": fp, "curve": curve, "evals": evals})
            acc.wait_for_everyone()
        _progress(progress, done, cfg.steps, f"loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s  "
                                             f"held-out ppl {evals[-1].get('perplexity', float('nan')):.2f}")
        log.info("distill step %d/%d loss %.5f", done, cfg.steps, row["loss"])
    acc.wait_for_everyone()
    acc.free_memory()
    student.requires_grad_(True).eval()
    kl = {f"heldout_{key}_{when}": e[key] for when, e in (("before", evals[0]), ("after", evals[-1]))
          for key in ("kl_to_teacher", "kl_to_teacher_topk") if key in e}
    return {
        "record": {"curve": curve, "evals": evals, "processes": world, "gradient_accumulation": accum,
                   "precision": acc.mixed_precision, "layer_pairs": pairs, "tokens_in_data": data.tokens,
                   "train_sequences": data.train.shape[0]},
        "metrics": {"final_loss": curve[-1]["loss"] if curve else float("nan"),
                    "heldout_perplexity_before": evals[0].get("perplexity", float("nan")),
                    "heldout_perplexity_after": evals[-1].get("perplexity", float("nan")), **kl,
                    "tokens_trained": float(cfg.steps * cfg.batch_size * cfg.seq_len)},
        "trained_tensors": len(params),
    }


def _losses(model, teacher, ids, cfg: DistillConfig, acc, pairs: list[tuple[int, int]],
            attn: bool, cached: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    hidden = cfg.hidden_weight > 0
    logits, hs, s_att = model(ids, hidden, attn)
    parts: dict[str, torch.Tensor] = {}
    if cfg.ce_weight > 0:
        parts["ce"] = losses.cross_entropy(logits, ids)
    if cached is not None:  # the teacher's top-k log-probs from the cache (forward KL only)
        parts["kd"] = losses.topk_forward_kl(logits, *cached, temperature=cfg.temperature)
        return parts
    if teacher is None:
        return parts
    with torch.no_grad(), acc.autocast():
        t = teacher(input_ids=ids, output_hidden_states=hidden, output_attentions=attn, use_cache=False)
    if cfg.kd_weight > 0:
        parts["kd"] = losses.logit_divergence(logits, t.logits, temperature=cfg.temperature, kind=cfg.divergence)
    if hidden:
        parts["hidden"] = torch.stack([losses.hidden_loss(h, t.hidden_states[ti + 1], kind=cfg.hidden_loss)
                                       for h, (_, ti) in zip(hs, pairs, strict=True)]).mean()
    if attn:
        parts["attention"] = torch.stack([losses.attention_loss(s_att[si], t.attentions[ti])
                                          for si, ti in pairs]).mean()
    return parts


def _progress(progress: Progress | None, done: int, total: int, info: str) -> None:
    if progress is None:
        return
    if "info" in inspect.signature(progress).parameters:
        progress("distill", done, total, info=info)
    else:
        progress("distill", done, total)
