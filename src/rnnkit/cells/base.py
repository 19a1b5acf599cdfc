"""What every recurrent cell provides: its gate count and the math of one step.

A cell is the pointwise heart of a recurrence and nothing else. The sequence driver
(``rnnkit._driver``) owns the time loop, directions, variable lengths and layers, and
calls the cell once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from torch import Tensor


class LayerParams(NamedTuple):
    """The parameters of one layer and direction, in torch.nn's order and layout.

    ``w_ih`` is ``(G*H, I)``, ``w_hh`` is ``(G*H, H_out)``, the biases ``(G*H,)`` or None,
    ``w_hr`` (LSTM projections only) ``(P, H)`` or None.
    """

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor] = None


# One step of the reference recurrence: (xw_t, state, params) -> new state, where
# xw_t = x_t W_ih^T + b_ih (precomputed for all steps) and state is a tuple of
# (B, H) tensors: (h,) for Elman and GRU, (h, c) for LSTM. state[0] is the output.
Step = Callable[[Tensor, tuple, LayerParams], tuple]


@dataclass(frozen=True)
class Cell:
    """A registered cell: torch.nn's ``mode`` string, its gate count G and its step."""

    mode: str
    gates: int
    step: Step
    state_size: int = 1  # tensors in the recurrent state: 1 (h) or 2 (h, c)
    label: str = "RNN"  # the name torch's error messages use
    saved: int = 0  # fused kernels: values saved per row and step for backward, in units of H
    # fused kernels: (forward, backward) pointwise row functions, or (forward, backward, infer)
    # with an inference forward that writes nothing to ``saved``; see rnnkit.kernels.driver
    kernels: Optional[tuple] = None
    # fused kernels: True when dL/dxw differs from dL/dhw (GRU's n gate: r scales only hw);
    # otherwise the backward writes one array for both.
    separate_input_grad: bool = False
