"""The architecture matrix: which architectures each pass and exporter takes.

    python bench/arch_matrix.py                   # print the README's table (from tests/test_arch_matrix.py)
    python bench/arch_matrix.py --run [ARCH ...]  # run every cell now; write JSON, flag cells the table gets wrong

The table is generated from the expectations the tests assert (`CELLS`, `REFUSED` and `WHY` in
tests/test_arch_matrix.py): a cell is "works" when the tests run it and check its numbers, else the reason
of its one-line refusal. `--run` runs the commands alone, without the numeric checks (about four minutes on
2 cores), and records the outcome of each: "ok", the refusal line, or "CRASH: ..." (a bug).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_arch_matrix import ARCHS, CELLS, REFUSED, WHY, cell_args, make_arch_model  # noqa: E402


def expected(arch: str, column: str) -> str:
    want = REFUSED.get((arch, column))
    return "works" if want is None else f"no: {WHY[want]}"


def markdown() -> str:
    cols = list(CELLS)
    lines = ["| architecture | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {arch} | " + " | ".join(expected(arch, c) for c in cols) + " |" for arch in ARCHS]
    return "\n".join(lines) + "\n"


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.data import wikitext2_path

    text = wikitext2_path("validation").read_text(encoding="utf-8")[:200_000]
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
    return (lines[-1] if lines else result.output.strip()[-200:])[:300]


def run(archs: list[str], output: str) -> int:
    from click.testing import CliRunner

    from compress.artifact import package_versions, write_json_atomic
    from compress.cli import cli

    tok, runner, rows, wrong = tokenizer(), CliRunner(), {}, []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="arch-matrix-") as tmp:
        root = Path(tmp)
        for arch in archs:
            src = root / arch
            make_arch_model(arch, len(tok) + 8).save_pretrained(src)
            tok.save_pretrained(src)
            rows[arch] = {}
            for column, cmd in CELLS.items():
                model = src
                if cmd[0] == "export" and rows[arch].get("rtn") == "ok":
                    model = root / f"{arch}-rtn"
                out = root / f"{arch}-{column.replace(' ', '_')}"
                got = rows[arch][column] = outcome(runner.invoke(cli, cell_args(column, model, out)))
                want = REFUSED.get((arch, column))
                if (got == "ok") != (want is None) or (want is not None and want not in got):
                    wrong.append(f"{arch} / {column}: table says {expected(arch, column)!r}, got {got!r}")
            print(arch, json.dumps(rows[arch], indent=1), flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "seconds": round(time.time() - t0, 1),
           "what": __doc__.split("\n\n")[2].replace("\n", " "), "versions": package_versions(), "rows": rows,
           "differs_from_table": wrong}
    write_json_atomic(output, doc)
    for line in wrong:
        print("DIFFERS:", line)
    return 1 if wrong else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run the cells instead of printing the table")
    ap.add_argument("archs", nargs="*", help="with --run: these architectures only")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "arch_matrix.json"))
    args = ap.parse_args()
    if not args.run:
        print(markdown(), end="")
        return
    unknown = sorted(set(args.archs) - set(ARCHS))
    if unknown:
        sys.exit(f"unknown architectures {unknown}; the matrix has {', '.join(ARCHS)}")
    sys.exit(run(args.archs or list(ARCHS), args.output))


if __name__ == "__main__":
    main()
