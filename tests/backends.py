"""The rnnkit backends present on this machine, and which cell kinds each of them runs.

Tests parametrized with these cover the fused kernels wherever they are registered, and report
(as skipped) the kinds a backend does not run instead of silently dropping them.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from oracle import twins

BACKENDS = [name for name in rnnkit.available_backends() if name != "auto"]


def supports(backend: str, kind: str) -> bool:
    """Whether ``backend``, forced, runs this cell kind (of tests/oracle.py's CELL_KINDS):
    forcing a backend on what it does not support raises, by design (rnnkit._backend)."""
    _, module = twins(kind, torch.float64, input_size=1, hidden_size=4)
    try:
        with rnnkit.use_backend(backend):
            module(torch.zeros(1, 1, 1, dtype=torch.float64))
    except RuntimeError as error:
        if "does not support" in str(error):
            return False
        raise
    return True


def backend_kind_params(kinds) -> list:
    """pytest params (backend, kind) for every backend and kind; unsupported pairs skip."""
    return [
        pytest.param(b, k, id=f"{b}-{k}",
                     marks=[] if supports(b, k) else pytest.mark.skip(reason=f"backend {b} does not run {k}"))
        for b in BACKENDS
        for k in kinds
    ]
