"""The kernels' activations against torch's, element by element, special values included."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from rnnkit.kernels import config, mathfn


@numba.njit(fastmath=config.FASTMATH_FLAGS)  # the flags the kernels compile with
def _apply(x, tanh_out, sigmoid_out):
    for i in range(x.shape[0]):
        tanh_out[i] = mathfn.tanh(x[i])
        sigmoid_out[i] = mathfn.sigmoid(x[i])


@numba.njit(fastmath=config.FASTMATH_FLAGS)
def _exp(x, exp_out, expm1_out):
    for i in range(x.shape[0]):
        exp_out[i] = mathfn.exp64(x[i])
        expm1_out[i] = mathfn.expm1_64(x[i])


SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-300, -1e-12, 5e-8, 20.0, -20.0, 708.5, -708.5, 745.0, -745.0]


def _inputs(dtype):
    rng = np.random.default_rng(0)
    return np.concatenate([rng.uniform(-800, 800, 20000), rng.normal(0, 3, 20000), rng.normal(0, 1e-4, 2000),
                           SPECIAL]).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_and_sigmoid_match_torch(dtype):
    x = _inputs(dtype)
    tanh_out, sigmoid_out = np.empty_like(x), np.empty_like(x)
    _apply(x, tanh_out, sigmoid_out)
    t = torch.from_numpy(x)
    eps = np.finfo(dtype).eps
    for ours, ref in ((tanh_out, torch.tanh(t).numpy()), (sigmoid_out, torch.sigmoid(t).numpy())):
        assert np.array_equal(np.isnan(ours), np.isnan(ref))
        finite = ~np.isnan(ref)
        # float64: relative to the value (tiny tanh(x) keeps its digits) down to 1e-300 (sigmoid
        # below -708 is 0, not a denormal); float32 (sigmoid = 1/2 + tanh(x/2)/2): absolute, like
        # the 1e-5 parity it serves
        atol = 1e-300 if dtype == np.float64 else 8 * eps
        assert np.all(np.abs(ours[finite] - ref[finite]) <= 8 * eps * np.abs(ref[finite]) + atol)
        limits = np.isinf(x)  # exactly torch's limits at +-inf (0 * inf must stay NaN downstream)
        assert np.array_equal(ours[limits], ref[limits])


def test_float64_exp_and_expm1_within_an_ulp_or_two():
    x = _inputs(np.float64)
    exp_out, expm1_out = np.empty_like(x), np.empty_like(x)
    _exp(x, exp_out, expm1_out)
    with np.errstate(over="ignore"):
        exp_ref, expm1_ref = np.exp(x), np.expm1(x)
    normal = (x > -708) & (x < 709)
    eps = np.finfo(np.float64).eps
    assert np.max(np.abs(exp_out[normal] - exp_ref[normal]) / exp_ref[normal]) < 2 * eps
    nonzero = normal & (x != 0)
    assert np.max(np.abs(expm1_out[nonzero] - expm1_ref[nonzero]) / np.abs(expm1_ref[nonzero])) < 4 * eps
    # outside: exactly 0 / -1 below and inf above; NaN stays NaN
    assert np.all(exp_out[x < -708] == 0) and np.all(expm1_out[x < -708] == -1)
    assert np.all(np.isposinf(exp_out[x > 709])) and np.all(np.isposinf(expm1_out[x > 709]))
    assert np.array_equal(np.isnan(exp_out), np.isnan(x)) and np.array_equal(np.isnan(expm1_out), np.isnan(x))
