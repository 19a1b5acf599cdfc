"""rnnkit: drop-in replacements for torch.nn's recurrent layers, with fused CPU kernels."""

from torch.nn.utils.rnn import (
    PackedSequence,
    pack_padded_sequence,
    pack_sequence,
    pad_packed_sequence,
    pad_sequence,
)

from ._backend import available_backends, get_backend, set_backend, use_backend
from ._convert import from_torch, to_torch
from ._modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase
from ._warmup import compile_kernels

__version__ = "0.1.0"

__all__ = [
    "RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "RNNBase", "RNNCellBase",
    "PackedSequence", "pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "pad_sequence",
    "set_backend", "get_backend", "use_backend", "available_backends",
    "to_torch", "from_torch", "compile_kernels",
]
