"""The recurrent products of the time loop, on row ranges of plain contiguous arrays.

Legend: n rows (active batch rows of one step), K inner size, N output size.
Both products use the "axpy" order (rows of the right-hand matrix are contiguous in the inner
loop), which LLVM vectorises; four rows share each load of the right-hand row.
"""

from __future__ import annotations

from .config import jit


@jit
def matmul_acc(a, b, out, r0, r1):
    """out[r] += a[r] @ b for r in [r0, r1).  a (B, K), b (K, N), out (B, N)."""
    K, N = b.shape
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
