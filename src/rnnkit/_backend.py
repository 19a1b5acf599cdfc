"""The user's choice of implementation: "auto", "fused" or "reference".

``"auto"`` (the default) lets ``rnnkit._plan.route`` pick, per call, the fused kernels where
they run faster and the torch-ops reference elsewhere; ``"reference"`` or ``"fused"`` force one
(forcing the kernels on tensors they do not support raises; what has no kernels yet, the
layer-normalized cells, runs the reference under either). The environment variable
``RNNKIT_BACKEND`` sets the default at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

_BACKENDS = ("auto", "fused", "reference")
_choice = os.environ.get("RNNKIT_BACKEND", "auto")
# use_backend's override: per thread and per asyncio task, so concurrent callers never see
# (or undo) each other's choice.
_override: contextvars.ContextVar = contextvars.ContextVar("rnnkit_backend", default=None)


def available_backends() -> list[str]:
    return list(_BACKENDS)


def get_backend() -> str:
    return _override.get() or _choice


# torch.compile reads the choice once, at trace time: torch.compiler.assume_constant_result
# marks a function so, but imports torch._dynamo to do it (over a second at ``import rnnkit``);
# the mark is this attribute, which dynamo reads when it traces a call.
get_backend._dynamo_marked_constant = True


def _check(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"Unknown rnnkit backend {name!r}. Select from {available_backends()}.")


def set_backend(name: str) -> None:
    """Choose the implementation for every rnnkit layer: "auto", "fused" or "reference"."""
    global _choice
    _check(name)
    _choice = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`, restoring the previous choice on exit."""
    _check(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)
