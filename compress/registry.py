"""Name -> spec registries for passes, exporters and eval tasks.

These registries are the only global mutable state of the package, and this
module imports nothing of the package. Built-in entries and plugin entries
arrive the same way, once: through the pluggy hooks in `compress.hookspecs`,
called by `compress.plugins.load_plugins()`, which the CLI and
`compress.runner` call at start-up (Python users: `compress.load_plugins()`).
The decorators below only attach a spec to the function; the hook registers it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar


@dataclass(frozen=True)
class PassSpec:
    """A pass: a frozen config dataclass plus `run(model, cfg, calib) -> PassReport`."""

    name: str
    config_cls: type
    run: Callable[..., Any]
    # or, for passes that need it only sometimes: (config, model) -> bool, asked just before the pass runs
    needs_calibration: bool | Callable[[Any, Any], bool] = False
    # works on a lazily loaded model, one decoder block in memory at a time (or: for which configs it does)
    streams_blocks: bool | Callable[[Any], bool] = False

    def calibrates(self, config: Any, model: Any) -> bool:
        """Whether the pass, with this config and on this model, needs calibration data."""
        c = self.needs_calibration
        return bool(c(config, model) if callable(c) else c)

    def streams(self, config: Any) -> bool:
        """Whether the pass, with this config, can run on a lazily loaded model."""
        return bool(self.streams_blocks(config) if callable(self.streams_blocks) else self.streams_blocks)

    @property
    def summary(self) -> str:
        return _first_line(inspect.getmodule(self.run).__doc__ or self.run.__doc__)

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.config_cls) if f.init]


@dataclass(frozen=True)
class ExporterSpec:
    """An exporter: `export(loaded_model, out_dir, **options)` writing one artifact format."""

    name: str
    export: Callable[..., Any]
    check_config: Callable[[Any], None] | None = None  # refuses, from the config alone, a model it cannot write

    @property
    def summary(self) -> str:
        return _first_line(self.export.__doc__)


@dataclass(frozen=True)
class TaskSpec:
    """An eval task: `run(backend, cfg, **options) -> result dict`, cfg an instance of `config` (a frozen dataclass)."""

    name: str
    run: Callable[..., Any]
    config: type | None = None
    # check(argument) -> None: validates `--task NAME:ARGUMENT` (its file exists and parses) before any model loads
    check: Callable[[str], Any] | None = None

    @property
    def summary(self) -> str:
        return _first_line(self.run.__doc__)


S = TypeVar("S", PassSpec, ExporterSpec, TaskSpec)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


class Registry(Generic[S]):
    """A name -> spec mapping that refuses silent redefinition."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, S] = {}

    def add(self, spec: S) -> S:
        old = self._specs.get(spec.name)
        if old is not None and old != spec:
            raise ValueError(f"{self.kind} {spec.name!r} is registered twice ({old} and {spec})")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> S:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or ("(none: no plugins are loaded; call "
                                                       "compress.load_plugins() first, as the CLI and runner do)")
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __iter__(self) -> Iterator[S]:
        return iter([self._specs[n] for n in sorted(self._specs)])

    def __contains__(self, name: object) -> bool:
        return name in self._specs


PASSES: Registry[PassSpec] = Registry("pass")
EXPORTERS: Registry[ExporterSpec] = Registry("exporter")
TASKS: Registry[TaskSpec] = Registry("task")


def register_pass(name: str, config_cls: type, *, needs_calibration: bool | Callable[[Any, Any], bool] = False,
                  streams_blocks: bool | Callable[[Any], bool] = False):
    """Decorator: make `run(model, cfg, calib) -> PassReport` pass `name` (a plugin hook registers it)."""
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"pass {name!r}: config must be a frozen dataclass, got {config_cls!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.pass_spec = PassSpec(name, config_cls, fn, needs_calibration, streams_blocks)
        return fn

    return deco


def register_exporter(name: str, *, check_config: Callable[[Any], None] | None = None):
    """Decorator: make `export(loaded_model, out_dir, **options)` format `name` (a plugin hook registers it).
    `check_config(config)` raises ValueError for a model the format cannot hold, before the model loads."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.exporter_spec = ExporterSpec(name, fn, check_config)
        return fn

    return deco


def register_task(name: str, *, config: type | None = None, check: Callable[[str], Any] | None = None):
    """Decorator: make an eval task function task `name` (a plugin hook registers it), taking a `config`
    instance as its second argument (and `path=` when the task takes an argument, `--task NAME:ARGUMENT`,
    which `check` validates up front)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.task_spec = TaskSpec(name, fn, config, check)
        return fn

    return deco

