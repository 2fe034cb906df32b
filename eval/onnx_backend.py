"""ONNX Runtime scoring backend: a causal-LM ONNX graph (as optimum exports it) run by an InferenceSession.

The graph takes `input_ids` and, where it declares them, `attention_mask`,
`position_ids` and an empty KV cache (`past_key_values.*`, exports "with
past"); its `logits` output scores every position. Multiple-choice requests
go through `generic_loglikelihoods` (one sequence per choice), so only
`token_nll` is model-specific. A graph ONNX Runtime cannot load (a truncated
or foreign file, missing external data) is refused naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.backends import TokenizerMixin
from eval.masked import MaskedScoring

log = logging.getLogger(__name__)

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def onnx_files(path: str | Path) -> tuple[Path, Path] | None:
    """(model file, its directory) when `path` is an .onnx file or a directory holding model.onnx, else None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return p, p.parent
    if p.is_dir():
        for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx"):
            if (p / name).is_file():
                return p / name, p
    return None


def ort_backend_for(path: str | Path, *, threads: int | None = None) -> OrtBackend:
    """The ONNX Runtime backend for the graph at `path`: a masked-LM encoder's (pseudo-perplexity) when the
    config beside it says so, else a causal LM's."""
    from compress.archs import is_masked_lm

    found = onnx_files(path)
    if found is not None and (found[1] / "config.json").is_file():
        from transformers import AutoConfig

        if is_masked_lm(AutoConfig.from_pretrained(found[1])):
            return OrtMaskedLMBackend(path, threads=threads)
    return OrtBackend(path, threads=threads)


class OrtBackend(TokenizerMixin):
    """Score with ONNX Runtime (CPU by default); the tokenizer comes from the model's directory."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        from compress.files import onnx_session
        from compress.models import load_tokenizer

        found = onnx_files(path)
        if found is None:
            raise ValueError(f"{path}: no .onnx model found (expected a .onnx file or a directory with model.onnx)")
        self.model_path, self.dir = found
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = onnx_session(self.model_path, opts, providers=list(providers))
        self.tokenizer = load_tokenizer(self.dir)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in self.inputs or "logits" not in [o.name for o in self.session.get_outputs()]:
            raise ValueError(f"{self.model_path}: not a causal-LM graph (needs input 'input_ids', output 'logits')")
        out_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self.dtype = {"tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}.get(out_type, "float32")

    def _feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        b, n = ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": ids.astype(_NP.get(self.inputs["input_ids"].type, np.int64))}
        for name, info in self.inputs.items():
            if name == "attention_mask":
                feeds[name] = np.ones((b, n), dtype=_NP.get(info.type, np.int64))
            elif name == "token_type_ids":  # an encoder's: every token in the first segment
                feeds[name] = np.zeros((b, n), dtype=_NP.get(info.type, np.int64))
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(n), (b, n)).astype(_NP.get(info.type, np.int64))
            elif name.startswith("past_key_values") or name.startswith("past_"):
                # an empty cache: (batch, kv heads, 0, head dim); the named dims come from the graph
                shape = [b if i == 0 else (0 if i == 2 else d) for i, d in enumerate(info.shape)]
                if any(not isinstance(d, int) for d in shape):
                    raise ValueError(f"{self.model_path}: cannot size cache input {name} {info.shape}")
                feeds[name] = np.zeros(shape, dtype=_NP.get(info.type, np.float32))
            elif name not in feeds:
                raise ValueError(f"{self.model_path}: unsupported graph input {name!r}")
        return feeds

    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        arr = ids.cpu().numpy()
        if bos is not None:
            arr = np.concatenate([np.full((arr.shape[0], 1), bos, dtype=arr.dtype), arr], axis=1)
        logits = self.session.run(["logits"], self._feeds(arr))[0]  # (B, L[+1], V)
        if bos is not None:
            logits = logits[:, 1:]
        lg = torch.from_numpy(np.ascontiguousarray(logits[:, :-1])).float()
        tgt = ids[:, 1:].cpu()
        nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
        return nll.view(ids.shape[0], -1).double()

    def identity(self) -> dict[str, Any]:
        """What is scored: the graph file(s), their hash and size, parameter count from the initializers."""
        import onnx

        from compress import artifact

        files = sorted({self.model_path, *self.dir.glob(f"{self.model_path.name}_data"),
                        *self.dir.glob("*.onnx_data")})
        graph = onnx.load(str(self.model_path), load_external_data=False).graph
        # a MatMulNBits node holds K x N weights in its packed inputs: count those, not the bytes
        packed = {i for n in graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
        n_params = sum(int(np.prod(t.dims)) for t in graph.initializer if t.name not in packed)
        n_params += sum(next(a.i for a in n.attribute if a.name == "K") * next(a.i for a in n.attribute if a.name == "N")
                        for n in graph.node if n.op_type == "MatMulNBits")
        size = sum(f.stat().st_size for f in files)
        return {"name": str(self.dir), "path": str(self.dir), "files": [f.name for f in files],
                "sha256": artifact.sha256_files(files), "bytes_on_disk": size, "parameters": n_params,
                "bits_per_parameter": 8 * size / max(n_params, 1), "format": "onnx"}


class OrtMaskedLMBackend(MaskedScoring, OrtBackend):
    """A masked-LM encoder's ONNX graph (`export.onnx_encoder`) in ONNX Runtime."""

    def __init__(self, path, *, threads: int | None = None) -> None:
        from transformers import AutoConfig

        super().__init__(path, threads=threads)
        self.device = torch.device("cpu")
        cfg = AutoConfig.from_pretrained(self.dir)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._masked_init(int(cfg.vocab_size))

    def _mlm_logits(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], self._feeds(batch.cpu().numpy()))[0]
        return torch.from_numpy(logits)
