"""The scalar functions (and the few vector helpers) the cells' row functions call, as plain
Python (what runs with ``NUMBA_DISABLE_JIT=1``). Their compiled forms are numba overloads, registered by
``kernels/mathfn.py`` before any loop compiles. Kept apart so that the cells (and so ``import
rnnkit``) import no numba: the kernels load on first use."""

from __future__ import annotations

import math


def tanh(x):
    return math.tanh(x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def cast(x, like):
    """x as a scalar of ``like``'s type (compiled: float32 for float32, so a float32 cell's math
    stays in float32 and takes float32's activations)."""
    return type(like)(x)


def moments(v, eps):
    """(mean, 1 / sqrt(var + eps)) of the vector v, in v's dtype: layer normalization's
    statistics (biased variance, two passes: the deviations' squares, not E[v^2] - mean^2)."""
    n = v.shape[0]
    inv_n = cast(1.0 / n, v[0])
    s = cast(0.0, v[0])
    for k in range(n):
        s += v[k]
    mean = s * inv_n
    q = cast(0.0, v[0])
    for k in range(n):
        d = v[k] - mean
        q += d * d
    return mean, cast(1.0, v[0]) / math.sqrt(q * inv_n + cast(eps, v[0]))


def norm_forward(v, gain, bias, eps, xhat, save):
    """Layer normalization in place: v = gain * xhat + bias, xhat = (v - mean) * rstd, xhat kept
    in ``xhat`` when ``save``; returns rstd = 1 / sqrt(var + eps)."""
    mean, rstd = moments(v, eps)
    for k in range(v.shape[0]):
        x = (v[k] - mean) * rstd
        v[k] = gain[k] * x + bias[k]
        if save:
            xhat[k] = x
    return rstd


def norm_backward(d, xhat, rstd, gain, d_gain):
    """Layer normalization's backward, in place: d, the gradient of gain * xhat (+ bias), becomes
    the gradient of the normalized vector v, xhat = (v - mean) * rstd; d_gain += d * xhat.
        dv = rstd (dx^ - mean(dx^) - x^ mean(dx^ x^)),  dx^ = d * gain"""
    n = d.shape[0]
    inv_n = cast(1.0 / n, rstd)
    s1 = cast(0.0, rstd)
    s2 = cast(0.0, rstd)
    for k in range(n):
        a = d[k] * gain[k]
        d_gain[k] += d[k] * xhat[k]
        s1 += a
        s2 += a * xhat[k]
    m1 = s1 * inv_n
    m2 = s2 * inv_n
    for k in range(n):
        d[k] = rstd * (d[k] * gain[k] - m1 - xhat[k] * m2)
