"""The one entry from the modules to the recurrence: describe the call, route it, run it."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend, _plan
from ._driver import Packing, layer_dims, reference_layer, run_layers
from .cells import Cell


def autocast_on(input: Tensor) -> bool:
    """Whether autocast is on for the input's device: torch ops then pick their own dtypes, so
    a mismatch of input, state and weight dtypes is autocast's to resolve (as in torch.nn).
    The meta device has no autocast (torch raises when asked): meta tensors take the plain path,
    which routes them to the reference's torch ops (no kernel supports them), so shapes come out."""
    if input.is_cpu:  # (without making a device object: this runs at every call)
        return torch.is_autocast_enabled("cpu")
    return not input.is_meta and torch.is_autocast_enabled(input.device.type)


_DIMS: dict = {}  # (cell mode, weight shapes) -> Dims


def describe(cell: Cell, x: Tensor, state: Optional[tuple], params: Sequence, num_layers: int, directions: int,
             dropout: bool) -> _plan.Call:
    """The ``Call`` of a layer call on the time-major input ``x`` (T, B, I)."""
    grad_mode = torch.is_grad_enabled()
    dtype = x.dtype
    grad = grad_mode and x.requires_grad
    mixed = False
    for p in params:
        for t in p:
            if t is not None:
                grad = grad or (grad_mode and t.requires_grad)
                mixed = mixed or t.dtype is not dtype  # (torch's dtypes are singletons)
    for s in state or ():
        grad = grad or (grad_mode and s.requires_grad)
        mixed = mixed or s.dtype is not dtype
    if autocast_on(x):
        special = "autocast"
    elif torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        special = "transform"  # (torch.func's transforms and forward-mode AD see through torch ops only)
    elif mixed:
        special = "mixed dtypes"
    else:
        special = ""
    p = params[0]
    key = (cell.mode, p.weight_ih.shape, p.weight_hh.shape)
    dims = _DIMS.get(key)
    if dims is None:
        dims = _DIMS[key] = layer_dims(cell, p)
        if len(_DIMS) > 256:
            _DIMS.clear()
    T, B = x.shape[:2]
    return _plan.Call(cell, num_layers, directions, T, B, dims, dtype, "cpu" if x.is_cpu else x.device.type,
                      grad_mode, grad, dropout, _backend.get_backend(), special, torch.compiler.is_compiling())


def run(cell: Cell, x: Tensor, state: Optional[tuple], params: Sequence, num_layers: int, directions: int,
        dropout: float, training: bool, packing: Optional[Packing]) -> tuple:
    """(output (T, B, D * H_out), state_n) of a stack, by the route ``_plan.route`` picks."""
    call = describe(cell, x, state, params, num_layers, directions, dropout > 0 and training and num_layers > 1)
    route = _plan.route(call)
    reverses = (False, True)[:directions]
    if route.path == "reference":
        layer = reference_layer
    elif route.path == "compiled":
        from . import _op

        layer = _op.layer
    else:
        from . import _nodes

        if not route.by_layer:
            steps = _nodes.steps_of(call.steps, call.batch, None if packing is None else packing.batch_sizes)
            plan = _nodes.Plan(cell, steps, num_layers, reverses, route.path == "step")
            return _nodes.run_stack(plan, x, state, list(params), call.grad)
        layer = _nodes.layer_fn(route.path == "step", call.grad)
    return run_layers(cell, layer, x, state, params, num_layers, reverses, dropout, training, packing)
