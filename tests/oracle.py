"""torch.nn as the oracle: build twin modules, run both on the same inputs, compare everything."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-9, rtol=1e-9)}

# (class name, extra constructor kwargs): every cell the layers support.
CELL_KINDS = {
    "tanh": ("RNN", {"nonlinearity": "tanh"}),
    "relu": ("RNN", {"nonlinearity": "relu"}),
    "gru": ("GRU", {}),
    "lstm": ("LSTM", {}),
    "lstm-proj": ("LSTM", {"proj_size": 2}),  # needs hidden_size > 2
}


def twins(kind: str, dtype=torch.float32, **kwargs):
    """(torch.nn module, rnnkit module) with identical weights, loaded strictly from torch.nn."""
    cls, extra = CELL_KINDS[kind]
    ref = getattr(nn, cls)(**extra, **kwargs).to(dtype)
    ours = getattr(rnnkit, cls)(**extra, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def state_features(module) -> list[int]:
    """Feature size of each recurrent state tensor of a layer module: [H_out] or, for an LSTM,
    [H_out, hidden_size] (h, then c), with H_out = proj_size if proj_size > 0 else hidden_size."""
    h_out = module.proj_size if module.proj_size > 0 else module.hidden_size
    return [h_out, module.hidden_size] if module.mode == "LSTM" else [h_out]


def as_hx(states):
    """The module's hx argument from its state tensors: None, h_0, or (h_0, c_0)."""
    if states[0] is None:
        return None
    return states[0] if len(states) == 1 else tuple(states)


def flat(result):
    """All tensors of a module's result, PackedSequence data included, in a fixed order."""
    out, h = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return [out, *(h if isinstance(h, tuple) else (h,))]


def run_with_grads(module, make_input, leaves, seed=0):
    """Forward on fresh copies of ``leaves``, backward of a random projection of every output.

    Returns the outputs and the gradients of every leaf and every parameter.
    """
    copies = [leaf.detach().clone().requires_grad_(True) if leaf is not None else None for leaf in leaves]
    outputs = flat(module(*make_input(*copies)))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    loss.backward()
    grads = [c.grad for c in copies if c is not None]
    grads += [p.grad for p in module.parameters()]
    return [o.detach() for o in outputs], grads


def assert_same(ref_module, our_module, make_input, leaves, dtype):
    ref_out, ref_grads = run_with_grads(ref_module, make_input, leaves)
    our_out, our_grads = run_with_grads(our_module, make_input, leaves)
    assert len(ref_out) == len(our_out)
    for r, o in zip(ref_out, our_out):
        assert r.shape == o.shape
        torch.testing.assert_close(o, r, **TOL[dtype])
    assert len(ref_grads) == len(our_grads)
    for r, o in zip(ref_grads, our_grads):
        assert (r is None) == (o is None)
        if r is not None:
            torch.testing.assert_close(o, r, **TOL[dtype])


def raised(call, namespace) -> pytest.ExceptionInfo:
    """The exception ``call(namespace)`` raises (namespace: torch.nn or rnnkit)."""
    with pytest.raises(Exception) as info:
        call(namespace)
    return info


def assert_same_error(call) -> None:
    """``call`` raises the same exception type and message with rnnkit as with torch.nn."""
    expected, got = raised(call, nn), raised(call, rnnkit)
    assert got.type is expected.type
    assert str(got.value) == str(expected.value)


def assert_backends_agree(module, make_input, leaves, dtype, seed=0):
    """The oracle for what torch.nn lacks (rnnkit's own options and cells): the fused route and
    the torch-ops reference give the same outputs and every gradient (same seed, so the same
    random draws), and each route actually ran (``rnnkit._plan.route`` is asked by the module)."""
    results = []
    for backend in ("reference", "fused"):
        module.zero_grad()
        torch.manual_seed(seed)
        with rnnkit.use_backend(backend):
            results.append(run_with_grads(module, make_input, leaves))
    (ref_out, ref_grads), (our_out, our_grads) = results
    for r, o in zip(ref_out, our_out):
        torch.testing.assert_close(o, r, **TOL[dtype])
    for r, o in zip(ref_grads, our_grads):
        assert (r is None) == (o is None)
        if r is not None:
            torch.testing.assert_close(o, r, **TOL[dtype])
