"""The bridge from torch to the fused numba kernels: one autograd.Function per layer-direction.

Forward: the input projection of every step is one GEMM (torch), then the kernel runs the whole
time loop (recurrent product + the cell's fused pointwise update), saving what backward needs.
Backward: the kernel runs the reverse-time loop producing dL/d(preactivations) for every step;
the gradients of W_ih, W_hh, the biases and the input are then big GEMMs over all T*B rows.
Kernels see contiguous float32/float64 CPU arrays only; this module guarantees that.
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

# Register every cell that has fused kernels; its id is its position in the registry.
_KERNELS = {}
for _kind, _cell in enumerate(CELLS.values()):
    if _cell.kernels is not None:
        driver.register_cell(_kind, *_cell.kernels)
        _KERNELS[_cell.mode] = driver.kernels_for(_kind, _cell.mode.lower())

SUPPORTED_DTYPES = (torch.float32, torch.float64)
# Split the batch across threads only when a step has enough work to pay for waking them.
_MIN_WORK_PER_THREAD = 64 * 1024  # multiply-adds per step (rows * H * GH)


def supports(cell: Cell, x: Tensor) -> bool:
    return cell.mode in _KERNELS and x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES


def _chunks(batch: int, hidden: int, gates_hidden: int) -> int:
    threads = numba.get_num_threads()
    work = batch * hidden * gates_hidden
    return max(1, min(threads, batch, work // _MIN_WORK_PER_THREAD))


def _np(t: Optional[Tensor]) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _FusedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell: Cell, steps: np.ndarray, reverse: bool, x, w_ih, w_hh, b_ih, b_hh, h0, c0):
        T, B, I = x.shape
        GH, H = w_hh.shape
        x2d = x.reshape(T * B, I)
        xw = torch.addmm(b_ih, x2d, w_ih.t()) if b_ih is not None else x2d @ w_ih.t()
        dtype = xw.numpy().dtype
        b_hh_np = _np(b_hh) if b_hh is not None else np.zeros(GH, dtype)
        Hc = c0.shape[-1]
        training = any(ctx.needs_input_grad)
        saved_shape = (T, B, cell.saved * H) if training else (1, 1, cell.saved * H)
        out = np.empty((T, B, H), dtype)
        c_seq = np.empty((T, B, Hc), dtype)
        h_n = np.empty((B, H), dtype)
        c_n = np.empty((B, Hc), dtype)
        saved = np.empty(saved_shape, dtype)
        hw = np.empty((B, GH), dtype)
        args = (xw.view(T, B, GH).numpy(), _np(w_hh.t()), b_hh_np, _np(h0), _np(c0), steps, reverse,
                out, c_seq, h_n, c_n, saved, hw)
        kernels = _KERNELS[cell.mode]
        chunks = _chunks(B, H, GH)
        if chunks > 1:
            kernels.forward_chunks(*args, chunks)
        else:
            kernels.forward_rows(*args, 0, B)

        out_t, c_seq_t, saved_t = (torch.from_numpy(a) for a in (out, c_seq, saved))
        ctx.cell, ctx.steps, ctx.reverse = cell, steps, reverse
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, out_t, c_seq_t, saved_t)
        results = (out_t, torch.from_numpy(h_n))
        return results + (torch.from_numpy(c_n),) if cell.state_size == 2 else results

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn=None):
        x, w_ih, w_hh, h0, c0, out, c_seq, saved = ctx.saved_tensors
        cell = ctx.cell
        T, B, I = x.shape
        GH, H = w_hh.shape
        dtype = out.numpy().dtype

        def grad_or_zeros(g, like):
            return _np(g) if g is not None else np.zeros(like.shape, dtype)

        d_xw = np.empty((T, B, GH), dtype)
        d_hw = np.empty((T, B, GH), dtype) if cell.separate_input_grad else d_xw
        h_prev = np.empty((T, B, H), dtype)
        d_h0 = np.empty((B, H), dtype)
        d_c0 = np.empty(c0.shape, dtype)
        args = (_np(w_hh), grad_or_zeros(d_out, out), grad_or_zeros(d_hn, h0), grad_or_zeros(d_cn, c0),
                saved.numpy(), out.numpy(), c_seq.numpy(), _np(h0), _np(c0), ctx.steps, ctx.reverse,
                d_xw, d_hw, h_prev, d_h0, d_c0)
        kernels = _KERNELS[cell.mode]
        chunks = _chunks(B, H, GH)
        if chunks > 1:
            kernels.backward_chunks(*args, chunks)
        else:
            kernels.backward_rows(*args, 0, B)

        need = ctx.needs_input_grad
        d_xw2 = torch.from_numpy(d_xw).view(T * B, GH)
        d_hw2 = torch.from_numpy(d_hw).view(T * B, GH)
        dx = (d_xw2 @ w_ih).view(T, B, I) if need[3] else None
        dw_ih = d_xw2.t() @ x.reshape(T * B, I) if need[4] else None
        dw_hh = d_hw2.t() @ torch.from_numpy(h_prev).view(T * B, H) if need[5] else None
        db_ih = d_xw2.sum(0) if need[6] else None
        db_hh = d_hw2.sum(0) if need[7] else None
        dh0 = torch.from_numpy(d_h0) if need[8] else None
        dc0 = torch.from_numpy(d_c0) if need[9] else None
        return None, None, None, dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0


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
