"""Property tests: whole configurations drawn at random, rnnkit against torch.nn.

Each example draws, for each cell kind, sizes, layers, directions, layout, dtype, lengths and h_0, builds
twin modules with identical weights and compares outputs, final states and every gradient
(tests/oracle.py). The budget comes from the hypothesis profile in conftest.py: 40
derandomized examples per cell kind and backend by default, `--hypothesis-profile=long` for 2000 random ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from backends import backend_kind_params
from oracle import CELL_KINDS, TOL, assert_same, flat, twins

# Every cell kind the oracle knows and rnnkit provides; proj_size is drawn here, not fixed.
KINDS = [k for k, (cls, extra) in CELL_KINDS.items() if hasattr(rnnkit, cls) and "proj_size" not in extra]
LAYOUTS = ["dense", "unbatched", "packed-sorted", "packed-unsorted"]


@dataclass(frozen=True)
class Config:
    kind: str
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    dtype: torch.dtype
    steps: int
    batch: int
    layout: str
    lengths: Optional[tuple]
    give_h0: bool
    seed: int

    @property
    def is_lstm(self) -> bool:
        return CELL_KINDS[self.kind][0] == "LSTM"

    def module_kwargs(self) -> dict:
        kwargs = dict(
            input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            bias=self.bias, batch_first=self.batch_first, bidirectional=self.bidirectional,
        )
        if self.proj_size:
            kwargs["proj_size"] = self.proj_size
        return kwargs


@st.composite
def configs(draw, kind: str) -> Config:
    hidden_size = draw(st.integers(1, 9))
    is_lstm = CELL_KINDS[kind][0] == "LSTM"
    steps = draw(st.integers(1, 8))
    batch = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(LAYOUTS))
    lengths = None
    if layout.startswith("packed"):
        lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        if layout == "packed-sorted":
            lengths = sorted(lengths, reverse=True)
        lengths = tuple(lengths)
    return Config(
        kind=kind,
        input_size=draw(st.integers(1, 9)),
        hidden_size=hidden_size,
        proj_size=draw(st.integers(0, hidden_size - 1)) if is_lstm else 0,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        steps=steps,
        batch=batch,
        layout=layout,
        lengths=lengths,
        give_h0=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_case(cfg: Config):
    """Leaves (x, h_0[, c_0]) and the function building the call arguments from them."""
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = cfg.num_layers * (2 if cfg.bidirectional else 1)
    features = [cfg.proj_size or cfg.hidden_size] + ([cfg.hidden_size] if cfg.is_lstm else [])
    unbatched = cfg.layout == "unbatched"
    if unbatched:
        x_shape = (cfg.steps, cfg.input_size)
    elif cfg.batch_first:
        x_shape = (cfg.batch, cfg.steps, cfg.input_size)
    else:
        x_shape = (cfg.steps, cfg.batch, cfg.input_size)
    x = torch.randn(x_shape, generator=gen, dtype=cfg.dtype)
    states = [
        torch.randn((rows, f) if unbatched else (rows, cfg.batch, f), generator=gen, dtype=cfg.dtype)
        if cfg.give_h0 else None
        for f in features
    ]

    def make_input(x, *states):
        hx = None if states[0] is None else (tuple(states) if cfg.is_lstm else states[0])
        if cfg.lengths is None:
            return x, hx
        sort = cfg.layout == "packed-sorted"
        packed = pack_padded_sequence(x, torch.tensor(cfg.lengths), batch_first=cfg.batch_first, enforce_sorted=sort)
        return packed, hx

    return [x, *states], make_input


PAIRS = backend_kind_params(KINDS)


@pytest.mark.parametrize("backend,kind", PAIRS)
@given(data=st.data())
def test_random_configuration_matches_torch(backend, kind, data):
    cfg = data.draw(configs(kind), label="cfg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the twins' initial weights
        ref, ours = twins(cfg.kind, cfg.dtype, **cfg.module_kwargs())
    leaves, make_input = make_case(cfg)
    with rnnkit.use_backend(backend):
        assert_same(ref, ours, make_input, leaves, cfg.dtype)


@pytest.mark.parametrize("backend,kind", PAIRS)
@given(data=st.data())
def test_eval_mode_is_deterministic_and_matches_train_mode(backend, kind, data):
    """Without dropout, eval and train compute the same function; repeated calls agree bit for bit."""
    cfg = data.draw(configs(kind), label="cfg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        _, ours = twins(cfg.kind, cfg.dtype, **cfg.module_kwargs())
    leaves, make_input = make_case(cfg)
    with rnnkit.use_backend(backend), torch.no_grad():
        train_out = flat(ours(*make_input(*leaves)))
        ours.eval()
        first, second = flat(ours(*make_input(*leaves))), flat(ours(*make_input(*leaves)))
    for a, b, c in zip(train_out, first, second):
        assert torch.equal(b, c)
        torch.testing.assert_close(b, a, **TOL[cfg.dtype])
