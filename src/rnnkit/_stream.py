"""``rnnkit.Stream``: a recurrent module served one step (or one chunk of steps) at a time.

Real-time programs (keyword spotting, voice activity detection, control) feed a frame and want
the output before the next frame arrives, carrying the state in between. A layer called with
T = 1 pays a layer call's glue at every frame; the stream pays for it once:

- the whole stack (every layer) advances in one compiled call per call of the stream
  (``stream_rows`` in kernels/driver.py), the weights read as the module stores them;
- the state lives in arrays the stream owns, changed in place: a call allocates nothing but the
  output it returns;
- the module's current weights are used: they are the module's own memory, so in-place updates
  (an optimizer's step, ``load_state_dict``) show at the next call, and a parameter that was
  replaced or given new memory (``module.to(...)``, ``.data = ...``) is found by its address.

Inference only, as in eval mode: no gradient, no inter-layer dropout. Where the kernels do not
apply (another device or dtype) the stream runs the module itself, step by step, carrying the
state as tensors: the same API, at torch's speed.
"""

from __future__ import annotations

import operator
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ._arrays import NP_DTYPE, absent, array, kernel_params
from ._plan import supported
from .cells import CELLS, Cell, dims_of

_data_ptr = Tensor.data_ptr


def _padded(layers: int) -> int:
    """The kernel's tuple length for a stack of ``layers``: the next power of two."""
    return 1 << (layers - 1).bit_length()


def _cell_of(module: nn.Module) -> tuple:
    """(registered cell, layers, suffix of a layer's names, batch_first, projection size) of a
    torch.nn or rnnkit recurrent layer or cell."""
    from ._modules import RNNBase, RNNCellBase

    if isinstance(module, (RNNBase, nn.RNNBase)):
        if module.bidirectional:
            raise ValueError(
                "rnnkit.Stream: a bidirectional module cannot stream (its reverse direction reads the "
                "sequence from its end); run it over the whole sequence instead")
        if module.mode not in CELLS:
            raise ValueError(f"rnnkit.Stream: unknown recurrent mode {module.mode!r}")
        return CELLS[module.mode], module.num_layers, "_l{}", module.batch_first, getattr(module, "proj_size", 0)
    if isinstance(module, RNNCellBase):
        return CELLS[module._mode()], 1, "", False, 0
    if isinstance(module, nn.RNNCellBase):
        if isinstance(module, nn.LSTMCell):
            mode = "LSTM"
        elif isinstance(module, nn.GRUCell):
            mode = "GRU"
        else:
            mode = "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"
        return CELLS[mode], 1, "", False, 0
    raise TypeError(
        "rnnkit.Stream: expected a recurrent layer or cell (rnnkit or torch.nn RNN, GRU, LSTM, RNNCell, "
        f"GRUCell, LSTMCell), got {type(module).__name__}")


class Stream:
    """Run a recurrent ``module`` one step (or one chunk of steps) at a time, carrying its state.

    Args:
        module: an rnnkit or torch.nn ``RNN``, ``GRU`` or ``LSTM`` (any ``num_layers``,
            ``proj_size``; not bidirectional), or an ``RNNCell``, ``GRUCell`` or ``LSTMCell``.
        batch_size: B, the number of independent streams advanced together (rows).

    Call it with one step ``x`` of shape (B, I), or (I,) when B = 1, or a chunk of steps
    (T, B, I) ((B, T, I) for a ``batch_first`` layer), as a torch tensor or a NumPy array of
    the module's dtype; it returns the module's output for those steps in the same shape
    convention and of the same kind ((B, H_out), (H_out,) or (T, B, H_out)).

    ``state``: the carried state in torch.nn's layout, as tensors (a copy): a layer's ``h_n``
    (L, B, H_out), and ``(h_n, c_n)`` for an LSTM; a cell's ``h`` (B, H) (or ``(h, c)``).
    Assign it (tensors or arrays of those shapes, or None for zeros) to set it.
    ``reset(rows=None)`` sets every row's state to zeros, or only those of ``rows`` (indices,
    or a boolean mask of length B).

    Inference only, as in eval mode: nothing is differentiated, inter-layer dropout is off.

    Example::

        >>> vad = rnnkit.GRU(40, 64, num_layers=2).eval()
        >>> stream = rnnkit.Stream(vad, batch_size=1)
        >>> for frame in frames:            # (1, 40) each, as they arrive
        ...     y = stream(frame)           # (1, 64): the top layer's h for this frame
        >>> stream.reset()                  # a new utterance
    """

    def __init__(self, module: nn.Module, batch_size: int = 1):
        cell, layers, suffix, batch_first, proj = _cell_of(module)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"rnnkit.Stream: batch_size must be a positive integer, got {batch_size!r}")
        self.module = module
        self.batch_size = batch_size
        self.batch_first = batch_first
        self._cell = cell
        self._layers = layers
        self._is_cell = suffix == ""
        # rnnkit's layers may have zoneout, whose eval-mode blend only the module runs
        self._zoned = hasattr(module, "zoneout")
        # every layer's parameter names, in the cell's declaration (None where absent)
        self._names = [[p.name + suffix.format(k) for p in cell.params] for k in range(layers)]
        self._get = module._parameters.__getitem__
        self._present: list = []  # the names of the parameters present at the last reading ...
        self._tensors: list = []  # ... the tensors read then ...
        self._addresses: Optional[tuple] = None  # ... and their addresses (None: read at every call)
        self.dtype = getattr(module, self._names[0][0]).dtype
        self._h = self._c = self._tensor_state = None
        self._weights()  # (sets the sizes, the state and the kernel's arguments)

    # ---- the module's weights, seen at every call
    def _fresh(self) -> bool:
        """Whether the parameters read last are still the module's, at the same addresses."""
        try:
            current = list(map(self._get, self._present))
            return all(map(operator.is_, current, self._tensors)) and \
                tuple(map(_data_ptr, current)) == self._addresses
        except (KeyError, TypeError):  # (a parameter moved out of the module's dict, or removed)
            return False

    def _weights(self) -> None:
        """(Re)read the module's parameters: check them, and rebuild what the kernel takes."""
        module, cell = self.module, self._cell
        tensors = {n: getattr(module, n, None) for names in self._names for n in names}
        self._present = [n for n, t in tensors.items() if t is not None]
        self._tensors = [tensors[n] for n in self._present]
        first = tensors[self._present[0]]
        dtype, device = first.dtype, first.device
        for n in self._present:
            t = tensors[n]
            if not isinstance(t, Tensor):
                raise TypeError(f"rnnkit.Stream: parameter {n} must be a Tensor, got {type(t).__name__}")
            if t.dtype != dtype or t.device != device:
                raise RuntimeError(f"rnnkit.Stream: parameter {n} is {t.dtype} on {t.device}, but "
                                   f"{self._present[0]} is {dtype} on {device}")
        names0 = self._names[0]
        dims = dims_of(cell, tensors[names0[0]].shape, tensors[names0[1]].shape)
        self._dims = dims
        self.input_size = dims.input
        self._step_shape = (self.batch_size, dims.input)
        self._out_shape = (self.batch_size, dims.out)
        self._np_dtype = np.dtype(NP_DTYPE.get(dtype, np.float32))
        self._fused = supported(cell, dtype, device.type)
        shapes = self._state_shapes()
        changed = dtype != self.dtype or self._h is None or (self._h.shape, self._c.shape) != shapes
        self.dtype = dtype
        self.device = device
        if changed:  # (another dtype or other sizes: new buffers, keeping what still fits)
            self._new_state()
        if self._fused:
            self._take_tensor_state()
        else:
            self._addresses = None
            return
        records = []
        for k, names in enumerate(self._names):
            want = dims if k == 0 else dims._replace(input=dims.out)
            record = cell.record(*(tensors[n] for n in names))
            for param, n, t in zip(cell.params, names, record):
                if t is not None and tuple(t.shape) != param.shape(want):
                    raise RuntimeError(f"rnnkit.Stream: parameter {n} has shape {tuple(t.shape)}, "
                                       f"expected {param.shape(want)}")
            records.append(record)
        np_dtype = NP_DTYPE[dtype]
        arrays = [type(r)(*[None if t is None else array(t.detach()) for t in r]) for r in records]
        b1, b2 = absent(np_dtype, 1), absent(np_dtype, 2)
        B, GH = self.batch_size, dims.gate_rows
        # one entry per layer, padded with the last layer's to 1, 2, 4, 8, ... entries (the
        # kernel compiles once per tuple length)
        arrays += [arrays[-1]] * (_padded(len(arrays)) - len(arrays))
        kernel = [kernel_params(cell, a) for a in arrays]  # (b_ih, b_hh, own) of each
        self._args = [
            None,  # x
            tuple(a.weight_ih for a in arrays),
            tuple(b1 if b_ih is None else b_ih for b_ih, _, _ in kernel),
            tuple(a.weight_hh for a in arrays),
            tuple(b1 if b_hh is None else b_hh for _, b_hh, _ in kernel),
            tuple(b2 if getattr(a, "weight_hr", None) is None else a.weight_hr for a in arrays),
            tuple(own for _, _, own in kernel),
            self._h, self._c,
            None,  # out
            np.empty((B, GH), np_dtype), np.empty((B, GH), np_dtype),  # xw, hw
            np.empty((B, dims.hidden), np_dtype) if dims.proj else b2,  # m
            np.empty((1, 1, max(dims.hidden, cell.saved_size(dims.hidden))), np_dtype),  # saved (scratch)
        ]
        from . import _loops

        self._kernel = _loops.KERNELS[cell.mode].stream_rows
        # the parameters' addresses: a new tensor or new memory means reading them anew (a copy,
        # made for a parameter that is not contiguous, is stale at once: read at every call)
        contiguous = all(t.is_contiguous() and not t.is_conj() for t in self._tensors)
        self._addresses = tuple(map(_data_ptr, self._tensors)) if contiguous else None

    def _take_tensor_state(self) -> None:
        """Back from the module's own route: its state into the kernel's buffers."""
        tensor_state = self._tensor_state
        if tensor_state is not None:
            for buffer, s in zip((self._h, self._c), tensor_state):
                buffer[...] = s.detach().cpu().numpy()
            self._tensor_state = None

    def _state_shapes(self) -> tuple:
        """The state buffers' shapes: h (L, B, H_out), c (L, B, H) or (L, B, 0)."""
        dims, B = self._dims, self.batch_size
        return (self._layers, B, dims.out), (self._layers, B, dims.hidden if self._cell.state_size == 2 else 0)

    def _new_state(self) -> None:
        """Zero state in the current dtype and sizes (keeping the carried values that fit)."""
        shape_h, shape_c = self._state_shapes()
        np_dtype = NP_DTYPE.get(self.dtype, np.float32)
        old = (self._h, self._c)
        self._h, self._c = np.zeros(shape_h, np_dtype), np.zeros(shape_c, np_dtype)
        if old[0] is not None and old[0].shape == shape_h:
            self._h[...] = old[0]
        if old[1] is not None and old[1].shape == shape_c:
            self._c[...] = old[1]

    # ---- calls
    def __call__(self, x):
        if not self._fresh():
            self._weights()
        is_tensor = isinstance(x, Tensor)
        fused = self._fused and not (self._zoned and self.module.zoneout)
        if is_tensor:
            if not (fused and x.is_cpu):
                return self._run_module(x)
            try:
                a = x.numpy()
            except RuntimeError:  # (requires grad, or a conjugate view: the stream differentiates nothing)
                a = x.detach().resolve_conj().numpy()
        elif isinstance(x, np.ndarray):
            if not fused:
                return self._run_module(torch.from_numpy(x)).numpy()
            a = x
        else:
            raise TypeError(f"rnnkit.Stream: input must be a torch tensor or a NumPy array, got {type(x).__name__}")
        if a.dtype != self._np_dtype:
            raise TypeError(f"rnnkit.Stream: input must be {self.dtype} (the module's dtype), got "
                            f"{x.dtype if is_tensor else a.dtype}")
        shape = a.shape
        if shape == self._step_shape:  # (B, I): one step
            steps = a
            out = result = np.empty(self._out_shape, a.dtype)
        elif len(shape) == 3 and shape[1 - self.batch_first] == self.batch_size and shape[2] == self.input_size \
                and shape[self.batch_first] > 0:
            steps = a.transpose(1, 0, 2) if self.batch_first else a
            out = np.empty((steps.shape[0], self.batch_size, self._dims.out), a.dtype)
            result = out.transpose(1, 0, 2) if self.batch_first else out
            steps = steps.reshape(-1, self.input_size)
            out = out.reshape(-1, self._dims.out)
        elif self.batch_size == 1 and shape == self._step_shape[1:]:  # (I,): one step, unbatched
            steps = a.reshape(self._step_shape)
            out = np.empty(self._out_shape, a.dtype)
            result = out[0]
        else:
            raise ValueError(self._shape_error(shape))
        if self._tensor_state is not None:  # (zoneout was on until now)
            self._take_tensor_state()
        if not steps.flags.c_contiguous:
            steps = np.ascontiguousarray(steps)
        args = self._args
        args[0] = steps
        args[9] = out
        self._kernel(*args)
        args[0] = args[9] = None  # (keep nothing of the caller's)
        return torch.from_numpy(result) if is_tensor else result

    def _shape_error(self, shape) -> str:
        B, I = self.batch_size, self.input_size
        chunk = "(B, T, I)" if self.batch_first else "(T, B, I)"
        one = f" or (I,) = ({I},)" if B == 1 else ""
        return (f"rnnkit.Stream: expected one step (B, I) = {(B, I)}{one}, or a chunk {chunk} of T >= 1 steps "
                f"with B = {B} and I = {I}; got {tuple(shape)}")

    def _run_module(self, x: Tensor):
        """The module itself, step by step or over the chunk, state carried as tensors (where the
        kernels do not apply)."""
        B, I = self.batch_size, self.input_size
        if x.dtype != self.dtype:
            raise TypeError(f"rnnkit.Stream: input must be {self.dtype} (the module's dtype), got {x.dtype}")
        unbatched = B == 1 and tuple(x.shape) == (I,)
        if tuple(x.shape) == (B, I) or unbatched:
            steps = x.reshape(1, B, I)
        elif x.dim() == 3 and x.shape[1 - self.batch_first] == B and x.shape[2] == I and x.shape[self.batch_first]:
            steps = x.transpose(0, 1) if self.batch_first else x
        else:
            raise ValueError(self._shape_error(tuple(x.shape)))
        state = self._torch_state(x.device)
        training = self.module.training
        self.module.train(False)  # (as in eval mode, as on the kernels: no dropout)
        try:
            return self._module_steps(x, steps, state, unbatched)
        finally:
            self.module.train(training)

    def _module_steps(self, x: Tensor, steps: Tensor, state: tuple, unbatched: bool):
        B, I = self.batch_size, self.input_size
        with torch.no_grad():
            if self._is_cell:
                outs = []
                for x_t in steps:
                    new = self.module(x_t, state[0][0] if len(state) == 1 else (state[0][0], state[1][0]))
                    new = new if isinstance(new, tuple) else (new,)
                    state = tuple(s.unsqueeze(0) for s in new)
                    outs.append(new[0])
                out = torch.stack(outs)
            else:
                out, new = self.module(steps.transpose(0, 1) if self.batch_first else steps,
                                       state[0] if len(state) == 1 else state)
                out = out.transpose(0, 1) if self.batch_first else out
                state = new if isinstance(new, tuple) else (new,)
        self._tensor_state = state
        if tuple(x.shape) == (B, I):
            return out[0]
        if unbatched:
            return out[0, 0]
        return out.transpose(0, 1) if self.batch_first else out

    def _torch_state(self, device) -> tuple:
        state = self._tensor_state
        if state is None or state[0].device != device or state[0].dtype != self.dtype:
            arrays = (self._h,) if self._cell.state_size == 1 else (self._h, self._c)
            state = tuple(torch.from_numpy(a).to(device=device, dtype=self.dtype) for a in arrays)
        return state

    # ---- the state
    @property
    def state(self):
        tensor_state = self._tensor_state
        if tensor_state is not None:
            state = tuple(s.clone() for s in tensor_state)
        else:
            state = tuple(torch.from_numpy(a.copy()) for a in ((self._h, self._c)[:self._cell.state_size]))
        if self._is_cell:
            state = tuple(s[0] for s in state)
        return state[0] if len(state) == 1 else state

    @state.setter
    def state(self, value) -> None:
        if value is None:
            self.reset()
            return
        values = (value,) if self._cell.state_size == 1 else value
        if not isinstance(values, (tuple, list)) or len(values) != self._cell.state_size:
            raise TypeError(f"rnnkit.Stream: state must be (h, c) for an LSTM, got {type(value).__name__}")
        buffers = (self._h, self._c)[:self._cell.state_size]
        new = []
        for name, v, buffer in zip("hc", values, buffers):
            v = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
            want = buffer.shape[1:] if self._is_cell else buffer.shape
            if v.shape != want:
                raise ValueError(f"rnnkit.Stream: state {name} must have shape {tuple(want)}, got {tuple(v.shape)}")
            new.append(v)
        for v, buffer in zip(new, buffers):
            buffer[...] = v  # (in place: the kernel's arguments hold these arrays)
        self._tensor_state = None

    def reset(self, rows=None) -> None:
        """Zero the state of every row, or of ``rows`` (indices, or a boolean mask of length B)."""
        if rows is None:
            index = slice(None)
        else:
            index = np.asarray(rows.detach().cpu() if isinstance(rows, Tensor) else rows)
            if index.dtype == np.bool_:
                if index.shape != (self.batch_size,):
                    raise ValueError(f"rnnkit.Stream: a row mask must have shape ({self.batch_size},), "
                                     f"got {index.shape}")
                index = np.flatnonzero(index)
            elif index.ndim > 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
                raise TypeError(f"rnnkit.Stream: rows must be integer indices or a boolean mask, got {index!r}")
            index = index.reshape(-1).astype(np.int64)
            bad = (index < -self.batch_size) | (index >= self.batch_size)
            if bad.any():
                raise IndexError(f"rnnkit.Stream: row {int(index[bad][0])} is out of range for batch_size "
                                 f"{self.batch_size}")
        self._h[:, index] = 0
        self._c[:, index] = 0
        tensor_state = self._tensor_state
        if tensor_state is not None:
            for s in tensor_state:
                s[:, torch.as_tensor(index) if not isinstance(index, slice) else index] = 0

    def __repr__(self) -> str:
        return f"Stream({self.module!r}, batch_size={self.batch_size})"


__all__ = ["Stream"]
