"""The "compiled" route: ``rnnkit::layer``, one layer-direction as a custom op with its autograd
formula and shape function, so torch.compile and torch.export treat it as one opaque op (the
layers run one by one through rnnkit._driver.run_layers). Its parameters are the cell's
parameter record, field by field, in the slots p0..p7 (None where absent or unused), so a
cell's own parameters travel too: a custom op differentiates its tensor arguments, not the
tensors of a list argument.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _loops
from ._arrays import NP_DTYPE, absent, array, output_grad, tensors
from ._stack import Needs
from .cells import CELLS, Cell, dims_of


def _record(mode: str, params):
    return CELLS[mode].record._make(params)


SLOTS = 8  # parameters a cell may declare per layer-direction (see cells.base)


@torch.library.custom_op("rnnkit::layer", mutates_args=())
def _layer_op(x: Tensor, h0: Tensor, c0: Tensor, steps: Tensor, mode: str, reverse: bool, training: bool,
              p0: Optional[Tensor], p1: Optional[Tensor], p2: Optional[Tensor], p3: Optional[Tensor],
              p4: Optional[Tensor], p5: Optional[Tensor], p6: Optional[Tensor],
              p7: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = (p0, p1, p2, p3, p4, p5, p6, p7)
    p = _loops_record(mode, params)
    out, h_n, c_n, kept = _loops.forward(CELLS[mode], steps.numpy(), reverse, training, array(x), p, array(h0),
                                         array(c0))
    return tensors(out, h_n, c_n, kept.c_seq, kept.saved, kept.m_seq)


def _loops_record(mode: str, params):
    n = len(CELLS[mode].record._fields)
    return _record(mode, [None if t is None else array(t) for t in params[:n]])


def _kept_shapes(cell: Cell, x, params, c0, training: bool) -> tuple:
    """(c_seq, saved, m_seq) shapes of ``_loops.forward`` (see the legend of kernels/driver.py)."""
    T, B = x.shape[0], x.shape[1]
    p = cell.record._make(params[:len(cell.record._fields)])
    dims = dims_of(cell, p.weight_ih.shape, p.weight_hh.shape)
    S = cell.saved_size(dims.hidden)
    m_seq = (0, 0, 0) if dims.proj == 0 else (T if training else 1, B, dims.hidden)
    return (T if training else 0, B, c0.shape[-1]), ((T, B, S) if training else (1, 1, S)), m_seq


@_layer_op.register_fake
def _layer_fake(x, h0, c0, steps, mode, reverse, training, *params):
    cell = CELLS[mode]
    T, B = x.shape[0], x.shape[1]
    Ho = h0.shape[-1]
    c_seq, saved, m_seq = _kept_shapes(cell, x, params, c0, training)
    return (x.new_empty(T, B, Ho), x.new_empty(B, Ho), x.new_empty(B, c0.shape[-1]), x.new_empty(c_seq),
            x.new_empty(saved), x.new_empty(m_seq))


@torch.library.custom_op("rnnkit::layer_backward", mutates_args=())
def _layer_backward_op(d_out: Tensor, d_hn: Tensor, d_cn: Tensor, x: Tensor, params: list[Optional[Tensor]],
                       h0: Tensor, c0: Tensor, out: Tensor, c_seq: Tensor, saved: Tensor, m_seq: Tensor,
                       steps: Tensor, mode: str, reverse: bool, need: list[bool]) -> list[Tensor]:
    """Gradients of (x, *params, h0, c0), an empty tensor where ``need`` says no."""
    cell = CELLS[mode]
    p = _loops_record(mode, params)
    needs = Needs(need[0], need[-2], need[-1], cell.record._make(need[1:-2]))
    raw = absent(NP_DTYPE[out.dtype], 3)  # (no zoneout under torch.compile: see _plan.route)
    kept = _loops.Kept(array(x), array(out), array(c_seq), array(saved), array(m_seq), raw)
    dx, grads, dh0, dc0 = _loops.backward(cell, steps.numpy(), reverse, needs, output_grad(d_out.detach().numpy()),
                                          array(d_hn), array(d_cn), p, array(h0), array(c0), kept)
    return [x.new_empty(0) if g is None else torch.from_numpy(g) for g in (dx, *grads, dh0, dc0)]


@_layer_backward_op.register_fake
def _layer_backward_fake(d_out, d_hn, d_cn, x, params, h0, c0, out, c_seq, saved, m_seq, steps, mode, reverse,
                         need):
    shapes = [x.shape, *(None if t is None else t.shape for t in params), h0.shape, c0.shape]
    return [x.new_empty(shape if n and shape is not None else (0,)) for shape, n in zip(shapes, need)]


def _setup_context(ctx, inputs, output):
    x, h0, c0, steps, mode, reverse, training, *params = inputs
    out, h_n, c_n, c_seq, saved, m_seq = output
    ctx.mode, ctx.reverse = mode, reverse
    ctx.present = [t is not None for t in params]
    ctx.save_for_backward(x, h0, c0, out, c_seq, saved, m_seq, steps, *(t for t in params if t is not None))


def _layer_grad(ctx, d_out, d_hn, d_cn, d_c_seq, d_saved, d_m_seq):
    x, h0, c0, out, c_seq, saved, m_seq, steps, *present = ctx.saved_tensors
    it = iter(present)
    n = len(CELLS[ctx.mode].record._fields)
    params = [next(it) if here else None for here in ctx.present][:n]
    needs = ctx.needs_input_grad
    need = [needs[0], *needs[7:7 + n], needs[1], needs[2]]  # (x, the record's fields, h0, c0)
    grads = _layer_backward_op(
        d_out if d_out is not None else out.new_zeros(1, 1, out.shape[-1]),
        d_hn if d_hn is not None else torch.zeros_like(h0),
        d_cn if d_cn is not None else torch.zeros_like(c0),
        x, params, h0, c0, out, c_seq, saved, m_seq, steps, ctx.mode, ctx.reverse, need)
    grads = [g if wanted else None for g, wanted in zip(grads, need)]
    return (grads[0], grads[-2], grads[-1], None, None, None, None, *grads[1:-2], *(None,) * (SLOTS - n))


_layer_op.register_autograd(_layer_grad, setup_context=_setup_context)


def layer(cell: Cell, x: Tensor, state: tuple, p, batch_sizes, reverse: bool) -> tuple:
    """The driver's layer function on the compiled route."""
    from ._nodes import steps_of

    T, B = x.shape[0], x.shape[1]
    steps = steps_of(T, B, batch_sizes)
    h0 = state[0]
    c0 = state[1] if cell.state_size == 2 else x.new_empty(B, 0)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *p, *state))
    out, h_n, c_n, *_ = _layer_op(x, h0, c0, torch.from_numpy(steps), cell.mode, reverse, training, *p,
                                  *(None,) * (SLOTS - len(p)))
    if training:  # (the op's output is saved for its backward: the caller's is a copy, see _nodes)
        out = out.clone()
    return out, ((h_n, c_n) if cell.state_size == 2 else (h_n,))


__all__ = ["layer"]
