"""rnnkit's own recurrent regularizers on RNN, GRU and LSTM: recurrent dropout, zoneout and
weight drop, against an implementation of their definitions written here from scratch (masks
drawn from torch's default generator in the documented order), in training and eval mode."""

from __future__ import annotations

import pickle

import pytest
import torch
from oracle import TOL, assert_backends_agree, twins

import rnnkit
from rnnkit._driver import zone_masks

KINDS = {"tanh": ("RNN", {}), "relu": ("RNN", {"nonlinearity": "relu"}), "gru": ("GRU", {}),
         "lstm": ("LSTM", {}), "lstm-proj": ("LSTM", {"proj_size": 3})}
LAYER_NORM = {"ln-lstm": ("LayerNormLSTM", {}), "ln-gru": ("LayerNormGRU", {})}  # (their oracle: test_layer_norm)


def _step(mode, xw, h, c, h_in, w_hh, b_hh):
    """One step of torch.nn's cells, with h_in entering W_hh (recurrent dropout) in place of h."""
    hw = h_in @ w_hh.T + (0 if b_hh is None else b_hh)
    if mode in ("RNN_TANH", "RNN_RELU"):
        act = torch.tanh if mode == "RNN_TANH" else torch.relu
        return act(xw + hw), None
    if mode == "GRU":
        x_r, x_z, x_n = xw.chunk(3, -1)
        h_r, h_z, h_n = hw.chunk(3, -1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    i, f, g, o = (xw + hw).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def oracle(module, x, recurrent_dropout, zoneout, weight_drop, training):
    """(output, h_n[, c_n]) of ``module``'s weights on time-major x, hx zeros, no inter-layer
    dropout: each layer-direction draws, in order, its W_hh mask (weight drop), its h mask
    (recurrent dropout), then zoneout's masks for h and c."""
    mode, L = module.mode, module.num_layers
    D = 2 if module.bidirectional else 1
    T, B, _ = x.shape
    suffixes = [f"_l{layer}{'_reverse' if d else ''}" for layer in range(L) for d in range(D)]
    draws = []
    for s in suffixes:
        w_hh = getattr(module, "weight_hh" + s)
        if training and weight_drop:
            w_hh = w_hh * torch.empty_like(w_hh).bernoulli_(1 - weight_drop) / (1 - weight_drop)
        h_out, hidden = w_hh.shape[1], module.hidden_size
        mask = None
        if training and recurrent_dropout:
            mask = torch.empty(B, h_out, dtype=x.dtype).bernoulli_(1 - recurrent_dropout) / (1 - recurrent_dropout)
        keep = [None, None]
        if zoneout and training:  # (rnnkit's counter-based draws from two seeds: see test_zone_masks)
            seeds = torch.empty(2, dtype=torch.int64).random_().tolist()
            keep = [zone_masks((T, B, h_out), zoneout, seeds[0], x), zone_masks((T, B, hidden), zoneout, seeds[1], x)]
        elif zoneout:
            keep = [zoneout, zoneout]
        draws.append((w_hh, mask, keep))
    finals = []
    inp = x
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            s = suffixes[k]
            w_hh, mask, keep = draws[k]
            w_ih, b_ih = getattr(module, "weight_ih" + s), getattr(module, "bias_ih" + s, None)
            b_hh, w_hr = getattr(module, "bias_hh" + s, None), getattr(module, "weight_hr" + s, None)
            h = x.new_zeros(B, w_hh.shape[1])
            c = x.new_zeros(B, module.hidden_size)
            out = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                xw = inp[t] @ w_ih.T + (0 if b_ih is None else b_ih)
                new_h, new_c = _step(mode, xw, h, c, h if mask is None else h * mask, w_hh, b_hh)
                if w_hr is not None:
                    new_h = new_h @ w_hr.T
                z_h = keep[0] if not isinstance(keep[0], torch.Tensor) else keep[0][t]
                z_c = keep[1] if not isinstance(keep[1], torch.Tensor) else keep[1][t]
                h = new_h if z_h is None else z_h * h + (1 - z_h) * new_h
                if new_c is not None:
                    c = new_c if z_c is None else z_c * c + (1 - z_c) * new_c
                out[t] = h
            outs.append(torch.stack(out))
            finals.append((h, c))
        inp = torch.cat(outs, -1)
    h_n = torch.stack([f[0] for f in finals])
    if mode == "LSTM":
        return inp, h_n, torch.stack([f[1] for f in finals])
    return inp, h_n


def _make(kind, dtype=torch.float64, **kwargs):
    cls, extra = {**KINDS, **LAYER_NORM}[kind]
    torch.manual_seed(0)
    return getattr(rnnkit, cls)(4, 5, **extra, dtype=dtype, **kwargs)


def _flat(result):
    out, h = result
    return [out, *(h if isinstance(h, tuple) else (h,))]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("option", ["recurrent_dropout", "zoneout", "weight_drop", "all"])
@pytest.mark.parametrize("training", [True, False])
def test_regularizers_follow_their_definitions(backend, kind, option, training):
    """Outputs, final states and every gradient equal the definitions' (float64, 1e-9)."""
    values = {"recurrent_dropout": 0.0, "zoneout": 0.0, "weight_drop": 0.0}
    for name in values:
        if option in (name, "all"):
            values[name] = {"recurrent_dropout": 0.4, "zoneout": 0.3, "weight_drop": 0.5}[name]
    module = _make(kind, num_layers=2, bidirectional=True, **values).train(training)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    results = []
    for run in (lambda x: _flat(module(x)), lambda x: list(oracle(module, x, training=training, **values))):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        torch.manual_seed(11)
        outs = run(leaf)
        gen = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
        results.append(([o.detach() for o in outs], [leaf.grad] + [p.grad for p in module.parameters()]))
    (ours, our_grads), (want, want_grads) = results
    for o, w in zip(ours + our_grads, want + want_grads):
        torch.testing.assert_close(o, w, **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["tanh", "gru", "lstm", "lstm-proj"])
def test_backends_agree_in_training(kind):
    module = _make(kind, torch.float32, num_layers=2, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.4,
                   batch_first=True)
    x = torch.randn(3, 7, 4)
    assert_backends_agree(module, lambda x: (x,), [x], torch.float32, seed=5)
    assert_backends_agree(module, lambda x: (x, None, [7, 2, 5]), [x], torch.float32, seed=5)


@pytest.mark.parametrize("kind", ["relu", "gru", "lstm"])
def test_gradcheck(kind):
    cls, extra = {**KINDS, **LAYER_NORM}[kind]
    module = getattr(rnnkit, cls)(2, 3, 2, **extra, dtype=torch.float64, recurrent_dropout=0.3, zoneout=0.25,
                                  weight_drop=0.2)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    def run(x, *_):
        torch.manual_seed(7)  # (the same masks at every evaluation)
        return tuple(_flat(module(x, lengths=[4, 2])))

    assert torch.autograd.gradcheck(run, (x, *params))
    module.eval()
    assert torch.autograd.gradcheck(run, (x, *params))


def test_off_and_eval_equal_torch_nn():
    """All zero: torch.nn's layer exactly; recurrent dropout and weight drop in eval: the layer
    as stored (zoneout in eval is its expectation: see the definitions' test)."""
    ref, ours = twins("lstm", torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    want = _flat(ref(x))
    for got in (_flat(ours.train()(x)), _flat(ours.eval()(x))):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float64])
    ours.recurrent_dropout, ours.weight_drop = 0.5, 0.5
    ours.eval()
    for g, w in zip(_flat(ours(x)), want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_seeds_reproduce_and_masks_differ():
    module = _make("gru", torch.float32, recurrent_dropout=0.5, zoneout=0.3, weight_drop=0.3)
    x = torch.randn(8, 4, 4)
    torch.manual_seed(1)
    a, _ = module(x)
    torch.manual_seed(1)
    b, _ = module(x)
    c, _ = module(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_recurrent_dropout_mask_is_per_sequence():
    """One mask per row over h's units, the same at every step: with W_ih zero and h_0 given,
    the h_in of every step is h * mask, so a unit dropped at the first step stays dropped."""
    module = _make("tanh", recurrent_dropout=0.5)
    with torch.no_grad():
        module.weight_ih_l0.zero_()
        module.bias_ih_l0.zero_()
        module.bias_hh_l0.zero_()
        module.weight_hh_l0.copy_(torch.eye(5))
    h0 = torch.ones(1, 64, 5, dtype=torch.float64)
    torch.manual_seed(3)
    out, _ = module(torch.zeros(3, 64, 4, dtype=torch.float64), h0)
    dropped = out[0] == 0
    assert 0.3 < dropped.double().mean() < 0.7
    assert torch.equal(out[1] == 0, dropped) and torch.equal(out[2] == 0, dropped)
    torch.testing.assert_close(out[0][~dropped], torch.tanh(torch.tensor(2.0, dtype=torch.float64)).expand(
        int((~dropped).sum())))


@pytest.mark.parametrize("name", ["recurrent_dropout", "zoneout", "weight_drop"])
@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.2", None])
def test_bad_probabilities_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} should be a probability"):
        rnnkit.GRU(2, 3, **{name: value})


def test_repr_pickle_and_to_torch():
    module = rnnkit.LSTM(2, 3, zoneout=0.1, weight_drop=0.2)
    assert "zoneout=0.1" in repr(module) and "weight_drop=0.2" in repr(module)
    assert "recurrent_dropout" not in repr(module)
    copy = pickle.loads(pickle.dumps(module))
    assert copy.zoneout == 0.1 and copy.recurrent_dropout == 0.0
    with pytest.raises(ValueError, match="torch.nn.LSTM has no equivalent of zoneout=0.1, weight_drop=0.2"):
        rnnkit.to_torch(module)
    state = copy.state_dict()
    torch.nn.LSTM(2, 3).load_state_dict(state)  # (the weights themselves are torch.nn's)


def test_stream_runs_zoneout_in_eval():
    module = _make("lstm", torch.float32, zoneout=0.3).eval()
    x = torch.randn(6, 1, 4)
    want, state = module(x)
    stream = rnnkit.Stream(module)
    got = torch.stack([stream(x_t) for x_t in x])
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    module.zoneout = 0.0  # back on the kernels, the state carried over
    more = torch.randn(2, 1, 4)
    want, _ = module(more, state)
    got = torch.stack([stream(x_t) for x_t in more])
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_routes():
    """Recurrent dropout and zoneout run on the fused kernels' sequence route (never the single
    step's, which has no regularizers), and the reference under torch.compile."""
    from rnnkit import _plan
    from rnnkit.cells import CELLS, Dims

    for T in (1, 7):
        call = _plan.Call(CELLS["LSTM"], 2, 1, T, 3, Dims(4, 5, 0, 4), torch.float32, "cpu", True, True, False,
                          "auto", regular=True)
        assert _plan.route(call).path == "sequence"
        assert _plan.route(call._replace(backend="fused")).path == "sequence"
        assert _plan.route(call._replace(compiling=True)).path == "reference"
        assert _plan.route(call._replace(dropout=True)) == _plan.Route("sequence", by_layer=True)


@pytest.mark.parametrize("how", ["threads", "columns", "chunks", "by_layer"])
def test_fused_loops_in_every_arrangement(how):
    """Batch chunks on threads, column-split products, time chunks, and the layer-by-layer route
    of inter-layer dropout: the fused kernels with the regularizers equal the reference."""
    from rnnkit import _plan

    limits = {"threads": dict(min_work_per_thread=1, min_loop_work=1, min_column_work=10**12),
              "columns": dict(min_column_work=1, min_loop_work=1, plain_max_row_steps=0),
              "chunks": dict(chunk_min_elements=0, chunk_rows=1, time_chunks=3), "by_layer": {}}[how]
    extra = {"dropout": 0.3} if how == "by_layer" else {}
    for kind in ("tanh", "gru", "lstm-proj", "ln-lstm", "ln-gru"):
        module = _make(kind, num_layers=2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2, **extra)
        x = torch.randn(6, 4, 4, dtype=torch.float64)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            with _plan.limits(**limits):
                assert_backends_agree(module, lambda x: (x, None, [6, 3, 5, 6]), [x], torch.float64, seed=2)
                module.eval()
                assert_backends_agree(module, lambda x: (x,), [x], torch.float64, seed=2)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.97, 1.0])
def test_zone_masks(p):
    """Zoneout's masks: 0/1 of the asked dtype, mean p (within 5 standard deviations over a
    million draws), the same from the same seed, independent between seeds and between
    neighbouring elements; and the fused loops draw the same (the definitions' test)."""
    like = torch.empty(0, dtype=torch.float64)
    a = zone_masks((1000, 1001), p, 12345, like)
    assert a.dtype == torch.float64 and a.shape == (1000, 1001)
    assert ((a == 0) | (a == 1)).all()
    sd = (p * (1 - p) / a.numel()) ** 0.5
    assert abs(a.mean().item() - p) <= 5 * sd
    assert torch.equal(zone_masks((1000, 1001), p, 12345, like), a)
    b = zone_masks((1000, 1001), p, 12346, like)
    both = (a * b).mean().item()  # independent masks: P(both) = p^2
    assert abs(both - p * p) <= 5 * (p * p * (1 - p * p) / a.numel()) ** 0.5 + 1e-12
    flat = a.reshape(-1)
    neighbours = (flat[1:] * flat[:-1]).mean().item()
    assert abs(neighbours - p * p) <= 5 * (p * p * (1 - p * p) / flat.numel()) ** 0.5 + 1e-12


@pytest.mark.filterwarnings(  # (dynamo's own, as in test_ecosystem's compile tests)
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning")
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_under_torch_compile():
    """torch.compile runs the regularizers on the reference ops (zoneout's masks are made
    outside the traced graph), with the numbers of the eager call."""
    module = _make("gru", torch.float32, zoneout=0.2, recurrent_dropout=0.2, weight_drop=0.2)
    x = torch.randn(4, 2, 4)
    torch.manual_seed(9)
    want = module(x)[0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: module(x)[0], backend="aot_eager")  # (see test_ecosystem)
    torch.manual_seed(9)
    torch.testing.assert_close(compiled(x), want, **TOL[torch.float32])


def test_values_set_later_are_checked():
    module = _make("lstm", torch.float32)
    module.zoneout = 1.5
    with pytest.raises(ValueError, match=r"zoneout should be a probability, a number in \[0, 1\]; got 1.5"):
        module(torch.randn(3, 1, 4))
