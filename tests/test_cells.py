"""rnnkit.RNNCell / GRUCell against torch.nn's cells."""

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
    x = torch.randn(*shape, 4, dtype=dtype)
    h = torch.randn(*shape, 5, dtype=dtype) if give_h else None
    results = []
    for m in (ref, ours):
        xc = x.clone().requires_grad_(True)
        hc = h.clone().requires_grad_(True) if give_h else None
        out = m(xc, hc)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append([out.detach(), xc.grad, *([hc.grad] if give_h else []), *[p.grad for p in m.parameters()]])
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, **TOL[dtype])


def test_cell_state_dict_loads_into_torch():
    ours = rnnkit.GRUCell(3, 4)
    ref = nn.GRUCell(3, 4)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_cell_unrolled_equals_layer():
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 4).double()
    cell = rnnkit.GRUCell(3, 4).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    out, _ = layer(x)
    h = None
    for t in range(6):
        h = cell(x[t], h)
        torch.testing.assert_close(h, out[t], **TOL[torch.float64])
