"""Peak memory of `compress quantize --method gptq` on a model far larger than one block.

Builds (once, cached under --work) a randomly initialised Llama-architecture
model of about 1.85 B parameters (hidden 2048, 32 layers, MLP 5632, the
reference model's 49152-token vocabulary, untied head) saved as fp32
safetensors, one shard per block, written tensor group by tensor group so the
builder itself stays small. Then runs the real CLI in a child process and
reads the child's peak RSS from the kernel (getrusage of children). Writes
bench/results/memory_large.json with the ratio peak RSS / fp32 size.

    .venv/bin/python bench/memory_large.py [--work /tmp/compress-large] [--calib-samples 8 --calib-seq-len 256]

Calibration is small by default: the point is the weight-streaming peak; the
activations add samples x seq_len x hidden x 4 bytes (8 x 256 x 2048 x 4 = 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 32, "vocab_size": 49152, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


def build(dest: Path) -> None:
    """Write the random model block by block (never more than one block in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from compress.reference import reference_model_dir

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPE)
    h, m, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    shards: list[dict] = [{"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h),
                           "lm_head.weight": rnd(v, h)}]
    weight_map = {}
    total = 0
    for i in range(n + 1):
        if i:
            p = f"model.layers.{i - 1}."
            shards = [{p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
                       p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
                       p + "mlp.gate_proj.weight": rnd(m, h), p + "mlp.up_proj.weight": rnd(m, h),
                       p + "mlp.down_proj.weight": rnd(h, m), p + "input_layernorm.weight": torch.ones(h),
                       p + "post_attention_layernorm.weight": torch.ones(h)}]
        name = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        save_file(shards[0], str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in shards[0].values())
        weight_map.update(dict.fromkeys(shards[0], name))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(reference_model_dir()).save_pretrained(tmp)
    tmp.rename(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/compress-large")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "memory_large.json"))
    args = ap.parse_args()
    work = Path(args.work)
    model = work / "random-llama-1.8b"
    if not model.exists():
        t0 = time.perf_counter()
        build(model)
        print(f"built {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    fp32_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    import safetensors

    params = 0
    for f in model.glob("*.safetensors"):
        with safetensors.safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118
                shape = h.get_slice(k).get_shape()
                params += int(__import__("math").prod(shape))
    out = work / "gptq-out"
    cmd = [str(ROOT / ".venv" / "bin" / "compress"), "quantize", str(model), "--method", "gptq",
           "--bits", args.bits, "--group-size", args.group_size, "--calib-samples", str(args.calib_samples),
           "--calib-seq-len", str(args.calib_seq_len), "--out", str(out), "--force"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit("quantize failed")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    artifact = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    res = {"command": " ".join(["python", *sys.argv]), "quantize_command": " ".join(cmd),
           "model": SHAPE, "parameters": params, "fp32_safetensors_bytes": fp32_bytes,
           "peak_rss_bytes": peak, "peak_rss_over_fp32": peak / fp32_bytes, "wall_seconds": round(wall, 1),
           "artifact_bytes": artifact, "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens"}
    from compress.artifact import package_versions, write_json_atomic

    res["versions"] = package_versions()
    write_json_atomic(Path(args.output), res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
