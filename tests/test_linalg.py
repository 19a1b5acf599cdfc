"""The kernels' own matrix loops against numpy, on sizes off every block width: the one-row
loop runs for batch 1 in every forward and backward; the four-row tiles run where scipy's BLAS
is missing, which the other tests never see on a machine that has it."""

from __future__ import annotations

import numpy as np
import pytest

from rnnkit.kernels import linalg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (7, 16), (8, 8), (13, 33), (64, 192)])
def test_own_loops_match_numpy(K, N, dtype):
    rng = np.random.default_rng(K * 100 + N)
    a = rng.standard_normal((9, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    start = rng.standard_normal((9, N)).astype(dtype)
    expected = start + a @ b
    tol = 1e-5 if dtype == np.float32 else 1e-12

    one = start.copy()
    for r in range(9):
        linalg._acc_row(a, b, one, r)
    np.testing.assert_allclose(one, expected, rtol=tol, atol=tol * K)

    tiles = start.copy()
    linalg._acc_rows4(a, b, tiles, 0)
    linalg._acc_rows4(a, b, tiles, 4)
    linalg._acc_row(a, b, tiles, 8)
    np.testing.assert_allclose(tiles, expected, rtol=tol, atol=tol * K)

    out = start.copy()
    linalg.matmul_acc(a, b, out, 2, 7)  # rows outside [2, 7) untouched
    np.testing.assert_allclose(out[2:7], expected[2:7], rtol=tol, atol=tol * K)
    np.testing.assert_array_equal(out[:2], start[:2])
    np.testing.assert_array_equal(out[7:], start[7:])
