"""pluggy hook specifications of the `compress` plugin system.

A plugin is any distribution that declares an entry point in the group
`compress` pointing at a module (or object) with one or more of these hooks::

    [project.entry-points.compress]
    my_plugin = "my_package.compress_plugin"

Each hook receives a `register` callable taking a spec (or a function decorated
with `compress.registry.register_pass` / `register_exporter` / `register_task`).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("compress")
hookimpl = pluggy.HookimplMarker("compress")


@hookspec
def register_passes(register: Callable) -> None:
    """Register passes: call `register(fn_or_spec)` for each."""


@hookspec
def register_exporters(register: Callable) -> None:
    """Register exporters: call `register(fn_or_spec)` for each."""


@hookspec
def register_tasks(register: Callable) -> None:
    """Register eval tasks: call `register(fn_or_spec)` for each."""
