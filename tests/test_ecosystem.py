"""rnnkit among the rest of torch: threads, DistributedDataParallel, torch.compile, conversion to
torch.nn for TorchScript / torch.export / ONNX, pickle and torch.save."""

from __future__ import annotations

import io
import os
import pickle
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rnnkit
from oracle import CELL_KINDS, TOL, flat, state_features, twins

F32, F64 = torch.float32, torch.float64

# Every layer kind rnnkit has (LSTM once it exists), built alike in both namespaces.
LAYER_KINDS = [k for k, (cls, _) in CELL_KINDS.items() if hasattr(rnnkit, cls)]
CELL_CLASSES = [c for c in ("RNNCell", "GRUCell", "LSTMCell") if hasattr(rnnkit, c)]


def _layer(namespace, kind, **kwargs):
    cls, extra = CELL_KINDS[kind]
    return getattr(namespace, cls)(**extra, **kwargs)


def _cell_input(cls, batch=3, input_size=4, hidden_size=5, dtype=F64):
    x = torch.randn(batch, input_size, dtype=dtype)
    h = torch.randn(batch, hidden_size, dtype=dtype)
    return x, ((h, torch.randn_like(h)) if cls == "LSTMCell" else h)


def _assert_close_all(got, expected, dtype):
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, (tuple, list)):
            _assert_close_all(g, e, dtype)
        else:
            torch.testing.assert_close(g, e, **TOL[dtype])


# ---------------------------------------------------------------------------------- threads
def test_threads_share_one_module(backend):
    """4 threads run forward and backward on one module at once; each gets what it gets alone."""
    torch.manual_seed(0)
    _, module = twins("gru", F64, input_size=4, hidden_size=6, num_layers=2, bidirectional=True)
    n_threads, rounds = 4, 5
    inputs = [torch.randn(7, 3, 4, dtype=F64) for _ in range(n_threads * rounds)]

    def run(x):
        leaf = x.clone().requires_grad_(True)
        out, h = module(leaf)
        (out.square().sum() + h.sum()).backward()
        return out.detach(), h.detach(), leaf.grad

    sequential = [run(x) for x in inputs]
    param_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)

    results: list = [None] * len(inputs)
    errors: list = []
    barrier = threading.Barrier(n_threads)

    def worker(index):
        try:
            barrier.wait()
            for k in range(index, len(inputs), n_threads):
                results[k] = run(inputs[k])
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for got, expected in zip(results, sequential):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **TOL[F64])
    # Parameter gradients accumulated from every thread: same total, summed in another order.
    for p, expected in zip(module.parameters(), param_grads):
        torch.testing.assert_close(p.grad, expected, **TOL[F64])


# ------------------------------------------------------------------------------ distributed
DDP_STEPS, DDP_BATCH, DDP_LR = 3, 8, 0.5


class _Regressor(nn.Module):
    """A small model with an rnnkit layer inside: the last output step through a linear head."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.rnn = rnnkit.GRU(3, 5, num_layers=2, batch_first=True, dtype=dtype)
        self.head = nn.Linear(5, 2, dtype=dtype)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _ddp_setup():
    """Model, data and targets of the DDP test, identical in every process (fixed seeds)."""
    torch.manual_seed(1234)
    model = _Regressor()
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(DDP_BATCH, 6, 3, generator=gen, dtype=F64)
    y = torch.randn(DDP_BATCH, 2, generator=gen, dtype=F64)
    return model, x, y


def _train(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _ddp_worker(rank, world_size, port, backends, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for name in backends:  # one process group for all: starting processes is the slow part
            with rnnkit.use_backend(name):
                model, x, y = _ddp_setup()
                shard = slice(rank * DDP_BATCH // world_size, (rank + 1) * DDP_BATCH // world_size)
                # Equal shards and a mean loss: DDP's gradient average is the full batch's gradient.
                _train(nn.parallel.DistributedDataParallel(model), x[shard], y[shard])
            torch.save(model.state_dict(), Path(result_dir) / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_matches_one_process(tmp_path):
    """Two processes on gloo train a model holding an rnnkit.GRU, each on half the batch: both
    end with identical parameters, equal to one process training on the whole batch."""
    world_size, backends = 2, [b for b in rnnkit.available_backends() if b != "auto"]
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), backends, str(tmp_path)), nprocs=world_size)
    initial = _ddp_setup()[0].state_dict()
    for name in backends:
        states = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(world_size)]
        with rnnkit.use_backend(name):
            model, x, y = _ddp_setup()
            _train(model, x, y)
        for key, value in model.state_dict().items():
            assert torch.equal(states[0][key], states[1][key]), (name, key)  # ranks agree exactly
            torch.testing.assert_close(states[0][key], value, atol=1e-5, rtol=1e-5)
            assert not torch.equal(value, initial[key]), (name, key)  # training moved every parameter


# ---------------------------------------------------------------------------- torch.compile
# Dynamo reads `.grad` of non-leaf tensors when it breaks the graph around an opaque call and
# hides the resulting warning with its own filter, which warnings-as-errors overrides.
# ---------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("case", ["float32 input", "bfloat16 input", "float32 hx", "packed", "bidirectional"])
def test_cpu_autocast_follows_torch(kind, case, backend):
    """Under CPU autocast (a Linear before the layer hands it bfloat16) the layers run like
    torch.nn's: no dtype error, the same output and state dtypes (autocast's per-op choices;
    torch.nn's LSTM without projections goes whole to bfloat16, as its oneDNN LSTM does), values
    and gradients within bfloat16's precision of torch.nn's (identical where both run the same
    ops), float32 gradients for the float32 parameters."""
    torch.manual_seed(0)
    ref, ours = twins(kind, input_size=4, hidden_size=5, num_layers=2, bidirectional=case == "bidirectional")
    x = torch.randn(6, 3, 4)
    if case == "bfloat16 input":
        x = x.bfloat16()
    hx = None
    if case == "float32 hx":
        hx = tuple(torch.randn(2, 3, n) for n in state_features(ref))
        hx = hx if len(hx) == 2 else hx[0]
    if case == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, [6, 4, 2])
    onednn = torch._C._get_mkldnn_enabled()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref(x, hx)
    except RuntimeError as error:  # a CPU without oneDNN's bfloat16 LSTM: both then run without it
        if "primitive descriptor" not in str(error):
            raise
        onednn = False
    results = []
    before = torch._C._get_mkldnn_enabled()  # (torch.backends.mkldnn.flags warns about TF32 here)
    torch._C._set_mkldnn_enabled(onednn)
    try:
        for module in (ref, ours):
            module.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = flat(module(x, hx))
            sum(o.float().sin().sum() for o in outputs).backward()
            results.append((outputs, [p.grad for p in module.parameters()]))
    finally:
        torch._C._set_mkldnn_enabled(before)
    (expected, expected_grads), (got, got_grads) = results
    for g, e in zip(got + got_grads, expected + expected_grads):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g.float(), e.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("cls", CELL_CLASSES)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_cpu_autocast_cells_follow_torch(cls, dtype):
    torch.manual_seed(0)
    ref = getattr(nn, cls)(4, 5)
    ours = getattr(rnnkit, cls)(4, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref(x), ours(x)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e)


@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"
)
def test_torch_compile_matches_eager(backend):
    """A model holding an rnnkit layer compiles into one graph (fullgraph: the fused kernels are
    the custom op rnnkit::layer) and gives eager's numbers, forward and backward. The
    "aot_eager" compiler traces forward and backward graphs like inductor does; inductor itself
    takes about 90 s to build its C++ kernels on these machines."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = _Regressor(dtype=F32)
    x = torch.randn(4, 6, 3)
    results = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        y = run(leaf)
        y.square().sum().backward()
        results.append([y.detach(), leaf.grad, *(p.grad for p in model.parameters())])
    eager, compiled = results
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, **TOL[F32])


@pytest.mark.parametrize("kind", ["tanh", "gru", "lstm", "lstm-proj"])
def test_torch_func_transforms_match_torch(kind, backend):
    """torch.func (grad through functional_call, jacrev) sees through torch ops only: inside a
    transform the layers run the reference ops, so gradients and Jacobians equal torch.nn's."""
    from torch.func import functional_call, grad, jacrev

    ref, ours = twins(kind, input_size=3, hidden_size=4, num_layers=2, batch_first=True)
    x = torch.randn(2, 5, 3)
    results = []
    for m in (ref, ours):
        params = {k: v.detach() * 1.5 for k, v in m.named_parameters()}
        g = grad(lambda p: functional_call(m, p, (x,))[0].pow(2).sum())(params)
        j = jacrev(lambda inp: m(inp)[0].sum(-1))(x)
        results.append([*g.values(), j])
    for r, f in zip(*results):
        torch.testing.assert_close(f, r, **TOL[torch.float32])


# (torch.nn.LSTM without projections runs oneDNN, which has no forward AD: it raises there.)
# torch's make_dual loads its jvp decompositions with torch.jit.script on first use, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["tanh", "gru", "lstm-proj"])
def test_forward_mode_ad_matches_torch(kind, backend):
    """Dual tensors (torch.autograd.forward_ad) reach the reference ops, as in torch.nn."""
    import torch.autograd.forward_ad as fwAD

    ref, ours = twins(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x, tangent = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    results = []
    for m in (ref, ours):
        with fwAD.dual_level():
            out, _ = m(fwAD.make_dual(x, tangent))
            results.append(fwAD.unpack_dual(out))
    for r, f in zip(*results):
        torch.testing.assert_close(f, r, **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["tanh", "gru", "lstm-proj"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_matches_torch(kind, use_reentrant, backend):
    """torch.utils.checkpoint drops what forward saved and recomputes it for backward: the
    stack's backward must read the recomputed arrays, not the first forward's."""
    from torch.utils.checkpoint import checkpoint

    ref, ours = twins(kind, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3)
    results = []
    for m in (ref, ours):
        leaf = x.clone().requires_grad_(True)
        out = checkpoint(lambda inp: m(inp)[0].tanh(), leaf, use_reentrant=use_reentrant)
        out.pow(2).sum().backward()
        results.append([out.detach(), leaf.grad, *(p.grad for p in m.parameters())])
    for r, f in zip(*results):
        torch.testing.assert_close(f, r, **TOL[torch.float32])


# ------------------------------------------------------------------- to_torch / from_torch
LAYER_ARGS = dict(input_size=4, hidden_size=5, num_layers=2, bias=False, batch_first=True, bidirectional=True)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("direction", ["to_torch", "from_torch"])
def test_layer_conversion_both_ways(kind, direction):
    torch.manual_seed(3)
    source_ns, target_ns = (rnnkit, nn) if direction == "to_torch" else (nn, rnnkit)
    source = _layer(source_ns, kind, **LAYER_ARGS, dtype=F64).eval()
    before = torch.random.get_rng_state()
    converted = getattr(rnnkit, direction)(source)
    assert torch.equal(torch.random.get_rng_state(), before)  # conversion draws no random numbers
    expected_cls = getattr(target_ns, CELL_KINDS[kind][0])
    assert type(converted) is expected_cls
    assert not converted.training
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(converted, attr) == getattr(source, attr), attr
    assert [(n, p.dtype, p.device) for n, p in converted.named_parameters()] == [
        (n, p.dtype, p.device) for n, p in source.named_parameters()
    ]
    for (_, p), (_, q) in zip(converted.named_parameters(), source.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()  # same values, own storage
    x = torch.randn(3, 6, 4, dtype=F64)
    _assert_close_all(flat(converted(x)), flat(source(x)), F64)


@pytest.mark.parametrize("cls", CELL_CLASSES)
@pytest.mark.parametrize("direction", ["to_torch", "from_torch"])
def test_cell_conversion_both_ways(cls, direction):
    torch.manual_seed(4)
    source_ns, target_ns = (rnnkit, nn) if direction == "to_torch" else (nn, rnnkit)
    extra = {"nonlinearity": "relu"} if cls == "RNNCell" else {}
    source = getattr(source_ns, cls)(4, 5, bias=False, **extra)
    converted = getattr(rnnkit, direction)(source)
    assert type(converted) is getattr(target_ns, cls)
    assert converted.training and converted.bias is False
    assert getattr(converted, "nonlinearity", None) == getattr(source, "nonlinearity", None)
    x, h = _cell_input(cls, dtype=F32)
    _assert_close_all(converted(x, h), source(x, h), F32)


def test_conversion_keeps_mode_dtype_dropout_and_frozen_parameters():
    source = rnnkit.RNN(3, 4, 3, nonlinearity="relu", dropout=0.25, dtype=F64)
    source.weight_hh_l1.requires_grad_(False)
    ref = rnnkit.to_torch(source)
    assert ref.training and ref.dropout == 0.25 and ref.nonlinearity == "relu"
    assert {n: p.requires_grad for n, p in ref.named_parameters()} == {
        n: p.requires_grad for n, p in source.named_parameters()
    }
    back = rnnkit.from_torch(ref.eval())
    assert not back.training and back.weight_ih_l0.dtype == F64
    torch.testing.assert_close(back.state_dict(), source.state_dict(), rtol=0, atol=0)


def test_conversion_of_a_one_layer_model_with_dropout_warns_no_more():
    with pytest.warns(UserWarning, match="dropout option adds dropout"):
        source = nn.GRU(3, 4, 1, dropout=0.5)
    assert rnnkit.from_torch(source).dropout == 0.5  # no second warning (warnings are errors here)


@pytest.mark.parametrize(
    "module,function",
    [
        (nn.Linear(2, 3), "to_torch"),
        (nn.GRU(2, 3), "to_torch"),  # already torch.nn
        (rnnkit.GRU(2, 3), "from_torch"),  # already rnnkit
        (nn.Sequential(nn.GRU(2, 3)), "from_torch"),
        (type("MyGRU", (nn.GRU,), {})(2, 3), "from_torch"),  # subclasses may change forward
    ],
    ids=["Linear", "torch-to_torch", "rnnkit-from_torch", "Sequential", "subclass"],
)
def test_conversion_refuses_other_modules(module, function):
    with pytest.raises(TypeError, match=rf"rnnkit.{function} converts .*GRU.*; got "):
        getattr(rnnkit, function)(module)


# ----------------------------------------------------------------------- export via torch.nn
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_torchscript_trace_of_exported_layer(kind):
    # torch.jit.script of torch.nn.RNN/GRU/LSTM fails in torch 2.13 (no `forward` on the
    # scripted module); tracing works. TorchScript is deprecated there in favour of torch.export.
    torch.manual_seed(5)
    ours = _layer(rnnkit, kind, input_size=4, hidden_size=5, num_layers=2).eval()
    x = torch.randn(6, 3, 4)
    traced = torch.jit.trace(rnnkit.to_torch(ours), (x,))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    other = torch.randn(6, 3, 4)
    _assert_close_all(flat(loaded(other)), flat(ours(other)), F32)



def _scriptables():
    """Every rnnkit layer and cell, and a model holding one, with an example input."""
    torch.manual_seed(6)
    layers = [(_layer(rnnkit, kind, input_size=3, hidden_size=4), torch.randn(5, 2, 3)) for kind in LAYER_KINDS]
    cells = [(getattr(rnnkit, cls)(3, 4), torch.randn(2, 3)) for cls in CELL_CLASSES]
    model = nn.Sequential(nn.Linear(3, 3), rnnkit.GRU(3, 4))
    return layers + cells + [(model, torch.randn(5, 2, 3))]


# torch.jit.script / trace cannot follow rnnkit's forward: both refuse at once, name the way out
# (rnnkit.to_torch) and warn nothing (a TracerWarning would be an error here).
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("module, x", _scriptables(), ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_refused_with_the_way_out(module, x, how):
    with rnnkit.use_backend("reference"), pytest.raises(RuntimeError) as info:
        torch.jit.script(module) if how == "script" else torch.jit.trace(module, (x,))
    message = str(info.value)
    assert f"torch.jit.{how} does not support rnnkit." in message
    assert "rnnkit.to_torch(module)" in message


# torch.export warns about torch.nn.RNNBase itself (its _flat_weights list), whoever built it.
@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights.*were assigned during export:UserWarning")
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_torch_export_of_exported_layer(kind):
    torch.manual_seed(6)
    ours = _layer(rnnkit, kind, input_size=4, hidden_size=5, bidirectional=True).eval()
    x = torch.randn(6, 3, 4)
    program = torch.export.export(rnnkit.to_torch(ours), (x,))
    other = torch.randn(6, 3, 4)
    _assert_close_all(flat(program.module()(other)), flat(ours(other)), F32)


def test_onnx_export_of_exported_layer(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's (torch.export-based) default exporter
    torch.manual_seed(7)
    ours = rnnkit.GRU(4, 5, 2).eval()
    x = torch.randn(6, 3, 4)
    path = tmp_path / "gru.onnx"
    torch.onnx.export(rnnkit.to_torch(ours), (x,), str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    got = [torch.from_numpy(a) for a in session.run(None, feeds)]
    _assert_close_all(got, flat(ours(x)), F32)


# ----------------------------------------------------------------------- pickle and save
def _all_modules():
    torch.manual_seed(8)
    layers = [_layer(rnnkit, kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
              for kind in LAYER_KINDS]
    cells = [getattr(rnnkit, cls)(3, 4) for cls in CELL_CLASSES]
    return layers + cells


def _call(module, seed=9):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(module, rnnkit.RNNCellBase):
        return module(torch.randn(2, 3, generator=gen))
    return flat(module(torch.randn(5, 2, 3, generator=gen)))


def _fresh_like(module):
    """The same class and arguments, other weights."""
    fresh = rnnkit.from_torch(rnnkit.to_torch(module))
    for p in fresh.parameters():
        torch.nn.init.normal_(p)
    return fresh


@pytest.mark.parametrize("module", _all_modules(), ids=lambda m: type(m).__name__ + getattr(m, "mode", ""))
def test_state_dict_pickle_and_torch_save_weights_only(module, tmp_path):
    expected = _call(module)
    via_pickle = _fresh_like(module)
    via_pickle.load_state_dict(pickle.loads(pickle.dumps(module.state_dict())), strict=True)
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    via_save = _fresh_like(module)
    via_save.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    for restored in (via_pickle, via_save):
        _assert_close_all(_call(restored), expected, F32)


@pytest.mark.parametrize("module", _all_modules(), ids=lambda m: type(m).__name__ + getattr(m, "mode", ""))
def test_whole_module_pickle_and_torch_save(module, tmp_path):
    module.eval()
    expected = _call(module)
    torch.save(module, tmp_path / "module.pt")
    restored = [pickle.loads(pickle.dumps(module)), torch.load(tmp_path / "module.pt", weights_only=False)]
    for copy in restored:
        assert type(copy) is type(module) and not copy.training
        assert repr(copy) == repr(module)
        _assert_close_all(_call(copy), expected, F32)


# A whole model saved with torch.save(model) loads with torch.load's default (weights_only=True):
# importing rnnkit allowlists its classes, and nothing else in their pickles needs it.
def _module_ids(m):
    return type(m).__name__ + getattr(m, "mode", "") + ("-proj" if getattr(m, "proj_size", 0) else "")


@pytest.mark.parametrize("module", _all_modules(), ids=_module_ids)
def test_whole_module_loads_with_weights_only_by_default(module, tmp_path):
    module.eval()
    with rnnkit.use_backend("reference"):
        expected = _call(module)
        torch.save(module, tmp_path / "module.pt")
        copy = torch.load(tmp_path / "module.pt")
        assert type(copy) is type(module) and repr(copy) == repr(module) and not copy.training
        _assert_close_all(_call(copy), expected, F32)


def test_model_holding_rnnkit_modules_loads_with_torchs_safe_globals(tmp_path):
    """A model of torch containers and rnnkit layers: the user lists torch's classes as torch
    asks (rnnkit's are listed already); listing rnnkit's too does not unlist them afterwards."""
    model = nn.ModuleDict({"rnn": rnnkit.LSTM(3, 4, proj_size=2), "cell": rnnkit.GRUCell(3, 4),
                           "stack": nn.Sequential(rnnkit.RNN(3, 4), rnnkit.RNNCell(4, 2))}).eval()
    x = torch.randn(5, 2, 3)
    with rnnkit.use_backend("reference"):
        expected = [flat(model["rnn"](x)), model["cell"](x[0]), model["stack"][1](model["stack"][0](x)[0][-1])]
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(Exception, match="ModuleDict"):  # torch's own containers are the user's call
        torch.load(tmp_path / "model.pt")
    with torch.serialization.safe_globals([nn.ModuleDict, nn.Sequential, nn.GRU, rnnkit.GRU, rnnkit.LSTM]):
        copy = torch.load(tmp_path / "model.pt")
    with rnnkit.use_backend("reference"):
        got = [flat(copy["rnn"](x)), copy["cell"](x[0]), copy["stack"][1](copy["stack"][0](x)[0][-1])]
    _assert_close_all(got, expected, F32)
    torch.save(rnnkit.LSTM(3, 4), tmp_path / "lstm.pt")
    assert type(torch.load(tmp_path / "lstm.pt")) is rnnkit.LSTM  # still listed after the block
