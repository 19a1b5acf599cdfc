"""The route ``rnnkit._plan.route`` picks for a module's call: what the routing tests assert on."""

from __future__ import annotations

from rnnkit import _plan, _run


def route_of(module, x, hx=None) -> _plan.Route:
    """The route of ``module(x, hx)`` for a dense (batched or not) input in the current modes."""
    batched = x.dim() == 3
    data = x if batched else x.unsqueeze(0 if module.batch_first else 1)
    data = data.transpose(0, 1) if module.batch_first else data
    state = None if hx is None else (hx if isinstance(hx, tuple) else (hx,))
    dropout = module.dropout > 0 and module.training and module.num_layers > 1
    call = _run.describe(module._cell, data, state, module._layer_params(data), module.num_layers,
                         module._num_directions, dropout)
    return _plan.route(call)
