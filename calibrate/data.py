"""Calibration windows: token windows drawn from the text of a calibration source (the bundled WikiText-2
validation split or a user file, read by `compress.data.read_source_text`).

Windows are contiguous `seq_len`-token slices of the tokenized text at random
offsets chosen by `seed`, the sampling GPTQ and AWQ use for C4/WikiText.
Calibration never reads the test split, which is reserved for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    source: str = "wikitext2"  # calibration text: "wikitext2" (validation split), a .txt file, or FILE.jsonl:FIELD
    samples: int = 128  # calibration windows
    seq_len: int = 512  # tokens per window
    seed: int = 0  # seed for drawing the windows

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("calibration needs samples >= 1 and seq_len >= 2")


def load_calibration(tokenizer, cfg: CalibConfig, text: str) -> torch.Tensor:
    """(samples, seq_len) int64 token windows of `text`, the contents of `cfg.source`
    (`compress.data.read_source_text`)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= cfg.seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than seq_len={cfg.seq_len}")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.samples,), generator=g)
    return torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
