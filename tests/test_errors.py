"""Bad input raises before any computation, with torch.nn's exception type and wording."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit
from oracle import assert_same_error, raised

pack = nn.utils.rnn.pack_sequence

# Each case is called with the module namespace (torch.nn or rnnkit): both must raise the same
# exception type with the same message.
SAME_AS_TORCH = {
    "feature size": lambda m: m.RNN(4, 5, 2)(torch.randn(3, 2, 7)),
    "h0 shape": lambda m: m.RNN(4, 5, 2)(torch.randn(3, 2, 4), torch.randn(1, 2, 5)),
    "h0 2-D for batched": lambda m: m.GRU(4, 5, 2)(torch.randn(3, 2, 4), torch.randn(2, 5)),
    "h0 3-D for unbatched": lambda m: m.RNN(4, 5, 2)(torch.randn(3, 4), torch.randn(2, 2, 5)),
    "h0 batch for packed": lambda m: m.GRU(4, 5)(pack([torch.randn(3, 4), torch.randn(2, 4)]), torch.randn(1, 3, 5)),
    "h0 2-D for packed": lambda m: m.GRU(4, 5)(pack([torch.randn(3, 4), torch.randn(2, 4)]), torch.randn(2, 5)),
    "4-D input rnn": lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4, 1)),
    "4-D input gru": lambda m: m.GRU(4, 5)(torch.randn(3, 2, 4, 1)),
    "1-D input": lambda m: m.GRU(4, 5)(torch.randn(4)),
    "dtype mismatch": lambda m: m.RNN(4, 5)(torch.randn(3, 2, 4, dtype=torch.float64)),
    "integer input": lambda m: m.GRU(4, 5)(torch.ones(3, 2, 4, dtype=torch.int64)),
    "zero-length sequence": lambda m: m.GRU(4, 5)(torch.randn(0, 2, 4)),
    "zero-length batch_first": lambda m: m.RNN(4, 5, batch_first=True)(torch.randn(2, 0, 4)),
    "hidden_size zero": lambda m: m.RNN(4, 0),
    "hidden_size float": lambda m: m.GRU(4, 5.0),
    "input_size zero": lambda m: m.GRU(0, 5),
    "input_size float": lambda m: m.RNN(4.0, 5),
    "num_layers zero": lambda m: m.RNN(4, 5, 0),
    "nonlinearity": lambda m: m.RNN(4, 5, nonlinearity="sigmoid"),
    "proj_size rnn": lambda m: m.RNN(4, 5, proj_size=2),
    "proj_size gru": lambda m: m.GRU(4, 5, proj_size=0),
    "dropout > 1": lambda m: m.GRU(4, 5, 2, dropout=1.5),
    "dropout < 0": lambda m: m.GRU(4, 5, 2, dropout=-0.1),
    "dropout bool": lambda m: m.RNN(4, 5, 2, dropout=True),
    "dropout str": lambda m: m.RNN(4, 5, 2, dropout="0.5"),
    "bias not bool": lambda m: m.RNN(4, 5, bias=1),
    "batch_first not bool": lambda m: m.GRU(4, 5, batch_first=1),
    "cell input size": lambda m: m.RNNCell(4, 5)(torch.randn(3, 7)),
    "cell batch": lambda m: m.GRUCell(4, 5)(torch.randn(3, 4), torch.randn(2, 5)),
    "cell hidden size": lambda m: m.RNNCell(4, 5)(torch.randn(3, 4), torch.randn(3, 6)),
    "cell 3-D input": lambda m: m.GRUCell(4, 5)(torch.randn(3, 4, 1)),
    "cell 3-D hidden": lambda m: m.RNNCell(4, 5)(torch.randn(3, 4), torch.randn(3, 5, 1)),
    # LSTM: hx is (h_0, c_0), checked as hidden[0] / hidden[1]
    "lstm h0 shape": lambda m: m.LSTM(4, 5, 2)(torch.randn(3, 2, 4), (torch.randn(1, 2, 5), torch.randn(2, 2, 5))),
    "lstm c0 shape": lambda m: m.LSTM(4, 5, 2)(torch.randn(3, 2, 4), (torch.randn(2, 2, 5), torch.randn(2, 2, 6))),
    "lstm proj h0 of hidden_size": lambda m: m.LSTM(4, 5, proj_size=3)(
        torch.randn(3, 2, 4), (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    ),
    "lstm proj c0 of proj_size": lambda m: m.LSTM(4, 5, proj_size=3)(
        torch.randn(3, 2, 4), (torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    ),
    "lstm hx 2-D, cx 3-D": lambda m: m.LSTM(4, 5)(torch.randn(3, 2, 4), (torch.randn(2, 5), torch.randn(1, 2, 5))),
    "lstm hx 3-D, cx 2-D": lambda m: m.LSTM(4, 5)(torch.randn(3, 2, 4), (torch.randn(1, 2, 5), torch.randn(2, 5))),
    "lstm unbatched hx 3-D": lambda m: m.LSTM(4, 5)(torch.randn(3, 4), (torch.randn(1, 2, 5), torch.randn(1, 5))),
    "lstm unbatched c0 size": lambda m: m.LSTM(4, 5)(torch.randn(3, 4), (torch.randn(1, 5), torch.randn(1, 4))),
    "4-D input lstm": lambda m: m.LSTM(4, 5)(torch.randn(3, 2, 4, 1)),
    "lstm feature size": lambda m: m.LSTM(4, 5)(torch.randn(3, 2, 7), (torch.randn(1, 2, 5), torch.randn(1, 2, 5))),
    "lstm dtype mismatch": lambda m: m.LSTM(4, 5)(torch.randn(3, 2, 4, dtype=torch.float64)),
    "lstm zero-length sequence": lambda m: m.LSTM(4, 5)(torch.randn(0, 2, 4)),
    "proj_size >= hidden_size": lambda m: m.LSTM(4, 5, proj_size=5),
    "proj_size negative": lambda m: m.LSTM(4, 5, proj_size=-1),
    "lstm nonlinearity": lambda m: m.LSTM(4, 5, nonlinearity="tanh"),
    "lstm cell 3-D input": lambda m: m.LSTMCell(4, 5)(torch.randn(3, 4, 1)),
    "lstm cell 3-D hx[0]": lambda m: m.LSTMCell(4, 5)(torch.randn(3, 4), (torch.randn(3, 5, 1), torch.randn(3, 5))),
    "lstm cell 3-D hx[1]": lambda m: m.LSTMCell(4, 5)(torch.randn(3, 4), (torch.randn(3, 5), torch.randn(3, 5, 1))),
    "lstm cell input size": lambda m: m.LSTMCell(4, 5)(torch.randn(3, 7)),
    "lstm cell c batch": lambda m: m.LSTMCell(4, 5)(torch.randn(3, 4), (torch.randn(3, 5), torch.randn(2, 5))),
    "lstm cell c hidden size": lambda m: m.LSTMCell(4, 5)(torch.randn(3, 4), (torch.randn(3, 5), torch.randn(3, 6))),
}


@pytest.mark.parametrize("name", SAME_AS_TORCH)
def test_same_error_as_torch(name):
    assert_same_error(SAME_AS_TORCH[name])


def test_wordings_listed_in_parity_doc():
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 4, got 7"):
        rnnkit.RNN(4, 5)(torch.randn(3, 2, 7))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(2, 2, 5\), got \[1, 2, 5\]"):
        rnnkit.RNN(4, 5, 2)(torch.randn(3, 2, 4), torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="GRU: Expected input to be 2D or 3D, got 4D instead"):
        rnnkit.GRU(4, 5)(torch.randn(1, 1, 1, 4))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        rnnkit.RNN(4, 5)(torch.randn(0, 1, 4))
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 7 expected 4"):
        rnnkit.GRUCell(4, 5)(torch.randn(2, 7))


# Where torch.nn fails late or obscurely, rnnkit fails early and says what it expected.
def test_cell_nonlinearity_checked_at_construction():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'x'. Select from 'tanh' or 'relu'."):
        rnnkit.RNNCell(4, 5, nonlinearity="x")


def test_lstm_wordings_listed_in_parity_doc():
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 5\), got \[1, 2, 5\]"):
        rnnkit.LSTM(4, 5, 2)(torch.randn(3, 2, 4), (torch.randn(1, 2, 5), torch.randn(2, 2, 5)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 2, 5\), got \[1, 2, 3\]"):
        rnnkit.LSTM(4, 5, proj_size=3)(torch.randn(3, 2, 4), (torch.randn(1, 2, 3), torch.randn(1, 2, 3)))
    with pytest.raises(
        RuntimeError, match=r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors"
    ):
        rnnkit.LSTM(4, 5)(torch.randn(3, 2, 4), (torch.randn(2, 5), torch.randn(1, 2, 5)))
    with pytest.raises(ValueError, match="LSTM: Expected input to be 2D or 3D, got 4D instead"):
        rnnkit.LSTM(4, 5)(torch.randn(1, 1, 1, 4))
    with pytest.raises(ValueError, match="LSTMCell: Expected input to be 1D or 2D, got 3D instead"):
        rnnkit.LSTMCell(4, 5)(torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match=r"LSTMCell: Expected hx\[0\] to be 1D or 2D, got 3D instead"):
        rnnkit.LSTMCell(4, 5)(torch.randn(2, 4), (torch.randn(1, 2, 5), torch.randn(2, 5)))


# torch.nn.LSTM does not check hx against packed input and fails inside the kernel (IndexError,
# shape mismatches); rnnkit checks it like dense input, with the batch taken from batch_sizes[0].
@pytest.mark.parametrize("sort", [True, False])
def test_lstm_packed_hx_checked_against_batch_sizes(sort):
    packed = pack([torch.randn(3, 4), torch.randn(2, 4)], enforce_sorted=sort)
    m = rnnkit.LSTM(4, 5, proj_size=2)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 2\), got \[1, 3, 2\]"):
        m(packed, (torch.randn(1, 3, 2), torch.randn(1, 2, 5)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 2, 5\), got \[1, 2, 2\]"):
        m(packed, (torch.randn(1, 2, 2), torch.randn(1, 2, 2)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 2\), got \[2, 2\]"):
        m(packed, (torch.randn(2, 2), torch.randn(1, 2, 5)))


@pytest.mark.parametrize(
    "cls,x_shape,h_shape", [("LSTM", (3, 2, 4), (1, 2, 5)), ("LSTMCell", (2, 4), (2, 5))], ids=["LSTM", "LSTMCell"]
)
@pytest.mark.parametrize("hx", ["tensor", "1-tuple", "3-tuple"])
def test_lstm_hx_must_be_a_pair(cls, x_shape, h_shape, hx):
    # torch.nn fails with IndexError / "lstm expects two hidden states" / a TypeError from the kernel.
    h = torch.zeros(h_shape)
    hx = {"tensor": h, "1-tuple": (h,), "3-tuple": (h, h, h)}[hx]
    with pytest.raises(TypeError, match=r"hx must be a tuple of 2 tensors \(h_0, c_0\)"):
        getattr(rnnkit, cls)(4, 5)(torch.zeros(x_shape), hx)


def test_proj_size_not_int_is_type_error():
    with pytest.raises(TypeError, match="proj_size should be of type int, got: float"):
        rnnkit.LSTM(4, 5, proj_size=2.0)


def test_positional_proj_size_refused():
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        rnnkit.GRU(4, 5, 1, True, False, 0.0, False, 3)


@pytest.mark.parametrize("make", [lambda: rnnkit.RNN(4, 5), lambda: rnnkit.GRU(4, 5)])
def test_hidden_dtype_mismatch_is_clear(make):
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch.float64\) does not match input dtype \(torch.float32\)"):
        make()(torch.randn(3, 2, 4), torch.randn(1, 2, 5, dtype=torch.float64))


def test_cell_dtype_mismatch_is_clear():
    with pytest.raises(RuntimeError, match="RNN input dtype"):  # torch.nn: RuntimeError too
        rnnkit.GRUCell(4, 5)(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="hx dtype"):
        rnnkit.GRUCell(4, 5)(torch.randn(2, 4), torch.randn(2, 5, dtype=torch.float64))


def test_cell_unbatched_input_with_batched_hidden_is_clear():
    with pytest.raises(RuntimeError, match="for 1-D input, hidden should also be 1-D but got 2-D"):
        rnnkit.RNNCell(4, 5)(torch.randn(4), torch.randn(3, 5))


def test_cell_sizes_checked_at_construction():
    # torch.nn builds GRUCell(4, 0) and returns empty states; a zero-size cell is a bug.
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        rnnkit.GRUCell(4, 0)
    with pytest.raises(TypeError, match="input_size should be of type int, got: float"):
        rnnkit.RNNCell(4.0, 3)


@pytest.mark.parametrize("make", [
    lambda m: m.GRU(4, 5, np.int64(2)),
    lambda m: m.LSTM(4, 5, proj_size=np.int64(2)),
    lambda m: m.GRUCell(np.int64(4), np.int32(5)),
    lambda m: m.LSTMCell(4, 5, bias=0),
    lambda m: m.RNNCell(4, 5, bias=np.bool_(False)),
])
def test_arguments_torch_takes_are_taken(make):
    """numpy integers for sizes and counts, any truth value for a cell's bias: torch.nn builds
    these, so rnnkit builds the same module (parameters, repr) and runs it."""
    ref, ours = make(nn), make(rnnkit)
    assert repr(ours) == repr(ref)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4) if "Cell" in type(ours).__name__ else torch.randn(3, 2, 4)
    torch.testing.assert_close(ours(x), ref(x))


def test_num_layers_float_is_type_error():
    with pytest.raises(TypeError, match="num_layers should be of type int, got: float"):
        rnnkit.RNN(4, 5, 1.5)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="input must be a Tensor or a PackedSequence"):
        rnnkit.GRU(4, 5)([[1.0, 2.0]])


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown rnnkit backend 'gpu'"):
        rnnkit.set_backend("gpu")


def test_inputs_are_not_modified():
    m = rnnkit.GRU(4, 5, 2, bidirectional=True)
    x, h = torch.randn(3, 2, 4), torch.randn(4, 2, 5)
    x0, h0 = x.clone(), h.clone()
    m(x, h)
    assert torch.equal(x, x0) and torch.equal(h, h0)


def test_empty_batch_like_torch():
    ref = nn.GRU(4, 5, 2)
    ours = rnnkit.GRU(4, 5, 2)
    out, h = ours(torch.randn(3, 0, 4))
    ref_out, ref_h = ref(torch.randn(3, 0, 4))
    assert out.shape == ref_out.shape and h.shape == ref_h.shape


# A cell given several faults reports the one torch.nn reports: sizes (input, then each state's
# batch and width, h before c) come before dtypes, as in torch.nn's cell ops.
_F64 = torch.float64


def _cell_args(cls, width=4, batch=3, h_batch=3, h_size=5, dtype=torch.float32, h_dtype=torch.float32,
               c_batch=3, c_size=5, c_dtype=torch.float32):
    x = torch.randn(batch, width).to(dtype)
    h = torch.randn(h_batch, h_size, dtype=h_dtype)
    return x, ((h, torch.randn(c_batch, c_size, dtype=c_dtype)) if cls == "LSTMCell" else h)


SEVERAL_CELL_FAULTS = {
    "width and input dtype": dict(width=7, dtype=_F64),
    "width and integer input": dict(width=7, dtype=torch.int64),
    "width and hidden dtype": dict(width=7, h_dtype=_F64),
    "hidden batch and input dtype": dict(h_batch=2, dtype=_F64),
    "hidden size and input dtype": dict(h_size=6, dtype=_F64),
    "hidden batch and hidden dtype": dict(h_batch=2, h_dtype=_F64),
    "hidden size and hidden dtype": dict(h_size=6, h_dtype=_F64),
    "width, hidden size and both dtypes": dict(width=7, h_size=6, dtype=_F64, h_dtype=_F64),
}
LSTM_CELL_FAULTS = {
    "c size and h dtype": dict(c_size=6, h_dtype=_F64),
    "c batch and h dtype": dict(c_batch=2, h_dtype=_F64),
    "h size and c dtype": dict(h_size=6, c_dtype=_F64),
    "c size and input dtype": dict(c_size=6, dtype=_F64),
}


@pytest.mark.parametrize("cls, faults",
                         [(cls, f) for cls in ("RNNCell", "GRUCell", "LSTMCell") for f in SEVERAL_CELL_FAULTS]
                         + [("LSTMCell", f) for f in LSTM_CELL_FAULTS])
def test_cell_with_several_faults_reports_torchs_first(cls, faults):
    args = _cell_args(cls, **{**SEVERAL_CELL_FAULTS, **LSTM_CELL_FAULTS}[faults])
    expected = raised(lambda m: getattr(m, cls)(4, 5)(*args), nn)
    got = raised(lambda m: getattr(m, cls)(4, 5)(*args), rnnkit)
    assert got.type is expected.type
    assert str(got.value) == str(expected.value)


def test_cell_wrong_width_and_dtype_example():
    h = torch.randn(3, 20)
    with pytest.raises(RuntimeError, match="^input has inconsistent input_size: got 11 expected 10$"):
        rnnkit.RNNCell(10, 20)(torch.randn(3, 11, dtype=torch.float64), h)
