"""Which implementation runs a layer: the switch between the fused kernels and the reference.

``"auto"`` (the default) uses the first registered backend that supports the tensors and
prefers the call (the fused CPU kernels for float32/float64 CPU tensors, once registered, but for
the single steps they would run slower than torch ops; see ``_fused.prefers``) and the torch-ops
reference otherwise. ``"reference"`` or ``"fused"`` force one path; forcing a backend on tensors it does
not support raises. The environment variable ``RNNKIT_BACKEND`` sets the default at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._driver import LayerFn, StackFn, reference_layer
from .cells import Cell, LayerParams

Prefers = Callable[[Cell, Tensor, Sequence[LayerParams]], bool]


class Backend(NamedTuple):
    layer: LayerFn
    supports: Callable[[Cell, Tensor], bool]
    # optional: every layer and direction at once, without inter-layer dropout (see run_layers)
    stack: Optional[StackFn] = None
    # optional, "auto" only: whether to run a call it supports (else the next backend runs it),
    # given the cell, the time-major input and every layer-direction's parameters
    prefers: Optional[Prefers] = None


# Priority order for "auto": first match wins; the reference supports everything.
_BACKENDS: dict[str, Backend] = {"reference": Backend(reference_layer, lambda cell, x: True)}
_AUTO = "auto"
_choice = os.environ.get("RNNKIT_BACKEND", _AUTO)
# use_backend's override: per thread and per asyncio task, so concurrent callers never see
# (or undo) each other's choice.
_override: contextvars.ContextVar = contextvars.ContextVar("rnnkit_backend", default=None)


def register_backend(name: str, layer: LayerFn, supports: Callable[[Cell, Tensor], bool],
                     stack: Optional[StackFn] = None,
                     prefers: Optional[Prefers] = None) -> None:
    """Register a layer implementation ahead of the reference in the "auto" order."""
    global _BACKENDS
    _BACKENDS = {name: Backend(layer, supports, stack, prefers), **_BACKENDS}


def available_backends() -> list[str]:
    return [_AUTO, *_BACKENDS]


@torch.compiler.assume_constant_result  # torch.compile reads the choice once, at trace time
def get_backend() -> str:
    return _override.get() or _choice


def set_backend(name: str) -> None:
    """Choose the implementation for every rnnkit layer: "auto", "fused" or "reference"."""
    global _choice
    if name not in available_backends():
        raise ValueError(f"Unknown rnnkit backend {name!r}. Select from {available_backends()}.")
    _choice = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`, restoring the previous choice on exit."""
    if name not in available_backends():
        raise ValueError(f"Unknown rnnkit backend {name!r}. Select from {available_backends()}.")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _register_fused() -> None:
    from . import _fused  # compiles nothing at import: kernels compile on first use

    register_backend("fused", _fused.fused_layer, _fused.supports, _fused.fused_stack, _fused.prefers)


def layer_for(cell: Cell, x: Tensor, params: Sequence[LayerParams]) -> LayerFn:
    return backend_for(cell, x, params).layer


def reference() -> Backend:
    """The torch-ops reference, whatever the choice (for what only torch ops can do: autocast)."""
    return _BACKENDS["reference"]


def backend_for(cell: Cell, x: Tensor, params: Sequence[LayerParams]) -> Backend:
    choice = get_backend()
    if choice == _AUTO:
        for backend in _BACKENDS.values():
            if backend.supports(cell, x) and (backend.prefers is None or backend.prefers(cell, x, params)):
                return backend
    backend = _BACKENDS.get(choice)
    if backend is None:
        raise RuntimeError(f"rnnkit backend {choice!r} is not available here")
    if not backend.supports(cell, x):
        raise RuntimeError(
            f"rnnkit backend {choice!r} does not support {cell.mode} with {x.dtype} tensors on {x.device}; "
            "use rnnkit.set_backend('auto') or 'reference'"
        )
    return backend


_register_fused()
