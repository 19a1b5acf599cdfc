"""A catalogue of bad and edge inputs: each behaves as in torch.nn, or fails with a clearer error.

Nothing may crash, compute silently wrong numbers, or write into the caller's tensors. Cases
that compute are run on every backend (the ``backend`` fixture in conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from oracle import TOL, assert_same, assert_same_error, flat, raised, twins

F32, F64 = torch.float32, torch.float64
pack = nn.utils.rnn.pack_sequence


# ----------------------------------------------------------------------------- errors
# Called with the namespace (torch.nn or rnnkit): both raise the same type with the same message.
SAME_AS_TORCH = {
    "0-D input": lambda m: m.GRU(4, 5)(torch.tensor(1.0)),
    "1-D input": lambda m: m.RNN(4, 5)(torch.randn(4)),
    "4-D input": lambda m: m.GRU(4, 5)(torch.randn(2, 3, 2, 4)),
    "5-D input": lambda m: m.RNN(4, 5)(torch.randn(1, 2, 3, 2, 4)),
    "feature size too small": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 3)),
    "feature size zero": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 0)),
    "feature size batch_first": lambda m: m.RNN(4, 5, batch_first=True)(torch.randn(2, 3, 5)),
    "feature size unbatched": lambda m: m.RNN(4, 5)(torch.randn(3, 6)),
    "feature size packed": lambda m: m.GRU(4, 5)(pack([torch.randn(3, 6), torch.randn(2, 6)])),
    "h0 1-D": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4), torch.randn(5)),
    "h0 4-D": lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4), torch.randn(1, 1, 2, 5)),
    "h0 rows": lambda m: m.GRU(4, 5, 2, bidirectional=True)(torch.randn(3, 2, 4), torch.randn(2, 2, 5)),
    "h0 batch": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4), torch.randn(1, 3, 5)),
    "h0 hidden": lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4), torch.randn(1, 2, 6)),
    "h0 batch batch_first": lambda m: m.GRU(4, 5, batch_first=True)(torch.randn(2, 3, 4), torch.randn(1, 3, 5)),
    "h0 unbatched rows": lambda m: m.RNN(4, 5)(torch.randn(3, 4), torch.randn(2, 5)),
    "h0 sorted packed batch": lambda m: m.GRU(4, 5)(pack([torch.randn(3, 4), torch.randn(2, 4)]), torch.randn(1, 3, 5)),
    "input float64": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4, dtype=F64)),
    "input float16": lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4).half()),
    "input int32": lambda m: m.GRU(4, 5)(torch.ones(3, 2, 4, dtype=torch.int32)),
    "input int64 unbatched": lambda m: m.RNN(4, 5)(torch.ones(3, 4, dtype=torch.int64)),
    "input bool": lambda m: m.RNN(4, 5)(torch.ones(3, 2, 4, dtype=torch.bool)),
    "input complex": lambda m: m.GRU(4, 5)(torch.ones(3, 2, 4, dtype=torch.complex64)),
    "input float32, model float64": lambda m: m.GRU(4, 5).double()(torch.randn(3, 2, 4)),
    "packed float64": lambda m: m.GRU(4, 5)(pack([torch.randn(3, 4, dtype=F64)])),
    "input on meta": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4, device="meta")),
    "model on meta": lambda m: m.RNN(4, 5).to("meta")(torch.randn(3, 2, 4)),
    "replaced parameter on meta": lambda m: _replace(m.GRU(4, 5), "weight_hh_l0", torch.randn(15, 5, device="meta"))(
        torch.randn(3, 2, 4)
    ),
    "zero-length sequence": lambda m: m.RNN(4, 5)(torch.randn(0, 2, 4)),
    "zero-length sequence, empty batch": lambda m: m.GRU(4, 5)(torch.randn(0, 0, 4)),
    "zero-length unbatched": lambda m: m.GRU(4, 5)(torch.randn(0, 4)),
    "zero-length batch_first": lambda m: m.GRU(4, 5, 2, batch_first=True)(torch.randn(3, 0, 4)),
    "zero length in pack": lambda m: m.GRU(4, 5)(pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 0]))),
    "cell 0-D input": lambda m: m.GRUCell(4, 5)(torch.tensor(1.0)),
    "cell 3-D input": lambda m: m.RNNCell(4, 5)(torch.randn(2, 3, 4)),
    "cell feature size": lambda m: m.GRUCell(4, 5)(torch.randn(3, 5)),
    "cell hidden batch": lambda m: m.RNNCell(4, 5)(torch.randn(3, 4), torch.randn(2, 5)),
    "cell input on meta": lambda m: m.GRUCell(4, 5)(torch.randn(3, 4, device="meta")),
}

# Where torch.nn fails obscurely (an AttributeError, a matmul message), rnnkit says what it
# expected: (call, exception type, message pattern).
CLEARER_THAN_TORCH = {
    "h0 float64": (
        lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4), torch.randn(1, 2, 5, dtype=F64)),
        RuntimeError, r"hx dtype \(torch.float64\) does not match input dtype \(torch.float32\)",
    ),
    "h0 int64": (
        lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4), torch.ones(1, 2, 5, dtype=torch.int64)),
        RuntimeError, r"hx dtype \(torch.int64\) does not match input dtype",
    ),
    "h0 on meta": (
        lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4), torch.randn(1, 2, 5, device="meta")),
        RuntimeError, "hx is on meta but input is on cpu",
    ),
    "h0 a list": (
        lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4), [torch.randn(1, 2, 5)]),
        TypeError, "hx must be a Tensor",
    ),
    "h0 a numpy array": (
        lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4), torch.randn(1, 2, 5).numpy()),
        TypeError, "hx must be a Tensor.*got ndarray",
    ),
    "input a numpy array": (
        lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4).numpy()),
        TypeError, "input must be a Tensor or a PackedSequence, got ndarray",
    ),
    "replaced parameter of wrong shape": (
        lambda m: _replace(m.GRU(4, 5), "weight_hh_l0", torch.randn(15, 6))(torch.randn(3, 2, 4)),
        RuntimeError, r"GRU: parameter weight_hh_l0 has shape \(15, 6\), expected \(15, 5\)",
    ),
    "replaced bias of wrong shape": (
        lambda m: _replace(m.RNN(4, 5, 2, bidirectional=True), "bias_ih_l1_reverse", torch.randn(4))(
            torch.randn(3, 2, 4)
        ),
        RuntimeError, r"parameter bias_ih_l1_reverse has shape \(4,\), expected \(5,\)",
    ),
    "replaced parameter of another dtype": (
        lambda m: _replace(m.GRU(4, 5), "weight_hh_l0", torch.randn(15, 5, dtype=F64))(torch.randn(3, 2, 4)),
        RuntimeError, r"parameter weight_hh_l0 is torch.float64 but weight_ih_l0 is torch.float32",
    ),
    "parameter set to None": (
        lambda m: _replace(m.GRU(4, 5), "weight_hh_l0", None)(torch.randn(3, 2, 4)),
        TypeError, "parameter weight_hh_l0 must be a Tensor, got NoneType",
    ),
    "cell int64 input": (
        lambda m: m.GRUCell(4, 5)(torch.ones(3, 4, dtype=torch.int64)),
        RuntimeError, r"RNN input dtype \(torch.int64\) does not match weight dtype \(torch.float32\)",
    ),
    "cell hidden on meta": (
        lambda m: m.RNNCell(4, 5)(torch.randn(3, 4), torch.randn(3, 5, device="meta")),
        RuntimeError, "hx is on meta but input is on cpu",
    ),
}


def _replace(module, name, value):
    setattr(module, name, None if value is None else nn.Parameter(value))
    return module


@pytest.mark.parametrize("name", SAME_AS_TORCH)
def test_same_error_as_torch(name, backend):
    assert_same_error(SAME_AS_TORCH[name])


@pytest.mark.parametrize("name", CLEARER_THAN_TORCH)
def test_clearer_error_than_torch(name, backend):
    call, kind, pattern = CLEARER_THAN_TORCH[name]
    # torch.nn refuses it too, only less clearly, and with the same type (except clauses work),
    # but where its type is an accident: a non-tensor's AttributeError (no .dim()) is a TypeError
    assert raised(call, nn).type in (kind, AttributeError)
    with pytest.raises(kind, match=pattern):
        call(rnnkit)


def test_unsorted_packed_h0_of_wrong_batch_is_refused():
    """torch.nn selects h_0's rows with sorted_indices before checking its size, so a 3-row h_0
    for 2 sequences passes silently there (rows beyond the batch are dropped); rnnkit refuses."""
    packed = pack([torch.randn(2, 4), torch.randn(3, 4)], enforce_sorted=False)
    h0 = torch.randn(1, 3, 5)
    nn.GRU(4, 5)(packed, h0)  # the torch quirk: no error
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 5\), got \[1, 3, 5\]"):
        rnnkit.GRU(4, 5)(packed, h0)


# ------------------------------------------------------------------- odd memory layouts
def _leaves(*shapes, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


# name -> (leaf shapes (x, h_0), call arguments built from the leaves); T=5, B=3, I=4, H=6, 2 layers.
LAYOUTS = {
    "transposed input": ([(3, 5, 4), (2, 3, 6)], lambda x, h: (x.transpose(0, 1), h)),
    "strided input": ([(10, 3, 8), (2, 3, 6)], lambda x, h: (x[::2, :, ::2], h)),
    "expanded input (stride 0 batch)": ([(5, 1, 4), (2, 3, 6)], lambda x, h: (x.expand(5, 3, 4), h)),
    "expanded input (stride 0 features)": ([(5, 3, 1), (2, 3, 6)], lambda x, h: (x.expand(5, 3, 4), h)),
    "expanded input (stride 0 time)": ([(1, 3, 4), (2, 3, 6)], lambda x, h: (x.expand(5, 3, 4), h)),
    "transposed h_0": ([(5, 3, 4), (3, 2, 6)], lambda x, h: (x, h.transpose(0, 1))),
    "strided h_0": ([(5, 3, 4), (2, 3, 12)], lambda x, h: (x, h[..., 1::2])),
    "expanded h_0": ([(5, 3, 4), (1, 1, 6)], lambda x, h: (x, h.expand(2, 3, 6))),
    "everything expanded": ([(1, 1, 4), (1, 1, 1)], lambda x, h: (x.expand(5, 3, 4), h.expand(2, 3, 6))),
}


@pytest.mark.parametrize("kind", ["tanh", "gru"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_and_expanded_match_torch(layout, kind, backend):
    shapes, make_input = LAYOUTS[layout]
    torch.manual_seed(0)
    ref, ours = twins(kind, F64, input_size=4, hidden_size=6, num_layers=2)
    leaves = _leaves(*shapes)
    x, h = make_input(*leaves)
    assert not (x.is_contiguous() and h.is_contiguous())
    assert_same(ref, ours, make_input, leaves, F64)


def test_non_contiguous_batch_first_bidirectional_packed(backend):
    torch.manual_seed(1)
    ref, ours = twins("gru", F64, input_size=4, hidden_size=3, bidirectional=True, batch_first=True)
    leaves = _leaves((6, 4, 3), (2, 3, 3))  # x stored (T, I, B): permuted to (B, T, I)
    lengths = torch.tensor([2, 6, 1])
    make_input = lambda x, h: (  # noqa: E731
        pack_padded_sequence(x.permute(2, 0, 1), lengths, batch_first=True, enforce_sorted=False),
        h.transpose(0, 1).contiguous().transpose(0, 1)[:, :, :],
    )
    assert_same(ref, ours, make_input, leaves, F64)


# --------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("kind", ["relu", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("give_h0", [False, True])
def test_empty_batch_matches_torch(kind, batch_first, give_h0, backend):
    torch.manual_seed(2)
    ref, ours = twins(kind, F32, input_size=4, hidden_size=5, num_layers=2, bidirectional=True,
                      batch_first=batch_first)
    x = torch.randn((0, 3, 4) if batch_first else (3, 0, 4))
    h0 = torch.randn(4, 0, 5) if give_h0 else None
    assert_same(ref, ours, lambda x, h: (x, h), [x, h0], F32)
    out, h = ours(x, h0)
    assert out.shape == ((0, 3, 10) if batch_first else (3, 0, 10)) and h.shape == (4, 0, 5)


@pytest.mark.parametrize("cell", ["RNNCell", "GRUCell"])
def test_cell_empty_batch_matches_torch(cell):
    ours, ref = getattr(rnnkit, cell)(4, 5), getattr(nn, cell)(4, 5)
    assert ours(torch.randn(0, 4)).shape == ref(torch.randn(0, 4)).shape == (0, 5)


# ----------------------------------------------------------------------------- NaN / Inf
def _assert_same_with_nan(ref_result, our_result, dtype):
    for r, o in zip(flat(ref_result), flat(our_result)):
        assert torch.equal(r.isnan(), o.isnan())
        torch.testing.assert_close(o, r, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("kind", ["tanh", "relu", "gru"])
@pytest.mark.parametrize(
    "where,value",
    [("input", float("nan")), ("input", float("inf")), ("input", -float("inf")), ("h_0", float("nan")),
     ("h_0", float("inf"))],
)
def test_nan_and_inf_propagate_like_torch(kind, where, value, backend):
    torch.manual_seed(3)
    ref, ours = twins(kind, F64, input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    x, h0 = _leaves((6, 3, 4), (4, 3, 5))
    if where == "input":
        x[2, 1, 0] = value  # one element of one sequence, mid-sequence
    else:
        h0[1, 2, 3] = value  # the reverse direction of layer 0, batch element 2
    ref_result, our_result = ref(x, h0), ours(x, h0)
    _assert_same_with_nan(ref_result, our_result, F64)
    # Other sequences of the batch are untouched.
    clean = 0 if where == "input" else 1
    assert not flat(our_result)[0][:, clean].isnan().any()


def test_nan_in_padding_of_packed_input_is_ignored(backend):
    torch.manual_seed(4)
    ref, ours = twins("gru", F64, input_size=4, hidden_size=5, bidirectional=True)
    (x,) = _leaves((6, 3, 4))
    lengths = torch.tensor([6, 2, 4])
    x[2:, 1] = float("nan")
    x[4:, 2] = float("nan")
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    ref_result, our_result = ref(packed), ours(packed)
    _assert_same_with_nan(ref_result, our_result, F64)
    assert not any(t.isnan().any() for t in flat(our_result))


@pytest.mark.parametrize("kind", ["tanh", "relu", "gru", "lstm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_gradient_like_torch(kind, value, backend):
    """Every gradient with a NaN or inf in one input element, NaN where torch.nn has NaN (a ReLU
    whose output is NaN passes its gradient on, as torch's does)."""
    torch.manual_seed(5)
    ref, ours = twins(kind, F64, input_size=4, hidden_size=5)
    (x,) = _leaves((4, 2, 4))
    x[1, 0, 2] = value
    grads = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_(True)
        out, h = flat(module(leaf))[:2]
        (out.sum() + h.sum()).backward()
        grads.append((leaf.grad, *(p.grad for p in module.parameters())))
    for r, o in zip(*grads):
        assert torch.equal(r.isnan(), o.isnan())
        torch.testing.assert_close(o, r, equal_nan=True, **TOL[F64])


# ------------------------------------------------------------------------- gradients flow
def test_h0_requires_grad_but_input_does_not(backend):
    torch.manual_seed(6)
    ref, ours = twins("gru", F64, input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    x, h0 = _leaves((5, 3, 4), (4, 3, 5))
    grads = []
    for module in (ref, ours):
        module.requires_grad_(False)
        h = h0.clone().requires_grad_(True)
        out, hn = module(x, h)
        assert out.requires_grad and hn.requires_grad
        (out.square().sum() + hn.sum()).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL[F64])


def test_input_requires_grad_with_frozen_parameters(backend):
    torch.manual_seed(7)
    ref, ours = twins("tanh", F64, input_size=4, hidden_size=5, num_layers=2)
    ref.requires_grad_(False)
    ours.requires_grad_(False)
    (x,) = _leaves((5, 3, 4))
    assert_same(ref, ours, lambda x: (x,), [x], F64)
    assert all(p.grad is None for p in ours.parameters())


def test_nothing_requires_grad(backend):
    _, ours = twins("gru", F32, input_size=4, hidden_size=5)
    ours.requires_grad_(False)
    out, h = ours(torch.randn(3, 2, 4))
    assert not out.requires_grad and not h.requires_grad


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode_match_torch(mode, backend):
    torch.manual_seed(8)
    ref, ours = twins("gru", F64, input_size=4, hidden_size=5, num_layers=2)
    x, h0 = _leaves((5, 3, 4), (2, 3, 5))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        ref_result, our_result = ref(x, h0), ours(x, h0)
    for r, o in zip(flat(ref_result), flat(our_result)):
        assert not o.requires_grad
        torch.testing.assert_close(o, r, **TOL[F64])


# ------------------------------------------------------------------ user-replaced parameters
def test_replaced_parameters_are_used_and_trained(backend):
    torch.manual_seed(9)
    ref, ours = twins("gru", F64, input_size=4, hidden_size=5, num_layers=2)
    new_hh = torch.randn(15, 5, dtype=F64)
    new_bias = torch.randn(15, dtype=F64)
    for module in (ref, ours):
        module.weight_hh_l1 = nn.Parameter(new_hh.clone())
        module.bias_ih_l0 = nn.Parameter(new_bias.clone())
    x, h0 = _leaves((5, 3, 4), (2, 3, 5))
    assert_same(ref, ours, lambda x, h: (x, h), [x, h0], F64)
    assert ours.weight_hh_l1.grad is not None and ours.bias_ih_l0.grad is not None
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_parameter_data_replaced_in_place(backend):
    torch.manual_seed(10)
    ref, ours = twins("relu", F64, input_size=4, hidden_size=5)
    with torch.no_grad():
        for module in (ref, ours):
            module.weight_ih_l0.copy_(torch.linspace(-1, 1, 20, dtype=F64).view(5, 4))
    (x,) = _leaves((4, 2, 4))
    assert_same(ref, ours, lambda x: (x,), [x], F64)


# ------------------------------------------------------------------------ converted modules
CONVERSIONS = {
    ".double()": (lambda m: m.double(), F64),
    ".to(torch.float64)": (lambda m: m.to(torch.float64), F64),
    ".to(dtype=torch.float64)": (lambda m: m.to(dtype=torch.float64), F64),
    ".double().float()": (lambda m: m.double().float(), F32),
    ".to(float64).to(float32)": (lambda m: m.to(torch.float64).to(torch.float32), F32),
}


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("kind", ["tanh", "gru"])
def test_converted_module_matches_torch(conversion, kind, backend):
    convert, dtype = CONVERSIONS[conversion]
    torch.manual_seed(11)
    ref, ours = twins(kind, F32, input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    ref, ours = convert(ref), convert(ours)
    assert all(p.dtype == dtype for p in ours.parameters())
    x, h0 = _leaves((5, 3, 4), (4, 3, 5), dtype=dtype)
    assert_same(ref, ours, lambda x, h: (x, h), [x, h0], dtype)


@pytest.mark.parametrize("cell", ["RNNCell", "GRUCell"])
def test_converted_cell_matches_torch(cell):
    torch.manual_seed(12)
    ref = getattr(nn, cell)(4, 5)
    ours = getattr(rnnkit, cell)(4, 5)
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.double(), ours.double()
    x, h = _leaves((3, 4), (3, 5))
    torch.testing.assert_close(ours(x, h), ref(x, h), **TOL[F64])


# ------------------------------------------------------------------------ inputs untouched
def _snapshot(tensors):
    return [(t, t.clone(), t._version) for t in tensors]


def _assert_untouched(snapshot):
    for t, copy, version in snapshot:
        assert t._version == version
        assert torch.equal(t, copy)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["tanh", "gru"])
def test_inputs_not_modified(kind, packed, backend):
    torch.manual_seed(13)
    _, ours = twins(kind, F32, input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    h0 = torch.randn(4, 3, 5, requires_grad=True)
    params = _snapshot([p.detach() for p in ours.parameters()])
    inputs = _snapshot([x.detach(), h0.detach()])
    arg = pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False) if packed else x
    data = _snapshot([arg.data.detach()]) if packed else []
    out, hn = ours(arg, h0)
    out = out.data if packed else out
    (out.sum() + hn.sum()).backward()
    ours(arg, h0)  # a second call reuses nothing it may have written into
    _assert_untouched(params + inputs + data)


def test_cell_inputs_not_modified():
    cell = rnnkit.GRUCell(4, 5)
    x, h = torch.randn(3, 4), torch.randn(3, 5)
    snapshot = _snapshot([x, h])
    cell(x, h).sum().backward()
    _assert_untouched(snapshot)
