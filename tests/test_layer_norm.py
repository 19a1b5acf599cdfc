"""rnnkit's layer-normalized LSTM and GRU (layers and cells) against their definitions written
here from scratch, and their API: parameters, initialisation, lengths, packing, regularizers.
Layers, single steps, cells and rnnkit.Stream run on the fused kernels (``backend``: each
backend in turn)."""

from __future__ import annotations

import pytest
import torch
from oracle import TOL, run_with_grads
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit


def _ln(v, gain, bias=None):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(var + 1e-5) * gain
    return out if bias is None else out + bias


def oracle_step(kind, x, h, c, p):
    """One step from the issue's definitions; p: name -> tensor (no suffix)."""
    xw = _ln(x @ p["weight_ih"].T, p["layer_norm_ih"]) + p.get("bias_ih", 0)
    hw = _ln(h @ p["weight_hh"].T, p["layer_norm_hh"]) + p.get("bias_hh", 0)
    if kind == "lstm":
        i, f, g, o = (xw + hw).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(_ln(c, p["layer_norm_c_weight"], p["layer_norm_c_bias"]))
        return h, c
    x_r, x_z, x_n = xw.chunk(3, -1)
    h_r, h_z, h_n = hw.chunk(3, -1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None


def oracle(kind, module, x, h0=None, c0=None):
    """A whole layer stack on time-major x (T, B, I)."""
    L, D = module.num_layers, 2 if module.bidirectional else 1
    T, B, _ = x.shape
    H = module.hidden_size
    finals, inp = [], x
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            suffix = f"_l{layer}{'_reverse' if d else ''}"
            p = {n[:-len(suffix)]: t for n, t in module.named_parameters() if n.endswith(suffix)}
            h = x.new_zeros(B, H) if h0 is None else h0[k]
            c = x.new_zeros(B, H) if c0 is None else c0[k]
            out = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                h, c = oracle_step(kind, inp[t], h, c, p)
                out[t] = h
            outs.append(torch.stack(out))
            finals.append((h, c))
        inp = torch.cat(outs, -1)
    h_n = torch.stack([f[0] for f in finals])
    return (inp, (h_n, torch.stack([f[1] for f in finals]))) if kind == "lstm" else (inp, h_n)


LAYERS = {"lstm": "LayerNormLSTM", "gru": "LayerNormGRU"}


def _flat(result):
    out, h = result
    return [out, *(h if isinstance(h, tuple) else (h,))]


def _compare(run_ours, run_oracle, module, leaves, dtype):
    results = []
    for run in (run_ours, run_oracle):
        module.zero_grad()
        copies = [t.clone().requires_grad_() for t in leaves]
        outs = run(*copies)
        gen = torch.Generator().manual_seed(2)
        sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
        results.append([o.detach() for o in outs] + [t.grad for t in copies] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL[dtype])


def _randomize(module):
    """Gains and biases away from their initial ones and zeros, so every parameter matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if "bias" not in name else torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layers_follow_the_definitions(backend, kind, bidirectional, batch_first, bias, dtype=torch.float64):
    module = getattr(rnnkit, LAYERS[kind])(4, 5, 2, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                                           dtype=dtype)
    _randomize(module)
    D = 2 if bidirectional else 1
    x = torch.randn(6, 3, 4, dtype=dtype)
    states = [torch.randn(2 * D, 3, 5, dtype=dtype) for _ in range(2 if kind == "lstm" else 1)]

    def ours(x, *s):
        hx = s[0] if kind == "gru" else tuple(s)
        out, h = module(x.transpose(0, 1) if batch_first else x, hx)
        return _flat((out.transpose(0, 1) if batch_first else out, h))

    _compare(ours, lambda x, *s: _flat(oracle(kind, module, x, *s)), module, [x, *states], dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float32_outputs(kind):
    """float32 outputs within 1e-5 of the definitions (its gradients, sums over every step and
    row of a normalization's backward, round differently from the oracle's formula's)."""
    module = getattr(rnnkit, LAYERS[kind])(4, 5, 2, bidirectional=True)
    _randomize(module)
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        for got, want in zip(_flat(module(x)), _flat(oracle(kind, module, x))):
            torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cells_follow_the_definitions(backend, kind):
    cls = rnnkit.LayerNormLSTMCell if kind == "lstm" else rnnkit.LayerNormGRUCell
    cell = cls(3, 4, dtype=torch.float64)
    _randomize(cell)
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))

    def ours(x, h, c):
        new = cell(x, (h, c)) if kind == "lstm" else cell(x, h)
        return list(new) if kind == "lstm" else [new]

    def want(x, h, c):
        new = oracle_step(kind, x, h, c, dict(cell.named_parameters()))
        return list(new) if kind == "lstm" else [new[0]]

    _compare(ours, want, cell, [x, h, c], torch.float64)
    # unbatched, default state
    got = cell(x[0])
    want_h = oracle_step(kind, x[:1], torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64),
                         dict(cell.named_parameters()))[0][0]
    torch.testing.assert_close(got[0] if kind == "lstm" else got, want_h, **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradcheck(kind):
    module = getattr(rnnkit, LAYERS[kind])(2, 3, bidirectional=True, dtype=torch.float64)
    _randomize(module)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *_: tuple(_flat(module(x))), (x, *module.parameters()))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_and_packing(kind):
    """lengths= equals packing the same layer's input; a packed input equals each sequence run
    on its own."""
    module = getattr(rnnkit, LAYERS[kind])(3, 4, 2, bidirectional=True, batch_first=True, dtype=torch.float64)
    _randomize(module)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    lengths = [2, 5, 3]
    out, h = module(x, lengths=lengths)
    packed_out, packed_h = module(pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                                       enforce_sorted=False))
    padded, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=5)
    for got, want in zip(_flat((out, h)), _flat((padded, packed_h))):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    for row, n in enumerate(lengths):
        alone, h_alone = module(x[row:row + 1, :n])
        torch.testing.assert_close(out[row, :n], alone[0], **TOL[torch.float64])
        torch.testing.assert_close(out[row, n:], torch.zeros_like(out[row, n:]), rtol=0, atol=0)
        first = h_alone[0] if kind == "lstm" else h_alone
        torch.testing.assert_close((h[0] if kind == "lstm" else h)[:, row], first[:, 0], **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fused_kernels_run_and_agree_in_float32(kind, monkeypatch):
    """The fused loops (not the reference) run the layer-normalized layers, forward and
    backward, and agree with the reference in float32 on outputs and every gradient, with
    lengths and the regularizers."""
    from rnnkit import _loops

    module = getattr(rnnkit, LAYERS[kind])(3, 6, 2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2)
    _randomize(module)
    x = torch.randn(7, 4, 3)
    calls = []
    for name in ("forward", "backward"):
        loop = getattr(_loops, name)
        monkeypatch.setattr(_loops, name, lambda *a, loop=loop, name=name, **k: calls.append(name) or loop(*a, **k))
    with rnnkit.use_backend("auto"):
        module(x, lengths=[7, 3, 5, 1])[0].sum().backward()
    assert calls.count("forward") == 4 and calls.count("backward") == 4  # (2 layers, 2 directions)
    monkeypatch.undo()
    _backends_agree_float32(module, lambda x: (x, None, [7, 3, 5, 1]), x, seed=4)


def test_one_step_with_only_c_n_in_the_loss():
    """c_n of one step does not depend on c's normalization: its gradients are None, as the
    reference's (the fused route's bookkeeping of an unreached W_hr, here for LN's c)."""
    module = rnnkit.LayerNormLSTM(2, 3, 2, dtype=torch.float64)
    _randomize(module)
    x = torch.randn(1, 2, 2, dtype=torch.float64)
    grads = []
    for backend in ("reference", "fused"):
        module.zero_grad(set_to_none=True)
        with rnnkit.use_backend(backend):
            module(x)[1][1].sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for want, got in zip(*grads):
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want, **TOL[torch.float64])
    cell = rnnkit.LayerNormLSTMCell(2, 3, dtype=torch.float64)
    _randomize(cell)
    grads = []
    for backend in ("reference", "fused"):
        cell.zero_grad(set_to_none=True)
        with rnnkit.use_backend(backend):
            cell(x[0])[1].sum().backward()
        grads.append([p.grad for p in cell.parameters()])
    for want, got in zip(*grads):
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_gradients_of_frozen_parameters_are_none():
    module = rnnkit.LayerNormLSTM(3, 4, dtype=torch.float64)
    _randomize(module)
    module.layer_norm_ih_l0.requires_grad_(False)
    module.bias_hh_l0.requires_grad_(False)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with rnnkit.use_backend("fused"):
        module(x)[0].sum().backward()
    assert module.layer_norm_ih_l0.grad is None and module.bias_hh_l0.grad is None
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad()
    _flat(oracle("lstm", module, x))[0].sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, module.get_parameter(name).grad, **TOL[torch.float64])


def _backends_agree_float32(module, make_input, x, seed):
    """The fused route and the reference in float32, same seed (so the same masks): outputs
    within 1e-5; gradients within 1e-4 of each tensor's largest value. (Normalizations amplify
    float32 rounding by 1/sigma, and the gradients sum it over every step and row: the two
    routes then differ by a few 1e-5 of the largest value, as each differs from float64. The
    float64 tests hold 1e-9.)"""
    results = []
    for backend in ("reference", "fused"):
        module.zero_grad()
        torch.manual_seed(seed)
        with rnnkit.use_backend(backend):
            results.append(run_with_grads(module, make_input, [x]))
    (ref_out, ref_grads), (our_out, our_grads) = results
    for got, want in zip(our_out, ref_out):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    for got, want in zip(our_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item() + 1e-6)


def test_regularizers_and_backends():
    module = rnnkit.LayerNormLSTM(3, 4, 2, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.3)
    x = torch.randn(5, 2, 3)
    _backends_agree_float32(module, lambda x: (x,), x, seed=4)
    module.eval()
    torch.manual_seed(0)
    a, _ = module(x)
    b, _ = module(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parameters_and_initialisation():
    """torch.nn's four parameters (drawn as torch.nn draws them: a seeded model has torch.nn's
    weights), then the gains (ones) and the cell-norm bias (zeros)."""
    torch.manual_seed(0)
    ours = rnnkit.LayerNormLSTM(3, 4, 2, bidirectional=True)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, 2, bidirectional=True)
    names = [n for n, _ in ours.named_parameters()]
    assert names[:8] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "layer_norm_ih_l0",
                         "layer_norm_hh_l0", "layer_norm_c_weight_l0", "layer_norm_c_bias_l0"]
    assert names[8] == "weight_ih_l0_reverse" and len(names) == 32
    for name, p in ours.named_parameters():
        if name.startswith("layer_norm"):
            assert torch.equal(p, torch.zeros_like(p) if "c_bias" in name else torch.ones_like(p))
            assert p.shape == ((4,) if "_c_" in name else (16,))
        else:
            assert torch.equal(p, ref.get_parameter(name))
    gru = rnnkit.LayerNormGRU(3, 4, bias=False)
    assert [n for n, _ in gru.named_parameters()] == ["weight_ih_l0", "weight_hh_l0", "layer_norm_ih_l0",
                                                       "layer_norm_hh_l0"]
    cell = rnnkit.LayerNormGRUCell(3, 4)
    assert [n for n, _ in cell.named_parameters()] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                        "layer_norm_ih", "layer_norm_hh"]


def test_refusals():
    with pytest.raises(ValueError, match="LayerNormLSTM has no proj_size"):
        rnnkit.LayerNormLSTM(3, 4, proj_size=2)
    with pytest.raises(TypeError, match="torch.nn has no equivalent of rnnkit.LayerNormGRU"):
        rnnkit.to_torch(rnnkit.LayerNormGRU(3, 4))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        rnnkit.LayerNormGRU(3, 4)(torch.randn(2, 1, 5))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        rnnkit.LayerNormGRU(3, 4)(torch.randn(2, 1, 3), torch.randn(1, 1, 5))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False])
def test_stream_equals_the_whole_sequence(kind, bias):
    module = getattr(rnnkit, LAYERS[kind])(3, 4, 2, bias=bias).eval()
    _randomize(module)
    x = torch.randn(5, 2, 3)
    want, _ = module(x)
    stream = rnnkit.Stream(module, batch_size=2)
    got = torch.stack([stream(x_t) for x_t in x])
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("training", [True, False])
def test_one_step_calls_follow_the_definitions(backend, kind, training):
    """T == 1 (the single-step route where the kernels run it), with and without gradients."""
    module = getattr(rnnkit, LAYERS[kind])(4, 5, 2, bidirectional=True, dtype=torch.float64)
    _randomize(module)
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    states = [torch.randn(4, 3, 5, dtype=torch.float64) for _ in range(2 if kind == "lstm" else 1)]

    def ours(x, *s):
        return _flat(module(x, s[0] if kind == "gru" else tuple(s)))

    if training:
        _compare(ours, lambda x, *s: _flat(oracle(kind, module, x, *s)), module, [x, *states], torch.float64)
    else:
        with torch.no_grad():
            for got, want in zip(ours(x, *states), _flat(oracle(kind, module, x, *states))):
                torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_under_torch_compile():
    module = rnnkit.LayerNormLSTM(3, 4, 2)
    _randomize(module)
    x = torch.randn(4, 2, 3)
    want = module(x)[0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: module(x)[0], backend="aot_eager")  # (see test_ecosystem)
    torch.testing.assert_close(compiled(x), want, **TOL[torch.float32])


def test_a_cell_with_kernels_places_every_own_gradient():
    from dataclasses import replace

    from rnnkit import _loops
    from rnnkit.cells.layernorm import LN_GRU

    with pytest.raises(ValueError, match="d_own must place the gradient of every own parameter"):
        _loops._check_d_own(replace(LN_GRU, d_own=LN_GRU.d_own[:-1]))
