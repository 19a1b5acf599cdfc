"""rnnkit: drop-in replacements for torch.nn's recurrent layers, with fused CPU kernels.

The public names load with torch: at once when torch is already imported (any program that
uses torch, so a whole model saved with torch.save loads with torch.load's defaults at once),
else on first use (PEP 562), so that the ``rnnkit`` command answers ``--help`` and argument
errors without loading torch.
"""

import sys

from ._version import __version__

__all__ = [
    "RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "RNNBase", "RNNCellBase",
    "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell",
    "PackedSequence", "pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "pad_sequence",
    "set_backend", "get_backend", "use_backend", "available_backends",
    "to_torch", "from_torch", "compile_kernels", "Stream",
]


def _load() -> None:
    import torch
    from torch.nn.utils.rnn import (
        PackedSequence,
        pack_padded_sequence,
        pack_sequence,
        pad_packed_sequence,
        pad_sequence,
    )

    from ._backend import available_backends, get_backend, set_backend, use_backend
    from ._convert import from_torch, to_torch
    from ._modules import (
        GRU,
        LSTM,
        RNN,
        GRUCell,
        LayerNormGRU,
        LayerNormGRUCell,
        LayerNormLSTM,
        LayerNormLSTMCell,
        LSTMCell,
        RNNBase,
        RNNCell,
        RNNCellBase,
    )
    from ._stream import Stream

    names = dict(locals())
    globals().update({name: names[name] for name in __all__ if name in names})
    # A whole model saved with torch.save(model) loads with torch.load's default weights_only=True:
    # beyond torch's own allowlist, the pickle of an rnnkit module names only its class. Each is
    # registered under its pickled path (the (class, name) form), so that a user's
    # `with torch.serialization.safe_globals([rnnkit.GRU])` does not unlist it on exit.
    torch.serialization.add_safe_globals(
        [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in (
            RNNBase, RNN, GRU, LSTM, RNNCell, GRUCell, LSTMCell, LayerNormLSTM, LayerNormGRU, LayerNormLSTMCell,
            LayerNormGRUCell)]
    )


def __getattr__(name: str):
    if name == "compile_kernels":  # (with numba: loaded when asked for)
        from ._warmup import compile_kernels

        globals()[name] = compile_kernels
        return compile_kernels
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'rnnkit' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


if "torch" in sys.modules:
    _load()
