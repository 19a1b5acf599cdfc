"""Tensors to the kernels' arrays and back, and the one way to say "absent".

Kernels see contiguous float32 or float64 CPU arrays only; this module guarantees that. An
absent array (no bias, no projection, no cell state, a gradient nobody needs) is always an
empty array of the same number of dimensions: ``absent(dtype, ndim)``; the kernels test
``a.shape[0] > 0``. ``None`` is the Python side's word for the same, turned into ``absent`` at
the kernel call (``or_absent``).
"""

from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor

NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_ABSENT = {(d, n): np.empty((0,) * n, d) for d in (np.float32, np.float64) for n in (1, 2, 3)}


def absent(dtype, ndim: int) -> np.ndarray:
    """The shared empty array that stands for an absent one (never written)."""
    return _ABSENT[np.dtype(dtype).type, ndim]


def or_absent(a: Optional[np.ndarray], dtype, ndim: int) -> np.ndarray:
    return absent(dtype, ndim) if a is None else a


def array(t: Tensor) -> np.ndarray:
    """A tensor's values as a contiguous array (a view when it already is one)."""
    if t.requires_grad or not t.is_contiguous():
        t = t.detach().contiguous()
    return t.numpy()


def tensors(*arrays_):
    return tuple([None if a is None else torch.from_numpy(a) for a in arrays_])


# Parameters arrive at every call: their numpy views are kept, keyed by the tensor's identity
# and checked against its memory and layout (about 0.3 us against 1 us for a new view). A view
# reads the tensor's memory itself, so in-place updates show through; a new ``.data``, shape or
# strides mean a new view.
_VIEWS: dict = {}  # id(tensor) -> (weakref to it, data_ptr, shape, strides, view)


def weight_arrays(record):
    """A parameter record of tensors as a record of (cached) arrays (a loop rather than a call
    per field: this runs for every layer-direction at every call)."""
    arrays = []
    for t in record:
        if t is not None:
            entry = _VIEWS.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] == t.data_ptr() and entry[2] == t.shape \
                    and entry[3] == t.stride():
                t = entry[4]
            else:
                t = _new_view(t)
        arrays.append(t)
    return record._make(arrays)


def _new_view(t: Tensor) -> np.ndarray:
    a = array(t)
    if t.is_contiguous():  # (else a is a copy, stale after the next in-place update)
        key = id(t)
        _VIEWS[key] = (weakref.ref(t, lambda _, key=key: _VIEWS.pop(key, None)), t.data_ptr(), t.shape,
                       t.stride(), a)
    return a


def output_grad(d_out: np.ndarray) -> np.ndarray:
    """dL/dout for the kernels, without materialising what autograd broadcast: a gradient that is
    the same for every step or row (stride 0 there, e.g. of out.sum()) goes in as its one
    distinct row (see d_out in kernels/driver.py)."""
    if d_out.strides[0] == 0:
        d_out = d_out[:1]
    if d_out.strides[1] == 0:
        d_out = d_out[:, :1]
    return np.ascontiguousarray(d_out)


def batched(*grads) -> bool:
    """Whether autograd hands a backward batched gradients (``is_grads_batched``,
    ``jacobian(vectorize=True)``: autograd's own vmap, whose tensors have no numpy view): vmap
    sees through torch ops, not through the kernels, so the fused nodes' differentiable
    fallback runs them. (Asked only once a conversion failed: the dispatch-key test costs
    microseconds.)"""
    return any(g is not None and (torch._C._functorch.is_batchedtensor(g)
                                  or "Batched" in str(torch._C._dispatch_keys(g))) for g in grads)


def kernel_params(cell, a) -> tuple:
    """(b_ih, b_hh, own) of a layer-direction's parameter record of arrays ``a`` as the kernels
    take them: the biases of the products (None where absent, and where the cell adds them
    itself: ``Cell.biases_inside``) and the cell's own parameters (``own`` in kernels/driver.py;
    with ``biases_inside``, b_ih and b_hh first, zeros where absent)."""
    mine = tuple([getattr(a, name) for name in cell.own_params]) if cell.own_params else ()
    if not cell.biases_inside:
        return a.bias_ih, a.bias_hh, mine
    GH, dtype = a.weight_hh.shape[0], a.weight_hh.dtype
    return None, None, tuple(np.zeros(GH, dtype) if b is None else b for b in (a.bias_ih, a.bias_hh)) + mine
