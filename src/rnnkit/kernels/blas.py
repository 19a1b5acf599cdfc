"""GEMM from inside the kernels: scipy's OpenBLAS ``?gemm``, called with no Python in between.

numba's own ``np.dot`` goes through scipy's BLAS too; we call it directly so a kernel can
multiply a row range of a larger array in place. The Fortran routines are bound as external
symbols (not ctypes objects), which keeps the calling kernels cacheable.

Threads: rnnkit's kernels split their work across numba's threads (the OpenMP pool torch uses
too), so scipy's OpenBLAS is set to one thread when it is bound: its worker threads would
otherwise spin after each call and starve torch's and ours (and OpenBLAS warns when it is asked
for threads inside an OpenMP region). This affects scipy.linalg's own BLAS calls in the same
process; numpy's BLAS and torch's are separate libraries and untouched. Without scipy, or
without that switch, the kernels use their own loops instead (``AVAILABLE`` is False).
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from numba import types

from .config import jit


CORE = ""  # the kernels scipy's OpenBLAS picked at load (its DYNAMIC_ARCH core name), once bound


def _bind() -> bool:
    global CORE
    try:
        import llvmlite.binding as llvm
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
        from numba.extending import get_cython_function_address
    except ImportError:
        return False
    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs", "libscipy_openblas*.so*"))
    lib = set_threads = None
    for path in libs:
        lib = ctypes.CDLL(path)
        set_threads = getattr(lib, "scipy_openblas_set_num_threads", None)
        if set_threads is not None:
            break
    if set_threads is None:
        return False
    set_threads(1)
    corename = getattr(lib, "scipy_openblas_get_corename", None)
    if corename is not None:
        corename.restype = ctypes.c_char_p
        CORE = corename().decode(errors="replace")
    llvm.add_symbol("rnnkit_sgemm", get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
    llvm.add_symbol("rnnkit_dgemm", get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))
    return True


# A stub keeps the symbols linkable when the real ones are missing (the kernels never call
# ``gemm_rows`` then).
_STUB_GEMM = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)(lambda *args: None)


def _bind_stubs() -> None:
    import llvmlite.binding as llvm

    for name in ("rnnkit_sgemm", "rnnkit_dgemm"):
        llvm.add_symbol(name, ctypes.cast(_STUB_GEMM, ctypes.c_void_p).value)


AVAILABLE = _bind()
if not AVAILABLE:
    _bind_stubs()

# OpenBLAS cores with AVX-512 kernels. Others on an AVX-512 machine mean OpenBLAS was told to
# use narrower kernels (OPENBLAS_CORETYPE=Haswell, say, as on the benchmark machine), which run
# its GEMMs at about half speed: the kernels then do the big products with their own tiles.
_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids", "zen4", "zen5")


def _host_has_avx512() -> bool:
    import llvmlite.binding as llvm

    try:
        return bool(llvm.get_host_cpu_features().get("avx512f"))
    except RuntimeError:  # features unknown to LLVM here
        return False


FAST = AVAILABLE and (CORE.lower() in _AVX512_CORES or not _host_has_avx512())

# Fortran interface: every argument by pointer (transa, transb, m, n, k, alpha, a, lda, b, ldb,
# beta, c, ldc), pointers passed as integers.
_sgemm = types.ExternalFunction("rnnkit_sgemm", types.void(*[types.intp] * 13))
_dgemm = types.ExternalFunction("rnnkit_dgemm", types.void(*[types.intp] * 13))

@jit
def gemm_rows(a, b, c, r0, r1, beta, trans_a=False, trans_b=False):
    """Rows [r0, r1) of c = op(a) @ op(b) + beta * c, all row-major and C-contiguous.

    op(a) is a (M, K), or with ``trans_a`` the transpose of a (K, M); op(b) is b (K, N), or
    with ``trans_b`` the transpose of b (N, K), a weight as torch stores it; c is (M, N).
    Row-major C = op(A) @ op(B) is column-major C^T = op(B)^T @ op(A)^T, which ?gemm computes
    on the arrays' own memory: ?gemm('N' or 'T', 'N' or 'T', N, rows, K, 1, B, ldb, A, lda,
    beta, C, N), ldb being B's row length (N, or K when transposed).
    """
    M = r1 - r0
    K = b.shape[1] if trans_b else b.shape[0]
    N = b.shape[0] if trans_b else b.shape[1]
    if M <= 0:
        return
    ints = np.empty(4, np.int32)
    ints[0] = N
    ints[1] = M
    ints[2] = K
    ints[3] = a.shape[1]  # lda: a's row length, K (plain) or M_total (transposed)
    flags = np.empty(2, np.uint8)
    flags[0] = 84 if trans_b else 78  # 'T' or 'N'
    flags[1] = 84 if trans_a else 78  # 'T' or 'N'
    scalars = np.empty(2, c.dtype)
    scalars[0] = 1
    scalars[1] = beta
    n_ptr = ints.ctypes.data
    m_ptr = n_ptr + 4
    k_ptr = n_ptr + 8
    lda_ptr = n_ptr + 12
    alpha_ptr = scalars.ctypes.data
    beta_ptr = alpha_ptr + c.itemsize
    a_ptr = a.ctypes.data + (r0 if trans_a else r0 * K) * a.itemsize
    c_ptr = c.ctypes.data + r0 * N * c.itemsize
    nt_ptr = flags.ctypes.data
    ta_ptr = nt_ptr + 1
    ldb_ptr = k_ptr if trans_b else n_ptr
    if c.itemsize == 4:
        _sgemm(nt_ptr, ta_ptr, n_ptr, m_ptr, k_ptr, alpha_ptr, b.ctypes.data, ldb_ptr, a_ptr, lda_ptr,
               beta_ptr, c_ptr, n_ptr)
    else:
        _dgemm(nt_ptr, ta_ptr, n_ptr, m_ptr, k_ptr, alpha_ptr, b.ctypes.data, ldb_ptr, a_ptr, lda_ptr,
               beta_ptr, c_ptr, n_ptr)
