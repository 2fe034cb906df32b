"""LoRA merge into an int4 artifact vs merge in fp32 then quantize; writes bench/results/lora_merge_reference.json.

A LoRA adapter (r 16, alpha 32, every Linear of the blocks) is trained with
peft for a few steps on the WikiText-2 validation split, on the reference
model. Then, under the DESIGN.md perplexity protocol (WikiText-2 test, 64 x
1024), in one run:
  fp32              the reference model
  fp32+lora         the adapter merged in float (`lora_merge`)
  int4              a `compress quantize --bits 4 --method M` artifact (M: --method, default gptq; W4 g128)
  int4<-lora        the adapter merged into that int4 artifact: the touched layers are dequantized, merged and
                    re-quantized with the artifact's recorded method (GPTQ, fresh calibration)
  fp32+lora->int4   merge in fp32, then the same quantization recipe from scratch
The issue asks int4<-lora to be within 1 % of fp32+lora->int4.

    .venv/bin/python bench/lora_merge_reference.py [--windows 64] [--steps 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.artifact import package_versions, write_json_atomic
from compress.data import wikitext2_path
from compress.models import load_model
from compress.quantize.presets import quantize_recipe
from compress.recipe import Recipe
from compress.runner import compress_model, evaluate, weights_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(out: Path, steps: int, seq_len: int, batch: int, lr: float) -> dict:
    """A peft LoRA adapter for the reference model, trained on the validation split; saved to `out`."""
    from peft import LoraConfig, get_peft_model

    lm = load_model()
    text = wikitext2_path("validation").read_text(encoding="utf-8")
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False).input_ids)
    n = ids.numel() // seq_len
    ids = ids[: n * seq_len].view(n, seq_len)  # (sequences, seq_len)
    torch.manual_seed(0)
    model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        x = ids[order[step * batch:(step + 1) * batch]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"  adapter step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    model.save_pretrained(out)
    return {"r": 16, "lora_alpha": 32, "targets": TARGETS, "steps": steps, "batch": batch, "seq_len": seq_len,
            "lr": lr, "losses": losses, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="gptq", help="quantization method of the int4 artifact (awq+gptq: the default)")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "lora_merge_reference.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    doc: dict = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "versions": package_versions(),
                 "quantization": quantize_recipe(args.method, bits=4).to_list(), "rows": {}}

    def row(name: str, path: str | None, **extra) -> None:
        t0 = time.perf_counter()
        r = evaluate(load_model(path), ["wikitext2"], options={"windows": args.windows})["wikitext2"]
        doc["rows"][name] = {"perplexity": r["perplexity"], "protocol": r["protocol"], **extra}
        if path:
            doc["rows"][name]["bytes"] = weights_bytes(Path(path))
        print(f"{name:16s} ppl {r['perplexity']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        write_json_atomic(Path(args.output), doc)

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        tmp = Path(tmp)
        print("training the adapter", flush=True)
        doc["adapter"] = train_adapter(tmp / "adapter", args.steps, args.seq_len, args.batch, args.lr)
        merge = {"pass": "lora_merge", "adapters": [str(tmp / "adapter")]}
        quant = quantize_recipe(args.method, bits=4).to_list()
        # (row, source, steps, output directory)
        runs = [("fp32+lora", None, [merge], "fp32_lora"), ("int4", None, quant, "int4"),
                ("int4<-lora", tmp / "int4", [merge], "int4_merged"),
                ("fp32+lora->int4", None, [merge, *quant], "fp32_lora_int4")]
        row("fp32", None)
        for name, src, steps, dest in runs:
            t0 = time.perf_counter()
            summary = compress_model(src, Recipe.from_steps(steps), tmp / dest)
            seconds = round(time.perf_counter() - t0, 1)
            reports = {r["name"]: r for r in summary["reports"]}
            extra = {"seconds": seconds}
            if "lora_merge" in reports:
                extra["merge"] = {"metrics": reports["lora_merge"]["metrics"], "modules": reports["lora_merge"]["modules"],
                                  "requantized": reports["lora_merge"]["config"].get("requantized", {}).get("method")}
            row(name, str(tmp / dest), **extra)
    rows = doc["rows"]
    doc["int4_merge_vs_merge_then_quantize"] = rows["int4<-lora"]["perplexity"] / rows["fp32+lora->int4"]["perplexity"] - 1
    write_json_atomic(Path(args.output), doc)
    print(f"merged into int4 vs merge-then-quantize: {100 * doc['int4_merge_vs_merge_then_quantize']:+.2f} %")


if __name__ == "__main__":
    main()
