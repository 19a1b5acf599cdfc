"""Register-tiled matrix products on packed weights: the recurrent products of the time loop.

Legend: n rows of the left operand (batch rows of one step), K inner size, N output size,
L lanes of one SIMD vector (64 bytes: 16 float32 or 8 float64), W = 2 L columns per strip,
S = ceil(N / W) strips.

    bp   (S, K, W)  the right operand b (K, N) packed by ``pack``: strip s holds columns
                    [s W, s W + W) of b, each row of it contiguous, zero past column N
    a    (B, K)     the left operand, rows [r0, r1) used
    out  (B, N)     out[r] += a[r] @ b for r in [r0, r1)

Why: a product of a few rows by a weight matrix is what the time loop does at every step, and
a BLAS call handles it badly here: OpenBLAS runs 16-32-row products of the grid's sizes at about
70 GFLOP/s on one core (it repacks the weights at every call), and the rows of an unpacked
weight matrix whose width is a multiple of 1024 bytes fall into the same L1 sets. Packed once
per layer call (but for calls of a few row-steps, see linalg.linear_rows), each strip is one
contiguous stream; a tile of up to 8 rows by 1-4 strips keeps its sums in vector registers
across the whole K loop (one broadcast of a[r, k] and one load per vector of the strip per k),
reaching about 90% of the core's FMA peak (measured 215-240 GFLOP/s float32 on one core of the
2-core benchmark machine; OpenBLAS's SGEMM with its SkylakeX kernels: about 228 per core).

``_tile`` is written in LLVM IR (a numba intrinsic) because numba's loops cannot express "keep
these 16 vector sums in registers across the k loop": LLVM keeps re-loading the output row when it
cannot prove it does not alias the weights. Columns past N are masked at the output's load
and store only; the packed zeros make the k loop itself branch-free.
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .borrow import borrow
from .config import jit, jit_inline, jit_parallel, specialise

VECTOR_BYTES = 64  # one AVX-512 register; LLVM splits the vectors on narrower machines
# Rows of the main tile: 8 rows by one strip is 16 vector sums (of AVX-512's 32 registers), two
# loads of the strip and eight broadcasts per k for 16 FMAs. Measured on one core against 4-row
# tiles: 240 vs 213 GFLOP/s (16 x 128 x 512), 242 vs 186 (32 x 512 x 2048), 229 vs 194
# (3200 x 64 x 512), 214 vs 168 (3200 x 512 x 2048).
TILE_ROWS = 8


def strip_width(dtype) -> int:
    """W: columns per strip, two vectors."""
    return 2 * VECTOR_BYTES // np.dtype(dtype).itemsize


# Weights of at least this many values are packed by all threads, each taking a share of the
# strips: a transposed pack reads its source 32 rows at a time, a pattern the prefetchers follow
# badly, so one core waits on memory (4 MB, cold: 1.1 ms on one thread, 0.65 on two); a plain
# pack reads 128 bytes of every row per strip (b (3072, 1024): 1.9 ms on one thread, 0.9 on two).
PACK_THREADED_MIN = 1 << 18


def pack(b: np.ndarray, trans: bool, threads: Optional[int] = None) -> np.ndarray:
    """b (K, N), or b = w.T for w (N, K) when ``trans``, as the (S, K, W) strips the tiles
    read (see the legend); on at most ``threads`` of numba's threads (default: all of them).
    b of any layout (the packing kernels read C-contiguous rows: other layouts are copied)."""
    b = np.ascontiguousarray(b)
    if b.size < PACK_THREADED_MIN or (threads is not None and threads < 2):
        return _pack_serial(b, trans)
    threads = numba.get_num_threads() if threads is None else min(threads, numba.get_num_threads())
    K, N = (b.shape[1], b.shape[0]) if trans else b.shape
    W = strip_width(b.dtype)
    result = np.empty(((N + W - 1) // W, K, W), b.dtype)
    _pack_threads(b, trans, result, threads)
    return result


@jit
def _pack_serial(b, trans):  # allocation included: one compiled call for the small weights
    K, N = (b.shape[1], b.shape[0]) if trans else (b.shape[0], b.shape[1])
    W = 128 // b.itemsize
    result = np.empty(((N + W - 1) // W, K, W), b.dtype)
    _pack_strips(b, trans, result, 0, result.shape[0])
    return result


@jit_parallel
def _pack_threads(b, trans, result, chunks):
    S = result.shape[0]
    size = (S + chunks - 1) // chunks
    for i in prange(chunks):
        _pack_strips(b, trans, result, min(S, i * size), min(S, i * size + size))


@jit
def _pack_strips(b, trans, result, s0, s1):
    """Strips [s0, s1) of ``pack(b, trans)`` into result (S, K, W)."""
    K, N = (b.shape[1], b.shape[0]) if trans else (b.shape[0], b.shape[1])
    W = 128 // b.itemsize  # the strip width
    full = N // W
    if result.shape[1] != K or result.shape[2] != W or (result.shape[0] - 1) * W >= N \
            or result.shape[0] * W < N:
        raise ValueError("pack: result does not fit b")
    packed, b = borrow(result), borrow(b)  # the row views below cost no atomics
    for s in range(s0, s1):
        dst = packed[s]
        j0 = s * W
        if s == full:  # the last, partial strip: zeros past column N
            dst[:, :] = 0
        width = min(W, N - j0)
        if trans and width == W:  # L x L blocks transposed in registers, then the last K % L
            L = W // 2
            kb = K - K % L
            for k0 in range(0, kb, L):
                _transpose_block(b, packed, s, j0, k0, 0)
                _transpose_block(b, packed, s, j0 + L, k0, L)
            for c in range(W):
                src = b[j0 + c]
                for k in range(kb, K):
                    dst[k, c] = src[k]
        elif trans:
            for c in range(width):
                src = b[j0 + c]
                for k in range(K):
                    dst[k, c] = src[k]
        elif width == W:
            _copy_strip(b, packed, s, j0)
        else:
            for k in range(K):
                for c in range(width):
                    dst[k, c] = b[k, j0 + c]


def _pack_operands(b, packed, *indices) -> bool:
    """Whether a pack intrinsic's operands are what its IR assumes: b (2-D) and packed (3-D),
    C-contiguous (the row lengths are the arrays' own), one float dtype, int64 indices."""
    return (isinstance(b, types.Array) and isinstance(packed, types.Array) and b.layout == "C"
            and packed.layout == "C" and (b.ndim, packed.ndim) == (2, 3) and b.dtype == packed.dtype
            and b.dtype in (types.float32, types.float64) and packed.mutable
            and all(t == types.int64 for t in indices))


def _vectors(context, builder, dtype):
    """(element size in bytes, L lanes, vector type, vector_at(base, index): a pointer to the
    vector of L elements from base[index]) for the intrinsics' IR."""
    elt = context.get_data_type(dtype)
    size = context.get_abi_sizeof(elt)
    L = VECTOR_BYTES // size
    vty = ir.VectorType(elt, L)

    def vector_at(base, index):
        return builder.bitcast(builder.gep(base, [index]), vty.as_pointer())

    return size, L, vty, vector_at


@intrinsic
def _copy_strip(typingctx, b, packed, s, j):
    """packed[s, k, :] = b[k, j:j + W] for every row k of b: a full strip of an untransposed
    pack, two vectors per row. Written in LLVM IR because numba's loops copied it element by
    element or through run-time overlap checks: about 0.35 ns per value (b (512, 64): 12 us,
    (2048, 512): 400 us on one thread) against 3 and 170 us here. The caller guarantees
    s < packed.shape[0], j + W <= columns of b, rows of b == packed.shape[1] and
    packed.shape[2] == W."""
    if not _pack_operands(b, packed, s, j):
        return None

    def codegen(context, builder, signature, args):
        B = context.make_array(signature.args[0])(context, builder, args[0])
        P = context.make_array(signature.args[1])(context, builder, args[1])
        s, j = args[2], args[3]
        size, L, vty, vector_at = _vectors(context, builder, signature.args[0].dtype)
        i64 = ir.IntType(64)
        K, N = builder.extract_value(B.shape, 0), builder.extract_value(B.shape, 1)
        W = builder.extract_value(P.shape, 2)
        first = builder.mul(builder.mul(s, K), W)  # packed[s, 0, 0]
        with cgutils.for_range(builder, K) as loop:
            src = builder.add(builder.mul(loop.index, N), j)
            dst = builder.add(first, builder.mul(loop.index, W))
            for v in range(2):
                lane = ir.Constant(i64, v * L)
                x = builder.load(vector_at(B.data, builder.add(src, lane)), align=size)
                builder.store(x, vector_at(P.data, builder.add(dst, lane)), align=size)
        return context.get_dummy_value()

    return types.void(b, packed, s, j), codegen


@intrinsic
def _transpose_block(typingctx, b, packed, s, j, k0, c0):
    """packed[s, k0 + i, c0 + r] = b[j + r, k0 + i] for r, i < L (one vector's lanes): L rows
    of b loaded as vectors and transposed by log2(L) rounds of two-vector shuffles (round m
    swaps the lanes whose row and column differ in bit m), where a scalar copy stores one
    element at a time. The caller guarantees j + L <= rows of b, k0 + L <= columns of b ==
    packed.shape[1], and c0 + L <= packed.shape[2]."""
    if not _pack_operands(b, packed, s, j, k0, c0):
        return None

    def codegen(context, builder, signature, args):
        B = context.make_array(signature.args[0])(context, builder, args[0])
        P = context.make_array(signature.args[1])(context, builder, args[1])
        s, j, k0, c0 = args[2:]
        size, L, vty, vector_at = _vectors(context, builder, signature.args[0].dtype)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        K = builder.extract_value(B.shape, 1)
        W = builder.extract_value(P.shape, 2)

        rows = []
        for r in range(L):  # b[j + r, k0:k0 + L]
            index = builder.add(builder.mul(builder.add(j, ir.Constant(i64, r)), K), k0)
            rows.append(builder.load(vector_at(B.data, index), align=size))
        m = 1
        while m < L:
            low = ir.Constant(ir.VectorType(i32, L), [c if c & m == 0 else L + c - m for c in range(L)])
            high = ir.Constant(ir.VectorType(i32, L), [c + m if c & m == 0 else L + c for c in range(L)])
            for r in range(L):
                if r & m == 0:
                    a, c = rows[r], rows[r + m]
                    rows[r], rows[r + m] = builder.shuffle_vector(a, c, low), builder.shuffle_vector(a, c, high)
            m *= 2
        base = builder.add(builder.mul(builder.add(builder.mul(s, K), k0), W), c0)  # packed[s, k0, c0]
        for i in range(L):
            index = builder.add(base, builder.mul(ir.Constant(i64, i), W))
            builder.store(rows[i], vector_at(P.data, index), align=size)
        return context.get_dummy_value()

    return types.void(b, packed, s, j, k0, c0), codegen


def _vector_intrinsic(builder, name, vty, mask_ty, masked):
    ptr = vty.as_pointer()
    i32 = ir.IntType(32)
    suffix = f"v{vty.count}{'f32' if vty.element == ir.FloatType() else 'f64'}"
    if masked == "load":
        fnty = ir.FunctionType(vty, [ptr, i32, mask_ty, vty])
        return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.{suffix}.p0{suffix}")
    if masked == "store":
        fnty = ir.FunctionType(ir.VoidType(), [vty, ptr, i32, mask_ty])
        return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.store.{suffix}.p0{suffix}")
    fnty = ir.FunctionType(vty, [vty, vty, vty])
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.{suffix}")


def _tile_typer(typingctx, a, bp, out, r, s, rows, strips, start, trans):
    """out[r:r+R, s W:(s+NS) W] += op(a)[r:r+R] @ (strips s..s+NS-1 of bp), columns >= N left
    alone; or, when ``start`` is an array (N,) rather than None, out[...] = start + op(a) @ ...
    (out is then never read). R = ``rows`` and NS = ``strips`` are compile-time constants.
    op(a) is a, or a.T when ``trans`` (the left operand stored (K, M): its element (i, k) is
    a[k, i], and a tile's R values of one k are adjacent).
    The caller guarantees r + R <= out.shape[0], r + R <= rows of op(a), s + NS <= bp.shape[0],
    columns of op(a) == bp.shape[1], bp.shape[2] == W, (s + NS - 1) W < out.shape[1] and
    start.shape[0] >= out.shape[1]."""
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(strips, types.IntegerLiteral)):
        return None
    from_start = not isinstance(start, (types.NoneType, types.Omitted))
    if from_start and not (isinstance(start, types.Array) and start.ndim == 1 and start.layout == "C"
                           and start.dtype == a.dtype):
        return None
    arrays = (a, bp, out)
    if any(not isinstance(t, types.Array) or t.layout != "C" or t.dtype != a.dtype for t in arrays) \
            or (a.ndim, bp.ndim, out.ndim) != (2, 3, 2) or a.dtype not in (types.float32, types.float64) \
            or not out.mutable or r != types.int64 or s != types.int64:
        return None  # the row lengths below are the arrays' own: C-contiguous only
    R, NS = rows.literal_value, strips.literal_value
    sig = types.void(a, bp, out, r, s, rows, strips, start)

    def codegen(context, builder, signature, args):
        A = context.make_array(signature.args[0])(context, builder, args[0])
        P = context.make_array(signature.args[1])(context, builder, args[1])
        O = context.make_array(signature.args[2])(context, builder, args[2])
        r0, s0 = args[3], args[4]
        size, L, vty, vector_at = _vectors(context, builder, signature.args[0].dtype)
        W = 2 * L
        i64, i32 = ir.IntType(64), ir.IntType(32)
        mty = ir.VectorType(ir.IntType(1), L)
        fma = _vector_intrinsic(builder, "fma", vty, mty, None)
        mload = _vector_intrinsic(builder, "load", vty, mty, "load")
        mstore = _vector_intrinsic(builder, "store", vty, mty, "store")
        K = builder.extract_value(P.shape, 1)
        lda = builder.extract_value(A.shape, 1)
        N = builder.extract_value(O.shape, 1)
        lanes = ir.Constant(ir.VectorType(i64, L), list(range(L)))
        align = ir.Constant(i32, size)

        def const(v):
            return ir.Constant(i64, v)

        def splat(x):
            v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(ir.VectorType(i32, L), [0] * L))

        # the output's vectors: (slot holding the running sum, element index, column mask)
        j0 = builder.mul(s0, const(W))
        columns = []
        for v in range(2 * NS):
            j = builder.add(j0, const(v * L))
            limit = builder.sub(N, j)  # lanes below it are real columns
            mask = builder.icmp_signed("<", lanes, builder.shuffle_vector(
                builder.insert_element(ir.Constant(ir.VectorType(i64, L), None), limit, ir.Constant(i32, 0)),
                ir.Constant(ir.VectorType(i64, L), None), ir.Constant(ir.VectorType(i32, L), [0] * L)))
            columns.append((j, mask))
        zero = ir.Constant(vty, [0.0] * L)
        # Transposed (the weight gradients): every sum starts from zero and is added to out only
        # after the k loop, so a long sum split into calls (K-blocks of rows) is summed block by
        # block rather than in one running order: float32's rounding then stays at OpenBLAS's
        # (see k_block in rnnkit/_plan.py). Otherwise the sums start from out or start: the
        # time loops' products, one call of K = H each, where the order changes only the last
        # bits, and where starting from zero measured 10-20% slower in the LSTM's two-thread
        # loop (for reasons not found).
        later = trans
        if from_start and not later:
            first = context.make_array(signature.args[7])(context, builder, args[7]).data
            starts = [builder.call(mload, [vector_at(first, j), align, mask, zero]) for j, mask in columns]
        sums = []
        for i in range(R):
            row = builder.mul(builder.add(r0, const(i)), N)
            for v, (j, mask) in enumerate(columns):
                index = builder.add(row, j)
                slot = cgutils.alloca_once(builder, vty)
                if later:
                    builder.store(zero, slot)
                elif from_start:
                    builder.store(starts[v], slot)
                else:
                    builder.store(builder.call(mload, [vector_at(O.data, index), align, mask, zero]), slot)
                sums.append((slot, index, mask, j))
        with cgutils.for_range(builder, K) as loop:
            k = loop.index
            weights = []
            for n in range(NS):
                base = builder.mul(builder.add(builder.mul(builder.add(s0, const(n)), K), k), const(W))
                for v in range(2):
                    weights.append(builder.load(vector_at(P.data, builder.add(base, const(v * L))), align=size))
            for i in range(R):
                if trans:  # a[k, r + i]
                    x = builder.load(builder.gep(A.data, [builder.add(builder.mul(k, lda), builder.add(r0, const(i)))]))
                else:  # a[r + i, k]
                    x = builder.load(builder.gep(A.data, [builder.add(builder.mul(builder.add(r0, const(i)), lda), k)]))
                xv = splat(x)
                for v, w in enumerate(weights):
                    slot = sums[i * len(weights) + v][0]
                    builder.store(builder.call(fma, [xv, w, builder.load(slot)]), slot)
        if later:  # what the sums continue
            base = context.make_array(signature.args[7])(context, builder, args[7]).data if from_start else O.data
        for slot, index, mask, j in sums:
            total = builder.load(slot)
            if later:
                before = builder.call(mload, [vector_at(base, j if from_start else index), align, mask, zero])
                total = builder.fadd(before, total)
            builder.call(mstore, [total, vector_at(O.data, index), align, mask])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _tile(typingctx, a, bp, out, r, s, rows, strips, start):
    """out[r:r+R, tile's columns] (+)= a[r:r+R] @ b (see _tile_typer)."""
    return _tile_typer(typingctx, a, bp, out, r, s, rows, strips, start, False)


@intrinsic
def _tile_t(typingctx, a, bp, out, r, s, rows, strips, start):
    """The same with a stored transposed: out[r:r+R, ...] (+)= a.T[r:r+R] @ b (see _tile_typer)."""
    return _tile_typer(typingctx, a, bp, out, r, s, rows, strips, start, True)


# Template constants, frozen otherwise for the copies below: the left operand as stored (TRANS),
# and the cache budget of a block of strips (BLOCK * W values; every tile of rows passes over
# a block before the next block starts). 4096 float32 values by W: a block of 512 KB, half
# the L2 cache of a core here, so the step's other arrays (the state, gates, input projections)
# do not evict it between tiles of rows. Against 8192 (a whole L2): LSTM H = 512 loops 3%
# faster forward and 7% backward, H = 256 backward 14%, GRU H = 512 4-5%; the 512-row input
# projections 2-3%; smaller layers fit a block either way.
TRANS = False
BLOCK = 4096


@jit_inline
def matmul_packed(a, bp, out, r0, r1, start=None, backwards=False, s_lo=0, s_hi=-1):
    """out[r] += a[r] @ b for r in [r0, r1), b given packed (see ``pack``); or
    out[r] = start + a[r] @ b when ``start`` (N,) is given (out is then only written).
    a (B, K), bp (S, K, W), out (B, N) with S = ceil(N / W). ``backwards``: one row reads the
    strips from last to first (see _row_from). Only the columns of strips [s_lo, s_hi) when
    given (s_hi -1: to the last)."""
    S, K = bp.shape[0], bp.shape[1]
    N = out.shape[1]
    s_hi = S if s_hi < 0 else s_hi
    if r1 <= r0 or N == 0 or s_hi <= s_lo:
        return
    _check(a, bp, out, r0, r1, start)
    if s_lo < 0 or s_hi > S:
        raise ValueError("matmul_packed: strips out of range")
    # strips outer, 8-row tiles inner: a strip (K * W values) stays in cache for every row
    block = max(1, BLOCK // max(K, 1))  # strips per block: about BLOCK * W values
    blocks = (s_hi - s_lo + block - 1) // block
    for i in range(blocks):
        s0 = s_lo + (blocks - 1 - i if backwards and r1 - r0 == 1 else i) * block
        s1 = min(s_hi, s0 + block)
        r = r0
        while r + TILE_ROWS <= r1:
            for s in range(s0, s1):
                _tile(a, bp, out, r, s, TILE_ROWS, 1, start)
            r += TILE_ROWS
        if r + 1 == r1:  # one row (batch 1): inlined, no call
            _row_from(a, bp, out, r, s0, s1, start, backwards)
        elif r < r1:
            _rows_from(a, bp, out, r, s0, s1, r1 - r, start)


@jit_inline
def _check(a, bp, out, r0, r1, start):
    """Raise unless rows [r0, r1) of op(a) @ b fit out (see _tile's contract)."""
    S, K, W = bp.shape
    N = out.shape[1]
    a_rows, a_cols = (a.shape[1], a.shape[0]) if TRANS else (a.shape[0], a.shape[1])
    if K != a_cols or S * W < N or (S > 0 and (S - 1) * W >= N) or r1 > out.shape[0] \
            or r1 > a_rows or r0 < 0:
        raise ValueError("matmul_packed: operands do not fit")
    if W != 128 // a.itemsize:
        raise ValueError("matmul_packed: strips of the wrong width")
    if start is not None and start.shape[0] < N:
        raise ValueError("matmul_packed: start is shorter than a row of out")


@jit_inline
def _row_from(a, bp, out, r, s0, s1, start, backwards=False):
    """Strips [s0, s1) for the single row r, up to four strips at a time so a tile has at least
    four independent sums (an FMA's latency) where the columns allow. Inlined into the loops:
    at batch 1 a call per step costs about as much as the product itself.
    ``backwards``: the groups of four from last to first, then the rest (the time loop
    alternates, so a step starts on the strips the step before read last, which are still in
    L1 when the weights are a little larger than it: LSTM H = 64, 64 KB)."""
    fours, rest = (s1 - s0) // 4, (s1 - s0) % 4
    first = s0 + rest if backwards else s0  # the groups of four cover [first, first + 4 fours)
    for g in range(fours):
        _tile(a, bp, out, r, first + 4 * (fours - 1 - g if backwards else g), 1, 4, start)
    s = s0 if backwards else s0 + 4 * fours  # the rest: [s, s + rest)
    end = s + rest
    if s + 2 <= end:
        _tile(a, bp, out, r, s, 1, 2, start)
        s += 2
    if s < end:
        _tile(a, bp, out, r, s, 1, 1, start)


@jit
def _rows_from(a, bp, out, r, s0, s1, R, start):
    """Strips [s0, s1) for the last rows [r, r + R), R in 1..7: two strips at a time for two
    or three rows, one for more, so a tile has at least four independent sums where the
    columns allow (one row: ``_row_from``)."""
    s = s0
    if R == 2:
        while s + 2 <= s1:
            _tile(a, bp, out, r, s, 2, 2, start)
            s += 2
        if s < s1:
            _tile(a, bp, out, r, s, 2, 1, start)
    elif R == 3:
        while s + 2 <= s1:
            _tile(a, bp, out, r, s, 3, 2, start)
            s += 2
        if s < s1:
            _tile(a, bp, out, r, s, 3, 1, start)
    elif R == 4:
        for s in range(s0, s1):
            _tile(a, bp, out, r, s, 4, 1, start)
    elif R == 5:
        for s in range(s0, s1):
            _tile(a, bp, out, r, s, 5, 1, start)
    elif R == 6:
        for s in range(s0, s1):
            _tile(a, bp, out, r, s, 6, 1, start)
    elif R == 7:
        for s in range(s0, s1):
            _tile(a, bp, out, r, s, 7, 1, start)
    else:
        _row_from(a, bp, out, r, s0, s1, start)


# The same products with the left operand stored transposed, a (K, M): out[r] += a[:, r] @ b.
# The weight gradients sum_t dL/dz_t^T x_t are these, with a = the (T*B, G*H) gradients as the
# backward loop wrote them (no transposed copy) and b = the inputs (or states) packed.
_check_t = jit_inline(specialise(_check.py_func, "_check_t", TRANS=True))
_row_from_t = jit_inline(specialise(_row_from.py_func, "_row_from_t", _tile=_tile_t))
_rows_from_t = jit(specialise(_rows_from.py_func, "_rows_from_t", _tile=_tile_t, _row_from=_row_from_t))
# BLOCK: half the loop's, measured on 512-row chunks by 256-1024 columns: 275-383
# GFLOP/s against 236-304 (the loop's products have fewer rows per strip).
matmul_packed_t = jit_inline(specialise(matmul_packed.py_func, "matmul_packed_t", _tile=_tile_t, _check=_check_t,
                                        _row_from=_row_from_t, _rows_from=_rows_from_t, BLOCK=2048))


@jit
def gemm_packed_rows(a, bp, c, bias, r0, r1):
    """Rows [r0, r1) of c = a @ b + bias, b packed; bias (N,) (zeros for none), or None for
    c += a @ b."""
    matmul_packed(a, bp, c, r0, r1, bias)


@jit_parallel
def gemm_packed(a, bp, c, bias, chunks):
    """gemm_packed_rows over all rows of c, in ``chunks`` slices of rows, one thread each."""
    M = c.shape[0]
    if M > 0 and c.shape[1] > 0:
        _check(a, bp, c, 0, M, bias)  # here: an exception raised inside the threads is lost
    size = (M + chunks - 1) // chunks
    size = (size + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS  # whole tiles in every slice but the last
    for i in prange(chunks):
        r0 = min(M, i * size)
        gemm_packed_rows(a, bp, c, bias, r0, min(r0 + size, M))


@jit
def _strips_band(a, bp, out, r0, r1, start, s0, s1):
    matmul_packed(a, bp, out, r0, r1, start, False, s0, s1)


@jit_parallel
def matmul_packed_columns(a, bp, out, r0, r1, start, chunks):
    """matmul_packed on rows [r0, r1) with its strips split across ``chunks`` threads in bands:
    for few rows, where splitting the rows would have every thread stream all of b."""
    S = bp.shape[0]
    if r1 > r0 and out.shape[1] > 0:
        _check(a, bp, out, r0, r1, start)  # here: an exception raised inside the threads is lost
    size = (S + chunks - 1) // chunks
    for i in prange(chunks):
        s0 = min(S, i * size)
        _strips_band(a, bp, out, r0, r1, start, s0, min(S, s0 + size))


# Their copies for the transposed left operand: c (+)= a.T @ b, the weight gradients (bias None).
gemm_packed_t_rows = jit(specialise(gemm_packed_rows.py_func, "gemm_packed_t_rows", matmul_packed=matmul_packed_t))
gemm_packed_t = jit_parallel(specialise(gemm_packed.py_func, "gemm_packed_t", _check=_check_t,
                                        gemm_packed_rows=gemm_packed_t_rows))
