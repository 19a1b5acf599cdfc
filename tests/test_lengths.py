"""``lengths=`` on the layers: the same as packing (enforce_sorted=False), running torch.nn, and
padding back to the input's steps; no packing, sorting or copying by the caller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backends import supports
from oracle import TOL, as_hx, assert_same, state_features, twins
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit

KINDS = ["tanh", "relu", "gru", "lstm", "lstm-proj"]


class _Packed(torch.nn.Module):
    """torch.nn's module behind the packing round trip a user writes without ``lengths=``."""

    def __init__(self, module, lengths):
        super().__init__()
        self.module, self.lengths = module, lengths

    def forward(self, x, hx=None):
        batch_first = self.module.batch_first
        steps = x.shape[1 if batch_first else 0]
        packed = pack_padded_sequence(x, torch.tensor(self.lengths), batch_first=batch_first, enforce_sorted=False)
        out, h = self.module(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=steps)
        return out, h


class _Lengths(torch.nn.Module):
    def __init__(self, module, lengths):
        super().__init__()
        self.module, self.lengths = module, lengths

    def forward(self, x, hx=None):
        return self.module(x, hx, lengths=self.lengths)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lengths_equal_torch_nn_packed(backend, kind, batch_first, bidirectional, with_state, dtype):
    if not supports(backend, kind, dtype):
        pytest.skip(f"{backend} does not run {kind}")
    ref, ours = twins(kind, dtype, input_size=5, hidden_size=6, num_layers=2, batch_first=batch_first,
                      bidirectional=bidirectional)
    T, B = 7, 5
    lengths = [3, 7, 1, 3, 5]  # unsorted, with ties, one full row, one of a single step
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=dtype)
    rows = 2 * (2 if bidirectional else 1)
    states = [torch.randn(rows, B, f, dtype=dtype) if with_state else None for f in state_features(ours)]
    assert_same(_Packed(ref, lengths), _Lengths(ours, lengths), lambda x, *s: (x, as_hx(s)), [x, *states], dtype)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_lengths_short_of_the_steps(backend, kind):
    """No row runs all T steps: the tail is zeros (and gets zero gradient), as padded by torch."""
    ref, ours = twins(kind, torch.float64, input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(9, 3, 3, dtype=torch.float64)
    lengths = np.array([2, 5, 4])
    assert_same(_Packed(ref, lengths.tolist()), _Lengths(ours, lengths), lambda x: (x,), [x], torch.float64)
    out, _ = ours(x, lengths=lengths)
    assert out.shape == (9, 3, 8) and not out[5:].any() and not out[2:, 0].any()


def test_lengths_forms_and_devices():
    """A list, a NumPy array, a tensor (any integer dtype) give one result; all-T lengths equal
    no lengths; an unbatched input takes one length."""
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 4, batch_first=True)
    x = torch.randn(3, 6, 3)
    want, h = layer(x, lengths=[6, 2, 4])
    for lengths in (np.array([6, 2, 4], dtype=np.int32), torch.tensor([6, 2, 4], dtype=torch.int32),
                    torch.tensor([6, 2, 4]), (6, 2, 4)):
        got, h2 = layer(x, lengths=lengths)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(h2, h, rtol=0, atol=0)
    full, h_full = layer(x)
    got, h2 = layer(x, None, [6, 6, 6])
    torch.testing.assert_close(got, full, rtol=0, atol=0)
    torch.testing.assert_close(h2, h_full, rtol=0, atol=0)
    single, h1 = layer(x[1], lengths=2)  # unbatched (T, I)
    torch.testing.assert_close(single, want[1], **TOL[torch.float32])
    torch.testing.assert_close(h1, h[:, 1], **TOL[torch.float32])
    single, _ = layer(x[1], lengths=[2])
    torch.testing.assert_close(single, want[1], **TOL[torch.float32])


def test_lengths_dropout_draws_as_torch_nn():
    """Inter-layer dropout in training draws what torch.nn draws on the packed route (same seed)."""
    ref, ours = twins("lstm", torch.float64, input_size=3, hidden_size=4, num_layers=3, dropout=0.5)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = [2, 6, 6, 3]
    torch.manual_seed(3)
    want, _ = _Packed(ref, lengths)(x)
    torch.manual_seed(3)
    got, _ = ours(x, lengths=lengths)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("lengths, error, match", [
    ([0, 2, 3], ValueError, r"lengths must be in 1\.\.4 .*got 0 at row 0"),
    ([1, 5, 3], ValueError, r"lengths must be in 1\.\.4 .*got 5 at row 1"),
    ([1, 2], ValueError, r"one length per row, 3 values; got shape \(2,\)"),
    ([[1, 2, 3]], ValueError, r"one length per row"),
    ([1.0, 2.0, 3.0], TypeError, r"lengths must be integers"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, r"lengths must hold integers, got a tensor of torch.float32"),
    (["a", "b", "c"], TypeError, r"lengths must be integers"),
])
def test_lengths_refused(lengths, error, match):
    layer = rnnkit.LSTM(2, 3)
    with pytest.raises(error, match=match):
        layer(torch.randn(4, 3, 2), lengths=lengths)


def test_lengths_with_packed_input_refused():
    layer = rnnkit.RNN(2, 3)
    packed = pack_padded_sequence(torch.randn(4, 2, 2), [4, 2])
    with pytest.raises(ValueError, match="lengths= is for padded input"):
        layer(packed, lengths=[4, 2])


def test_lengths_edge_forms():
    layer = rnnkit.GRU(2, 3)
    x = torch.randn(4, 1, 2)
    want, _ = layer(x, lengths=[3])
    got, _ = layer(x, lengths=torch.tensor(3))  # (one row: a bare number)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="got 9223372036854775807 at row 0"):
        layer(x, lengths=np.array([2 ** 64 - 1], dtype=np.uint64))
    with pytest.raises(ValueError, match="meta device"):
        layer(x, lengths=torch.empty(1, dtype=torch.int64, device="meta"))
