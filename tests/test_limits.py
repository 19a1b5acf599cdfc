"""Limits: very long sequences in memory proportional to T, a very large batch, and hidden
sizes that are no multiple of any vector width.

Peak memory is read from the kernel (VmHWM in /proc/self/status) in a fresh subprocess, since
torch allocates outside tracemalloc's sight. The T=100,000 training run takes about 30 s on the
reference path (its autograd graph has a dozen nodes per step), so it is marked slow there and
runs by default only on the fused kernels; `pytest --run-slow` runs it everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnkit
from backends import BACKENDS, backend_kind_params, supports
from oracle import CELL_KINDS, TOL, assert_same, flat, twins

KINDS = [k for k, (cls, _) in CELL_KINDS.items() if hasattr(rnnkit, cls)]
LONG_T, HIDDEN = 100_000, 64
# Bytes of peak memory growth allowed per element of T*B*H when training: 128 float32 values.
# The reference path needs about 100 (tanh) to 310 (GRU) bytes, mostly autograd's per-step
# bookkeeping; a kernel that saves only its activations needs a few tens.
BYTES_PER_ELEMENT = 512


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _train_once(kind: str, steps: int, batch: int) -> bool:
    torch.manual_seed(0)
    _, module = twins(kind, torch.float32, input_size=HIDDEN, hidden_size=HIDDEN)
    x = torch.randn(steps, batch, HIDDEN, requires_grad=True)
    out, h = module(x)
    states = h if isinstance(h, tuple) else (h,)
    (out.sum() + sum(s.sum() for s in states)).backward()
    grads = [x.grad, *(p.grad for p in module.parameters())]
    return all(bool(g.isfinite().all()) for g in grads)


def measure(kind: str, backend: str, batch: int, *steps: int) -> None:
    """Subprocess entry: peak memory growth of forward+backward at each T in ``steps``, in
    order, after a warm-up (JIT compilation) run, as JSON on stdout."""
    torch.set_num_threads(1)
    rnnkit.set_backend(backend)
    _train_once(kind, 2, batch)
    base = _vm_hwm_bytes()
    result = {"growth": [], "finite": []}
    for t in steps:
        result["finite"].append(_train_once(kind, t, batch))
        result["growth"].append(_vm_hwm_bytes() - base)
    print(json.dumps(result))


def _measure_in_subprocess(kind: str, backend: str, batch: int, *steps: int) -> dict:
    code = f"import test_limits; test_limits.measure({kind!r}, {backend!r}, {batch}, *{list(steps)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _long_params():
    params = []
    for p in backend_kind_params(["tanh", "gru"] + (["lstm"] if "lstm" in KINDS else [])):
        backend = p.values[0]
        marks = list(p.marks) + ([pytest.mark.slow] if backend == "reference" else [])
        params.append(pytest.param(*p.values, id=p.id, marks=marks))
    return params


@pytest.mark.parametrize("backend,kind", _long_params())
def test_training_on_100k_steps_fits_in_memory(backend, kind):
    result = _measure_in_subprocess(kind, backend, 1, LONG_T)
    assert result["finite"] == [True]
    growth = result["growth"][0]
    print(f"{backend} {kind}: T={LONG_T} B=1 H={HIDDEN}: peak +{growth / 2**20:.0f} MiB, "
          f"{growth / (LONG_T * HIDDEN):.0f} bytes per T*B*H element")
    assert growth <= BYTES_PER_ELEMENT * LONG_T * HIDDEN


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_memory_grows_linearly_with_sequence_length(backend):
    if not supports(backend, "gru"):
        pytest.skip(f"backend {backend} does not run gru")
    # The fused path runs long sequences in chunks of time whose buffers have a floor (see
    # rnnkit._loops.chunk_steps): compare lengths that are both past it, where memory is linear in T.
    short, long = (8_000, 32_000) if backend == "fused" else (2_000, 8_000)
    result = _measure_in_subprocess("gru", backend, 1, short, long)
    assert result["finite"] == [True, True]
    small, big = result["growth"]
    print(f"{backend} gru: T={short}: +{small / 2**20:.1f} MiB, T={long}: +{big / 2**20:.1f} MiB")
    assert big <= BYTES_PER_ELEMENT * long * HIDDEN
    # Four times the steps, about four times the memory: linear, not quadratic nor constant
    # (a constant would mean the measurement saw nothing). The slack covers allocator rounding.
    assert 2.5 * small <= big <= 5.5 * small


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_4096_matches_torch(kind, backend):
    if not supports(backend, kind):
        pytest.skip(f"backend {backend} does not run {kind}")
    torch.manual_seed(1)
    ref, ours = twins(kind, torch.float64, input_size=8, hidden_size=16, num_layers=2, bidirectional=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4096, 8, generator=gen, dtype=torch.float64)
    # float64: weight gradients sum 16,384 rows, more than float32's 1e-5 tolerance absorbs
    # when the two libraries add them in different orders.
    assert_same(ref, ours, lambda x: (x,), [x], torch.float64)
    ref, ours = ref.float(), ours.float()
    x = x.float().requires_grad_(True)
    ref_result, our_result = ref(x), ours(x)
    (ref_x_grad,) = torch.autograd.grad(flat(ref_result)[0].sum(), x)
    (our_x_grad,) = torch.autograd.grad(flat(our_result)[0].sum(), x)
    for got, expected in zip(flat(our_result) + [our_x_grad], flat(ref_result) + [ref_x_grad]):
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("hidden_size", [1, 3, 17, 33, 65])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_hidden_sizes_off_the_vector_width_match_torch(hidden_size, kind, dtype, backend):
    if not supports(backend, kind):
        pytest.skip(f"backend {backend} does not run {kind}")
    if CELL_KINDS[kind][1].get("proj_size", 0) >= hidden_size:
        pytest.skip("proj_size must be smaller than hidden_size")
    torch.manual_seed(hidden_size)
    ref, ours = twins(kind, dtype, input_size=hidden_size + 2, hidden_size=hidden_size, num_layers=2,
                      bidirectional=True)
    gen = torch.Generator().manual_seed(hidden_size)
    x = torch.randn(7, 5, hidden_size + 2, generator=gen, dtype=dtype)
    assert_same(ref, ours, lambda x: (x,), [x], dtype)
