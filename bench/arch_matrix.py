"""Which architectures each pass and exporter takes: a tiny random model per architecture, built from its real
transformers config class, through every command; prints the works / refused table and writes it as JSON.

    python bench/arch_matrix.py [ARCH ...] [--output bench/results/arch_matrix.json] [--markdown FILE]

A cell is "ok" when the command wrote its output, else the one-line error it gave ("CRASH: ..." when that was
an unexpected exception: a bug). "ok" means the command ran, not that its numbers were checked: the tests do
that for the architectures they cover. Runs in about four minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H = 64
COMMON = dict(vocab_size=520, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
LLAMA_LIKE = dict(hidden_size=H, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def configs():
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**LLAMA_LIKE, **COMMON),
        "mistral": lambda: T.MistralConfig(**LLAMA_LIKE, **COMMON, head_dim=16, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**LLAMA_LIKE, **COMMON),
        "qwen3": lambda: T.Qwen3Config(**LLAMA_LIKE, **COMMON, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**LLAMA_LIKE, **COMMON, head_dim=16, query_pre_attn_scalar=16,
                                         sliding_window=16),
        "gemma3_text": lambda: T.Gemma3TextConfig(**LLAMA_LIKE, **COMMON, head_dim=16, query_pre_attn_scalar=16,
                                                  sliding_window=16),
        "phi3": lambda: T.Phi3Config(**LLAMA_LIKE, **COMMON),
        "gpt2": lambda: T.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_inner=160, vocab_size=520, n_positions=256,
                                     bos_token_id=0, eos_token_id=1),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=H, intermediate_size=160, num_hidden_layers=2,
                                            num_attention_heads=4, **COMMON),
        "opt": lambda: T.OPTConfig(hidden_size=H, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=H, **COMMON),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**LLAMA_LIKE, **COMMON, head_dim=16, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32),
        "mixtral": lambda: T.MixtralConfig(**LLAMA_LIKE, **COMMON, num_local_experts=4, num_experts_per_tok=2),
    }


CAL = ["--calib-samples", "4", "--calib-seq-len", "64"]
COMMANDS = {
    "rtn": ["quantize", "--method", "rtn", "--group-size", "32"],
    "gptq": ["quantize", "--method", "gptq", "--group-size", "32", *CAL],
    "awq": ["quantize", "--method", "awq", "--group-size", "32", *CAL],
    "w8a8": ["quantize", "--bits", "8", "--activations", "int8", "--smoothquant", "0.5", *CAL],
    "wanda": ["prune", "--method", "wanda", "--sparsity", "0.5", *CAL],
    "sparsegpt 2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *CAL],
    "prune_channels": ["prune", "--structure", "channels", "--ratio", "0.25", *CAL],
    "prune_heads": ["prune", "--structure", "heads", "--ratio", "0.5", *CAL],
    "prune_layers": ["prune", "--structure", "layers", "--ratio", "0.5", *CAL],
}
EXPORTS = ("onnx", "gguf")  # of the rtn artifact


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.data import wikitext2_path

    text = wikitext2_path("validation").read_text(encoding="utf-8")[:100_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def outcome(result) -> str:
    if result.exit_code == 0:
        return "ok"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"CRASH: {type(result.exception).__name__}: {result.exception}"[:200]
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    return (lines[-1] if lines else result.output.strip()[-200:])[:200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archs", nargs="*")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "arch_matrix.json"))
    ap.add_argument("--markdown", help="also write the table as Markdown here")
    args = ap.parse_args()
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from compress.artifact import package_versions, write_json_atomic
    from compress.cli import cli

    table = configs()
    archs = args.archs or list(table)
    tok, runner, rows = tokenizer(), CliRunner(), {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="arch-matrix-") as tmp:
        root = Path(tmp)
        for arch in archs:
            torch.manual_seed(0)
            src = root / arch
            AutoModelForCausalLM.from_config(table[arch]()).save_pretrained(src)
            tok.save_pretrained(src)
            rows[arch] = {}
            for name, cmd in COMMANDS.items():
                out = root / f"{arch}-{name.replace(' ', '_')}"
                rows[arch][name] = outcome(runner.invoke(cli, [cmd[0], str(src), *cmd[1:], "--out", str(out)]))
                if name == "rtn":
                    for fmt in EXPORTS:
                        rows[arch][fmt] = outcome(runner.invoke(cli, [
                            "export", str(out), "--format", fmt, "--out", str(root / f"{arch}-{fmt}")])
                            ) if rows[arch]["rtn"] == "ok" else "(no rtn artifact)"
            print(arch, json.dumps(rows[arch], indent=1), flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "seconds": round(time.time() - t0, 1),
           "what": __doc__.split("\n\n")[2].replace("\n", " "), "versions": package_versions(), "rows": rows}
    write_json_atomic(args.output, doc)
    if args.markdown:
        cols = [*COMMANDS, *EXPORTS]
        lines = ["| architecture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for arch, row in rows.items():
            lines.append(f"| {arch} | " + " | ".join("works" if row[c] == "ok" else "no" for c in cols) + " |")
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
