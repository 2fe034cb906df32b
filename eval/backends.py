"""Scoring backends: every backend turns token sequences into log-likelihoods.

Two questions are asked of a backend, and tasks talk only to this interface,
so a torch model in memory, a saved compressed artifact (loaded into torch)
and an ONNX Runtime session or a GGUF file are scored the same way:

- `token_nll(ids)`: the NLL of every token of a batch of windows given its
  prefix (perplexity, rolling log-likelihood);
- `loglikelihoods(requests)`: for each `Request`, the summed log-probability of
  each continuation given the context (multiple choice). Requests of one
  `group` share their first `shared` context tokens (an MMLU subject's header
  and few-shot examples), which a backend may compute once.

`generic_loglikelihoods` answers the second question with the first, for
backends that implement only `token_nll`.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Request:
    """Score each continuation (token ids) after the context (token ids)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    group: str = ""  # requests of one group share context[:shared]
    shared: int = 0


class Backend(Protocol):
    name: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens."""

    def decode(self, ids: list[int]) -> str:
        """The text of token ids."""

    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        """ids (B, L) -> NLL (B, L-1) of ids[:, 1:] given their prefixes (float64).

        With `bos`, that token is prepended as unscored context.
        """

    def loglikelihoods(self, requests: Sequence[Request],
                       progress: Callable[[int], None] | None = None) -> list[list[float]]:
        """Per request, the summed log-probability of each continuation; progress(n) after n more requests."""


def generic_loglikelihoods(backend, requests: Sequence[Request],
                           progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Continuation log-likelihoods through `token_nll`, one sequence per (request, continuation)."""
    out = []
    for r in requests:
        scores = []
        for cont in r.continuations:
            ids = torch.tensor([list(r.context) + list(cont)])
            nll = backend.token_nll(ids)[0]  # (L-1,)
            scores.append(-float(nll[len(r.context) - 1:].sum()))
        out.append(scores)
        if progress:
            progress(1)
    return out


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether a Hugging Face tokenizer puts BOS before a text by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > len(tokenizer("a", add_special_tokens=False).input_ids) and ids[0] == bos


def encoder_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids an encoder's tokenizer puts around a text: ([CLS], [SEP]), each only where it has that token."""
    return ([tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else [],
            [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else [])


class TokenizerMixin:
    """encode / decode / bos_token_id of a backend from a Hugging Face tokenizer; encodings are cached."""

    tokenizer: Any

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS before a text by default (lm-evaluation-harness then keeps it)."""
        return tokenizer_adds_bos(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        cache = self.__dict__.setdefault("_encoded", {})
        key = hashlib.sha1(text.encode()).hexdigest()
        if key not in cache:
            cache[key] = self.tokenizer(text, add_special_tokens=False).input_ids
        return cache[key]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class TorchBackend(TokenizerMixin):
    """A PyTorch causal LM (float or with QuantLinear modules) on one device."""

    name = "torch"

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: str | torch.device = "cpu",
                 batch_size: int | None = None) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size or 16  # contexts per forward in multiple-choice scoring
        self._keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        floats = [t.dtype for t in self.model.parameters() if t.is_floating_point()]
        self.dtype = str(floats[0] if floats else torch.float32).removeprefix("torch.")  # recorded in protocols
        # the longest sequence the model was built for (None: no such limit recorded)
        self.max_positions: int | None = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def evaluating(self):
        """Context for a run of tasks: packed weights are dequantized once for it (`dequantized_once`)."""
        from compress.quantize.qlinear import dequantized_once

        return dequantized_once(self.model)

    @torch.inference_mode()
    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        ids = ids.to(self.device)
        inp = ids
        if bos is not None:
            inp = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)
        logits = self.model(input_ids=inp, use_cache=False).logits  # (B, L[+1], V)
        if bos is not None:
            logits = logits[:, 1:]
        logits = logits[:, :-1].float()  # predictions of ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return nll.view(ids.shape[0], -1).double().cpu()

    @torch.inference_mode()
    def loglikelihoods(self, requests: Sequence[Request],
                       progress: Callable[[int], None] | None = None) -> list[list[float]]:
        """Continuation log-likelihoods with the shared context of a group computed once (KV cache).

        Requests whose continuations are single tokens (letter answers) need one
        forward of their context, and only the logits of its last position:
        contexts run in batches sorted by length and right-padded, which
        changes no score (causal attention keeps the pads, after the real
        tokens, out of every real position), and the model computes logits at
        the batch's distinct last positions only. Longer continuations run
        after their context's cache, all choices of a request in one batch.
        """
        out: list[list[float] | None] = [None] * len(requests)
        by_group: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_group[(r.group, r.context[: r.shared])].append(i)
        for (_, prefix), idx in by_group.items():
            past = self._forward([list(prefix)])[1] if prefix else None
            single = sorted((i for i in idx if all(len(c) == 1 for c in requests[i].continuations)),
                            key=lambda i: len(requests[i].context))
            for k in range(0, len(single), self.batch_size):
                batch = single[k : k + self.batch_size]
                rows = [list(requests[i].context[len(prefix):]) for i in batch]
                for b, logp in enumerate(self._last_logprobs(rows, past)):
                    out[batch[b]] = [float(logp[c[0]]) for c in requests[batch[b]].continuations]
                if progress:
                    progress(len(batch))
            for i in (i for i in idx if out[i] is None):
                out[i] = self._score_long(requests[i], len(prefix), past)
                if progress:
                    progress(1)
        return out  # type: ignore[return-value]

    def _last_logprobs(self, rows: list[list[int]], past) -> torch.Tensor:
        """Log-probabilities (B, V) of the token after each row's last token; rows right-padded to one width."""
        width = max(map(len, rows))
        last = [len(r) - 1 for r in rows]
        keep = sorted(set(last))
        padded = [r + [0] * (width - len(r)) for r in rows]
        if len(keep) == 1:
            logits, _ = self._forward(padded, past, last_only=True)  # (B, 1, V) at the shared last position
            pick = logits[:, -1]
        else:
            kept = torch.tensor(keep, device=self.device) if self._keep else None
            logits, _ = self._forward(padded, past, keep=kept)  # (B, len(keep) or width, V)
            where = [keep.index(p) for p in last] if self._keep else last
            pick = logits[torch.arange(len(rows), device=logits.device), torch.tensor(where, device=logits.device)]
        return torch.log_softmax(pick.float(), -1)

    def _score_long(self, r: Request, start: int, past) -> list[float]:
        """One request with multi-token continuations: its context once, then every choice in one batch."""
        logits, cache = self._forward([list(r.context[start:])], past, last_only=True)
        first = torch.log_softmax(logits[0, -1].float(), -1)  # (V,) predicts each continuation's first token
        scores = [float(first[c[0]]) for c in r.continuations]
        rest = [i for i, c in enumerate(r.continuations) if len(c) > 1]
        if rest:
            width = max(len(r.continuations[i]) - 1 for i in rest)
            # right padding: causal attention keeps the pads (after the real tokens) out of every score
            rows = [list(r.continuations[i][:-1]) + [0] * (width - len(r.continuations[i]) + 1) for i in rest]
            logits, _ = self._forward(rows, cache, consume=True)  # the context's cache is not needed again
            logp = torch.log_softmax(logits.float(), -1)  # (k, width, V)
            for b, i in enumerate(rest):
                tgt = torch.tensor(r.continuations[i][1:], device=logp.device)
                scores[i] += float(logp[b, torch.arange(len(tgt)), tgt].sum())
        return scores

    def _forward(self, rows: list[list[int]], past=None, *, last_only: bool = False, consume: bool = False,
                 keep: torch.Tensor | None = None):
        """Logits and KV cache of equal-length rows after `past` (a batch-1 cache, expanded to the rows).

        `past` is copied first unless `consume` says the caller no longer needs it as it is.
        `last_only` computes the last position's logits only, `keep` those of the given positions.
        """
        ids = torch.tensor(rows, device=self.device)
        kwargs: dict[str, Any] = {"use_cache": True}
        if past is not None:
            cache = past if consume else copy.deepcopy(past)
            if len(rows) > 1:
                cache.batch_repeat_interleave(len(rows))
            kwargs["cache"] = cache
        if last_only and self._keep:
            kwargs["logits_to_keep"] = 1
        elif keep is not None:
            kwargs["logits_to_keep"] = keep
        o = self.model(input_ids=ids, **kwargs)
        return o.logits, o.cache
