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

from .base import H_C_STATE, TORCH_PARAMS, Cell, Param
from .gru import gru_update
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


LN_LSTM = Cell(mode="LN_LSTM", gates=4, step=_ln_lstm_step, label="LayerNormLSTM", states=H_C_STATE,
               params=_TORCH_FOUR + _GATE_NORMS + _CELL_NORM, module="LayerNormLSTM", project=_project)
LN_GRU = Cell(mode="LN_GRU", gates=3, step=_ln_gru_step, label="LayerNormGRU", params=_TORCH_FOUR + _GATE_NORMS,
              module="LayerNormGRU", project=_project)
