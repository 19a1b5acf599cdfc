"""GRU cell, gates in torch.nn's order r | z | n.

    r  = sigmoid(xw_r + W_hr h + b_hr)
    z  = sigmoid(xw_z + W_hz h + b_hz)
    n  = tanh(xw_n + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

where xw = W_ih x + b_ih. ``b_hn`` sits inside ``r * (...)``, as in torch.nn and cuDNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.scalars import norm_backward, norm_forward, sigmoid, tanh
from ..kernels.templates import specialise
from .base import Cell


def _gru_step(xw, state, p, h_in=None):
    (h,) = state
    return (gru_update(xw, F.linear(h if h_in is None else h_in, p.weight_hh, p.bias_hh), h),)


def gru_update(xw, hw, h):
    """h' from xw, hw (., 3H) and h: the GRU's gates and update (the layer-normalized GRU's too)."""
    x_r, x_z, x_n = xw.chunk(3, -1)
    h_r, h_z, h_n = hw.chunk(3, -1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return n + z * (h - n)


# ---- fused-kernel pointwise math (rows of one step; see kernels/driver.py for the contract)
# saved = [r | z | n | W_hn h + b_hn], 4H per row and step.


SAVE = True  # the templates' switches, frozen per copy below (NORMS: the layer-normalized GRU's copies)
NORMS = False
EPS = 0.0  # (set in the layer-normalized GRU's copies: cells/layernorm.py)


def _gru_pointwise(xw, hw, h, c, saved, own):
    H = h.shape[0]
    if NORMS:  # LayerNormGRU (cells/layernorm.py): xw, hw the bare products, normalized in place
        rx = norm_forward(xw, own[2], own[0], EPS, saved[4 * H:7 * H], SAVE)
        rh = norm_forward(hw, own[3], own[1], EPS, saved[7 * H:10 * H], SAVE)
        if SAVE:
            saved[10 * H] = rx
            saved[10 * H + 1] = rh
    for j in range(H):
        r = sigmoid(xw[j] + hw[j])
        z = sigmoid(xw[H + j] + hw[H + j])
        hn = hw[2 * H + j]
        n = tanh(xw[2 * H + j] + r * hn)
        h[j] = n + z * (h[j] - n)
        if SAVE:
            saved[j] = r
            saved[H + j] = z
            saved[2 * H + j] = n
            saved[3 * H + j] = hn


# One template, two copies: training saves the gates; inference writes nothing to ``saved``
# (see "infer" in kernels/driver.py).
_gru_forward = specialise(_gru_pointwise, "_gru_forward", SAVE=True, NORMS=False)
_gru_infer = specialise(_gru_pointwise, "_gru_infer", SAVE=False, NORMS=False)


def _gru_backward_template(dh, dc, saved, h_prev, c_prev, h, dxw, dhw, own, d_own):
    H = h.shape[0]
    for j in range(H):
        r = saved[j]
        z = saved[H + j]
        n = saved[2 * H + j]
        hn = saved[3 * H + j]
        g = dh[j]
        dn = g * (1 - z) * (1 - n * n)
        dz = g * (h_prev[j] - n) * z * (1 - z)
        dr = dn * hn * r * (1 - r)
        dxw[j] = dr
        dxw[H + j] = dz
        dxw[2 * H + j] = dn
        dhw[j] = dr
        dhw[H + j] = dz
        dhw[2 * H + j] = dn * r
        dh[j] = g * z
    if NORMS:  # LayerNormGRU (cells/layernorm.py, its saved values and d_own there): both biases,
        G = 3 * H  # then through the two normalizations
        for q in range(G):
            d_own[q] += dxw[q]
            d_own[G + q] += dhw[q]
        norm_backward(dxw, saved[4 * H:7 * H], saved[10 * H], own[2], d_own[2 * G:3 * G])
        norm_backward(dhw, saved[7 * H:10 * H], saved[10 * H + 1], own[3], d_own[3 * G:4 * G])


_gru_backward = specialise(_gru_backward_template, "_gru_backward", NORMS=False)


GRU = Cell(mode="GRU", gates=3, step=_gru_step, label="GRU", saved=4,
           kernels=(_gru_forward, _gru_backward, _gru_infer), separate_input_grad=True, module="GRU", key="gru")
