"""Faults during a save: `kill -9` at several points leaves nothing that the next run does not clean up, and the
rerun writes a byte-identical artifact; a write that fails (file-size limit, as on a full disk) names the user's
path and leaves nothing behind."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Run the CLI in a child that SIGKILLs itself at one point of the save. Each point patches the function the
# save goes through there, so the kill lands exactly inside it.
KILLER = r"""
import os, signal, sys
point = sys.argv[1]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

import compress.lazy as lazy
import compress.artifact as artifact
if point == "spill":  # a block's quantized tensors written to the spill directory
    assert lazy.save_file
    lazy.save_file = die
elif point == "stream":  # the model's tensors streamed into the temporary artifact
    assert lazy.write_streamed  # (the name the save calls: a stale patch point must fail, not pass)
    lazy.write_streamed = die
elif point == "provenance":  # the artifact's last file, compress.json
    real = artifact.write_json_atomic
    artifact.write_json_atomic = lambda path, data: die() if path.name == "compress.json" else real(path, data)
elif point == "tokenizer":
    from transformers import PreTrainedTokenizerBase
    PreTrainedTokenizerBase.save_pretrained = die
elif point == "rename":  # the temporary directory about to become the artifact
    real_rename = os.rename
    os.rename = lambda a, b: die() if ".tmp-" in str(a) else real_rename(a, b)
sys.argv = ["compress", *sys.argv[2:]]
from compress.cli import main
main()
"""

POINTS = ["spill", "stream", "provenance", "tokenizer", "rename"]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESS_")}
    env.update(COMPRESS_SPILL_DIR=str(tmp), TMPDIR=str(tmp), PYTHONPATH=str(Path(__file__).parents[2]))
    return env


def _files(d: Path) -> dict[str, bytes]:
    """The artifact's bytes, file by file; compress.json without its creation time and pass durations."""
    out = {}
    for f in sorted(d.iterdir()):
        data = f.read_bytes()
        if f.name == "compress.json":
            doc = json.loads(data)
            doc.pop("created")
            for r in doc["reports"]:
                r.pop("seconds")  # wall time: the one thing a rerun may not reproduce
            data = json.dumps(doc, sort_keys=True).encode()
        out[f.name] = data
    return out


def _leftovers(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.iterdir() if p.name.startswith((".", "compress-spill-"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dirs):
    """The artifact of an undisturbed run (the tiny Llama, RTN W4 g32: streamed block by block with spills)."""
    from compress.recipe import Recipe
    from compress.runner import compress_model

    out = tmp_path_factory.mktemp("ref") / "q"
    compress_model(model_dirs["llama"], Recipe.single("rtn", group_size=32), out)
    return _files(out)


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_during_a_save_leaves_nothing_a_rerun_does_not_clean(cli, model_dirs, reference, tmp_path, point):
    work, spill = tmp_path / "work", tmp_path / "spill"
    work.mkdir()
    spill.mkdir()
    out = work / "q"
    args = ["quantize", str(model_dirs["llama"]), "--method", "rtn", "--group-size", "32", "--out", str(out)]
    child = subprocess.run([sys.executable, "-c", KILLER, point, *args], env=_env(spill), capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr[-2000:])
    assert not out.exists()
    # the rerun (this process, same spill root) sweeps what the killed one left, and writes the same artifact
    os.environ["COMPRESS_SPILL_DIR"] = str(spill)
    try:
        o = cli(*args)
    finally:
        del os.environ["COMPRESS_SPILL_DIR"]
    assert o.code == 0, o.text
    assert _files(out) == reference
    assert _leftovers(work, spill) == []


def test_a_failed_write_names_the_output_and_leaves_nothing(model_dirs, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, what a full disk looks like to a writer): one line naming --out."""
    out, spill = tmp_path / "q", tmp_path / "spill"
    spill.mkdir()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(), not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    child = subprocess.run([sys.executable, "-m", "compress", "quantize", str(model_dirs["llama"]), "--method", "rtn",
                            "--out", str(out)], env=_env(spill), capture_output=True, text=True, timeout=300,
                           preexec_fn=limit)
    assert child.returncode == 1, child.stderr[-2000:]
    errors = [ln for ln in child.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and f"could not write {out}" in errors[0] and ".tmp-" not in errors[0], child.stderr
    assert "Traceback" not in child.stderr
    assert not out.exists() and _leftovers(tmp_path, spill) == []
