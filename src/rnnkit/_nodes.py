"""The fused routes in eager mode: a whole stack as one autograd node, or straight through the
kernels when no gradient is needed; and the one differentiable fallback.

``run_stack`` runs the "sequence" and "step" routes (rnnkit._plan) for a stack, or, on the
layer-by-layer routes, for one layer-direction at a time (``layer_fn``).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _stack
from ._arrays import array, batched, output_grad, tensors, weight_arrays
from ._driver import Packing, Regular, aliases, contract, reference_layer, run_layers
from ._stack import Needs, Plan
from .cells import Cell, dims_of


# ---- parameter records <-> the flat tensor list an autograd.Function takes
def flatten(params: Sequence) -> list:
    """Every layer-direction's parameter record, one after another (None where absent)."""
    return [t for p in params for t in p]


def unflatten(cell: Cell, flat: Sequence) -> list:
    """``flatten``'s inverse: the records of the cell's declared parameters."""
    record = cell.record
    n = len(record._fields)
    return [record._make(flat[i:i + n]) for i in range(0, len(flat), n)]


def _states(cell: Cell, x: np.ndarray, params: list, rows: int, h0: Optional[Tensor], c0: Optional[Tensor]) -> tuple:
    """The stack's (h0, c0) arrays (c0 None but for cells with a cell state): zeros where a
    state is None (shared, read-only: the kernels copy a state before they change it)."""
    if h0 is not None:
        return array(h0), None if c0 is None else array(c0)
    p = params[0]
    key = (cell.mode, p.weight_ih.shape, p.weight_hh.shape, rows, x.shape[1], x.dtype)
    zeros = _ZEROS.get(key)
    if zeros is None:
        if len(_ZEROS) > 64:
            _ZEROS.clear()
        shapes = cell.state_shapes(dims_of(cell, p.weight_ih.shape, p.weight_hh.shape), rows, x.shape[1])
        zeros = [np.zeros(shape, x.dtype) for shape in shapes]  # (writeable: numba types a read-only array apart)
        zeros = _ZEROS[key] = (zeros[0], zeros[1] if cell.state_size == 2 else None)
    return zeros


_ZEROS: dict = {}  # zero states by cell, sizes and dtype


def steps_of(T: int, B: int, batch_sizes: Optional[Sequence[int]]) -> np.ndarray:
    """Active rows per step for the kernels (see ``steps`` in kernels/driver.py)."""
    if batch_sizes is not None:
        return np.asarray(batch_sizes, np.int64)
    steps = _FULL_STEPS.get((T, B))
    if steps is None:
        if len(_FULL_STEPS) > 64:
            _FULL_STEPS.clear()
        steps = _FULL_STEPS[T, B] = np.full(T, B, np.int64)
    return steps


_FULL_STEPS: dict = {}  # (T, B) -> steps of a batch without padding (the kernels never write it)


def run_stack(plan: Plan, x: Tensor, state0: Optional[tuple], params: list, grad: bool,
              arrays: Optional[list] = None) -> tuple:
    """(output, state_n) of a stack on the kernels: one autograd node when ``grad``, else
    arrays straight through. ``arrays``: the parameters' ``weight_arrays``, when the caller has
    them."""
    h0, c0 = (None, None) if state0 is None else (*state0, None)[:2]
    if arrays is None:
        arrays = [weight_arrays(p) for p in params]
    if grad:
        out, h_n, c_n = _StackNode.apply(plan, arrays, x, h0, c0, *flatten(params))
    else:
        x_np = array(x)
        h0_np, c0_np = _states(plan.cell, x_np, arrays, plan.num_layers * len(plan.reverses), h0, c0)
        out, h_n, c_n, _ = _stack.forward(plan, False, x_np, h0_np, c0_np, arrays)
        out, h_n, c_n = tensors(out, h_n, c_n)
    return out, ((h_n, c_n) if plan.cell.state_size == 2 else (h_n,))


def layer_fn(step: bool, grad: bool):
    """The driver's layer function (rnnkit._driver) on the kernels, for the layer-by-layer
    route: each layer-direction as a stack of one."""

    def layer(cell: Cell, x: Tensor, state: tuple, p, batch_sizes, reverse: bool,
              regular: Optional[Regular] = None) -> tuple:
        plan = Plan(cell, steps_of(x.shape[0], x.shape[1], batch_sizes), 1, (reverse,), step,
                    None if regular is None else (regular,))
        out, state_n = run_stack(plan, x, tuple(s.unsqueeze(0) for s in state), [p], grad)
        return out, tuple(s[0] for s in state_n)

    return layer


class _StackNode(torch.autograd.Function):
    """A whole stack (every layer and direction of the plan) as one autograd node: the
    layer-by-layer torch glue (a node, conversions and a stack of states per layer) costs more
    than a small layer's kernels. Backward walks the layers in reverse, each layer's input
    gradient being the output gradient of the one below."""

    @staticmethod
    def forward(ctx, plan: Plan, params: list, x, h0, c0, *flat):
        """``params``: the arrays of ``flat``'s records (rnnkit._arrays.weight_arrays)."""
        ctx.set_materialize_grads(False)  # an output without a gradient costs no zeros (backward)
        x_np = array(x)
        h0_np, c0_np = _states(plan.cell, x_np, params, len(params), h0, c0)
        out, h_n, c_n, kept = _stack.forward(plan, True, x_np, h0_np, c0_np, params)
        # The caller may change the returned output in place before backward (a ReLU or dropout
        # in place, a residual added with +=), as torch.nn allows (but for its oneDNN LSTM). So
        # it is never an array backward reads: the caller gets a copy of one (torch.nn's CPU
        # layers also return a copy of the steps' states they keep).
        if any(out is a for a in kept):
            out = out.copy()
        results = tensors(out, h_n, c_n)
        # Everything backward reads goes through save_for_backward, so an in-place change of any
        # of it raises instead of corrupting grads, and autograd frees it once backward has run
        # (or, under activation checkpointing, drops it until then). Backward reads the arrays
        # themselves rather than converting the saved tensors back (a microsecond each, which
        # small layers feel): the small ones (states, views of the parameters) directly.
        # Arrays without elements have nothing to protect or free: no tensor saved.
        saved = [x]
        if plan.step:
            # a step's few rows (x's row, hs, saved) are not worth freeing early: kept as they
            # are (x[0] is a view of x, saved as the tensor itself)
            saved += [torch.from_numpy(a) for a in kept[1:] if a.size]
            ctx.kept = kept
        else:
            # Kept through weak references, alive exactly as long as the saved tensors that own
            # their memory (x's view is made anew: it owns nothing); arrays kept twice (a layer's
            # output is the next one's input) saved once.
            index = {id(x_np): 0}  # array -> its position in ``sources``
            sources: list = [(0, None)]  # (position in saved, weak ref) or the array
            slots = []
            for a in kept:
                if id(a) not in index:
                    index[id(a)] = len(sources)
                    if a.size == 0:
                        sources.append(a)
                    else:
                        sources.append((len(saved), weakref.ref(a)))
                        saved.append(torch.from_numpy(a))
                slots.append(index[id(a)])
            ctx.kept, ctx.slots, ctx.sources = None, slots, sources
        ctx.plan = plan
        ctx.save_for_backward(h0, c0, *flat, *saved)
        ctx.small = (h0_np, c0_np, params)
        return results

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        plan = ctx.plan
        n_flat = len(ctx.small[2]) * len(plan.cell.record._fields)
        tensors_ = ctx.saved_tensors  # (checks that nothing was changed in place)
        grads_out = None
        if not torch.is_grad_enabled():
            try:
                grads_out = (None if d_out is None else output_grad(d_out.numpy()),
                             None if d_hn is None else array(d_hn), None if d_cn is None else array(d_cn))
            except RuntimeError:
                if not batched(d_out, d_hn, d_cn):
                    raise
        if grads_out is None:  # a differentiable or a batched backward: see reference_grads
            h0, c0, *rest = tensors_
            return (None, None, *reference_grads(plan, rest[n_flat], h0, c0, rest[:n_flat], (d_out, d_hn, d_cn),
                                                 ctx.needs_input_grad[2:]))
        h0, c0, params = ctx.small
        kept = ctx.kept
        if kept is None:
            saved = tensors_[2 + n_flat:]
            sources = [source if isinstance(source, np.ndarray) else
                       array(saved[source[0]]) if source[1] is None or source[1]() is None else source[1]()
                       for source in ctx.sources]
            kept = tuple(sources[i] for i in ctx.slots)
        needs_flat = ctx.needs_input_grad
        needs = Needs(needs_flat[2], needs_flat[3], needs_flat[4], unflatten(plan.cell, needs_flat[5:]))
        dx, d_h0, d_c0, grads = _stack.backward(plan, kept, needs, *grads_out, h0, c0, params)
        return (None, None, *tensors(dx, d_h0, d_c0, *flatten(grads)))


# ---- the differentiable fallback, for double backward (``create_graph=True``: gradient
# penalties, Hessian-vector products) and batched gradients. The kernels' backward is not
# itself differentiable, nor batched. The node then runs the torch-ops reference forward from
# its saved inputs and differentiates that: the same gradients (the reference is the kernels'
# oracle), now with a graph, at the reference route's speed. Ordinary backward never comes here.
def reference_grads(plan: Plan, x, h0, c0, flat, grad_outputs, needs) -> list:
    """d(outputs)/d(x, h0, c0, *flat) contracted with grad_outputs by the reference: None where
    ``needs`` says no, an input is None, or it does not reach the outputs."""
    cell = plan.cell
    packing = Packing(torch.from_numpy(plan.steps))
    with torch.enable_grad():
        x, h0, c0, *flat = aliases((x, h0, c0, *flat))
        params = unflatten(cell, flat)
        state0 = None if h0 is None else (h0,) if cell.state_size == 1 else (h0, c0)
        out, state_n = run_layers(cell, reference_layer, x, state0, params, plan.num_layers, plan.reverses, 0.0,
                                  False, packing, plan.regulars)
    outputs = (out, state_n[0], state_n[1] if cell.state_size == 2 else None)
    return contract(outputs, grad_outputs, (x, h0, c0, *flat), needs)


__all__ = ["run_stack", "layer_fn", "reference_grads", "flatten", "unflatten", "steps_of"]
