"""A whole stack (every layer and direction) on the kernels, arrays in and arrays out.

Two executors share one walk (rnnkit._driver.walk / walk_back) and one contract:

    forward(plan, training, x, h0, c0, params) -> (out, h_n, c_n, kept)
    backward(plan, kept, needs, d_out, d_hn, d_cn, h0, c0, params) -> (dx, dh0, dc0, grads)

``params`` holds one parameter record of arrays per layer-direction, ``needs`` is a ``Needs``,
``grads`` one record per layer-direction (None where not needed). ``kept`` is what backward
reads, a flat tuple of arrays (the autograd node saves each once).

- the "sequence" executor: each layer-direction's time loops (rnnkit._loops);
- the "step" executor (T = 1, no projections): one kernel call per layer-direction each way,
  ``step_rows`` and ``step_back_rows`` (their arguments in the order of kernels/driver.py's
  ``StepArgs`` and ``StepBackArgs``, passed as they are), the weights as stored. A step spends
  more in the sequence executor's glue (buffers, time chunks, records of a whole sequence, a
  call per product: about 30 us for Elman 32 -> 64 in inference, 60 in training) than in its
  arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _loops
from ._arrays import absent, kernel_params
from ._driver import AFTER_C, walk, walk_back
from .cells import Cell


class Plan(NamedTuple):
    """What a fused stack call runs: hashable but for ``steps``, the active rows per step."""

    cell: Cell
    steps: np.ndarray  # (T,) int64, non-increasing (see ``steps`` in kernels/driver.py)
    num_layers: int
    reverses: tuple  # per direction: (False,), (False, True), or (True,) for one reverse layer
    step: bool  # the step executor
    # per layer-direction, the regularizers in force (rnnkit._driver.Regular), or None: none
    # (the sequence executor only)
    regulars: Optional[tuple] = None


class Needs(NamedTuple):
    """Which gradients a backward computes: of the input, of h0, of c0, and per layer-direction
    a parameter record of bools."""

    x: bool
    h0: bool
    c0: bool
    params: list


def _join(outs: list) -> np.ndarray:
    return np.concatenate(outs, -1)


def _split(d: np.ndarray, direction: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(d[..., direction * width:(direction + 1) * width])


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a += b
    return a


def forward(plan: Plan, training: bool, x, h0, c0, params) -> tuple:
    return (_step_forward if plan.step else _sequence_forward)(plan, training, x, h0, c0, params)


def backward(plan: Plan, kept: tuple, needs: Needs, d_out, d_hn, d_cn, h0, c0, params) -> tuple:
    return (_step_backward if plan.step else _sequence_backward)(plan, kept, needs, d_out, d_hn, d_cn, h0, c0,
                                                                 params)


# ---- the sequence executor
def _sequence_forward(plan: Plan, training: bool, x, h0, c0, params) -> tuple:
    cell = plan.cell
    none = _loops.no_cell_state(h0.shape[1], h0.dtype)
    regulars = plan.regulars
    kept: list = []

    def run_one(k, layer, reverse, inp):
        out, h_n, c_n, keep = _loops.forward(cell, plan.steps, reverse, training, inp, params[k], h0[k],
                                             none if c0 is None else c0[k], regulars and regulars[k])
        kept.extend(keep)
        return out, (h_n, c_n)

    out, finals = walk(plan.num_layers, plan.reverses, x, run_one, _join)
    if len(finals) == 1:  # (a view: no copy)
        h_n, c_n = (a.reshape(1, *a.shape) for a in finals[0])
    else:
        h_n, c_n = np.stack([f[0] for f in finals]), np.stack([f[1] for f in finals])
    return out, h_n, None if c0 is None else c_n, tuple(kept)


def _unreached(plan: Plan, grads: list, unreached: bool) -> None:
    """None for the last layer's parameters the loss did not reach (see _sequence_backward)."""
    after_c = {n: None for n in AFTER_C if n in plan.cell.record._fields}
    if unreached and after_c:
        LD = len(grads)
        for k in range(LD - len(plan.reverses), LD):
            if grads[k] is not None:
                grads[k] = grads[k]._replace(**after_c)


def _sequence_backward(plan: Plan, kept: tuple, needs: Needs, d_out, d_hn, d_cn, h0, c0, params) -> tuple:
    cell = plan.cell
    LD, B, Ho = h0.shape
    dtype = h0.dtype
    if c0 is None:
        c0 = np.empty((LD, B, 0), dtype)
    n = len(_loops.Kept._fields)
    # the loss reached the last layer's W_hr (or c's normalization) not at all when only c_n
    # has a gradient and there is one step (its h feeds nothing but out and h_n): None as in
    # torch.nn, not zeros (an optimizer skips None, but decays a zero gradient's weight)
    unreached = d_out is None and d_hn is None and len(plan.steps) == 1
    d_top = np.zeros((1, 1, len(plan.reverses) * Ho), dtype) if d_out is None else d_out
    d_hn = np.zeros(h0.shape, dtype) if d_hn is None else d_hn
    d_cn = np.zeros(c0.shape, dtype) if d_cn is None else d_cn
    d_h0 = np.empty_like(h0) if needs.h0 else None
    d_c0 = np.empty_like(c0) if needs.c0 else None
    grads: list = [None] * LD

    def back_one(k, layer, reverse, d_part):
        keep = _loops.Kept(*kept[k * n:(k + 1) * n])
        need = Needs(layer > 0 or needs.x, needs.h0, needs.c0, needs.params[k])
        dx, grads[k], dh0, dc0 = _loops.backward(cell, plan.steps, reverse, need, d_part, d_hn[k], d_cn[k],
                                                 params[k], h0[k], c0[k], keep, plan.regulars and plan.regulars[k])
        if d_h0 is not None:
            d_h0[k] = dh0
        if d_c0 is not None:
            d_c0[k] = dc0
        return dx

    dx = walk_back(plan.num_layers, plan.reverses, d_top, back_one, lambda d, i: _split(d, i, Ho), _add)
    _unreached(plan, grads, unreached)
    return dx if needs.x else None, d_h0, d_c0, grads


# ---- the step executor
def _step_forward(plan: Plan, training: bool, x, h0, c0, params) -> tuple:
    """x (1, B, I): out (1, B, D * Ho), h_n, c_n (None when c0 is); kept (x, hs, saved), where
    in training hs holds every layer-direction's h and saved (LD, 1, B, S) what step_back_rows
    reads, h_n being the caller's copy of hs. With one step the reverse direction reads the same
    input as the forward one."""
    cell = plan.cell
    x = x[0]
    B = x.shape[0]
    LD, _, Ho = h0.shape
    GH = params[0].weight_hh.shape[0]  # (every layer-direction's W_hh has this shape)
    dtype = x.dtype
    h_n = np.empty((LD, B, Ho), dtype)
    hs = np.empty((LD, B, Ho), dtype) if training else h_n
    copy = None if training else np.empty((B, Ho), dtype)  # (inference: step_rows' copy of h, unread)
    c_n = np.empty((LD, B, 0), dtype) if c0 is None else np.empty(c0.shape, dtype)
    saved = np.empty((LD if training else 1, 1, B if training else 1, cell.saved_size(GH // cell.gates)), dtype)
    xw, hw = np.empty((B, GH), dtype), np.empty((B, GH), dtype)  # scratch
    step = _loops.KERNELS[cell.mode].step_rows
    b_none = absent(dtype, 1)

    def run_one(k, layer, reverse, inp):
        p = params[k]
        b_ih, b_hh, own = kernel_params(cell, p)
        # (StepArgs' fields in order, passed as they are: a step's glue is most of its cost, and a
        # bundle built by keyword costs a microsecond per layer-direction)
        step(inp, p.weight_ih, b_none if b_ih is None else b_ih, p.weight_hh, b_none if b_hh is None else b_hh,
             h0[k], c_n[k] if c0 is None else c0[k], hs[k], c_n[k], h_n[k] if training else copy, xw, hw,
             saved[k if training else 0], training, own)
        return hs[k], None

    last, _ = walk(plan.num_layers, plan.reverses, x, run_one, _join)
    # (never h_n's memory)
    out = (last.copy() if len(plan.reverses) == 1 else last).reshape(1, B, len(plan.reverses) * Ho)
    return out, h_n, None if c0 is None else c_n, (x, hs, saved)


def _step_backward(plan: Plan, kept: tuple, needs: Needs, d_out, d_hn, d_cn, h0, c0, params) -> tuple:
    cell = plan.cell
    x, hs, saved = kept
    LD, B, Ho = hs.shape
    D = len(plan.reverses)
    GH = params[0].weight_hh.shape[0]
    dtype = hs.dtype
    if c0 is None:
        c0 = np.empty((LD, B, 0), dtype)
    # the running gradients: dL/dh and dL/dc of each layer-direction, then of its h0 and c0
    d_h0 = np.zeros(hs.shape, dtype) if d_hn is None else np.array(d_hn)
    d_c0 = np.zeros(c0.shape, dtype) if d_cn is None else np.array(d_cn)
    d_xw = np.empty((B, GH), dtype)
    d_hw = d_xw if not cell.separate_input_grad else np.empty((B, GH), dtype)
    back = _loops.KERNELS[cell.mode].step_back_rows
    none2, none1 = absent(dtype, 2), absent(dtype, 1)
    grads: list = [None] * LD

    def back_one(k, layer, reverse, d_part):
        if d_part is not None:  # (B, Ho), rows broadcast (a sum's) or not
            d_h0[k] += d_part
        inp = x if layer == 0 else _join([hs[j] for j in range((layer - 1) * D, layer * D)])
        dx = np.zeros(inp.shape, dtype) if layer > 0 or needs.x else None
        p, g = params[k], needs.params[k]
        inside = cell.biases_inside  # (then the biases' gradients are the cell's: d_own)
        d = type(p)(weight_ih=np.empty(p.weight_ih.shape, dtype) if g.weight_ih else None,
                    weight_hh=np.empty(p.weight_hh.shape, dtype) if g.weight_hh else None,
                    bias_ih=np.empty(GH, dtype) if g.bias_ih and not inside else None,
                    bias_hh=np.empty(GH, dtype) if g.bias_hh and not inside else None)
        d_own = _loops.d_own_rows(cell, B, GH)
        # (StepBackArgs' fields in order, as in _step_forward)
        back(d_h0[k], d_c0[k], saved[k], inp, h0[k], c0[k], hs[k], p.weight_ih, p.weight_hh, d_xw, d_hw, needs.h0,
             none2 if dx is None else dx, none2 if d.weight_ih is None else d.weight_ih,
             none2 if d.weight_hh is None else d.weight_hh, none1 if d.bias_ih is None else d.bias_ih,
             none1 if d.bias_hh is None else d.bias_hh, kernel_params(cell, p)[2], d_own)
        grads[k] = d._replace(**_loops.own_grads(cell, p, g, d_own, dtype))
        return dx

    d_top = None if d_out is None else d_out[0]
    dx = walk_back(plan.num_layers, plan.reverses, d_top, back_one, lambda d, i: d[:, i * Ho:(i + 1) * Ho], _add)
    _unreached(plan, grads, d_out is None and d_hn is None)
    return (dx.reshape(1, B, dx.shape[-1]) if needs.x else None, d_h0 if needs.h0 else None,
            d_c0 if needs.c0 else None, grads)

