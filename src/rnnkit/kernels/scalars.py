"""The scalar functions the cells' row functions call, as plain Python (what runs with
``NUMBA_DISABLE_JIT=1``). Their compiled forms are numba overloads, registered by
``kernels/mathfn.py`` before any loop compiles. Kept apart so that the cells (and so ``import
rnnkit``) import no numba: the kernels load on first use."""

from __future__ import annotations

import math


def tanh(x):
    return math.tanh(x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))
