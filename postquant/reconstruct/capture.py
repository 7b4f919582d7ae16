"""Capturing what a reconstruction unit sees in a model, and replaying the unit on it.

Capture uses forward hooks that always go away, and stops the forward pass right after the unit (an
exception caught here), so capturing unit k costs the model prefix up to k, never the whole model.

Unit inputs are kept as the positional and keyword arguments of the unit's first module (`Captured`, a
pytree node, so that `torch.utils._pytree` walks it like a tuple); its output is the main tensor of its last
module's output (`postquant.eval.run.main_output`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import register_pytree_node, tree_map

from postquant.calib.data import Batch
from postquant.eval.run import main_output, run_model
from postquant.model.blocks import Unit

__all__ = ["Captured", "capture", "run_captured", "unit_forward"]


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs; ends the forward pass early."""


@dataclass
class Captured:
    """Arguments of a module call: positional `args`, keyword `kwargs`."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


register_pytree_node(
    Captured,
    lambda c: ([c.args, c.kwargs], None),
    lambda children, _ctx: Captured(*children),
    serialized_type_name="postquant.reconstruct.capture.Captured",
)


def _detached_copy(obj: Any) -> Any:
    """A copy of every tensor in `obj`, detached, on the device it is on (the model may change it in place)."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, obj)


@contextlib.contextmanager
def capture(model: nn.Module, unit: Unit, want_input: bool, want_output: bool) -> Iterator[dict[str, Any]]:
    """Record the unit's input arguments and/or output during one forward pass, then stop the pass.

    Yields a dict that receives ``"input"`` (a `Captured`) and ``"output"`` (a tensor) after the pass.
    """
    seen: dict[str, Any] = {}
    first = model.get_submodule(unit.modules[0])
    last = model.get_submodule(unit.modules[-1])

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if "input" not in seen:
            seen["input"] = Captured(_detached_copy(args), _detached_copy(kwargs))
            if not want_output:
                raise _StopForward

    def post_hook(_mod: nn.Module, _args: Any, output: Any) -> None:
        if "output" not in seen:
            seen["output"] = main_output(output).detach().clone()
            raise _StopForward

    handles = []
    if want_input:
        handles.append(first.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if want_output:
        handles.append(last.register_forward_hook(post_hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_captured(
    model: nn.Module, unit: Unit, batch: Batch, want_input: bool, want_output: bool
) -> dict[str, Any]:
    """Run `model` on `batch` until the unit has been seen; return what was captured."""
    with capture(model, unit, want_input, want_output) as seen, contextlib.suppress(_StopForward):
        run_model(model, batch)
    missing = [k for k, w in (("input", want_input), ("output", want_output)) if w and k not in seen]
    if missing:
        raise RuntimeError(f"unit {unit.name} was not called in the forward pass (no {', '.join(missing)})")
    return seen


def unit_forward(
    qmodel: nn.Module, unit: Unit, overrides: dict[str, torch.Tensor], inp: Captured
) -> torch.Tensor:
    """Run the unit's modules in order on captured arguments, with parameters/buffers `overrides`.

    Each module's main output (`main_output`) replaces the first positional argument of the next one.
    """
    args, kwargs = inp.args, inp.kwargs
    out: Any = None
    for name in unit.modules:
        mod = qmodel.get_submodule(name)
        sub = {k[len(name) + 1 :]: v for k, v in overrides.items() if k.startswith(name + ".")}
        out = functional_call(mod, sub, args, kwargs)
        args = (main_output(out), *args[1:])
    return main_output(out)
