"""The one place numba is configured for rnnkit's kernels.

Every kernel is decorated with ``jit`` or ``jit_parallel`` from here, never with hand-written
flags. Compiled kernels are cached on disk in a folder keyed by a hash of the kernel and cell
sources, so a second process starts fast and an edited cell can never run stale machine code
(numba's own cache only watches the file of the function it caches, not the cells it inlines).

Environment:
    RNNKIT_CACHE_DIR     where to cache (default: ~/.cache/rnnkit/numba, or $XDG_CACHE_HOME)
    NUMBA_BOUNDSCHECK=1  numba's own switch: every array access bounds-checked (tests use it)
    NUMBA_DISABLE_JIT=1  numba's own switch: run the kernels as plain Python
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
from pathlib import Path

import numba
from numba.core import caching

from .templates import specialise  # noqa: F401  (the kernels' templates, re-exported)

FASTMATH = True  # allow reassociation/vectorised reductions; no NaN/Inf assumptions (see below)
# 'fast' would also let LLVM assume no NaN/Inf, which changes how NaN inputs propagate.
FASTMATH_FLAGS = {"contract", "arcp", "reassoc", "afn", "nsz"} if FASTMATH else set()

_PACKAGE = Path(__file__).resolve().parent.parent


def _source_hash() -> str:
    # numba's version, scipy's (its BLAS is bound into the kernels, or stubbed out without it)
    # and the kernel sources.
    digest = hashlib.sha256(numba.__version__.encode())
    try:
        digest.update(importlib.metadata.version("scipy").encode())
    except importlib.metadata.PackageNotFoundError:
        digest.update(b"no scipy")
    for folder in ("kernels", "cells"):
        for path in sorted((_PACKAGE / folder).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """The folder of this version's kernels (and, under NUMBA_BOUNDSCHECK=1, of their bounds-
    checked builds: numba's cache index does not tell the two apart)."""
    root = os.environ.get("RNNKIT_CACHE_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "rnnkit", "numba")
    return Path(root) / (_source_hash() + ("-boundscheck" if numba.config.BOUNDSCHECK else ""))


class _PackageCacheLocator(caching.UserProvidedCacheLocator):
    """numba's locator for a cache folder files each kernel under a hash of its source folder's
    absolute path, so a second checkout of the same sources (a CI clone) compiles everything
    again. This one files rnnkit's kernels by their place in the package ("kernels", "cells"):
    the folder above is already keyed by the hash of every kernel source, and numba still checks
    each file's own content hash before it loads anything."""

    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)
        folder = os.path.relpath(os.path.dirname(os.path.abspath(py_file)), _PACKAGE)
        self._cache_path = os.path.join(numba.config.CACHE_DIR, folder)

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent.parent != _PACKAGE:  # not one of ours
            return None
        return super().from_function(py_func, py_file)


# numba picks the first locator that accepts a function; ours only accepts rnnkit's kernels. With
# a numba that keeps its locators elsewhere, its own apply (still correct, cached per path).
_LOCATORS = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
if isinstance(_LOCATORS, list) and _PackageCacheLocator not in _LOCATORS:
    _LOCATORS.insert(0, _PackageCacheLocator)


@contextlib.contextmanager
def _our_cache_dir():
    # numba picks a dispatcher's cache locator when it is decorated: point it at our folder
    # for our kernels only, then restore the user's setting.
    previous = numba.config.CACHE_DIR
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        numba.config.CACHE_DIR = str(path)
        writable = True
    except OSError:
        writable = False  # read-only home: compile every process, still correct
    try:
        yield writable
    finally:
        numba.config.CACHE_DIR = previous


def jit(fn=None, *, parallel: bool = False, inline: bool = False):
    """Compile a kernel with rnnkit's flags (nopython, fastmath as above, cached)."""

    def wrap(f):
        with _our_cache_dir() as writable:
            return numba.njit(
                f, fastmath=FASTMATH_FLAGS, cache=writable, parallel=parallel, error_model="numpy",
                inline="always" if inline else "never",
            )

    return wrap if fn is None else wrap(fn)


def jit_parallel(fn):
    return jit(fn, parallel=True)


def jit_inline(fn):
    """For the row functions the time loops call at every step (the cells' pointwise math, the
    recurrent product): inlined into each caller at numba's IR level. A call between compiled
    functions is not free in numba: every array argument is reference-counted on the way in and
    out (atomic updates through the runtime), which cost an Elman row of H = 64 about 50 ns on
    top of its 11 ns of math; inlined, LLVM sees the whole loop and drops them."""
    return jit(fn, inline=True)


