"""llama.cpp scoring backend: a GGUF file run by llama-cpp-python (the runtime GGUF artifacts are made for).

llama.cpp computes in its own way (quantized weights multiply activations it
rounds to 8 bits per block), so scoring a GGUF file here measures what a
llama.cpp user gets, not the dequantized weights in torch. Token ids come
from the tokenizer stored in the GGUF file (llama.cpp's own); multiple
choice goes through `generic_loglikelihoods`. The file is checked with the
`gguf` reader first: llama.cpp itself reports a damaged file only as "failed
to load model".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class LlamaCppBackend:
    """Score with llama.cpp: each window evaluated from an empty cache, logits of every position kept."""

    name = "llama.cpp"
    dtype = "float32"  # activations are float32 between llama.cpp's quantized matmuls

    def __init__(self, path: str | Path, *, threads: int | None = None, n_ctx: int = 2048,
                 n_batch: int = 512) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ValueError(f"scoring a GGUF file in llama.cpp needs llama-cpp-python ({e}); "
                             "pip install llama-cpp-python (it compiles llama.cpp, ~15 min)") from None
        from compress.files import check_gguf
        from compress.models import gguf_file

        f = gguf_file(path)
        if f is None:
            raise ValueError(f"{path}: no .gguf file found")
        check_gguf(f)
        self.path = f
        self.n_ctx = n_ctx
        try:
            self.llama = Llama(model_path=str(f), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                               n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
        except (ValueError, RuntimeError) as e:  # llama.cpp: "Failed to load model from file"
            raise ValueError(f"{f}: llama.cpp cannot load it ({type(e).__name__}: {e}); a GGUF of an "
                             "architecture or tensor type this llama.cpp build does not know?") from None
        bos = self.llama.token_bos()
        self.bos_token_id = bos if bos >= 0 else None
        self.adds_bos = bool(self.llama.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")

    def encode(self, text: str) -> list[int]:
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def decode(self, ids: list[int]) -> str:
        return self.llama.detokenize(ids).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (L, V) of every position of one sequence, from an empty cache."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"a sequence of {len(ids)} tokens exceeds the llama.cpp context of {self.n_ctx}")
        self.llama.reset()
        self.llama.eval(list(ids))
        return np.array(self.llama.scores[: len(ids)], dtype=np.float32)

    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            seq = ([bos] if bos is not None else []) + row
            lg = torch.from_numpy(self.logits(seq))
            if bos is not None:
                lg = lg[1:]
            nll = torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(row[1:]), reduction="none")
            rows.append(nll.double())
        return torch.stack(rows)

    def loglikelihoods(self, requests, progress=None):
        from eval.backends import generic_loglikelihoods

        return generic_loglikelihoods(self, requests, progress)

    def identity(self) -> dict[str, Any]:
        """What is scored: the GGUF file, its hash and size, parameter count from its tensor shapes."""
        import gguf

        from compress import artifact

        reader = gguf.GGUFReader(str(self.path))
        n_params = sum(int(np.prod([int(d) for d in t.shape])) for t in reader.tensors)
        size = self.path.stat().st_size
        return {"name": str(self.path.parent if self.path.name == "model.gguf" else self.path),
                "path": str(self.path), "files": [self.path.name], "sha256": artifact.sha256_files([self.path]),
                "bytes_on_disk": size, "parameters": n_params, "bits_per_parameter": 8 * size / max(n_params, 1),
                "format": "gguf", "runtime": "llama.cpp"}

    def close(self) -> None:
        self.llama.close()
