"""What ``rnnkit train`` and ``rnnkit sample`` need before any work starts: the run's config
with its defaults, the choices, the user-error type. Imports nothing heavy (no torch), so the
command line answers ``--help`` and argument errors without loading torch; :mod:`rnnkit.charlm`
(the model, training and sampling) re-exports all of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

LOG2E = 1.0 / math.log(2.0)
CHECKPOINT = "checkpoint.pt"
DEFAULT_DATA = "pydoc_data.topics"  # CPython's own documentation text: no download needed



def cell_types() -> dict:
    """--cell name -> (class name in torch.nn / rnnkit, extra constructor arguments): the cell
    registry's (rnnkit.cells), read when a run is checked, not when the command line starts."""
    from .cells import CELLS

    return {cell.key: (cell.module, cell.module_kwargs) for cell in CELLS.values() if cell.key}


IMPLS = ("rnnkit", "torch")

# Config fields that a resumed run may change; every other field must match the checkpoint.
RESUME_OVERRIDES = ("steps", "time_limit", "eval_interval", "impl")


class CharLMError(Exception):
    """A user error (bad data, bad value, mismatched checkpoint): one line, no traceback."""


@dataclass
class TrainConfig:
    """Everything that defines a run. The defaults are the default ``rnnkit train``."""

    data: Optional[str] = None  # UTF-8 text file; None: CPython's pydoc_data.topics
    val_fraction: float = 0.1  # held-out tail of the text
    cell: str = "gru"
    layers: int = 1
    hidden: int = 256
    embed: int = 64
    dropout: float = 0.0  # between recurrent layers and before the output layer
    seq_len: int = 64  # truncated-BPTT chunk length
    batch_size: int = 64  # parallel streams
    lr: float = 3e-3  # Adam; cosine decay to lr/10 over `steps`
    clip: float = 1.0  # gradient-norm clipping
    steps: int = 1500
    time_limit: float = 140.0  # seconds of training; stops early if reached before `steps`
    eval_interval: int = 100
    seed: int = 0
    impl: str = "rnnkit"

    def validate(self) -> None:
        positive_ints = ("layers", "hidden", "embed", "seq_len", "batch_size", "steps", "eval_interval")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CharLMError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        cells = cell_types()
        if self.cell not in cells:
            raise CharLMError(f"--cell must be one of {', '.join(cells)}, got {self.cell!r}")
        if self.impl not in IMPLS:
            raise CharLMError(f"--impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise CharLMError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise CharLMError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("lr", "clip", "time_limit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CharLMError(f"--{name.replace('_', '-')} must be a positive number, got {value}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
