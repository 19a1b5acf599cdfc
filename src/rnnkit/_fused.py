"""The bridge from torch to the fused numba kernels: one autograd.Function per layer-direction.

Forward: the input projection of every step is one GEMM, then the kernel runs the whole time
loop (recurrent product + the cell's fused pointwise update), saving what backward needs.
Backward: the kernel runs the reverse-time loop producing dL/d(pre-activations) for every step;
the gradients of the input, W_ih and W_hh are then single GEMMs over all T*B rows.
All products run in rnnkit's kernels (rows split across numba's threads, single-threaded BLAS
in each), so no other thread pool wakes up inside a call. Kernels see contiguous float32 or
float64 CPU arrays only; this module guarantees that.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from ._driver import reference_layer
from .cells import CELLS, Cell, LayerParams
from .kernels import driver
from .kernels.linalg import gemm

# Register every cell that has fused kernels; its id is its position in the registry.
_KERNELS = {}
for _kind, _cell in enumerate(CELLS.values()):
    if _cell.kernels is not None:
        driver.register_cell(_kind, *_cell.kernels)
        _KERNELS[_cell.mode] = driver.kernels_for(_kind, _cell.mode.lower())

SUPPORTED_DTYPES = (torch.float32, torch.float64)
# Split work across threads only when each thread gets enough to pay for waking it.
_MIN_WORK_PER_THREAD = 64 * 1024  # multiply-adds (per step in the time loop)


def supports(cell: Cell, x: Tensor) -> bool:
    return cell.mode in _KERNELS and x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES


def _chunks(rows: int, work: int) -> int:
    """Threads for ``rows`` independent rows carrying ``work`` multiply-adds in all."""
    return max(1, min(numba.get_num_threads(), rows, work // _MIN_WORK_PER_THREAD))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _matmul(a: np.ndarray, b: np.ndarray, bias: Optional[np.ndarray] = None, trans_a: bool = False):
    """op(a) @ b (+ bias) by the kernels' threaded GEMM."""
    rows = a.shape[1] if trans_a else a.shape[0]
    out = np.empty((rows, b.shape[1]), b.dtype)
    empty = np.empty(0, b.dtype)
    gemm(a, b, out, empty if bias is None else bias, trans_a, _chunks(rows, out.size * b.shape[0]))
    return out


class _FusedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell: Cell, steps: np.ndarray, reverse: bool, x, w_ih, w_hh, b_ih, b_hh, h0, c0):
        T, B, I = x.shape
        GH, H = w_hh.shape
        x2d = _np(x).reshape(T * B, I)
        xw = _matmul(x2d, _np(w_ih.t()), None if b_ih is None else _np(b_ih))
        dtype = xw.dtype
        Hc = c0.shape[-1]
        training = any(ctx.needs_input_grad)
        out = np.empty((T, B, H), dtype)
        c_seq = np.empty((T, B, Hc), dtype)
        h_n = np.empty((B, H), dtype)
        c_n = np.empty((B, Hc), dtype)
        saved = np.empty((T, B, cell.saved * H) if training else (1, 1, cell.saved * H), dtype)
        args = (xw.reshape(T, B, GH), _np(w_hh.t()), _np(b_hh) if b_hh is not None else np.zeros(GH, dtype),
                _np(h0), _np(c0), steps, reverse, out, c_seq, h_n, c_n, saved, np.empty((B, GH), dtype))
        kernels = _KERNELS[cell.mode]
        chunks = _chunks(B, B * H * GH)
        if chunks > 1:
            kernels.forward_chunks(*args, chunks)
        else:
            kernels.forward_rows(*args, 0, B)

        ctx.cell, ctx.steps, ctx.reverse = cell, steps, reverse
        ctx.x2d, ctx.w_ih, ctx.w_hh = x2d, _np(w_ih), _np(w_hh)
        ctx.h0, ctx.c0, ctx.out, ctx.c_seq, ctx.saved = args[3], args[4], out, c_seq, saved
        results = (torch.from_numpy(out), torch.from_numpy(h_n))
        return results + (torch.from_numpy(c_n),) if cell.state_size == 2 else results

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn=None):
        cell, out, h0, c0 = ctx.cell, ctx.out, ctx.h0, ctx.c0
        T, B, H = out.shape
        GH = ctx.w_hh.shape[0]
        dtype = out.dtype

        def grad_or_zeros(g, like):
            return _np(g) if g is not None else np.zeros(like.shape, dtype)

        d_xw = np.empty((T, B, GH), dtype)
        d_hw = np.empty((T, B, GH), dtype) if cell.separate_input_grad else d_xw
        h_prev = np.empty((T, B, H), dtype)
        d_h0 = np.empty((B, H), dtype)
        d_c0 = np.empty(c0.shape, dtype)
        args = (ctx.w_hh, grad_or_zeros(d_out, out), grad_or_zeros(d_hn, h0), grad_or_zeros(d_cn, c0),
                ctx.saved, out, ctx.c_seq, h0, c0, ctx.steps, ctx.reverse, d_xw, d_hw, h_prev, d_h0, d_c0)
        kernels = _KERNELS[cell.mode]
        chunks = _chunks(B, B * H * GH)
        if chunks > 1:
            kernels.backward_chunks(*args, chunks)
        else:
            kernels.backward_rows(*args, 0, B)

        need = ctx.needs_input_grad
        d_xw2, d_hw2 = d_xw.reshape(T * B, GH), d_hw.reshape(T * B, GH)
        grads = (
            _matmul(d_xw2, ctx.w_ih).reshape(T, B, ctx.x2d.shape[1]) if need[3] else None,  # input
            _matmul(d_xw2, ctx.x2d, trans_a=True) if need[4] else None,  # W_ih
            _matmul(d_hw2, h_prev.reshape(T * B, H), trans_a=True) if need[5] else None,  # W_hh
            d_xw2.sum(0) if need[6] else None,  # b_ih
            d_hw2.sum(0) if need[7] else None,  # b_hh
            d_h0 if need[8] else None,
            d_c0 if need[9] else None,
        )
        return (None, None, None) + tuple(None if g is None else torch.from_numpy(g) for g in grads)


def fused_layer(
    cell: Cell,
    x: Tensor,
    state: tuple,
    p: LayerParams,
    batch_sizes: Optional[Sequence[int]],
    reverse: bool,
) -> tuple:
    """The driver's layer contract (see rnnkit._driver), run by the fused kernels."""
    if p.w_hr is not None:  # LSTM projections: no fused kernel yet
        return reference_layer(cell, x, state, p, batch_sizes, reverse)
    T, B = x.shape[0], x.shape[1]
    steps = np.full(T, B, np.int64) if batch_sizes is None else np.asarray(batch_sizes, np.int64)
    h0 = state[0]
    c0 = state[1] if cell.state_size == 2 else h0.new_zeros(B, 0)
    results = _FusedLayer.apply(cell, steps, reverse, x, p.w_ih, p.w_hh, p.b_ih, p.b_hh, h0, c0)
    return results[0], tuple(results[1:])
