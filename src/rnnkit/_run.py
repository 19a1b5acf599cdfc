"""The one entry from the modules to the recurrence: describe the call, route it, run it."""

from __future__ import annotations

import operator
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend, _plan
from ._arrays import weight_arrays
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


_NODES: dict = {}  # "" -> rnnkit._nodes once loaded (with the kernels: not at ``import rnnkit``)


def _load_nodes():
    from . import _nodes

    _NODES[""] = _nodes
    return _nodes


def needs(x: Tensor, params, state: Optional[tuple]) -> tuple:
    """(grad mode, whether a gradient is needed, special) of a call on ``x`` with these parameter
    tensors (None where absent) and state: special is what only torch ops can run ("autocast",
    "transform", "mixed dtypes") or ""."""
    grad_mode = torch.is_grad_enabled()
    dtype = x.dtype
    grad = grad_mode and x.requires_grad
    mixed = False
    for t in params:
        if t is not None:
            grad = grad or (grad_mode and t.requires_grad)
            mixed = mixed or t.dtype is not dtype  # (torch's dtypes are singletons)
    for s in state or ():
        grad = grad or (grad_mode and s.requires_grad)
        mixed = mixed or s.dtype is not dtype
    if torch._C._is_any_autocast_enabled() and autocast_on(x):  # (the first asks no device)
        special = "autocast"
    elif torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        special = "transform"  # (torch.func's transforms and forward-mode AD see through torch ops only)
    elif mixed:
        special = "mixed dtypes"
    else:
        special = ""
    return grad_mode, grad, special


def _key(cell: Cell, x: Tensor, state: Optional[tuple], params: Sequence, num_layers: int, directions: int,
         dropout: bool, regular: bool = False) -> tuple:
    """Everything of a layer call that its route depends on, as a hashable key (``_call`` makes
    the ``Call`` from it): routes are remembered per key (``_plan.route_of``). ``regular``:
    recurrent dropout or zoneout is in force."""
    grad_mode, grad, special = needs(x, (t for p in params for t in p), state)
    p = params[0]
    T, B = x.shape[:2]
    compiling = torch.compiler.is_compiling()
    return (cell, p.weight_ih.shape, p.weight_hh.shape, num_layers, directions, T, B, x.dtype,
            "cpu" if x.is_cpu else x.device.type, grad_mode, grad, dropout, _backend.get_backend(), special,
            compiling, 0 if compiling else torch.get_num_threads(), regular)  # (the tracer takes no int from torch.*)


def _call(key: tuple, p) -> _plan.Call:
    cell, _, _, num_layers, directions, T, B, dtype, device, grad_mode, grad, dropout, backend, special, \
        compiling, _, regular = key
    return _plan.Call(cell, num_layers, directions, T, B, layer_dims(cell, p), dtype, device, grad_mode, grad,
                      dropout, backend, special, compiling, regular=regular)


def describe(cell: Cell, x: Tensor, state: Optional[tuple], params: Sequence, num_layers: int, directions: int,
             dropout: bool) -> _plan.Call:
    """The ``Call`` of a layer call on the time-major input ``x`` (T, B, I)."""
    return _call(_key(cell, x, state, params, num_layers, directions, dropout), params[0])


def run(cell: Cell, x: Tensor, state: Optional[tuple], params: Sequence, num_layers: int, directions: int,
        dropout: float, training: bool, packing: Optional[Packing], module=None,
        regulars: Optional[list] = None) -> tuple:
    """(output (T, B, D * H_out), state_n) of a stack, by the route ``_plan.route`` picks (for
    ``module``'s call: its later calls of the same kind then take the short path, ``layer_fast``).
    ``regulars``: per layer-direction, the recurrent regularizers in force (_driver.draw_regular)."""
    key = _key(cell, x, state, params, num_layers, directions, dropout > 0 and training and num_layers > 1,
               regulars is not None)
    # (remembered per key, but while torch.compile traces: the tracer follows the routing itself)
    route = _plan.route(_call(key, params[0])) if key[14] else _plan.route_of(key, lambda: _call(key, params[0]))
    reverses = (False, True)[:directions]
    if route.path == "reference":
        layer = reference_layer
    elif route.path == "compiled":
        from . import _op

        layer = _op.layer
    else:
        nodes = _NODES.get("") or _load_nodes()
        grad = key[10]
        if not route.by_layer:
            steps = nodes.steps_of(x.shape[0], x.shape[1], None if packing is None else packing.batch_sizes)
            plan = nodes.Plan(cell, steps, num_layers, reverses, route.path == "step",
                              None if regulars is None else tuple(regulars))
            if module is not None and packing is None and not key[13] and regulars is None:
                _remember(module, key, plan, params, state)
            return nodes.run_stack(plan, x, state, list(params), grad)
        layer = nodes.layer_fn(route.path == "step", grad)
    return run_layers(cell, layer, x, state, params, num_layers, reverses, dropout, training, packing, regulars)


# ---- the short path. A model calls its layer with the same sizes again and again (a streaming
# step, a training loop): ``layer_fast`` answers such a call (dense batched input, hx None or
# tensors of the expected shapes, the parameters as last time) with a handful of checks against
# what the full path found then (``_KNOWN``: per module, its parameters and their addresses, and
# per kind of call (T, B, grad mode, gradients needed, backend, threads) the fused plan), and
# returns None to send anything else down the full path (module checks, route, records).
class _Known:
    __slots__ = ("module", "mode", "training", "batch_first", "dropout", "get", "names", "flat", "arrays",
                 "params", "dtype", "input_size", "state_size", "plans")


_KNOWN: dict = {}  # id(module) -> _Known
_requires_grad = operator.attrgetter("requires_grad")


def layer_fast(module, input, hx=None):
    """(output, h_n) of a layer call like one the full path ran before, or None."""
    entry = _KNOWN.get(id(module))
    if (entry is None or entry.module() is not module or type(input) is not Tensor or input.dim() != 3
            or torch._C._is_any_autocast_enabled() or torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0 or torch._C._get_tracing_state() is not None
            or module.mode != entry.mode or module.training != entry.training or module.dropout != entry.dropout
            or module.batch_first != entry.batch_first or module.zoneout
            or (entry.training and (module.recurrent_dropout or module.weight_drop))):  # (see RNNBase)
        return None
    try:
        flat = list(map(entry.get, entry.names))
    except KeyError:
        return None
    if not all(map(operator.is_, flat, entry.flat)):
        return None
    # the parameters' arrays: the same views as last time, or else their memory, shape or
    # strides changed (the full path then checks them against the module's sizes)
    arrays = [weight_arrays(p) for p in entry.params]
    for new, known in zip(arrays, entry.arrays):
        for a, b in zip(new, known):
            if a is not b:
                return None
    x = input.transpose(0, 1) if entry.batch_first else input
    T, B, I = x.shape
    if I != entry.input_size or x.dtype is not entry.dtype or not x.is_cpu:
        return None
    grad_mode = torch.is_grad_enabled()
    grad = grad_mode and x.requires_grad
    if hx is None:
        state = None
    else:
        state = (hx,) if entry.state_size == 1 else hx if type(hx) is tuple and len(hx) == 2 else None
        if state is None:
            return None
    if grad_mode and not grad:  # (gradients needed: of a parameter or a state)
        grad = any(map(_requires_grad, flat)) or (state is not None and any(
            type(s) is Tensor and s.requires_grad for s in state))
    found = entry.plans.get((T, B, grad_mode, grad, _backend.get_backend(), torch.get_num_threads(), _plan.EPOCH))
    if found is None:
        return None
    plan, shapes, grad = found
    if state is not None:
        for s, shape in zip(state, shapes):
            if type(s) is not Tensor or s.shape != shape or s.dtype is not entry.dtype or not s.is_cpu:
                return None
    out, state_n = _NODES.get("", None).run_stack(plan, x, state, list(entry.params), grad, arrays)
    return out.transpose(0, 1) if entry.batch_first else out, state_n[0] if entry.state_size == 1 else state_n


def forget(known: dict, key: int, entry) -> None:
    """A module's weak reference died: drop its entry (if it is still this one)."""
    if known.get(key) is entry:
        del known[key]


def _remember(module, key: tuple, plan, params: Sequence, state: Optional[tuple]) -> None:
    """Record what ``layer_fast`` needs of this module's call (by the full path, after every
    check, on the fused routes)."""
    cell, _, _, num_layers, directions, T, B, dtype, device, grad_mode, grad, dropout, backend, _, _, threads, _ = key
    if device != "cpu":
        return
    registered = module._parameters
    names = [n for names in module._all_weights for n in names]
    flat = [registered.get(n) for n in names]
    given = [t for p in params for t in p if t is not None]
    if len(given) != len(flat) or not all(map(operator.is_, given, flat)):
        return  # (parameters from elsewhere: a parametrization)
    entry = _KNOWN.get(id(module))
    arrays = [weight_arrays(p) for p in params]
    if (entry is None or entry.module() is not module or not all(map(operator.is_, flat, entry.flat))
            or any(a is not b for new, known in zip(arrays, entry.arrays) for a, b in zip(new, known))
            or entry.training != module.training or entry.dropout != module.dropout or entry.mode != module.mode):
        entry = _Known()
        key_ = id(module)
        # (forgotten with the module: an entry holds its parameters)
        entry.module = weakref.ref(module, lambda _, key_=key_, entry=entry: forget(_KNOWN, key_, entry))
        entry.mode, entry.training = module.mode, module.training
        entry.batch_first, entry.dropout = module.batch_first, module.dropout
        entry.get, entry.names, entry.flat, entry.arrays = registered.__getitem__, names, flat, arrays
        entry.params, entry.dtype = list(params), dtype
        entry.input_size, entry.state_size, entry.plans = module.input_size, cell.state_size, {}
        if len(_KNOWN) > 256:
            _KNOWN.clear()
        _KNOWN[key_] = entry
    if len(entry.plans) > 32:
        entry.plans.clear()
    shapes = [tuple(shape) for shape in cell.state_shapes(layer_dims(cell, params[0]), num_layers * directions, B)]
    found = (plan, [torch.Size(shape) for shape in shapes], grad)
    entry.plans[T, B, grad_mode, grad, backend, threads, _plan.EPOCH] = found
