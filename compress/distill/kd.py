"""Knowledge distillation: train a student to match its teacher's outputs, as a recipe pass.

Hinton et al., "Distilling the Knowledge in a Neural Network", 2015
(https://arxiv.org/abs/1503.02531), with the hidden-state term of FitNets and
Minitron (Muralidharan et al. 2024, https://arxiv.org/abs/2407.14679), whose
recipe (prune a trained model, then distill it from the original with logit
KD) this pass completes after `prune_channels` / `prune_heads` /
`prune_layers` / `student`. The loss mixes the temperature-scaled logit
divergence, the hard-label cross-entropy, hidden-state matching between
paired layers (through learned projections where widths differ) and,
optionally, attention maps. The loop itself (accelerate, AdamW, schedule,
checkpoints) is `distill.train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from torch import nn

from compress.checks import check_fields
from compress.distill.losses import DIVERGENCES, HIDDEN_LOSSES
from compress.pipeline import PassReport, Progress
from compress.registry import register_pass

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: str | None = None  # model dir or .gguf; None: the model the recipe started from
    data: str = "wikitext2"  # training text: wikitext2 (validation split), a .txt file, or FILE.jsonl:FIELD
    seq_len: int = 512  # tokens per packed training sequence
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int = 2  # sequences per forward in each process (the rest is gradient accumulation)
    lr: float = 5e-5  # AdamW peak learning rate
    warmup_steps: int = 10  # linear warm-up, then cosine decay to zero at `steps`
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip the global gradient norm (0: no clipping)
    temperature: float = 1.0  # softmax temperature of the logit term (its loss is scaled by T^2)
    divergence: Literal[DIVERGENCES] = "forward"  # forward KL (Hinton), reverse KL, or js (Jensen-Shannon)
    kd_weight: float = 1.0  # weight of the logit divergence
    ce_weight: float = 0.0  # weight of the next-token cross-entropy on the data (hard labels)
    hidden_weight: float = 0.0  # weight of the hidden-state loss, averaged over the paired layers
    hidden_loss: Literal[HIDDEN_LOSSES] = "mse"  # mse (normalised by the teacher's mean square) or cosine
    layer_map: str | None = None  # "S:T,..." student:teacher block pairs; default: recorded origin or relative depth
    attention_weight: float = 0.0  # weight of the attention-map KL (eager attention: slower)
    train_embeddings: bool = False  # train the token embedding / output head too (large, and rarely worth it)
    mixed_precision: Literal[PRECISIONS] = "auto"  # auto: bf16 where the device multiplies it natively; no | bf16 | fp16
    seed: int = 0  # initialisation of projections and the data order
    heldout: int = 8  # sequences at the end of the data held out for the periodic perplexity
    eval_every: int = 0  # held-out perplexity every N steps (0: only before and after)
    checkpoint_dir: str | None = None  # where periodic checkpoints go (needed for checkpoint_every and resume)
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir
    teacher_cache: str | None = None  # directory of the teacher's top-k log-probs: filled on first use, reused after
    cache_topk: int = 64  # tokens per position kept in the teacher cache (the logit loss uses them plus the rest)

    def __post_init__(self) -> None:
        check_fields(self, positive=("steps", "batch_size", "micro_batch_size", "seq_len", "lr", "temperature",
                                     "cache_topk"),
                     choices={"divergence": DIVERGENCES, "hidden_loss": HIDDEN_LOSSES, "mixed_precision": PRECISIONS})
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "kd_weight", "ce_weight", "hidden_weight",
                     "attention_weight", "heldout", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.kd_weight + self.ce_weight + self.hidden_weight + self.attention_weight == 0:
            raise ValueError("every loss weight is zero: set kd_weight, ce_weight, hidden_weight or attention_weight")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError("checkpoint_every and resume need checkpoint_dir")
        if self.layer_map is not None and not (self.hidden_weight or self.attention_weight):
            raise ValueError(f"layer_map {self.layer_map!r} pairs blocks for the hidden-state and attention losses, "
                             "but both are off: set hidden_weight or attention_weight (--hidden-weight, "
                             "--attention-weight) or drop layer_map")
        if self.teacher_cache is not None:
            if self.kd_weight == 0:
                raise ValueError("teacher_cache holds the teacher's logits for the kd term, but kd_weight is 0")
            if self.hidden_weight or self.attention_weight or self.divergence != "forward":
                raise ValueError("teacher_cache serves forward-KL logit distillation only: hidden-state and "
                                 "attention losses, reverse KL and JS need the teacher itself")

    def check_model(self, model: nn.Module) -> None:
        """Before any work: training sequences fit the student's positions (past them a model with learned
        positions fails mid-run, and a RoPE model silently trains on positions it was never built for)."""
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and self.seq_len > limit:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's {limit} positions "
                             f"(max_position_embeddings); use --seq-len {limit} or less")

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.hidden_weight > 0 or self.attention_weight > 0


@register_pass("distill", DistillConfig)
def run(model: nn.Module, cfg: DistillConfig, calib=None, *, progress: Progress | None = None) -> PassReport:
    """Train the model (the student) to imitate the teacher on the training text; the model is changed in place."""
    from compress.archs import is_masked_lm, require_lm_head
    from compress.distill.train import train
    from compress.lazy import store_of
    from compress.models import load_model

    require_lm_head(model.config, "distill (logit distillation)")
    if is_masked_lm(model.config):
        raise ValueError(f"{model.config.model_type} is a masked-LM encoder: distill trains next-token prediction "
                         "(causal language models); masked-LM distillation is not implemented")
    # the tokenizer and identity now; the weights only if the teacher runs (not without a teacher term, nor when
    # a filled teacher cache answers for it)
    teacher_lm = load_model(cfg.teacher, lazy=True)
    lazy_store = store_of(teacher_lm.model)
    if lazy_store is not None:
        lazy_store.close()

    def load_teacher() -> nn.Module:
        teacher = teacher_lm.model if lazy_store is None else load_model(cfg.teacher).model
        s_vocab = model.get_output_embeddings().weight.shape[0]
        t_vocab = teacher.get_output_embeddings().weight.shape[0]
        if s_vocab != t_vocab:
            raise ValueError(f"the student's vocabulary ({s_vocab}) differs from the teacher's ({t_vocab}): "
                             "logit distillation needs the same tokenizer")
        return teacher

    teacher_id = (teacher_lm.source, teacher_lm.source_sha256()) if cfg.teacher_cache else None
    result = train(model, load_teacher if cfg.needs_teacher else None, teacher_lm.tokenizer, cfg, progress=progress,
                   teacher_id=teacher_id)
    return PassReport(name="distill", config={"teacher_source": teacher_lm.source, **result["record"]},
                      modules=result["trained_tensors"], metrics=result["metrics"])
