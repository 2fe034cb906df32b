from dataclasses import dataclass

import pytest

from compress.pipeline import PassReport
from compress.registry import PASSES, PassSpec, Registry, register_pass


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown pass 'nope'; known: .*rtn"):
        PASSES.get("nope")


def test_duplicate_name_with_other_function_refused():
    reg: Registry = Registry("pass")

    @dataclass(frozen=True, kw_only=True)
    class C:
        x: int = 1

    reg.add(PassSpec("a", C, lambda m, c, k: None))
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(PassSpec("a", C, lambda m, c, k: None))


def test_register_pass_needs_frozen_dataclass():
    @dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass("mutable", Mutable)


def test_the_decorator_only_describes_the_hook_registers_once():
    """register_pass attaches a spec; only a plugin hook puts it in a registry, and the built-ins register every
    pass exactly once."""
    from compress.plugins import builtin

    @dataclass(frozen=True, kw_only=True)
    class NoopConfig:
        factor: float = 1.0

    @register_pass("_test_noop", NoopConfig)
    def run(model, cfg, calib=None):
        return PassReport(name="_test_noop", config={})

    assert run.pass_spec.name == "_test_noop" and run.pass_spec.run is run
    assert "_test_noop" not in PASSES  # described, not registered
    seen: list[str] = []
    reg: Registry = Registry("pass")
    builtin.register_passes(register=lambda fn: seen.append(reg.add(fn.pass_spec).name))
    assert sorted(seen) == reg.names() == PASSES.names()  # each once; what load_plugins registered
    assert {"gptq", "awq", "scale_tune", "lora_merge", "prune_layers"} <= set(seen)


def test_an_empty_registry_says_how_to_fill_it():
    with pytest.raises(ValueError, match="no plugins are loaded; call compress.load_plugins"):
        Registry("pass").get("gptq")
