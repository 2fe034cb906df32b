"""File integrity before reading: a damaged or foreign file is refused with one line naming it.

A truncated download, a half-copied checkpoint or a file that is not what its
name says otherwise surfaces as a parser's traceback (safetensors, GGUF,
protobuf, pickle) or, worse, as a misleading message from a loader that
guessed another format. Every reader of a user's file goes through a check
here first; each raises `ValueError("PATH: damaged ... (how)")`, which the
CLI prints as one `Error:` line. The safetensors check reads only the framing
(8-byte header length, JSON header), never the tensor data.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compress.archs import TESTED, UnsupportedModel, check_causal_lm

HINT = "truncated or corrupted? re-download or re-create it"
MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too

# bits per element of each safetensors dtype (sub-byte float formats included)
_DTYPE_BITS = {"F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
               "I16": 16, "U16": 16, "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
               "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}


def brief(e: BaseException, limit: int = 240) -> str:
    """`Type: message` of an exception on one line, cut to `limit` characters (parsers can be verbose)."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def damaged(path: str | Path, kind: str, how: str) -> ValueError:
    """The one error for a damaged file: `PATH: damaged KIND: HOW (hint)`."""
    return ValueError(f"{path}: damaged {kind}: {how} ({HINT})")


def read_json(path: str | Path, *, what: str = "JSON file") -> Any:
    """Parsed JSON of `path`; a file that is not UTF-8 JSON is refused naming it, line and column."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: damaged {what} (not UTF-8 text: byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: damaged {what} (not valid JSON: line {e.lineno} column {e.colno}: {e.msg})") from None


def read_json_object(path: str | Path, *, what: str = "JSON file") -> dict[str, Any]:
    """`read_json` that must give an object (a dict)."""
    data = read_json(path, what=what)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: damaged {what} (a JSON {type(data).__name__}, not an object)")
    return data


def read_text_file(path: str | Path, *, universal_newlines: bool = True) -> str:
    """A UTF-8 text file's contents (\\r\\n and \\r read as \\n, as `Path.read_text` does, unless
    `universal_newlines` is off); another encoding is refused naming the file, line and byte."""
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
        return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         "save the file as UTF-8") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON Lines file.

    A line that is not UTF-8, not JSON, or JSON but not an object (a number, a
    list) is refused as `PATH:LINE: ...`. Lines are split on newlines only (a
    U+2028 inside a JSON string is not a line break).
    """
    p = Path(path)
    for i, raw in enumerate(p.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}:{i}: not UTF-8 text (byte {e.start} of the line); save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not valid JSON (column {e.colno}: {e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}:{i}: expected a JSON object ({{...}}) per line, got a {type(row).__name__}")
        yield i, row


def checkpoint_mismatch(path: str | Path, names: list[str]) -> ValueError:
    """The error for a checkpoint that lacks some of the model's tensors or holds them in another shape."""
    return ValueError(f"{path}: the checkpoint lacks {len(names)} of the model's tensors or has them in another "
                      f"shape ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")


def load_model_config(model_dir: str | Path) -> Any:
    """transformers' AutoConfig of a model directory; a missing, non-JSON or unloadable config.json is named."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    f = Path(model_dir) / "config.json"
    if not f.is_file():
        raise ValueError(f"{model_dir}: no config.json (the model's architecture); save it with the weights "
                         "(config.save_pretrained)")
    raw = read_json_object(f, what="model config")
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        raise UnsupportedModel(f"{f}: model type {model_type!r} is not one transformers knows; compress takes the "
                               f"decoder-only language models transformers knows (tested: {', '.join(TESTED)})")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError,
            StrictDataclassError) as e:  # transformers 5 validates configs as they load
        raise ValueError(f"{f}: not a loadable model config ({brief(e)})") from None
    check_causal_lm(config, str(model_dir))
    return config


def safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The checked header of a safetensors file (tensor name -> dtype, shape, data_offsets; no `__metadata__`).

    Checks the framing without reading tensor data: the 8-byte little-endian
    header length fits the file, the header is a UTF-8 JSON object, every
    entry has a dtype, a shape and offsets whose span is dtype size x shape,
    and the spans tile the data section exactly up to the end of the file.
    """
    p = Path(path)
    kind = "safetensors file"
    size = p.stat().st_size
    if size == 0:
        raise damaged(p, kind, "the file is empty")
    if size < 8:
        raise damaged(p, kind, f"has {size} bytes, too short for the 8-byte header length")
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER:
            raise damaged(p, kind, f"header length {n} is absurd (garbage at the start of the file?)")
        if 8 + n > size:
            raise damaged(p, kind, f"truncated: has {size} bytes, the header alone promises {8 + n}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(p, kind, f"the header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise damaged(p, kind, f"the header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise damaged(p, kind, f"tensor {name} has no dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
            raise damaged(p, kind, f"tensor {name} has a malformed shape {shape!r} or data_offsets {offsets!r}")
        bits = _DTYPE_BITS.get(dtype)
        if bits is not None:  # an unknown (newer) dtype: its span is checked by the tiling below only
            numel = 1
            for d in shape:
                numel *= d
            if numel * bits != 8 * (offsets[1] - offsets[0]):
                raise damaged(p, kind, f"tensor {name} ({dtype} {shape}) needs {numel * bits // 8} bytes "
                                       f"but its data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise damaged(p, kind, f"tensor {name} starts at byte {begin} of the data, expected {end} "
                                   "(overlapping or gapped tensors)")
        end = stop
    if 8 + n + end > size:
        raise damaged(p, kind, f"truncated: has {size} bytes, the header promises {8 + n + end}")
    if 8 + n + end < size:
        raise damaged(p, kind, f"has {size - 8 - n - end} bytes after the last tensor")
    return header


def check_safetensors(path: str | Path) -> None:
    """Refuse a safetensors file whose framing is damaged (see `safetensors_header`)."""
    safetensors_header(path)


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a checked safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:  # what the framing check cannot see (an unknown dtype, say)
        raise damaged(path, "safetensors file", str(e)) from None


def load_safetensors_into(module: torch.nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """safetensors.torch.load_model(strict=False) of a checked file: (missing, unexpected) names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    check_safetensors(path)
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except SafetensorError as e:
        raise damaged(path, "safetensors file", str(e)) from None
    except RuntimeError as e:  # a tensor of another shape than the module's
        raise ValueError(f"{path}: does not fit the model ({str(e).splitlines()[0]})") from None
    return sorted(missing), sorted(unexpected)


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type (Q4_K, Q6_K, F32, ...) a GGUF file holds (read from its header)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def check_gguf(path: str | Path) -> None:
    """Refuse a file that the `gguf` package cannot parse, or whose tensors run past its end."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{p}: damaged or not a GGUF file (the file is empty; {HINT})")
    try:
        import gguf
    except ImportError:
        return  # nothing to check with; the loader says what it needs
    try:
        reader = gguf.GGUFReader(str(p))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    # the reader is a hand-written parser over a memory map: a damaged file raises whatever it trips on
    # (ValueError, KeyError, IndexError, struct/numpy errors), so anything it raises means "damaged"
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p}: damaged or not a GGUF file ({brief(e)}; {HINT})") from None
    if end > size:
        raise ValueError(f"{p}: damaged or not a GGUF file (truncated: has {size} bytes, its tensors end at "
                         f"{end}; {HINT})")
    if not reader.tensors:
        raise ValueError(f"{p}: damaged or not a GGUF file (it holds no tensors; {HINT})")


def onnx_session(path: str | Path, options: Any = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime.InferenceSession of `path`; a graph it cannot load is refused naming the file."""
    import onnxruntime as ort

    p = Path(path)
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: damaged or not an ONNX model (the file is empty; {HINT})")
    try:
        return ort.InferenceSession(str(p), options, providers=providers)
    # onnxruntime's errors (InvalidProtobuf, Fail, NoSuchFile, ...) derive from Exception directly
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p}: damaged or not an ONNX model ({brief(e)}; {HINT}, and keep "
                         "its .onnx_data file beside it)") from None


def load_pickled(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` of a pickled checkpoint (memory-mapped when it is a zip archive).

    Only call this after the user allowed pickle. A file that does not load is
    refused as "not a loadable PyTorch checkpoint" (transformers would guess
    a TensorFlow checkpoint instead).
    """
    p = Path(path)
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: not a loadable PyTorch checkpoint (the file is empty; {HINT})")
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    # the unpickler raises what the bytes make it trip on (UnpicklingError, EOFError, RuntimeError, ...)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "WeightsUnpickler error:" in msg:  # torch's advice (weights_only=False) is wrong for a damaged file
            why = msg.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
            raise ValueError(f"{p}: not a loadable PyTorch checkpoint (the safe unpickler refused it: {why}; "
                             f"{HINT}, or not a PyTorch file)") from None
        raise ValueError(f"{p}: not a loadable PyTorch checkpoint ({brief(e)}; {HINT})") from None


def check_weights_file(path: str | Path) -> None:
    """The check that fits the file's kind: safetensors framing, or (pickle allowed) a loadable checkpoint."""
    p = Path(path)
    if p.suffix == ".safetensors":
        check_safetensors(p)
    elif p.suffix == ".gguf":
        check_gguf(p)
    else:
        load_pickled(p)
