"""Elman cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Cell, LayerParams


def _elman_step(act):
    def step(xw, state, p: LayerParams):
        (h,) = state
        return (act(xw + F.linear(h, p.w_hh, p.b_hh)),)

    return step


TANH = Cell(mode="RNN_TANH", gates=1, step=_elman_step(torch.tanh))
RELU = Cell(mode="RNN_RELU", gates=1, step=_elman_step(torch.relu))
