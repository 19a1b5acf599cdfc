"""Matrix products of the kernels, on row ranges of plain contiguous arrays: the recurrent
products inside the time loop, and the big products before and after it (``gemm``).

Legend: n rows (active batch rows of one step), K inner size, N output size.
Both products use the "axpy" order (rows of the right-hand matrix are contiguous in the inner
loop), which LLVM vectorises; four rows share each load of the right-hand row.
"""

from __future__ import annotations

from numba import prange

from .blas import AVAILABLE as BLAS, gemm_rows
from .config import jit, jit_parallel

# Below this many multiply-adds a call, our loops beat a BLAS call (and its fixed cost).
BLAS_MIN_WORK = 16 * 64 * 64


@jit
def matmul_acc(a, b, out, r0, r1):
    """out[r] += a[r] @ b for r in [r0, r1).  a (B, K), b (K, N), out (B, N)."""
    K, N = b.shape
    if BLAS and (r1 - r0) * K * N >= BLAS_MIN_WORK:
        gemm_rows(a, b, out, r0, r1, 1.0)
        return
    r = r0
    while r + 4 <= r1:
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        for k in range(K):
            w = b[k]
            x0, x1, x2, x3 = a[r, k], a[r + 1, k], a[r + 2, k], a[r + 3, k]
            for j in range(N):
                wj = w[j]
                o0[j] += x0 * wj
                o1[j] += x1 * wj
                o2[j] += x2 * wj
                o3[j] += x3 * wj
        r += 4
    while r < r1:
        o = out[r]
        for k in range(K):
            w = b[k]
            x = a[r, k]
            for j in range(N):
                o[j] += x * w[j]
        r += 1


@jit
def matmul_bias(a, b, bias, out, r0, r1):
    """out[r] = a[r] @ b + bias for r in [r0, r1).  a (B, K), b (K, N), bias (N,), out (B, N)."""
    for r in range(r0, r1):
        out[r, :] = bias
    matmul_acc(a, b, out, r0, r1)


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


@jit_parallel
def gemm(a, b, c, bias, trans_a, accumulate, chunks):
    """c = op(a) @ b (+ bias, a (N,) row, when it is non-empty), or c += op(a) @ b when
    ``accumulate``; the rows of c split across ``chunks`` threads, each calling
    (single-threaded) BLAS: a (M, K) or (K, M) when trans_a, b (K, N), c (M, N)."""
    M = c.shape[0]
    size = (M + chunks - 1) // chunks
    for i in prange(chunks):
        r0 = i * size
        r1 = min(r0 + size, M)
        if not accumulate:
            for r in range(r0, r1):
                if bias.shape[0] > 0:
                    c[r, :] = bias
                else:
                    c[r, :] = 0
        _gemm_rows_any(a, b, c, r0, r1, trans_a)
