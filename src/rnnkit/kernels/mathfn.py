"""Activations for the kernels, chosen per dtype at compile time.

numba has no vector math library here, so ``math.tanh``/``math.exp`` stay scalar (about 0.1
element/ns) and would cost more than the GEMM at small sizes. For float32 we use a rational
approximation of tanh (only +, *, / and a clamp, which LLVM vectorises with AVX-512): our own
least-squares fit of x*P(x^2)/Q(x^2) on [0, 9], relative error <= 4e-7 over all float32.
float64 builds both on the exponential below: tanh(x) = sign(x) (-m) / (2 + m) with
m = expm1(-2|x|), and sigmoid(x) = 1 / (1 + exp(-x)).

``exp64`` / ``expm1_64``: exp(x) = 2^n (1 + q), n = round(x / ln 2), r = x - n ln 2 in
[-ln2/2, ln2/2] (Cody and Waite's two-part ln 2, so n ln 2 is exact), q = exp(r) - 1 by its
Taylor series to r^13 (truncation below 1e-17), 2^n built in the exponent bits. Within 1.01 ulp
of numpy's exp over [-708, 709] (measured on 4M points); below that range exp is 0 and above it
inf (exactly, so sigmoid(-inf) is 0 and NaN/inf propagate as torch's do; the true values there
are denormals or overflow), and NaN passes through. Everything in it is plain arithmetic, so
the cells' loops vectorise it: about 0.7 ns per element against libm's exp at 7.
"""

from __future__ import annotations

import math

import numpy as np

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .config import jit_inline
from .scalars import cast, sigmoid, tanh

_CLAMP = 9.0  # tanh(9) == 1 in float32
_P = (0.999999992324803, 0.1257953319962659, 0.0024085822682210693, -9.02481739441783e-06,
      -1.7504602969534255e-07, -1.338609951462022e-10)
_Q = (1.0, 0.4591285947758294, 0.02211822261916255, 0.00011474739194079521,
      -2.1047340119106076e-06, -7.4395221077578124e-09)


_LOG2E = 1.4426950408889634
_LN2_HI = float.fromhex("0x1.62e42fee00000p-1")  # ln 2's leading 32 bits: n * _LN2_HI is exact
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")  # ln 2 - _LN2_HI
_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13 = (1.0 / math.factorial(k) for k in range(2, 14))


@intrinsic
def _reduce(typingctx, x, n):
    """x - n ln 2 as two FMAs. An intrinsic because numba's fastmath flags every float operation
    of a function, and with them LLVM folds (x - n hi) - n lo into x - n (hi + lo), which loses
    the low part of ln 2 (100 ulp at |x| = 700); it leaves calls to llvm.fma alone."""
    if x != types.float64 or n != types.float64:
        return None

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(d, [d, d, d]), "llvm.fma.f64")
        minus_n = builder.fneg(args[1])
        high = builder.call(fma, [minus_n, ir.Constant(d, _LN2_HI), args[0]])
        return builder.call(fma, [minus_n, ir.Constant(d, _LN2_LO), high])

    return types.float64(types.float64, types.float64), codegen


@intrinsic
def _float64_bits(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@jit_inline
def _exp_parts(x):
    """(2^n, q) with exp(x) = 2^n (1 + q), q = exp(r) - 1 (see the module's docstring)."""
    y = x if x < 709.0 else 709.0
    y = y if y > -708.0 else -708.0
    n = types.int64(y * _LOG2E + 1024.5) - 1024  # round(y / ln 2); the sum is positive, so truncation floors
    r = _reduce(y, types.float64(n))
    q = ((((((((((_C13 * r + _C12) * r + _C11) * r + _C10) * r + _C9) * r + _C8) * r + _C7) * r + _C6) * r
             + _C5) * r + _C4) * r + _C3) * r + _C2
    q = (q * r + 1.0) * r
    return _float64_bits((n + 1023) << 52), q


@jit_inline
def exp64(x):
    """exp of a float64, vectorisable."""
    scale, q = _exp_parts(x)
    e = scale + scale * q
    e = e if x > -708.0 else 0.0  # exact limits: sigmoid(-inf) must be 0, not 1e-308 (0 * inf is NaN)
    e = e if x < 709.0 else math.inf
    return x if x != x else e


@jit_inline
def expm1_64(x):
    """exp(x) - 1 of a float64, vectorisable, accurate near 0 (where n = 0 and it is q itself)."""
    scale, q = _exp_parts(x)
    e = (scale - 1.0) + scale * q
    e = e if x > -708.0 else -1.0
    e = e if x < 709.0 else math.inf
    return x if x != x else e


@overload(tanh)
def _tanh(x):
    if x == types.float32:
        f = types.float32
        lo, hi, one = f(-_CLAMP), f(_CLAMP), f(1.0)
        p0, p1, p2, p3, p4, p5 = (f(v) for v in _P)
        q0, q1, q2, q3, q4, q5 = (f(v) for v in _Q)

        def impl(x):
            # selects (not branches) keep the loop vectorisable; NaN passes through at the end
            y = x if x < hi else hi
            y = y if y > lo else lo
            s = y * y
            p = ((((p5 * s + p4) * s + p3) * s + p2) * s + p1) * s + p0
            q = ((((q5 * s + q4) * s + q3) * s + q2) * s + q1) * s + q0
            t = y * p / q
            t = t if y < hi else one  # exactly +-1 from the clamp on, as torch's tanh(inf)
            t = t if y > lo else -one
            return x if x != x else t

        return impl

    def impl64(x):
        # tanh|x| = (1 - e^-2|x|) / (1 + e^-2|x|), with expm1 so that small |x| keep their digits
        e = expm1_64(-2.0 * abs(x))
        return math.copysign(-e / (2.0 + e), x)

    return impl64


@overload(sigmoid)
def _sigmoid(x):
    if x == types.float32:
        half = types.float32(0.5)
        return lambda x: half + half * tanh(half * x)
    return lambda x: 1.0 / (1.0 + exp64(-x))


@overload(cast)
def _cast(x, like):
    if like == types.float32:
        return lambda x, like: np.float32(x)
    return lambda x, like: np.float64(x)

