"""The sequence driver: time loop, directions, variable lengths and the walk over layers,
written once.

Internally every layer sees a time-major padded tensor ``x`` of shape ``(T, B, I)`` and
``batch_sizes`` (a list of T ints, non-increasing, or None when every sequence has length T):
at step t only the first ``batch_sizes[t]`` rows are active, which is exactly the layout of a
``PackedSequence`` (its batch is sorted by decreasing length). Inactive rows keep their state, so
the forward direction ends each sequence at its own last step and the reverse direction starts
each sequence at its own last step from h_0. Outputs at inactive positions are zero on every
route (the reference below and the kernels alike).

A *layer function* runs one layer in one direction:

    layer(cell, x, state, p, batch_sizes, reverse) -> (out (T, B, H_out), new_state)

with ``p`` the cell's parameter record for that layer-direction. ``reference_layer`` below is
the torch-ops one (any device, dtype, autograd). ``walk`` and ``walk_back`` are the one walk
over layers and directions, for tensors (``run_layers``: the reference, the compiled route and
the layer-by-layer routes) and for the kernels' arrays (rnnkit._stack: whole stacks, forward
and backward).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cells import Cell, Dims, dims_of

# The parameters only h_t's path from c_t reads (the projection, c's normalization): a loss
# that reads nothing but one step's c_t does not reach them, and their gradients are None.
AFTER_C = ("weight_hr", "layer_norm_c_weight", "layer_norm_c_bias")

LayerFn = Callable[..., tuple]


class Regular(NamedTuple):
    """One layer-direction's recurrent regularizers in one call (rnnkit's own options; see
    ``draw_regular``), applied by ``reference_layer`` and the fused loops alike."""

    h_mask: Optional[Tensor]  # recurrent dropout: (B, Ho), 0 or 1/(1-p), on h where it enters W_hh
    zoneout: float  # zoneout's p (0: none)
    # training: the seeds of zoneout's masks for h and c (``zone_masks``); None: eval, where the
    # previous state's weight is p itself (the expectation)
    seeds: Optional[tuple]


def reference_layer(
    cell: Cell,
    x: Tensor,
    state: tuple,
    p,
    batch_sizes: Optional[Sequence[int]],
    reverse: bool,
    regular: Optional[Regular] = None,
) -> tuple:
    """One layer, one direction, with torch ops: the readable reference of the recurrence."""
    # Input projection for every step in one GEMM; unbind (not xw[t]) so backward stays O(T).
    steps = cell.input_projection(x, p).unbind(0)
    n_steps, batch = len(steps), x.shape[1]
    h_mask, keep = None, ()
    if regular is not None:
        h_mask = regular.h_mask
        if regular.zoneout and regular.seeds is None:
            keep = (regular.zoneout,) * len(state)
        elif regular.zoneout:
            keep = tuple(zone_masks((n_steps, batch, s.shape[-1]), regular.zoneout, seed, x)
                         for s, seed in zip(state, regular.seeds))
    outs: list = [None] * n_steps
    for t in reversed(range(n_steps)) if reverse else range(n_steps):
        active = batch if batch_sizes is None else batch_sizes[t]
        if active == batch:
            state = _step(cell, steps[t], state, p, h_mask, keep, t)
            outs[t] = state[0]
        else:  # rows past their length keep their state, and their output is zero
            new = _step(cell, steps[t][:active], tuple(s[:active] for s in state), p, h_mask, keep, t)
            state = tuple(torch.cat((n, s[active:])) for n, s in zip(new, state))
            outs[t] = torch.cat((new[0], new[0].new_zeros(batch - active, new[0].shape[1])))
    return torch.stack(outs), state


def _step(cell: Cell, xw: Tensor, state: tuple, p, h_mask: Optional[Tensor], keep: tuple, t: int) -> tuple:
    """The cell's step at time t on the first xw.shape[0] rows, regularized: h * h_mask enters
    W_hh; zoneout blends each state with its previous value by ``keep`` (per state: p, or (T, B,
    .) masks)."""
    if h_mask is None and not keep:
        return cell.step(xw, state, p)
    rows = xw.shape[0]
    new = cell.step(xw, state, p, None if h_mask is None else state[0] * h_mask[:rows])
    if not keep:
        return new
    keep = [z if isinstance(z, float) else z[t, :rows] for z in keep]
    return tuple(z * s + (1 - z) * n for n, s, z in zip(new, state, keep))


@torch.compiler.disable  # (NumPy's uint64 arithmetic: the tracer cannot follow it; a mask is a constant)
def zone_masks(shape: tuple, p: float, seed: int, like: Tensor) -> Tensor:
    """Zoneout's mask of ``shape`` (T, B, size) drawn from ``seed``: 1 (keep the previous value)
    with probability p, as ``like``'s dtype and device. Element (t, r, j) is 1 where
    kernels.driver.zone_bits(seed, (t * B + r) * size + j) < p 2^31, the draw the fused loops
    make for it where they use it."""
    from .kernels.driver import zone_bits

    bits = zone_bits(np.uint64(seed), np.arange(math.prod(shape), dtype=np.uint64))
    mask = torch.from_numpy(bits < np.uint64(zone_threshold(p)))
    return mask.to(device=like.device, dtype=like.dtype).reshape(shape)


def zone_threshold(p: float) -> int:
    """What 31 random bits must stay under for probability p."""
    return min(round(p * 2.0 ** 31), 2 ** 31)


def check_probability(name: str, value) -> None:
    """A regularizer's p: a real number in [0, 1] (not a bool)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not 0 <= value <= 1:
        raise ValueError(f"{name} should be a probability, a number in [0, 1]; got {value!r}")


def draw_regular(cell: Cell, x: Tensor, params: list, recurrent_dropout: float, zoneout: float, weight_drop: float,
                 training: bool) -> tuple:
    """(params, regulars) of a call on x (T, B, I): W_hh of every layer-direction dropped (weight
    drop, training: one Bernoulli(1-p) mask over its elements per call, scaled by 1/(1-p); the
    gradient reaches the stored weight through it), and per layer-direction the ``Regular`` of
    recurrent dropout (training) and zoneout, or None when neither is in force. Everything comes
    from torch's default generator, drawn here, before anything runs, per layer-direction in
    order: W_hh's mask, h's mask, then the two seeds of zoneout's masks for h and c (training)."""
    for name, value in (("recurrent_dropout", recurrent_dropout), ("zoneout", zoneout), ("weight_drop", weight_drop)):
        check_probability(name, value)  # (again: they may be set on the module after construction)
    B = x.shape[1]
    dropping = training and recurrent_dropout > 0
    if not (training and weight_drop > 0) and not dropping and not zoneout > 0:
        return params, None
    params, regulars = list(params), []
    for k, p in enumerate(params):
        if training and weight_drop > 0:
            params[k] = p = p._replace(weight_hh=F.dropout(p.weight_hh, weight_drop, True))
        h_mask = F.dropout(x.new_ones(B, p.weight_hh.shape[1]), recurrent_dropout, True) if dropping else None
        seeds = tuple(torch.empty(2, dtype=torch.int64).random_().tolist()) if zoneout > 0 and training else None
        regulars.append(Regular(h_mask, float(zoneout), seeds))
    if not dropping and not zoneout > 0:
        regulars = None
    return params, regulars


def walk(num_layers: int, reverses: Sequence[bool], x, run_one: Callable, join: Callable,
         between: Optional[Callable] = None) -> tuple:
    """Every layer, each of its directions (``reverses``: (False,), (False, True) or (True,)):
    ``run_one(k, layer, reverse, x) -> (out, final)`` for layer-direction k = layer * D +
    direction; a layer's outputs ``join``ed are the next layer's input, ``between(x)`` applied
    to it first when given (inter-layer dropout). Returns (the last layer's output, [final of
    every layer-direction])."""
    finals: list = []
    for layer in range(num_layers):
        if layer > 0 and between is not None:
            x = between(x)
        outs = []
        for direction, reverse in enumerate(reverses):
            out, final = run_one(layer * len(reverses) + direction, layer, reverse, x)
            outs.append(out)
            finals.append(final)
        x = outs[0] if len(outs) == 1 else join(outs)
    return x, finals


def walk_back(num_layers: int, reverses: Sequence[bool], d_out, back_one: Callable, split: Callable,
              add: Callable):
    """``walk`` in reverse for backward: from the last layer down, ``back_one(k, layer, reverse,
    d_out_k) -> d_x`` with d_out_k the direction's part of the layer's output gradient
    (``split(d_out, direction)``, or d_out itself with one direction; None when nothing reached
    it); a layer's directions' input gradients ``add``ed are the output gradient of the layer
    below. Returns the input gradient of the first layer."""
    D = len(reverses)
    for layer in reversed(range(num_layers)):
        d_x = None
        for direction, reverse in enumerate(reverses):
            part = d_out if D == 1 or d_out is None else split(d_out, direction)
            dx = back_one(layer * D + direction, layer, reverse, part)
            d_x = dx if d_x is None else d_x if dx is None else add(d_x, dx)
        d_out = d_x
    return d_out


def run_layers(
    cell: Cell,
    layer: LayerFn,
    x: Tensor,
    state0: Optional[tuple],
    params: Sequence,
    num_layers: int,
    reverses: Sequence[bool],
    dropout: float,
    training: bool,
    packing: Optional["Packing"],
    regulars: Optional[list] = None,
) -> tuple:
    """Stack layers and directions (``reverses``, see ``walk``) with torch glue. ``state0`` holds
    (L*D, B, .) tensors, or is None for zeros; returns ``(output (T, B, D*H_out), state_n)`` with
    state_n laid out like state0. ``regulars``: per layer-direction, the ``Regular`` handed to
    ``layer`` (the reference's) as its last argument."""
    batch_sizes = packing.batch_sizes if packing is not None else None
    if state0 is None:
        state0 = zero_state(cell, x, params[0], num_layers * len(reverses))
    between = (lambda x: _dropout(x, dropout, packing)) if dropout > 0 and training else None

    def run_one(k, layer_idx, reverse, x):
        if regulars is not None:
            return layer(cell, x, tuple(s[k] for s in state0), params[k], batch_sizes, reverse, regulars[k])
        return layer(cell, x, tuple(s[k] for s in state0), params[k], batch_sizes, reverse)

    out, finals = walk(num_layers, reverses, x, run_one, lambda outs: torch.cat(outs, -1), between)
    state_n = tuple(torch.stack([f[i] for f in finals]) for i in range(len(state0)))
    return out, state_n


def aliases(tensors: Sequence) -> tuple:
    """Views of the tensors (None kept), to run the differentiable fallback on: gradients with
    respect to them count only the paths through this node, not through the inputs' own history
    (an h0 computed from x would otherwise count x's path through h0 twice)."""
    return tuple(None if t is None else t.view_as(t) for t in tensors)


def contract(outputs: Sequence, grad_outputs: Sequence, inputs: Sequence, needs: Sequence) -> list:
    """d(outputs)/d(inputs) contracted with grad_outputs (a graph of its own when grad mode is on:
    double backward): None where ``needs`` says no, an input or its output gradient is None, or
    it does not reach the outputs. The fused nodes' differentiable fallback ends here."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None]
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and t is not None and t.requires_grad]
    result: list = [None] * len(inputs)
    if pairs and wanted:
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=torch.is_grad_enabled(), allow_unused=True)
        for i, g in zip(wanted, grads):
            result[i] = g
    return result


def layer_dims(cell: Cell, p) -> Dims:
    """A layer-direction's sizes from its parameter record."""
    return dims_of(cell, p.weight_ih.shape, p.weight_hh.shape)


def zero_state(cell: Cell, x: Tensor, p, rows: int) -> tuple:
    """h_0 (and c_0) of zeros, as tensors."""
    return tuple(x.new_zeros(shape) for shape in cell.state_shapes(layer_dims(cell, p), rows, x.shape[1]))


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
