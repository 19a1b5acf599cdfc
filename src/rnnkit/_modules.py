"""torch.nn-compatible modules: RNN, GRU, LSTM and their single-step cells.

Constructor signatures, attributes, parameter names/order/shapes, initialisation, input and
output layouts and error messages follow torch.nn (PyTorch 2.13). The recurrence itself is
``rnnkit._driver`` (time loop, directions, lengths, layers) over a registered ``Cell``.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import Parameter
from torch.nn.utils.rnn import PackedSequence

from . import _cell, _run
from ._driver import Packing, check_probability, draw_regular
from .cells import CELLS, Cell, Dims
from .cells.base import init_


def _check_int(name: str, value, positive: bool = True) -> int:
    """``value`` as an int: any integer type (numpy's too: torch.nn takes them where it does not
    check the type), not a bool or float."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be greater than zero")
    return int(value)


_autocast = _run.autocast_on


def _refuse_torchscript(module: nn.Module, how: str) -> None:
    """TorchScript cannot follow rnnkit's forward (Python around numba kernels): say so before
    it fails somewhere obscure (or, tracing, warns and records a graph of the wrong ops), and
    name the ways out."""
    name = type(module).__name__
    if not hasattr(nn, name) or any(getattr(module, n) for n in getattr(module, "_regular_names", ())):
        raise RuntimeError(  # (rnnkit's own layers and options: no torch.nn twin to convert to)
            f"torch.jit.{how} does not support rnnkit.{name}, and torch.nn has no twin of it (rnnkit's own layer "
            "or options) to convert it to: use torch.export.export or torch.compile, which take rnnkit's modules "
            "as they are")
    raise RuntimeError(
        f"torch.jit.{how} does not support rnnkit.{name}: convert it to torch.nn "
        "first and trace that, torch.jit.trace(rnnkit.to_torch(module), example_inputs) (in a model, "
        "swap each rnnkit layer or cell for its rnnkit.to_torch twin); or use torch.export.export or "
        "torch.compile, which take rnnkit's modules as they are"
    )


def _check_dtype(input: Tensor, weight: Tensor, error: type = ValueError) -> None:
    """``error``: the type torch.nn raises there (the layers ValueError, the cells, failing in
    their matrix product, RuntimeError), so callers' except clauses work unchanged."""
    if input.dtype != weight.dtype and not _autocast(input):
        raise error(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})"
        )


def _check_state_like(state: tuple, input: Tensor) -> None:
    for s in state:
        if not isinstance(s, Tensor):
            raise TypeError(f"hx must be a Tensor (or a tuple of Tensors for LSTM), got {type(s).__name__}")
        if s.dtype != input.dtype and not _autocast(input):
            raise RuntimeError(
                f"hx dtype ({s.dtype}) does not match input dtype ({input.dtype}); "
                f"convert it: hx.to({input.dtype})"
            )
        if not (s.is_cpu and input.is_cpu) and s.device != input.device:  # (a device object costs a microsecond)
            raise RuntimeError(
                f"hx is on {s.device} but input is on {input.device}; move them to one device"
            )


def _as_state(hx, state_size: int, name: str) -> tuple:
    """The caller's hx as a tuple of state tensors: (h,) or (h, c)."""
    if state_size == 1:
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != state_size:
        raise TypeError(f"{name}: hx must be a tuple of {state_size} tensors (h_0, c_0)")
    return tuple(hx)


_RECORD_INDEX: dict = {}


def _record_index(cell: Cell, bias, proj: int) -> tuple:
    """For each field of the cell's parameter record, the position of that parameter among a
    layer-direction's registered ones (``cell.declared``), or -1 where it is absent."""
    key = (cell.mode, bool(bias), proj > 0)
    index = _RECORD_INDEX.get(key)
    if index is None:
        names = [p.name for p in cell.declared(bias, proj)]
        index = _RECORD_INDEX[key] = tuple(names.index(f) if f in names else -1 for f in cell.record._fields)
    return index


def _plain_call(module: nn.Module, forward, args: tuple, kwargs: dict) -> bool:
    """Whether nn.Module's call would do nothing but run ``forward`` (rnnkit's own, not a
    subclass's) on (input[, hx]): no hooks, no compiled call. Such calls may take the short
    path (_run.layer_fast), which skips the checks and routing of a call like one made before: a
    streaming step pays nn.Module's machinery and the module's checks at every call, more than
    its kernel. (Cells' short path, _cell.step_fast, checks the same itself.)"""
    hooks = torch.nn.modules.module
    return (not kwargs and 0 < len(args) < 3 and type(module).forward is forward
            and module._compiled_call_impl is None and not torch.compiler.is_compiling()
            and not (module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                     or module._backward_pre_hooks or hooks._global_forward_pre_hooks
                     or hooks._global_forward_hooks or hooks._global_backward_hooks
                     or hooks._global_backward_pre_hooks))


def _lengths(lengths, steps: int, batch: int, batched: bool, label: str) -> Tensor:
    """``lengths=`` checked, as a CPU int64 tensor of ``batch`` values in 1..steps."""
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{label}: lengths must hold integers, got a tensor of {lengths.dtype}")
        if lengths.is_meta:
            raise ValueError(f"{label}: lengths must hold values, got a tensor on the meta device")
        values = lengths.detach().to("cpu", torch.int64)
    else:
        if isinstance(lengths, numbers.Integral) and not isinstance(lengths, (bool, np.bool_)):
            lengths = [lengths]
        array = np.asarray(lengths)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise TypeError(f"{label}: lengths must be integers (a list, NumPy array or tensor), "
                            f"got {type(lengths).__name__} of {array.dtype}")
        if array.dtype == np.uint64:  # (values past int64's range: as large as int64 goes, refused below)
            array = np.minimum(array, np.iinfo(np.int64).max)
        values = torch.from_numpy(array.astype(np.int64, copy=False).copy())
    if values.dim() == 0 and (batch == 1 or not batched):  # (one row: one length, as a bare number)
        values = values.reshape(1)
    if values.dim() != 1 or values.shape[0] != batch:
        what = f"{batch} value{'s' if batch != 1 else ''}" + ("" if batched else " (unbatched input: one row)")
        raise ValueError(f"{label}: lengths must hold one length per row, {what}; got shape {tuple(values.shape)}")
    low, high = (int(values.min()), int(values.max())) if batch else (1, 1)
    if low < 1 or high > steps:
        bad = low if low < 1 else high
        row = int((values == bad).nonzero()[0, 0])
        raise ValueError(f"{label}: lengths must be in 1..{steps} (the input's {steps} steps); "
                         f"got {bad} at row {row}")
    return values


def _sorted_by_length(lengths: Tensor, steps: int) -> tuple:
    """(order, batch_sizes, steps run) of rows of these lengths: the rows by decreasing length
    (torch.sort, as pack_padded_sequence sorts them) and the active rows per step up to the
    longest; order None when every row runs all ``steps``."""
    if lengths.numel() == 0 or int(lengths.min()) == steps:
        return None, None, steps
    longest = int(lengths.max())
    sorted_lengths, order = torch.sort(lengths, descending=True)
    batch_sizes = (sorted_lengths.unsqueeze(0) > torch.arange(longest).unsqueeze(1)).sum(1)
    return order, batch_sizes, longest


class RNNBase(nn.Module):
    """Base class of the multi-layer recurrent layers (see :class:`RNN`, :class:`GRU`, :class:`LSTM`)."""

    __constants__ = [
        "mode", "input_size", "hidden_size", "num_layers", "bias",
        "batch_first", "dropout", "bidirectional", "proj_size",
    ]
    _dim_error = "{label}: Expected input to be 2D or 3D, got {dim}D instead"

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in CELLS:
            raise ValueError("Unrecognized RNN mode: " + mode)
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability "
                "of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(bidirectional, bool):  # (torch.nn builds the layer, then its op refuses it)
            raise TypeError(f"bidirectional should be of type bool, got: {type(bidirectional).__name__}")
        input_size = _check_int("input_size", input_size)
        hidden_size = _check_int("hidden_size", hidden_size)
        num_layers = _check_int("num_layers", num_layers)
        proj_size = _check_int("proj_size", proj_size, positive=False)
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and not CELLS[mode].projections:
            if CELLS[mode].module not in ("RNN", "GRU"):  # (rnnkit's own layers)
                raise ValueError(f"{CELLS[mode].module} has no proj_size (no projections)")
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")

        regular = {"recurrent_dropout": recurrent_dropout, "zoneout": zoneout, "weight_drop": weight_drop}
        for name, value in regular.items():
            check_probability(name, value)

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        # rnnkit's own recurrent regularizers (see the class docstrings): training only but zoneout
        self.recurrent_dropout = float(recurrent_dropout)
        self.zoneout = float(zoneout)
        self.weight_drop = float(weight_drop)

        # the parameters the cell declares (rnnkit.cells.base), per layer and direction, named as
        # torch.nn names them: {name}_l{layer}[_reverse]
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(self._num_directions):
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for param in self._cell.declared(bias, proj_size):
                    name = f"{param.name}_l{layer}{suffix}"
                    setattr(self, name, Parameter(torch.empty(param.shape(self._dims(layer)), **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def _dims(self, layer: int) -> Dims:
        """A layer's sizes, as the cell's declaration states its shapes in."""
        h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        first = self.input_size if layer == 0 else h_out * self._num_directions
        return Dims(first, self.hidden_size, self.proj_size, self._cell.gates)

    def _param_shape(self, kind: str, layer: int) -> tuple:
        """The shape of parameter ``kind`` of a layer, for the layer's current sizes."""
        param = next(p for p in self._cell.params if p.name == kind)
        return param.shape(self._dims(layer))

    def _expected_shapes(self) -> dict:
        """name -> the shape each parameter must have, whatever the user assigns: that of the
        current sizes (a user may change input_size along with weight_ih_l0, as with torch.nn).
        Kept per sizes in ``_shapes_for`` (made on first use, so modules pickled before it load)."""
        sizes = (self.input_size, self.hidden_size, self.proj_size)
        cached = self.__dict__.get("_shapes_for")
        if cached is None or cached[0] != sizes:
            D = self._num_directions  # (names are {kind}_l{layer}[_reverse], one list per layer-direction)
            cached = self._shapes_for = (sizes, {name: self._param_shape(name[:name.rindex("_l")], k // D)
                                                 for k, names in enumerate(self._all_weights) for name in names})
        return cached[1]

    @property
    def _num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _cell(self) -> Cell:
        return CELLS[self.mode]

    def reset_parameters(self) -> None:
        # in registration order, as torch.nn draws them (its RNGs' sequence, so seeded models match)
        declared = {p.name: p for p in self._cell.params}
        with torch.no_grad():
            for name, weight in self.named_parameters():
                init_(declared[name[:name.rindex("_l")]], weight, self.hidden_size)

    def flatten_parameters(self) -> None:
        """No-op, kept for torch.nn compatibility (cuDNN weight flattening has no CPU meaning)."""

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every submodule first
        _refuse_torchscript(self, "script")

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        for name in self._regular_names:
            if getattr(self, name) != 0:
                s += f", {name}={{{name}}}"
        return s.format(**self.__dict__)

    _regular_names = ("recurrent_dropout", "zoneout", "weight_drop")

    def _regular(self) -> tuple:
        return self.recurrent_dropout, self.zoneout, self.weight_drop

    def __setstate__(self, state):
        super().__setstate__(state)
        for name in self._regular_names:  # (a module pickled before they existed)
            self.__dict__.setdefault(name, 0.0)

    # ----------------------------------------------------------------- shapes and checks
    def _state_sizes(self, batch: int) -> list[tuple]:
        """Expected (L*D, B, .) shape of each recurrent state tensor: h (then c for LSTM). Kept
        for the last sizes and batch in ``_state_sizes_for`` (every call with hx checks them)."""
        key = (self.mode, self.input_size, self.hidden_size, self.proj_size, self.num_layers, self.bidirectional,
               batch)
        cached = self.__dict__.get("_state_sizes_for")
        if cached is None or cached[0] != key:
            shapes = self._cell.state_shapes(self._dims(0), self.num_layers * self._num_directions, batch)
            cached = self._state_sizes_for = (key, shapes)
        return list(cached[1])

    def _hidden_size_error(self, index: int) -> str:
        if self._cell.state_size == 1:
            return "Expected hidden size {}, got {}"
        return f"Expected hidden[{index}] size " + "{}, got {}"

    def _check_hx_rank(self, state: tuple, batched: bool) -> None:
        want = 3 if batched else 2
        if all(s.dim() == want for s in state):
            return
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if self._cell.state_size == 1:
            got = f"{state[0].dim()}-D tensor"
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {got}")
        got = ", ".join(f"{s.dim()}-D" for s in state)
        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got ({got}) tensors")

    def _layer_params(self, data: Tensor) -> list:
        """The parameters of every layer and direction, checked: parameters replaced by the user
        must still fit the layer (a wrong shape, a mix of dtypes or another device than the input
        would otherwise fail deep in the kernels). Runs at every call, so it reads the parameter
        dict directly (Module.__getattr__ costs more than the checks) and falls back to
        getattr for names that left it (parametrizations, plain attributes)."""
        expected = self._expected_shapes()
        registered = self._parameters
        cell = self._cell
        record = cell.record
        index = _record_index(cell, self.bias, self.proj_size)
        device = data.device
        dtype = first_name = None
        params = []
        for names in self._all_weights:
            found = []
            for name in names:
                w = registered.get(name)
                if w is None:
                    w = getattr(self, name)
                    if not isinstance(w, Tensor):
                        raise TypeError(f"{cell.label}: parameter {name} must be a Tensor, "
                                        f"got {type(w).__name__}")
                if w.shape != expected[name]:
                    raise RuntimeError(f"{cell.label}: parameter {name} has shape {tuple(w.shape)}, "
                                       f"expected {expected[name]}")
                if dtype is None:
                    dtype, first_name = w.dtype, name
                elif w.dtype != dtype:
                    raise RuntimeError(
                        f"{cell.label}: parameter {name} is {w.dtype} but {first_name} is {dtype}; "
                        f"convert the whole model: model.to({dtype})"
                    )
                if w.device != device:
                    raise RuntimeError(
                        "Input and parameter tensors are not at the same device, found input tensor at "
                        f"{device} and parameter tensor at {w.device}"
                    )
                found.append(w)
            params.append(record._make([None if i < 0 else found[i] for i in index]))
        return params

    # ------------------------------------- torch.nn.RNNBase's public checks (subclasses call them)
    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        _check_dtype(input, self._flat_weights[0])
        dims = 2 if batch_sizes is not None else 3
        if input.dim() != dims:
            raise RuntimeError(f"input must have {dims} dimensions, got {input.dim()}")
        self._check_input_size(input.size(-1))

    def _check_input_size(self, size: int) -> None:
        if size != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {size}")

    def _batch(self, input: Tensor, batch_sizes: Optional[Tensor]) -> int:
        if batch_sizes is not None:
            return int(batch_sizes[0])
        return input.size(0 if self.batch_first else 1)

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> tuple:
        return self._state_sizes(self._batch(input, batch_sizes))[0]

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple,
                          msg: str = "Expected hidden size {}, got {}") -> None:
        self._check_hidden_shape(hx, expected_hidden_size, msg)

    @staticmethod
    def _check_hidden_shape(hx: Tensor, expected: tuple, msg: str) -> None:
        if hx.shape != expected:
            raise RuntimeError(msg.format(expected, list(hx.shape)))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Optional[Tensor]) -> None:
        self.check_input(input, batch_sizes)
        sizes = self._state_sizes(self._batch(input, batch_sizes))
        for i, size in enumerate(sizes):  # (an LSTM's hidden[0], hidden[1], indexed as torch.nn does)
            self.check_hidden_size(hidden if len(sizes) == 1 else hidden[i], size, self._hidden_size_error(i))

    def permute_hidden(self, hx, permutation: Optional[Tensor]):
        if permutation is None:
            return hx
        if self._cell.state_size == 1:
            return hx.index_select(1, permutation)
        return tuple(s.index_select(1, permutation) for s in hx)

    # ------------------------------------------------------------------------ forward
    def __call__(self, *args, **kwargs):
        # a call like an earlier one: straight to its fused plan (see _plain_call)
        result = _run.layer_fast(self, *args) if _plain_call(self, RNNBase.forward, args, kwargs) else None
        return nn.Module.__call__(self, *args, **kwargs) if result is None else result

    def forward(self, input, hx=None, lengths=None):
        """(output, h_n) or, for LSTM, (output, (h_n, c_n)), as torch.nn's. ``lengths`` (rnnkit's
        own): B integers in 1..T, each row's length in a padded batch (a list, NumPy array or
        tensor on any device). The result equals packing with ``enforce_sorted=False``, running,
        and ``pad_packed_sequence(..., total_length=T)``: each row's output is zero past its
        length, h_n (and c_n) is taken at its own last step, the reverse direction starts there;
        the output keeps the input's layout."""
        if torch.jit.is_tracing():
            _refuse_torchscript(self, "trace")
        cell = self._cell
        packing: Optional[Packing] = None
        batched = True
        sorted_indices = unsorted_indices = None
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
            batch = int(batch_sizes[0])
        else:
            if not isinstance(input, Tensor):
                raise TypeError(
                    f"{cell.label}: input must be a Tensor or a PackedSequence, got {type(input).__name__}"
                )
            if input.dim() not in (2, 3):
                raise ValueError(self._dim_error.format(label=cell.label, dim=input.dim()))
            batched = input.dim() == 3
            data = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            batch = data.shape[0 if self.batch_first else 1]

        params = self._layer_params(data)
        _check_dtype(data, params[0].weight_ih)
        self._check_input_size(data.shape[-1])
        if hx is None:
            state = None  # zeros, made by whichever path runs the layers (see run_layers)
        else:
            state = _as_state(hx, cell.state_size, cell.label)
            _check_state_like(state, data)
            if not packed:
                self._check_hx_rank(state, batched)
            if not batched:
                state = tuple(s.unsqueeze(1) for s in state)
            for i, (s, size) in enumerate(zip(state, self._state_sizes(batch))):
                self._check_hidden_shape(s, size, self._hidden_size_error(i))
            if sorted_indices is not None and batch > 1:  # (one row: nothing to reorder)
                state = tuple(s.index_select(1, sorted_indices) for s in state)

        if packed:
            if lengths is not None:
                raise ValueError(f"{cell.label}: lengths= is for padded input; a PackedSequence carries its own "
                                 "lengths (pass the padded tensor with lengths=, or the PackedSequence alone)")
            packing = Packing(batch_sizes)
            x = packing.pad(data)
        else:
            x = data.transpose(0, 1) if self.batch_first else data
            if x.shape[0] == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        order = None
        x_steps = x.shape[0]
        if lengths is not None:
            lengths = _lengths(lengths, x.shape[0], x.shape[1], batched, cell.label)
            order, batch_sizes, steps = _sorted_by_length(lengths, x.shape[0])
            if order is not None:  # (rows sorted by decreasing length, as a PackedSequence's)
                order = order.to(x.device)
                x = x[:steps].index_select(1, order)
                packing = Packing(batch_sizes)
                if state is not None:
                    state = tuple(s.index_select(1, order) for s in state)

        if cell.mode == "LSTM" and self.proj_size == 0 and packing is None and x.is_cpu and _autocast(x) \
                and x.dtype != torch.float64 and torch.backends.mkldnn.is_available() \
                and torch._C._get_mkldnn_enabled():
            # under autocast only the reference runs (see _plan.route); torch.nn's LSTM without
            # projections on a dense CPU input runs oneDNN's LSTM, which autocast casts whole
            # (input, states, weights) to its lower precision
            low = torch.get_autocast_dtype("cpu")
            x = x.to(low)
            state = None if state is None else tuple(s.to(low) for s in state)
            params = [type(p)(*(None if t is None else t.to(low) for t in p)) for p in params]
        params, regulars = draw_regular(cell, x, params, *self._regular(), self.training)
        out, state_n = _run.run(cell, x, state, params, self.num_layers, self._num_directions, self.dropout,
                                self.training, packing, self if batched else None, regulars)

        if order is not None:  # rows back in the caller's order, zeros past the longest row
            unsort = torch.empty_like(order)
            unsort[order] = torch.arange(order.shape[0], device=order.device)
            out = out.index_select(1, unsort)
            if out.shape[0] < x_steps:
                out = torch.cat((out, out.new_zeros(x_steps - out.shape[0], *out.shape[1:])))
            state_n = tuple(s.index_select(1, unsort) for s in state_n)
            packing = None
        if packing is not None:
            output = PackedSequence(packing.pack(out), batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None and batch > 1:
                state_n = tuple(s.index_select(1, unsorted_indices) for s in state_n)
        else:
            output = out.transpose(0, 1) if self.batch_first else out
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                state_n = tuple(s.squeeze(1) for s in state_n)
        return output, state_n[0] if cell.state_size == 1 else state_n

def _reject_proj_size(kwargs: dict) -> None:
    # torch.nn.RNN/GRU refuse proj_size by keyword; a positional one reaches RNNBase, which
    # (unlike torch.nn, which silently builds weight_hr and fails later) refuses it too.
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class RNN(RNNBase):
    r"""A multi-layer Elman RNN with :math:`\tanh` or ReLU non-linearity; a drop-in for
    :class:`torch.nn.RNN` whose time loop runs in fused kernels on CPU.

    For each element in the input sequence, each layer computes

    .. math::
        h_t = \tanh(x_t W_{ih}^T + b_{ih} + h_{t-1} W_{hh}^T + b_{hh})

    where :math:`h_{t-1}` is the hidden state at time t-1 (or :math:`h_0`) and :math:`x_t` is the
    input, or the previous layer's output. With ``nonlinearity='relu'`` ReLU replaces tanh.

    Args:
        input_size: The number of expected features in the input `x`
        hidden_size: The number of features in the hidden state `h`
        num_layers: Number of stacked recurrent layers. Default: 1
        nonlinearity: ``'tanh'`` or ``'relu'``. Default: ``'tanh'``
        bias: If ``False``, the layer has no ``b_ih`` and ``b_hh``. Default: ``True``
        batch_first: If ``True``, input and output are ``(N, L, H)``; not h_0/h_n. Default: ``False``
        dropout: Dropout probability on the outputs of each layer but the last, in training
            mode. Default: 0
        bidirectional: If ``True``, becomes a bidirectional RNN. Default: ``False``
        device, dtype: Factory arguments for the parameters.

    Inputs: input, h_0
        - **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first``, unbatched
          ``(L, H_in)``, or a :class:`~torch.nn.utils.rnn.PackedSequence`.
        - **h_0**: ``(D * num_layers, N, H_out)`` (or ``(D * num_layers, H_out)`` unbatched).
          Defaults to zeros.

    Outputs: output, h_n
        - **output**: ``(L, N, D * H_out)`` (batch_first: ``(N, L, D * H_out)``), or a
          PackedSequence when the input was packed.
        - **h_n**: ``(D * num_layers, N, H_out)``, the final state of every layer and direction.

    Attributes:
        weight_ih_l[k], weight_hh_l[k], bias_ih_l[k], bias_hh_l[k] (and ``_reverse``): as in
        torch.nn.RNN, all initialised from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`,
        :math:`k = 1/\text{hidden\_size}`.

    Example::

        >>> rnn = rnnkit.RNN(10, 20, 2)
        >>> output, hn = rnn(torch.randn(5, 3, 10), torch.randn(2, 3, 20))
    """

    _dim_error = "{label}: Expected input to be 2D or 3D, got {dim}D tensor instead"

    def __init__(self, *args, **kwargs):
        _reject_proj_size(kwargs)
        if len(args) > 3:
            nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], *args, **kwargs)

    def extra_repr(self) -> str:
        # torch.nn.RNN omits a relu nonlinearity from its repr; we show it.
        s = super().extra_repr()
        return s + ", nonlinearity='relu'" if self.nonlinearity != "tanh" else s


class GRU(RNNBase):
    r"""A multi-layer gated recurrent unit (GRU) RNN; a drop-in for :class:`torch.nn.GRU`.

    For each element in the input sequence, each layer computes

    .. math::
        \begin{array}{ll}
        r_t = \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) \\
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})) \\
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{array}

    Args, inputs and outputs are those of :class:`RNN` without ``nonlinearity``. The weights
    stack the gates r|z|n: ``weight_ih_l[k]`` is ``(3*hidden_size, input_size)`` for k = 0 and
    ``(3*hidden_size, D*hidden_size)`` after, ``weight_hh_l[k]`` ``(3*hidden_size, hidden_size)``,
    the biases ``(3*hidden_size)``; all initialised from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`,
    :math:`k = 1/\text{hidden\_size}`.

    Example::

        >>> gru = rnnkit.GRU(10, 20, 2)
        >>> output, hn = gru(torch.randn(5, 3, 10), torch.randn(2, 3, 20))
    """

    def __init__(self, *args, **kwargs):
        _reject_proj_size(kwargs)
        super().__init__("GRU", *args, **kwargs)


class LSTM(RNNBase):
    r"""A multi-layer long short-term memory (LSTM) RNN, optionally with projections; a drop-in
    for :class:`torch.nn.LSTM`.

    For each element in the input sequence, each layer computes

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        g_t = \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    where :math:`h_t` and :math:`c_t` are the hidden and cell states at time t, :math:`x_t` is the
    input (or the previous layer's output), and :math:`i_t, f_t, g_t, o_t` are the input, forget,
    cell and output gates. With ``proj_size = P > 0`` the hidden state is projected,
    :math:`h_t = W_{hr} (o_t \odot \tanh(c_t))`, so :math:`h_t` and the output have P features
    while :math:`c_t` keeps ``hidden_size``.

    Args:
        input_size: The number of expected features in the input `x`
        hidden_size: The number of features in the hidden state `h` (and the cell state `c`)
        num_layers: Number of stacked recurrent layers. Default: 1
        bias: If ``False``, the layer has no ``b_ih`` and ``b_hh``. Default: ``True``
        batch_first: If ``True``, input and output are ``(N, L, H)``; not the states. Default: ``False``
        dropout: Dropout probability on the outputs of each layer but the last, in training
            mode. Default: 0
        bidirectional: If ``True``, becomes a bidirectional LSTM. Default: ``False``
        proj_size: If ``> 0``, an LSTM with projections of that size; must be smaller than
            ``hidden_size``. Default: 0
        device, dtype: Factory arguments for the parameters.

    Inputs: input, (h_0, c_0)
        - **input**: ``(L, N, H_in)``, ``(N, L, H_in)`` with ``batch_first``, unbatched
          ``(L, H_in)``, or a :class:`~torch.nn.utils.rnn.PackedSequence`.
        - **h_0**: ``(D * num_layers, N, H_out)`` (or ``(D * num_layers, H_out)`` unbatched).
        - **c_0**: ``(D * num_layers, N, H_cell)`` (or ``(D * num_layers, H_cell)`` unbatched).
          Both default to zeros when ``(h_0, c_0)`` is not given.

        where ``D`` is 2 if bidirectional else 1, ``H_cell = hidden_size`` and
        ``H_out = proj_size`` if ``proj_size > 0`` else ``hidden_size``.

    Outputs: output, (h_n, c_n)
        - **output**: ``(L, N, D * H_out)`` (batch_first: ``(N, L, D * H_out)``; unbatched
          ``(L, D * H_out)``), or a PackedSequence when the input was packed.
        - **h_n**: ``(D * num_layers, N, H_out)``, the final hidden state of every layer and direction.
        - **c_n**: ``(D * num_layers, N, H_cell)``, the final cell state of every layer and direction.

    Attributes:
        weight_ih_l[k]: ``(W_ii|W_if|W_ig|W_io)``, ``(4*hidden_size, input_size)`` for k = 0,
            ``(4*hidden_size, D*H_out)`` after.
        weight_hh_l[k]: ``(W_hi|W_hf|W_hg|W_ho)``, ``(4*hidden_size, H_out)``.
        bias_ih_l[k], bias_hh_l[k]: ``(4*hidden_size)``.
        weight_hr_l[k]: ``(proj_size, hidden_size)``, only when ``proj_size > 0``.
        The reverse direction has the same with the ``_reverse`` suffix. All are initialised from
        :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`, :math:`k = 1/\text{hidden\_size}`.

    Example::

        >>> lstm = rnnkit.LSTM(10, 20, 2)
        >>> h0, c0 = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
        >>> output, (hn, cn) = lstm(torch.randn(5, 3, 10), (h0, c0))
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Optional[Tensor]) -> tuple:
        return self._state_sizes(self._batch(input, batch_sizes))[1]


_LAYER_NORM_DOC = r"""A multi-layer layer-normalized {kind} (rnnkit's own; torch.nn has none).

    Every layer computes, with LN(v; g) normalizing each row's whole vector v to zero mean and
    unit (biased) variance (eps = 1e-5) and multiplying it by the gain g, and the biases outside
    the normalization:

    .. math::
        xw_t = LN(W_{{ih}} x_t; g_{{ih}}) + b_{{ih}}, \quad hw_t = LN(W_{{hh}} h_{{t-1}}; g_{{hh}}) + b_{{hh}}

    {update}

    Args, inputs and outputs are :class:`{base}`'s (no ``proj_size``), with ``lengths=`` and the
    recurrent regularizers (``recurrent_dropout``, ``zoneout``, ``weight_drop``) as on every
    rnnkit layer. Parameters per layer and direction (suffixes ``_l{{k}}`` and ``_reverse``):
    ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` as :class:`{base}`'s (shapes,
    initialisation; ``bias=False`` drops the two biases), ``layer_norm_ih`` and ``layer_norm_hh``
    ``({gates}*hidden_size)``, initialised to ones{extra}.
    """


class LayerNormLSTM(RNNBase):
    __doc__ = _LAYER_NORM_DOC.format(
        kind="LSTM", base="LSTM", gates=4,
        update=r"""then torch.nn's LSTM gates i|f|g|o from :math:`xw_t + hw_t`,
    :math:`c_t = f_t \odot c_{t-1} + i_t \odot g_t` and
    :math:`h_t = o_t \odot \tanh(LN(c_t; g_c) + \beta_c)` (LN over c's hidden_size values).""",
        extra=", and ``layer_norm_c_weight`` (ones) and ``layer_norm_c_bias`` (zeros), ``(hidden_size)``")

    def __init__(self, *args, **kwargs):
        super().__init__("LN_LSTM", *args, **kwargs)


class LayerNormGRU(RNNBase):
    __doc__ = _LAYER_NORM_DOC.format(
        kind="GRU", base="GRU", gates=3,
        update="""then torch.nn's GRU update from :math:`xw_t` and :math:`hw_t` (gates r|z|n, the n gate's
    :math:`b_{hn}` inside :math:`r_t \\odot (\\dots)`).""", extra="")

    def __init__(self, *args, **kwargs):
        super().__init__("LN_GRU", *args, **kwargs)


_CELL_SHAPES: dict = {}  # (mode, input size, hidden size) -> a cell module's parameter shapes



class RNNCellBase(nn.Module):
    """Base class of the single-step cells: one step of a registered cell's math."""

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        input_size = _check_int("input_size", input_size)
        hidden_size = _check_int("hidden_size", hidden_size)
        # (bias: any truth value, as torch.nn's cells take it)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        # the parameters the cell declares (rnnkit.cells.base), named as torch.nn's cells name
        # them; an absent one (no bias) is registered as None, as torch.nn does
        factory = {"device": device, "dtype": dtype}
        cell = CELLS[self._mode()]
        dims = Dims(input_size, hidden_size, 0, cell.gates)
        for param in cell.params:
            if param.present(bias, 0):
                self.register_parameter(param.name, Parameter(torch.empty(param.shape(dims), **factory)))
            elif param.when == "bias":
                self.register_parameter(param.name, None)
        self.reset_parameters()

    def _mode(self) -> str:
        """The registered cell this module steps (subclasses say which)."""
        raise NotImplementedError

    def _params(self, cell: Cell):
        """The cell's parameter record, checked: a parameter replaced by the user must still fit
        (the kernels would otherwise read past it). Reads the parameter dict directly
        (Module.__getattr__ costs more than the checks)."""
        registered = self._parameters
        key = (cell.mode, self.input_size, self.hidden_size)
        shapes = _CELL_SHAPES.get(key)
        if shapes is None:
            dims = Dims(self.input_size, self.hidden_size, 0, cell.gates)
            shapes = _CELL_SHAPES[key] = [param.shape(dims) for param in cell.params]
        found = []
        for param, shape in zip(cell.params, shapes):
            name = param.name
            if name in registered:
                w = registered[name]
            else:  # (a parametrization, a plain attribute; weight_hr, which cells never have)
                w = None if param.when == "proj" else getattr(self, name, None)
            if w is not None:
                if not isinstance(w, Tensor):
                    raise TypeError(f"{type(self).__name__}: parameter {name} must be a Tensor, got {type(w).__name__}")
                if w.shape != shape:
                    raise RuntimeError(f"{type(self).__name__}: parameter {name} has shape {tuple(w.shape)}, "
                                       f"expected {shape}")
            found.append(w)
        return cell.record(*found)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def reset_parameters(self) -> None:
        declared = {p.name: p for p in CELLS[self._mode()].params}
        with torch.no_grad():
            for name, weight in self.named_parameters():
                init_(declared[name], weight, self.hidden_size)

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every submodule first
        _refuse_torchscript(self, "script")

    def __call__(self, *args, **kwargs):
        # a plain step like the last one: straight to its route (see _plain_call; the cell's
        # short path checks the same itself, in fewer steps: a cell in a loop pays it every step)
        result = _cell.step_fast(self, args, kwargs, RNNCellBase.forward)
        return nn.Module.__call__(self, *args, **kwargs) if result is None else result

    def forward(self, input: Tensor, hx=None):
        if torch.jit.is_tracing():
            _refuse_torchscript(self, "trace")
        cell = CELLS[self._mode()]
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        state = None if hx is None else _as_state(hx, cell.state_size, name)
        if state is not None:
            for i, s in enumerate(state):
                what = "hidden" if cell.state_size == 1 else f"hx[{i}]"
                if s.dim() not in (1, 2):
                    raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
                if s.dim() != input.dim():
                    raise RuntimeError(
                        f"{name}: for {input.dim()}-D input, {what} should also be {input.dim()}-D "
                        f"but got {s.dim()}-D tensor"
                    )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if state is not None and not batched:
            state = tuple(s.unsqueeze(0) for s in state)

        # torch.nn's order (its cell ops check sizes, then the matrix products meet the dtypes)
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        for i, s in enumerate(state or ()):
            if s.shape[0] != x.shape[0]:
                raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match hidden{i} batch size {s.shape[0]}")
            if s.shape[1] != self.hidden_size:
                raise RuntimeError(
                    f"hidden{i} has inconsistent hidden_size: got {s.shape[1]}, expected {self.hidden_size}"
                )
        params = self._params(cell)
        _check_dtype(x, params.weight_ih, RuntimeError)
        if state is not None:
            _check_state_like(state, x)
        new = _cell.run(cell, x, state, params, self)
        if not batched:
            new = tuple(s.squeeze(0) for s in new)
        return new[0] if cell.state_size == 1 else new


class RNNCell(RNNCellBase):
    r"""An Elman RNN cell, :math:`h' = \tanh(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})` (or ReLU);
    a drop-in for :class:`torch.nn.RNNCell`.

    Args:
        input_size: The number of expected features in the input `x`
        hidden_size: The number of features in the hidden state `h`
        bias: If ``False``, no ``bias_ih`` / ``bias_hh`` (they are None). Default: ``True``
        nonlinearity: ``'tanh'`` or ``'relu'``. Default: ``'tanh'``. Unlike torch.nn, an unknown
            value is a ValueError at construction rather than at the first call.

    Inputs: input ``(N, H_in)`` or ``(H_in)``, hidden ``(N, H_out)`` or ``(H_out)`` (default zeros).
    Output: h' ``(N, H_out)`` or ``(H_out)``.
    """

    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)

    def _mode(self) -> str:
        return "RNN_RELU" if self.nonlinearity == "relu" else "RNN_TANH"


class GRUCell(RNNCellBase):
    r"""A GRU cell (gates r|z|n, as :class:`GRU`); a drop-in for :class:`torch.nn.GRUCell`.

    Args:
        input_size: The number of expected features in the input `x`
        hidden_size: The number of features in the hidden state `h`
        bias: If ``False``, no ``bias_ih`` / ``bias_hh`` (they are None). Default: ``True``

    Inputs: input ``(N, H_in)`` or ``(H_in)``, hidden ``(N, H_out)`` or ``(H_out)`` (default zeros).
    Output: h' ``(N, H_out)`` or ``(H_out)``.
    """

    def _mode(self) -> str:
        return "GRU"


class LSTMCell(RNNCellBase):
    r"""An LSTM cell (gates i|f|g|o, as :class:`LSTM`); a drop-in for :class:`torch.nn.LSTMCell`.

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}) \\
        f = \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}) \\
        g = \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}) \\
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}) \\
        c' = f \odot c + i \odot g \\
        h' = o \odot \tanh(c')
        \end{array}

    Args:
        input_size: The number of expected features in the input `x`
        hidden_size: The number of features in the hidden state `h` and cell state `c`
        bias: If ``False``, no ``bias_ih`` / ``bias_hh`` (they are None). Default: ``True``

    Inputs: input, (h_0, c_0)
        - **input**: ``(N, H_in)`` or ``(H_in)``.
        - **h_0**, **c_0**: ``(N, H)`` or ``(H)``; both default to zeros.

    Outputs: (h_1, c_1), each ``(N, H)`` or ``(H)``.

    Attributes:
        weight_ih: ``(4*hidden_size, input_size)``; weight_hh: ``(4*hidden_size, hidden_size)``;
        bias_ih, bias_hh: ``(4*hidden_size)``; all from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`,
        :math:`k = 1/\text{hidden\_size}`.

    Example::

        >>> cell = rnnkit.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 20)))
    """

    def _mode(self) -> str:
        return "LSTM"


class LayerNormLSTMCell(RNNCellBase):
    r"""One step of :class:`LayerNormLSTM` (rnnkit's own; torch.nn has none): :class:`LSTMCell`'s
    arguments, inputs and outputs; parameters ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh`` (as :class:`LSTMCell`'s), ``layer_norm_ih``, ``layer_norm_hh`` ``(4*hidden_size)``,
    ``layer_norm_c_weight``, ``layer_norm_c_bias`` ``(hidden_size)``.
    """

    def _mode(self) -> str:
        return "LN_LSTM"


class LayerNormGRUCell(RNNCellBase):
    r"""One step of :class:`LayerNormGRU` (rnnkit's own; torch.nn has none): :class:`GRUCell`'s
    arguments, inputs and outputs; parameters ``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh`` (as :class:`GRUCell`'s), ``layer_norm_ih``, ``layer_norm_hh`` ``(3*hidden_size)``.
    """

    def _mode(self) -> str:
        return "LN_GRU"
