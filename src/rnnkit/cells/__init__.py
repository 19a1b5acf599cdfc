"""The cell registry: torch.nn mode string -> Cell. Adding a cell is one file and one entry."""

from __future__ import annotations

from . import elman, gru, layernorm, lstm
from .base import Cell, Dims, Param, State, dims_of

CELLS: dict[str, Cell] = {
    elman.TANH.mode: elman.TANH,
    elman.RELU.mode: elman.RELU,
    gru.GRU.mode: gru.GRU,
    lstm.LSTM.mode: lstm.LSTM,
    layernorm.LN_LSTM.mode: layernorm.LN_LSTM,
    layernorm.LN_GRU.mode: layernorm.LN_GRU,
}


def by_key(key: str) -> Cell:
    """The cell the bench and the CLI call ``key`` (rnn_tanh, rnn_relu, gru, lstm, ...)."""
    for cell in CELLS.values():
        if cell.key == key:
            return cell
    raise KeyError(key)


__all__ = ["CELLS", "Cell", "Dims", "Param", "State", "by_key", "dims_of"]
