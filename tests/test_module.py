"""The module surface: constructor, parameters, state_dict both ways, init, dropout, gradcheck."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import rnnkit
from oracle import CELL_KINDS, TOL, as_hx, flat, state_features, twins


def test_seed_example():
    rnn = rnnkit.RNN(10, 20, 2)
    output, hn = rnn(torch.randn(5, 3, 10), torch.randn(2, 3, 20))
    assert output.shape == (5, 3, 20) and hn.shape == (2, 3, 20)


def test_lstm_example():
    lstm = rnnkit.LSTM(10, 20, 2)
    output, (hn, cn) = lstm(torch.randn(5, 3, 10), (torch.randn(2, 3, 20), torch.randn(2, 3, 20)))
    assert output.shape == (5, 3, 20) and hn.shape == cn.shape == (2, 3, 20)
    proj = rnnkit.LSTM(10, 20, 2, proj_size=7, bidirectional=True)
    output, (hn, cn) = proj(torch.randn(5, 3, 10))
    assert output.shape == (5, 3, 14) and hn.shape == (4, 3, 7) and cn.shape == (4, 3, 20)


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameters_match_torch(kind, bias, bidirectional):
    ref, ours = twins(kind, input_size=3, hidden_size=4, num_layers=3, bias=bias, bidirectional=bidirectional)
    ref_named = [(n, p.shape) for n, p in ref.named_parameters()]
    our_named = [(n, p.shape) for n, p in ours.named_parameters()]
    assert our_named == ref_named
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in ref.all_weights]
    assert ours._flat_weights_names == ref._flat_weights_names
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    if not bias:
        assert not hasattr(ours, "bias_ih_l0")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_state_dict_loads_into_torch(kind):
    ref, ours = twins(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    ours.reset_parameters()  # fresh weights, different from ref's
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(6, 2, 3)
    out_ref, h_ref = ref(x)
    out_ours, h_ours = ours(x)
    torch.testing.assert_close(out_ours, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(h_ours, h_ref, **TOL[torch.float32])  # (h_n, c_n) for an LSTM


def test_lstm_projection_parameters():
    ref, ours = twins("lstm-proj", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    shapes = dict((n, p.shape) for n, p in ours.named_parameters())
    assert shapes["weight_hr_l0"] == shapes["weight_hr_l1_reverse"] == (2, 4)
    assert shapes["weight_hh_l0"] == (16, 2) and shapes["weight_ih_l1"] == (16, 4)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.all_weights[1][-1] is ours.weight_hr_l0_reverse


def test_positional_signature_matches_torch():
    args = (3, 4, 2, "relu", False, True, 0.25, True)
    ref, ours = nn.RNN(*args), rnnkit.RNN(*args)
    for attr in ("nonlinearity", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(ours, attr) == getattr(ref, attr)
    g_args = (3, 4, 2, False, True, 0.25, True)
    ref, ours = nn.GRU(*g_args), rnnkit.GRU(*g_args)
    for attr in ("num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(ours, attr) == getattr(ref, attr)
    l_args = (3, 4, 2, False, True, 0.25, True, 2, "cpu", torch.float64)
    ref, ours = nn.LSTM(*l_args), rnnkit.LSTM(*l_args)
    for attr in ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(ref, attr)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in ref.named_parameters()
    ]


def test_device_and_dtype_factory_kwargs():
    m = rnnkit.GRU(3, 4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    out, h = m(torch.randn(2, 1, 3, dtype=torch.float64))
    assert out.dtype == h.dtype == torch.float64


@pytest.mark.parametrize("hidden_size", [16, 100])
def test_init_is_uniform_in_bound(hidden_size):
    torch.manual_seed(0)
    m = rnnkit.GRU(30, hidden_size, num_layers=2, bidirectional=True)
    bound = 1 / math.sqrt(hidden_size)
    values = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert values.abs().max() <= bound
    # U(-b, b): mean 0, variance b^2/3; with thousands of samples both are tight.
    assert abs(values.mean().item()) < 0.02 * bound
    assert values.var().item() == pytest.approx(bound**2 / 3, rel=0.05)


@pytest.mark.parametrize("cls,kwargs", [("GRU", {}), ("LSTM", {"proj_size": 2, "bidirectional": True})])
def test_init_follows_the_global_seed_like_torch(cls, kwargs):
    torch.manual_seed(7)
    ref = getattr(nn, cls)(3, 4, 2, **kwargs)
    torch.manual_seed(7)
    ours = getattr(rnnkit, cls)(3, 4, 2, **kwargs)
    for (n, r), (_, o) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.equal(r, o), n


def test_repr():
    assert repr(rnnkit.GRU(4, 5, 2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)) == (
        "GRU(4, 5, num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)"
    )
    assert repr(rnnkit.RNN(4, 5)) == "RNN(4, 5)"
    assert repr(rnnkit.RNN(4, 5, nonlinearity="relu")) == "RNN(4, 5, nonlinearity='relu')"
    assert repr(rnnkit.RNNCell(4, 5, nonlinearity="relu")) == "RNNCell(4, 5, nonlinearity=relu)"
    assert repr(rnnkit.GRUCell(4, 5, bias=False)) == "GRUCell(4, 5, bias=False)"
    assert repr(rnnkit.LSTM(4, 5, 2, proj_size=3)) == repr(nn.LSTM(4, 5, 2, proj_size=3))
    assert repr(rnnkit.LSTMCell(4, 5)) == repr(nn.LSTMCell(4, 5)) == "LSTMCell(4, 5)"


def _same_result(make):
    """make(namespace) gives the same value, or raises the same exception, in both."""
    results = []
    for namespace in (nn, rnnkit):
        try:
            results.append(make(namespace))
        except Exception as e:  # noqa: BLE001 - the exception is the result compared
            results.append((type(e), str(e)))
    expected, got = results
    if isinstance(expected, torch.Tensor) or isinstance(expected, tuple) and isinstance(expected[0], torch.Tensor):
        torch.testing.assert_close(got, expected)
    else:
        assert got == expected


@pytest.mark.parametrize("kind,kwargs", [("tanh", {}), ("gru", {"num_layers": 2, "bidirectional": True}),
                                         ("lstm", {}), ("lstm-proj", {"batch_first": True})])
def test_public_checks_of_torch_rnnbase(kind, kwargs):
    """check_input, get_expected_hidden_size (and the LSTM's get_expected_cell_size),
    check_hidden_size, check_forward_args and permute_hidden: torch.nn.RNNBase's public
    helpers, which its subclasses call; the same results and errors."""
    def layer(namespace):
        cls, extra = CELL_KINDS[kind]
        return getattr(namespace, cls)(4, 5, **extra, **kwargs)

    x = torch.randn(3, 2, 4)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    ref = layer(nn)
    sizes = [ref.get_expected_hidden_size(x, None)]
    if isinstance(ref, nn.LSTM):
        sizes.append(ref.get_expected_cell_size(x, None))
    hx = tuple(torch.randn(size) for size in sizes)
    hx = hx if len(hx) == 2 else hx[0]
    bad = (hx[0], torch.zeros(9, 9, 9)) if len(sizes) == 2 else torch.zeros(9, 9, 9)
    _same_result(lambda m: layer(m).get_expected_hidden_size(x, None))
    _same_result(lambda m: layer(m).get_expected_hidden_size(packed.data, packed.batch_sizes))
    if len(sizes) == 2:
        _same_result(lambda m: layer(m).get_expected_cell_size(packed.data, packed.batch_sizes))
    for args in [(x, None), (x[..., :3], None), (x.double(), None), (x, packed.batch_sizes)]:
        _same_result(lambda m: layer(m).check_input(*args))
    _same_result(lambda m: layer(m).check_hidden_size(torch.zeros(2, 2), (2, 3)))
    _same_result(lambda m: layer(m).check_forward_args(x, hx, None))
    _same_result(lambda m: layer(m).check_forward_args(x, bad, None))
    _same_result(lambda m: layer(m).permute_hidden(hx, torch.tensor([1, 0])))
    _same_result(lambda m: layer(m).permute_hidden(hx, None))


def test_flatten_parameters_is_a_noop():
    m = rnnkit.RNN(3, 4)
    before = {n: p.clone() for n, p in m.named_parameters()}
    assert m.flatten_parameters() is None
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])


def test_replaced_parameter_is_used():
    ref, ours = twins("tanh", input_size=3, hidden_size=4)
    new = torch.randn(4, 4)
    ref.weight_hh_l0 = nn.Parameter(new.clone())
    ours.weight_hh_l0 = nn.Parameter(new.clone())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


@pytest.mark.parametrize("kind", ["gru", "lstm-proj"])
def test_new_input_size_with_its_weight(kind):
    """Layer surgery that torch.nn allows: a first layer's weight_ih replaced for another input
    size, input_size set to match; the wrong shape for the current sizes is still refused."""
    ref, ours = twins(kind, input_size=3, hidden_size=4, num_layers=2)
    new = torch.randn(ref.weight_ih_l0.shape[0], 6)
    for module in (ref, ours):
        module.weight_ih_l0 = nn.Parameter(new.clone())
        module.input_size = 6
    x = torch.randn(5, 2, 6)
    torch.testing.assert_close(flat(ours(x)), flat(ref(x)))
    ours.weight_ih_l0 = nn.Parameter(torch.randn(ref.weight_ih_l0.shape[0], 3))
    with pytest.raises(RuntimeError, match=r"parameter weight_ih_l0 has shape \(\d+, 3\), expected \(\d+, 6\)"):
        ours(x)


def test_module_pickled_before_shapes_followed_sizes_loads():
    """A layer pickled whole by an rnnkit whose expected parameter shapes were fixed at
    construction (``_param_shapes``, no ``_shapes_for``) still loads and runs."""
    ref, ours = twins("lstm-proj", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    ours(torch.randn(5, 2, 3))
    state = ours.__getstate__().copy()
    state["_param_shapes"] = state.pop("_shapes_for")[1]
    old = rnnkit.LSTM.__new__(rnnkit.LSTM)
    old.__setstate__(state)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(flat(old(x)), flat(ref(x)))


def test_pickle_and_save_roundtrip(tmp_path):
    m = rnnkit.GRU(3, 4, 2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    clone = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(clone(x)[0], m(x)[0])
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    fresh = rnnkit.GRU(3, 4, 2, bidirectional=True)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    torch.testing.assert_close(fresh(x)[0], m(x)[0])


def test_reexported_packing_helpers_are_torchs():
    import torch.nn.utils.rnn as tr

    for name in ("PackedSequence", "pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "pad_sequence"):
        assert getattr(rnnkit, name) is getattr(tr, name)


def test_packed_output_keeps_indices_and_equals_each_sequence_alone():
    torch.manual_seed(3)
    m = rnnkit.GRU(3, 4, 2, bidirectional=True).double()
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (2, 5, 3)]
    packed = rnnkit.pack_sequence(seqs, enforce_sorted=False)
    out, h = m(packed)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert torch.equal(out.sorted_indices, packed.sorted_indices)
    assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
    padded, lengths = rnnkit.pad_packed_sequence(out)
    for i, s in enumerate(seqs):
        alone_out, alone_h = m(s.unsqueeze(1))
        torch.testing.assert_close(padded[: len(s), i], alone_out[:, 0], **TOL[torch.float64])
        torch.testing.assert_close(h[:, i], alone_h[:, 0], **TOL[torch.float64])


# ---------------------------------------------------------------------------- dropout
def test_dropout_only_between_layers_in_training():
    torch.manual_seed(0)
    m = rnnkit.RNN(3, 50, 3, dropout=0.5)
    x = torch.randn(4, 2, 3)
    m.eval()
    a, ha = m(x)
    b, hb = m(x)
    assert torch.equal(a, b) and torch.equal(ha, hb)
    m.train()
    c, _ = m(x)
    d, _ = m(x)
    assert not torch.equal(c, d)
    # dropout zero-probability and single layer: training equals eval
    m0 = rnnkit.RNN(3, 5, 2, dropout=0.0)
    m0.train()
    torch.testing.assert_close(m0(x)[0], m0.eval()(x)[0])


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_draws_the_same_mask_as_torch(kind, packed):
    ref, ours = twins(kind, input_size=3, hidden_size=6, num_layers=3, dropout=0.4, bidirectional=True)
    ref.train()
    ours.train()
    x = torch.randn(5, 4, 3)
    if packed:
        x = rnnkit.pack_padded_sequence(x, torch.tensor([5, 3, 4, 1]), enforce_sorted=False)
    torch.manual_seed(11)
    out_ref, h_ref = ref(x)
    torch.manual_seed(11)
    out_ours, h_ours = ours(x)
    if packed:
        out_ref, out_ours = out_ref.data, out_ours.data
    torch.testing.assert_close(out_ours, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(h_ours, h_ref, **TOL[torch.float32])


def test_dropout_last_layer_output_untouched():
    # Dropout never applies to the last layer's output: with p=1 every layer after the first
    # sees zeros, but the final output is act(b_ih + W_hh h + b_hh), never exactly zero.
    m = rnnkit.RNN(3, 5, 2, dropout=1.0).train()
    out, h = m(torch.randn(4, 2, 3))
    assert (out != 0).all()
    torch.testing.assert_close(out[-1], h[-1])


def test_dropout_warning_for_one_layer():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1, but got dropout=0.5 and num_layers=1"):
        rnnkit.GRU(3, 4, 1, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnkit.GRU(3, 4, 2, dropout=0.5)


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck(kind, packed):
    # The full Jacobian costs two forwards per input and parameter element: keep the model small
    # (the parity tests compare every gradient with torch.nn's over all configurations).
    torch.manual_seed(1)
    _, m = twins(kind, torch.float64, input_size=2, hidden_size=3, num_layers=2, bidirectional=True)
    params = list(m.parameters())
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(4, 3, f, dtype=torch.float64, requires_grad=True) for f in state_features(m)]
    lengths = torch.tensor([3, 1, 2])
    names = [n for n, _ in m.named_parameters()]
    n_states = len(states)

    def f(x, *rest):
        inp = rnnkit.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        hx = as_hx(rest[:n_states])
        out, h = torch.func.functional_call(m, dict(zip(names, rest[n_states:])), (inp, hx))
        return (out.data if packed else out), *(h if isinstance(h, tuple) else (h,))

    assert torch.autograd.gradcheck(f, (x, *states, *params))


# torch.nn's layers and cells run on the meta device (shapes without data: model sizing,
# deferred initialisation); rnnkit's run its torch-ops reference there and give the same shapes.
def _meta_shapes(result) -> list:
    """(shape, dtype, device type) of every tensor of a result, nested tuples flattened."""
    if isinstance(result, torch.Tensor):
        return [(tuple(result.shape), result.dtype, result.device.type)]
    return [leaf for part in result for leaf in _meta_shapes(part)]


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("give_h", [False, True])
def test_meta_device_layers_give_torchs_shapes(kind, batch_first, bidirectional, batched, give_h):
    cls, extra = CELL_KINDS[kind]
    kwargs = dict(input_size=4, hidden_size=5, num_layers=2, batch_first=batch_first,
                  bidirectional=bidirectional, device="meta", **extra)
    ref, ours = getattr(nn, cls)(**kwargs), getattr(rnnkit, cls)(**kwargs)
    T, B = 3, 2
    x = torch.empty(((B, T) if batch_first else (T, B)) + (4,) if batched else (T, 4), device="meta")
    hx = None
    if give_h:
        rows = 2 * (2 if bidirectional else 1)
        states = [torch.empty((rows, B, f) if batched else (rows, f), device="meta") for f in state_features(ref)]
        hx = as_hx(states)
    got, expected = _meta_shapes(ours(x, hx)), _meta_shapes(ref(x, hx))
    assert got == expected
    assert all(device == "meta" for _, _, device in got)


@pytest.mark.parametrize("cls", ["RNNCell", "GRUCell", "LSTMCell"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("give_h", [False, True])
def test_meta_device_cells_give_torchs_shapes(cls, batched, give_h):
    ref, ours = getattr(nn, cls)(4, 5, device="meta"), getattr(rnnkit, cls)(4, 5, device="meta")
    x = torch.empty((2, 4) if batched else (4,), device="meta")
    hx = None
    if give_h:
        h = torch.empty((2, 5) if batched else (5,), device="meta")
        hx = (h, h) if cls == "LSTMCell" else h
    got, expected = _meta_shapes(ours(x, hx)), _meta_shapes(ref(x, hx))
    assert got == expected and got[0][2] == "meta"
