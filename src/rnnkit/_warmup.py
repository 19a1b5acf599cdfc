"""Compiling the kernels ahead of their first use: ``rnnkit.compile_kernels()``, the work of
``rnnkit compile``; and the one-line notice when a kernel compiles on demand instead.

numba compiles a kernel the first time it is called with a new signature (its argument types:
dtype, rank, layout), then caches the machine code on disk (see ``kernels/config.py``), so only
the first process on a machine pays. Without this it pays in the middle of a user's first
calls: 10-60 s for each new kind of call on the 2-core machine (a first GRU forward 15.6 s and
its backward 16.8 s in issue 24). ``compile_kernels`` pays it all at install time instead.

It reaches the kernels only through the public API, as a user does: every registered cell as a
layer (``rnnkit.RNNBase(mode, ...)``), float32 and float64, under ``use_backend("fused")``,
inference (``torch.no_grad``) and training (forward and backward), in shapes that take every
route the layers choose between: single steps of one and of several rows (the step kernels),
short calls of a few row-steps (weights used as stored), packed, bidirectional and stacked calls
(packed weights), batches large enough to split across threads (the "chunks" loops and the
threaded products; run with two torch threads), few rows with large weights (each step's product
split by columns, threaded packing), a long sequence (time chunks), LSTM projections and
inter-layer dropout; and the single-step cells. Whatever kernels those calls reach are what a
user's calls reach, whichever kernels the library has at the time: nothing here names one.
(Checked by running the test suite after it, with a listener on numba's compile events: none
of its calls compiled a kernel, but for the weight-gradient route a test forces where this
machine's OpenBLAS never sends it; see ``_other_blas_env``.)

Correct on another CPU: numba files each compiled signature in the cache index under
``(signature, codegen.magic_tuple(), hashes of the function's bytecode)``, and the magic tuple
is ``(LLVM target triple, host CPU name, host CPU features)`` (numba/core/caching.py,
``Cache._index_key``; numba/core/codegen.py, ``CPUCodegen.magic_tuple``). A process on a CPU
that differs in name or features finds no entry for itself and compiles anew (printing the
notice below); it never loads code built for instructions its CPU lacks. Entries for several
CPUs sharing one cache folder (a home directory on NFS) live side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Iterator, NamedTuple, Optional, Sequence

from numba.core import event

DTYPES = ("float32", "float64")

NOTICE = ("rnnkit: compiling kernels for this machine, once (a new kind of call waits 10-60 s); "
          "`rnnkit compile` compiles them all ahead")


class _Watch(event.Listener):
    """Listens to numba's compile events, which fire only when a function is compiled (a cache
    miss), never when it is loaded from the cache: on the first compile of an rnnkit kernel in
    this process it prints ``NOTICE`` to stderr (unless ``compile_kernels`` is running here,
    which says what it does itself), and it counts the kernels compiled from Python (not the
    functions they call, compiled along with them)."""

    def __init__(self):
        self.noticed = False
        self.quiet = 0  # > 0 while compile_kernels runs in this process
        self.compiled = 0
        self._depth = threading.local()

    @staticmethod
    def _ours(ev) -> bool:
        func = getattr(ev.data.get("dispatcher"), "py_func", None)
        return (getattr(func, "__module__", None) or "").startswith("rnnkit.")

    def on_start(self, ev):
        if not self._ours(ev):
            return
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        if depth == 0:
            self.compiled += 1
        if not self.noticed and not self.quiet:
            self.noticed = True
            print(NOTICE, file=sys.stderr, flush=True)

    def on_end(self, ev):
        if self._ours(ev):
            self._depth.n = getattr(self._depth, "n", 1) - 1


_WATCH = _Watch()
event.register("numba:compile", _WATCH)


class CompileReport(NamedTuple):
    """What ``compile_kernels`` did: ``compiled`` kernels (entry points, counted per signature)
    were not in the cache and now are; zero means the cache already held everything."""

    compiled: int
    seconds: float
    cache_dir: str


def compile_kernels(jobs: Optional[int] = None, progress: bool = True) -> CompileReport:
    """Compile, or find in the on-disk cache, every kernel that rnnkit's layers and cells can
    run here, in float32 and float64, so that no later call on this machine compiles.

    Args:
        jobs: processes compiling at once (default: 2 where this process may use two CPUs or
            more, else 1). With 1 the kernels compile in this process, which then has them
            loaded; with more, each process takes a share of the cell types and dtypes.
        progress: print a line to stderr as each cell type and dtype is ready.

    Returns: a :class:`CompileReport`. The first time on a machine this takes minutes (numba
    compiles on one core per process: see README.md for measured times); once everything is
    cached, a few seconds.
    """
    from .kernels.config import cache_dir

    if jobs is None:
        jobs = min(2, _cpus())
    if jobs < 1:
        raise ValueError(f"jobs must be a positive number of processes, got {jobs}")
    t0 = time.perf_counter()
    units = [(dtype, label) for dtype in DTYPES for label in _labels()]
    if jobs == 1 or not _can_lock():
        compiled = _compile_here(units, progress)
    else:
        compiled = _compile_in_processes(_split(units, jobs), progress)
    other = _other_blas_env()
    if other is not None:
        # The weight gradients take another route under the other OpenBLAS choice (see
        # OPENBLAS_CORETYPE in README.md); its kernels compile in a process started under it
        # (OpenBLAS reads its setting when it loads). One cell's calls reach them all.
        compiled += _compile_in_processes([[(dtype, units[0][1]) for dtype in DTYPES]], progress, other)
    return CompileReport(compiled, time.perf_counter() - t0, str(cache_dir()))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1


def _labels() -> list:
    """What ``_calls`` drives, in order: every registered cell as a layer, then the cells."""
    from .cells import CELLS

    return [*(mode for mode, cell in CELLS.items() if cell.kernels is not None), "cells"]


def _split(units: list, jobs: int) -> list:
    """``units`` in at most ``jobs`` runs of consecutive units, as even as they divide: with
    two jobs, one dtype each (the kernels shared by the cell types compile once per dtype)."""
    jobs = min(jobs, len(units))
    size, extra = divmod(len(units), jobs)
    bounds = [i * size + min(i, extra) for i in range(jobs + 1)]
    return [units[bounds[i]:bounds[i + 1]] for i in range(jobs)]


def _compile_here(units: Sequence[tuple], progress: bool) -> int:
    """Drive the calls of ``units`` ((dtype, label) pairs) in this process: kernels compiled."""
    import torch

    before = _WATCH.compiled
    _WATCH.quiet += 1
    threads = torch.get_num_threads()
    try:
        # Two threads at least, so the layers take their threaded routes (they never use more
        # threads than torch may); numba's pool is fixed at its start (one thread on a one-CPU
        # machine, where those routes are out of reach for every caller alike).
        torch.set_num_threads(max(2, threads))
        for dtype, label in units:
            t = time.perf_counter()
            for call in _calls(getattr(torch, dtype), label):
                call()
            if progress:
                print(f"rnnkit compile: {dtype} {label} ready ({time.perf_counter() - t:.1f} s)",
                      file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
        _WATCH.quiet -= 1
    return _WATCH.compiled - before


def _compile_in_processes(shares: list, progress: bool, env: Optional[dict] = None) -> int:
    """Each share of (dtype, label) pairs in a process of its own, all at once. Two processes
    compiling different signatures of one function both write its cache index, so each
    serialises its writes with the others (``_serialised_cache_writes``)."""
    from .kernels.config import cache_dir

    env = dict(os.environ if env is None else env)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_parent, env.get("PYTHONPATH"))))  # this rnnkit
    lock = cache_dir() / ".compile.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(lock), str(int(progress)),
                                 *(f"{dtype}:{label}" for dtype, label in share)],
                                env=env, stdout=subprocess.PIPE, text=True)
               for share in shares]
    compiled = 0
    failed = []
    for worker in workers:
        out, _ = worker.communicate()
        if worker.returncode != 0:
            failed.append(worker.returncode)
        else:
            compiled += json.loads(out.strip().splitlines()[-1])["compiled"]
    if failed:
        raise RuntimeError(f"rnnkit compile: {len(failed)} worker(s) failed (exit code {failed[0]}); "
                           "see the message above")
    return compiled


def _worker(lock: str, progress: str, *units: str) -> None:
    """A process of ``_compile_in_processes``: prints its count as a JSON line on stdout."""
    with _serialised_cache_writes(lock):
        compiled = _compile_here([tuple(unit.split(":", 1)) for unit in units], progress == "1")
    print(json.dumps({"compiled": compiled}))


# (-c, not -m: run as __main__, this module would be imported a second time, its watch with it)
_WORKER = "import sys; from rnnkit._warmup import _worker; _worker(*sys.argv[1:])"


def _can_lock() -> bool:
    try:
        import fcntl  # noqa: F401
    except ImportError:  # (Windows: one process compiles everything)
        return False
    return True


@contextlib.contextmanager
def _serialised_cache_writes(lock_path: str) -> Iterator[None]:
    """numba saves a cache entry by reading the function's index, adding the entry (numbering a
    new data file after the entries it saw) and writing both back: two processes saving at once
    can lose an entry or write two signatures' code under one file name. Here each save holds an
    exclusive lock on ``lock_path`` (numba/core/caching.py, ``IndexDataCacheFile.save``; numba's
    maintainers proposed such a lock for the same race in numba/numba#10128)."""
    import fcntl

    from numba.core import caching

    save = caching.IndexDataCacheFile.save

    def locked_save(self, key, data):
        with open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                save(self, key, data)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    caching.IndexDataCacheFile.save = locked_save
    try:
        yield
    finally:
        caching.IndexDataCacheFile.save = save


def _other_blas_env() -> Optional[dict]:
    """On an AVX-512 machine, the environment with the other OpenBLAS choice than this
    process's (OPENBLAS_CORETYPE=Haswell when it is unset, unset when it is set), under which
    the weight gradients take the other of their two routes; None elsewhere (one route)."""
    import llvmlite.binding as llvm

    try:
        if not llvm.get_host_cpu_features().get("avx512f"):
            return None
    except RuntimeError:  # (features unknown to LLVM)
        return None
    env = dict(os.environ)
    if env.pop("OPENBLAS_CORETYPE", None) is None:
        env["OPENBLAS_CORETYPE"] = "Haswell"
    return env


# ---- the calls: every route of every registered cell, in shapes that take it.

class _Shape(NamedTuple):
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False  # a PackedSequence of decreasing lengths
    dropout: float = 0.0  # between layers (the layer-by-layer path)
    proj: bool = False  # proj_size = H // 2 where the cell has projections (the LSTM)
    with_state: bool = False  # h_0 given, requiring grad in training


# Sizes with a margin of about 2 over the layers' thresholds (rnnkit/_plan.py's LIMITS), so that a
# retuned threshold still finds each route taken.
_SHAPES = (
    _Shape(1, 1, 4, 8, layers=2, bidirectional=True),  # a step of one row: the step kernels
    _Shape(1, 6, 4, 8, with_state=True),  # a step of more rows
    _Shape(1, 2, 4, 8, proj=True),  # a step with projections: the general loops
    _Shape(3, 1, 4, 8),  # a few row-steps: weights as stored, unpacked products
    _Shape(2, 2, 1024, 512),  # ... with large weights: those products threaded
    _Shape(5, 3, 4, 8, layers=2, bidirectional=True, packed=True, with_state=True),  # packed weights
    _Shape(5, 3, 4, 8, layers=2, dropout=0.5, proj=True),  # layer by layer; projections
    _Shape(64, 16, 64, 128),  # batch rows split across threads; threaded GEMMs
    _Shape(40, 2, 32, 768),  # few rows, large weights: each step's product split by columns
    _Shape(80, 1, 32, 768),  # ... one row, packed; threaded packing
    _Shape(2048, 32, 8, 32),  # a long sequence: time chunks
)


def _calls(dtype, label: str) -> list:
    """The calls of ``label``: a registered cell's mode (as a layer, and streamed), or "cells"."""
    if label != "cells":
        return [*(lambda shape=shape: _run_layer(label, shape, dtype) for shape in _SHAPES),
                *(lambda layers=layers: _run_stream(label, layers, dtype) for layers in (1, 2))]
    return [lambda cls=cls, kw=kw, B=B: _run_cell(cls, kw, B, dtype) for cls, kw in _cells() for B in (1, 5)]


def _cells() -> list:
    """(class, arguments) of every single-step cell."""
    import rnnkit

    return [(rnnkit.RNNCell, {"nonlinearity": "tanh"}), (rnnkit.RNNCell, {"nonlinearity": "relu"}),
            (rnnkit.GRUCell, {}), (rnnkit.LSTMCell, {}), (rnnkit.LayerNormGRUCell, {}), (rnnkit.LayerNormLSTMCell, {})]


def _run_layer(mode: str, s: _Shape, dtype) -> None:
    import torch

    import rnnkit
    from rnnkit.cells import CELLS

    generator = torch.Generator().manual_seed(0)
    try:
        layer = rnnkit.RNNBase(mode, s.I, s.H, s.layers, dropout=s.dropout, bidirectional=s.bidirectional,
                               proj_size=s.H // 2 if s.proj else 0, dtype=dtype)
    except ValueError:  # (proj_size on a cell without projections)
        s = s._replace(proj=False)
        layer = rnnkit.RNNBase(mode, s.I, s.H, s.layers, dropout=s.dropout, bidirectional=s.bidirectional,
                               dtype=dtype)
    x = torch.randn(s.T, s.B, s.I, dtype=dtype, generator=generator)
    if s.packed:
        lengths = [max(1, s.T - i) for i in range(s.B)]
        x = rnnkit.pack_padded_sequence(x, lengths)
    state = ()
    if s.with_state:  # h_0 (L * D, B, H_out), and c_0 (L * D, B, H) for a cell that has one
        rows = s.layers * (2 if s.bidirectional else 1)
        shapes = [(rows, s.B, s.H // 2 if s.proj else s.H), (rows, s.B, s.H)][:CELLS[mode].state_size]
        state = tuple(torch.randn(shape, dtype=dtype, generator=generator) for shape in shapes)
    hx = None if not state else state[0] if len(state) == 1 else state
    with rnnkit.use_backend("fused"):
        layer.eval()
        with torch.no_grad():
            layer(x, hx)
        layer.train()
        for t in state:
            t.requires_grad_()
        out, _ = layer(x, hx)
        (out.data if s.packed else out).sum().backward()


def _run_cell(cls, kwargs: dict, B: int, dtype) -> None:
    import torch

    import rnnkit

    cell = cls(4, 8, dtype=dtype, **kwargs)
    x = torch.randn(B, 4, dtype=dtype)
    with rnnkit.use_backend("fused"):
        with torch.no_grad():
            cell(x)
        out = cell(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()


def _run_stream(mode: str, layers: int, dtype) -> None:
    """rnnkit.Stream over a stack of ``layers`` (the kernel compiles per padded depth: 1, 2, 3-4,
    5-8, ...; the shallow ones here)."""
    import torch

    import rnnkit

    layer = rnnkit.RNNBase(mode, 4, 8, layers, dtype=dtype)
    rnnkit.Stream(layer, batch_size=2)(torch.zeros(2, 4, dtype=dtype))
