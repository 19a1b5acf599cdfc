"""rnnkit.RNN / GRU / LSTM against torch.nn: outputs, final states and every gradient."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from oracle import CELL_KINDS, as_hx, assert_same, state_features, twins

# Input situations: (name, T, batch, give h_0, layout)
CASES = [
    ("dense", 5, 3, True, "dense"),
    ("dense-no-h0", 4, 2, False, "dense"),
    ("T1-B1", 1, 1, True, "dense"),
    ("unbatched", 6, None, True, "unbatched"),
    ("unbatched-no-h0", 3, None, False, "unbatched"),
    ("packed-sorted", 6, 4, True, "packed-sorted"),
    ("packed-unsorted", 6, 5, True, "packed-unsorted"),
    ("packed-unsorted-no-h0", 5, 3, False, "packed-unsorted"),
]

CONFIGS = list(
    itertools.product(
        CELL_KINDS,  # cell
        [1, 2, 3],  # num_layers
        [True, False],  # bias
        [False, True],  # batch_first
        [False, True],  # bidirectional
    )
)


def make_case(case, input_size, features, num_layers, directions, batch_first, dtype, seed):
    """Leaves (x, *state_0) and a function building the module's call arguments from them.

    ``features`` is the feature size of each state tensor (``state_features``): one h_0, or
    h_0 and c_0 for an LSTM; the leaves hold None for each when the case gives no state.
    """
    _, T, B, give_h0, layout = case
    gen = torch.Generator().manual_seed(seed)
    rows = num_layers * directions
    batch = () if layout == "unbatched" else (B,)
    if layout == "unbatched":
        x = torch.randn(T, input_size, generator=gen, dtype=dtype)
    else:
        shape = (B, T, input_size) if batch_first else (T, B, input_size)
        x = torch.randn(shape, generator=gen, dtype=dtype)
    states = [
        torch.randn(rows, *batch, f, generator=gen, dtype=dtype) if give_h0 else None for f in features
    ]
    if layout in ("dense", "unbatched"):
        return [x, *states], lambda x, *states: (x, as_hx(states))
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    sort = layout == "packed-sorted"
    if sort:
        lengths = lengths.sort(descending=True).values
    return [x, *states], lambda x, *states: (
        pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sort),
        as_hx(states),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("kind,num_layers,bias,batch_first,bidirectional", CONFIGS)
def test_matches_torch(kind, num_layers, bias, batch_first, bidirectional, case, dtype, backend):
    """Every backend (the ``backend`` fixture forces each in turn) against torch.nn."""
    seed = zlib.crc32(repr((kind, num_layers, bias, batch_first, bidirectional, case[0])).encode())
    torch.manual_seed(seed)
    input_size, hidden_size = 4, 5
    ref, ours = twins(
        kind, dtype, input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
        bias=bias, batch_first=batch_first, bidirectional=bidirectional,
    )
    directions = 2 if bidirectional else 1
    leaves, make_input = make_case(
        case, input_size, state_features(ref), num_layers, directions, batch_first, dtype, seed
    )
    assert_same(ref, ours, make_input, leaves, dtype)


@pytest.mark.parametrize("kind", CELL_KINDS)
@pytest.mark.parametrize("T", [1, 37])
def test_long_and_odd_sizes(kind, T, backend):
    torch.manual_seed(T)
    ref, ours = twins(kind, torch.float64, input_size=7, hidden_size=13, num_layers=2, bidirectional=True)
    x = torch.randn(T, 9, 7, dtype=torch.float64)
    assert_same(ref, ours, lambda x: (x,), [x], torch.float64)
