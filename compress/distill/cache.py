"""Teacher outputs cached on disk: the top-k log-probabilities of every training position, computed once.

A distillation run spends about a third of its time in the teacher's forward
pass. With a cache directory the teacher runs once over the sequences the run
will read (its steps' batches and the held-out ones), its temperature-softened
log-probabilities are kept for the `k` most likely tokens of each position,
and every later run with the same teacher, text and settings (another student,
other hyper-parameters, a resumed run) trains without loading the teacher at
all. The logit loss then compares the distributions coarsened to those k
tokens plus one bucket for the rest (`losses.topk_forward_kl`), which tends to
the full forward KL as k grows (it is a lower bound by the data-processing
inequality); reverse KL, JS and hidden-state or attention losses need the
teacher itself.

Layout: `cache.json` (what it was made from) and one safetensors file per
sequence (`train-0000012.safetensors`: `logprobs` float32 and `indices` int32,
both (seq_len, k)), each written atomically, so an interrupted fill resumes.
A damaged file (cache.json, a truncated or foreign sequence file) is refused
naming it: delete it and the next run fills it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compress.artifact import write_bytes_atomic
from compress.checks import check_tensors
from compress.files import load_safetensors, read_json_object


class TeacherCache:
    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "cache.json"
        if meta.is_file():
            had = read_json_object(meta, what="teacher cache description")
            if had != fingerprint:
                diff = sorted(k for k in set(had) | set(fingerprint) if had.get(k) != fingerprint.get(k))
                raise ValueError(f"teacher cache {self.root} was made with other settings ({', '.join(diff)}): "
                                 "use another directory or delete it")
        else:
            write_bytes_atomic(meta, (json.dumps(fingerprint, indent=1) + "\n").encode())
        self.topk = int(fingerprint["topk"])

    @staticmethod
    def fingerprint(*, teacher: str, teacher_sha256: str, tokens: torch.Tensor, seq_len: int, heldout: int,
                    topk: int, temperature: float) -> dict[str, Any]:
        """What the cached values depend on; `tokens` is every packed sequence (train and held out)."""
        digest = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return {"teacher": teacher, "teacher_sha256": teacher_sha256, "tokens_sha256": digest, "seq_len": seq_len,
                "heldout": heldout, "topk": topk, "temperature": temperature}

    def _path(self, split: str, index: int) -> Path:
        return self.root / f"{split}-{index:07d}.safetensors"

    def missing(self, split: str, indices: Iterable[int]) -> list[int]:
        return sorted({i for i in indices if not self._path(split, i).is_file()})

    @torch.no_grad()
    def fill(self, teacher: torch.nn.Module, split: str, seqs: torch.Tensor, indices: list[int], *,
             temperature: float, micro_batch_size: int, device: torch.device, on_batch=None) -> None:
        """Run the teacher over seqs[indices] and store each sequence's top-k log-probabilities."""
        for a in range(0, len(indices), micro_batch_size):
            chunk = indices[a:a + micro_batch_size]
            logits = teacher(input_ids=seqs[chunk].to(device), use_cache=False).logits  # (b, seq, vocab)
            logp = F.log_softmax(logits.float() / temperature, dim=-1)
            values, idx = logp.topk(self.topk, dim=-1)  # (b, seq, k)
            for j, i in enumerate(chunk):
                tmp = self._path(split, i).with_suffix(".tmp")
                save_file({"logprobs": values[j].cpu().contiguous(), "indices": idx[j].to(torch.int32).cpu()},
                          str(tmp))
                tmp.replace(self._path(split, i))
            if on_batch:
                on_batch(min(a + micro_batch_size, len(indices)), len(indices))

    def load(self, split: str, indices: Iterable[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (b, seq, k) log-probabilities and int64 token indices of the given sequences."""
        parts = [self._read(split, int(i)) for i in indices]
        values = torch.stack([p["logprobs"] for p in parts]).to(device)
        idx = torch.stack([p["indices"] for p in parts]).to(device=device, dtype=torch.int64)
        return values, idx

    def _read(self, split: str, index: int) -> dict[str, torch.Tensor]:
        """One sequence's file, checked: framing, both tensors (seq_len, topk), log-probabilities finite."""
        f = self._path(split, index)
        try:
            part = load_safetensors(f)
        except ValueError as e:
            raise ValueError(f"{e}; delete it and the next run computes it again") from None
        lp, ix = part.get("logprobs"), part.get("indices")
        if lp is None or ix is None or lp.shape != ix.shape or lp.dim() != 2 or lp.shape[1] != self.topk:
            raise ValueError(f"{f}: not a teacher cache file (needs logprobs and indices of shape (seq_len, "
                             f"{self.topk})); delete it and the next run computes it again")
        check_tensors({"logprobs": lp}, what=f"teacher cache {f}")
        return part
