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

from .base import Cell, LayerParams


def _gru_step(xw, state, p: LayerParams):
    (h,) = state
    hw = F.linear(h, p.w_hh, p.b_hh)
    x_r, x_z, x_n = xw.chunk(3, -1)
    h_r, h_z, h_n = hw.chunk(3, -1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (n + z * (h - n),)


GRU = Cell(mode="GRU", gates=3, step=_gru_step, label="GRU")
