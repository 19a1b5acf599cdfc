"""Kernel templates specialised per copy: plain Python, no numba (see config.jit for compiling)."""

from __future__ import annotations

import types


def specialise(template, name: str, **constants):
    """``template`` as a new function named ``name`` whose globals include ``constants``, which
    numba freezes at compile time: ``if CONSTANT:`` branches fold away before LLVM vectorises
    the loops, and each copy compiles and caches under its own name."""
    scope = dict(template.__globals__, **constants)
    fn = types.FunctionType(template.__code__, scope, name, template.__defaults__)
    fn.__qualname__ = name
    return fn
