"""Elman cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.scalars import tanh
from .base import Cell


def _elman_step(act):
    def step(xw, state, p, h_in=None):
        (h,) = state
        return (act(xw + F.linear(h if h_in is None else h_in, p.weight_hh, p.bias_hh)),)

    return step


# ---- fused-kernel pointwise math (rows of one step; see kernels/driver.py for the contract)
# Nothing is saved: backward reads h_t itself. d_xw and d_hw are the same array for Elman.


def _tanh_forward(xw, hw, h, c, saved, own):
    for j in range(h.shape[0]):
        h[j] = tanh(xw[j] + hw[j])


def _tanh_backward(dh, dc, saved, h_prev, c_prev, h, dxw, dhw, own, d_own):
    for j in range(h.shape[0]):
        da = dh[j] * (1 - h[j] * h[j])
        dxw[j] = da
        dhw[j] = da
        dh[j] = 0


def _relu_forward(xw, hw, h, c, saved, own):
    for j in range(h.shape[0]):
        a = xw[j] + hw[j]
        h[j] = 0 if a < 0 else a  # relu(NaN) stays NaN, as in torch


def _relu_backward(dh, dc, saved, h_prev, c_prev, h, dxw, dhw, own, d_own):
    for j in range(h.shape[0]):
        da = 0 if h[j] <= 0 else dh[j]  # (a NaN output passes its gradient on, as torch's relu does)
        dxw[j] = da
        dhw[j] = da
        dh[j] = 0


TANH = Cell(mode="RNN_TANH", gates=1, step=_elman_step(torch.tanh), kernels=(_tanh_forward, _tanh_backward),
            reads_output=True, module="RNN", module_kwargs={"nonlinearity": "tanh"}, key="rnn_tanh")
RELU = Cell(mode="RNN_RELU", gates=1, step=_elman_step(torch.relu), kernels=(_relu_forward, _relu_backward),
            reads_output=True, module="RNN", module_kwargs={"nonlinearity": "relu"}, key="rnn_relu")
