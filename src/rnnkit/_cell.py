"""One step of a cell module (``RNNCell``, ``GRUCell``, ``LSTMCell``), by the route
``_plan.route`` picks for it:

    cell       the kernels: inference is one call of ``step_rows`` (both products and the
               pointwise update; nothing allocated but the results); training is one autograd
               node, one kernel call each way (``step_rows`` keeping what ``step_back_rows``
               reads)
    native     torch.nn's own cell op (``torch._VF.*_cell``, what torch.nn's cells run): where
               the kernels do not pay (large products, which torch's threaded BLAS runs faster)
               or do not apply (another dtype or device)
    reference  the cell's torch-ops step (rnnkit.cells): the oracle, and what follows autocast,
               torch.func transforms and torch.compile

A cell called in a Python loop (attention decoders, RL agents) pays its glue at every step, so
this path is kept short: the route is cached per kind of call, zero states and scratch arrays are
shared per size (the kernels hold the GIL: one call at a time), weights are cached views.
"""

from __future__ import annotations

import operator
import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _backend, _plan
from ._arrays import NP_DTYPE, absent, array, batched, kernel_params, weight_arrays
from ._driver import AFTER_C, aliases, contract
from ._run import forget, needs
from .cells import Cell, Dims

_NATIVE = {"RNN_TANH": torch._VF.rnn_tanh_cell, "RNN_RELU": torch._VF.rnn_relu_cell, "GRU": torch._VF.gru_cell,
           "LSTM": torch._VF.lstm_cell}
_SCRATCH: dict = {}  # (mode, B, G*H, H, dtype) -> (xw, hw, saved, zero h, zero c) for the kernels


def route(cell: Cell, x: Tensor, state, params) -> _plan.Route:
    """The route of a cell call (``_plan.route`` of its ``Call``, remembered per kind of call)."""
    return _route(cell, x, params, _key(cell, x, state, params))


def _key(cell: Cell, x: Tensor, state, params) -> tuple:
    """What a cell call's route depends on: (mode, B, I, H, dtype, device, grad mode, grad,
    backend, special, compiling, threads)."""
    grad_mode, grad, special = needs(x, params, state)
    dtype = x.dtype
    compiling = torch.compiler.is_compiling()
    return (cell.mode, x.shape[0], x.shape[1], params.weight_hh.shape[1], dtype, "cpu" if x.is_cpu else x.device.type,
            grad_mode, grad, _backend.get_backend(), special, compiling, 0 if compiling else torch.get_num_threads())


def _route(cell: Cell, x: Tensor, params, key: tuple) -> _plan.Route:
    _, B, I, H, dtype, device, grad_mode, grad, backend, special, compiling, _ = key
    call = lambda: _plan.Call(cell, 1, 1, 1, B, Dims(I, H, 0, cell.gates), dtype, device,  # noqa: E731
                              grad_mode, grad, False, backend, special, compiling, "cell")
    return _plan.route(call()) if compiling else _plan.route_of(key, call)


def run(cell: Cell, x: Tensor, state, params, module=None) -> tuple:
    """The new state of a cell module's step: x (B, I), state a tuple of (B, H) tensors or None
    (zeros), params the cell's parameter record of tensors (of ``module``, whose later inference
    steps then take the short path, ``step_fast``)."""
    if x.is_cpu != params.weight_ih.is_cpu:  # (torch's op says which devices differ, as in torch.nn)
        path = "native"
    else:
        key = _key(cell, x, state, params)
        path = _route(cell, x, params, key).path
        if module is not None:
            _remember(module, cell, x, params, path, key[6], key[7])
    if path == "cell":
        if torch.is_grad_enabled():
            h0, c0 = (None, None) if state is None else (state[0], state[1] if len(state) == 2 else None)
            new = _CellNode.apply(cell, None, x, h0, c0, *params)
            return new if isinstance(new, tuple) else (new,)
        return _infer(cell, x, state, params)
    if state is None:
        zeros = x.new_zeros(x.shape[0], params.weight_hh.shape[1])
        state = (zeros,) * cell.state_size
    if path == "native":
        new = _NATIVE[cell.mode](x, state if cell.state_size == 2 else state[0], params.weight_ih,
                                 params.weight_hh, params.bias_ih, params.bias_hh)
        return new if isinstance(new, tuple) else (new,)
    return tuple(cell.step(cell.input_projection(x, params), state, params))


# ---- the short path. A decoder or agent steps its cell thousands of times with the same
# module, sizes and dtype: ``step_fast`` answers such a step with a handful of checks against
# what the full path found last time (``_FAST``: per module, its parameters and their addresses,
# their arrays, and per kind of call (rows, grad mode, gradients needed, backend, threads) the
# route), and returns None to send anything else down the full path, which checks it, routes it
# and records what the short path needs (``_remember``).
class _Fast:
    __slots__ = ("module", "mode", "cell", "input_size", "hidden", "dtype", "np_dtype", "get", "names", "params",
                 "present", "slots", "in_order", "addresses", "weights", "routes", "kernel", "registered", "count")


_FAST: dict = {}  # id(module) -> _Fast


# (bound once: each lookup through torch's modules costs a step of a small cell a few percent)
_autocast, _transforms, _tracing = (torch._C._is_any_autocast_enabled, torch._C._are_functorch_transforms_active,
                                    torch._C._get_tracing_state)
_grad_enabled, _num_threads, _compiling = torch.is_grad_enabled, torch.get_num_threads, torch.compiler.is_compiling
_forward_ad, _hooks = torch.autograd.forward_ad, torch.nn.modules.module
_empty = np.empty


def step_fast(module, args: tuple, kwargs: dict, forward):
    """A cell module's call ``module(*args, **kwargs)`` like one the full path ran before, or
    None. The call must be plain: (input[, hx]), nothing but rnnkit's ``forward`` to run (no
    hooks, no compiled call, no tracing; ``forward`` the base class's)."""
    entry = _FAST.get(id(module))
    if entry is None or kwargs or entry.module() is not module:
        return None
    if len(args) == 2:
        x, hx = args
    elif len(args) == 1:
        x, hx = args[0], None
    else:
        return None
    if (type(x) is not Tensor or type(module).forward is not forward or module._compiled_call_impl is not None
            or module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
            or module._backward_pre_hooks or _hooks._global_forward_pre_hooks or _hooks._global_forward_hooks
            or _hooks._global_backward_hooks or _hooks._global_backward_pre_hooks or _autocast() or _transforms()
            or _forward_ad._current_level >= 0 or _tracing() is not None or _compiling()
            or module._mode() != entry.mode):
        return None
    shape = x.shape
    if len(shape) != 2 or shape[1] != entry.input_size or x.dtype is not entry.dtype or not x.is_cpu:
        return None
    registered = module._parameters
    if registered is not entry.registered or len(registered) != entry.count:  # (one added or removed)
        return None
    try:
        params = list(map(entry.get, entry.names))
    except KeyError:  # (one removed and another added: the same count)
        return None
    B = shape[0]
    if _grad_enabled():
        return _step_grad_mode(entry, params, x, hx, B)
    route = entry.routes.get(_kind(B, False, False))
    if route is None:
        return None
    if route[0] == "native":  # (tensors in, tensors out: the parameters as they are now)
        return _native(entry, params, x, () if hx is None else _states(entry, hx, B))
    if not _arrays_hold(entry, params):
        return None
    try:
        a = x.numpy()
    except (RuntimeError, TypeError):  # (requires grad, a conjugate view, ...)
        return None
    if not a.flags.c_contiguous:
        return None
    xw, hw, saved, zero_h, zero_c = route[1]
    if hx is None:
        h0, c0 = zero_h, zero_c
    elif entry.cell.state_size == 1:
        h0, c0 = _state_fast(hx, zero_h), zero_c
    elif type(hx) is tuple and len(hx) == 2:
        h0, c0 = _state_fast(hx[0], zero_h), _state_fast(hx[1], zero_h)
    else:
        return None
    if h0 is None or c0 is None:
        return None
    h = _empty(zero_h.shape, a.dtype)
    w_ih, b_ih, w_hh, b_hh, own = entry.weights
    if entry.cell.state_size == 1:
        entry.kernel(a, w_ih, b_ih, w_hh, b_hh, h0, c0, h, c0, h, xw, hw, saved, False, own)
        return returned(h)
    c = _empty(zero_h.shape, a.dtype)
    entry.kernel(a, w_ih, b_ih, w_hh, b_hh, h0, c0, h, c, h, xw, hw, saved, False, own)
    return returned(h), returned(c)


def _states(entry: _Fast, hx, B: int):
    """hx as a tuple of (B, H) CPU tensors of the step's dtype, or None."""
    state = (hx,) if entry.cell.state_size == 1 else hx if type(hx) is tuple and len(hx) == 2 else None
    if state is None:
        return None
    for s in state:
        if type(s) is not Tensor or s.dtype is not entry.dtype or s.shape != (B, entry.hidden) or not s.is_cpu:
            return None
    return state


def _native(entry: _Fast, params: list, x: Tensor, state):
    """torch.nn's cell op on x, the state (() for zeros) and the module's parameters."""
    if state is None:
        return None
    if not state:
        zeros = x.new_zeros(x.shape[0], entry.hidden)
        state = (zeros, zeros) if entry.cell.state_size == 2 else (zeros,)
    w_ih, w_hh, b_ih, b_hh = params if entry.in_order else [None if i < 0 else params[i] for i in entry.slots[:4]]
    return _NATIVE[entry.mode](x, state if len(state) == 2 else state[0], w_ih, w_hh, b_ih, b_hh)


def _step_grad_mode(entry: _Fast, params: list, x: Tensor, hx, B: int):
    """The short path in grad mode: torch.nn's op, or the kernels' autograd node."""
    state = () if hx is None else _states(entry, hx, B)
    if state is None:
        return None
    grad = x.requires_grad
    if not grad:
        for s in state:
            if s.requires_grad:
                grad = True
                break
        else:
            for p in params:
                if p is not None and p.requires_grad:
                    grad = True
                    break
    route = entry.routes.get(_kind(B, True, grad))
    if route is None:
        return None
    if route[0] == "native":
        return _native(entry, params, x, state)
    if not _arrays_hold(entry, params):
        return None
    record = [None if i < 0 else params[i] for i in entry.slots]  # (the cell's record, weight_hr None)
    # (autograd.Function.apply without its Python wrapper, which unwraps functorch's dead
    # wrappers, found here among the inputs only: the parameters are the module's)
    h0, c0 = (_unwrap(state[0]), _unwrap(state[1]) if len(state) == 2 else None) if state else (None, None)
    return _node_apply(entry.cell, (entry.weights, route[1]), _unwrap(x), h0, c0, *record)


def _arrays_hold(entry: _Fast, params: list) -> bool:
    """Whether the arrays recorded (the kernels read views of the parameters) still hold: the
    same parameters (None where absent) in the same memory and layout (a parameter replaced, or
    given new memory, shape or strides, takes the full path, which checks it)."""
    return all(map(operator.is_, params, entry.params)) and _layout(entry.present) == entry.addresses


def _kind(rows: int, grad_mode: bool, grad: bool) -> tuple:
    """What a step's route depends on beyond the module: rows, grad mode, gradients needed,
    backend, threads and the limits in force."""
    return rows, grad_mode, grad, _backend.get_backend(), _num_threads(), _plan.EPOCH


def _state_fast(t, like: np.ndarray):
    """A state's array when it is a plain (B, H) CPU tensor of the step's dtype, else None."""
    a = _returned_array(t)
    if a is not None:
        return a if a.shape == like.shape and a.dtype == like.dtype else None
    if type(t) is Tensor and not t.requires_grad:
        try:
            a = t.numpy()
        except (RuntimeError, TypeError):
            return None
    else:
        return None
    return a if a.shape == like.shape and a.dtype == like.dtype and a.flags.c_contiguous else None


def _remember(module, cell: Cell, x: Tensor, params, path: str, grad_mode: bool, grad: bool) -> None:
    """Record what ``step_fast`` needs of this module's step (called by the full path, after
    every check, for the kernels' and torch.nn's routes)."""
    if path not in ("cell", "native") or not x.is_cpu or x.dim() != 2:
        return
    registered = module._parameters
    names = [p.name for p in cell.params if p.name in registered]  # (an absent bias is registered as None)
    if not all(registered[n] is getattr(params, n) for n in names) or any(
            getattr(params, p.name) is not None for p in cell.params if p.name not in registered):
        return  # (parameters from elsewhere: a parametrization)
    current = [registered[n] for n in names]
    present = [t for t in current if t is not None]
    if path == "cell" and not all(t.is_contiguous() for t in present):
        return  # (the kernels would read copies, stale after an in-place update)
    addresses = _layout(present)
    entry = _FAST.get(id(module))
    if (entry is None or entry.module() is not module or entry.mode != cell.mode or entry.addresses != addresses
            or not all(map(operator.is_, current, entry.params)) or entry.names != names
            or entry.registered is not registered or entry.count != len(registered)):
        entry = _Fast()
        key = id(module)
        # (forgotten with the module: an entry holds its parameters)
        entry.module = weakref.ref(module, lambda _, key=key, entry=entry: forget(_FAST, key, entry))
        entry.mode, entry.cell = cell.mode, cell
        entry.input_size, entry.hidden = params.weight_ih.shape[1], params.weight_hh.shape[1]
        entry.dtype = params.weight_ih.dtype
        entry.np_dtype = np.dtype(NP_DTYPE.get(entry.dtype, np.float32))
        entry.get, entry.names, entry.params, entry.present = registered.__getitem__, names, current, present
        entry.registered, entry.count = registered, len(registered)
        entry.addresses = addresses
        entry.slots = [names.index(p.name) if p.name in names else -1 for p in cell.params]
        entry.in_order = entry.slots[:4] == [0, 1, 2, 3] and len(names) == 4  # (torch.nn's op's order)
        entry.weights, entry.routes, entry.kernel = None, {}, None
        if len(_FAST) > 256:
            _FAST.clear()
        _FAST[key] = entry
    scratch = None
    if path == "cell":
        entry.weights, entry.kernel = _weights(cell, params), _kernels(cell).step_rows
        scratch = _scratch(cell, x.shape[0], entry.weights[2].shape[0], entry.hidden, entry.np_dtype)
    if len(entry.routes) > 16:
        entry.routes.clear()
    entry.routes[_kind(x.shape[0], grad_mode, grad)] = (path, scratch)


def _scratch(cell: Cell, B: int, GH: int, H: int, dtype) -> tuple:
    key = (cell.mode, B, GH, H, dtype)
    found = _SCRATCH.get(key)
    if found is None:
        if len(_SCRATCH) > 64:
            _SCRATCH.clear()
        zero_c = np.zeros((B, H if cell.state_size == 2 else 0), dtype)
        found = _SCRATCH[key] = (np.empty((B, GH), dtype), np.empty((B, GH), dtype),
                                 np.empty((1, 1, max(H, cell.saved_size(H))), dtype), np.zeros((B, H), dtype), zero_c)
    return found


def _weights(cell: Cell, params) -> tuple:
    """(w_ih, b_ih, w_hh, b_hh, own) as the kernels take them: views of the parameters (kept
    per tensor by ``weight_arrays``, checked against its memory, shape and strides), so in-place
    updates show through."""
    a = weight_arrays(params)
    none = absent(a.weight_ih.dtype, 1)
    b_ih, b_hh, own = kernel_params(cell, a)
    return (a.weight_ih, none if b_ih is None else b_ih, a.weight_hh, none if b_hh is None else b_hh, own)


_data_ptr, _stride, _shape = Tensor.data_ptr, Tensor.stride, operator.attrgetter("shape")


def _layout(tensors: list) -> tuple:
    """Where the tensors' values are: their addresses, shapes and strides."""
    return tuple(map(_data_ptr, tensors)), tuple(map(_shape, tensors)), tuple(map(_stride, tensors))


def _returned_array(t) -> Optional[np.ndarray]:
    """For a state this module returned (a loop's previous step) and still on that memory, the
    array it was made from (found by identity: a tensor's numpy view costs more than the
    kernel's step on small sizes); else None."""
    found = _RETURNED.get(id(t))
    if found is not None and found[0] is t and t.data_ptr() == found[2] and t.dim() == 2:
        return found[1]
    return None


def state_array(t: Tensor) -> np.ndarray:
    """A state tensor's values as an array."""
    a = _returned_array(t)
    return array(t) if a is None else a


def returned(a: np.ndarray) -> Tensor:
    """The tensor of a result array, remembered for ``state_array`` (the last few results: a
    loop's state is the step before's)."""
    t = torch.from_numpy(a)
    if len(_RETURNED) >= 16:
        _RETURNED.clear()
    _RETURNED[id(t)] = (t, a, t.data_ptr())
    return t


_RETURNED: dict = {}  # id of a returned tensor -> (the tensor, its array, its address)


def _infer(cell: Cell, x: Tensor, state, params) -> tuple:
    w_ih, b_ih, w_hh, b_hh, own = _weights(cell, params)
    x_np = array(x)
    B, (GH, H) = x_np.shape[0], w_hh.shape
    dtype = x_np.dtype
    xw, hw, saved, zero_h, zero_c = _scratch(cell, B, GH, H, dtype)
    if state is None:
        h0, c0 = zero_h, zero_c
    else:
        h0, c0 = state_array(state[0]), state_array(state[1]) if cell.state_size == 2 else zero_c
    h = np.empty((B, H), dtype)
    c = np.empty(zero_c.shape, dtype)
    _kernels(cell).step_rows(x_np, w_ih, b_ih, w_hh, b_hh, h0, c0, h, c, h, xw, hw, saved, False, own)
    return (returned(h), returned(c)) if cell.state_size == 2 else (returned(h),)


def _kernels(cell: Cell):
    if not _KERNELS:
        from . import _loops  # (numba loads with the first kernel call)

        _KERNELS.update(_loops.KERNELS)
        _LOOPS.append(_loops)
    return _KERNELS[cell.mode]


_KERNELS: dict = {}
_LOOPS: list = []  # (rnnkit._loops, once the kernels are loaded)

class _CellNode(torch.autograd.Function):
    """A training step of a cell module as one autograd node: ``step_rows`` forward (keeping the
    gates), ``step_back_rows`` backward. Inputs: cell, what the short path prepared (the
    parameters' arrays as ``_weights`` gives them and the step's scratch arrays) or None, x, h0,
    c0 (None: zeros; c0 None but for cells with a cell state), then the parameter record's
    tensors."""

    @staticmethod
    def forward(ctx, cell: Cell, prepared, x, h0, c0, *params):
        ctx.set_materialize_grads(False)  # (an output without a gradient costs no zeros)
        x_np = array(x)
        B, dtype = x_np.shape[0], x_np.dtype
        if prepared is None:
            w_ih, b_ih, w_hh, b_hh, own = _weights(cell, cell.record(*params))
            xw, hw, _, zero_h, zero_c = _scratch(cell, B, w_hh.shape[0], w_hh.shape[1], dtype)
        else:
            (w_ih, b_ih, w_hh, b_hh, own), (xw, hw, _, zero_h, zero_c) = prepared
        h0_np = zero_h if h0 is None else state_array(h0)
        c0_np = zero_c if c0 is None else state_array(c0)
        shape = zero_h.shape
        h, out, c = _empty(shape, dtype), _empty(shape, dtype), _empty(zero_c.shape, dtype)
        saved = _empty((1, B, cell.saved_size(shape[1])), dtype)
        _kernels(cell).step_rows(x_np, w_ih, b_ih, w_hh, b_hh, h0_np, c0_np, h, c, out, xw, hw, saved, True, own)
        # what backward reads goes through save_for_backward (an in-place change of it then
        # raises, as in torch.nn); backward reads the arrays themselves (their views)
        ctx.save_for_backward(x, h0, c0, *params)
        ctx.cell = cell
        ctx.arrays = (x_np, h0_np, c0_np, h, saved, w_ih, w_hh, own)
        # the caller gets ``out``, a copy of h, which it may change in place (h is backward's)
        if cell.state_size == 2:
            return returned(out), returned(c)
        return returned(out)

    @staticmethod
    def backward(ctx, d_h, d_c=None):
        cell = ctx.cell
        saved_tensors = ctx.saved_tensors  # (checks that nothing was changed in place)
        needs = ctx.needs_input_grad[1:]  # (prepared, x, h0, c0, *params)
        x, h0, c0, h, saved, w_ih, w_hh, own = ctx.arrays
        B, (GH, H) = x.shape[0], w_hh.shape
        dtype = x.dtype
        dh = dc = None
        if not torch.is_grad_enabled():
            try:  # (copies: the kernel writes dL/dh0 and dL/dc0 over them)
                dh = np.zeros((B, H), dtype) if d_h is None else np.array(d_h.numpy())
                dc = np.zeros(c0.shape, dtype) if d_c is None else np.array(d_c.numpy())
            except RuntimeError:  # (no numpy view: autograd's batched gradients, or a conjugate)
                if not batched(d_h, d_c):
                    raise
                dh = None
        if dh is None:  # a differentiable or a batched backward: the torch-ops step's gradients
            return (None, None, *_reference_grads(cell, saved_tensors, (d_h, d_c), needs[1:]))
        d_xw = np.empty((B, GH), dtype)
        d_hw = np.empty((B, GH), dtype) if cell.separate_input_grad else d_xw
        dx = np.zeros(x.shape, dtype) if needs[1] else absent(dtype, 2)
        grads = [np.empty(t.shape, dtype) if need and t is not None else None
                 for t, need in zip(saved_tensors[3:], needs[4:])]
        g = cell.record(*grads)
        none1, none2 = absent(dtype, 1), absent(dtype, 2)
        _loops = _LOOPS[0]  # (loaded with the kernels)
        inside = cell.biases_inside  # (the biases' gradients then come with the own parameters')
        d_own = _loops.d_own_rows(cell, B, GH)
        _kernels(cell).step_back_rows(
            dh, dc, saved, x, h0, c0, h, w_ih, w_hh, d_xw, d_hw, needs[2], dx,
            none2 if g.weight_ih is None else g.weight_ih, none2 if g.weight_hh is None else g.weight_hh,
            none1 if g.bias_ih is None or inside else g.bias_ih, none1 if g.bias_hh is None or inside else g.bias_hh,
            own, d_own)
        mine = cell.d_own_size and _loops.own_grads(cell, cell.record(*saved_tensors[3:]), cell.record(*needs[4:]),
                                                    d_own, dtype)
        if mine:
            grads = [mine.get(name, a) for name, a in zip(cell.record._fields, grads)]
        if d_h is None:  # (only c' in the loss: what only h's path reads is unreached, None as on the reference)
            grads = [None if name in AFTER_C else a for name, a in zip(cell.record._fields, grads)]
        return (None, None, torch.from_numpy(dx) if needs[1] else None, torch.from_numpy(dh) if needs[2] else None,
                torch.from_numpy(dc) if needs[3] else None,
                *(None if a is None else torch.from_numpy(a) for a in grads))


_node_apply = super(torch.autograd.Function, _CellNode).apply  # (torch's C++ apply)
_unwrap = torch._C._functorch.unwrap_if_dead


def _reference_grads(cell: Cell, inputs: tuple, grad_outputs: tuple, needs: tuple) -> list:
    """The differentiable fallback (double backward, batched gradients): the gradients of the
    cell's torch-ops step, run anew from the node's saved inputs."""
    with torch.enable_grad():
        inputs = aliases(inputs)
        x, h0, c0, *params = inputs
        p = cell.record(*params)
        zeros = x.new_zeros(x.shape[0], p.weight_hh.shape[1])
        state = (zeros if h0 is None else h0,) + ((zeros if c0 is None else c0,) if cell.state_size == 2 else ())
        new = cell.step(cell.input_projection(x, p), state, p)
    return contract(new, grad_outputs, inputs, needs)


__all__ = ["run", "route"]
