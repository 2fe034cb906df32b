"""CLI options generated from a config dataclass: type, default and help come from the field itself.

A field `lr: float = 5e-5  # AdamW peak learning rate` becomes
`--lr FLOAT  AdamW peak learning rate [default: 5e-05]`. The option's own
default is None, so a command passes on only what was given and the config
supplies the rest: `--help`, `compress passes` and a recipe step without the
key all show and use the one default the dataclass declares.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import tokenize
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from compress.cli._common import FINITE, progress_bar


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class body, for `cls` and the dataclasses it inherits from: the comment
    trailing its line with the comment lines right below it, or, for a field with no trailing comment, the
    comment lines right above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        notes = {t.start[0]: t.string.lstrip("#").strip()
                 for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
        field, block = None, []  # the field whose trailing comment may go on; the comment lines since
        for row, line in enumerate(source.splitlines(), 1):
            if line.lstrip().startswith("#"):
                block.append(notes[row])
                continue
            name = m[1] if (m := re.match(r"    (\w+)\s*:", line)) and m[1] in names else None
            if name and row not in notes and block:
                out[name] = " ".join(block)
            elif field and block:
                out[field] += " " + " ".join(block)
            field, block = (name if name and row in notes else None), []
            if field:
                out[field] = notes[row]
    return out


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def show_default(value: Any) -> str:
    """A default as the CLI and `compress passes` show it."""
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class _IntChoice(click.Choice):
    """A choice among integers (`--bits 4`): shown and typed as text, given on as an int."""

    def convert(self, value, param, ctx):
        return int(super().convert(str(value), param, ctx))


class _CommaList(click.ParamType):
    """A comma-separated list of one type (`--weights 0.7,0.3`)."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner, self.name = inner, f"{inner.name}[,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple | list):
            return tuple(value)
        try:
            return tuple(self.inner.convert(v.strip(), param, ctx) for v in str(value).split(",") if v.strip())
        except click.BadParameter as e:
            self.fail(f"expected comma-separated numbers such as 0.7,0.3 ({e.message}), got {value!r}", param, ctx)


def _click_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """(click type, extra option settings) for a field annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _click_type(inner[0]) if len(inner) == 1 else (str, {})
    if origin is typing.Literal:
        return (_IntChoice if all(isinstance(a, int) for a in args) else click.Choice)([str(a) for a in args]), {}
    if origin is tuple:
        inner, _ = _click_type(args[0] if args else str)
        if inner is str:
            return str, {"multiple": True}
        return _CommaList(inner if isinstance(inner, click.ParamType) else click.INT), {}
    return {bool: bool, int: click.INT, float: FINITE, str: str}.get(tp, str), {}


def config_options(cls: type, *, into: str, skip: tuple[str, ...] = (), names: dict[str, str] | None = None,
                   helps: dict[str, str] | None = None) -> Callable:
    """Decorator adding one option per init field of config dataclass `cls` (except `skip`). `names` renames
    options (field -> option name without dashes, e.g. {"seed": "train-seed"}); `helps` replaces a help text.
    The command receives the options given as one keyword `into`: a dict field -> value (tuples as lists)."""
    names, helps = names or {}, helps or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            mine = {f.name: kw.pop(f"{into}__{f.name}") for f in fields}
            given = {k: list(v) if isinstance(v, tuple) else v for k, v in mine.items() if v is not None and v != ()}
            return fn(**kw, **{into: given})

        for f in reversed(fields):
            flag = "--" + names.get(f.name, f.name.replace("_", "-"))  # a bool may be named "on/--off"
            tp, extra = _click_type(hints[f.name])
            text = helps.get(f.name, comments.get(f.name, "")).rstrip(".")
            default = default_of(f)
            shown = show_default(default)
            if tp is bool and "/" in flag:  # "--sym/--asym": the default is the flag that means it
                shown = flag.split("/")[0 if default else 1]
            text = f"{text} [default: {shown}]".strip()
            dest = f"{into}__{f.name}"
            if tp is bool:
                command = click.option(flag if "/" in flag else f"{flag}/--no-{flag[2:]}", dest, default=None,
                                       help=text)(command)
            else:
                command = click.option(flag, dest, type=tp, default=None, help=text, **extra)(command)
        return command

    return deco


_CALIB = {"source": "calib", "samples": "calib-samples", "seq_len": "calib-seq-len", "seed": "seed"}
PICKLE_HELP = "Allow pickled .bin checkpoints (loaded with weights_only=True)."


@dataclasses.dataclass(frozen=True)
class Output:
    """A writing command's --out, --force, --allow-pickle and calibration (`calibrate.data.CalibConfig`)."""

    out: str
    force: bool
    allow_pickle: bool
    calib: Any
    min_expert_tokens: int | None = None

    def run(self, model: str | None, recipe: Any, **kw: Any) -> dict[str, Any]:
        """`compress_model` with a progress bar; returns the artifact's summary."""
        from compress.runner import compress_model

        if self.min_expert_tokens is not None:
            recipe = recipe.with_setting("min_expert_tokens", self.min_expert_tokens, where="--min-expert-tokens")

        with progress_bar() as progress:
            return compress_model(model, recipe, self.out, force=self.force, allow_pickle=self.allow_pickle,
                                  calib=self.calib, progress=progress, **kw)


def output_options(fn: Callable | None = None, *, pickle_help: str = PICKLE_HELP) -> Callable:
    """--out, --force, --allow-pickle and the `CalibConfig` fields (--calib, --calib-samples, --calib-seq-len,
    --seed) for a command that writes a model; the command receives them as one keyword `output` (`Output`)."""
    from calibrate.data import CalibConfig

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            output = Output(kw.pop("out"), kw.pop("force"), kw.pop("allow_pickle"), CalibConfig(**kw.pop("calib")),
                            kw.pop("min_expert_tokens"))
            return fn(**kw, output=output)

        command = click.option("--min-expert-tokens", type=click.IntRange(min=0), default=None,
                               help="Mixture of experts: an expert routed fewer calibration tokens than this is "
                                    "calibrated on all of its layer's tokens (named in the report).  [default: 64]"
                               )(command)
        command = config_options(CalibConfig, into="calib", names=_CALIB)(command)
        command = click.option("--allow-pickle", is_flag=True, help=pickle_help)(command)
        command = click.option("--force", is_flag=True, help="Overwrite --out if it exists.")(command)
        return click.option("--out", required=True, type=click.Path(), help="Directory to write.")(command)

    return deco(fn) if fn is not None else deco
