"""The fused kernels: parity with torch.nn and with the reference, the backend switch, bounds."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit
from oracle import CELL_KINDS, TOL, as_hx, assert_same, state_features, twins
from rnnkit import _loops, _op, _plan, _run, _stack
from rnnkit.cells import CELLS
from routes import route_of


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("packed", [False, True])
def test_fused_equals_reference_on_long_odd_sequences(kind, packed):
    torch.manual_seed(5)
    _, m = twins(kind, torch.float64, input_size=7, hidden_size=13, num_layers=2, bidirectional=True)
    x = torch.randn(300, 6, 7, dtype=torch.float64)
    lengths = torch.tensor([300, 17, 299, 1, 150, 64])

    def run(backend):
        m.zero_grad()
        xc = x.clone().requires_grad_(True)
        inp = rnnkit.pack_padded_sequence(xc, lengths, enforce_sorted=False) if packed else xc
        with rnnkit.use_backend(backend):
            out, h = m(inp)
        out = out.data if packed else out
        states = h if isinstance(h, tuple) else (h,)
        (out.sin().sum() + sum(s.cos().sum() for s in states)).backward()
        return [out, *states, xc.grad, *[p.grad for p in m.parameters()]]

    for r, f in zip(run("reference"), run("fused")):
        torch.testing.assert_close(f, r, **TOL[torch.float64])


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_inference_runs_the_whole_stack_in_one_call(kind, packed, dtype, monkeypatch):
    """Without a gradient the fused backend runs every layer and direction in one call (the
    "sequence" route, not layer by layer); it equals torch.nn for stacked, bidirectional, ragged
    input with h_0 given."""
    torch.manual_seed(3)
    ref, m = twins(kind, dtype, input_size=5, hidden_size=11, num_layers=3, bidirectional=True,
                   batch_first=True)
    lengths = torch.tensor([9, 2, 9, 5])
    x = torch.randn(4, 9, 5, dtype=dtype)
    state = tuple(torch.randn(6, 4, n, dtype=dtype) for n in ((2, 11) if kind == "lstm-proj" else (11, 11)))
    hx = state if kind.startswith("lstm") else state[0]

    inp = rnnkit.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) if packed else x
    with rnnkit.use_backend("fused"), torch.no_grad():
        assert route_of(m, x, hx) == _plan.Route("sequence")
        out, h = m(inp, hx)
        expected_out, expected_h = ref(inp, hx)
    if packed:
        out, expected_out = out.data, expected_out.data
    torch.testing.assert_close(out, expected_out, **TOL[dtype])
    for a, b in zip(h if isinstance(h, tuple) else (h,), expected_h if isinstance(h, tuple) else (expected_h,)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_few_row_steps_use_the_weights_unpacked(kind, T, B, dtype, monkeypatch):
    """Calls of at most plain_max_row_steps row-steps (streaming steps) on the sequence route
    run their products on the weights as stored, the rest on packed ones: both equal torch.nn,
    outputs, states and every gradient, stacked and bidirectional, h_0 given, with weights large
    enough that the input projection splits its columns across threads. (The step route,
    which never packs, is kept out by limits; see test_training_steps_run_in_one_node.)"""
    torch.set_num_threads(2)
    plain = T * B <= _plan.LIMITS.plain_max_row_steps
    packs = []
    pack = _loops.pack_weights
    monkeypatch.setattr(_loops, "pack_weights", lambda b, trans: packs.append(b.shape) or pack(b, trans))
    torch.manual_seed(T * 10 + B)
    ref, m = twins(kind, dtype, input_size=37, hidden_size=21, num_layers=2, bidirectional=True)
    leaves = [torch.randn(T, B, 37, dtype=dtype)] + [torch.randn(4, B, n, dtype=dtype) for n in state_features(m)]

    def make_input(x, *states):
        return x, as_hx(states)

    # (thread even these sizes; no step route)
    with rnnkit.use_backend("fused"), _plan.limits(min_gemm_work_per_thread=1024, step_max_rows=0, step_max_work=-1):
        assert route_of(m, leaves[0]).path == "sequence"
        assert_same(ref, m, make_input, leaves, dtype)
    # W_ih and W_hh have gates * 21 rows; what else is packed (W_hr (2, 21), the few rows of
    # the weight gradients' right-hand sides) has fewer
    weights_packed = any(shape[0] >= 21 for shape in packs)
    assert weights_packed != plain


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("T,B", [(9, 1), (70, 1), (9, 3)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_few_rows_split_each_step_by_columns(kind, T, B, packed, dtype, monkeypatch):
    """A few batch rows with a large W_hh run each step's recurrent product on all threads, by
    bands of its columns (forward and backward), on W_hh as stored (one row, short) or packed:
    equal to torch.nn, stacked, bidirectional, h_0 given, packed (uneven lengths) or not, every
    gradient."""
    torch.set_num_threads(2)
    used = []
    column_threads = _plan.column_threads
    monkeypatch.setattr(_plan, "column_threads", lambda *a: used.append(column_threads(*a)) or used[-1])
    torch.manual_seed(4)
    ref, m = twins(kind, dtype, input_size=6, hidden_size=45, num_layers=2, bidirectional=True)
    leaves = [torch.randn(T, B, 6, dtype=dtype)] + [torch.randn(4, B, n, dtype=dtype) for n in state_features(m)]
    lengths = torch.tensor([T, T - 4, T - 1][:B])

    def make_input(x, *states):
        return (rnnkit.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x), as_hx(states)

    # (min_column_work 1: small weights take that path)
    with rnnkit.use_backend("fused"), _plan.limits(min_column_work=1, min_loop_work=1):
        assert_same(ref, m, make_input, leaves, dtype)
    assert used and set(used) == {2}


@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_lstm_projections_equal_reference_on_a_long_packed_sequence(batch_first):
    """The projecting driver path (m_t, h_t = W_hr m_t, dL/dW_hr) on ragged lengths, both
    directions, a stacked layer reading the projected output, every gradient incl. weight_hr."""
    torch.manual_seed(11)
    m = rnnkit.LSTM(5, 33, 2, bidirectional=True, proj_size=7, batch_first=batch_first).double()
    lengths = torch.tensor([120, 3, 119, 1, 60, 77, 120, 2, 45])
    x = torch.randn(len(lengths), 120, 5, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    h0 = torch.randn(4, len(lengths), 7, dtype=torch.float64)
    c0 = torch.randn(4, len(lengths), 33, dtype=torch.float64)

    def run(backend):
        m.zero_grad()
        leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        packed = rnnkit.pack_padded_sequence(leaves[0], lengths, batch_first=batch_first, enforce_sorted=False)
        with rnnkit.use_backend(backend):
            out, (h, c) = m(packed, tuple(leaves[1:]))
        (out.data.sin().sum() + h.cos().sum() + (c * c).sum()).backward()
        return [out.data, h, c, *[t.grad for t in leaves], *[p.grad for p in m.parameters()]]

    reference, fused = run("reference"), run("fused")
    assert sum(name.startswith("weight_hr") for name, _ in m.named_parameters()) == 4
    for r, f in zip(reference, fused):
        torch.testing.assert_close(f, r, **TOL[torch.float64])


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_fused_gradcheck(kind):
    torch.manual_seed(2)
    _, m = twins(kind, torch.float64, input_size=2, hidden_size=3, num_layers=2, bidirectional=True)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 1, 2])

    def f(x, *weights):
        packed = rnnkit.pack_padded_sequence(x, lengths, enforce_sorted=False)
        with rnnkit.use_backend("fused"):
            out, h = torch.func.functional_call(m, dict(zip(names, weights)), (packed,))
        return (out.data, *(h if isinstance(h, tuple) else (h,)))

    assert torch.autograd.gradcheck(f, (x, *m.parameters()))


def _module(mode: str, hidden: int, input_size: int = 1, **kwargs):
    cell = CELLS[mode]
    return getattr(rnnkit, cell.module)(input_size, hidden, **cell.module_kwargs, **kwargs)


def test_auto_uses_fused_for_cpu_float32_and_float64_only():
    x32 = torch.zeros(2, 1, 1)
    for mode in (mode for mode, cell in CELLS.items() if cell.kernels is not None):
        m = _module(mode, 4)
        assert route_of(m, x32).fused
        assert route_of(m.double(), x32.double()).fused
        assert not route_of(m.bfloat16(), x32.bfloat16()).fused


def test_inference_keeps_no_cell_states():
    """Without autograd the LSTM loop writes no per-step cell states (only backward reads them):
    c_seq has no rows, from the kernels and from the custom op's shape function alike."""
    rng = np.random.default_rng(0)
    T, B, I, H = 5, 3, 4, 6
    x, w_ih, w_hh = (rng.standard_normal(s).astype(np.float32) for s in ((T, B, I), (4 * H, I), (4 * H, H)))
    h0, c0 = np.zeros((B, H), np.float32), np.zeros((B, H), np.float32)
    steps = np.full(T, B, np.int64)
    p = CELLS["LSTM"].record(weight_ih=w_ih, weight_hh=w_hh)
    for training in (False, True):
        out, h_n, c_n, kept = _loops.forward(CELLS["LSTM"], steps, False, training, x, p, h0, c0)
        assert kept.c_seq.shape == (T if training else 0, B, H)
        fake = _op._layer_fake(torch.from_numpy(x), *(torch.from_numpy(a) for a in (h0, c0, steps)), "LSTM", False,
                               training, torch.from_numpy(w_ih), torch.from_numpy(w_hh), *(None,) * 6)
        assert tuple(fake[3].shape) == kept.c_seq.shape
        for f, a in zip(fake, (out, h_n, c_n, kept.c_seq, kept.saved, kept.m_seq)):
            assert tuple(f.shape) == a.shape
    torch.testing.assert_close(torch.from_numpy(out[-1]), torch.from_numpy(h_n))


@pytest.mark.parametrize("mode", ["RNN_TANH", "RNN_RELU", "GRU", "LSTM"])
def test_auto_runs_single_steps_where_they_run_faster(mode):
    """"auto" routes a single step (T = 1) in grad mode to the step route when its products are
    small or it has a few rows and W_hh fewer than step_max_weights values; otherwise a GRU step
    to the sequence route while W_hh has fewer than min_column_work values, an Elman step to the
    reference. In inference GRU steps run fused, Elman steps too unless their weights are small
    and their rows 5-8 (up to 4 rows on the step route); LSTM steps and sequences always fused
    (see _plan.LIMITS)."""
    lstm, gru = mode == "LSTM", mode == "GRU"
    limits = _plan.LIMITS
    column_hidden = math.isqrt((limits.min_column_work - 1) // CELLS[mode].gates)  # W_hh just below it
    small = _module(mode, 8).requires_grad_(True)

    def route(T, B, m=small):
        return route_of(m, torch.zeros(T, B, 1))

    assert route(1, 1) == _plan.Route("step")
    assert route(1, 16) == _plan.Route("step")  # (small products)
    for B in (1, 16, 64):
        assert route(2, B) == _plan.Route("sequence")
    assert route(1, 4, _module(mode, column_hidden)).path == "step"
    below, above = _module(mode, column_hidden), _module(mode, column_hidden + 1)
    assert route(1, 16, below).path == ("sequence" if lstm or gru else "reference")
    assert route(1, 16, above).path == ("sequence" if lstm else "reference")
    assert route(1, 1, _module(mode, 1024)).path == ("sequence" if lstm else "reference")
    with torch.no_grad():
        assert route(1, 1) == _plan.Route("step")
        assert route(1, 4) == _plan.Route("step")
        assert route(1, 1, _module(mode, 8, num_layers=2)) == _plan.Route("step")
        assert route(1, 5).path == ("sequence" if lstm or gru else "reference")
        assert route(1, 8).path == ("sequence" if lstm or gru else "reference")
        assert route(1, 9).path == "sequence"
        assert route(1, 1, _module(mode, 512)) == _plan.Route("step")
        assert route(2, 1) == _plan.Route("sequence")
        assert route(1, 1, _module(mode, 8, num_layers=2, dropout=0.5)) == _plan.Route("step", by_layer=True)
        assert route(1, 1, _module(mode, 8, proj_size=2) if lstm else small).path == ("sequence" if lstm else "step")
    with rnnkit.use_backend("fused"):  # forcing still forces
        assert route(1, 16, above).fused
    with rnnkit.use_backend("reference"):
        assert route(2, 4) == _plan.Route("reference")


@pytest.mark.parametrize("kind", ["tanh", "relu", "gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_single_inference_steps_run_in_one_call(kind, dtype, monkeypatch):
    """An inference step of up to 4 rows runs as one kernel call per layer-direction
    (_single_step) with the general path's numbers (the same products and cell math, compiled
    apart: equal to the last bit or so) and torch.nn's: with and without h_0 (and c_0), without
    biases, two layers, bidirectional, unbatched, batch_first; never for projections or more
    rows; output and h_n never share memory."""
    calls = []
    step_forward = _stack._step_forward
    monkeypatch.setattr(_stack, "_step_forward", lambda *a: calls.append(1) or step_forward(*a))
    torch.manual_seed(5)
    for B, bias, given, batch_first, layers, bidirectional in [
            (1, True, False, False, 1, False), (4, False, True, True, 1, False), (3, True, True, False, 1, False),
            (2, True, True, False, 2, False), (1, False, False, True, 1, True), (4, True, True, False, 2, True)]:
        ref, m = twins(kind, dtype, input_size=7, hidden_size=9, bias=bias, batch_first=batch_first,
                       num_layers=layers, bidirectional=bidirectional)
        x = torch.randn(B, 1, 7, dtype=dtype) if batch_first else torch.randn(1, B, 7, dtype=dtype)
        LD = layers * (2 if bidirectional else 1)
        h = torch.randn(LD, B, 9, dtype=dtype)
        hx = ((h, torch.randn(LD, B, 9, dtype=dtype)) if kind == "lstm" else h) if given else None
        with torch.no_grad(), rnnkit.use_backend("fused"):
            n = len(calls)
            assert route_of(m, x, hx) == _plan.Route("step")
            out, state = m(x, hx)
            assert len(calls) == n + 1
            assert out.data_ptr() != (state[0] if kind == "lstm" else state).data_ptr()
            with _plan.limits(step_max_rows=0):
                general = m(x, hx)
            assert len(calls) == n + 1
            expected = ref(x, hx)
        for a, g, e in zip(_flat((out, state)), _flat(general), _flat(expected)):
            torch.testing.assert_close(a, g, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=1e-7)
            torch.testing.assert_close(a, e, **TOL[dtype])
    with torch.no_grad(), rnnkit.use_backend("fused"):
        n = len(calls)
        rnnkit.LSTM(7, 9, proj_size=3).to(dtype)(torch.randn(1, 2, 7, dtype=dtype))
        rnnkit.RNN(7, 9).to(dtype)(torch.randn(1, 5, 7, dtype=dtype))
        assert len(calls) == n
    unbatched = torch.randn(1, 7, dtype=dtype)
    ref, m = twins(kind, dtype, input_size=7, hidden_size=9)
    with torch.no_grad(), rnnkit.use_backend("fused"):
        for a, e in zip(_flat(m(unbatched)), _flat(ref(unbatched))):
            torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("kind", ["tanh", "relu", "gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_training_steps_run_in_one_node(kind, dtype, monkeypatch):
    """A training step (T = 1) without projections, of a few rows or small products, runs on the
    step route (one autograd node, a kernel call per layer-direction each way) and equals torch.nn:
    outputs, final states and every gradient (input, h_0 / c_0, parameters), with and without
    h_0, without biases, stacked, bidirectional, batch_first, and with 8 rows of 128 (products
    on BLAS where it is bound); never with projections or larger products."""
    calls = []
    step_backward = _stack._step_backward
    monkeypatch.setattr(_stack, "_step_backward", lambda *a: calls.append(1) or step_backward(*a))
    torch.manual_seed(6)
    for B, I, H, bias, given, batch_first, layers, bidirectional in [
            (1, 7, 9, True, False, False, 1, False), (4, 7, 9, False, True, True, 1, False),
            (3, 7, 9, True, True, False, 2, False), (2, 7, 9, True, True, False, 2, True),
            (1, 7, 9, False, False, True, 1, True), (8, 64, 128, True, True, False, 1, False),
            (13, 5, 6, True, True, True, 2, True)]:
        ref, m = twins(kind, dtype, input_size=I, hidden_size=H, bias=bias, batch_first=batch_first,
                       num_layers=layers, bidirectional=bidirectional)
        LD = layers * (2 if bidirectional else 1)
        x = torch.randn(B, 1, I, dtype=dtype) if batch_first else torch.randn(1, B, I, dtype=dtype)
        states = [torch.randn(LD, B, n, dtype=dtype) if given else None for n in state_features(m)]
        n = len(calls)
        with rnnkit.use_backend("fused"):
            assert route_of(m, x) == _plan.Route("step")
            assert_same(ref, m, lambda x, *states: (x, as_hx(states)), [x, *states], dtype)
        assert len(calls) == n + 1
    n = len(calls)
    with rnnkit.use_backend("fused"):
        rnnkit.LSTM(7, 9, proj_size=3).to(dtype)(torch.randn(1, 2, 7, dtype=dtype))[0].sum().backward()
        rnnkit.RNN(256, 512).to(dtype)(torch.randn(1, 8, 256, dtype=dtype))[0].sum().backward()
    assert len(calls) == n


def _flat(result):
    out, state = result
    return [out, *(state if isinstance(state, tuple) else (state,))]


def test_other_dtypes_run_on_the_reference():
    m = rnnkit.GRU(3, 4).bfloat16()
    out, h = m(torch.randn(5, 2, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    with rnnkit.use_backend("fused"), pytest.raises(RuntimeError, match="does not support GRU with torch.bfloat16"):
        m(torch.randn(5, 2, 3, dtype=torch.bfloat16))


def test_use_backend_restores_the_choice():
    before = rnnkit.get_backend()
    with rnnkit.use_backend("reference"):
        assert rnnkit.get_backend() == "reference"
    assert rnnkit.get_backend() == before


@pytest.mark.parametrize("kind", ["gru", "lstm-proj"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_threaded_chunks_match_serial(batch, kind, monkeypatch):
    torch.set_num_threads(2)  # rnnkit uses no more threads than torch may (conftest pins one)
    torch.manual_seed(0)
    _, m = twins(kind, torch.float64, input_size=8, hidden_size=64)
    x = torch.randn(20, batch, 8, dtype=torch.float64)

    def run():
        m.zero_grad()
        out = m(x)[0]
        out.sin().sum().backward()
        return [out, *[p.grad for p in m.parameters()]]

    with rnnkit.use_backend("fused"):
        # split whenever possible, by rows (not by columns); then never
        with _plan.limits(min_work_per_thread=1, min_loop_work=1, min_column_work=10**12):
            split = run()
        with _plan.limits(min_work_per_thread=10**12, min_loop_work=10**12):
            serial = run()
    for s, r in zip(split, serial):
        torch.testing.assert_close(s, r, **TOL[torch.float64])


def test_threads_follow_torch_set_num_threads(monkeypatch):
    """torch.set_num_threads governs rnnkit's threads too: processes that each pin one thread
    must not get two busy numba threads each (on two cores they would stall one another)."""
    import numba
    from rnnkit.kernels import tiles

    calls = []
    monkeypatch.setattr(tiles, "_pack_threads", lambda *args: calls.append(args[-1]))
    big = np.ones((1024, 512), np.float32)
    torch.set_num_threads(1)
    assert _plan.chunks(10**6, 10**12, 1) == 1
    assert _loops.pack_weights(big, True).shape == (32, 512, 32) and not calls  # serial
    if numba.get_num_threads() >= 2:
        torch.set_num_threads(2)
        assert _plan.chunks(10**6, 10**12, 1) == 2
        _loops.pack_weights(big, True)
        assert calls == [2]


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("time_chunks", [3, 100])
def test_time_chunks_equal_one_pass(kind, packed, time_chunks, monkeypatch):
    """Long sequences run in chunks of time (the state and running gradient carried between
    kernel calls, the GEMMs per chunk, dL/dW_hh from the shifted outputs): same numbers as the
    reference, chunk lengths that do not divide T included, both directions, ragged lengths."""
    torch.manual_seed(3)
    _, m = twins(kind, torch.float64, input_size=5, hidden_size=6, num_layers=2, bidirectional=True)
    x = torch.randn(23, 5, 5, dtype=torch.float64)
    lengths = torch.tensor([23, 4, 22, 1, 9])
    _, h = m(x)
    h0 = [torch.randn_like(s) for s in (h if isinstance(h, tuple) else (h,))]

    def run(backend):
        m.zero_grad()
        leaves = [t.clone().requires_grad_(True) for t in (x, *h0)]
        inp = rnnkit.pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) if packed else leaves[0]
        state = tuple(leaves[1:]) if len(leaves) > 2 else leaves[1]
        with rnnkit.use_backend(backend):
            out, h = m(inp, state)
        out = out.data if packed else out
        states = h if isinstance(h, tuple) else (h,)
        (out.sin().sum() + sum(s.cos().sum() for s in states)).backward()
        return [out, *states, *[t.grad for t in leaves], *[p.grad for p in m.parameters()]]

    reference = run("reference")
    with _plan.limits(chunk_min_elements=0, chunk_rows=1, time_chunks=time_chunks):
        assert _loops.chunk_steps(23, 5, 6) == (8 if time_chunks == 3 else 1)
        fused = run("fused")
    for r, f in zip(reference, fused):
        torch.testing.assert_close(f, r, **TOL[torch.float64])


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("by_blas", [False, True], ids=["tiles", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_weight_gradients_either_way(kind, by_blas, dtype, monkeypatch):
    """The weight gradients by scipy's BLAS and by the transposed register tiles (which one runs
    by default depends on the BLAS's kernels, see kernels/blas.py) both equal torch.nn's,
    threaded (many rows: float64, where sums of 560 rows stay within the tolerance), in time
    chunks, for batch 1, and with the gradients' rows copied to padded ones."""
    if by_blas and not _loops.blas.AVAILABLE:
        pytest.skip("no scipy BLAS here")
    monkeypatch.setattr(_loops, "WEIGHT_GRADS_BY_BLAS", by_blas)
    torch.set_num_threads(2)  # threaded where it pays (conftest pins one thread, and rnnkit follows)
    torch.manual_seed(11)
    big = (14, 40, 48) if dtype == torch.float64 else (4, 6, 16)  # 560 rows: two blocks of the sums
    wide = 512 if dtype == torch.float64 else 1024  # rows of dL/dz 4 KiB-multiples long: copied padded
    for T, B, H, chunked in [(*big, False), (9, 1, 13, False), (23, 5, 6, True), (3, 2, wide, False)]:
        ref, m = twins(kind, dtype, input_size=21, hidden_size=H, num_layers=2, bidirectional=True)
        x = torch.randn(T, B, 21, dtype=dtype)
        grads = []
        for module in (ref, m):
            xc = x.clone().requires_grad_(True)
            with rnnkit.use_backend("fused") if module is m else torch.enable_grad(), \
                    _plan.limits(chunk_min_elements=0 if chunked else 1 << 20):
                out, _ = module(xc)
            out.sin().sum().backward()
            grads.append([xc.grad, *[p.grad for p in module.parameters()]])
        for r, f in zip(*grads):
            torch.testing.assert_close(f, r, **TOL[dtype])


BOUNDSCHECK_SCRIPT = r"""
import sys, torch, rnnkit
from torch import nn
from rnnkit import _loops, _plan
from rnnkit.kernels import tiles
rnnkit.set_backend("fused")
torch.set_num_threads(2)
torch.manual_seed(0)
CASES = [("RNN", {}, True), ("RNN", {"nonlinearity": "relu"}, False), ("GRU", {}, True),
         ("GRU", {}, False), ("LSTM", {}, True), ("LSTM", {"proj_size": 2}, False), ("LayerNormLSTM", {}, False),
         ("LayerNormGRU", {}, True)]
for cls, kw, by_blas in [CASES[int(i)] for i in sys.argv[1].split(",")]:
    _loops.WEIGHT_GRADS_BY_BLAS = by_blas  # both ways of the weight gradients
    tiles.PACK_THREADED_MIN = 1 if by_blas else 1 << 18  # and of packing the weights
    # time chunks too, and the threaded loops, their steps split by columns or by rows
    _plan.LIMITS = _plan.Limits(chunk_min_elements=0, chunk_rows=1, time_chunks=2, min_work_per_thread=1,
                                min_loop_work=1, min_column_work=1 if by_blas else 1 << 60)
    m = getattr(rnnkit, cls)(3, 4, 2, bidirectional=True, **kw).double()
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4, 1]), enforce_sorted=False)
    out, h = m(packed)
    out.data.sum().backward()
    with rnnkit.use_backend("reference"):  # (the oracle's own tests are elsewhere)
        ref_out, _ = m(packed)
    assert torch.allclose(out.data, ref_out.data, atol=1e-9), (cls, kw)
    m.recurrent_dropout, m.zoneout = 0.3, 0.2  # the regularizers' paths, training and eval
    for training in (True, False):
        again = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4, 1]), enforce_sorted=False)
        out, h = m.train(training)(again)
        out.data.sum().backward()
    m.recurrent_dropout = m.zoneout = 0.0
    for batch in (0, 1, 3, 6):
        for T in (1, 2):  # (T == 1: the step route)
            y, _ = m(torch.randn(T, batch, 3, dtype=torch.float64, requires_grad=True))
            y.sum().backward()
        with torch.no_grad():  # inference scratch, T == 1 included
            m(torch.randn(1, batch, 3, dtype=torch.float64))
            m(torch.randn(2, batch, 3, dtype=torch.float64))
    if "proj_size" not in kw and "LayerNorm" not in cls:  # a training step of 8 rows of 128: its products on BLAS
        m = getattr(rnnkit, cls)(64, 128, **kw)
        x = torch.randn(1, 8, 64, requires_grad=True)
        h = [torch.randn(1, 8, 128, requires_grad=True) for _ in range(2 if cls == "LSTM" else 1)]
        y, _ = m(x, tuple(h) if cls == "LSTM" else h[0])
        y.sum().backward()
print("ok")
"""


def test_kernel_cache_does_not_depend_on_the_checkout_path(tmp_path, monkeypatch):
    # A clean clone (CI) must find the kernels compiled by another checkout of the same sources:
    # rnnkit's kernels are filed by their folder in the package, anything else by numba's rules.
    import numba
    from rnnkit.kernels import config, tiles

    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    kernel = tiles._pack_serial.py_func
    locator = config._PackageCacheLocator.from_function(kernel, kernel.__code__.co_filename)
    assert locator.get_cache_path() == os.path.join(str(tmp_path), "kernels")
    assert config._PackageCacheLocator.from_function(test_fused_gradcheck, __file__) is None


def test_kernels_stay_in_bounds():
    """Every kernel under numba's bounds checking: the cells split over two processes, which
    compile on both cores at once, each in a cache of its own kept between runs (keyed, as the
    kernels' own cache, by a hash of the kernel sources: an edited kernel compiles again). The
    first run after a change waits about 8 minutes on this project's 2-core machines."""
    from rnnkit.kernels import config

    root = config.cache_dir().parent.parent / "boundscheck-test"
    current = config.cache_dir().name + "-boundscheck"
    procs = []
    for part, cases in enumerate(("0,2,3,7", "1,4,5,6")):  # (about half the compile time each)
        for old in (root / f"part{part}").glob("*"):  # (earlier sources' builds)
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)
        env = dict(os.environ, NUMBA_BOUNDSCHECK="1", RNNKIT_CACHE_DIR=str(root / f"part{part}"))
        procs.append(subprocess.Popen([sys.executable, "-c", BOUNDSCHECK_SCRIPT, cases], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.strip().endswith("ok")


def test_rnnkit_keeps_the_thread_count_torch_was_given():
    """numba's OpenMP layer shares torch's libgomp, and starting numba's threads sets its thread
    count: a torch.set_num_threads(1) made before importing rnnkit, or before its first call of
    a kernel that contains a parallel region, must still hold after it."""
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "import rnnkit\n"
        "assert torch.get_num_threads() == 1\n"
        "m = rnnkit.LSTM(5, 300)\n"
        "with torch.no_grad(), rnnkit.use_backend('fused'):\n"
        "    m(torch.randn(70, 3, 5))\n"  # B < 16, W_hh of 2^18 values or more: column threads
        "    m(torch.randn(1, 1, 5))\n"
        "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_torch_export_sees_one_op_per_layer_direction(kind):
    torch.manual_seed(0)
    _, m = twins(kind, input_size=3, hidden_size=6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    with rnnkit.use_backend("fused"):
        program = torch.export.export(m, (x,))
        eager = m(x)
    ops = [n for n in program.graph.nodes if n.target is torch.ops.rnnkit.layer.default]
    assert len(ops) == 4
    exported = program.module()(x)
    torch.testing.assert_close(exported[0], eager[0])


@pytest.mark.filterwarnings("ignore::UserWarning")  # (torch.compile's own, e.g. on the custom op's fake tensors)
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_in_place_change_of_a_compiled_layers_output(where):
    """The same under torch.compile (the custom op, whose output its backward reads), with the
    in-place ReLU inside the compiled function or after it."""
    ref, ours = twins("gru", torch.float64, input_size=3, hidden_size=5, num_layers=2)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    grads = []
    for module in (ref, ours):
        if where == "inside":
            def run(x, module=module):
                out, _ = module(x)
                return out.relu_()
            run = torch.compile(run, backend="aot_eager", fullgraph=True) if module is ours else run
            out = run(x)
        else:
            out, _ = (torch.compile(module, backend="aot_eager", fullgraph=True) if module is ours else module)(x)
            out.relu_()
        out.sin().sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for g, e in zip(*reversed(grads)):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_in_place_change_of_a_weight_backward_reads_raises():
    m = rnnkit.RNN(4, 8).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    with rnnkit.use_backend("fused"):
        out, _ = m(x)
        with torch.no_grad():
            m.weight_hh_l0.mul_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("layout", ["stack", "two layers", "bidirectional", "dropout", "packed", "one step"])
@pytest.mark.parametrize("change", ["relu_", "dropout", "+= residual"])
def test_in_place_change_of_the_output_gets_torch_gradients(kind, layout, change):
    """torch.nn.RNN/GRU (and its LSTM off oneDNN) let the caller change the returned output in
    place before backward (a ReLU or dropout in place, a residual added with +=): the fused
    nodes return a copy of the output their backward reads, and every gradient equals
    torch.nn's. Once more with retain_graph: a second backward agrees too."""
    kwargs = {"two layers": dict(num_layers=2), "bidirectional": dict(bidirectional=True),
              "dropout": dict(num_layers=2, dropout=0.4)}.get(layout, {})
    ref, ours = twins(kind, torch.float64, input_size=3, hidden_size=5, **kwargs)
    x = torch.randn(1 if layout == "one step" else 6, 4, 3, dtype=torch.float64)
    if layout == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, [6, 5, 3, 1])
    grads = []
    for module in (ref, ours):
        torch.manual_seed(0)  # the same dropout masks
        with rnnkit.use_backend("fused"):
            out, _ = module(x)
        data = out.data if layout == "packed" else out
        if change == "relu_":
            data.relu_()
        elif change == "dropout":
            nn.Dropout(0.5, inplace=True)(data)
        else:
            data += 0.5 * data.detach().flip(0)
        data.sin().sum().backward(retain_graph=True)
        first = [p.grad.clone() for p in module.parameters()]
        data.sin().sum().backward()
        grads.append((data.detach(), first, [p.grad for p in module.parameters()]))
    (e_out, e_first, e_second), (g_out, g_first, g_second) = grads
    torch.testing.assert_close(g_out, e_out, **TOL[torch.float64])
    for g, e in zip(g_first + g_second, e_first + e_second):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("layout", ["stack", "dropout", "packed", "one step"])
def test_double_backward_matches_torch(kind, layout):
    """create_graph=True through the fused nodes (the whole stack's, the single training step's,
    and the per-layer one that runs with dropout between layers): first and second derivatives
    equal torch.nn's, for the input, h_0 / c_0 and every parameter."""
    extra = {"dropout": 0.5} if layout == "dropout" else {}
    ref, ours = twins(kind, torch.float64, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, **extra)
    results = []
    for m in (ref, ours):
        torch.manual_seed(1)  # the same dropout masks
        x = torch.randn(1 if layout == "one step" else 5, 3, 3, dtype=torch.float64, requires_grad=True)
        states = [torch.randn(4, 3, n, dtype=torch.float64, requires_grad=True) for n in state_features(m)]
        inputs = [x, *states, *m.parameters()]
        hx = as_hx(states)
        with rnnkit.use_backend("fused"):
            if layout == "packed":
                packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
                out, h = m(packed, hx)
                out = out.data
            else:
                out, h = m(x, hx)
            h = h if isinstance(h, tuple) else (h,)
            loss = out.pow(2).sum() + sum(s.sin().sum() for s in h)
            first = torch.autograd.grad(loss, inputs, create_graph=True)
            penalty = sum(g.pow(2).sum() for g in first)
            second = torch.autograd.grad(penalty, inputs, allow_unused=True)
        results.append([*first, *second])
    for r, f in zip(*results):
        assert (r is None) == (f is None)
        if r is not None:
            torch.testing.assert_close(f, r, **TOL[torch.float64])


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("T", [1, 4])
def test_double_backward_when_the_state_depends_on_the_input(kind, T):
    """create_graph=True with h_0 (and c_0) computed from the input: the node counts only its own
    paths from x, as torch.nn's graph does (x's path through h_0 is the caller's graph's)."""
    ref, ours = twins(kind, torch.float64, input_size=3, hidden_size=4, num_layers=2)
    results = []
    x0 = torch.randn(T, 3, 3, dtype=torch.float64)
    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        states = [torch.tanh(x[0].sum(-1, keepdim=True) * torch.linspace(-1, 1, n, dtype=torch.float64)).expand(
            2, 3, n) for n in state_features(m)]
        with rnnkit.use_backend("fused"):
            out, h = m(x, as_hx(states))
            first = torch.autograd.grad(out.pow(2).sum(), [x, *m.parameters()], create_graph=True)
            second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), [x, *m.parameters()])
        results.append([*first, *second])
    for r, f in zip(*results):
        torch.testing.assert_close(f, r, **TOL[torch.float64])


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("layers,bidirectional,dropout", [(1, False, 0.0), (2, True, 0.0), (2, False, 0.3)])
def test_projection_weight_the_loss_never_reaches_has_no_grad(T, layers, bidirectional, dropout):
    """A loss on c_n alone after one step never reaches the last layer's W_hr: torch.nn leaves its
    grad None (an optimizer then skips it, while a zero grad would still decay it)."""
    ref, ours = twins("lstm-proj", input_size=3, hidden_size=4, num_layers=layers, bidirectional=bidirectional,
                      dropout=dropout)
    x = torch.randn(T, 2, 3)
    for m in (ref, ours):
        torch.manual_seed(0)
        with rnnkit.use_backend("fused"):
            _, (_, c) = m(x)
        c.sum().backward()
    for (name, r), (_, f) in zip(ref.named_parameters(), ours.named_parameters()):
        assert (r.grad is None) == (f.grad is None), name
        if r.grad is not None:
            torch.testing.assert_close(f.grad, r.grad, **TOL[torch.float32])


def test_gradgradcheck_through_the_kernels():
    m = rnnkit.LSTM(3, 4, proj_size=2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with rnnkit.use_backend("fused"):
        assert torch.autograd.gradgradcheck(lambda x, *p: m(x)[0], (x, *m.parameters()))


def test_mixed_dtypes_never_reach_the_kernels():
    """Under autocast the module skips its dtype check; the kernels take one dtype, so mixed
    ones are routed to the torch ops, which refuse them (instead of BLAS reading past a buffer)."""
    m = rnnkit.RNN(8, 16).double()
    x = torch.randn(4, 32, 8)  # float32 input, float64 weights
    call = _run.describe(m._cell, x, None, m._layer_params(x.double()), 1, 1, False)
    assert call.special == "mixed dtypes"
    with rnnkit.use_backend("fused"):
        assert _plan.route(call) == _plan.Route("reference")
        with pytest.raises(RuntimeError, match="must have the same dtype|expected .* same dtype"):
            _run.run(m._cell, x, None, m._layer_params(x.double()), 1, 1, 0.0, False, None)


def test_use_backend_is_local_to_the_thread():
    import threading

    seen = []
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen.append(rnnkit.get_backend())
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    before = rnnkit.get_backend()
    with rnnkit.use_backend("reference" if before != "reference" else "fused"):
        inside.set()
        done.wait()
    thread.join()
    assert seen == [before]


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_training_runs_the_whole_stack_as_one_node(kind, monkeypatch):
    """With a gradient and no inter-layer dropout the fused backend runs every layer and
    direction as one autograd node (the sequence route, not layer by layer); outputs, states and
    every gradient (input, h_0, all weights) equal torch.nn's on a stacked, bidirectional,
    ragged batch."""
    torch.manual_seed(5)
    dtype = torch.float64
    ref, m = twins(kind, dtype, input_size=4, hidden_size=6, num_layers=3, bidirectional=True)
    lengths = torch.tensor([7, 3, 7, 1])
    x = torch.randn(7, 4, 4, dtype=dtype)
    sizes = (2, 6) if kind == "lstm-proj" else (6, 6)
    state = [torch.randn(6, 4, n, dtype=dtype) for n in sizes]

    results = []
    for module in (ref, m):
        xc = x.clone().requires_grad_()
        hx = [s.clone().requires_grad_() for s in state]
        inp = rnnkit.pack_padded_sequence(xc, lengths, enforce_sorted=False)
        if module is m:
            with rnnkit.use_backend("fused"):
                assert route_of(m, xc) == _plan.Route("sequence")
        with rnnkit.use_backend("fused"):
            out, h = module(inp, tuple(hx) if kind.startswith("lstm") else hx[0])
        states = h if isinstance(h, tuple) else (h,)
        (out.data.sin().sum() + sum(s.cos().sum() for s in states)).backward()
        grads = [s.grad for s in hx[:len(states)]]
        results.append([out.data, *states, xc.grad, *grads, *[p.grad for p in module.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[dtype])


def test_weights_changed_between_calls_are_read_afresh():
    """The bridge keeps numpy views of the parameters between calls: updates through .data
    (no version bump), new storage behind .data, a transposed layout and a replaced
    Parameter all show in the next call's outputs."""
    torch.manual_seed(6)
    ref, m = twins("gru", torch.float32, input_size=3, hidden_size=5)
    x = torch.randn(4, 2, 3)

    def check():
        with rnnkit.use_backend("fused"), torch.no_grad():
            torch.testing.assert_close(m(x)[0], ref(x)[0], **TOL[torch.float32])

    check()
    for module in (ref, m):
        module.weight_hh_l0.data.mul_(0.5)
    check()
    new = torch.randn(15, 5)
    for module in (ref, m):
        module.weight_hh_l0.data = new.clone()
    check()
    square = torch.randn(15, 3)
    for module in (ref, m):
        module.weight_ih_l0.data = square.t().contiguous().t()  # same shape, strides of a transpose
    check()
    for module in (ref, m):
        module.bias_hh_l0 = torch.nn.Parameter(torch.randn(15))
        module.bias_hh_l0.data.copy_(ref.bias_hh_l0.data)
    check()


@pytest.mark.parametrize("kind", list(CELL_KINDS))
@pytest.mark.parametrize("grad", [False, True])
def test_final_states_are_laid_out_like_torch(kind, grad):
    """h_n (and c_n) of one layer-direction are views of the kernels' final-state arrays, with
    torch.nn's strides and shapes, and independent of the output and of later calls."""
    ref, ours = twins(kind, input_size=3, hidden_size=5)
    x = torch.randn(4, 2, 3)
    with torch.set_grad_enabled(grad):
        (_, ref_state), (out, state) = ref(x), ours(x)
    def states(s):
        return s if isinstance(s, tuple) else (s,)

    ref_state, state = states(ref_state), states(state)
    for r, s in zip(ref_state, state):
        assert s.shape == r.shape and s.stride() == r.stride()
    before = out.detach().clone()
    with torch.no_grad():
        state[0].fill_(7.0)
        again = states(ours(x)[1])
    assert torch.equal(out.detach(), before)
    torch.testing.assert_close(again[0], ref_state[0].detach())
