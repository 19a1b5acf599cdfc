"""Layer-normalized LSTM and GRU cells (rnnkit's own; torch.nn has none).

LN(v; g) normalizes each row's whole vector v to zero mean and unit (biased) variance with
eps = 1e-5, then multiplies it by the gain g. With xw = LN(W_ih x; g_ih) + b_ih and
hw = LN(W_hh h; g_hh) + b_hh (the biases outside the normalization):

    LSTM: i, f, g, o from xw + hw as torch.nn's LSTM; c' = f * c + i * g;
          h' = o * tanh(LN(c'; g_c) + beta_c)           (LN over c's H values)
    GRU:  torch.nn's GRU update from xw and hw, gates r | z | n, b_hn inside r * (...)

Parameters: torch.nn's four (same shapes and initialisation; ``bias=False`` drops the two
biases), then ``layer_norm_ih`` and ``layer_norm_hh`` (G*H, ones), and for the LSTM
``layer_norm_c_weight`` (H, ones) and ``layer_norm_c_bias`` (H, zeros). No projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.scalars import moments, norm_backward, norm_forward, sigmoid, tanh
from ..kernels.templates import specialise
from .base import H_C_STATE, TORCH_PARAMS, Cell, Param
from .gru import _gru_backward_template, _gru_pointwise, gru_update
from .lstm import lstm_update

EPS = 1e-5

_GATE_NORMS = (Param("layer_norm_ih", lambda d: (d.gate_rows,), init="ones"),
               Param("layer_norm_hh", lambda d: (d.gate_rows,), init="ones"))
_CELL_NORM = (Param("layer_norm_c_weight", lambda d: (d.hidden,), init="ones"),
              Param("layer_norm_c_bias", lambda d: (d.hidden,), init="zeros"))
_TORCH_FOUR = TORCH_PARAMS[:4]  # (no weight_hr)


def _norm(v, gain, bias=None):
    return F.layer_norm(v, v.shape[-1:], gain, bias, EPS)


def _project(x, p):
    xw = _norm(F.linear(x, p.weight_ih), p.layer_norm_ih)
    return xw if p.bias_ih is None else xw + p.bias_ih


def _recurrent(h, p):
    hw = _norm(F.linear(h, p.weight_hh), p.layer_norm_hh)
    return hw if p.bias_hh is None else hw + p.bias_hh


def _ln_lstm_step(xw, state, p, h_in=None):
    h, c = state
    o, c = lstm_update(xw + _recurrent(h if h_in is None else h_in, p), c)
    return (o * torch.tanh(_norm(c, p.layer_norm_c_weight, p.layer_norm_c_bias)), c)


def _ln_gru_step(xw, state, p, h_in=None):
    (h,) = state
    return (gru_update(xw, _recurrent(h if h_in is None else h_in, p), h),)


# ---- fused-kernel pointwise math (rows of one step; see kernels/driver.py for the contract)
# The biases are the cell's (``biases_inside``): xw and hw arrive as the bare products x W_ih^T
# and h_prev W_hh^T, and own = (b_ih, b_hh, g_ih, g_hh[, g_c, beta_c]). The row functions
# normalize them in place (xw, hw are the loops' per-step buffers) and save the normalized
# values x^ and the two 1/sigma for backward (see kernels.scalars.norm_backward).
# d_own rows: the gradients of the own parameters, each step's share added (see ``d_own``).
#
# LSTM: saved = [i | f | g | o | x^_ih (4H) | x^_hh (4H) | 1/sigma_ih, 1/sigma_hh]; c's
# normalization is recomputed in backward from c' = f c + i g (H values: cheaper than saving).
# d_own = [d_bias (4H: b_ih's and b_hh's alike) | d_g_ih (4H) | d_g_hh (4H) | d_g_c | d_beta_c]


SAVE = True  # the template's switch, frozen per copy below


def _ln_lstm_pointwise(xw, hw, h, c, saved, own):
    H = h.shape[0]
    G = 4 * H
    rx = norm_forward(xw, own[2], own[0], EPS, saved[G:2 * G], SAVE)
    rh = norm_forward(hw, own[3], own[1], EPS, saved[2 * G:3 * G], SAVE)
    if SAVE:
        saved[3 * G] = rx
        saved[3 * G + 1] = rh
    g_c, beta_c = own[4], own[5]
    for j in range(H):
        i = sigmoid(xw[j] + hw[j])
        f = sigmoid(xw[H + j] + hw[H + j])
        g = tanh(xw[2 * H + j] + hw[2 * H + j])
        o = sigmoid(xw[3 * H + j] + hw[3 * H + j])
        c[j] = f * c[j] + i * g
        h[j] = o  # (o until c' is normalized below)
        if SAVE:
            saved[j] = i
            saved[H + j] = f
            saved[2 * H + j] = g
            saved[3 * H + j] = o
    mc, rc = moments(c, EPS)
    for j in range(H):
        h[j] = h[j] * tanh(g_c[j] * ((c[j] - mc) * rc) + beta_c[j])


_ln_lstm_forward = specialise(_ln_lstm_pointwise, "_ln_lstm_forward", SAVE=True)
_ln_lstm_infer = specialise(_ln_lstm_pointwise, "_ln_lstm_infer", SAVE=False)


def _ln_lstm_backward(dh, dc, saved, h_prev, c_prev, h, dxw, dhw, own, d_own):
    H = h.shape[0]
    G = 4 * H
    g_ih, g_hh, g_c, beta_c = own[2], own[3], own[4], own[5]
    for j in range(H):  # c' again (in dhw, free until its own turn at the end)
        dhw[j] = saved[H + j] * c_prev[j] + saved[j] * saved[2 * H + j]
    mc, rc = moments(dhw[:H], EPS)
    for j in range(H):  # h = o tanh(y), y = g_c c^ + beta_c: dL/dy into dxw[:H], c^ into dhw[:H]
        o = saved[3 * H + j]
        ch = (dhw[j] - mc) * rc
        tc = tanh(g_c[j] * ch + beta_c[j])
        dy = dh[j] * o * (1 - tc * tc)
        d_own[3 * G + H + j] += dy
        dxw[3 * H + j] = dh[j] * tc * o * (1 - o)
        dxw[j] = dy
        dhw[j] = ch
    norm_backward(dxw[:H], dhw[:H], rc, g_c, d_own[3 * G:3 * G + H])  # dxw[:H]: dL/dc' through c's norm
    for j in range(H):
        i = saved[j]
        f = saved[H + j]
        g = saved[2 * H + j]
        dcj = dc[j] + dxw[j]
        dxw[j] = dcj * g * i * (1 - i)
        dxw[H + j] = dcj * c_prev[j] * f * (1 - f)
        dxw[2 * H + j] = dcj * i * (1 - g * g)
        dc[j] = dcj * f
        dh[j] = 0
    for q in range(G):  # the pre-activations' gradient: both biases', and both norms' outputs'
        d_own[q] += dxw[q]
        dhw[q] = dxw[q]
    norm_backward(dxw, saved[G:2 * G], saved[3 * G], g_ih, d_own[G:2 * G])
    norm_backward(dhw, saved[2 * G:3 * G], saved[3 * G + 1], g_hh, d_own[2 * G:3 * G])


# GRU: saved = [r | z | n | hw_n | x^_ih (3H) | x^_hh (3H) | 1/sigma_ih, 1/sigma_hh], hw_n
# LN(W_hn h; g_hn) + b_hn, the value r scales; d_own = [d_b_ih | d_b_hh | d_g_ih | d_g_hh], 3H
# each. The GRU's own row functions in their NORMS copies (cells/gru.py): its gate math, with
# the two normalizations before it (forward) and after it (backward).
_ln_gru_forward = specialise(_gru_pointwise, "_ln_gru_forward", SAVE=True, NORMS=True, EPS=EPS)
_ln_gru_infer = specialise(_gru_pointwise, "_ln_gru_infer", SAVE=False, NORMS=True, EPS=EPS)
_ln_gru_backward = specialise(_gru_backward_template, "_ln_gru_backward", NORMS=True)


LN_LSTM = Cell(mode="LN_LSTM", gates=4, step=_ln_lstm_step, label="LayerNormLSTM", states=H_C_STATE,
               params=_TORCH_FOUR + _GATE_NORMS + _CELL_NORM, module="LayerNormLSTM", project=_project,
               kernels=(_ln_lstm_forward, _ln_lstm_backward, _ln_lstm_infer), saved=12, saved_scalars=2,
               separate_input_grad=True, biases_inside=True, d_own_size=14,
               d_own=(("bias_ih", 0), ("bias_hh", 0), ("layer_norm_ih", 4), ("layer_norm_hh", 8),
                      ("layer_norm_c_weight", 12), ("layer_norm_c_bias", 13)))
LN_GRU = Cell(mode="LN_GRU", gates=3, step=_ln_gru_step, label="LayerNormGRU", params=_TORCH_FOUR + _GATE_NORMS,
              module="LayerNormGRU", project=_project,
              kernels=(_ln_gru_forward, _ln_gru_backward, _ln_gru_infer), saved=10, saved_scalars=2,
              separate_input_grad=True, biases_inside=True, d_own_size=12,
              d_own=(("bias_ih", 0), ("bias_hh", 3), ("layer_norm_ih", 6), ("layer_norm_hh", 9)))
