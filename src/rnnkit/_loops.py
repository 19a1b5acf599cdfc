"""One layer-direction on the fused time loops, arrays in and arrays out (the "sequence" route).

Forward: the input projection of every step is one GEMM, then the kernel runs the whole time
loop (recurrent product + the cell's fused pointwise update + the LSTM's output projection when
it has one), saving what backward needs. Backward: the kernel runs the reverse-time loop
producing dL/d(pre-activations) (and dL/dh_t when projecting) for every step; the gradients of
the input, W_ih, W_hh (and W_hr) are then single GEMMs over all T*B rows. Long sequences run
in time chunks (see "Time chunks" in kernels/driver.py).

All products run in rnnkit's kernels (rows split across numba's threads, single-threaded BLAS
in each), so no other thread pool wakes up inside a call. How many threads, whether weights are
packed and how long a time chunk is are ``_plan.LIMITS``'.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numba
import numpy as np
import torch

from . import _plan, _warmup  # noqa: F401  (_warmup: the one-line notice when a kernel compiles on demand)
from ._arrays import absent, array, kernel_params, or_absent
from ._driver import Regular, zone_threshold
from ._plan import chunks
from .cells import CELLS, Cell
from .kernels import blas, driver
from .kernels.driver import BackwardArgs, ForwardArgs
from .kernels.linalg import column_sums, gemm, gemm_rows_range, linear, linear_rows
from .kernels.tiles import gemm_packed, gemm_packed_rows, gemm_packed_t, gemm_packed_t_rows, pack

def _start_threads() -> None:
    """Start numba's threads now, keeping torch's thread count. numba's OpenMP layer binds to
    the libgomp torch loaded (one runtime), and starting its pool sets that runtime's thread
    count to numba's: started lazily, by the first kernel that contains a parallel region, it
    undid a ``torch.set_num_threads(1)`` made before it."""
    threads = torch.get_num_threads()
    try:
        numba.get_num_threads()  # (starts the pool)
    except Exception:  # no threading layer loads here: the first parallel kernel says so
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_start_threads()

def _check_d_own(cell: Cell) -> None:
    """A cell with own parameters (its biases too, with ``biases_inside``) places every one's
    gradient in its d_own row; a parameter left out would get no gradient, silently."""
    names = {p.name for p in cell.params}
    wanted = set(cell.own_params) | ({"bias_ih", "bias_hh"} & names if cell.biases_inside else set())
    if {name for name, _ in cell.d_own} != wanted:
        raise ValueError(f"cell {cell.mode}: d_own must place the gradient of every own parameter "
                         f"({sorted(wanted)}), got {sorted(name for name, _ in cell.d_own)}")


# Every cell that has fused kernels, compiled lazily on first use: mode -> driver.CellKernels.
KERNELS = {}
for _kind, _cell in enumerate(CELLS.values()):
    if _cell.kernels is not None:
        _check_d_own(_cell)
        driver.register_cell(_kind, *_cell.kernels)
        KERNELS[_cell.mode] = driver.kernels_for(_kind, _cell.mode.lower())

# The weight gradients (out += a.T @ b over all T*B rows): scipy's BLAS when it runs its
# full-width kernels, else the register tiles (faster than BLAS's narrower kernels on an AVX-512
# machine; see FAST in kernels/blas.py). A switch, so tests can run both.
WEIGHT_GRADS_BY_BLAS = blas.FAST


class Kept(NamedTuple):
    """What a layer-direction's forward keeps for its backward (see the legend of
    kernels/driver.py): its input, out, c_seq, saved, m_seq and raw."""

    x: np.ndarray
    out: np.ndarray
    c_seq: np.ndarray
    saved: np.ndarray
    m_seq: np.ndarray
    raw: np.ndarray


class _Regular(NamedTuple):
    """A layer-direction's regularizer arrays for the loops (see the legend of
    kernels/driver.py; ``absent`` where off): h_mask (B, Ho), zone_p (2,), zone_draw (4,)."""

    h_mask: np.ndarray
    zone_p: np.ndarray
    zone_draw: np.ndarray


def _regular_arrays(regular: Optional[Regular], dtype) -> _Regular:
    """The loops' arrays of a layer-direction's regularizers (rnnkit._driver.Regular; None: none)."""
    if regular is None:
        return _Regular(absent(dtype, 2), absent(dtype, 1), _NO_DRAW)
    h_mask, p, seeds = regular
    zone_draw = _NO_DRAW
    if seeds is not None:
        threshold = zone_threshold(p)
        zone_draw = np.array([*seeds, threshold, threshold], np.uint64)
    return _Regular(absent(dtype, 2) if h_mask is None else array(h_mask),
                    np.array([p, p], dtype) if p > 0 else absent(dtype, 1), zone_draw)


_NO_DRAW = np.empty(0, np.uint64)


def own_grads(cell: Cell, p, g, d_own: np.ndarray, dtype) -> dict:
    """The own parameters' gradients (biases too, with ``biases_inside``) that ``g`` asks for,
    from the loops' per-row sums d_own (B, K): field name -> array."""
    if d_own.shape[1] == 0:
        return {}
    total = d_own.sum(0)
    H = p.weight_hh.shape[0] // cell.gates
    grads = {}
    for name, start in cell.d_own:
        if getattr(g, name):
            size = getattr(p, name).shape[0]
            grads[name] = total[start * H:start * H + size].astype(dtype)
    return grads


def d_own_rows(cell: Cell, B: int, GH: int) -> np.ndarray:
    """The loops' per-row sums of the own parameters' gradients (``d_own`` in kernels/driver.py),
    zeros: (B, K), float64; (B, 0) for cells without own parameters."""
    return np.zeros((B, cell.d_own_size * (GH // cell.gates)), np.float64)


def no_cell_state(B: int, dtype) -> np.ndarray:
    """What the loops take for the cell state of a cell without one: (B, 0)."""
    return np.empty((B, 0), dtype)


def pack_weights(b: np.ndarray, trans: bool) -> np.ndarray:
    """tiles.pack on at most torch's thread count (see _plan.threads)."""
    return pack(b, trans, torch.get_num_threads())


def _recurrent_weights(T: int, B: int, w_hh: np.ndarray, trans: bool) -> tuple:
    """(W_hh packed for a loop, or absent when it uses W_hh as stored; its column threads),
    decided alike for the forward (``trans``) and backward loops. As stored: for few row-steps
    (plain_max_row_steps), and for one row split by columns over fewer steps than pay for the
    pack (at one row the unpacked product costs 2-20% more per step than the packed one, and
    the pack 4-14 steps' worth)."""
    col_threads = _plan.column_threads(T, B, w_hh.size)
    if T * B <= _plan.LIMITS.plain_max_row_steps or (B == 1 and col_threads > 1 and T < 64):
        return absent(w_hh.dtype, 3), col_threads
    return pack_weights(w_hh, trans), col_threads


def _launch(kernels_rows, kernels_chunks, args: tuple, batch: int, steps: int, work_per_step: int,
            col_threads: int, i0: int, i1: int) -> None:
    """Run a time loop of ``steps`` steps in all (time chunks included) over the whole batch:
    threaded over batch chunks when it pays, or over the columns of each step's product
    (``col_threads``, few rows)."""
    if col_threads > 1:
        kernels_rows(*args, i0, i1, 0, batch, col_threads)
        return
    limits = _plan.LIMITS
    n = 1 if steps * work_per_step < limits.min_loop_work else chunks(batch, work_per_step, limits.min_work_per_thread)
    if n > 1:
        kernels_chunks(*args, i0, i1, n)
    else:
        kernels_rows(*args, i0, i1, 0, batch, 1)


def matmul_packed(a: np.ndarray, b_packed: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray) -> None:
    """out = a @ b (+ bias) by the register tiles (b packed by ``pack``), rows split across
    threads when it pays."""
    rows = a.shape[0]
    bias = np.zeros(out.shape[1], out.dtype) if bias is None else bias
    n = chunks(rows, out.size * a.shape[1], _plan.LIMITS.min_gemm_work_per_thread)
    if n > 1:
        gemm_packed(a, b_packed, out, bias, n)
    else:
        gemm_packed_rows(a, b_packed, out, bias, 0, rows)


def linear_few(a: np.ndarray, w: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray) -> None:
    """out = a @ w.T (+ bias) on w as stored, for few rows a: the columns split across threads
    when it pays."""
    bias = or_absent(bias, w.dtype, 1)
    n = chunks(w.shape[0] // 4, a.shape[0] * w.size, _plan.LIMITS.min_gemm_work_per_thread)
    if n > 1:
        linear(a, w, bias, out, 0, a.shape[0], n)
    else:
        linear_rows(a, w, bias, out, 0, a.shape[0], 0, w.shape[0])


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b on b as stored, rows split across threads when it pays."""
    rows = a.shape[0]
    n = chunks(rows, out.size * a.shape[1], _plan.LIMITS.min_gemm_work_per_thread)
    if n > 1:
        gemm(a, b, out, absent(b.dtype, 1), False, False, n)
    else:
        gemm_rows_range(a, b, out, absent(b.dtype, 1), False, False, 0, rows)


def matmul_t(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out += a.T @ b: a (K, M), b (K, N), out (M, N); rows of out split across threads when
    it pays."""
    rows, K = out.shape[0], a.shape[0]
    limits = _plan.LIMITS
    if WEIGHT_GRADS_BY_BLAS:
        n = chunks(rows, out.size * K, limits.min_gemm_work_per_thread)
        if n > 1:
            gemm(a, b, out, absent(b.dtype, 1), True, True, n)
        else:
            gemm_rows_range(a, b, out, absent(b.dtype, 1), True, True, 0, rows)
        return
    # Rows of a a multiple of 4 KiB long put a tile's reads in the same few cache sets: copied
    # to rows one cache line longer first (12.9 -> 11.5 ms at 512 x 4096 x 1024, the copy
    # included; 3.0 -> 2.7 at 512 x 2048 x 512).
    padded = None
    if a.shape[1] * a.itemsize % 4096 == 0:
        padded = np.empty((min(K, limits.k_block), a.shape[1] + 64 // a.itemsize), a.dtype)
    for k0 in range(0, K, limits.k_block):
        a_k, b_packed = a[k0:k0 + limits.k_block], pack_weights(b[k0:k0 + limits.k_block], False)
        if padded is not None:
            p = padded[:a_k.shape[0]]
            p[:, :a_k.shape[1]] = a_k
            a_k = p
        n = chunks(rows, out.size * a_k.shape[0], limits.min_gemm_work_per_thread)
        if n > 1:
            gemm_packed_t(a_k, b_packed, out, None, n)
        else:
            gemm_packed_t_rows(a_k, b_packed, out, None, 0, rows)


def chunk_steps(T: int, B: int, width: int) -> int:
    """Steps per time chunk for per-step buffers of ``width`` elements per row."""
    limits = _plan.LIMITS
    if T * B * width <= limits.chunk_min_elements:
        return max(T, 1)
    return max(1, min(T, max(-(-limits.chunk_rows // B), -(-T // limits.time_chunks))))


def _time_chunks(T: int, L: int, reverse: bool, backward: bool):
    """(i0, i1, t_lo) of each chunk of L steps: processing steps [i0, i1) are the times
    [t_lo, t_lo + i1 - i0). At least one (empty when T == 0: the loops still set the state)."""
    if L >= T:
        yield 0, T, 0
        return
    late_first = reverse != backward  # processing order runs from late to early times
    for i0 in range(0, max(T, 1), L):
        i1 = min(T, i0 + L)
        yield i0, i1, (T - i1 if late_first else i0)


def forward(cell: Cell, steps: np.ndarray, reverse: bool, training: bool, x: np.ndarray, p, h0: np.ndarray,
            c0: np.ndarray, reg: Optional[Regular] = None) -> tuple:
    """(out, h_n, c_n, kept) of one layer-direction: x (T, B, I), p the cell's parameter record
    of arrays, h0 (B, Ho), c0 (B, Hc) (no_cell_state without one), ``reg`` its regularizers;
    kept (a ``Kept``) is what ``backward`` reads."""
    T, B, I = x.shape
    w_ih, w_hh, w_hr = p.weight_ih, p.weight_hh, getattr(p, "weight_hr", None)
    b_ih, b_hh, mine = kernel_params(cell, p)
    GH, Ho = w_hh.shape  # Ho: proj_size with projections, else H
    H = GH // cell.gates
    dtype = x.dtype
    Hc = c0.shape[-1]
    out = np.empty((T, B, Ho), dtype)
    c_seq = np.empty((T if training else 0, B, Hc), dtype)  # only backward reads it
    h_n = np.empty((B, Ho), dtype)
    c_n = np.empty((B, Hc), dtype)
    saved = np.empty((T, B, cell.saved_size(H)) if training else (1, 1, cell.saved_size(H)), dtype)
    if w_hr is None:
        w_hr_t, m_seq = absent(dtype, 3), absent(dtype, 3)
    else:
        w_hr_t, m_seq = pack_weights(w_hr, True), np.empty((T if training else 1, B, H), dtype)
    L = chunk_steps(T, B, GH)
    xw = np.empty((L, B, GH), dtype)
    plain = T * B <= _plan.LIMITS.plain_max_row_steps
    w_hh_t, col_threads = _recurrent_weights(T, B, w_hh, True)
    w_ih_t = None if plain else pack_weights(w_ih, True)
    kernels = KERNELS[cell.mode]
    work = B * (Ho * GH + (0 if w_hr is None else w_hr.size))
    b_hh = b_hh if b_hh is not None else np.zeros(GH, dtype)
    hw = np.empty((B, GH), dtype)  # scratch
    reg = _regular_arrays(reg, dtype)
    zoning = reg.zone_p.size > 0
    raw = np.empty((T, B, Ho), dtype) if training and zoning and cell.reads_output else absent(dtype, 3)
    hm = np.empty((B, Ho), dtype) if reg.h_mask.size else absent(dtype, 2)
    prev_h = np.empty((B, Ho), dtype) if zoning else absent(dtype, 2)
    prev_c = np.empty((B, Hc), dtype) if zoning else absent(dtype, 2)
    for i0, i1, t_lo in _time_chunks(T, L, reverse, backward=False):
        n = i1 - i0
        x_n, xw_n = x[t_lo:t_lo + n].reshape(n * B, I), xw[:n].reshape(n * B, GH)
        if plain:
            linear_few(x_n, w_ih, b_ih, xw_n)
        else:
            matmul_packed(x_n, w_ih_t, b_ih, xw_n)
        args = ForwardArgs(xw=xw[:n], w_hh_t=w_hh_t, weight_hh=w_hh, b_hh=b_hh, w_hr_t=w_hr_t, h0=h0, c0=c0,
                           steps=steps, reverse=reverse, out=out, c_seq=c_seq, h_n=h_n, c_n=c_n, saved=saved,
                           m_seq=m_seq, hw=hw, own=mine, h_mask=reg.h_mask,
                           zone_p=reg.zone_p, zone_draw=reg.zone_draw, raw=raw, hm=hm, prev_h=prev_h, prev_c=prev_c)
        _launch(kernels.forward_rows, kernels.forward_chunks, args, B, T, work, col_threads, i0, i1)
    return out, h_n, c_n, Kept(x, out, c_seq, saved, m_seq, raw)


def backward(cell: Cell, steps: np.ndarray, reverse: bool, need, d_out: np.ndarray, d_hn: np.ndarray,
             d_cn: np.ndarray, p, h0: np.ndarray, c0: np.ndarray, kept: Kept, reg: Optional[Regular] = None) -> tuple:
    """BPTT by the kernel, then the gradient GEMMs, chunk by chunk of time: (dx, grads, dh0,
    dc0), ``grads`` a parameter record; None wherever ``need`` (a ``Needs``) says no."""
    x, out, c_seq, saved, m_seq, raw = kept
    T, B, Ho = out.shape
    I = x.shape[-1]
    w_ih, w_hh, w_hr = p.weight_ih, p.weight_hh, getattr(p, "weight_hr", None)
    GH = w_hh.shape[0]
    dtype = out.dtype
    L = chunk_steps(T, B, GH * (2 if cell.separate_input_grad else 1))
    d_xw = np.empty((L, B, GH), dtype)
    shared = not cell.separate_input_grad  # dL/d(x W_ih^T) and dL/d(h W_hh^T) are one array (Elman)
    d_hw = d_xw if shared else np.empty((L, B, GH), dtype)
    d_first = np.zeros((B, GH), dtype)
    d_h0 = np.empty((B, Ho), dtype)
    d_c0 = np.empty(c0.shape, dtype)
    project = w_hr is not None
    if project:
        d_h_seq, dm = np.empty((L, B, Ho), dtype), np.empty((B, w_hr.shape[1]), dtype)
        w_hr_p = pack_weights(w_hr, False)
    else:
        d_h_seq, dm, w_hr_p = absent(dtype, 3), absent(dtype, 2), absent(dtype, 3)
    plain = T * B <= _plan.LIMITS.plain_max_row_steps
    w_hh_p, col_threads = _recurrent_weights(T, B, w_hh, False)
    g = need.params
    dx = np.empty((T, B, I), dtype) if need.x else None
    dw_ih = np.zeros(w_ih.shape, dtype) if g.weight_ih else None
    dw_hh = np.zeros(w_hh.shape, dtype) if g.weight_hh else None
    inside = cell.biases_inside  # (then the biases' gradients are the cell's: d_own)
    db_ih = np.zeros(GH, dtype) if g.bias_ih and not inside else None
    db_hh = np.zeros(GH, dtype) if g.bias_hh and not inside else None
    d_own = d_own_rows(cell, B, GH)
    mine = kernel_params(cell, p)[2]  # (the cell's own parameters: see kernel_params)
    dw_hr = np.zeros(w_hr.shape, dtype) if project and g.weight_hr else None
    w_ih_p = pack_weights(w_ih, False) if dx is not None and not plain else None
    kernels = KERNELS[cell.mode]
    work = B * (Ho * GH + (0 if w_hr is None else w_hr.size))
    reg = _regular_arrays(reg, dtype)
    masked = reg.h_mask.size > 0
    d_in = np.empty((B, Ho), dtype) if masked else absent(dtype, 2)
    kept_h = np.empty((B, Ho), dtype) if reg.zone_p.size else absent(dtype, 2)
    kept_c = np.empty((B, c0.shape[-1]), dtype) if reg.zone_p.size else absent(dtype, 2)
    # what entered W_hh: h_prev * h_mask with recurrent dropout (dL/dW_hh = sum_t d_hw^T h_in)
    h_in = out * reg.h_mask if masked and dw_hh is not None else out
    for i0, i1, t_lo in _time_chunks(T, L, reverse, backward=True):
        n = i1 - i0
        args = BackwardArgs(w_hh=w_hh_p, weight_hh=w_hh, w_hr=w_hr_p, d_out=d_out, d_hn=d_hn, d_cn=d_cn,
                            saved=saved, out=out, c_seq=c_seq, m_seq=m_seq, h0=h0, c0=c0, steps=steps,
                            reverse=reverse, d_xw=d_xw[:n], d_hw=d_hw[:n], d_h_seq=d_h_seq[:n], d_first=d_first,
                            dm=dm, d_h0=d_h0, d_c0=d_c0, own=mine, d_own=d_own, h_mask=reg.h_mask,
                            zone_p=reg.zone_p, zone_draw=reg.zone_draw, raw=raw, d_in=d_in, kept_h=kept_h,
                            kept_c=kept_c)
        _launch(kernels.backward_rows, kernels.backward_chunks, args, B, T, work, col_threads, i0, i1)
        if n == 0:
            continue
        d_xw2, d_hw2 = d_xw[:n].reshape(n * B, GH), d_hw[:n].reshape(n * B, GH)
        if dx is not None and plain:
            matmul(d_xw2, w_ih, dx[t_lo:t_lo + n].reshape(n * B, I))
        elif dx is not None:
            matmul_packed(d_xw2, w_ih_p, None, dx[t_lo:t_lo + n].reshape(n * B, I))
        if dw_ih is not None:
            matmul_t(d_xw2, x[t_lo:t_lo + n].reshape(n * B, I), dw_ih)
        if dw_hh is not None:
            # h_prev of time t is out[t - 1] (out[t + 1] when reverse) but at each row's first
            # step (added from d_first below)
            k0, k1 = (0, min(n, T - 1 - t_lo)) if reverse else (max(0, 1 - t_lo), n)
            if k1 > k0:
                shift = 1 if reverse else -1
                matmul_t(d_hw[k0:k1].reshape(-1, GH), h_in[t_lo + k0 + shift:t_lo + k1 + shift].reshape(-1, Ho),
                         dw_hh)
        if db_ih is not None:
            column_sums(d_xw2, db_ih)
        if db_hh is not None and not (shared and db_ih is not None):
            column_sums(d_hw2, db_hh)
        if dw_hr is not None:  # dL/dW_hr = sum_t dh_t^T m_t
            matmul_t(d_h_seq[:n].reshape(n * B, Ho), m_seq[t_lo:t_lo + n].reshape(n * B, m_seq.shape[-1]), dw_hr)
    if shared and db_ih is not None and db_hh is not None:  # the same sums
        db_hh[:] = db_ih
    # h0's share, skipped for zeros (hx not given) unless d_first holds an inf or NaN (inf * 0
    # must still make NaN, as in torch; a sum is finite only if every term is)
    if dw_hh is not None and (h0.any() or not math.isfinite(d_first.sum())):
        matmul_t(d_first, h0 * reg.h_mask if masked else h0, dw_hh)
    grads = dict(weight_ih=dw_ih, weight_hh=dw_hh, bias_ih=db_ih, bias_hh=db_hh)
    grads.update(own_grads(cell, p, g, d_own, dtype))
    if w_hr is not None:
        grads["weight_hr"] = dw_hr
    grads = type(p)(**grads)
    return dx, grads, d_h0 if need.h0 else None, d_c0 if need.c0 else None
