"""Recipes: an ordered list of pass steps, read from and written to flat YAML.

A recipe file is a YAML list; each item names its pass with `pass:` and gives
config fields with exactly the names of the pass's config dataclass::

    - pass: rtn
      bits: 4
      group_size: 128
      symmetric: true

Loading is strict and happens before any model is touched: an unknown pass,
an unknown key or a value of the wrong type fails with a message that names
the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import sysconfig
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compress.registry import PASSES, PassSpec

# recipes/*.yaml, the chains `--method NAME` names: beside the source, else where a wheel puts them (data-files)
PRESETS = Path(__file__).resolve().parent.parent / "recipes"
PRESETS = PRESETS if PRESETS.is_dir() else Path(sysconfig.get_path("data")) / "share" / "compress" / "recipes"


@dataclass(frozen=True)
class Step:
    """One recipe step: a registered pass name and its validated config."""

    name: str
    config: Any

    @property
    def spec(self) -> PassSpec:
        return PASSES.get(self.name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.name}
        for f in self.spec.fields():
            v = getattr(self.config, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class Recipe:
    """An ordered, immutable list of steps."""

    steps: tuple[Step, ...]

    @classmethod
    def from_steps(cls, items: list[dict[str, Any]], *, where: str = "recipe") -> Recipe:
        if not isinstance(items, list) or not items:
            raise ValueError(f"{where}: a recipe is a non-empty YAML list of steps, each with 'pass:'")
        return cls(tuple(_parse_step(item, f"{where}: step {i + 1}") for i, item in enumerate(items)))

    @classmethod
    def from_yaml(cls, text: str, *, where: str = "recipe", **fields: Any) -> Recipe:
        """The recipe in YAML `text`; `fields` are added to every step (a preset's scheme and selection)."""
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: not valid YAML: {e}") from None
        if fields and isinstance(items, list):
            items = [{**s, **fields} if isinstance(s, dict) else s for s in items]
        return cls.from_steps(items, where=where)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"recipe not found: {p}")
        return cls.from_yaml(p.read_text(encoding="utf-8"), where=str(p))

    @classmethod
    def single(cls, name: str, **fields: Any) -> Recipe:
        """A one-step recipe; every CLI command builds one of these."""
        return cls.from_steps([{"pass": name, **fields}], where=f"{name} options")

    @classmethod
    def for_method(cls, method: str, **fields: Any) -> Recipe:
        """`compress quantize --method METHOD`: the preset recipes/METHOD.yaml (a chain of passes, e.g.
        awq+gptq), else the pass METHOD alone; every step takes `fields` (the scheme and selection)."""
        preset = PRESETS / f"{method}.yaml"
        if preset.is_file():
            return cls.from_yaml(preset.read_text(encoding="utf-8"), where=f"--method {method} ({preset})", **fields)
        if method not in PASSES:
            presets = sorted(p.stem for p in PRESETS.glob("*.yaml")) if PRESETS.is_dir() else []
            raise ValueError(f"unknown method {method!r}: not a pass ({', '.join(PASSES.names())}) nor a preset "
                             f"in {PRESETS} ({', '.join(presets) or 'none'})")
        return cls.single(method, **fields)

    def with_setting(self, name: str, value: Any, *, where: str) -> Recipe:
        """This recipe with field `name` set to `value` in every step whose pass has that field (a command-line
        setting such as --min-expert-tokens); a recipe without such a step is refused (the setting would do
        nothing)."""
        items = self.to_list()
        hits = [it for it, st in zip(items, self.steps, strict=True) if name in {f.name for f in st.spec.fields()}]
        if not hits:
            raise ValueError(f"{where} applies to calibrated passes; none of {', '.join(s.name for s in self.steps)} "
                             "calibrates")
        for it in hits:
            it[name] = value
        return Recipe.from_steps(items, where=where)

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.steps]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_list(), sort_keys=False)


def _parse_step(item: Any, where: str) -> Step:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: each step is a mapping with a 'pass:' key, got {type(item).__name__}")
    if "pass" not in item:
        raise ValueError(f"{where}: missing 'pass:'; known passes: {', '.join(PASSES.names())}")
    name = item["pass"]
    if not isinstance(name, str):
        raise ValueError(f"{where}: 'pass' must be a string")
    try:
        spec = PASSES.get(name)  # unknown name -> ValueError listing the known ones
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    fields = {f.name: f for f in spec.fields()}
    kwargs: dict[str, Any] = {}
    for key, value in item.items():
        if key == "pass":
            continue
        if key not in fields:
            raise ValueError(
                f"{where} ({name}): unknown key {key!r}; valid keys: {', '.join(fields)}"
            )
        kwargs[key] = _coerce(value, typing.get_type_hints(spec.config_cls)[key], f"{where} ({name}).{key}")
    try:
        cfg = spec.config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where} ({name}): {e}") from None
    return Step(name, cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` (from YAML or the CLI) against annotation `tp`; lists become tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # (True == 1, but is not 1)
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every `x < 0` check: refuse it (and inf) here for all passes
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML 1.1 reads unquoted 2:4 as the base-60 number 124
            hint = " (quote it: YAML reads an unquoted 2:4 as a number)" if isinstance(value, int) else ""
            raise ValueError(f"{where}: expected a string, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"{where}: nested configs are not supported in recipes")
    return value
