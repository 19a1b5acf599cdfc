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

from .base import Cell, LayerParams


def _lstm_step(xw, state, p: LayerParams):
    h, c = state
    gates = xw + F.linear(h, p.w_hh, p.b_hh)
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if p.w_hr is not None:
        h = F.linear(h, p.w_hr)
    return (h, c)


LSTM = Cell(mode="LSTM", gates=4, step=_lstm_step, state_size=2, label="LSTM")
