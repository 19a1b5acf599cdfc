"""Matrix products of the kernels on row ranges of plain contiguous arrays: the big products
before and after the time loop (``gemm``: scipy's BLAS, or our loops for small ones or without
BLAS). The recurrent products inside the loop are ``tiles.matmul_packed``, but for loops of a
few row-steps, which use the weights as stored (``linear_rows``, ``matmul_acc``, and their
column-split ``linear`` / ``matmul_acc_columns``).

``linear``: products of few rows with a weight matrix as torch stores it, without packing it
(a single step or two of a layer, where packing the weights would cost more than using them).

Legend: n rows, K inner size, N output size.
Our own loops use the "axpy" order (rows of the right-hand matrix are contiguous in the inner
loop), which LLVM vectorises, several k per pass over a row of the output so each load and
store of it carries several multiply-adds.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .blas import AVAILABLE as BLAS, gemm_rows
from .config import jit, jit_parallel

# The products before and after the time loop (``gemm``) call BLAS from this many multiply-adds
# per thread; below it, our loops (a BLAS call has a fixed cost).
BLAS_MIN_WORK = 16 * 64 * 64


@jit
def _check_acc(a, b, out, r0, r1, n0, n1):
    K, N = b.shape
    if a.shape[1] != K or out.shape[1] != N or r0 < 0 or n0 < 0 or n1 > N or r1 > min(a.shape[0], out.shape[0]):
        raise ValueError("matmul_acc: operands do not fit")


@jit
def matmul_acc(a, b, out, r0, r1):
    """out[r] += a[r] @ b for r in [r0, r1).  a (B, K), b (K, N), out (B, N)."""
    _check_acc(a, b, out, r0, r1, 0, b.shape[1])
    if r1 - r0 == 1:  # one row: our loop beats a BLAS call at every size measured
        _acc_row(a, b, out, r0)
        return
    if BLAS and r1 > r0:
        gemm_rows(a, b, out, r0, r1, 1.0)
        return
    r = r0
    while r + 4 <= r1:
        _acc_rows4(a, b, out, r)
        r += 4
    while r < r1:
        _acc_row(a, b, out, r)
        r += 1


@jit
def _acc_rows4(a, b, out, r):
    """out[r:r+4] += a[r:r+4] @ b: four rows by four k per pass, so each pass over a row of out
    does 16 multiply-adds per element loaded and stored (a register tile LLVM vectorises)."""
    K, N = b.shape
    o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
    a0, a1, a2, a3 = a[r], a[r + 1], a[r + 2], a[r + 3]
    k = 0
    while k + 4 <= K:
        w0, w1, w2, w3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        x00, x01, x02, x03 = a0[k], a0[k + 1], a0[k + 2], a0[k + 3]
        x10, x11, x12, x13 = a1[k], a1[k + 1], a1[k + 2], a1[k + 3]
        x20, x21, x22, x23 = a2[k], a2[k + 1], a2[k + 2], a2[k + 3]
        x30, x31, x32, x33 = a3[k], a3[k + 1], a3[k + 2], a3[k + 3]
        for j in range(N):
            v0, v1, v2, v3 = w0[j], w1[j], w2[j], w3[j]
            o0[j] += x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3
            o1[j] += x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3
            o2[j] += x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3
            o3[j] += x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3
        k += 4
    while k < K:
        w = b[k]
        x0, x1, x2, x3 = a0[k], a1[k], a2[k], a3[k]
        for j in range(N):
            wj = w[j]
            o0[j] += x0 * wj
            o1[j] += x1 * wj
            o2[j] += x2 * wj
            o3[j] += x3 * wj
        k += 1


@jit
def _acc_row(a, b, out, r):
    """out[r] += a[r] @ b, eight k per pass over the row of out."""
    K, N = b.shape
    o = out[r]
    x = a[r]
    k = 0
    while k + 8 <= K:
        w0, w1, w2, w3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        w4, w5, w6, w7 = b[k + 4], b[k + 5], b[k + 6], b[k + 7]
        x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        x4, x5, x6, x7 = x[k + 4], x[k + 5], x[k + 6], x[k + 7]
        for j in range(N):
            o[j] += (x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]) + (
                x4 * w4[j] + x5 * w5[j] + x6 * w6[j] + x7 * w7[j])
        k += 8
    while k < K:
        w = b[k]
        xk = x[k]
        for j in range(N):
            o[j] += xk * w[j]
        k += 1


@jit
def _check_linear(a, w, bias, out, r0, r1, n0, n1):
    N, K = w.shape
    if (a.shape[1] != K or out.shape[1] != N or bias.shape[0] not in (0, N) or r0 < 0 or n0 < 0 or n1 > N
            or r1 > min(a.shape[0], out.shape[0])):
        raise ValueError("linear: operands do not fit")


@jit
def linear_rows(a, w, bias, out, r0, r1, n0, n1):
    """out[r, n] = a[r] @ w[n] (+ bias[n] when bias is non-empty) for rows [r0, r1) and columns
    [n0, n1): torch's F.linear on w (N, K) as stored. Each output is a dot product along a row
    of w, four rows of w at a time (one load of a[r] feeds four sums); for few rows a this is
    about as fast per row as the register tiles on packed weights (both stream w), without the
    pack, which costs several such passes (512 x 512 float32, one row: 13 us, pack and tile 56).
    """
    N, K = w.shape
    _check_linear(a, w, bias, out, r0, r1, n0, n1)
    zero = out.dtype.type(0)  # (a float literal would make the sums float64)
    has_bias = bias.shape[0] > 0
    for r in range(r0, r1):
        x = a[r]
        o = out[r]
        n = n0
        while n + 4 <= n1:
            w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
            s0 = s1 = s2 = s3 = zero
            for k in range(K):
                xk = x[k]
                s0 += xk * w0[k]
                s1 += xk * w1[k]
                s2 += xk * w2[k]
                s3 += xk * w3[k]
            if has_bias:
                s0 += bias[n]
                s1 += bias[n + 1]
                s2 += bias[n + 2]
                s3 += bias[n + 3]
            o[n] = s0
            o[n + 1] = s1
            o[n + 2] = s2
            o[n + 3] = s3
            n += 4
        while n < n1:
            wn = w[n]
            s = zero
            for k in range(K):
                s += x[k] * wn[k]
            o[n] = s + bias[n] if has_bias else s
            n += 1


# linear_any's row count from which BLAS takes a product (with BLAS_MIN_WORK): below it, the
# dot products of linear_rows on the weights as stored cost no more than BLAS's set-up.
LINEAR_BLAS_MIN_ROWS = 5


@jit
def linear_any(a, w, bias, out, r0, r1):
    """linear_rows over every column, by BLAS (on w as stored, transposed) from
    LINEAR_BLAS_MIN_ROWS rows and BLAS_MIN_WORK multiply-adds, else our loops."""
    N, K = w.shape
    _check_linear(a, w, bias, out, r0, r1, 0, N)
    if BLAS and r1 - r0 >= LINEAR_BLAS_MIN_ROWS and (r1 - r0) * K * N >= BLAS_MIN_WORK:
        has_bias = bias.shape[0] > 0
        for r in range(r0, r1):
            if has_bias:
                out[r, :] = bias
            else:
                out[r, :] = 0
        gemm_rows(a, w, out, r0, r1, 1.0, False, True)
    else:
        linear_rows(a, w, bias, out, r0, r1, 0, N)


@jit
def matmul_t(a, b, out):
    """out = a^T @ b (a (B, N), b (B, K), out (N, K)), every element written once: by BLAS from
    LINEAR_BLAS_MIN_ROWS rows and BLAS_MIN_WORK multiply-adds, else each row of out summed over
    the rows of a and b while it is in cache (a few rows: a weight gradient of a single step)."""
    B, N = a.shape
    K = b.shape[1]
    if b.shape[0] != B or out.shape[0] != N or out.shape[1] != K:
        raise ValueError("matmul_t: operands do not fit")
    if B == 0:
        out[:] = 0
    elif BLAS and B >= LINEAR_BLAS_MIN_ROWS and B * K * N >= BLAS_MIN_WORK:
        gemm_rows(a, b, out, 0, N, 0.0, True)
    else:
        for n in range(N):
            o = out[n]
            s = a[0, n]
            b0 = b[0]
            for k in range(K):
                o[k] = s * b0[k]
            for r in range(1, B):
                s = a[r, n]
                br = b[r]
                for k in range(K):
                    o[k] += s * br[k]


@jit_parallel
def linear(a, w, bias, out, r0, r1, chunks):
    """linear_rows over rows [r0, r1), the columns split across ``chunks`` threads (few rows:
    each thread streams its share of w once)."""
    N = w.shape[0]
    _check_linear(a, w, bias, out, r0, r1, 0, N)  # here: an exception raised inside the threads is lost
    size = (N + 4 * chunks - 1) // (4 * chunks) * 4  # whole groups of four columns per thread
    for i in prange(chunks):
        n0 = min(i * size, N)
        linear_rows(a, w, bias, out, r0, r1, n0, min(n0 + size, N))


@jit
def acc_columns(a, b, out, r0, r1, n0, n1):
    """out[r, n0:n1] += a[r] @ b[:, n0:n1] for r in [r0, r1): the "axpy" order of _acc_row on a
    band of b's columns (a (B, K), b (K, N), out (B, N))."""
    K, N = b.shape
    _check_acc(a, b, out, r0, r1, n0, n1)
    for r in range(r0, r1):
        o = out[r, n0:n1]
        x = a[r]
        k = 0
        while k + 4 <= K:
            w0, w1, w2, w3 = b[k, n0:n1], b[k + 1, n0:n1], b[k + 2, n0:n1], b[k + 3, n0:n1]
            x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
            for j in range(n1 - n0):
                o[j] += (x0 * w0[j] + x1 * w1[j]) + (x2 * w2[j] + x3 * w3[j])
            k += 4
        while k < K:
            w = b[k, n0:n1]
            xk = x[k]
            for j in range(n1 - n0):
                o[j] += xk * w[j]
            k += 1


@jit_parallel
def matmul_acc_columns(a, b, out, r0, r1, chunks):
    """out[r] += a[r] @ b for r in [r0, r1), the columns split across ``chunks`` threads in bands
    a whole number of cache lines wide (few rows: each thread streams its band of b once)."""
    N = b.shape[1]
    _check_acc(a, b, out, r0, r1, 0, N)  # here: an exception raised inside the threads is lost
    line = 64 // b.itemsize
    size = (N + line * chunks - 1) // (line * chunks) * line
    for i in prange(chunks):
        n0 = min(i * size, N)
        acc_columns(a, b, out, r0, r1, n0, min(n0 + size, N))


@jit
def _gemm_rows_any(a, b, c, r0, r1, trans_a):
    """Rows [r0, r1) of c += op(a) @ b, by BLAS when it pays, else our loops."""
    K, N = b.shape
    if BLAS and (r1 - r0) * K * N >= BLAS_MIN_WORK:
        gemm_rows(a, b, c, r0, r1, 1.0, trans_a)
    elif trans_a:
        for k in range(K):
            w = b[k]
            for r in range(r0, r1):
                x = a[k, r]
                o = c[r]
                for j in range(N):
                    o[j] += x * w[j]
    else:
        matmul_acc(a, b, c, r0, r1)


@jit
def gemm_rows_range(a, b, c, bias, trans_a, accumulate, r0, r1):
    """Rows [r0, r1) of c = op(a) @ b (+ bias, a (N,) row, when it is non-empty), or of
    c += op(a) @ b when ``accumulate``: a (M, K) or (K, M) when trans_a, b (K, N), c (M, N)."""
    if not accumulate:
        for r in range(r0, r1):
            if bias.shape[0] > 0:
                c[r, :] = bias
            else:
                c[r, :] = 0
    _gemm_rows_any(a, b, c, r0, r1, trans_a)


@jit_parallel
def gemm(a, b, c, bias, trans_a, accumulate, chunks):
    """gemm_rows_range over all rows of c, split across ``chunks`` threads, each calling
    (single-threaded) BLAS. (One chunk: call gemm_rows_range itself, without the threads'
    start-up cost.)"""
    M = c.shape[0]
    size = (M + chunks - 1) // chunks
    for i in prange(chunks):
        r0 = i * size
        gemm_rows_range(a, b, c, bias, trans_a, accumulate, r0, min(r0 + size, M))


@jit
def column_sums(a, out):
    """out += a.sum(0): the bias gradients.  a (M, N), out (N,).
    Summed in float64 and rounded once: a running float32 sum over the T * B rows of a layer
    drifts (bias gradients of (100, 16, 256, 512) Elman: 4e-3 from float64's against torch's
    4e-4; summed in float64: 2e-4). The sum is bound by reading a either way."""
    if a.shape[1] != out.shape[0]:
        raise ValueError("column_sums: a row of a is not as long as out")
    total = np.zeros(out.shape[0], np.float64)
    for r in range(a.shape[0]):
        row = a[r]
        for j in range(out.shape[0]):
            total[j] += row[j]
    for j in range(out.shape[0]):
        out[j] += total[j]
