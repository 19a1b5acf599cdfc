"""The sequence driver: time loop, directions, variable lengths and layers, written once.

Internally every layer sees a time-major padded tensor ``x`` of shape ``(T, B, I)`` and
``batch_sizes`` (a list of T ints, non-increasing, or None when every sequence has length T):
at step t only the first ``batch_sizes[t]`` rows are active, which is exactly the layout of a
``PackedSequence`` (its batch is sorted by decreasing length). Inactive rows keep their state, so
the forward direction ends each sequence at its own last step and the reverse direction starts
each sequence at its own last step from h_0. Outputs at inactive positions are unspecified: they
are never read by a later layer's active steps nor returned to the caller.

A *layer function* runs one layer in one direction:

    layer(cell, x, state, params, batch_sizes, reverse) -> (out (T, B, H_out), new_state)

``reference_layer`` below is the torch-ops one (any device, dtype, autograd); the fused CPU
kernels provide another with the same contract.

A backend may also offer a *stack function*, which runs every layer and direction in one call
with ``run_layers``'s contract (without the layer-by-layer torch glue, which costs more than a
small layer's whole time loop; with autograd it is one node for the whole stack; ``state0`` None
meaning zeros, which it may then make in its own form):

    stack(cell, x, state0, params, num_layers, num_directions, batch_sizes) -> result or None

It returns None when it cannot take the call (under torch.compile, ...); ``run_layers`` then
runs the layers one by one. It is never asked when inter-layer dropout is active.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cells import Cell, LayerParams

LayerFn = Callable[..., tuple]
StackFn = Callable[..., Optional[tuple]]


def reference_layer(
    cell: Cell,
    x: Tensor,
    state: tuple,
    p: LayerParams,
    batch_sizes: Optional[Sequence[int]],
    reverse: bool,
) -> tuple:
    """One layer, one direction, with torch ops: the readable reference of the recurrence."""
    # Input projection for every step in one GEMM; unbind (not xw[t]) so backward stays O(T).
    steps = F.linear(x, p.w_ih, p.b_ih).unbind(0)
    n_steps, batch = len(steps), x.shape[1]
    outs: list = [None] * n_steps
    for t in reversed(range(n_steps)) if reverse else range(n_steps):
        active = batch if batch_sizes is None else batch_sizes[t]
        if active == batch:
            state = cell.step(steps[t], state, p)
        else:
            new = cell.step(steps[t][:active], tuple(s[:active] for s in state), p)
            state = tuple(torch.cat((n, s[active:])) for n, s in zip(new, state))
        outs[t] = state[0]
    return torch.stack(outs), state


def run_layers(
    cell: Cell,
    layer: LayerFn,
    x: Tensor,
    state0: Optional[tuple],
    params: Sequence[LayerParams],
    num_layers: int,
    num_directions: int,
    dropout: float,
    training: bool,
    packing: Optional["Packing"],
    stack: Optional[StackFn] = None,
) -> tuple:
    """Stack layers and directions. ``state0`` holds (L*D, B, .) tensors, or is None for zeros
    (made here only if the layers need them as tensors); returns ``(output (T, B, D*H_out),
    state_n)`` with state_n laid out like state0."""
    batch_sizes = packing.batch_sizes if packing is not None else None
    if stack is not None and not (dropout > 0 and training and num_layers > 1):
        result = stack(cell, x, state0, params, num_layers, num_directions, batch_sizes)
        if result is not None:
            return result
    if state0 is None:
        state0 = _zero_state(cell, x, params[0], num_layers * num_directions)
    finals: list = []
    for layer_idx in range(num_layers):
        if layer_idx > 0 and dropout > 0 and training:
            x = _dropout(x, dropout, packing)
        outs = []
        for direction in range(num_directions):
            k = layer_idx * num_directions + direction
            out, state = layer(
                cell, x, tuple(s[k] for s in state0), params[k], batch_sizes, direction == 1
            )
            outs.append(out)
            finals.append(state)
        x = outs[0] if num_directions == 1 else torch.cat(outs, -1)
    state_n = tuple(torch.stack([f[i] for f in finals]) for i in range(len(state0)))
    return x, state_n


def state_shapes(cell: Cell, w_hh_shape: Sequence[int], rows: int, batch: int) -> tuple:
    """Shapes of h_0 (and c_0): (rows, B, H_out) and (rows, B, H), from W_hh's (gates * H, H_out)."""
    hidden, h_out = w_hh_shape[0] // cell.gates, w_hh_shape[1]
    return ((rows, batch, h_out), (rows, batch, hidden))[:cell.state_size]


def _zero_state(cell: Cell, x: Tensor, p: LayerParams, rows: int) -> tuple:
    """h_0 (and c_0) of zeros, as tensors."""
    return tuple(x.new_zeros(shape) for shape in state_shapes(cell, p.w_hh.shape, rows, x.shape[1]))


def _dropout(x: Tensor, p: float, packing: Optional["Packing"]) -> Tensor:
    # torch.nn applies dropout to the packed data when the input is packed; doing the same
    # draws the same random numbers, so a seeded rnnkit model drops what torch.nn drops.
    if packing is None:
        return F.dropout(x, p, True)
    return packing.pad(F.dropout(packing.pack(x), p, True), x.shape[0])


class Packing:
    """Moves between a PackedSequence's data ``(N, F)`` and the padded ``(T, B, F)`` layout."""

    def __init__(self, batch_sizes: Tensor):
        sizes = batch_sizes.to(device="cpu", dtype=torch.int64).numpy()
        self.batch_sizes: list[int] = sizes.tolist()
        self.max_batch = self.batch_sizes[0]
        # every sequence runs all steps (e.g. batch 1): the data already is the padded layout
        self.dense = self.batch_sizes[-1] == self.max_batch
        if not self.dense:  # row i of the data is step t, row i - starts[t] of the padded layout
            starts = np.cumsum(sizes) - sizes
            flat = np.repeat(np.arange(len(sizes)) * self.max_batch - starts, sizes) + np.arange(sizes.sum())
            self._flat_cpu = torch.from_numpy(flat)
        self._flat = {}

    def _index(self, device) -> Tensor:
        if device not in self._flat:
            self._flat[device] = self._flat_cpu.to(device)
        return self._flat[device]

    def pad(self, data: Tensor, n_steps: Optional[int] = None) -> Tensor:
        n_steps = len(self.batch_sizes) if n_steps is None else n_steps
        if self.dense:
            return data.view(n_steps, self.max_batch, data.shape[-1])
        padded = data.new_zeros(n_steps * self.max_batch, data.shape[-1])
        padded = padded.index_copy(0, self._index(data.device), data)
        return padded.view(n_steps, self.max_batch, data.shape[-1])

    def pack(self, padded: Tensor) -> Tensor:
        flat = padded.reshape(-1, padded.shape[-1])
        return flat if self.dense else flat.index_select(0, self._index(padded.device))
