"""Replaying one decoder block stage by stage without recomputing what is final (GPTQ, SparseGPT).

A pass that rewrites a block's Linears stage by stage (q/k/v, then o, then
gate/up, then down) needs the block's forward once per stage, each time on
the same calibration batches. `BlockReplay` runs those forwards and keeps
what no longer changes, within a memory bound: see its docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import (
    BlockInputs,
    _autocast,
    _first,
    _replace,
    _stages,
    _watching,
    forward_batch,
)


@dataclass
class _Child:
    """A direct child of a block that runs once per forward and contains targets."""

    name: str
    module: nn.Module
    targets: set[str]
    last: str | None  # the target whose output is the child's output (Llama: o_proj, down_proj), if one is
    tail: tuple | None  # the rest of a tuple output (e.g. (None,) for attention weights); None: the output itself
    keep_output: bool  # False when the output is wider than the block's input (OPT's fc1): it is recomputed


class BlockReplay:
    """The calibration passes over one decoder block of a pass that changes it stage by stage (GPTQ).

    `observe` runs the block over every batch, calling on_input(name, x) with
    the inputs of the watched modules; `freeze` tells it which modules reached
    their final weights; `run` replaces the batches by the block's outputs for
    the next block. Between passes only the target modules may change (or be
    replaced: modules are looked up by name when a pass begins).

    What no longer changes is not recomputed. For each child of the block (for
    Llama: self_attn, mlp):
    - once its targets and every target running before it are final, its
      output is the same in every later pass: it is kept and returned;
    - when its output is its last target's output (o_proj, down_proj) and all
      targets before that one are final, that target's input is kept and the
      child is replaced by the target applied to it.
    A tensor that takes more bytes than the block's input (down_proj's input,
    OPT's fc1 output: the MLP's intermediate width) is not kept: kept for every
    batch it would cost more memory than the calibration activations
    themselves, so what produces it runs again instead.
    So the attention runs twice per block (for o_proj's and for the MLP's
    Hessians only through o_proj; later passes take its output), and the
    output pass runs the MLP once more.
    Forwards run under autocast to `dtype` when given; block outputs keep the
    dtype of the block inputs.
    """

    def __init__(self, block: nn.Module, inputs: BlockInputs, targets: dict[str, nn.Module], *,
                 dtype: torch.dtype | None = None) -> None:
        self.block, self.inputs, self.targets, self.dtype = block, inputs, targets, dtype
        self.frozen: set[str] = set()
        self._outs: dict[str, list] = {}  # child -> its output per batch
        self._ins: dict[str, list] = {}  # child -> its last target's input per batch
        self._i = 0
        self._patched: list[tuple[nn.Module, Callable | None]] = []
        self._handles: list = []
        self._recording: list[tuple[dict[str, list], str, dict[int, object]]] = []
        self._inspect()

    def _inspect(self) -> None:
        """One forward of the first batch: stage order, which children run once, what they return."""
        order: list[tuple[str, torch.Tensor]] = []
        calls: list[str] = []
        child_out: dict[str, object] = {}
        target_out: dict[str, list] = {}
        children = dict(self.block.named_children())
        handles = []
        for n, m in self.targets.items():
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=n: order.append((n, args[0]))))
            handles.append(m.register_forward_hook(lambda mod, args, out, n=n: target_out.setdefault(n, []).append(out)))
        for n, m in children.items():
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=n: calls.append(n)))
            handles.append(m.register_forward_hook(lambda mod, args, out, n=n: child_out.__setitem__(n, out)))
        try:
            with torch.no_grad(), _autocast(self.inputs.hidden[0].device, self.dtype):
                self.block(self.inputs.hidden[0], **self.inputs.kwargs[0])
        finally:
            for h in handles:
                h.remove()
        self.stages = _stages(order, self.targets)
        ran = [n for n, _ in order]
        inputs_of = dict(reversed(order))  # target -> its input on the first call
        # a tensor kept for every batch may take at most what the block's input takes: more would cost more
        # memory than the calibration activations themselves, for time saved only in the later passes
        budget = _nbytes(self.inputs.hidden[0])
        self._children = []
        for c in dict.fromkeys(calls):
            inside = {t for t in self.targets if t == c or t.startswith(f"{c}.")}
            if calls.count(c) != 1 or not inside:
                continue
            last, tail = ([n for n in ran if n in inside] or [None])[-1], None
            outs, out = target_out.get(last, []), child_out.get(c)
            if last == c:
                last = None  # the child is a target itself: nothing inside it to skip
            elif last is not None and _nbytes(inputs_of[last]) > budget:
                last = None  # too wide to keep (down_proj's input): the child runs again
            elif len(outs) == 1 and out is outs[0]:
                pass  # the child returns its last target's output
            elif (len(outs) == 1 and isinstance(out, tuple) and out and out[0] is outs[0]
                  and all(o is None for o in out[1:])):
                tail = out[1:]  # ... as the first element of a tuple of Nones
            else:
                last = None
            first_out = _first(out)
            keep = not isinstance(first_out, torch.Tensor) or _nbytes(first_out) <= budget
            self._children.append(_Child(c, children[c], inside, last, tail, keep))

    def freeze(self, names) -> None:
        self.frozen.update(names)

    @torch.no_grad()
    def observe(self, watched: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None], *,
                stop_early: bool = True) -> None:
        """One pass over all batches; with `stop_early` each forward ends once every watched module saw its input."""
        self._begin_pass(watched, last_pass=False)  # its recording hooks come before the watching ones
        try:
            _watching(watched, on_input, stop_early, len(self.inputs.hidden), self._forward)
        finally:
            self._end_pass()

    @torch.no_grad()
    def run(self, on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Replace each batch by the block's output (in place: one copy in memory); the last pass.
        `on_batch(input, output)`, when given, sees each batch's input (a copy) and output."""
        self._begin_pass({}, last_pass=True)
        try:
            for i in range(len(self.inputs.hidden)):
                before = self.inputs.hidden[i].clone() if on_batch is not None else None
                _replace(self.inputs.hidden, i, _first(self._forward(i)))
                if on_batch is not None:
                    on_batch(before, self.inputs.hidden[i])
        finally:
            self._end_pass()
            self._outs.clear()
            self._ins.clear()

    def _forward(self, i: int):
        self._i = i
        return forward_batch(self.block, self.inputs, i, self.dtype)

    def _begin_pass(self, watched: dict[str, nn.Module], *, last_pass: bool) -> None:
        """Serve what is kept from memory; start keeping what became final."""
        settled = True  # every target that runs before the current child is final
        for ch in self._children:
            inner_final = settled and ch.targets - {ch.last} <= self.frozen
            settled = settled and ch.targets <= self.frozen
            if settled and ch.keep_output and not ch.targets & watched.keys():
                if ch.name in self._outs:
                    self._patch(ch.module, lambda outs=self._outs[ch.name]: outs[self._i])
                    continue
                if not last_pass:
                    self._keep(ch.name, self._outs, ch.module.register_forward_hook,
                               lambda mod, args, out: out)
            if ch.last is not None and inner_final:
                if ch.name in self._ins:
                    last, tail = self.block.get_submodule(ch.last), ch.tail
                    self._patch(ch.module, lambda ins=self._ins[ch.name], last=last, tail=tail:
                                last(ins[self._i]) if tail is None else (last(ins[self._i]), *tail))
                elif not last_pass:
                    # prepended: recorded before a watching hook can end the forward
                    self._keep(ch.name, self._ins,
                               functools.partial(self.block.get_submodule(ch.last).register_forward_pre_hook, prepend=True),
                               lambda mod, args: args[0])

    def _patch(self, module: nn.Module, fn: Callable[[], object]) -> None:
        # an instance-level forward (e.g. an accelerate hook) is put back afterwards
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = lambda *args, **kwargs: fn()

    def _keep(self, name: str, into: dict[str, list], register: Callable, pick: Callable) -> None:
        got: dict[int, object] = {}
        self._recording.append((into, name, got))
        self._handles.append(register(lambda *a: got.__setitem__(self._i, pick(*a))))

    def _end_pass(self) -> None:
        for module, before in self._patched:
            if before is None:
                del module.forward
            else:
                module.forward = before
        for h in self._handles:
            h.remove()
        n = len(self.inputs.hidden)
        for into, name, got in self._recording:
            if len(got) == n:  # complete: no forward stopped before it was reached
                into[name] = [got[i] for i in range(n)]
        for name in self._outs:
            self._ins.pop(name, None)  # the output is kept: the input it came from is not needed
        self._patched, self._handles, self._recording = [], [], []


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()
