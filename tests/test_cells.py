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
def test_cell_matches_torch(kind, give_h, batched, bias, dtype):
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
