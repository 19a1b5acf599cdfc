"""Activations for the kernels, chosen per dtype at compile time.

numba has no vector math library here, so ``math.tanh``/``math.exp`` stay scalar (about 0.1
element/ns) and would cost more than the GEMM at small sizes. For float32 we use a rational
approximation of tanh (only +, *, / and a clamp, which LLVM vectorises with AVX-512): our own
least-squares fit of x*P(x^2)/Q(x^2) on [0, 9], relative error <= 4e-7 over all float32.
float64 uses libm's exp: tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|), absolute error
about 1e-16 (far inside the 1e-9 parity), about 4x faster than libm's tanh.
"""

from __future__ import annotations

import math

from numba import types
from numba.extending import overload

_CLAMP = 9.0  # tanh(9) == 1 in float32
_P = (0.999999992324803, 0.1257953319962659, 0.0024085822682210693, -9.02481739441783e-06,
      -1.7504602969534255e-07, -1.338609951462022e-10)
_Q = (1.0, 0.4591285947758294, 0.02211822261916255, 0.00011474739194079521,
      -2.1047340119106076e-06, -7.4395221077578124e-09)


def tanh(x):
    return math.tanh(x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@overload(tanh)
def _tanh(x):
    if x == types.float32:
        f = types.float32
        lo, hi = f(-_CLAMP), f(_CLAMP)
        p0, p1, p2, p3, p4, p5 = (f(v) for v in _P)
        q0, q1, q2, q3, q4, q5 = (f(v) for v in _Q)

        def impl(x):
            # min/max (not a branch) keep the loop vectorisable; NaN propagates through them
            y = x if x < hi else hi
            y = y if y > lo else lo
            y = x if x != x else y
            s = y * y
            p = ((((p5 * s + p4) * s + p3) * s + p2) * s + p1) * s + p0
            q = ((((q5 * s + q4) * s + q3) * s + q2) * s + q1) * s + q0
            return y * p / q

        return impl

    def impl64(x):
        # libm's tanh is ~4x slower than exp here; this form's absolute error is ~1e-16
        e = math.exp(-2.0 * abs(x))
        return math.copysign((1.0 - e) / (1.0 + e), x)

    return impl64


@overload(sigmoid)
def _sigmoid(x):
    if x == types.float32:
        half = types.float32(0.5)
        return lambda x: half + half * tanh(half * x)
    return lambda x: 1.0 / (1.0 + math.exp(-x))
