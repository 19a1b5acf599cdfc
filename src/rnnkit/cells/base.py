"""What every recurrent cell declares: its parameters, its state and the math of one step.

A cell is the pointwise heart of a recurrence and nothing else. The sequence driver
(``rnnkit._driver``) owns the time loop, directions, variable lengths and layers, and calls the
cell once per step. Everything else about a cell is derived from its declaration here: the
parameters the modules register (names, shapes, initialisation), the state shapes, the records
that carry one layer-direction's parameters to the reference step and to the kernels, and the
gradient bookkeeping of the fused nodes.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor


class Dims(NamedTuple):
    """The sizes a layer-direction's shapes are stated in."""

    input: int  # I: features entering the layer-direction
    hidden: int  # H: the cell's own size
    proj: int  # P: LSTM projection size, 0 without
    gates: int  # G

    @property
    def out(self) -> int:  # Ho: the size of h and of the output
        return self.proj if self.proj > 0 else self.hidden

    @property
    def gate_rows(self) -> int:  # G*H
        return self.gates * self.hidden


class Param(NamedTuple):
    """One parameter of a layer-direction (torch.nn's name without the ``_l{k}`` suffix).

    ``when``: "always", "bias" (absent with ``bias=False``) or "proj" (only with ``proj_size``).
    ``init``: "uniform" (U(-1/sqrt(H), 1/sqrt(H)), torch.nn's), "ones" or "zeros".
    """

    name: str
    shape: Callable[[Dims], tuple]
    when: str = "always"
    init: str = "uniform"

    def present(self, bias: bool, proj: int) -> bool:
        return self.when == "always" or (self.when == "bias" and bool(bias)) or (self.when == "proj" and proj > 0)


class State(NamedTuple):
    """One tensor of the recurrent state: its name and its feature size."""

    name: str
    size: Callable[[Dims], int]


# torch.nn's parameters of RNN, GRU and LSTM, in its order.
TORCH_PARAMS = (
    Param("weight_ih", lambda d: (d.gate_rows, d.input)),
    Param("weight_hh", lambda d: (d.gate_rows, d.out)),
    Param("bias_ih", lambda d: (d.gate_rows,), "bias"),
    Param("bias_hh", lambda d: (d.gate_rows,), "bias"),
    Param("weight_hr", lambda d: (d.proj, d.hidden), "proj"),
)
H_STATE = (State("h", lambda d: d.out),)
H_C_STATE = (State("h", lambda d: d.out), State("c", lambda d: d.hidden))


def init_(param: Param, tensor: Tensor, hidden: int) -> None:
    """A parameter's initialisation, in place (as torch.nn's reset_parameters)."""
    if param.init == "ones":
        tensor.data.fill_(1.0)
    elif param.init == "zeros":
        tensor.data.zero_()
    else:
        bound = 1.0 / math.sqrt(hidden)
        tensor.data.uniform_(-bound, bound)


# One step of the reference recurrence: (xw_t, state, p, h_in=None) -> new state, where xw_t is
# the input projection (x_t W_ih^T + b_ih, precomputed for all steps: see ``Cell.project``),
# state is a tuple of (B, .) tensors as the cell's ``states`` declare (state[0] is the output), p
# the layer-direction's parameter record, and h_in, when given, what enters W_hh in place of
# state[0] (recurrent dropout masks h there only: a GRU's update still reads h itself).
Step = Callable[[Tensor, tuple, tuple], tuple]


@dataclass(frozen=True, eq=False)  # (a registered cell is one object: compared and hashed by identity)
class Cell:
    """A registered cell: torch.nn's ``mode`` string, its gate count G, its declaration and its step."""

    mode: str
    gates: int
    step: Step
    label: str = "RNN"  # the name torch's error messages use
    params: tuple = TORCH_PARAMS
    states: tuple = H_STATE
    saved: int = 0  # fused kernels: values saved per row and step for backward, in units of H
    # fused kernels: (forward, backward) pointwise row functions, or (forward, backward, infer)
    # with an inference forward that writes nothing to ``saved``; see rnnkit.kernels.driver
    kernels: Optional[tuple] = None
    # fused kernels: True when dL/dxw differs from dL/dhw (GRU's n gate: r scales only hw);
    # otherwise the backward writes one array for both.
    separate_input_grad: bool = False
    # fused kernels: True when the backward reads ``h``, the step's output (Elman's activation
    # derivative): with zoneout the driver then keeps h before the blend for it
    reads_output: bool = False
    # where the cell lives among the modules: torch.nn's class name and constructor arguments
    module: str = "RNN"
    module_kwargs: dict = field(default_factory=dict)
    key: str = ""  # the short name the bench and the CLI use
    projections: bool = False  # whether the module takes proj_size (weight_hr then present)
    # the reference's input projection of every step, (x (T, B, I), p) -> xw (T, B, GH); None:
    # torch.nn's x W_ih^T + b_ih (see ``input_projection``)
    project: Optional[Callable] = None
    # fused kernels: values saved per row and step beyond ``saved`` * H (a few per-row scalars)
    saved_scalars: int = 0
    # fused kernels: True when the cell's row functions add b_ih and b_hh themselves, after
    # their own transform of the bare products (the layer-normalized cells): the loops' products
    # then take no biases, and ``own`` starts with the two (zeros where absent)
    biases_inside: bool = False
    # fused kernels: where the backward's d_own row (see kernels/driver.py) holds each own
    # parameter's gradient: (name, start in units of H), the biases too when ``biases_inside``
    # (two names may share a segment); ``d_own_size`` is the row's length in units of H
    d_own: tuple = ()
    d_own_size: int = 0

    @property
    def state_size(self) -> int:
        return len(self.states)

    # Derived from the declaration (set in __post_init__; plain attributes, which torch.compile
    # reads without a graph break):
    # record: the NamedTuple of one layer-direction's parameters, a field per declared
    #     parameter (None where absent), the same record for tensors, arrays and
    #     ``needs_input_grad``
    # own_params: the names of the parameters the kernels hand the cell's row functions
    #     (``own``): every declared one beyond torch.nn's five, which the driver itself uses
    record: type = field(init=False, repr=False, compare=False)
    own_params: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        names = tuple(p.name for p in self.params)
        record = namedtuple(f"{self.mode.title().replace('_', '')}Params", names, defaults=(None,) * len(names))
        object.__setattr__(self, "record", record)
        standard = {p.name for p in TORCH_PARAMS}
        object.__setattr__(self, "own_params", tuple(n for n in names if n not in standard))

    def saved_size(self, hidden: int) -> int:
        """S, the values the fused kernels save per row and step for backward."""
        return self.saved * hidden + self.saved_scalars

    def input_projection(self, x: Tensor, p) -> Tensor:
        """xw of the reference step from x (., I): what the step adds W_hh h to."""
        return F.linear(x, p.weight_ih, p.bias_ih) if self.project is None else self.project(x, p)

    def declared(self, bias: bool, proj: int) -> tuple:
        """The parameters a layer-direction has with these options, in registration order."""
        return tuple(p for p in self.params if p.present(bias, proj))

    def state_shapes(self, dims: Dims, rows: int, batch: int) -> tuple:
        """Shapes of the state tensors: (rows, B, size) each."""
        return tuple((rows, batch, s.size(dims)) for s in self.states)


def dims_of(cell: Cell, weight_ih_shape, weight_hh_shape) -> Dims:
    """A layer-direction's Dims from its two weights' shapes."""
    hidden = weight_hh_shape[0] // cell.gates
    out = weight_hh_shape[1]
    return Dims(weight_ih_shape[1], hidden, out if out != hidden else 0, cell.gates)
