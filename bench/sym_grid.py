"""Symmetric grid choices under RTN W4 g128 on the reference model (DESIGN.md protocol, in memory).

Each variant replaces how `compress.quantize.grid.qparams` picks a symmetric group's scale; the codes are
always the signed -2^(b-1) .. 2^(b-1) - 1 (stored with the zero 2^(b-1)), rounded to nearest:

- "full range (the library's)": scale = the group's largest-magnitude weight / -2^(b-1), signed, so that
  weight is exactly the code -8 (ggml's Q4_0 rule);
- "|max| / 7 (before session 27)": the code -8 is never used;
- "|max| / 7.5": the original GPTQ code's choice (the largest weight rounds to the end of the grid);
- "best of the two per group": full range or |max| / 7, whichever has the lower squared weight error;
- "weight-MSE search": full range shrunk by 1, 0.98 .. 0.8, or |max| / 7, the lowest squared weight error.

    .venv/bin/python bench/sym_grid.py [--windows 64] [--variants NAME ...] [--note TEXT]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import runs  # bench/runs.py (this script's directory is on sys.path)
import torch
from runs import ROOT


def _lowest_error(Wg: torch.Tensor, half: int, scales: list[torch.Tensor]) -> torch.Tensor:
    """Per group, the candidate scale whose rounding has the lowest squared weight error."""
    best, best_err = None, None
    for s in scales:
        q = (torch.round(Wg / s[..., None]) + half).clamp(0, 2 * half - 1)
        err = ((q - half) * s[..., None] - Wg).pow(2).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def variants() -> dict:
    """name -> a function (Wg (out, ng, g) float32, half) -> scale (out, ng), or None for the library's own."""
    def extreme(Wg):
        return Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True)).squeeze(-1)

    return {
        "full range (the library's)": None,
        "|max| / 7 (before session 27)": lambda Wg, half: Wg.abs().amax(-1) / (half - 1),
        "|max| / 7.5": lambda Wg, half: Wg.abs().amax(-1) / (half - 0.5),
        "best of the two per group": lambda Wg, half: _lowest_error(
            Wg, half, [extreme(Wg) / -half, Wg.abs().amax(-1) / (half - 1)]),
        "weight-MSE search": lambda Wg, half: _lowest_error(
            Wg, half, [extreme(Wg) * (1 - 0.02 * i) / -half for i in range(11)] + [Wg.abs().amax(-1) / (half - 1)]),
    }


def main() -> None:
    ap = runs.parser(__doc__, "sym_grid.json")
    ap.add_argument("--variants", nargs="*", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    import compress
    import compress.quantize.grid as grid
    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from compress.pipeline import apply
    from compress.recipe import Recipe
    from compress.runner import evaluate

    compress.load_plugins()
    library = grid.qparams
    table = variants()
    rows = {}
    for name in args.variants or list(table):
        pick = table[name]

        def qparams(W, scheme, pick=pick):
            if pick is None or not scheme.symmetric:
                return library(W, scheme)
            half = 2 ** (scheme.bits - 1)
            s = pick(grid.grouped(W.float(), scheme), half)
            s = torch.where(s.abs() < 1e-30, torch.full_like(s, 1e-30), s).to(scheme.torch_scale_dtype).float()
            return s, torch.full_like(s, float(half))

        grid.qparams = qparams
        lm = load_model()
        t0 = time.time()
        apply(lm.model, Recipe.single("rtn", bits=4, group_size=128, symmetric=True))
        r = evaluate(lm, ["wikitext2"], options={"windows": args.windows})["wikitext2"]
        rows[name] = {"perplexity": r["perplexity"], "seconds": round(time.time() - t0, 1)}
        print(name, f"{r['perplexity']:.4f}", flush=True)
    grid.qparams = library
    out = Path(args.output)
    write_json_atomic(out, {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
                            "protocol": runs.protocol(args.windows), "recipe": "rtn W4 g128 symmetric",
                            "fp32_reference": 24.9150, "machine_note": args.note,
                            "versions": package_versions(), "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
