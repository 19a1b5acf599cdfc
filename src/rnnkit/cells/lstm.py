"""LSTM cell, gates in torch.nn's order i | f | g | o.

    i  = sigmoid(xw_i + W_hi h + b_hi)
    f  = sigmoid(xw_f + W_hf h + b_hf)
    g  = tanh(xw_g + W_hg h + b_hg)
    o  = sigmoid(xw_o + W_ho h + b_ho)
    c' = f * c + i * g
    h' = o * tanh(c')                 (with projections: h' = W_hr (o * tanh(c')))

where xw = W_ih x + b_ih. The state is (h, c): h has H_out = P (projections) or H features,
c always H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.scalars import sigmoid, tanh
from ..kernels.templates import specialise
from .base import H_C_STATE, Cell


def _lstm_step(xw, state, p, h_in=None):
    h, c = state
    o, c = lstm_update(xw + F.linear(h if h_in is None else h_in, p.weight_hh, p.bias_hh), c)
    h = o * torch.tanh(c)
    if p.weight_hr is not None:
        h = F.linear(h, p.weight_hr)
    return (h, c)


def lstm_update(gates, c):
    """(o, c') from the gates' pre-activations (., 4H) and c (the layer-normalized LSTM's too)."""
    i, f, g, o = gates.chunk(4, -1)
    return torch.sigmoid(o), torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)


# ---- fused-kernel pointwise math (rows of one step; see kernels/driver.py for the contract)
# saved = [i | f | g | o], 4H per row and step; c' itself is kept by the driver, and backward
# recomputes tanh(c') = tanh(f c + i g) from them (a fifth saved segment cost the forward more
# than the tanh costs backward, and 20% more memory).
# With projections (proj_size > 0) the driver hands these kernels a scratch row for ``h``, which
# receives m = o * tanh(c'), and projects it itself (see kernels/driver.py); they never read h.


SAVE = True  # the template's switch, frozen per copy below


def _lstm_pointwise(xw, hw, h, c, saved, own):
    H = h.shape[0]
    for j in range(H):
        i = sigmoid(xw[j] + hw[j])
        f = sigmoid(xw[H + j] + hw[H + j])
        g = tanh(xw[2 * H + j] + hw[2 * H + j])
        o = sigmoid(xw[3 * H + j] + hw[3 * H + j])
        cj = f * c[j] + i * g
        tc = tanh(cj)
        c[j] = cj
        h[j] = o * tc
        if SAVE:
            saved[j] = i
            saved[H + j] = f
            saved[2 * H + j] = g
            saved[3 * H + j] = o


# One template, two copies: training saves the gates; inference writes nothing to ``saved``
# (see "infer" in kernels/driver.py: the saves cost more than the math at H = 128).
_lstm_forward = specialise(_lstm_pointwise, "_lstm_forward", SAVE=True)
_lstm_infer = specialise(_lstm_pointwise, "_lstm_infer", SAVE=False)


def _lstm_backward(dh, dc, saved, h_prev, c_prev, h, dxw, dhw, own, d_own):
    H = h.shape[0]
    for j in range(H):
        i = saved[j]
        f = saved[H + j]
        g = saved[2 * H + j]
        o = saved[3 * H + j]
        tc = tanh(f * c_prev[j] + i * g)  # recomputed: a fifth saved segment costs more
        dcj = dc[j] + dh[j] * o * (1 - tc * tc)
        dxw[j] = dcj * g * i * (1 - i)
        dxw[H + j] = dcj * c_prev[j] * f * (1 - f)
        dxw[2 * H + j] = dcj * i * (1 - g * g)
        dxw[3 * H + j] = dh[j] * tc * o * (1 - o)
        dc[j] = dcj * f
        dh[j] = 0


LSTM = Cell(mode="LSTM", gates=4, step=_lstm_step, states=H_C_STATE, label="LSTM", saved=4, module="LSTM", key="lstm",
            projections=True,
            kernels=(_lstm_forward, _lstm_backward, _lstm_infer))
