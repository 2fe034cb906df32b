"""Choose the modules a pass works on from `targets` and `ignore` patterns.

A pattern matches a module when it is
- the module's exact qualified name (`model.layers.0.self_attn.q_proj`),
- the module's class name (`Linear`; exact class, not subclasses), or
- `re:` followed by a regular expression matched at the start of the name
  (`re:.*self_attn\\.(q|k)_proj$`), as in llm-compressor recipes.

`lm_head` (and an encoder's masked-LM head, or a bare encoder's pooler) is in
every pass's default `ignore`, so the output projection stays in float unless
a recipe gives its own `ignore` list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from calibrate.experts import fused_experts

DEFAULT_TARGETS: tuple[str, ...] = ("Linear",)
# the output head: a decoder's lm_head, an encoder's masked-LM head (BERT's cls.predictions.*, RoBERTa's lm_head.*),
# a bare encoder's pooler (BertModel's pooler.dense over [CLS]: a classification head outside the encoder blocks)
DEFAULT_IGNORE: tuple[str, ...] = ("lm_head", "re:(lm_head|cls|pooler)\\.")


def validate_patterns(patterns: Iterable[str], field: str) -> None:
    """Raise ValueError for a pattern that is not a string or a bad regex."""
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{field}: patterns are non-empty strings, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{field}: bad regular expression {p!r}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The `targets` / `ignore` fields of a pass's config (a base class; cooperates with others)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS  # class names, exact names or 're:' regexes
    ignore: tuple[str, ...] = DEFAULT_IGNORE  # replaces the default; the output head is left alone by default

    def __post_init__(self) -> None:
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")
        getattr(super(), "__post_init__", lambda: None)()


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def select(
    model: nn.Module,
    targets: Iterable[str] = DEFAULT_TARGETS,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    kinds: tuple[type, ...] = (nn.Module,),
) -> dict[str, nn.Module]:
    """Modules matched by any target and by no ignore pattern, in model order.

    Only modules of `kinds` are returned: a regex or class pattern that also
    matches other modules (an activation inside `mlp`) skips them, but an exact
    name of a module of another kind is an error. Raises ValueError when the
    targets match nothing, so a typo in a recipe is not a silent no-op.
    """
    targets, ignore = tuple(targets), tuple(ignore)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if any(matches(name, module, t) for t in targets) and not any(
            matches(name, module, i) for i in ignore
        ):
            if isinstance(module, kinds):
                chosen[name] = module
            elif name in targets:
                kind_names = ", ".join(k.__name__ for k in kinds)
                raise ValueError(f"target {name} is a {type(module).__name__}; this pass applies to {kind_names}")
    refuse_uncompressible(model, kinds)
    if not chosen:
        raise ValueError(
            f"targets {list(targets)} (ignore {list(ignore)}) matched no module of "
            f"{type(model).__name__}; use class names such as 'Linear', exact module names "
            "or 're:' regular expressions"
        )
    return chosen


def refuse_uncompressible(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> None:
    """Refuse a model that keeps projection weights outside modules of `kinds`, where the bulk of it would
    silently stay float: fused 3-D tensors (mixture-of-experts experts in a layout `calibrate.experts` does
    not split) or GPT-2's `transformers.pytorch_utils.Conv1D` (x @ W + b, W stored (in, out))."""
    if nn.Module in kinds:
        return
    found = [(n, "fused 3-D tensors", "mixture-of-experts experts") for n in fused_experts(model, kinds)]
    found += [(n, "GPT-2-style Conv1D modules", "weights stored transposed") for n, m in model.named_modules()
              if type(m).__name__ == "Conv1D" and not isinstance(m, kinds)]
    if found:
        name, what, why = found[0]
        more = sum(f[1] == what for f in found) - 1
        raise ValueError(f"{type(model).__name__} keeps weights in {what} ({name}{f' and {more} more' if more else ''}"
                         f": {why}), which this pass does not compress yet")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
