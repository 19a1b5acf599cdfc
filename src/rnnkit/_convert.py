"""Conversion between rnnkit modules and their torch.nn twins, e.g. to export with torch.nn.

``to_torch(module)`` builds the torch.nn module of the same class name with the same
constructor arguments and loads the weights strictly; ``from_torch`` does the reverse. The copy
has the same dtype, device, training mode and ``requires_grad`` flags, and shares no storage
with the original. Building it draws no random numbers (the new module is made on the meta
device and then filled), so converting does not disturb a seeded run.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import _modules
from .cells import CELLS

# The constructor arguments each kind of module is rebuilt from, torch.nn's names, derived from
# the cell registry: the layer (RNN, GRU, LSTM) and its single-step cell (RNNCell, ...).
_LAYER_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_CELL_ARGS = ("input_size", "hidden_size", "bias")
_ARGS: dict = {}
for _cell in CELLS.values():
    _extra = tuple(_cell.module_kwargs)
    _ARGS[_cell.module] = _LAYER_ARGS + _extra + (("proj_size",) if _cell.projections else ())
    _ARGS[_cell.module + "Cell"] = _CELL_ARGS + _extra


def _pairs() -> dict:
    """(torch.nn class, rnnkit class) for every kind rnnkit provides."""
    return {
        name: (getattr(nn, name), getattr(_modules, name))
        for name in _ARGS
        if hasattr(_modules, name) and hasattr(nn, name)
    }


def _convert(module: nn.Module, side: int, caller: str) -> nn.Module:
    pairs = _pairs()
    name = next((n for n, classes in pairs.items() if type(module) is classes[side]), None)
    if name is None and side == 1 and type(module).__name__ in _ARGS and not hasattr(nn, type(module).__name__):
        raise TypeError(f"{caller}: torch.nn has no equivalent of rnnkit.{type(module).__name__} (rnnkit's own)")
    if name is None:
        where = "torch.nn" if side == 0 else "rnnkit"
        supported = ", ".join(f"{where}.{n}" for n in pairs)
        raise TypeError(f"{caller} converts {supported}; got {type(module).__module__}.{type(module).__qualname__}")
    if side == 1:
        regular = [f"{n}={getattr(module, n)}" for n in getattr(module, "_regular_names", ()) if getattr(module, n)]
        if regular:
            raise ValueError(f"{caller}: torch.nn.{name} has no equivalent of {', '.join(regular)} (rnnkit's own "
                             "recurrent regularizers); set them to 0 on a copy to export its weights")
    kwargs = {arg: getattr(module, arg) for arg in _ARGS[name]}
    first = next(module.parameters())
    with warnings.catch_warnings():
        # The one-layer dropout warning was already given when `module` was built.
        warnings.filterwarnings("ignore", message="dropout option adds dropout after all but last")
        twin = pairs[name][1 - side](**kwargs, device="meta", dtype=first.dtype)
    twin = twin.to_empty(device=first.device)
    twin.load_state_dict(module.state_dict(), strict=True)
    for (_, ours), (_, theirs) in zip(twin.named_parameters(), module.named_parameters()):
        ours.requires_grad_(theirs.requires_grad)
    return twin.train(module.training)


def to_torch(module: nn.Module) -> nn.Module:
    """The torch.nn twin of an rnnkit RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell: same
    constructor arguments, weights, dtype, device and training mode (for TorchScript or ONNX
    export, or to compare). Raises TypeError for any other module."""
    return _convert(module, 1, "rnnkit.to_torch")


def from_torch(module: nn.Module) -> nn.Module:
    """The rnnkit twin of a torch.nn RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell: same
    constructor arguments, weights, dtype, device and training mode. Raises TypeError for any
    other module (subclasses included: their forward may differ)."""
    return _convert(module, 0, "rnnkit.from_torch")


__all__ = ["to_torch", "from_torch"]

