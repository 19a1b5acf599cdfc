"""The rnnkit backends, and which cell kinds each of them runs.

Tests parametrized with these cover the fused kernels wherever they apply, and report (as
skipped) the kinds a backend does not run instead of silently dropping them. Support is
decided by the router's own test (rnnkit._plan.supported), not by running modules at
collection time.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from oracle import CELL_KINDS
from rnnkit import _plan
from rnnkit.cells import CELLS

BACKENDS = [name for name in rnnkit.available_backends() if name != "auto"]


def supports(backend: str, kind: str, dtype=torch.float64) -> bool:
    """Whether ``backend``, forced, runs this cell kind (of tests/oracle.py's CELL_KINDS) on CPU."""
    if backend == "reference":
        return True
    cls, extra = CELL_KINDS[kind]
    mode = "RNN_RELU" if extra.get("nonlinearity") == "relu" else "RNN_TANH" if cls == "RNN" else cls
    return _plan.supported(CELLS[mode], dtype, "cpu")


def backend_kind_params(kinds) -> list:
    """pytest params (backend, kind) for every backend and kind; unsupported pairs skip."""
    return [
        pytest.param(b, k, id=f"{b}-{k}",
                     marks=[] if supports(b, k) else pytest.mark.skip(reason=f"backend {b} does not run {k}"))
        for b in BACKENDS
        for k in kinds
    ]
