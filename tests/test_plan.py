"""The bridge's contracts: the kernels' named argument bundles, the one walk, padded positions,
batched gradients through the fused nodes, and cells described by their declarations."""

from __future__ import annotations

import inspect

import pytest
import torch

import rnnkit
from oracle import CELL_KINDS, TOL, as_hx, assert_backends_agree, state_features, twins
from rnnkit import _plan, _run
from rnnkit._driver import Packing
from rnnkit.cells import CELLS, Dims
from rnnkit.kernels import driver
from routes import route_of


def test_kernel_bundles_name_every_loop_parameter():
    """Callers build the loops' arguments by name (driver.ForwardArgs, ...) and pass them
    unpacked: each bundle's fields are the leading parameters of its loops, in order."""
    templates = {name: getattr(driver, name) for name in driver.BUNDLES}
    for name, bundle in driver.BUNDLES.items():
        params = list(inspect.signature(templates[name]).parameters)
        assert params[:len(bundle._fields)] == list(bundle._fields), name
        assert not set(params[len(bundle._fields):]) & set(bundle._fields)


def test_modules_register_what_the_cell_declares():
    for mode, cell in CELLS.items():
        cls = getattr(rnnkit, cell.module)
        layer = cls(3, 5, 2, bidirectional=True, **cell.module_kwargs)
        names = [p.name for p in cell.declared(True, 0)]
        assert [n for n, _ in layer.named_parameters()] == [
            f"{n}_l{k}{s}" for k in range(2) for s in ("", "_reverse") for n in names]
        assert layer._cell.record._fields == tuple(p.name for p in cell.params)
        single = getattr(rnnkit, cell.module + "Cell")(3, 5, bias=False, **cell.module_kwargs)
        assert [n for n, _ in single.named_parameters()] == [p.name for p in cell.declared(False, 0)]
        assert single.bias_ih is None and single.bias_hh is None


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_padded_positions_are_zero_on_every_route(kind, backend):
    """Rows past their length are zero in the (padded, time-major) output on every route."""
    torch.manual_seed(0)
    _, m = twins(kind, torch.float64, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    lengths = [6, 4, 1]
    packing = Packing(torch.tensor([sum(n > t for n in lengths) for t in range(6)]))  # (batch_sizes)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    for grad in (False, True):
        with rnnkit.use_backend(backend), torch.set_grad_enabled(grad):
            out, _ = _run.run(m._cell, x, None, m._layer_params(x), 2, 2, 0.0, False, packing)
        for row, n in enumerate(lengths):
            assert torch.count_nonzero(out[n:, row]) == 0
            assert torch.count_nonzero(out[:n, row]) > 0


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("T", [1, 4])
def test_batched_gradients_through_the_fused_layers(kind, T):
    """torch.autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) through the
    fused nodes (PyTorch's own module test ``test_grad`` does the first): torch.nn's numbers."""
    torch.manual_seed(1)
    ref, m = twins(kind, torch.float64, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(T, 2, 3, dtype=torch.float64, requires_grad=True)
    with rnnkit.use_backend("fused"):
        assert route_of(m, x).fused
        out = m(x)[0]
    v = torch.randn(5, *out.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, x, v, is_grads_batched=True)
    (expected,) = torch.autograd.grad(ref(x)[0], x, v, is_grads_batched=True)
    torch.testing.assert_close(got, expected, **TOL[torch.float64])

    def ours(x):
        with rnnkit.use_backend("fused"):
            return m(x)[0]

    jac = torch.autograd.functional.jacobian(ours, x, vectorize=True)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda x: ref(x)[0], x, vectorize=True),
                               **TOL[torch.float64])


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("T,B", [(1, 2), (7, 3)])
def test_fused_and_reference_agree(kind, T, B):
    """The fused-vs-reference oracle (for cells torch.nn lacks) on torch.nn's own cells."""
    torch.manual_seed(2)
    _, m = twins(kind, torch.float64, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    leaves = [torch.randn(T, B, 3, dtype=torch.float64)] + [torch.randn(4, B, n, dtype=torch.float64)
                                                             for n in state_features(m)]
    assert_backends_agree(m, lambda x, *s: (x, as_hx(s)), leaves, torch.float64)


def test_route_needs_no_module():
    """The router takes a plain description: forcing the kernels on what they cannot run raises,
    before any kernel runs, naming what arrived."""
    cell = CELLS["GRU"]
    call = _plan.Call(cell, 1, 1, 5, 2, Dims(3, 4, 0, 3), torch.bfloat16, "cpu",
                      True, True, False, "fused")
    with pytest.raises(RuntimeError, match="does not support GRU with torch.bfloat16"):
        _plan.route(call)
    assert _plan.route(call._replace(backend="auto")) == _plan.Route("reference")
    assert _plan.route(call._replace(dtype=torch.float32)) == _plan.Route("sequence")
    assert _plan.route(call._replace(dtype=torch.float32, compiling=True)) == _plan.Route("compiled", True)
    assert _plan.route(call._replace(dtype=torch.float32, special="autocast")) == _plan.Route("reference")
