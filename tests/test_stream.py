"""rnnkit.Stream: a module served step by step equals the module run over the whole sequence."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}

LAYERS = {
    "tanh": ("RNN", {"nonlinearity": "tanh"}),
    "relu": ("RNN", {"nonlinearity": "relu"}),
    "gru": ("GRU", {}),
    "lstm": ("LSTM", {}),
    "lstm-proj": ("LSTM", {"proj_size": 3}),
}


def _layer(lib, kind, dtype=torch.float32, **kwargs):
    cls, extra = LAYERS[kind]
    torch.manual_seed(0)
    return getattr(lib, cls)(5, 6, **extra, **kwargs).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("lib", [nn, rnnkit], ids=["torch.nn", "rnnkit"])
def test_stream_equals_whole_sequence(lib, kind, layers, dtype):
    module = _layer(lib, kind, dtype, num_layers=layers)
    x = torch.randn(9, 3, 5, dtype=dtype)
    h0 = torch.randn(layers, 3, module.proj_size or 6, dtype=dtype)
    state = (h0, torch.randn(layers, 3, 6, dtype=dtype)) if kind.startswith("lstm") else h0
    with torch.no_grad():
        want, want_n = module(x, state)
    stream = rnnkit.Stream(module, batch_size=3)
    stream.state = state
    steps = [stream(x[t]) for t in range(4)]  # one step at a time (tensors) ...
    steps.append(torch.from_numpy(stream(x[4:7].numpy())))  # ... a chunk (arrays) ...
    steps.append(stream(x[7:]))  # ... a chunk (tensors)
    got = torch.cat([s.reshape(-1, 3, s.shape[-1]) for s in steps])
    torch.testing.assert_close(got, want, **TOL[dtype])
    for g, w in zip(stream.state if isinstance(stream.state, tuple) else (stream.state,),
                    want_n if isinstance(want_n, tuple) else (want_n,)):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("kind", ["tanh", "relu", "gru", "lstm"])
@pytest.mark.parametrize("lib", [nn, rnnkit], ids=["torch.nn", "rnnkit"])
def test_stream_of_a_cell_equals_the_cell_in_a_loop(lib, kind):
    cls, extra = LAYERS[kind]
    torch.manual_seed(0)
    cell = getattr(lib, cls + "Cell")(5, 6, **extra)
    x = torch.randn(6, 2, 5)
    stream = rnnkit.Stream(cell, batch_size=2)
    hx, want = None, []
    with torch.no_grad():
        for t in range(6):
            hx = cell(x[t], hx)
            want.append(hx[0] if isinstance(hx, tuple) else hx)
    got = [stream(x[t]) for t in range(6)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), **TOL[torch.float32])
    state = stream.state
    torch.testing.assert_close(state, hx, **TOL[torch.float32])  # (B, H): the cell's own layout


def test_stream_batch_first_and_unbatched():
    module = _layer(rnnkit, "gru", batch_first=True, num_layers=2)
    x = torch.randn(2, 7, 5)  # (B, T, I)
    with torch.no_grad():
        want, _ = module(x)
    stream = rnnkit.Stream(module, batch_size=2)
    first = stream(x[:, :3])  # a chunk, batch first
    rest = torch.stack([stream(x[:, t]) for t in range(3, 7)], 1)
    torch.testing.assert_close(torch.cat([first, rest], 1), want, **TOL[torch.float32])
    one = rnnkit.Stream(module, batch_size=1)
    with torch.no_grad():
        want1, _ = module(x[0])  # unbatched (T, I)
    torch.testing.assert_close(torch.stack([one(x[0, t]) for t in range(7)]), want1, **TOL[torch.float32])


def test_stream_reset_rows():
    module = _layer(rnnkit, "lstm", num_layers=2)
    x = torch.randn(5, 3, 5)
    stream = rnnkit.Stream(module, batch_size=3)
    for t in range(5):
        stream(x[t])
    before = stream.state
    stream.reset([1])
    h, c = stream.state
    assert h[:, 1].abs().sum() == 0 and c[:, 1].abs().sum() == 0
    torch.testing.assert_close(h[:, [0, 2]], before[0][:, [0, 2]])
    stream.reset(torch.tensor([True, False, False]))
    assert stream.state[0][:, 0].abs().sum() == 0 and stream.state[0][:, 2].abs().sum() > 0
    # a reset row starts afresh: its output equals a new stream's
    fresh = rnnkit.Stream(module, batch_size=3)
    torch.testing.assert_close(stream(x[0])[1], fresh(x[0])[1])
    stream.reset()
    assert all(s.abs().sum() == 0 for s in stream.state)
    stream(x[0])
    stream.state = None
    assert all(s.abs().sum() == 0 for s in stream.state)
    with pytest.raises(IndexError, match="row 3 is out of range for batch_size 3"):
        stream.reset([3])
    with pytest.raises(ValueError, match=r"row mask must have shape \(3,\)"):
        stream.reset(np.array([True, False]))


def test_stream_sees_weight_changes():
    """In-place updates (an optimizer's step), a replaced parameter and a converted module are
    all seen at the next call."""
    module = _layer(rnnkit, "gru")
    x = torch.randn(2, 5)
    stream = rnnkit.Stream(module, batch_size=2)

    def check():
        stream.reset()
        with torch.no_grad():
            want, _ = module(x.to(module.weight_ih_l0.dtype).unsqueeze(0))
        torch.testing.assert_close(stream(x.to(module.weight_ih_l0.dtype)), want[0], **TOL[module.weight_ih_l0.dtype])

    check()
    with torch.no_grad():
        module.weight_hh_l0.mul_(1.5)
    check()
    module.bias_ih_l0 = nn.Parameter(torch.randn(18))
    check()
    module.weight_ih_l0.data = torch.randn(18, 5)
    check()
    module.double()
    check()
    with pytest.raises(TypeError, match="input must be torch.float64"):
        stream(x)


def test_stream_refuses_bad_use():
    with pytest.raises(ValueError, match="bidirectional"):
        rnnkit.Stream(rnnkit.GRU(4, 5, bidirectional=True))
    with pytest.raises(TypeError, match="expected a recurrent layer or cell"):
        rnnkit.Stream(nn.Linear(4, 5))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        rnnkit.Stream(rnnkit.GRU(4, 5), batch_size=0)
    stream = rnnkit.Stream(rnnkit.LSTM(4, 5), batch_size=2)
    with pytest.raises(ValueError, match=r"expected one step \(B, I\) = \(2, 4\).*got \(3, 4\)"):
        stream(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        stream(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"got \(0, 2, 4\)"):
        stream(torch.randn(0, 2, 4))
    with pytest.raises(TypeError, match="input must be torch.float32.*got torch.float64"):
        stream(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be torch.float32.*got float64"):
        stream(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="torch tensor or a NumPy array"):
        stream([[0.0] * 4] * 2)
    with pytest.raises(ValueError, match=r"state h must have shape \(1, 2, 5\)"):
        stream.state = (torch.zeros(1, 3, 5), torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match=r"\(h, c\)"):
        stream.state = torch.zeros(1, 2, 5)


def test_stream_input_requiring_grad_runs_without_graph():
    module = _layer(rnnkit, "tanh")
    x = torch.randn(1, 5, requires_grad=True)
    y = rnnkit.Stream(module)(x)
    assert not y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(y, module(x.unsqueeze(0))[0][0])


def test_stream_falls_back_to_the_module_where_kernels_do_not_apply():
    module = _layer(nn, "gru").to(torch.bfloat16)
    x = torch.randn(4, 2, 5, dtype=torch.bfloat16)
    stream = rnnkit.Stream(module, batch_size=2)
    with torch.no_grad():
        want, want_n = module(x)
    got = torch.stack([stream(x[t]) for t in range(4)])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(stream.state, want_n, atol=0, rtol=0)
    stream.reset()
    assert stream.state.abs().sum() == 0


@pytest.mark.parametrize("layers", [3, 5])
def test_stream_of_a_deep_stack(layers):
    """Deeper stacks pass their layers padded to the kernel (to 4, to 8): the padding is unread."""
    module = _layer(rnnkit, "lstm-proj", num_layers=layers)
    x = torch.randn(4, 2, 5)
    with torch.no_grad():
        want, _ = module(x)
    stream = rnnkit.Stream(module, batch_size=2)
    torch.testing.assert_close(torch.stack([stream(x[t]) for t in range(4)]), want, **TOL[torch.float32])


def test_stream_follows_a_module_given_other_sizes():
    """Parameters replaced by ones of another hidden size (projections keep H_out): the state
    buffers follow (the kernel checks them too)."""
    module = torch.nn.LSTM(8, 16, proj_size=4).eval()
    stream = rnnkit.Stream(module, batch_size=2)
    x = torch.randn(2, 8)
    stream(x)
    bigger = torch.nn.LSTM(8, 32, proj_size=4)
    for name, p in bigger.named_parameters():
        setattr(module, name, nn.Parameter(p.detach().clone()))
    module.hidden_size = 32
    stream.reset()
    with torch.no_grad():
        want, _ = bigger(x.unsqueeze(0))
    torch.testing.assert_close(stream(x), want[0], **TOL[torch.float32])
    assert stream.state[1].shape == (1, 2, 32)


def test_stream_of_a_training_module_runs_as_in_eval_mode():
    module = _layer(rnnkit, "gru", num_layers=2, dropout=0.5).train()
    x = torch.randn(3, 2, 5)
    module.eval()
    with torch.no_grad():
        want, _ = module(x)
    module.train()
    torch.testing.assert_close(rnnkit.Stream(module, batch_size=2)(x), want, **TOL[torch.float32])
    assert module.training
    low = copy.deepcopy(module).to(torch.bfloat16)  # (where the kernels do not apply: the module runs)
    with torch.no_grad():
        want = low.eval()(x.bfloat16())[0]
    low.train()
    torch.testing.assert_close(rnnkit.Stream(low, batch_size=2)(x.bfloat16()), want, atol=0, rtol=0)
    assert low.training
