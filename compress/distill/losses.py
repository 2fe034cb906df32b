"""Distillation losses: logit divergences with temperature, hidden-state and attention-map matching.

Logit KD is Hinton et al., "Distilling the Knowledge in a Neural Network",
2015, https://arxiv.org/abs/1503.02531: the student matches the teacher's
temperature-softened distribution, the loss scaled by T^2 so its gradients
keep their size as T changes. Reverse KL (mode-seeking, as in MiniLLM) and the
Jensen-Shannon divergence are the usual alternatives for generative models.
Hidden-state matching (FitNets, Romero et al. 2015; Minitron's intermediate
loss) compares mapped layers' outputs, through a learned linear projection
when the widths differ. Every function takes (..., dim) tensors and returns a
scalar mean over the leading positions, optionally over a boolean `mask` of
positions that count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward", "reverse", "js")
HIDDEN_LOSSES = ("mse", "cosine")


def _mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a (...) tensor over the positions where `mask` (same shape, bool) is true."""
    if mask is None:
        return per_position.mean()
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1)


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
                     kind: str = "forward", mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 times the mean per-position divergence of the softened distributions; logits are (..., vocab).

    forward: KL(teacher || student), Hinton's KD; reverse: KL(student || teacher);
    js: the Jensen-Shannon divergence, (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2.
    Computed in float32 whatever the logits' dtype (log-softmax over a large
    vocabulary loses too much in 16 bits). The teacher gets no gradient.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)} (logit distillation needs the same vocabulary)")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    if kind == "forward":
        per = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":
        per = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2)  # log((p + q) / 2)
        per = 0.5 * ((t.exp() * (t - m)).sum(-1) + (s.exp() * (s - m)).sum(-1))
    return _mean(per, mask) * temperature**2


def topk_forward_kl(student: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor, *,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 times forward KL between the distributions coarsened to the teacher's top-k tokens plus one bucket for
    the rest; student logits (..., vocab), the teacher's softened log-probabilities and their token indices
    (..., k). Equal to `logit_divergence` when k is the vocabulary, a lower bound of it otherwise."""
    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, teacher_indices)  # (..., k)
    t = teacher_logprobs.detach().float()
    rest_t = (1 - t.exp().sum(-1)).clamp_min(0)  # the teacher's mass outside its top k
    rest_s = (1 - s.exp().sum(-1)).clamp_min(1e-12)
    per = (t.exp() * (t - s)).sum(-1) + rest_t * (rest_t.clamp_min(1e-12).log() - rest_s.log())
    return _mean(per, mask) * temperature**2


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of MSE (averaged over the width) or 1 - cosine similarity; (..., width) each.

    MSE is normalised by the teacher's mean square, so layers whose hidden
    states have very different scales (the residual stream grows with depth)
    weigh alike.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"kind must be one of {', '.join(HIDDEN_LOSSES)}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape {tuple(student.shape)} vs {tuple(teacher.shape)}: "
                         "project the student's first")
    s, t = student.float(), teacher.detach().float()
    if kind == "cosine":
        return _mean(1 - F.cosine_similarity(s, t, dim=-1), mask)
    per = (s - t).pow(2).mean(-1)
    scale = _mean(t.pow(2).mean(-1), mask).clamp_min(1e-12)
    return _mean(per, mask) / scale


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between attention maps (batch, heads, query, key), averaged over heads first.

    Averaging over heads lets students with fewer heads match a teacher (heads
    are not aligned one to one after pruning). `mask` is (batch, query).
    Positions a row may not attend to are zero in both maps and add nothing.
    """
    if student.shape[-2:] != teacher.shape[-2:] or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"attention maps differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    s = student.float().mean(1).clamp_min(1e-12)  # (batch, query, key)
    t = teacher.detach().float().mean(1)
    per = (t * (t.clamp_min(1e-12).log() - s.log())).sum(-1)  # (batch, query)
    return _mean(per, mask)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (batch, seq, vocab) at positions 0..L-2 predict labels 1..L-1."""
    per = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    return _mean(per.view(labels.shape[0], -1), None if mask is None else mask[:, 1:])
