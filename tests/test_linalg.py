"""The kernels' own matrix loops against numpy, on sizes off every block width: the register
tiles of the time loop (every forward and backward), the one-row loop of small products, and
the four-row loops that run where scipy's BLAS is missing (the other tests never see those on
a machine that has it)."""

from __future__ import annotations

import numpy as np
import pytest

from rnnkit.kernels import linalg, tiles


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 5), (4, 7), (13, 33), (192, 64), (97, 130)])
def test_linear_matches_numpy(N, K, dtype):
    """out = a @ w.T (+ bias) on w as stored: row and column ranges (groups of four columns and
    the rest), with and without a bias, and split across threads by columns."""
    rng = np.random.default_rng(N * 100 + K)
    a = rng.standard_normal((5, K)).astype(dtype)
    w = rng.standard_normal((N, K)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for b, expected in ((bias, a @ w.T + bias), (np.empty(0, dtype), a @ w.T)):
        out = np.full((5, N), np.nan, dtype)
        linalg.linear_rows(a, w, b, out, 1, 4, 0, N)  # rows outside [1, 4) untouched
        np.testing.assert_allclose(out[1:4], expected[1:4], rtol=tol, atol=tol * K)
        assert np.isnan(out[[0, 4]]).all()
        if N > 2:
            out = np.full((5, N), np.nan, dtype)
            linalg.linear_rows(a, w, b, out, 0, 5, 1, N - 1)  # columns outside [1, N - 1) untouched
            np.testing.assert_allclose(out[:, 1:N - 1], expected[:, 1:N - 1], rtol=tol, atol=tol * K)
            assert np.isnan(out[:, [0, N - 1]]).all()
        for chunks in (1, 2, 3):
            out = np.full((5, N), np.nan, dtype)
            linalg.linear(a, w, b, out, 1, 5, chunks)
            np.testing.assert_allclose(out[1:], expected[1:], rtol=tol, atol=tol * K)
            assert np.isnan(out[0]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (4, 7), (13, 33), (64, 192), (130, 97)])
def test_column_bands_match_numpy(K, N, dtype):
    """out += a @ b on bands of b's columns (acc_columns) and split across threads by them."""
    rng = np.random.default_rng(K * 100 + N)
    a = rng.standard_normal((5, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    start = rng.standard_normal((5, N)).astype(dtype)
    expected = start + a @ b
    tol = 1e-5 if dtype == np.float32 else 1e-12
    out = start.copy()
    linalg.acc_columns(a, b, out, 1, 4, 0, N // 2)
    linalg.acc_columns(a, b, out, 1, 4, N // 2, N)
    np.testing.assert_allclose(out[1:4], expected[1:4], rtol=tol, atol=tol * K)
    np.testing.assert_array_equal(out[[0, 4]], start[[0, 4]])
    for chunks in (1, 2, 3):
        out = start.copy()
        linalg.matmul_acc_columns(a, b, out, 0, 5, chunks)
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * K)


def test_row_products_refuse_operands_that_do_not_fit():
    a, w, out = np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 4))
    for args in ((a, w, np.ones(3), out, 0, 2, 0, 4), (a, w.T.copy(), np.ones(0), out, 0, 2, 0, 4),
                 (a, w, np.ones(0), out, 0, 3, 0, 4), (a, w, np.ones(0), out, 0, 2, 0, 5)):
        with pytest.raises(ValueError, match="do not fit"):
            linalg.linear_rows(*args)
    with pytest.raises(ValueError, match="do not fit"):
        linalg.matmul_acc(a, np.ones((4, 4)), out, 0, 2)
    with pytest.raises(ValueError, match="do not fit"):
        linalg.matmul_acc(a, np.ones((3, 4)), out, 0, 3)
    for args in ((a, np.ones((4, 4)), out, 0, 2, 0, 4), (a, np.ones((3, 4)), out, 0, 2, 0, 5),
                 (a, np.ones((3, 4)), out, 0, 3, 0, 4)):
        with pytest.raises(ValueError, match="do not fit"):
            linalg.acc_columns(*args)
    # the threaded forms check before their threads start (an exception inside them is lost)
    with pytest.raises(ValueError, match="do not fit"):
        linalg.linear(a, w, np.ones(0), out, 0, 3, 2)
    with pytest.raises(ValueError, match="do not fit"):
        linalg.matmul_acc_columns(a, np.ones((4, 4)), out, 0, 2, 2)
    bp = tiles.pack(np.ones((3, 5)), False)
    with pytest.raises(ValueError, match="do not fit"):
        tiles.matmul_packed_columns(a, bp, np.ones((2, 5)), 0, 3, None, 2)
    out = np.ones((2, 4))
    linalg.linear(a, w, np.ones(0), out, 1, 1, 2)  # no rows: nothing written
    tiles.matmul_packed_columns(a, tiles.pack(np.ones((3, 4)), False), out, 2, 2, None, 2)
    assert (out == 1).all()


ROWS = 24


def _operands(K, N, r1, dtype, a_shape):
    """(rng, a, b (K, N), start (ROWS, N), tolerance) for one case of the tiles' tests."""
    rng = np.random.default_rng(K * 1000 + N * 10 + r1)
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    start = rng.standard_normal((ROWS, N)).astype(dtype)
    return rng, a, b, start, 1e-5 if dtype == np.float32 else 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("K,N", [(512, 512), (700, 389), (257, 1040)])
def test_threaded_pack_matches_serial(K, N, trans, dtype):
    """Weights past PACK_THREADED_MIN values are packed by the threads, each taking whole strips
    (a partial last strip among them): the same strips as the serial pack."""
    assert K * N >= tiles.PACK_THREADED_MIN
    b = np.random.default_rng(3).standard_normal((N, K) if trans else (K, N)).astype(dtype)
    serial = tiles._pack_serial(b, trans)
    np.testing.assert_array_equal(tiles.pack(b, trans), serial)
    threaded = np.full_like(serial, np.nan)
    tiles._pack_threads(b, trans, threaded, 2)
    np.testing.assert_array_equal(threaded, serial)
    W = tiles.strip_width(dtype)
    packed = tiles.pack(b, trans)
    np.testing.assert_array_equal(packed.transpose(1, 0, 2).reshape(K, -1)[:, :N], b.T if trans else b)
    assert not packed.transpose(1, 0, 2).reshape(K, -1)[:, N:].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_pack_blocks(dtype):
    """A transposed pack moves whole strips' L x L blocks through registers and the rest
    (K % L columns, a partial last strip) element by element: every K residue, full and
    partial strips, equal to numpy's transpose with zeros past column N."""
    W = tiles.strip_width(dtype)
    rng = np.random.default_rng(5)
    for K in range(1, 2 * W + 2):
        for N in (W - 1, W, 2 * W + 3, 3 * W):
            w = rng.standard_normal((N, K)).astype(dtype)  # b = w.T, (K, N)
            packed = tiles._pack_serial(w, True)
            flat = packed.transpose(1, 0, 2).reshape(K, -1)
            np.testing.assert_array_equal(flat[:, :N], w.T)
            assert not flat[:, N:].any()
    w = np.asfortranarray(rng.standard_normal((3 * W, 2 * W + 1)).astype(dtype))  # copied first
    np.testing.assert_array_equal(tiles.pack(w, True), tiles.pack(np.ascontiguousarray(w), True))
    np.testing.assert_array_equal(tiles.pack(w[::2], False), tiles.pack(np.ascontiguousarray(w[::2]), False))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (7, 16), (13, 33), (64, 64), (40, 100), (65, 130)])
@pytest.mark.parametrize("r0,r1", [(0, 1), (2, 4), (1, 4), (0, 5), (1, 7), (0, 7), (0, 8), (0, 9), (1, 11),
                                   (0, 11), (3, 15), (0, 13), (2, 16), (0, 15), (3, 24)])
def test_packed_tiles_match_numpy(K, N, r0, r1, dtype):
    """The register tiles of the time loop: 8-row tiles followed by every remainder 0-7, and
    short ranges alone, strips cut by N, on both dtypes; rows outside [r0, r1) and nothing past
    column N are touched."""
    rng, a, b, start, tol = _operands(K, N, r1, dtype, (ROWS, K))
    packed = tiles.pack(b, False)
    np.testing.assert_array_equal(tiles.pack(np.ascontiguousarray(b.T), True), packed)
    W = tiles.strip_width(dtype)
    assert packed.shape == (-(-N // W), K, W)
    np.testing.assert_array_equal(packed.transpose(1, 0, 2).reshape(K, -1)[:, :N], b)
    assert not packed.transpose(1, 0, 2).reshape(K, -1)[:, N:].any()  # zeros past column N

    # out is the front of a longer buffer: a write past column N of the last row would land in
    # the guard (and past column N of another row, in the next row, checked below)
    buffer = np.full(ROWS * N + 64, 5.0, dtype)
    out = buffer[: ROWS * N].reshape(ROWS, N)
    out[:] = start
    tiles.matmul_packed(a, packed, out, r0, r1)
    assert (buffer[ROWS * N:] == 5.0).all()
    np.testing.assert_allclose(out[r0:r1], start[r0:r1] + a[r0:r1] @ b, rtol=tol, atol=tol * K)
    np.testing.assert_array_equal(out[:r0], start[:r0])
    np.testing.assert_array_equal(out[r1:], start[r1:])

    # from a start row (a bias) instead of out's contents, which are then never read
    bias = rng.standard_normal(N).astype(dtype)
    out[:] = np.nan
    tiles.matmul_packed(a, packed, out, r0, r1, bias)
    np.testing.assert_allclose(out[r0:r1], bias + a[r0:r1] @ b, rtol=tol, atol=tol * K)
    assert np.isnan(out[:r0]).all() and np.isnan(out[r1:]).all()
    assert (buffer[ROWS * N:] == 5.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 9, 600, 2100])  # blocks of BLOCK // K strips: 6 at K = 600, 1 at 2100
def test_one_row_backwards_matches_forwards(K, dtype):
    """The batch-1 loops alternate the order of the strips (``backwards``): for 1-12 strips
    (groups of four, then two, then one, in either order) and several blocks, the same row as
    numpy's, from out's contents and from a start row, nothing past column N or in other rows."""
    W = tiles.strip_width(dtype)
    for S in range(1, 13):
        N = S * W - (S % 3)  # partial last strips too
        _, a, b, start, tol = _operands(K, N, 3, dtype, (ROWS, K))
        packed = tiles.pack(b, False)
        for backwards in (False, True):
            buffer = np.full(ROWS * N + 64, 5.0, dtype)
            out = buffer[: ROWS * N].reshape(ROWS, N)
            out[:] = start
            tiles.matmul_packed(a, packed, out, 2, 3, None, backwards)
            np.testing.assert_allclose(out[2], start[2] + a[2] @ b, rtol=tol, atol=tol * K)
            np.testing.assert_array_equal(np.delete(out, 2, 0), np.delete(start, 2, 0))
            out[2] = np.nan
            tiles.matmul_packed(a, packed, out, 2, 3, start[0], backwards)
            np.testing.assert_allclose(out[2], start[0] + a[2] @ b, rtol=tol, atol=tol * K)
            assert (buffer[ROWS * N:] == 5.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (13, 33), (64, 64), (65, 130), (300, 40)])
@pytest.mark.parametrize("r0,r1", [(0, 1), (2, 4), (1, 7), (0, 8), (0, 9), (3, 15), (2, 16), (3, 24)])
def test_transposed_tiles_match_numpy(K, N, r0, r1, dtype):
    """The weight gradients' products, out += a.T @ b with a stored (K, M): the same tiles and
    remainders, rows outside [r0, r1) and nothing past column N touched; threaded too."""
    _, a, b, start, tol = _operands(K, N, r1, dtype, (K, ROWS))
    packed = tiles.pack(b, False)
    buffer = np.full(ROWS * N + 64, 5.0, dtype)
    out = buffer[: ROWS * N].reshape(ROWS, N)
    out[:] = start
    tiles.gemm_packed_t_rows(a, packed, out, None, r0, r1)
    assert (buffer[ROWS * N:] == 5.0).all()
    np.testing.assert_allclose(out[r0:r1], start[r0:r1] + a.T[r0:r1] @ b, rtol=tol, atol=tol * K)
    np.testing.assert_array_equal(out[:r0], start[:r0])
    np.testing.assert_array_equal(out[r1:], start[r1:])
    out[r0:r1] = np.nan  # from a start row instead (out only written)
    tiles.gemm_packed_t_rows(a, packed, out, start[0], r0, r1)
    assert (buffer[ROWS * N:] == 5.0).all()
    np.testing.assert_allclose(out[r0:r1], start[0] + a.T[r0:r1] @ b, rtol=tol, atol=tol * K)
    np.testing.assert_array_equal(out[r1:], start[r1:])
    if (r0, r1) == (0, 1):
        out[:] = start
        tiles.gemm_packed_t(a, packed, out, None, 3)
        np.testing.assert_allclose(out, start + a.T @ b, rtol=tol, atol=tol * K)


def test_long_float32_sums_stay_close_to_float64(monkeypatch):
    """The weight and bias gradients sum over every row of a layer (T * B): the bias sums run in
    float64 and round once, and the weight gradients' tiles sum each K-block of rows from zero
    before adding it (rnnkit._plan.LIMITS.k_block), so float32 stays near float64 where one running
    sum drifts (positive terms, the worst case: 8e-6 and 2.7e-6 relative)."""
    from rnnkit import _loops

    rng = np.random.default_rng(4)
    a = rng.random((50000, 37)).astype(np.float32)
    out = np.zeros(37, np.float32)
    linalg.column_sums(a, out)
    exact = a.astype(np.float64).sum(0)
    assert (np.abs(out - exact) / exact).max() < 2e-7
    with pytest.raises(ValueError, match="column_sums"):
        linalg.column_sums(a, np.zeros(36, np.float32))
    monkeypatch.setattr(_loops, "WEIGHT_GRADS_BY_BLAS", False)  # rnnkit's tiles, not BLAS's
    a, b = rng.random((4096, 16)).astype(np.float32), rng.random((4096, 24)).astype(np.float32)
    out = np.zeros((16, 24), np.float32)
    _loops.matmul_t(a, b, out)
    exact = a.astype(np.float64).T @ b.astype(np.float64)
    assert (np.abs(out - exact) / exact).max() < 6e-7


def test_transposed_tiles_refuse_mismatched_operands():
    packed = tiles.pack(np.ones((8, 40), np.float32), False)
    a = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        tiles.gemm_packed_t_rows(np.ones((9, 4), np.float32), packed, np.zeros((4, 40), np.float32), None, 0, 4)
    with pytest.raises(ValueError, match="do not fit"):
        tiles.gemm_packed_t_rows(a, packed, np.zeros((4, 40), np.float32), None, 0, 5)  # past a's columns
    with pytest.raises(ValueError, match="do not fit"):
        tiles.gemm_packed_t(a, packed, np.zeros((5, 40), np.float32), None, 2)  # before the threads start


def test_packed_tiles_refuse_mismatched_operands():
    a = np.ones((4, 8), np.float32)
    packed = tiles.pack(np.ones((8, 40), np.float32), False)
    with pytest.raises(ValueError, match="do not fit"):
        tiles.matmul_packed(a, packed, np.zeros((4, 70), np.float32), 0, 4)  # N off the strips
    with pytest.raises(ValueError, match="do not fit"):
        tiles.matmul_packed(np.ones((4, 9), np.float32), packed, np.zeros((4, 40), np.float32), 0, 4)
    with pytest.raises(ValueError, match="do not fit"):
        tiles.matmul_packed(a, packed, np.zeros((4, 40), np.float32), 0, 5)


def test_threaded_packed_gemm_refuses_mismatched_operands():
    """The threaded product checks before its threads start: an exception raised inside them
    would be lost, leaving rows unwritten."""
    packed = tiles.pack(np.ones((8, 40), np.float32), False)
    bias = np.zeros(40, np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        tiles.gemm_packed(np.ones((64, 9), np.float32), packed, np.empty((64, 40), np.float32), bias, 2)
    out = np.empty((64, 40), np.float32)
    tiles.gemm_packed(np.ones((64, 8), np.float32), packed, out, bias, 2)
    np.testing.assert_array_equal(out, np.full((64, 40), 8.0, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N,rows", [(7, 5, 1), (64, 100, 3), (33, 257, 9), (130, 64, 15)])
def test_packed_columns_split_across_threads(K, N, rows, dtype):
    """matmul_packed_columns: bands of strips (a partial last strip among them) on 1-3 threads,
    accumulating or started from a bias row, equal to numpy; rows outside [1, rows) untouched."""
    rng = np.random.default_rng(K + N + rows)
    a = rng.standard_normal((rows + 1, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    start = rng.standard_normal((rows + 1, N)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)
    bp = tiles.pack(b, False)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for chunks in (1, 2, 3):
        out = start.copy()
        tiles.matmul_packed_columns(a, bp, out, 1, rows + 1, None, chunks)
        np.testing.assert_allclose(out[1:], start[1:] + a[1:] @ b, rtol=tol, atol=tol * K)
        np.testing.assert_array_equal(out[0], start[0])
        out = start.copy()
        tiles.matmul_packed_columns(a, bp, out, 1, rows + 1, bias, chunks)
        np.testing.assert_allclose(out[1:], bias + a[1:] @ b, rtol=tol, atol=tol * K)
