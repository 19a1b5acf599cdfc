"""The short paths (rnnkit._run.layer_fast, rnnkit._cell.step_fast): a call like an earlier one
skips the module's checks and routing, and still gives torch.nn's results after anything a
program may change between calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit
from oracle import TOL

F64 = torch.float64


def _twins(cls, *args, **kwargs):
    torch.manual_seed(0)
    ref = getattr(nn, cls)(*args, **kwargs).double()
    ours = getattr(rnnkit, cls)(*args, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _call(module, x, hx=None):
    module.zero_grad(set_to_none=True)
    out = module(x, hx) if hx is not None else module(x)
    result = out[0] if isinstance(out, tuple) and not isinstance(out[0], tuple) else out
    first = result if isinstance(result, torch.Tensor) else result[0]
    if torch.is_grad_enabled() and first.requires_grad:
        first.sum().backward()
    return [first.detach()] + [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, **TOL[F64])


@pytest.mark.parametrize("cls, args", [("GRU", (4, 5)), ("LSTM", (4, 5)), ("GRUCell", (4, 5)), ("LSTMCell", (4, 5))])
def test_changes_between_calls_are_seen(cls, args):
    ref, ours = _twins(cls, *args)
    cell = cls.endswith("Cell")
    x = torch.randn(3, 4, dtype=F64) if cell else torch.randn(1, 3, 4, dtype=F64)
    changes = [
        lambda m: None,
        lambda m: m.requires_grad_(False),  # frozen: no gradients
        lambda m: m.requires_grad_(True),
        lambda m: torch.nn.init.zeros_(next(m.parameters()).data),  # in place through .data
        lambda m: setattr(m, next(iter(dict(m.named_parameters()))),
                          nn.Parameter(torch.randn_like(next(m.parameters())))),
        lambda m: m.eval(),
        lambda m: m.train(),
    ]
    _replay(ref, ours, changes, x, [None])


def _replay(ref, ours, changes, x, states):
    """Each change made to both modules, then each state's call twice (the second takes the
    short path), with and without gradients, compared."""
    for change in changes:
        torch.manual_seed(1)
        change(ref)
        torch.manual_seed(1)
        change(ours)
        ours.load_state_dict(ref.state_dict())
        for _ in range(2):
            for h in states:
                _same(_call(ref, x, h), _call(ours, x, h))
                with torch.no_grad():
                    _same(_call(ref, x, h), _call(ours, x, h))


def test_a_subclass_forward_and_hooks_still_run():
    class Doubled(rnnkit.GRU):
        def forward(self, input, hx=None):
            out, h = super().forward(input, hx)
            return out * 2, h

    m = Doubled(4, 5)
    x = torch.randn(2, 3, 4)
    plain = rnnkit.GRU(4, 5)
    plain.load_state_dict(m.state_dict())
    for _ in range(3):
        torch.testing.assert_close(m(x)[0], plain(x)[0] * 2)
    seen = []
    plain.register_forward_hook(lambda mod, inp, out: seen.append(1))
    for _ in range(3):
        plain(x)
    assert len(seen) == 3
    cell = rnnkit.LSTMCell(4, 5)
    cell.register_forward_pre_hook(lambda mod, inp: seen.append(2))
    with torch.no_grad():
        for _ in range(3):
            cell(x[0])
    assert seen.count(2) == 3


def test_layer_inputs_of_other_kinds_take_the_full_path():
    ref, ours = _twins("LSTM", 4, 5, batch_first=True)
    x = torch.randn(2, 3, 4, dtype=F64)
    for _ in range(2):
        _same(_call(ref, x), _call(ours, x))
    h = (torch.randn(1, 2, 5, dtype=F64), torch.randn(1, 2, 5, dtype=F64))
    for _ in range(2):
        _same(_call(ref, x, h), _call(ours, x, h))
    _same(_call(ref, x[0]), _call(ours, x[0]))  # unbatched
    with pytest.raises(RuntimeError):
        ours(x, (h[0], h[1][:, :1]))  # a wrong state shape still raises
    with pytest.raises(ValueError, match="does not match weight dtype"):
        ours(x.float())  # and a wrong dtype


def test_a_parameter_reshaped_in_place_is_checked_again():
    """Same memory, another shape: the full path's check raises (the kernels never see it)."""
    m = rnnkit.GRU(4, 8)
    x = torch.randn(5, 2, 4)
    m(x)
    m(x)
    with torch.no_grad():
        m.weight_hh_l0.data = m.weight_hh_l0.data[:12]
    with pytest.raises(RuntimeError, match=r"weight_hh_l0 has shape \(12, 8\), expected \(24, 8\)"):
        m(x)


@pytest.mark.parametrize("cls", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cell_weights_not_contiguous_and_states_given_new_memory(cls):
    ref, ours = _twins(cls, 6, 6)
    for m in (ref, ours):
        with torch.no_grad():
            m.weight_hh.data = m.weight_hh.data.t().contiguous().t()  # (a transposed layout)
    x = torch.randn(3, 6, dtype=F64)
    with torch.no_grad():
        for step in range(4):
            outs = []
            for m in (ref, ours):
                torch.manual_seed(step)
                h = m(x)
                h = m(x, h)
                first = h[0] if isinstance(h, tuple) else h
                first.data = torch.randn_like(first)  # (a state given new memory)
                outs.append(m(x, h))
                m.weight_hh.mul_(0.5)  # (an update the next step must see)
            _same([o[0] if isinstance(o, tuple) else o for o in outs[:1]],
                  [o[0] if isinstance(o, tuple) else o for o in outs[1:]])


def test_cell_bias_added_or_removed_later():
    ref, ours = _twins("GRUCell", 4, 5, bias=False)
    x = torch.randn(2, 4, dtype=F64)
    with torch.no_grad():
        for m in (ref, ours):
            m(x)
            m(x)
        bias = nn.Parameter(torch.randn(15, dtype=F64))
        ref.bias_ih, ours.bias_ih = bias, bias
        torch.testing.assert_close(ours(x), ref(x), **TOL[F64])
        ref.bias_ih = ours.bias_ih = None
        torch.testing.assert_close(ours(x), ref(x), **TOL[F64])


def test_short_paths_forget_deleted_modules():
    import gc
    import weakref

    from rnnkit import _cell, _run

    cell, layer = rnnkit.LSTMCell(4, 5), rnnkit.GRU(4, 5)
    with torch.no_grad():
        for _ in range(2):
            cell(torch.randn(2, 4))
            layer(torch.randn(3, 2, 4))
    keys = id(cell), id(layer)
    assert keys[0] in _cell._FAST and keys[1] in _run._KNOWN
    weight = weakref.ref(layer.weight_hh_l0)
    del cell, layer
    gc.collect()
    assert keys[0] not in _cell._FAST and keys[1] not in _run._KNOWN and weight() is None


NATIVE = dict(cell_max_rows=0, cell_max_weights=0)  # (every cell step on torch.nn's op)


@pytest.mark.parametrize("cls, kwargs", [("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}), ("GRUCell", {}),
                                         ("LSTMCell", {}), ("LSTMCell", {"bias": False})])
def test_cell_steps_on_torch_nn_op_take_the_short_path(cls, kwargs):
    """The short path on torch.nn's op reads the parameters as they are at each call."""
    from rnnkit import _cell, _plan

    ref, ours = _twins(cls, 4, 5, **kwargs)
    x = torch.randn(3, 4, dtype=F64)
    state = torch.randn(3, 5, dtype=F64)
    hx = (state, state.flip(0)) if cls == "LSTMCell" else state
    changes = [
        lambda m: None,
        lambda m: m.requires_grad_(False),
        lambda m: m.requires_grad_(True),
        lambda m: torch.nn.init.zeros_(next(m.parameters()).data),
        lambda m: setattr(m, "weight_hh", nn.Parameter(torch.randn_like(m.weight_hh))),
    ]
    with _plan.limits(**NATIVE):
        _replay(ref, ours, changes, x, [None, hx])
        routes = {route[0] for route in _cell._FAST[id(ours)].routes.values()}
    assert routes == {"native"}


@pytest.mark.parametrize("native", [False, True])
def test_cell_frozen_without_biases_in_grad_mode(native):
    from rnnkit import _plan

    ref, ours = _twins("GRUCell", 4, 5, bias=False)
    for m in (ref, ours):
        m.requires_grad_(False)
    x = torch.randn(2, 4, dtype=F64)
    with _plan.limits(**(NATIVE if native else {})):
        for _ in range(3):
            out = ours(x)
            assert not out.requires_grad
            torch.testing.assert_close(out, ref(x), **TOL[F64])
        x.requires_grad_(True)
        for _ in range(2):
            _same(_call(ref, x), _call(ours, x))


@pytest.mark.parametrize("native", [False, True])
def test_cell_parameter_deleted_then_added_again(native):
    from rnnkit import _plan

    ref, ours = _twins("RNNCell", 4, 5)
    x = torch.randn(2, 4, dtype=F64)
    with torch.no_grad(), _plan.limits(**(NATIVE if native else {})):
        for m in (ref, ours):
            m(x)
            m(x)
            del m.bias_hh
        ours.register_parameter("bias_hh", None)  # (torch.nn's op needs the name; ours takes either)
        ref.register_parameter("bias_hh", None)
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x), **TOL[F64])
        bias = nn.Parameter(torch.randn(5, dtype=F64))
        ref.bias_hh = ours.bias_hh = bias
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x), **TOL[F64])
        ours.register_parameter("extra", nn.Parameter(torch.zeros(1, dtype=F64)))  # (not the cell's)
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x), **TOL[F64])


def test_a_cell_subclass_forward_still_runs():
    class Halved(rnnkit.LSTMCell):
        def forward(self, input, hx=None):
            h, c = super().forward(input, hx)
            return h / 2, c

    m = Halved(4, 5)
    plain = rnnkit.LSTMCell(4, 5)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for _ in range(3):
                torch.testing.assert_close(m(x)[0], plain(x)[0] / 2)


@pytest.mark.parametrize("grad", [False, True])
def test_a_cell_parameter_given_another_layout_of_its_memory(grad):
    """Same memory and object, another shape or strides: the full path checks it again."""
    ref, ours = _twins("RNNCell", 6, 6)
    x = torch.randn(2, 6, dtype=F64)
    with torch.set_grad_enabled(grad):
        for m in (ref, ours):
            m(x)
            m(x)
            m.weight_hh.data = m.weight_hh.data.t()  # (W_hh^T: square, in the same memory)
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x), **TOL[F64])
        ours.weight_hh.data = ours.weight_hh.data[:3]  # (ours, or on torch.nn's op torch.nn's message)
        with pytest.raises(RuntimeError, match=r"weight_hh has shape \(3, 6\)|weight_hh first dim must be"):
            ours(x)


def test_a_cell_parameter_removed_and_another_registered():
    ref, ours = _twins("RNNCell", 4, 5)
    x = torch.randn(2, 4, dtype=F64)
    with torch.no_grad():
        for m in (ref, ours):
            m(x)
            m(x)
            del m.bias_hh
            m.register_parameter("bias_hh", None)
        del ours.bias_ih  # (one removed and another registered: as many parameters as before)
        ours.register_parameter("extra", nn.Parameter(torch.zeros(1, dtype=F64)))
        ref.bias_ih = None
        torch.testing.assert_close(ours(x), ref(x), **TOL[F64])
