"""The fused sequence driver: the forward time loop and the reverse-time (BPTT) loop, written
once for every cell, direction and variable-length batch.

Legend (all arrays C-contiguous, float32 or float64 unless said):
    T  time steps                 B  batch rows (sorted by decreasing length when packed)
    H  the cell's own size        Hc cell-state size (LSTM: H; other cells: 0)
    G  gates per cell             GH = G * H
    S  values saved per row and step for backward (cell-specific, a multiple of H)
    P  projection size (LSTM proj_size), or 0 when the layer does not project
    Ho size of the recurrent state h and of the output: P when projecting, else H

    xw       (n, B, GH)  input projection x_t W_ih^T + b_ih of the n steps of one call (one
                         GEMM before it; see "Time chunks" below)
    The weights inside the loops are packed into strips for the register-tiled products
    (``tiles.pack``: b (K, N) as (ceil(N / W), K, W), W columns per strip); written b* below:
    w_hh_t*  W_hh^T (Ho, GH) packed: hw = h @ W_hh^T + b_hh
    w_hh*    W_hh (GH, Ho) packed: dh_prev += dhw @ W_hh
    weight_hh W_hh (GH, Ho) as the layer stores it: the loops use it instead of w_hh_t* / w_hh*
             when those have no strips ((0, 0, W)), as for calls of a few row-steps, where
             packing would cost more than the products it speeds up (see linalg.linear_rows)
    col_threads  threads for each step's recurrent product, splitting its columns (the strips
             of w_hh_t* / w_hh*, or weight_hh's columns when they have none): a few batch rows
             split across threads by rows would have every thread stream all of W_hh; split
             by columns each streams its share, a parallel region per step; 1: none
    b_hh     (GH,)       zeros when the layer has no bias
    w_hr_t*  W_hr^T (H, P) packed: h_t = m_t @ W_hr^T; (0, 0, W) when not projecting
    w_hr*    W_hr (P, H) packed: dm_t = dh_t @ W_hr; (0, 0, W) when not projecting
    steps    (T,) int64  active rows per step, non-increasing (a PackedSequence's batch_sizes)
    out      (T, B, Ho)  h_t for every step (zero at inactive rows)
    d_out    (T, B, Ho)  dL/dout; (1, B, Ho), (T, 1, Ho) or (1, 1, Ho) when it is the same for
                         every step or row (a gradient broadcast by autograd, e.g. of a sum)
    c_seq    (T, B, Hc)  c_t for every step, kept for backward; (0, B, Hc) when not training
                         (inference writes none of it)
    saved    (T, B, S)   what the cell's backward needs; (1, 1, S) scratch when not training
    m_seq    (T, B, H)   projecting only: the cell's output m_t before projection (zero at
                         inactive rows); (1, B, H) scratch when not training; (0, 0, 0) otherwise
    d_h_seq  (n, B, P)   projecting only: dL/dh_t for the n steps of one call (zero at inactive
                         rows), so dL/dW_hr = sum_t dh_t^T m_t is a GEMM after it; else (0, 0, 0)
    d_xw     (n, B, GH)  backward: dL/dxw_t for the n steps of one call (zero at inactive rows)
    d_hw     (n, B, GH)  backward: dL/d(h_prev W_hh^T + b_hh) likewise (d_xw itself for cells
                         whose two are equal)
    d_first  (B, GH)     backward: d_hw at each row's first step, where h_prev is h0[r]
    d_own    (B, K)      backward: each row's running sums of dL/d(the cell's own parameters),
                         which its backward adds its step's share to (K = 0 for cells without
                         any; float64, whatever the layer's dtype: sums over many steps). Per
                         row, so threads taking slices of the batch never add to one place; the
                         caller sums the rows after the loop

Regularizers (rnnkit's recurrent_dropout and zoneout; absent arrays, ``absent``, when off):
    h_mask   (B, Ho)     recurrent dropout: h_in = h_prev * h_mask enters W_hh (the cell itself
                         still reads h_prev), so dh_prev += (d_hw @ W_hh) * h_mask; the caller
                         masks h_prev likewise for dL/dW_hh
    zone_p   (2,)        zoneout's probability p for h and for c (0: that state has none), in
                         the layer's dtype: h_t = z * h_prev + (1 - z) * h~_t, h~_t the step's
                         (projected) new h; c alike. z is p itself (eval: the expectation) ...
    zone_draw (4,) uint64 ... or, when given (training), a 0/1 draw per element, keep (z = 1)
                         where zone_draw_bits(seed, index) < threshold: [seed_h, seed_c,
                         threshold_h, threshold_c], index (t * B + r) * size + j (see
                         ``zone_bits``: the masks are computed where they are used, forward and
                         backward, never stored)
    raw      (T, B, Ho)  training with zoneout on h, for cells whose backward reads h (Elman):
                         h~_t, which out does not hold (it holds the blend); else unread
    hm, prev_h (B, Ho), prev_c (B, Hc); d_in (B, Ho), kept_h (B, Ho), kept_c (B, Hc): scratch

Time chunks: each loop runs the steps i0 <= i < i1 of its processing order (forward: time i,
or T-1-i when reverse; backward the opposite) and carries its running state (h_n, c_n or
d_h0, d_c0) from one call to the next, so the caller can run a long sequence in chunks and
keep only one chunk's input projections and gradients alive: the GEMMs before a forward chunk
and after a backward chunk then work on n*B rows at a time. dL/dW_hh needs no copy of h_prev:
at every step but a row's first, h_prev is the output of the step before (zero at rows that
were inactive there), and the first steps' share is d_first^T h0.

The loops below are templates: ``kernels_for(kind)`` compiles one copy of each per cell, with
the cell's row functions frozen in as ``cell_forward`` / ``cell_infer`` / ``cell_backward``, so
each cell's pointwise math is inlined into its own loops (the cells compile with
``config.jit_inline``: a call per row would cost more than the math) and each copy caches under
its own name. A cell plugs in as pointwise row functions registered under an integer id:
    forward(xw (GH,), hw (GH,), h (H,) in: h_prev, out: h_t, c (Hc,) likewise, saved (S,), own)
    infer   (optional) forward's math without writing ``saved``, for loops that keep nothing
            for backward (inference): the saves are extra stores per element, and the GRU's
            and LSTM's cost more than their math at small H
    backward(dh (H,) in: dL/dh_t, out: the part of dL/dh_prev that bypasses W_hh,
             dc (Hc,) in: dL/dc_t, out: dL/dc_prev, saved (S,), h_prev (H,), c_prev (Hc,),
             h (H,), dxw (GH,) out: dL/dxw_t, dhw (GH,) out: dL/d(h_prev W_hh^T + b_hh), own,
             d_own (K,) in/out: adds the step's dL/d(own) (see d_own above))
where ``own`` is the tuple of the cell's own parameters for this layer-direction (those it
declares beyond torch.nn's five, in declaration order, as arrays; ``()`` for cells without any).
A cell that adds the biases itself, after its own transform of the two products (the
layer-normalized cells: ``Cell.biases_inside``), gets b_ih and b_hh at the head of ``own``
instead: its xw and hw are then the bare products x W_ih^T and h_prev W_hh^T, and its dxw and
dhw the gradients of those.
The driver owns everything else: reversal, per-sequence lengths (inactive rows keep their
state, so the reverse direction starts each sequence at its own last step), the recurrent
products, the optional projection, and row ranges [r0, r1) so threads can each take a slice of
the batch for the whole sequence.

Projections (LSTM proj_size, P > 0, decided by the shape of w_hr_t* / w_hr*): the cell computes
its own output m_t (H,) as always, but into a row of m_seq instead of the state h, and the
driver projects the active rows with one product per step, h_t = m_t @ W_hr^T. Backward
mirrors it: dm_t = dh_t @ W_hr on the active rows feeds the cell's backward as its ``dh``. So
for a projecting layer the cell's arguments change meaning: forward's ``h`` is a scratch row
(its input value is unspecified, so the cell must not read h_prev there); backward's ``dh`` is
dL/dm_t, ``h`` is m_t, ``h_prev`` is the projected previous state (Ho,) and the part of
dL/dh_prev the cell writes back into ``dh`` is ignored (it must be zero: no path bypasses W_hh).
Only cells meeting that (the LSTM) may be given projections. Without projections the loops run
exactly as before: the cell writes h_t into the state itself, with no extra copy or product.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import prange

from . import mathfn, scalars  # noqa: F401  (mathfn registers the compiled tanh / sigmoid the cells call)
from .borrow import borrow
from .config import jit, jit_inline, jit_parallel, specialise
from .linalg import column_sums, linear, linear_any, linear_rows, matmul_acc, matmul_acc_columns, matmul_t
from .tiles import matmul_packed, matmul_packed_columns

_CELLS: dict[int, tuple] = {}


# The vector helpers a cell's row functions may call (kernels/scalars.py), compiled to be inlined
# as the row functions are (given to them by name: the cells import no numba). (numba's overloads
# inlined twice into one function lose track of their loops' variables; these do not.)
_HELPERS: dict = {}
for _name in ("moments", "norm_forward", "norm_backward"):  # (each may call those before it)
    _HELPERS[_name] = jit_inline(specialise(getattr(scalars, _name), _name, **_HELPERS))


def _row_function(fn):
    return jit_inline(specialise(fn, fn.__name__, **_HELPERS))


def register_cell(kind: int, forward, backward, infer=None) -> None:
    """Make a cell's pointwise row functions (plain Python, see rnnkit.cells) available to the
    driver under the id ``kind``, compiled to be inlined into its loops."""
    forward, backward = _row_function(forward), _row_function(backward)
    _CELLS[kind] = (forward, backward, forward if infer is None else _row_function(infer))


# The cell's row functions inside the loops below: each compiled copy of the loops (see
# ``kernels_for``) has its own cell's functions here, frozen at compile time and inlined.
def cell_forward(xw, hw, h, c, saved, own):
    raise NotImplementedError


def cell_infer(xw, hw, h, c, saved, own):
    raise NotImplementedError


def cell_backward(dh, dc, saved, h_prev, c_prev, h, dxw, dhw, own, d_own):
    raise NotImplementedError


# Row copies and sums in the loops: element loops, not slice assignment (``a[:] = b`` checks
# whether the two may overlap and, for the borrowed arrays, copies through a temporary: 0.27-0.40
# ns per value against 0.05-0.08 for the loop, measured on 32 rows of 64 and 512).
@jit_inline
def _copy(dst, src):
    if src.shape[0] != dst.shape[0]:
        raise ValueError("driver: rows of different lengths")
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@jit_inline
def _add(dst, src):
    if src.shape[0] != dst.shape[0]:
        raise ValueError("driver: rows of different lengths")
    for j in range(dst.shape[0]):
        dst[j] += src[j]


@jit_inline
def _product(dst, a, b):
    """dst = a * b, element by element."""
    if a.shape[0] != dst.shape[0] or b.shape[0] != dst.shape[0]:
        raise ValueError("driver: rows of different lengths")
    for j in range(dst.shape[0]):
        dst[j] = a[j] * b[j]


@jit_inline
def _add_product(dst, a, b):
    """dst += a * b, element by element."""
    if a.shape[0] != dst.shape[0] or b.shape[0] != dst.shape[0]:
        raise ValueError("driver: rows of different lengths")
    for j in range(dst.shape[0]):
        dst[j] += a[j] * b[j]


def zone_bits(seed, index):
    """31 random bits (0 <= value < 2^31) for element ``index`` of a zoneout mask drawn from
    ``seed`` (uint64s): SplitMix64's output function of the seed's index-th state. A counter-based
    draw: any element's computed on its own, so the loops draw the masks where they use them,
    forward and backward, instead of reading T * B * H stored values (rnnkit._driver.zone_masks
    is the same function over whole arrays)."""
    z = seed + (index + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(33)


_zone_bits = jit_inline(zone_bits)


@jit_inline
def _blend(x, prev, zone_p, zone_draw, which, base):
    """Zoneout: x = z * prev + (1 - z) * x for state ``which`` (0: h, 1: c), z of elements base,
    base + 1, ...: 0 or 1 drawn (training: 1 where zone_bits(seed, index) < threshold), or p."""
    if prev.shape[0] != x.shape[0]:
        raise ValueError("driver: rows of different lengths")
    if zone_draw.shape[0] == 0:
        z = zone_p[which]
        for j in range(x.shape[0]):
            x[j] = z * prev[j] + (1 - z) * x[j]
    else:
        # (one: 1 in the state's dtype, p / p with p > 0 here, so z * prev stays in that dtype)
        seed, threshold, one = zone_draw[which], zone_draw[2 + which], zone_p[which] / zone_p[which]
        for j in range(x.shape[0]):
            z = one if _zone_bits(seed, np.uint64(base + j)) < threshold else one - one
            x[j] = z * prev[j] + (1 - z) * x[j]


@jit_inline
def _keep(d, kept, zone_p, zone_draw, which, base):
    """Zoneout's backward: kept = z * d (what reaches the previous state directly), d *= 1 - z
    (what reaches the step's own new state); z as in _blend."""
    if kept.shape[0] != d.shape[0]:
        raise ValueError("driver: rows of different lengths")
    if zone_draw.shape[0] == 0:
        z = zone_p[which]
        for j in range(d.shape[0]):
            kept[j] = z * d[j]
            d[j] = (1 - z) * d[j]
    else:
        seed, threshold, one = zone_draw[which], zone_draw[2 + which], zone_p[which] / zone_p[which]
        for j in range(d.shape[0]):
            z = one if _zone_bits(seed, np.uint64(base + j)) < threshold else one - one
            kept[j] = z * d[j]
            d[j] = (1 - z) * d[j]


@jit_inline
def _regular(h_mask, zone_p, zone_draw, raw, T, B, Ho, r1):
    """(masked, zone_h, zone_c, keep_raw) of the loops' regularizer arrays (see the legend),
    checked against the T steps, B rows (r1 at most B) and h's size."""
    masked = h_mask.shape[0] > 0
    zoning = zone_p.shape[0] > 0
    if (masked and (h_mask.shape[0] < r1 or h_mask.shape[1] != Ho)) or (zoning and zone_p.shape[0] != 2) \
            or (zone_draw.shape[0] != 0 and zone_draw.shape[0] != 4):
        raise ValueError("driver: regularizer arrays do not fit")
    zone_h = zoning and zone_p[0] > 0
    zone_c = zoning and zone_p[1] > 0
    keep_raw = raw.shape[0] == T and raw.shape[1] == B
    return masked, zone_h, zone_c, keep_raw


def _forward_rows(xw, w_hh_t, weight_hh, b_hh, w_hr_t, h0, c0, steps, reverse, out, c_seq, h_n, c_n, saved,
                  m_seq, hw, own, h_mask, zone_p, zone_draw, raw, hm, prev_h, prev_c, i0, i1, r0, r1, col_threads):
    """Run rows [r0, r1) through the steps i0 <= i < i1 in processing order (step i is time
    T-1-i when reverse, else i), continuing the state kept in h_n / c_n (started from h0 / c0
    when i0 == 0). xw holds the input projection of those steps only: xw[k] is time t_lo + k,
    t_lo the earliest of them. hw (B, GH) is scratch; so are hm, prev_h, prev_c (see the
    regularizers in the legend)."""
    # every array borrowed (see kernels/borrow.py): the loops' views then cost no atomics
    xw, w_hh_t, b_hh, w_hr_t, h0, c0 = borrow(xw), borrow(w_hh_t), borrow(b_hh), borrow(w_hr_t), borrow(h0), borrow(c0)
    weight_hh = borrow(weight_hh)
    out, c_seq, h_n, c_n, saved = borrow(out), borrow(c_seq), borrow(h_n), borrow(c_n), borrow(saved)
    m_seq, hw, steps = borrow(m_seq), borrow(hw), borrow(steps)
    h_mask, zone_p, zone_draw, raw = borrow(h_mask), borrow(zone_p), borrow(zone_draw), borrow(raw)
    hm, prev_h, prev_c = borrow(hm), borrow(prev_h), borrow(prev_c)
    T, B = out.shape[0], out.shape[1]
    masked, zone_h, zone_c, keep_raw = _regular(h_mask, zone_p, zone_draw, raw, T, B, h_n.shape[1], r1)
    Ho, Hc = h_n.shape[1], c_n.shape[1]
    t_lo = T - i1 if reverse else i0
    # training: keep every step's saved values (else saved is one (1, 1, S) scratch row; the
    # batch size tells them apart when T == 1)
    keep = saved.shape[0] == T and saved.shape[1] == B
    project = w_hr_t.shape[0] > 0
    keep_m = m_seq.shape[0] == T
    keep_c = c_seq.shape[0] == T
    packed = w_hh_t.shape[0] > 0
    h = h_n  # the running state lives in h_n / c_n
    c = c_n
    if i0 == 0:
        for r in range(r0, r1):
            _copy(h[r], h0[r])
            _copy(c[r], c0[r])
    for i in range(i0, i1):
        t = T - 1 - i if reverse else i
        x_t = xw[t - t_lo]
        n = min(max(steps[t], r0), r1)  # rows [r0, n) are active at step t
        h_in = h  # what enters W_hh: h, or h * h_mask (recurrent dropout)
        if masked:
            for r in range(r0, n):
                _product(hm[r], h[r], h_mask[r])
            h_in = hm
        if col_threads > 1 and packed:  # hw = h_in @ W_hh^T + b_hh
            matmul_packed_columns(h_in, w_hh_t, hw, r0, n, b_hh, col_threads)
        elif col_threads > 1:
            linear(h_in, weight_hh, b_hh, hw, r0, n, col_threads)
        elif packed:  # (strip order alternating)
            matmul_packed(h_in, w_hh_t, hw, r0, n, b_hh, i % 2 == 1)
        else:
            linear_rows(h_in, weight_hh, b_hh, hw, r0, n, 0, weight_hh.shape[0])
        if zone_h or zone_c:  # (zoneout: the state before the step, to blend with after it)
            for r in range(r0, n):
                if zone_h:
                    _copy(prev_h[r], h[r])
                if zone_c:
                    _copy(prev_c[r], c[r])
        if project:
            m = m_seq[t if keep_m else 0]
            for r in range(r0, n):
                if keep:
                    cell_forward(x_t[r], hw[r], m[r], c[r], saved[t, r], own)
                else:
                    cell_infer(x_t[r], hw[r], m[r], c[r], saved[0, 0], own)
                if zone_c:
                    _blend(c[r], prev_c[r], zone_p, zone_draw, 1, (t * B + r) * Hc)
                if keep_c:
                    _copy(c_seq[t, r], c[r])
                h[r, :] = 0.0
            matmul_packed(m, w_hr_t, h, r0, n)  # h_t = m_t @ W_hr^T
            for r in range(r0, n):
                if zone_h:
                    if keep_raw:
                        _copy(raw[t, r], h[r])
                    _blend(h[r], prev_h[r], zone_p, zone_draw, 0, (t * B + r) * Ho)
                _copy(out[t, r], h[r])
            if keep_m:
                for r in range(n, r1):
                    m[r, :] = 0.0
        else:
            for r in range(r0, n):
                if keep:
                    cell_forward(x_t[r], hw[r], h[r], c[r], saved[t, r], own)
                else:
                    cell_infer(x_t[r], hw[r], h[r], c[r], saved[0, 0], own)
                if zone_h:
                    if keep_raw:
                        _copy(raw[t, r], h[r])
                    _blend(h[r], prev_h[r], zone_p, zone_draw, 0, (t * B + r) * Ho)
                if zone_c:
                    _blend(c[r], prev_c[r], zone_p, zone_draw, 1, (t * B + r) * Hc)
                _copy(out[t, r], h[r])
                if keep_c:
                    _copy(c_seq[t, r], c[r])
        for r in range(n, r1):
            out[t, r, :] = 0.0
            if keep_c:
                c_seq[t, r, :] = 0.0


def _backward_rows(w_hh, weight_hh, w_hr, d_out, d_hn, d_cn, saved, out, c_seq, m_seq, h0, c0, steps, reverse,
                   d_xw, d_hw, d_h_seq, d_first, dm, d_h0, d_c0, own, d_own, h_mask, zone_p, zone_draw, raw, d_in,
                   kept_h, kept_c, i0, i1, r0, r1, col_threads):
    """BPTT for rows [r0, r1) over the steps i0 <= i < i1 of the reverse-time loop (step i is
    time i when reverse, else T-1-i), continuing the running gradient kept in d_h0 / d_c0
    (started from d_hn / d_cn when i0 == 0). Fills, for those steps only (index k is time
    t_lo + k, t_lo the earliest of them), d_xw, d_hw (n, B, GH) and d_h_seq; and d_first[r]
    with d_hw at row r's first step, whose h_prev is h0[r] (at every other step h_prev is the
    output of the step before, so dL/dW_hh needs no copy of it). dm (B, H) is scratch
    (projecting only); so are d_in, kept_h, kept_c (see the regularizers in the legend)."""
    # every array borrowed, as in _forward_rows
    w_hh, w_hr, d_out, d_hn, d_cn = borrow(w_hh), borrow(w_hr), borrow(d_out), borrow(d_hn), borrow(d_cn)
    weight_hh = borrow(weight_hh)
    saved = borrow(saved)
    out, c_seq, m_seq, h0, c0, steps = borrow(out), borrow(c_seq), borrow(m_seq), borrow(h0), borrow(c0), borrow(steps)
    d_xw, d_hw, d_h_seq, d_first, dm = borrow(d_xw), borrow(d_hw), borrow(d_h_seq), borrow(d_first), borrow(dm)
    d_h0, d_c0 = borrow(d_h0), borrow(d_c0)
    h_mask, zone_p, zone_draw, raw = borrow(h_mask), borrow(zone_p), borrow(zone_draw), borrow(raw)
    d_in, kept_h, kept_c, d_own = borrow(d_in), borrow(kept_h), borrow(kept_c), borrow(d_own)
    T = out.shape[0]
    B = out.shape[1]
    if d_own.shape[0] < r1:
        raise ValueError("driver: d_own has fewer rows than the batch")
    masked, zone_h, zone_c, keep_raw = _regular(h_mask, zone_p, zone_draw, raw, T, B, out.shape[2], r1)
    Ho, Hc = out.shape[2], c0.shape[1]
    t_lo = i0 if reverse else T - i1
    project = w_hr.shape[0] > 0
    per_step = d_out.shape[0] == T  # else one (1, ., Ho) gradient for every step
    per_row = d_out.shape[1] == out.shape[1]  # else one (., 1, Ho) gradient for every row
    packed = w_hh.shape[0] > 0
    dh = d_h0  # the running gradient lives in d_h0 / d_c0
    dc = d_c0
    if i0 == 0:
        for r in range(r0, r1):
            _copy(dh[r], d_hn[r])
            _copy(dc[r], d_cn[r])
    for i in range(i0, i1):
        t = i if reverse else T - 1 - i  # forward's steps in reverse order
        k = t - t_lo
        tp = t + 1 if reverse else t - 1  # the step that produced h_prev
        n = min(max(steps[t], r0), r1)
        if project:
            for r in range(r0, n):
                dhr = dh[r]
                _add(dhr, d_out[t if per_step else 0, r if per_row else 0])
                if zone_h:  # dL/dh_prev gets z * dL/dh_t; the step's new h (1 - z) * dL/dh_t
                    _keep(dhr, kept_h[r], zone_p, zone_draw, 0, (t * B + r) * Ho)
                _copy(d_h_seq[k, r], dhr)
                dm[r, :] = 0.0
            matmul_packed(dh, w_hr, dm, r0, n)  # dm_t = dh_t @ W_hr
            for r in range(n, r1):
                d_h_seq[k, r, :] = 0.0
        for r in range(r0, n):
            first = tp < 0 or tp >= T or r >= steps[tp]
            hp = h0[r] if first else out[tp, r]
            cp = c0[r] if first else c_seq[tp, r]
            if zone_c:
                _keep(dc[r], kept_c[r], zone_p, zone_draw, 1, (t * B + r) * Hc)
            if project:
                cell_backward(dm[r], dc[r], saved[t, r], hp, cp, m_seq[t, r], d_xw[k, r], d_hw[k, r], own, d_own[r])
                if zone_h:
                    _copy(dh[r], kept_h[r])
                else:
                    dh[r, :] = 0.0  # no path from h_t to h_prev bypasses W_hh (see the legend)
            else:
                dhr = dh[r]
                _add(dhr, d_out[t if per_step else 0, r if per_row else 0])
                if zone_h:
                    _keep(dhr, kept_h[r], zone_p, zone_draw, 0, (t * B + r) * Ho)
                    # (the cell's own output, before the blend)
                    cell_backward(dhr, dc[r], saved[t, r], hp, cp, raw[t, r] if keep_raw else out[t, r],
                                  d_xw[k, r], d_hw[k, r], own, d_own[r])
                    _add(dhr, kept_h[r])
                else:
                    cell_backward(dhr, dc[r], saved[t, r], hp, cp, out[t, r], d_xw[k, r], d_hw[k, r], own, d_own[r])
            if zone_c:
                _add(dc[r], kept_c[r])
            if first:
                _copy(d_first[r], d_hw[k, r])
        for r in range(n, r1):
            d_xw[k, r, :] = 0.0
            d_hw[k, r, :] = 0.0
        d_to = dh  # dh += d_hw W_hh, or (recurrent dropout) dh += (d_hw W_hh) * h_mask
        if masked:
            for r in range(r0, n):
                d_in[r, :] = 0.0
            d_to = d_in
        if col_threads > 1 and packed:
            matmul_packed_columns(d_hw[k], w_hh, d_to, r0, n, None, col_threads)
        elif col_threads > 1:
            matmul_acc_columns(d_hw[k], weight_hh, d_to, r0, n, col_threads)
        elif packed:
            matmul_packed(d_hw[k], w_hh, d_to, r0, n)
        else:
            matmul_acc(d_hw[k], weight_hh, d_to, r0, n)
        if masked:
            for r in range(r0, n):
                _add_product(dh[r], d_in[r], h_mask[r])


def _forward_chunks(xw, w_hh_t, weight_hh, b_hh, w_hr_t, h0, c0, steps, reverse, out, c_seq, h_n, c_n, saved,
                    m_seq, hw, own, h_mask, zone_p, zone_draw, raw, hm, prev_h, prev_c, i0, i1, chunks):
    """_forward_rows over ``chunks`` slices of the batch, one thread each."""
    B = out.shape[1]
    size = (B + chunks - 1) // chunks
    for j in prange(chunks):
        r0 = j * size
        forward_rows(xw, w_hh_t, weight_hh, b_hh, w_hr_t, h0, c0, steps, reverse, out, c_seq, h_n, c_n, saved,
                     m_seq, hw, own, h_mask, zone_p, zone_draw, raw, hm, prev_h, prev_c, i0, i1, r0,
                     min(r0 + size, B), 1)  # (1: no parallel region inside this one)


def _backward_chunks(w_hh, weight_hh, w_hr, d_out, d_hn, d_cn, saved, out, c_seq, m_seq, h0, c0, steps, reverse,
                     d_xw, d_hw, d_h_seq, d_first, dm, d_h0, d_c0, own, d_own, h_mask, zone_p, zone_draw, raw, d_in,
                     kept_h, kept_c, i0, i1, chunks):
    B = out.shape[1]
    size = (B + chunks - 1) // chunks
    for j in prange(chunks):
        r0 = j * size
        backward_rows(w_hh, weight_hh, w_hr, d_out, d_hn, d_cn, saved, out, c_seq, m_seq, h0, c0, steps, reverse,
                      d_xw, d_hw, d_h_seq, d_first, dm, d_h0, d_c0, own, d_own, h_mask, zone_p, zone_draw, raw, d_in,
                      kept_h, kept_c, i0, i1, r0, min(r0 + size, B), 1)


def _step_rows(x, w_ih, b_ih, weight_hh, b_hh, h0, c0, h, c, out, xw, hw, saved, keep, own):
    """One step of a layer without projections, for all rows of x (B, I), with W_ih and W_hh as
    stored (no packing: see linalg.linear_any): h, c = the cell of (x W_ih^T + b_ih, h0 W_hh^T
    + b_hh) from (h0, c0); out (B, H) a copy of h. xw, hw (B, GH) are scratch; saved is
    (1, B, S) when ``keep`` (training: what _step_back_rows reads), else (1, 1, S) scratch.
    The biases may be empty (none). The same arithmetic as _forward_rows' one step, in one call
    instead of a layer's worth."""
    B = x.shape[0]
    if h.shape[0] != B or c.shape[0] != B or out.shape[0] != B or h0.shape[0] != B or c0.shape[0] != B:
        raise ValueError("driver: rows of different counts")
    if keep and saved.shape[1] != B:
        raise ValueError("driver: saved rows of a different count")
    linear_any(x, w_ih, b_ih, xw, 0, B)
    linear_any(h0, weight_hh, b_hh, hw, 0, B)
    for r in range(B):
        _copy(h[r], h0[r])
        _copy(c[r], c0[r])
        if keep:
            cell_forward(xw[r], hw[r], h[r], c[r], saved[0, r], own)
        else:
            cell_infer(xw[r], hw[r], h[r], c[r], saved[0, 0], own)
        _copy(out[r], h[r])


def _step_back_rows(dh, dc, saved, x, h0, c0, h, w_ih, weight_hh, d_xw, d_hw, need_dh, dx, dw_ih, dw_hh, db_ih,
                    db_hh, own, d_own):
    """Backward of _step_rows (keep) from its inputs x, h0, c0 and its h and saved: dh (B, H)
    in: dL/dh, out: dL/dh0 (only the part that bypasses W_hh unless ``need_dh``); dc likewise
    for c. Adds dL/dx to dx (B, I) and writes dL/dW_ih, dL/dW_hh (as stored), dL/db_ih and
    dL/db_hh, each skipped when given without rows. d_xw, d_hw (B, GH) are scratch (one array
    for cells whose two are equal)."""
    B = dh.shape[0]
    if (dc.shape[0] != B or saved.shape[1] != B or x.shape[0] != B or h0.shape[0] != B or c0.shape[0] != B
            or h.shape[0] != B or d_xw.shape[0] != B or d_hw.shape[0] != B or d_own.shape[0] != B):
        raise ValueError("driver: rows of different counts")
    for r in range(B):
        cell_backward(dh[r], dc[r], saved[0, r], h0[r], c0[r], h[r], d_xw[r], d_hw[r], own, d_own[r])
    if need_dh:
        matmul_acc(d_hw, weight_hh, dh, 0, B)  # dL/dh0 = the part bypassing W_hh + d_hw W_hh
    if dx.shape[0] > 0:
        matmul_acc(d_xw, w_ih, dx, 0, B)
    if dw_ih.shape[0] > 0:
        matmul_t(d_xw, x, dw_ih)
    if dw_hh.shape[0] > 0:
        matmul_t(d_hw, h0, dw_hh)
    if db_ih.shape[0] > 0:
        db_ih[:] = 0
        column_sums(d_xw, db_ih)
    if db_hh.shape[0] > 0:
        db_hh[:] = 0
        column_sums(d_hw, db_hh)


def _stream_rows(x, w_ih, b_ih, weight_hh, b_hh, w_hr, own, h, c, out, xw, hw, m, saved):
    """Inference steps of a stack of layers of one direction (the streaming API): every layer's
    state, h (L, B, Ho) and c (L, B, Hc), carried in place over the T steps of x (T * B, I), the
    B rows of each step one after another, and out (T * B, Ho) the top layer's h at each step.
    w_ih, b_ih, weight_hh, b_hh, w_hr and own hold one entry per layer, or more (entries past
    the L-th are unread: padded, tuples of a few lengths compile a few copies instead of one per
    depth) (w_hr (P, H), or (0, 0) when not projecting; biases (0,) when absent; own the cell's
    own parameters). Weights as
    stored (no packing: a step's products on a few rows, see linalg.linear_any). xw, hw (B, GH),
    m (B, H) (projecting; else unread) and saved (1, 1, S) are scratch. The caller checks the
    weights' shapes against one another."""
    x, h, c, out, xw, hw, m, saved = borrow(x), borrow(h), borrow(c), borrow(out), borrow(xw), borrow(hw), \
        borrow(m), borrow(saved)
    L, B, Ho = h.shape
    GH = xw.shape[1]
    if (len(w_ih) < L or len(b_ih) < L or len(weight_hh) < L or len(b_hh) < L or len(w_hr) < L
            or len(own) < L or B == 0 or x.shape[0] % B != 0 or c.shape[0] != L or c.shape[1] != B
            or out.shape[0] != x.shape[0] or out.shape[1] != Ho or xw.shape[0] != B or hw.shape[0] != B
            or hw.shape[1] != GH):
        raise ValueError("driver: stream arrays do not fit")
    H = m.shape[1] if w_hr[0].shape[0] > 0 else Ho  # (the cell's own size)
    if H == 0 or GH % H != 0 or (c.shape[2] != 0 and c.shape[2] != H):
        raise ValueError("driver: stream state does not fit")
    for k in range(L):
        if weight_hh[k].shape[0] != GH or weight_hh[k].shape[1] != Ho or w_ih[k].shape[0] != GH:
            raise ValueError("driver: stream weights do not fit")
        if w_hr[k].shape[0] > 0 and (w_hr[k].shape[0] != Ho or m.shape[0] != B or m.shape[1] != w_hr[k].shape[1]):
            raise ValueError("driver: stream projection does not fit")
    for t in range(x.shape[0] // B):
        for k in range(L):
            inp = x[t * B:(t + 1) * B] if k == 0 else h[k - 1]
            linear_any(inp, w_ih[k], b_ih[k], xw, 0, B)
            linear_any(h[k], weight_hh[k], b_hh[k], hw, 0, B)
            hk, ck = h[k], c[k]
            if w_hr[k].shape[0] > 0:
                for r in range(B):
                    cell_infer(xw[r], hw[r], m[r], ck[r], saved[0, 0], own[k])
                linear_any(m, w_hr[k], b_hh[k][:0], hk, 0, B)  # h = m W_hr^T
            else:
                for r in range(B):
                    cell_infer(xw[r], hw[r], hk[r], ck[r], saved[0, 0], own[k])
        top = h[L - 1]
        for r in range(B):
            _copy(out[t * B + r], top[r])

# ---- the loops' arguments, by name. Callers build these bundles by field name and pass them
# unpacked (``kernel(*args, i0, i1, ...)``): each field is the loop parameter of the same name and
# position (tests/test_plan.py checks it). Passed as one NamedTuple instead, numba's dispatch
# types every field in Python: 4-5 us per call against about 1 us for the same arrays as
# arguments (measured, 6 arrays), which a streaming step cannot afford.
# Absent arrays follow one convention: an empty array of the same dimensions (``absent``).


class ForwardArgs(NamedTuple):
    """_forward_rows / _forward_chunks (see the legend)."""

    xw: object
    w_hh_t: object
    weight_hh: object
    b_hh: object
    w_hr_t: object
    h0: object
    c0: object
    steps: object
    reverse: bool
    out: object
    c_seq: object
    h_n: object
    c_n: object
    saved: object
    m_seq: object
    hw: object
    own: tuple
    h_mask: object
    zone_p: object
    zone_draw: object
    raw: object
    hm: object
    prev_h: object
    prev_c: object


class BackwardArgs(NamedTuple):
    """_backward_rows / _backward_chunks (see the legend)."""

    w_hh: object
    weight_hh: object
    w_hr: object
    d_out: object
    d_hn: object
    d_cn: object
    saved: object
    out: object
    c_seq: object
    m_seq: object
    h0: object
    c0: object
    steps: object
    reverse: bool
    d_xw: object
    d_hw: object
    d_h_seq: object
    d_first: object
    dm: object
    d_h0: object
    d_c0: object
    own: tuple
    d_own: object
    h_mask: object
    zone_p: object
    zone_draw: object
    raw: object
    d_in: object
    kept_h: object
    kept_c: object


class StepArgs(NamedTuple):
    """_step_rows."""

    x: object
    w_ih: object
    b_ih: object
    weight_hh: object
    b_hh: object
    h0: object
    c0: object
    h: object
    c: object
    out: object
    xw: object
    hw: object
    saved: object
    keep: bool
    own: tuple


class StepBackArgs(NamedTuple):
    """_step_back_rows."""

    dh: object
    dc: object
    saved: object
    x: object
    h0: object
    c0: object
    h: object
    w_ih: object
    weight_hh: object
    d_xw: object
    d_hw: object
    need_dh: bool
    dx: object
    dw_ih: object
    dw_hh: object
    db_ih: object
    db_hh: object
    own: tuple
    d_own: object


class StreamArgs(NamedTuple):
    """_stream_rows (tuples: one entry per layer)."""

    x: object
    w_ih: tuple
    b_ih: tuple
    weight_hh: tuple
    b_hh: tuple
    w_hr: tuple
    own: tuple
    h: object
    c: object
    out: object
    xw: object
    hw: object
    m: object
    saved: object


# each template and the bundle its leading parameters are (the rest: row and step ranges, threads)
BUNDLES = {"_forward_rows": ForwardArgs, "_forward_chunks": ForwardArgs, "_backward_rows": BackwardArgs,
           "_backward_chunks": BackwardArgs, "_step_rows": StepArgs, "_step_back_rows": StepBackArgs,
           "_stream_rows": StreamArgs}


class CellKernels(NamedTuple):
    """One cell's compiled loops: serial over a row range, and threaded over batch chunks; and
    its single step of a few rows with that step's backward; and a stack's inference steps with
    the state carried in place (rnnkit.Stream)."""

    forward_rows: object
    backward_rows: object
    forward_chunks: object
    backward_chunks: object
    step_rows: object
    step_back_rows: object
    stream_rows: object


def kernels_for(kind: int, name: str) -> CellKernels:
    """Compile (lazily, cached on disk) the driver's loops for the cell registered as ``kind``."""
    forward, backward, infer = _CELLS[kind]
    cell = {"cell_forward": forward, "cell_backward": backward, "cell_infer": infer}
    fwd = jit(specialise(_forward_rows, f"forward_rows_{name}", **cell))
    bwd = jit(specialise(_backward_rows, f"backward_rows_{name}", **cell))
    return CellKernels(
        fwd,
        bwd,
        jit_parallel(specialise(_forward_chunks, f"forward_chunks_{name}", forward_rows=fwd, backward_rows=bwd)),
        jit_parallel(specialise(_backward_chunks, f"backward_chunks_{name}", forward_rows=fwd, backward_rows=bwd)),
        jit(specialise(_step_rows, f"step_rows_{name}", **cell)),
        jit(specialise(_step_back_rows, f"step_back_rows_{name}", **cell)),
        jit(specialise(_stream_rows, f"stream_rows_{name}", **cell)),
    )
