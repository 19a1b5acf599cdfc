"""rnnkit.RNNCell / GRUCell / LSTMCell against torch.nn's cells."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit
from oracle import TOL

CELLS = {
    "tanh": lambda mod, **kw: mod.RNNCell(**kw, nonlinearity="tanh"),
    "relu": lambda mod, **kw: mod.RNNCell(**kw, nonlinearity="relu"),
    "gru": lambda mod, **kw: mod.GRUCell(**kw),
    "lstm": lambda mod, **kw: mod.LSTMCell(**kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("give_h", [True, False])
@pytest.mark.parametrize("kind", CELLS)
def test_cell_matches_torch(kind, give_h, batched, bias, dtype, backend):
    torch.manual_seed(0)
    ref = CELLS[kind](nn, input_size=4, hidden_size=5, bias=bias).to(dtype)
    ours = CELLS[kind](rnnkit, input_size=4, hidden_size=5, bias=bias).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    if not bias:
        assert ours.bias_ih is None and ours.bias_hh is None
    shape = (3,) if batched else ()
    n_states = 2 if kind == "lstm" else 1  # hx is h, or the tuple (h, c)
    x = torch.randn(*shape, 4, dtype=dtype)
    states = [torch.randn(*shape, 5, dtype=dtype) for _ in range(n_states)] if give_h else []
    results = []
    for m in (ref, ours):
        xc = x.clone().requires_grad_(True)
        sc = [s.clone().requires_grad_(True) for s in states]
        hx = None if not give_h else sc[0] if n_states == 1 else tuple(sc)
        out = m(xc, hx)
        outs = list(out) if isinstance(out, tuple) else [out]
        assert len(outs) == n_states
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum() for o in outs)
        loss.backward()
        results.append([*(o.detach() for o in outs), xc.grad, *(s.grad for s in sc), *[p.grad for p in m.parameters()]])
    assert len(results[0]) == len(results[1])
    for r, o in zip(*results):
        assert r.shape == o.shape
        torch.testing.assert_close(o, r, **TOL[dtype])


@pytest.mark.parametrize("cls", ["GRUCell", "LSTMCell"])
def test_cell_state_dict_loads_into_torch(cls):
    ours = getattr(rnnkit, cls)(3, 4)
    ref = getattr(nn, cls)(3, 4)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3)
    torch.testing.assert_close(ours(x), ref(x))  # h' or (h', c')


@pytest.mark.parametrize("cls", ["GRU", "LSTM"])
def test_cell_unrolled_equals_layer(cls):
    torch.manual_seed(0)
    layer = getattr(rnnkit, cls)(3, 4).double()
    cell = getattr(rnnkit, cls + "Cell")(3, 4).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    out, state_n = layer(x)
    hx = None
    for t in range(6):
        hx = cell(x[t], hx)
        h = hx[0] if isinstance(hx, tuple) else hx
        torch.testing.assert_close(h, out[t], **TOL[torch.float64])
    torch.testing.assert_close(hx, state_n[0] if cls == "GRU" else tuple(s[0] for s in state_n), **TOL[torch.float64])


# ---- the cells on the kernels (rnnkit._cell): a loop of steps, as attention decoders and RL
# agents run them, trained through the whole loop; torch.nn is the oracle.
def _loop(module, xs, hx, modify=False):
    outs = []
    for x in xs:
        hx = module(x, hx)
        h = hx[0] if isinstance(hx, tuple) else hx
        if modify and not isinstance(hx, tuple):  # (an Elman or GRU h changed in place needs a copy first)
            hx = hx.clone()
        outs.append(h)
    return torch.stack(outs), hx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", CELLS)
def test_cell_loop_trains_as_torch(kind, dtype, backend):
    torch.manual_seed(1)
    ref = CELLS[kind](nn, input_size=6, hidden_size=7).to(dtype)
    ours = CELLS[kind](rnnkit, input_size=6, hidden_size=7).to(dtype)
    ours.load_state_dict(ref.state_dict())
    xs = torch.randn(5, 3, 6, dtype=dtype)
    h0 = torch.randn(3, 7, dtype=dtype)
    results = []
    for m in (ref, ours):
        x = xs.clone().requires_grad_()
        h = h0.clone().requires_grad_()
        hx = (h, h * 0.5) if kind == "lstm" else h
        out, last = _loop(m, x, hx)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum()
        loss = loss + (last[1].sum() if isinstance(last, tuple) else 0)
        loss.backward()
        results.append([out.detach(), x.grad, h.grad, *[p.grad for p in m.parameters()]])
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, **TOL[dtype])


@pytest.mark.parametrize("kind", CELLS)
def test_cell_inference_loop_sees_in_place_changes(kind):
    """A state the cell returned and the caller changed in place goes back in with the change
    (the kernels read the returned tensor's own memory), and so do the weights."""
    torch.manual_seed(2)
    ref = CELLS[kind](nn, input_size=4, hidden_size=5)
    ours = CELLS[kind](rnnkit, input_size=4, hidden_size=5)
    ours.load_state_dict(ref.state_dict())
    xs = torch.randn(4, 2, 4)
    results = []
    with torch.no_grad():
        for m in (ref, ours):
            hx, outs = None, []
            for t, x in enumerate(xs):
                hx = m(x, hx)
                for s in (hx if isinstance(hx, tuple) else (hx,)):
                    s.mul_(0.5)
                if t == 1:
                    m.weight_hh.mul_(0.9)
                outs.append(hx[0].clone() if isinstance(hx, tuple) else hx.clone())
            results.append(torch.stack(outs))
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])


def _float64_twins(kind: str):
    """torch.nn's cell and ours of ``kind``, float64, the same weights."""
    ref = CELLS[kind](nn, input_size=3, hidden_size=4).double()
    ours = CELLS[kind](rnnkit, input_size=3, hidden_size=4).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("steps", [1, 2])
def test_cell_double_backward_and_batched_grads(kind, steps):
    """Gradient penalties (create_graph) and batched vector-Jacobian products go through the
    torch-ops step's gradients, equal to torch.nn's; with two steps the second's state is
    computed from x, and each node counts only its own paths, as torch.nn's graph does."""
    torch.manual_seed(3)
    dtype = torch.float64
    ref, ours = _float64_twins(kind)
    x0 = torch.randn(2, 3, dtype=dtype)
    results = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_()
        out = m(x) if steps == 1 else m(x, m(x))
        h = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(h.pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        v = torch.eye(h.numel(), dtype=dtype).view(-1, *h.shape)
        x2 = x0.clone().requires_grad_()
        out2 = m(x2)
        h2 = out2[0] if isinstance(out2, tuple) else out2
        (jac,) = torch.autograd.grad(h2, x2, v, is_grads_batched=True)
        results.append([g.detach(), x.grad, *[p.grad for p in m.parameters()], jac])
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, **TOL[dtype])


def test_cell_input_changed_in_place_raises_as_torch():
    for lib in (nn, rnnkit):
        cell = lib.GRUCell(3, 4)
        x = torch.randn(2, 3)
        h = torch.randn(2, 4, requires_grad=True)
        out = cell(x, h)
        with torch.no_grad():
            h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_lstm_cell_output_changed_in_place_backward_as_torch():
    """torch.nn's LSTMCell lets the caller change h' in place before backward (nothing saved
    reads it); so does rnnkit's (the kernels keep their own copy)."""
    grads = []
    for lib in (nn, rnnkit):
        torch.manual_seed(4)
        cell = lib.LSTMCell(3, 4)
        x = torch.randn(2, 3, requires_grad=True)
        h, c = cell(x)
        h.mul_(3)
        (h.sum() + c.sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_cell_routes():
    from rnnkit import _cell, _plan
    from rnnkit.cells import CELLS as REGISTRY

    cell = rnnkit.LSTMCell(8, 16)
    lstm = REGISTRY["LSTM"]
    params = cell._params(lstm)
    x = torch.randn(2, 8)
    assert _cell.route(lstm, x, None, params).path == "cell"
    with _plan.limits(cell_max_rows=1, cell_max_weights=0):
        assert _cell.route(lstm, x, None, params).path == "native"  # (2 rows)
    assert _cell.route(lstm, x.requires_grad_(), None, params).path == "cell"
    elman = REGISTRY["RNN_TANH"]
    assert _cell.route(elman, x, None, rnnkit.RNNCell(8, 16)._params(elman)).path == "native"  # (training)
    x = x.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cell.route(lstm, x, None, params).path == "reference"
    with rnnkit.use_backend("reference"):
        assert _cell.route(lstm, x, None, params).path == "reference"
    torch.set_num_threads(2)
    with _plan.limits(cell_max_threaded_work=0):
        assert _cell.route(lstm, x, None, params).path == ("native" if _plan.threads() > 1 else "cell")
        with rnnkit.use_backend("fused"):
            assert _cell.route(lstm, x, None, params).path == "cell"
    bf16 = rnnkit.GRUCell(8, 16).to(torch.bfloat16)
    assert _cell.route(REGISTRY["GRU"], x.bfloat16(), None, bf16._params(REGISTRY["GRU"])).path == "native"
    ref = nn.GRUCell(8, 16).to(torch.bfloat16)
    ref.load_state_dict(bf16.state_dict())
    torch.testing.assert_close(bf16(x.bfloat16()), ref(x.bfloat16()), atol=0, rtol=0)
