"""The cell registry: torch.nn mode string -> Cell. Adding a cell is one file and one entry."""

from __future__ import annotations

from . import elman, gru, lstm
from .base import Cell, LayerParams

CELLS: dict[str, Cell] = {
    elman.TANH.mode: elman.TANH,
    elman.RELU.mode: elman.RELU,
    gru.GRU.mode: gru.GRU,
    lstm.LSTM.mode: lstm.LSTM,
}

__all__ = ["CELLS", "Cell", "LayerParams"]
