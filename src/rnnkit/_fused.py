"""The bridge from torch to the fused numba kernels, one call per layer-direction: the custom
op ``rnnkit::layer`` (with its autograd formula and shape function) under torch.compile and
torch.export, a thinner autograd.Function in eager mode; both run ``_forward``/``_backward``.

Forward: the input projection of every step is one GEMM, then the kernel runs the whole time
loop (recurrent product + the cell's fused pointwise update + the LSTM's output projection when
it has one), saving what backward needs.
Backward: the kernel runs the reverse-time loop producing dL/d(pre-activations) (and dL/dh_t
when projecting) for every step; the gradients of the input, W_ih, W_hh (and W_hr) are then
single GEMMs over all T*B rows.
All products run in rnnkit's kernels (rows split across numba's threads, single-threaded BLAS
in each), so no other thread pool wakes up inside a call. Kernels see contiguous float32 or
float64 CPU arrays only; this module guarantees that.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from ._driver import Packing, reference_layer, run_layers, state_shapes
from .cells import CELLS, Cell, LayerParams
from .kernels import blas, driver
from .kernels.linalg import column_sums, gemm, gemm_rows_range, linear, linear_rows
from .kernels.tiles import gemm_packed, gemm_packed_rows, gemm_packed_t, gemm_packed_t_rows, pack, strip_width

# Register every cell that has fused kernels; its id is its position in the registry.
_KERNELS = {}
for _kind, _cell in enumerate(CELLS.values()):
    if _cell.kernels is not None:
        driver.register_cell(_kind, *_cell.kernels)
        _KERNELS[_cell.mode] = driver.kernels_for(_kind, _cell.mode.lower())

SUPPORTED_DTYPES = (torch.float32, torch.float64)


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


def _transformed() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, ...) or forward-mode AD's dual level:
    they see through torch ops, not through the kernels, so the layers run the reference."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


# Split work across threads only when each thread gets enough to pay for waking them (about
# 10 us): per step of a time loop, which wakes them once for all its steps; per product for the
# GEMMs before and after it.
_MIN_WORK_PER_THREAD = 64 * 1024  # multiply-adds per step
_MIN_GEMM_WORK_PER_THREAD = 512 * 1024  # multiply-adds
# ... and a time loop only when its whole run is long enough to also pay for waking the
# threads after other work: the first parallel region of a call after a torch op or the
# caller's own code can cost 20 to several hundred us on this 2-core VM (an empty region: 2 us
# right after another, 220 us median after 10 ms of other work; a single GRU step, B = 8,
# H = 256: 120 us back to back, 300 when each call follows a torch Linear, whose own time rose
# from 27 to about 90 us; 166 with the loop on one thread).
_MIN_LOOP_WORK = 8 << 20  # multiply-adds


_NO_CELL_STATE = {dtype: torch.empty(1, 0, dtype=dtype) for dtype in SUPPORTED_DTYPES}  # (B, 0) views


def supports(cell: Cell, x: Tensor) -> bool:
    return x.is_cpu and x.dtype in SUPPORTED_DTYPES and cell.mode in _KERNELS


# A single step (T = 1) has no time loop to fuse: what the kernels can still save there is the
# pointwise math (one pass instead of several torch ops) and, for few rows, torch's matrix-vector
# products (see _PLAIN_MAX_ROW_STEPS); what they add is a fixed cost in Python (conversions, and
# in training an autograd node and the gradient products). Measured against torch.nn, one step,
# I = H / 2, B 1-16, H 64-1024 (interleaved medians, BENCHMARKS.md):
# - training (grad mode; a frozen model called with grad mode on too: the same numbers): a step
#   whose products are small runs on the kernels as one autograd node (_EagerStep, see
#   _single_step_fits), every cell. Two sweeps (B 1-64, H 64-1024, OPENBLAS_CORETYPE unset /
#   Haswell; +-10% from run to run): there Elman 0.82-1.37x (the reference 0.83-1.24x; the
#   smallest steps even with torch.nn, whose whole call is 85-100 us: a Python autograd node
#   costs about 45 of them), GRU 1.06-1.94x (the reference 0.66-1.20x). Outside it GRU steps
#   run on the general kernels while W_hh has fewer than _MIN_COLUMN_WORK values (H <= 295:
#   1.11-1.69x); from H = 512 they swung between 0.35x and 1.72x from run to run (waking the
#   threads for one step) and stay on the reference (0.90-1.12x), as do larger Elman steps
#   (0.87-1.20x; the general kernels 0.29-1.47x).
# - GRU inference: the kernels 1.0-3.7x, the reference 0.73-1.1x.
# - Elman inference: a step of at most 4 rows runs on the kernels, one call per layer-direction
#   (_single_step; H 64-512: 0.97-1.13x against the reference's 0.89-0.96x; 2-3 layers or
#   bidirectional 0.99-1.27x against 0.81-0.93x); otherwise the
#   reference is ahead only with small weights and few rows (H = 64, B 5-8: 0.92-0.97x against
#   0.79-0.94x; H = 256 about even), the kernels from W_hh of 512 x 512 values (H = 1024, B 1-8:
#   1.2-2.0x against 1.0-1.1x; B = 64 1.7x) or with more rows.
# An LSTM step always runs faster on the kernels (torch.nn's oneDNN LSTM costs more there).
_ELMAN_STEP_MIN_WEIGHTS = 512 * 512
_ELMAN_STEP_MAX_ROWS = 8


def prefers(cell: Cell, x: Tensor, params: Sequence[LayerParams]) -> bool:
    """Whether "auto" should run this call on the kernels (see _ELMAN_STEP_MIN_WEIGHTS)."""
    if x.shape[0] != 1 or cell.state_size != 1:
        return True
    if torch.is_grad_enabled():
        if _single_step_fits(x.shape[1], [t for p in params for t in p], True):
            return True
        return cell.mode == "GRU" and params[0].w_hh.numel() < _MIN_COLUMN_WORK
    if cell.mode == "GRU" or x.shape[1] > _ELMAN_STEP_MAX_ROWS:
        return True
    if x.shape[1] <= _PLAIN_MAX_ROW_STEPS:  # (_single_step)
        return True
    return params[0].w_hh.numel() >= _ELMAN_STEP_MIN_WEIGHTS


def _threads() -> int:
    """Threads a call may use: no more than torch may (``torch.set_num_threads`` governs rnnkit
    as it governs torch.nn, so processes that each pin one thread do not oversubscribe the
    cores), within numba's pool. (torch answers in 20 ns, numba in about 0.7 us.)"""
    n = torch.get_num_threads()
    return 1 if n < 2 else min(n, numba.get_num_threads())


def _chunks(rows: int, work: int, min_work: int = _MIN_WORK_PER_THREAD) -> int:
    """Threads for ``rows`` independent rows carrying ``work`` multiply-adds in all."""
    most = min(rows, work // min_work)
    if most < 2:  # without asking for the thread count, which costs up to a microsecond
        return 1
    return min(_threads(), most)


def _pack(b: np.ndarray, trans: bool) -> np.ndarray:
    """tiles.pack on at most torch's thread count (see _threads)."""
    return pack(b, trans, torch.get_num_threads())


# A batch of fewer than 16 rows runs each step's recurrent product on all threads, each taking
# a band of W_hh's columns (a parallel region per step, about 3 us), when W_hh has this many
# values (and the loop _MIN_LOOP_WORK multiply-adds in all). Split by rows instead, each thread
# would stream all of W_hh every step, for fewer rows than a whole tile (8): a step of few rows
# is bound by reading W_hh, which one core does at about half the rate two do. Measured per
# step (float32, one row, 1 / 2 threads): 512 x 512 14.7 / 8.6 us, 2048 x 512 53 / 34, 1024 x
# 1024 55 / 30, 4096 x 1024 405 / 135; 256 x 256 3.6 / 6.0.
_MIN_COLUMN_WORK = 1 << 18
_COLUMN_MAX_ROWS = 15


def _column_threads(T: int, B: int, w_hh_size: int) -> int:
    """Threads splitting the columns of each step's recurrent product (see _MIN_COLUMN_WORK)."""
    if B > _COLUMN_MAX_ROWS or w_hh_size < _MIN_COLUMN_WORK or T * B * w_hh_size < _MIN_LOOP_WORK:
        return 1
    return min(_threads(), max(1, 2 * w_hh_size // _MIN_COLUMN_WORK))  # (half the minimum each)


def _recurrent_weights(T: int, B: int, w_hh: np.ndarray, trans: bool) -> tuple:
    """(W_hh packed for a loop, or no strips when it uses W_hh as stored; its column threads),
    decided alike for the forward (``trans``) and backward loops. As stored: for few row-steps
    (_PLAIN_MAX_ROW_STEPS), and for one row split by columns over fewer steps than pay for the
    pack (at one row the unpacked product costs 2-20% more per step than the packed one, and
    the pack 4-14 steps' worth)."""
    col_threads = _column_threads(T, B, w_hh.size)
    if T * B <= _PLAIN_MAX_ROW_STEPS or (B == 1 and col_threads > 1 and T < 64):
        return _NO_STRIPS[w_hh.dtype.type], col_threads
    return _pack(w_hh, trans), col_threads


def _launch(rows_kernel, chunks_kernel, args: tuple, batch: int, steps: int, work_per_step: int,
            col_threads: int) -> None:
    """Run a time loop of ``steps`` steps in all (time chunks included) over the whole batch:
    threaded over batch chunks when it pays, or over the columns of each step's product
    (``col_threads``, few rows)."""
    if col_threads > 1:
        rows_kernel(*args, 0, batch, col_threads)
        return
    chunks = 1 if steps * work_per_step < _MIN_LOOP_WORK else _chunks(batch, work_per_step)
    if chunks > 1:
        chunks_kernel(*args, chunks)
    else:
        rows_kernel(*args, 0, batch, 1)


_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_EMPTY = {np.float32: np.empty(0, np.float32), np.float64: np.empty(0, np.float64)}  # never written
_EMPTY2 = {d: np.empty((0, 0), d) for d in (np.float32, np.float64)}  # never written
# packed weights without strips: the loops' sign to use the weights as stored (w_hh_t, w_hh; see
# kernels/driver.py), or a layer without projections (w_hr_t, w_hr). Never written.
_NO_STRIPS = {d: np.empty((0, 0, strip_width(d)), d) for d in (np.float32, np.float64)}
# (w_hr_t, m_seq) of a layer without projections: empty, never written
_NO_PROJECTION = {d: (_NO_STRIPS[d], np.empty((0, 0, 0), d)) for d in (np.float32, np.float64)}

# Calls of at most this many row-steps (T * B: a single step of up to 4 rows, a few steps of one
# row) leave W_ih and W_hh unpacked: the products use them as stored (linalg.linear_rows,
# matmul_acc). Packing a matrix costs several passes of one row over it (512 x 512 float32: 56
# us against 13 for one row's product; (3072, 1024): 1.4 ms against 0.2), a cost a long
# sequence or a wide batch spreads thin, but a streaming step pays in full. Measured, a
# single step's product on 1 / 2 / 4 rows: 13 / 25 / 54 us unpacked against 56 / 56 / 54 packed
# (512 x 512); 209 / 474 / 795 against 1360 / 1470 / 1700 (3072 x 1024).
_PLAIN_MAX_ROW_STEPS = 4
# A training step (T = 1) of more rows than that still runs as _EagerStep up to this many
# multiply-adds in its products (B * G*H * (I + H) summed over layer-directions), which then run
# on single-threaded BLAS (linalg.linear_any) instead of being packed; beyond it torch.nn's
# threaded products win. Elman, against torch.nn (interleaved, OPENBLAS_CORETYPE unset / set to
# Haswell): B = 8, H = 128 1.24x / 1.03x; B = 32, H = 64 1.11x (Haswell); B = 32, H = 128 1.07x /
# 0.98x; above it B = 64, H = 128 1.03x / 0.87x and B = 8, H = 512 0.82x / 0.81x.
_STEP_MAX_WORK = 1 << 20
# ... and a step of a few rows, whatever its work, while W_hh has fewer values than this: one
# row streaming W_hh of 2^20 values or more on one thread lost to torch.nn's two (Elman H =
# 1024: 0.90-1.03x against the reference's 1.13-1.20x; GRU H = 1024: 0.91x against 1.00x),
# while 4 rows of the same ran 1.22-1.52x.
_STEP_MAX_WEIGHTS = 1 << 20


def _np(t: Tensor) -> np.ndarray:
    if t.requires_grad or not t.is_contiguous():
        t = t.detach().contiguous()
    return t.numpy()


def _matmul_packed(a: np.ndarray, b_packed: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray) -> None:
    """out = a @ b (+ bias) by the register tiles (b packed by ``pack``), rows split across
    threads when it pays."""
    rows = a.shape[0]
    bias = np.zeros(out.shape[1], out.dtype) if bias is None else bias
    chunks = _chunks(rows, out.size * a.shape[1], _MIN_GEMM_WORK_PER_THREAD)
    if chunks > 1:
        gemm_packed(a, b_packed, out, bias, chunks)
    else:
        gemm_packed_rows(a, b_packed, out, bias, 0, rows)


# The weight gradients (out += a.T @ b over all T*B rows): scipy's BLAS when it runs its
# full-width kernels, else the register tiles (faster than BLAS's narrower kernels on an AVX-512
# machine; see FAST in kernels/blas.py). A switch, so tests can run both.
WEIGHT_GRADS_BY_BLAS = blas.FAST


# The tiles' sums run over blocks of at most this many rows of a and b: the rows of a that a
# tile reads lie one row of a apart, and many of them stop fitting the L2 cache's sets (measured
# at 12800 x 1024 x 128: 136 GFLOP/s in one block, 275 in blocks of 512). Each block's sum is
# added to out as a whole (the transposed tile, tiles._tile_t), so the block also sets
# float32's rounding: a sum over 1600 rows (512 x 256 outputs) 4.0e-4 from float64's in one
# running order, 1.2e-4 in blocks of 512, 6.9e-5 in blocks of 256 (OpenBLAS's SGEMM: 7.8e-5);
# but blocks of 256 ran 5-10% slower at three of six shapes (512 x 2048 x 512, 512 x 4096 x
# 1024, 3200 x 128 x 64).
_K_BLOCK = 512


def _linear(a: np.ndarray, w: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray) -> None:
    """out = a @ w.T (+ bias) on w as stored, for few rows a: the columns split across threads
    when it pays."""
    bias = _EMPTY[w.dtype.type] if bias is None else bias
    chunks = _chunks(w.shape[0] // 4, a.shape[0] * w.size, _MIN_GEMM_WORK_PER_THREAD)
    if chunks > 1:
        linear(a, w, bias, out, 0, a.shape[0], chunks)
    else:
        linear_rows(a, w, bias, out, 0, a.shape[0], 0, w.shape[0])


def _matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b on b as stored, rows split across threads when it pays."""
    rows = a.shape[0]
    chunks = _chunks(rows, out.size * a.shape[1], _MIN_GEMM_WORK_PER_THREAD)
    if chunks > 1:
        gemm(a, b, out, _EMPTY[b.dtype.type], False, False, chunks)
    else:
        gemm_rows_range(a, b, out, _EMPTY[b.dtype.type], False, False, 0, rows)


def _matmul_t(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out += a.T @ b: a (K, M), b (K, N), out (M, N); rows of out split across threads when
    it pays."""
    rows, K = out.shape[0], a.shape[0]
    if WEIGHT_GRADS_BY_BLAS:
        chunks = _chunks(rows, out.size * K, _MIN_GEMM_WORK_PER_THREAD)
        if chunks > 1:
            gemm(a, b, out, _EMPTY[b.dtype.type], True, True, chunks)
        else:
            gemm_rows_range(a, b, out, _EMPTY[b.dtype.type], True, True, 0, rows)
        return
    # Rows of a a multiple of 4 KiB long put a tile's reads in the same few cache sets: copied
    # to rows one cache line longer first (12.9 -> 11.5 ms at 512 x 4096 x 1024, the copy
    # included; 3.0 -> 2.7 at 512 x 2048 x 512).
    padded = None
    if a.shape[1] * a.itemsize % 4096 == 0:
        padded = np.empty((min(K, _K_BLOCK), a.shape[1] + 64 // a.itemsize), a.dtype)
    for k0 in range(0, K, _K_BLOCK):
        a_k, b_packed = a[k0:k0 + _K_BLOCK], _pack(b[k0:k0 + _K_BLOCK], False)
        if padded is not None:
            p = padded[:a_k.shape[0]]
            p[:, :a_k.shape[1]] = a_k
            a_k = p
        chunks = _chunks(rows, out.size * a_k.shape[0], _MIN_GEMM_WORK_PER_THREAD)
        if chunks > 1:
            gemm_packed_t(a_k, b_packed, out, None, chunks)
        else:
            gemm_packed_t_rows(a_k, b_packed, out, None, 0, rows)


# Sequences whose per-step buffers (input projections forward; pre-activation gradients
# backward) stay below this many elements run as one chunk; longer ones in about
# _TIME_CHUNKS chunks of at least _CHUNK_ROWS rows each (see "Time chunks" in kernels/driver.py),
# so those buffers take a fraction of the memory of the whole sequence's.
_CHUNK_MIN_ELEMENTS = 1 << 20
_TIME_CHUNKS = 32
_CHUNK_ROWS = 512


def _chunk_steps(T: int, B: int, width: int) -> int:
    """Steps per time chunk for per-step buffers of ``width`` elements per row."""
    if T * B * width <= _CHUNK_MIN_ELEMENTS:
        return max(T, 1)
    return max(1, min(T, max(-(-_CHUNK_ROWS // B), -(-T // _TIME_CHUNKS))))


def _time_chunks(T: int, L: int, reverse: bool, backward: bool):
    """(i0, i1, t_lo) of each chunk of L steps: processing steps [i0, i1) are the times
    [t_lo, t_lo + i1 - i0). At least one (empty when T == 0: the loops still set the state)."""
    late_first = reverse != backward  # processing order runs from late to early times
    for i0 in range(0, max(T, 1), L):
        i1 = min(T, i0 + L)
        yield i0, i1, (T - i1 if late_first else i0)


def _forward(mode: str, steps: np.ndarray, reverse: bool, training: bool, x, w_ih, w_hh, b_ih, b_hh, w_hr,
             h0, c0):
    """Arrays in, arrays out: (out, h_n, c_n, c_seq, saved, m_seq) of one layer-direction;
    m_seq is the LSTM's output before projection when w_hr is given (see kernels/driver.py)."""
    cell = CELLS[mode]
    T, B, I = x.shape
    GH, Ho = w_hh.shape  # Ho: proj_size with projections, else H
    H = GH // cell.gates
    dtype = x.dtype
    Hc = c0.shape[-1]
    out = np.empty((T, B, Ho), dtype)
    c_seq = np.empty((T if training else 0, B, Hc), dtype)  # only backward reads it
    h_n = np.empty((B, Ho), dtype)
    c_n = np.empty((B, Hc), dtype)
    saved = np.empty((T, B, cell.saved * H) if training else (1, 1, cell.saved * H), dtype)
    if w_hr is None:
        w_hr_t, m_seq = _NO_PROJECTION[dtype.type]
    else:
        w_hr_t, m_seq = _pack(w_hr, True), np.empty((T if training else 1, B, H), dtype)
    L = _chunk_steps(T, B, GH)
    xw = np.empty((L, B, GH), dtype)
    plain = T * B <= _PLAIN_MAX_ROW_STEPS  # (see _PLAIN_MAX_ROW_STEPS)
    w_hh_t, col_threads = _recurrent_weights(T, B, w_hh, True)
    w_ih_t = None if plain else _pack(w_ih, True)
    args = (w_hh_t, w_hh,
            b_hh if b_hh is not None else np.zeros(GH, dtype),
            w_hr_t, h0, c0, steps, reverse, out, c_seq, h_n, c_n, saved, m_seq, np.empty((B, GH), dtype))
    kernels = _KERNELS[mode]
    for i0, i1, t_lo in _time_chunks(T, L, reverse, backward=False) if L < T else ((0, T, 0),):
        n = i1 - i0
        if plain:
            _linear(x[t_lo:t_lo + n].reshape(n * B, I), w_ih, b_ih, xw[:n].reshape(n * B, GH))
        else:
            _matmul_packed(x[t_lo:t_lo + n].reshape(n * B, I), w_ih_t, b_ih, xw[:n].reshape(n * B, GH))
        _launch(kernels.forward_rows, kernels.forward_chunks, (xw[:n], *args, i0, i1), B, T,
                B * (Ho * GH + (0 if w_hr is None else w_hr.size)), col_threads)
    return out, h_n, c_n, c_seq, saved, m_seq


def _backward(mode: str, steps: np.ndarray, reverse: bool, need: Sequence[bool], d_out, d_hn, d_cn,
              x, w_ih, w_hh, w_hr, h0, c0, out, c_seq, saved, m_seq):
    """BPTT by the kernel, then the gradient GEMMs, chunk by chunk of time: grads of (x, w_ih,
    w_hh, b_ih, b_hh, w_hr, h0, c0), None where ``need`` says no."""
    cell = CELLS[mode]
    T, B, Ho = out.shape
    I = x.shape[-1]
    GH = w_hh.shape[0]
    dtype = out.dtype
    L = _chunk_steps(T, B, GH * (2 if cell.separate_input_grad else 1))
    d_xw = np.empty((L, B, GH), dtype)
    shared = not cell.separate_input_grad  # dL/d(x W_ih^T) and dL/d(h W_hh^T) are one array (Elman)
    d_hw = d_xw if shared else np.empty((L, B, GH), dtype)
    d_first = np.zeros((B, GH), dtype)
    d_h0 = np.empty((B, Ho), dtype)
    d_c0 = np.empty(c0.shape, dtype)
    project = w_hr is not None
    if project:
        d_h_seq, dm = np.empty((L, B, Ho), dtype), np.empty((B, w_hr.shape[1]), dtype)
    else:
        w_hr, d_h_seq, dm = np.empty((0, 0), dtype), np.empty((0, 0, 0), dtype), np.empty((0, 0), dtype)
    plain = T * B <= _PLAIN_MAX_ROW_STEPS  # (see _PLAIN_MAX_ROW_STEPS)
    w_hh_p, col_threads = _recurrent_weights(T, B, w_hh, False)
    w_hr_p = _pack(w_hr, False) if project else _NO_PROJECTION[dtype.type][0]
    dx = np.empty((T, B, I), dtype) if need[0] else None
    dw_ih = np.zeros(w_ih.shape, dtype) if need[1] else None
    dw_hh = np.zeros(w_hh.shape, dtype) if need[2] else None
    db_ih = np.zeros(GH, dtype) if need[3] else None
    db_hh = np.zeros(GH, dtype) if need[4] else None
    dw_hr = np.zeros(w_hr.shape, dtype) if need[5] else None
    args = (w_hh_p, w_hh, w_hr_p, d_out, d_hn, d_cn, saved, out, c_seq, m_seq, h0, c0, steps, reverse)
    w_ih_p = _pack(w_ih, False) if dx is not None and not plain else None
    kernels = _KERNELS[mode]
    for i0, i1, t_lo in _time_chunks(T, L, reverse, backward=True) if L < T else ((0, T, 0),):
        n = i1 - i0
        _launch(kernels.backward_rows, kernels.backward_chunks,
                (*args, d_xw[:n], d_hw[:n], d_h_seq[:n], d_first, dm, d_h0, d_c0, i0, i1), B, T,
                B * (Ho * GH + w_hr.size), col_threads)
        if n == 0:
            continue
        d_xw2, d_hw2 = d_xw[:n].reshape(n * B, GH), d_hw[:n].reshape(n * B, GH)
        if dx is not None and plain:
            _matmul(d_xw2, w_ih, dx[t_lo:t_lo + n].reshape(n * B, I))
        elif dx is not None:
            _matmul_packed(d_xw2, w_ih_p, None, dx[t_lo:t_lo + n].reshape(n * B, I))
        if dw_ih is not None:
            _matmul_t(d_xw2, x[t_lo:t_lo + n].reshape(n * B, I), dw_ih)
        if dw_hh is not None:
            # h_prev of time t is out[t - 1] (out[t + 1] when reverse) but at each row's first
            # step (added from d_first below)
            k0, k1 = (0, min(n, T - 1 - t_lo)) if reverse else (max(0, 1 - t_lo), n)
            if k1 > k0:
                shift = 1 if reverse else -1
                _matmul_t(d_hw[k0:k1].reshape(-1, GH), out[t_lo + k0 + shift:t_lo + k1 + shift].reshape(-1, Ho),
                          dw_hh)
        if db_ih is not None:
            column_sums(d_xw2, db_ih)
        if db_hh is not None and not (shared and db_ih is not None):
            column_sums(d_hw2, db_hh)
        if dw_hr is not None:  # dL/dW_hr = sum_t dh_t^T m_t
            _matmul_t(d_h_seq[:n].reshape(n * B, Ho), m_seq[t_lo:t_lo + n].reshape(n * B, m_seq.shape[-1]), dw_hr)
    if shared and db_ih is not None and db_hh is not None:  # the same sums
        db_hh[:] = db_ih
    # h0's share, skipped for zeros (hx not given) unless d_first holds an inf or NaN (inf * 0
    # must still make NaN, as in torch; a sum is finite only if every term is)
    if dw_hh is not None and (h0.any() or not math.isfinite(d_first.sum())):
        _matmul_t(d_first, h0, dw_hh)
    return (dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, d_h0 if need[6] else None, d_c0 if need[7] else None)


def _output_grad(d_out: np.ndarray) -> np.ndarray:
    """dL/dout for the kernels, without materialising what autograd broadcast: a gradient that is
    the same for every step or row (stride 0 there, e.g. of out.sum()) goes in as its one
    distinct row (see d_out in kernels/driver.py)."""
    if d_out.strides[0] == 0:
        d_out = d_out[:1]
    if d_out.strides[1] == 0:
        d_out = d_out[:, :1]
    return np.ascontiguousarray(d_out)


def _arrays(*tensors):
    return [None if t is None else _np(t) for t in tensors]


# Parameters arrive at every call: their numpy views are kept, keyed by the tensor's identity
# and checked against its memory and layout (about 0.3 us against 1 us for a new view). A view
# reads the tensor's memory itself, so in-place updates show through; a new ``.data``, shape or
# strides mean a new view.
_VIEWS: dict = {}  # id(tensor) -> (weakref to it, data_ptr, shape, strides, view)


def _weight_arrays(tensors):
    arrays = []
    for t in tensors:
        if t is None:
            arrays.append(None)
            continue
        key = id(t)
        entry = _VIEWS.get(key)
        if entry is not None and entry[0]() is t and entry[1] == t.data_ptr() and entry[2] == t.shape \
                and entry[3] == t.stride():
            arrays.append(entry[4])
            continue
        a = _np(t)
        if t.is_contiguous():  # (else a is a copy, stale after the next in-place update)
            _VIEWS[key] = (weakref.ref(t, lambda _, key=key: _VIEWS.pop(key, None)), t.data_ptr(), t.shape,
                           t.stride(), a)
        arrays.append(a)
    return arrays


def _tensors(*arrays):
    return tuple([None if a is None else torch.from_numpy(a) for a in arrays])


# ---- double backward (``create_graph=True``: gradient penalties, Hessian-vector products).
# The kernels' backward is not itself differentiable. When autograd asks for a differentiable
# backward (grad mode is on inside backward exactly then), the nodes below instead run the
# torch-ops reference forward from their saved inputs and differentiate that with
# create_graph: the same gradients (the reference is the kernels' oracle), now with a graph,
# at the reference path's speed. Ordinary backward never comes here.
def _differentiable_grads(outputs, grad_outputs, inputs, needs) -> list:
    """d(outputs)/d(inputs) contracted with grad_outputs, as a graph: None where ``needs``
    says no, an input is None, or it does not reach the outputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None]
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and t is not None and t.requires_grad]
    result = [None] * len(inputs)
    if pairs and wanted:
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
        for i, g in zip(wanted, grads):
            result[i] = g
    return result


def _reference_grads(plan: tuple, x, h0, c0, weights, grad_outputs, needs) -> list:
    """A stack node's differentiable backward: grads of (x, h0, c0, *weights) by the reference."""
    outputs = _reference_stack(*plan, x, h0, c0, weights)
    return _differentiable_grads(outputs, grad_outputs, (x, h0, c0, *weights), needs)


def _reference_stack(cell: Cell, steps: np.ndarray, num_layers: int, D: int, x, h0, c0, weights) -> tuple:
    """The stack's (output, h_n, c_n) by the torch-ops reference, as a graph (h0 None: zeros)."""
    params = [LayerParams(*weights[k * _PER_LAYER:(k + 1) * _PER_LAYER]) for k in range(num_layers * D)]
    state0 = None if h0 is None else (h0,) if cell.state_size == 1 else (h0, c0)
    packing = Packing(torch.from_numpy(steps))
    with torch.enable_grad():
        out, state_n = run_layers(cell, reference_layer, x, state0, params, num_layers, D, 0.0, False, packing)
    return out, state_n[0], (state_n[1] if cell.state_size == 2 else None)


# ---- the op torch sees: ``rnnkit::layer`` with its autograd formula and shape function, so
# torch.compile / torch.export treat a whole layer-direction as one opaque op.
@torch.library.custom_op("rnnkit::layer", mutates_args=())
def _layer_op(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, steps: Tensor, mode: str, reverse: bool,
              training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    arrays = _arrays(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)
    return _tensors(*_forward(mode, steps.numpy(), reverse, training, *arrays))


@_layer_op.register_fake
def _layer_fake(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, steps, mode, reverse, training):
    T, B = x.shape[0], x.shape[1]
    Ho, Hc, H = w_hh.shape[1], c0.shape[-1], w_hh.shape[0] // CELLS[mode].gates
    S = CELLS[mode].saved * H
    saved = x.new_empty((T, B, S) if training else (1, 1, S))
    m_seq = x.new_empty((0, 0, 0) if w_hr is None else (T if training else 1, B, H))
    c_seq = x.new_empty(T if training else 0, B, Hc)
    return x.new_empty(T, B, Ho), x.new_empty(B, Ho), x.new_empty(B, Hc), c_seq, saved, m_seq


@torch.library.custom_op("rnnkit::layer_backward", mutates_args=())
def _layer_backward_op(d_out: Tensor, d_hn: Tensor, d_cn: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor,
                       w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, out: Tensor, c_seq: Tensor,
                       saved: Tensor, m_seq: Tensor, steps: Tensor, mode: str, reverse: bool,
                       need: list[bool]) -> list[Tensor]:
    grads = _backward(mode, steps.numpy(), reverse, need, _output_grad(d_out.detach().numpy()),
                      *_arrays(d_hn, d_cn, x, w_ih, w_hh, w_hr, h0, c0, out, c_seq, saved, m_seq))
    return [torch.from_numpy(g) if g is not None else x.new_empty(0) for g in grads]


@_layer_backward_op.register_fake
def _layer_backward_fake(d_out, d_hn, d_cn, x, w_ih, w_hh, w_hr, h0, c0, out, c_seq, saved, m_seq, steps,
                         mode, reverse, need):
    w_hr_shape = (0,) if w_hr is None else w_hr.shape
    shapes = [x.shape, w_ih.shape, w_hh.shape, w_hh.shape[:1], w_hh.shape[:1], w_hr_shape, h0.shape, c0.shape]
    return [x.new_empty(shape if n else (0,)) for shape, n in zip(shapes, need)]


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, steps, mode, reverse, training = inputs
    out, h_n, c_n, c_seq, saved, m_seq = output
    ctx.mode, ctx.reverse = mode, reverse
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, h0, c0, out, c_seq, saved, m_seq, steps)


def _layer_grad(ctx, d_out, d_hn, d_cn, d_c_seq, d_saved, d_m_seq):
    x, w_ih, w_hh, w_hr, h0, c0, out, c_seq, saved, m_seq, steps = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:8])
    grads = _layer_backward_op(
        d_out if d_out is not None else out.new_zeros(1, 1, out.shape[-1]),
        d_hn if d_hn is not None else torch.zeros_like(h0),
        d_cn if d_cn is not None else torch.zeros_like(c0),
        x, w_ih, w_hh, w_hr, h0, c0, out, c_seq, saved, m_seq, steps,
        ctx.mode, ctx.reverse, need,
    )
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4


_layer_op.register_autograd(_layer_grad, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The same layer for eager mode: an autograd.Function costs ~100 us less per call than the
    custom op's dispatch, which matters for small layers; both run _forward/_backward."""

    @staticmethod
    def forward(ctx, mode, steps, reverse, training, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0):
        ctx.set_materialize_grads(False)  # an output without a gradient costs no zeros (backward)
        arrays = _arrays(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)
        out, h_n, c_n, c_seq, saved, m_seq = _forward(mode, steps, reverse, training, *arrays)
        ctx.mode, ctx.steps, ctx.reverse = mode, steps, reverse
        results = _tensors(out.copy(), h_n, c_n)  # (the caller's own output: see _EagerStack.forward)
        # Through save_for_backward, so an in-place change of any of them raises instead of
        # corrupting grads, and autograd frees them once this layer's backward has run (the rest
        # of the graph's backward then runs without them).
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, h0, c0, *_tensors(out, c_seq, saved, m_seq))
        ctx.biases = (b_ih, b_hh)  # read only by a differentiable backward (as torch.nn, no version check)
        return results

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, w_ih, w_hh, w_hr, h0, c0, out, *rest = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: see _differentiable_grads
            cell, (b_ih, b_hh) = CELLS[ctx.mode], ctx.biases
            state = (h0,) if cell.state_size == 1 else (h0, c0)
            with torch.enable_grad():
                ref_out, ref_state = reference_layer(cell, x, state, LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr),
                                                     _batch_sizes(ctx.steps), ctx.reverse)
            ref_c = ref_state[1] if cell.state_size == 2 else None
            grads = _differentiable_grads((ref_out, ref_state[0], ref_c), (d_out, d_hn, d_cn),
                                          (x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0), ctx.needs_input_grad[4:])
            return (None,) * 4 + tuple(grads)
        grads = _backward(
            ctx.mode, ctx.steps, ctx.reverse, ctx.needs_input_grad[4:],
            np.zeros((1, 1, out.shape[-1]), _NP_DTYPE[out.dtype]) if d_out is None else _output_grad(d_out.numpy()),
            *_arrays(d_hn if d_hn is not None else torch.zeros_like(h0),
                     d_cn if d_cn is not None else torch.zeros_like(c0), x, w_ih, w_hh, w_hr, h0, c0, out, *rest),
        )
        if _projection_unreached(d_out, d_hn, len(ctx.steps)):
            grads = (*grads[:5], None, *grads[6:])
        return (None,) * 4 + _tensors(*grads)


def _projection_unreached(d_out, d_hn, T: int) -> bool:
    """Whether the loss reached a layer's W_hr not at all, so its gradient is None as in
    torch.nn (not zeros: an optimizer skips None, but decays a zero gradient's weight): only
    c_n has a gradient and there is one step, whose projected h feeds nothing but out and h_n."""
    return d_out is None and d_hn is None and T == 1


_FULL_STEPS: dict = {}  # (T, B) -> steps of a batch without padding (the kernels never write it)


def _batch_sizes(steps: np.ndarray) -> Optional[list]:
    """The reference layer's batch_sizes for the kernels' ``steps``: None when unpadded."""
    return None if len(steps) == 0 or steps[-1] == steps[0] else steps.tolist()


def _steps(T: int, B: int, batch_sizes: Optional[Sequence[int]]) -> np.ndarray:
    """Active rows per step for the kernels (see ``steps`` in kernels/driver.py)."""
    if batch_sizes is not None:
        return np.asarray(batch_sizes, np.int64)
    steps = _FULL_STEPS.get((T, B))
    if steps is None:
        if len(_FULL_STEPS) > 64:
            _FULL_STEPS.clear()
        steps = _FULL_STEPS[T, B] = np.full(T, B, np.int64)
    return steps


def fused_stack(cell: Cell, x: Tensor, state0: Optional[tuple], params: Sequence[LayerParams], num_layers: int,
                num_directions: int, batch_sizes: Optional[Sequence[int]]) -> Optional[tuple]:
    """Every layer and direction in one call, tensors made only at the ends (the driver's stack
    contract, see rnnkit._driver): inference straight through the kernels, training as one
    autograd node (``_EagerStack``). None under torch.compile (the custom op path, layer by
    layer), inside torch.func transforms or forward-mode AD, or for mixed dtypes (fused_layer's
    fallbacks)."""
    if torch.compiler.is_compiling() or _transformed():
        return None
    weights = [t for p in params for t in p]  # _PER_LAYER per layer-direction, None where absent
    state0 = (None, None) if state0 is None else (*state0, None)[:2]  # (h0, c0), None for zeros
    dtype = x.dtype
    for t in (*state0, *weights):
        if t is not None and t.dtype != dtype:
            return None
    training = False
    if torch.is_grad_enabled():
        for t in (x, *state0, *weights):
            if t is not None and t.requires_grad:
                training = True
                break
    plan = (cell, _steps(x.shape[0], x.shape[1], batch_sizes), num_layers, num_directions)
    if training:
        if x.shape[0] == 1 and _single_step_fits(x.shape[1], weights, True):
            out, h_n, c_n = _EagerStep.apply(plan, _weight_arrays(weights), x, *state0, *weights)
        else:
            out, h_n, c_n = _EagerStack.apply(plan, x, *state0, *weights)
    else:
        weights_np = _weight_arrays(weights)
        if x.shape[0] == 1 and _single_step_fits(x.shape[1], weights_np):
            out, h_n, c_n = _tensors(*_single_step(plan, x, weights_np, *state0))
        else:
            out, h_n, c_n = _tensors(*_stack_forward(plan, False, _np(x), *_states(plan, x, weights_np, *state0),
                                                     weights_np)[:3])
    return out, ((h_n, c_n) if cell.state_size == 2 else (h_n,))


def _single_step_fits(B: int, weights: list, training: bool = False) -> bool:
    """Whether a step of B rows runs as ``_single_step`` (inference) or ``_EagerStep``
    (training) given every layer-direction's weights (tensors or arrays, None where absent):
    without projections and with weights small enough that no column threads would split its
    products (_column_threads); a few rows (_PLAIN_MAX_ROW_STEPS), in training with W_hh
    below _STEP_MAX_WEIGHTS values, or in training products of at most _STEP_MAX_WORK
    multiply-adds."""
    work = largest = 0
    for k in range(0, len(weights), _PER_LAYER):
        (GH, I), Ho = weights[k].shape, weights[k + 1].shape[1]
        if weights[k + 4] is not None or _column_threads(1, B, GH * Ho) > 1:
            return False
        work += B * GH * (I + Ho)
        largest = max(largest, GH * Ho)
    if not training:
        return B <= _PLAIN_MAX_ROW_STEPS
    return (B <= _PLAIN_MAX_ROW_STEPS and largest < _STEP_MAX_WEIGHTS) or work <= _STEP_MAX_WORK


def _single_step(plan: tuple, x: Tensor, weights: list, h0: Optional[Tensor], c0: Optional[Tensor]) -> tuple:
    """(output, h_n, c_n) arrays of one inference step of a stack (c_n None but for the LSTM),
    one kernel call per layer-direction (_step_stack): a streaming call of a step spends more in
    the stack's general path (its buffers, time chunks and loop set-up: about 30 us here for
    Elman 32 -> 64, against torch.nn's 24 for the whole call) than in its arithmetic."""
    return _step_stack(plan, _np(x)[0], weights, *_states(plan, x, weights, h0, c0), False)[:3]


def _step_stack(plan: tuple, x: np.ndarray, weights: list, h0: np.ndarray, c0: Optional[np.ndarray],
                training: bool) -> tuple:
    """One step of a stack without projections from x (B, I) and the states' arrays, by the
    driver's step_rows, one call per layer-direction: (output (1, B, D * Ho), h_n, c_n (None
    when c0 is), hs, saved). In training hs holds every layer-direction's h and saved (LD, 1, B,
    S) what step_back_rows reads, h_n being the caller's copy of hs; in inference hs is h_n and
    saved scratch. With one step the reverse direction reads the same input as the forward one."""
    cell, _, num_layers, D = plan
    B = x.shape[0]
    GH, Ho = weights[1].shape  # (every layer-direction's W_hh has this shape)
    dtype = x.dtype
    LD = num_layers * D
    h_n = np.empty((LD, B, Ho), dtype)
    hs = np.empty((LD, B, Ho), dtype) if training else h_n
    copy = None if training else np.empty((B, Ho), dtype)  # (inference: step_rows' copy of h, unread)
    c_n = np.empty((LD, B, 0), dtype) if c0 is None else np.empty(c0.shape, dtype)
    saved = np.empty((LD if training else 1, 1, B if training else 1, cell.saved * GH // cell.gates), dtype)
    xw, hw = np.empty((B, GH), dtype), np.empty((B, GH), dtype)  # scratch
    empty = _EMPTY[dtype.type]
    step = _KERNELS[cell.mode].step_rows
    inp = x
    for layer in range(num_layers):
        for k in range(layer * D, layer * D + D):
            w_ih, w_hh, b_ih, b_hh, _ = weights[k * _PER_LAYER:(k + 1) * _PER_LAYER]
            step(inp, w_ih, empty if b_ih is None else b_ih, w_hh, empty if b_hh is None else b_hh, h0[k],
                 c_n[k] if c0 is None else c0[k], hs[k], c_n[k], h_n[k] if training else copy, xw, hw,
                 saved[k if training else 0], training)
        inp = hs[layer * D] if D == 1 else np.concatenate(hs[layer * D:layer * D + D], -1)
    last = h_n[(num_layers - 1) * D:]
    out = (last[0].copy() if D == 1 else np.concatenate(last, -1)).reshape(1, B, D * Ho)  # (never h_n's memory)
    return out, h_n, None if c0 is None else c_n, hs, saved


def _states(plan: tuple, x: Tensor, weights_np: list, h0: Optional[Tensor], c0: Optional[Tensor]) -> tuple:
    """The stack's (h0, c0) arrays (c0 None but for the LSTM): zeros where a state is None."""
    cell, _, num_layers, D = plan
    if h0 is not None:
        return _np(h0), None if c0 is None else _np(c0)
    zeros = [np.zeros(shape, _NP_DTYPE[x.dtype]) for shape in state_shapes(cell, weights_np[1].shape,
                                                                           num_layers * D, x.shape[1])]
    return zeros[0], zeros[1] if cell.state_size == 2 else None


_PER_LAYER = len(LayerParams._fields)  # w_ih, w_hh, b_ih, b_hh, w_hr


def _stack_forward(plan: tuple, training: bool, x, h0, c0, weights):
    """Arrays in, arrays out: (output, h_n, c_n, records) of a whole stack (c_n None when c0 is:
    a cell without one), records[k] holding layer-direction k's (input, output, c_seq, saved,
    m_seq) for backward."""
    cell, steps, num_layers, D = plan
    no_cell_state = np.empty((h0.shape[1], 0), h0.dtype)  # what the kernels take instead
    finals, records = [], []
    h = x
    for layer in range(num_layers):
        outs = []
        for direction in range(D):
            k = layer * D + direction
            w = weights[k * _PER_LAYER:(k + 1) * _PER_LAYER]
            out, h_n, c_n, c_seq, saved, m_seq = _forward(cell.mode, steps, direction == 1, training, h, *w, h0[k],
                                                          no_cell_state if c0 is None else c0[k])
            finals.append((h_n, c_n))
            records.append((h, out, c_seq, saved, m_seq))
            outs.append(out)
        h = outs[0] if D == 1 else np.concatenate(outs, -1)
    if len(finals) == 1:  # (a view: no copy)
        h_n, c_n = (a.reshape(1, *a.shape) for a in finals[0])
    else:
        h_n, c_n = np.stack([f[0] for f in finals]), np.stack([f[1] for f in finals])
    return h, h_n, None if c0 is None else c_n, records


class _EagerStack(torch.autograd.Function):
    """A whole stack (every layer and direction, no dropout between layers) as one autograd node
    in eager mode: the layer-by-layer torch glue (a node, conversions and a stack of states per
    layer) costs more than a small layer's kernels. Backward runs the layers in reverse, each
    layer's input gradient being the output gradient of the one below."""

    @staticmethod
    def forward(ctx, plan, x, h0, c0, *weights):
        ctx.set_materialize_grads(False)  # an output without a gradient costs no zeros (backward)
        x_np, weights_np = _np(x), _weight_arrays(weights)
        h0_np, c0_np = _states(plan, x, weights_np, h0, c0)
        out, h_n, c_n, records = _stack_forward(plan, True, x_np, h0_np, c0_np, weights_np)
        # The caller may change the returned output in place before backward (a ReLU or dropout
        # in place, a residual added with +=), as torch.nn allows (but for its oneDNN LSTM). So
        # it is not the array backward reads: with one direction that is the last layer's
        # output, and the caller gets a copy (torch.nn's CPU layers also return a copy of the
        # steps' states they keep); two directions' outputs are concatenated into a new array.
        results = _tensors(out.copy() if plan[3] == 1 else out, h_n, c_n)
        # Everything backward reads goes through save_for_backward, so an in-place change of any
        # of it raises instead of corrupting grads, and autograd frees it once backward has run
        # (or, under activation checkpointing, drops it until then). Arrays shared by several
        # records are saved once.
        # Backward reads the arrays themselves rather than converting the saved tensors back
        # (a microsecond each, which small layers feel): the small ones (states, views of the
        # parameters) directly, the per-step ones through weak references, alive exactly as long
        # as the saved tensors that own their memory (x's view is made anew: it owns nothing).
        # Arrays without elements (an Elman or GRU layer's c_seq, m_seq without projections)
        # have nothing to protect or free: kept as they are, no tensor saved.
        index = {id(x_np): 0}  # array -> its position in ``sources``
        saved = [x]
        sources = [(0, None)]  # (position in saved, weak ref) or the array
        slots = []
        for record in records:
            for a in record:
                if id(a) not in index:
                    index[id(a)] = len(sources)
                    if a.size == 0:
                        sources.append(a)
                    else:
                        sources.append((len(saved), weakref.ref(a)))
                        saved.append(torch.from_numpy(a))
            slots.append([index[id(a)] for a in record])
        ctx.plan, ctx.slots, ctx.sources = plan, slots, sources
        ctx.save_for_backward(h0, c0, *weights, *saved)
        ctx.small = (h0_np, c0_np, weights_np)
        return results

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        cell, steps, num_layers, D = ctx.plan
        n_weights = num_layers * D * _PER_LAYER
        if torch.is_grad_enabled():  # create_graph=True: see _differentiable_grads
            h0, c0, *rest = ctx.saved_tensors
            return (None, *_reference_grads(ctx.plan, rest[n_weights], h0, c0, rest[:n_weights],
                                            (d_out, d_hn, d_cn), ctx.needs_input_grad[1:]))
        saved = ctx.saved_tensors[2 + n_weights:]  # (checks that nothing was changed in place)
        h0, c0, weights = ctx.small
        unreached = _projection_unreached(d_out, d_hn, len(steps))
        arrays = [source if isinstance(source, np.ndarray) else
                  _np(saved[source[0]]) if source[1] is None or source[1]() is None else source[1]()
                  for source in ctx.sources]
        needs = ctx.needs_input_grad
        LD, B, Ho = h0.shape
        if c0 is None:
            c0 = np.empty((LD, B, 0), h0.dtype)
        d_h = np.zeros((1, 1, D * Ho), h0.dtype) if d_out is None else _output_grad(d_out.numpy())
        d_hn = np.zeros(h0.shape, h0.dtype) if d_hn is None else _np(d_hn)
        d_cn = np.zeros(c0.shape, c0.dtype) if d_cn is None else _np(d_cn)
        d_h0 = np.empty_like(h0) if needs[2] else None
        d_c0 = np.empty_like(c0) if needs[3] else None
        d_weights = [None] * n_weights
        for layer in reversed(range(num_layers)):
            d_x = None
            for direction in range(D):
                k = layer * D + direction
                x, out, c_seq, saved, m_seq = (arrays[i] for i in ctx.slots[k])
                d_out_k = d_h if D == 1 else np.ascontiguousarray(d_h[..., direction * Ho:(direction + 1) * Ho])
                first = k * _PER_LAYER
                w_ih, w_hh, _, _, w_hr = weights[first:first + _PER_LAYER]
                need = [layer > 0 or needs[1], *needs[4 + first:4 + first + _PER_LAYER], needs[2], needs[3]]
                dx, *d_w, dh0, dc0 = _backward(cell.mode, steps, direction == 1, need, d_out_k, d_hn[k], d_cn[k],
                                               x, w_ih, w_hh, w_hr, h0[k], c0[k], out, c_seq, saved, m_seq)
                d_weights[first:first + _PER_LAYER] = d_w
                if d_h0 is not None:
                    d_h0[k] = dh0
                if d_c0 is not None:
                    d_c0[k] = dc0
                if dx is not None:
                    if d_x is None:
                        d_x = dx
                    else:
                        d_x += dx
            d_h = d_x
        if unreached:
            for k in range((num_layers - 1) * D, num_layers * D):
                d_weights[k * _PER_LAYER + 4] = None
        return (None, *_tensors(d_h if needs[1] else None, d_h0, d_c0, *d_weights))


class _EagerStep(torch.autograd.Function):
    """One training step (T = 1) of a stack without projections whose products are small
    (_single_step_fits) as one autograd node: one kernel call per layer-direction each way
    (_step_stack, and the driver's step_back_rows; the weights as stored). _EagerStack's general path (time chunks,
    per-step buffers, the records of a whole sequence, a call per product) costs more glue than
    such a step's arithmetic: an Elman step of one row, 32 -> 64, spent about 25 us in its
    forward and 35 in its backward there, against torch.nn's 85 for the whole training call."""

    @staticmethod
    def forward(ctx, plan, weights_np, x, h0, c0, *weights):
        ctx.set_materialize_grads(False)  # an output without a gradient costs no zeros (backward)
        h0_np, c0_np = _states(plan, x, weights_np, h0, c0)
        x_np = _np(x)[0]
        out, h_n, c_n, hs, saved = _step_stack(plan, x_np, weights_np, h0_np, c0_np, True)
        # Through save_for_backward as in _EagerStack, so an in-place change raises (the
        # caller's out, h_n and c_n are not among them). Backward reads the arrays themselves,
        # kept here: a step's few rows, not worth freeing early.
        ctx.plan = plan
        ctx.save_for_backward(x, h0, c0, *weights, torch.from_numpy(hs), torch.from_numpy(saved) if saved.size else None)
        ctx.arrays = (x_np, h0_np, c0_np, weights_np, hs, saved)
        return _tensors(out, h_n, c_n)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        cell, _, num_layers, D = ctx.plan
        tensors = ctx.saved_tensors  # (checks that nothing was changed in place)
        if torch.is_grad_enabled():  # create_graph=True: see _differentiable_grads
            x, h0, c0, *weights = tensors[:-2]
            return (None, None, *_reference_grads(ctx.plan, x, h0, c0, weights, (d_out, d_hn, d_cn),
                                                  ctx.needs_input_grad[2:]))
        x, h0, c0, weights, hs, saved = ctx.arrays
        needs = ctx.needs_input_grad
        LD, B, Ho = hs.shape
        GH = weights[1].shape[0]
        dtype = hs.dtype
        if c0 is None:
            c0 = np.empty((LD, B, 0), dtype)
        # the running gradients: dL/dh and dL/dc of each layer-direction, then of its h0 and c0
        d_h0 = np.zeros(hs.shape, dtype) if d_hn is None else np.array(d_hn.numpy())
        d_c0 = np.zeros(c0.shape, dtype) if d_cn is None else np.array(d_cn.numpy())
        d_above = None if d_out is None else d_out.numpy()[0]  # (B, D * Ho), rows broadcast (a sum's) or not
        d_xw = np.empty((B, GH), dtype)
        d_hw = d_xw if not cell.separate_input_grad else np.empty((B, GH), dtype)
        none2, none1 = _EMPTY2[dtype.type], _EMPTY[dtype.type]
        back = _KERNELS[cell.mode].step_back_rows
        d_weights = [None] * (LD * _PER_LAYER)
        for layer in reversed(range(num_layers)):
            if layer == 0:
                inp = x
            else:
                inp = hs[layer * D - 1] if D == 1 else np.concatenate(hs[layer * D - D:layer * D], -1)
            dx = np.zeros(inp.shape, dtype) if layer > 0 or needs[2] else none2
            for direction in range(D):
                k = layer * D + direction
                if d_above is not None:
                    d_h0[k] += d_above[:, direction * Ho:(direction + 1) * Ho]
                first = k * _PER_LAYER
                w_ih, w_hh, b_ih, b_hh, _ = weights[first:first + _PER_LAYER]
                d_w_ih = np.empty(w_ih.shape, dtype) if needs[5 + first] else None
                d_w_hh = np.empty(w_hh.shape, dtype) if needs[6 + first] else None
                d_b_ih = np.empty(GH, dtype) if needs[7 + first] else None
                d_b_hh = np.empty(GH, dtype) if needs[8 + first] else None
                back(d_h0[k], d_c0[k], saved[k], inp, h0[k], c0[k], hs[k], w_ih, w_hh, d_xw, d_hw, needs[3], dx,
                     none2 if d_w_ih is None else d_w_ih, none2 if d_w_hh is None else d_w_hh,
                     none1 if d_b_ih is None else d_b_ih, none1 if d_b_hh is None else d_b_hh)
                d_weights[first:first + 4] = d_w_ih, d_w_hh, d_b_ih, d_b_hh
            d_above = dx
        return (None, None, *_tensors(dx.reshape(1, B, dx.shape[-1]) if needs[2] else None, d_h0 if needs[3] else None,
                                      d_c0 if needs[4] else None, *d_weights))


def fused_layer(
    cell: Cell,
    x: Tensor,
    state: tuple,
    p: LayerParams,
    batch_sizes: Optional[Sequence[int]],
    reverse: bool,
) -> tuple:
    """The driver's layer contract (see rnnkit._driver), run by the fused kernels."""
    T, B = x.shape[0], x.shape[1]
    steps = _steps(T, B, batch_sizes)
    h0 = state[0]
    c0 = state[1] if cell.state_size == 2 else _NO_CELL_STATE[x.dtype].expand(B, 0)
    params = (x, p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr, h0, c0)
    if _transformed():  # the reference layer, which the transforms differentiate and batch
        return reference_layer(cell, x, state, p, batch_sizes, reverse)
    if any(t is not None and t.dtype != x.dtype for t in params):
        # mixed dtypes (possible under autocast, which skips the module's dtype check): the
        # kernels take one dtype, torch ops promote
        return reference_layer(cell, x, state, p, batch_sizes, reverse)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    if torch.compiler.is_compiling():
        out, h_n, c_n, *_ = torch.ops.rnnkit.layer(*params, torch.from_numpy(steps), cell.mode, reverse, training)
        if training:  # (the op's output is saved for its backward: the caller's is a copy, see _EagerStack)
            out = out.clone()
    elif training:
        out, h_n, c_n = _EagerLayer.apply(cell.mode, steps, reverse, training, *params)
    else:  # inference: no graph to record, so no autograd.Function around the kernels
        out, h_n, c_n = _tensors(*_forward(cell.mode, steps, reverse, False, *_arrays(*params))[:3])
    return out, ((h_n, c_n) if cell.state_size == 2 else (h_n,))
