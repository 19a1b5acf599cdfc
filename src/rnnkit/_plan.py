"""One description of a call and one routing function: how a layer call runs, and why.

``Call`` says everything that decides the route (cell, layers, directions, sizes, dtype, device,
lengths, whether gradients are needed, the options in force); ``route(call)`` returns the
``Route``. Every threshold that picks a route, or tunes how the fused kernels run one (threads,
packing, time chunks), lives in ``LIMITS`` below with the measurement that set it. Tests assert
on ``route(...)`` and change thresholds only through ``limits(...)``.

Routes:
    reference  torch ops, layer by layer (rnnkit._driver.reference_layer): any device, dtype,
               autocast, torch.func transforms and forward-mode AD; cells without kernels (the
               layer-normalized ones); recurrent_dropout and zoneout under torch.compile
    compiled   under torch.compile / torch.export: one custom op per layer-direction (rnnkit._op)
    sequence   the fused kernels' time loops, every layer and direction in one call (training:
               one autograd node for the whole stack)
    step       one step (T = 1) of a stack without projections nor recurrent_dropout or
               zoneout: one kernel call per layer-direction each way, weights as stored (no
               packing, no time chunks)
Cell modules (RNNCell, GRUCell, LSTMCell; ``Call.module == "cell"``; rnnkit._cell):
    cell       the kernels: one call each way (training: one autograd node)
    native     torch.nn's own cell op (torch._VF), where the kernels do not pay or apply
    reference  as above (the torch-ops step)
``by_layer``: inter-layer dropout is active (training, dropout > 0, more than one layer): the
layers then run one by one with torch's dropout between them (so a seeded run drops what
torch.nn drops), each layer-direction on the route's kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, NamedTuple

import torch

from .cells import Cell, Dims

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class Call(NamedTuple):
    cell: Cell
    num_layers: int
    directions: int
    steps: int  # T
    batch: int  # B
    dims: Dims  # of the first layer (input size, hidden size, projection)
    dtype: torch.dtype
    device_type: str
    grad_mode: bool  # torch.is_grad_enabled()
    grad: bool  # grad mode and some input or parameter requires grad
    dropout: bool  # inter-layer dropout active
    backend: str  # the user's choice: "auto", "fused" or "reference"
    special: str = ""  # what only torch ops can run: "autocast", "transform", "mixed dtypes"
    compiling: bool = False
    module: str = "layer"  # "layer" (RNN, GRU, LSTM) or "cell" (a cell module's one step)
    regular: bool = False  # recurrent dropout or zoneout in force (the sequence route runs them)

    def layer_dims(self, layer: int) -> Dims:
        if layer == 0:
            return self.dims
        return self.dims._replace(input=self.dims.out * self.directions)


class Route(NamedTuple):
    path: str  # "reference", "compiled", "sequence" or "step"
    by_layer: bool = False

    @property
    def fused(self) -> bool:
        return self.path != "reference"


@dataclasses.dataclass(frozen=True)
class Limits:
    # ---- threads. Split work across threads only when each thread gets enough to pay for
    # waking them (about 10 us): per step of a time loop, which wakes them once for all its
    # steps; per product for the GEMMs before and after it.
    min_work_per_thread: int = 64 * 1024  # multiply-adds per step
    min_gemm_work_per_thread: int = 512 * 1024  # multiply-adds
    # ... and a time loop only when its whole run is long enough to also pay for waking the
    # threads after other work: the first parallel region of a call after a torch op or the
    # caller's own code can cost 20 to several hundred us on this 2-core VM (an empty region:
    # 2 us right after another, 220 us median after 10 ms of other work; a single GRU step,
    # B = 8, H = 256: 120 us back to back, 300 when each call follows a torch Linear, 166 with
    # the loop on one thread).
    min_loop_work: int = 8 << 20  # multiply-adds
    # A batch of at most column_max_rows rows runs each step's recurrent product on all
    # threads, each taking a band of W_hh's columns (a parallel region per step, about 3 us),
    # when W_hh has min_column_work values (and the loop min_loop_work multiply-adds in all).
    # Split by rows instead, each thread would stream all of W_hh every step. Measured per step
    # (float32, one row, 1 / 2 threads): 512 x 512 14.7 / 8.6 us, 2048 x 512 53 / 34, 1024 x
    # 1024 55 / 30, 4096 x 1024 405 / 135; 256 x 256 3.6 / 6.0.
    min_column_work: int = 1 << 18
    column_max_rows: int = 15
    # ---- packing. Calls of at most this many row-steps (T * B: a single step of up to 4
    # rows, a few steps of one row) use W_ih and W_hh as stored. Packing a matrix costs
    # several passes of one row over it (512 x 512 float32: 56 us against 13 for one row's
    # product; (3072, 1024): 1.4 ms against 0.2). A step's product on 1 / 2 / 4 rows: 13 / 25 /
    # 54 us unpacked against 56 / 56 / 54 packed (512 x 512).
    plain_max_row_steps: int = 4
    # ---- time chunks. Sequences whose per-step buffers (input projections forward;
    # pre-activation gradients backward) stay below chunk_min_elements run as one chunk; longer
    # ones in about time_chunks chunks of at least chunk_rows rows each, so those buffers take a
    # fraction of the memory of the whole sequence's.
    chunk_min_elements: int = 1 << 20
    time_chunks: int = 32
    chunk_rows: int = 512
    # The tiles' weight-gradient sums run over blocks of at most this many rows: rows of a tile
    # one row apart stop fitting L2's sets (12800 x 1024 x 128: 136 GFLOP/s in one block, 275 in
    # blocks of 512); the block also sets float32's rounding (a sum over 1600 rows 4.0e-4 from
    # float64's in one running order, 1.2e-4 in blocks of 512, 6.9e-5 in 256, which ran 5-10%
    # slower at three of six shapes; OpenBLAS's SGEMM 7.8e-5).
    k_block: int = 512
    # ---- single steps (T = 1). A step has no time loop to fuse: what the kernels save there
    # is the pointwise math and, for few rows, torch's matrix-vector products; what they add is
    # a fixed cost in Python (conversions, in training an autograd node and the gradient
    # products). Measured against torch.nn, one step, I = H / 2, B 1-64, H 64-1024
    # (interleaved medians, OPENBLAS_CORETYPE unset and Haswell, +-10% run to run;
    # BENCHMARKS.md):
    # - the step route in training: a step whose products have at most step_max_work
    #   multiply-adds (B * G*H * (I + Ho) summed over layer-directions), or of at most
    #   step_max_rows rows while W_hh has fewer than step_max_weights values: Elman
    #   0.82-1.37x (the reference 0.83-1.24x; the smallest even with torch.nn, whose whole call
    #   is 85-100 us, about 45 of them a Python autograd node's cost), GRU 1.06-1.94x (the
    #   reference 0.66-1.20x). Beyond: torch.nn's threaded products win (Elman B = 8, H = 512
    #   0.81-0.82x; one row of H = 1024 0.90-1.03x against the reference's 1.13-1.20x).
    step_max_rows: int = 4
    step_max_work: int = 1 << 20
    step_max_weights: int = 1 << 20
    # - other training steps (grad mode): GRU on the sequence route while W_hh has fewer than
    #   min_column_work values (H <= 295: 1.11-1.69x); from H = 512 the sequence route swung
    #   0.35x-1.72x run to run (waking threads for one step) and the reference runs (0.90-1.12x),
    #   as it does Elman's (0.87-1.20x; the sequence route 0.29-1.47x).
    # - inference: GRU steps always fused (1.0-3.7x against the reference's 0.73-1.1x); Elman
    #   steps of at most step_max_rows rows on the step route (in inference every cell's) (H 64-512: 0.97-1.13x against
    #   the reference's 0.89-0.96x; stacks 0.99-1.27x against 0.81-0.93x); of 5 to
    #   elman_step_max_rows rows on the reference while W_hh has fewer than
    #   elman_step_min_weights values (H = 64, B 5-8: the reference 0.92-0.97x against
    #   0.79-0.94x), else fused (H = 1024, B 1-8: 1.2-2.0x against 1.0-1.1x; B = 64 1.7x).
    # - LSTM steps always fused (torch.nn's oneDNN LSTM costs more there).
    elman_step_min_weights: int = 512 * 512
    elman_step_max_rows: int = 8
    # ---- cell modules (one step of RNNCell, GRUCell, LSTMCell; "auto"). Measured against
    # torch.nn's cells, one thread, stepped in a loop (I = H / 2; interleaved; BENCHMARKS.md):
    # - inference of at most cell_max_rows rows (the kernels' own row loops on the weights as
    #   stored) 1.4-2.6x; of more rows, BLAS per step: 1.0-2.1x while W_ih and W_hh hold at most
    #   cell_max_weights values together (Elman and GRU H = 128, 64 rows: 1.1-1.4x), 0.7-0.98x
    #   beyond (LSTM H = 128, 8-16 rows; every cell at H = 256, 8 rows);
    # - training (one autograd node): GRU and LSTM 1.1-1.4x at at most cell_max_rows rows, and
    #   up to cell_max_train_rows rows within cell_max_weights; 0.8-0.95x beyond (LSTM 64 rows,
    #   GRU and LSTM H = 256, 8 rows). Elman training 0.76-0.89x everywhere: torch.nn's Elman
    #   cell is a few ops whose autograd costs less than a Python node.
    # With more threads allowed, steps of more than cell_max_threaded_work multiply-adds (B *
    # G*H * (I + H)) run torch.nn's op, whose BLAS splits them.
    cell_max_rows: int = 4
    cell_max_weights: int = 80_000
    cell_max_train_rows: int = 16
    cell_max_threaded_work: int = 1 << 21


LIMITS = Limits()


@contextlib.contextmanager
def limits(**changes) -> Iterator[Limits]:
    """Run with some thresholds changed (tests: force threads, time chunks, columns)."""
    global LIMITS, EPOCH
    previous = LIMITS
    LIMITS = dataclasses.replace(previous, **changes)
    _ROUTES.clear()
    EPOCH += 1
    try:
        yield LIMITS
    finally:
        LIMITS = previous
        _ROUTES.clear()
        EPOCH += 1


def route_of(key: tuple, call: Callable[[], Call]) -> Route:
    """``route(call())``, remembered under ``key``, which must determine the call (for callers
    whose glue is counted in microseconds: a cell module stepped in a loop)."""
    found = _ROUTES.get(key)
    if found is None:
        found = route(call())
        if len(_ROUTES) > 256:
            _ROUTES.clear()
        _ROUTES[key] = found
    return found


_ROUTES: dict = {}  # (cleared when the limits change)
EPOCH = 0  # counts changes of the limits: what callers remember of routes carries it (see limits)


def supported(cell: Cell, dtype: torch.dtype, device_type: str) -> bool:
    """Whether the fused kernels can run this cell on these tensors at all."""
    return device_type == "cpu" and dtype in SUPPORTED_DTYPES and cell.kernels is not None


def route(call: Call) -> Route:
    """How ``call`` runs. Raises when the user forced the fused backend on what it cannot run."""
    if call.backend == "reference" or call.special:
        # (autocast, torch.func transforms, mixed dtypes: only torch ops follow them, whatever
        # the choice)
        return Route("reference")
    cell_module = call.module == "cell"
    native = Route("native" if cell_module and call.cell.mode in NATIVE_CELLS else "reference")
    if not supported(call.cell, call.dtype, call.device_type):
        if call.backend == "fused" and call.cell.kernels is not None:  # (a cell without any: the reference)
            raise RuntimeError(
                f"rnnkit backend 'fused' does not support {call.cell.mode} with {call.dtype} tensors on "
                f"{call.device_type}; use rnnkit.set_backend('auto') or 'reference'")
        return native
    if call.compiling:  # (a cell's torch ops and the regularizers trace as they are)
        return Route("reference") if cell_module or call.regular else Route("compiled", by_layer=True)
    if cell_module:
        return Route("cell") if call.backend == "fused" or _cell_pays(call) else native
    step = call.steps == 1 and not call.regular and step_fits(call, call.grad)
    if call.backend == "auto" and not _fused_pays(call, step):
        return Route("reference")
    return Route("step" if step else "sequence", by_layer=call.dropout)


NATIVE_CELLS = ("RNN_TANH", "RNN_RELU", "GRU", "LSTM")  # the cells torch has an op of its own for


def _cell_pays(call: Call) -> bool:
    """"auto", a cell module's step: whether the kernels run it faster than torch.nn's cell op
    (see LIMITS, cell modules)."""
    dims, B = call.dims, call.batch
    weights = dims.gate_rows * (dims.input + dims.hidden)
    if B * weights > LIMITS.cell_max_threaded_work and threads() > 1:
        return False
    if call.grad:
        if call.cell.mode in ("RNN_TANH", "RNN_RELU"):
            return False
        return B <= LIMITS.cell_max_rows or (B <= LIMITS.cell_max_train_rows and weights <= LIMITS.cell_max_weights)
    return B <= LIMITS.cell_max_rows or weights <= LIMITS.cell_max_weights


def _fused_pays(call: Call, step: bool) -> bool:
    """"auto": whether the kernels run this call faster than torch ops (see LIMITS, single steps)."""
    if call.steps != 1 or call.cell.state_size != 1:
        return True
    w_hh = call.dims.gate_rows * call.dims.out
    if call.grad_mode:
        # (``step`` answers step_fits(call, True) already when gradients are needed)
        fits = step if call.grad else step_fits(call, True)
        return fits or (call.cell.mode == "GRU" and w_hh < LIMITS.min_column_work)
    if call.cell.mode == "GRU" or call.batch > LIMITS.elman_step_max_rows:
        return True
    return call.batch <= LIMITS.step_max_rows or w_hh >= LIMITS.elman_step_min_weights


def step_fits(call: Call, training: bool) -> bool:
    """Whether a step runs on the step route: no projections, weights small enough that no
    column threads would split its products, and few rows (inference: at most step_max_rows;
    training: that many with W_hh under step_max_weights values, or products of at most
    step_max_work multiply-adds)."""
    dims = call.dims
    if dims.proj > 0:
        return False
    w_hh = dims.gate_rows * dims.out
    if column_threads(1, call.batch, w_hh) > 1:
        return False
    if not training:
        return call.batch <= LIMITS.step_max_rows
    if call.batch <= LIMITS.step_max_rows and w_hh < LIMITS.step_max_weights:
        return True
    work = sum(call.batch * dims.gate_rows * (call.layer_dims(layer).input + dims.out) * call.directions
               for layer in range(call.num_layers))
    return work <= LIMITS.step_max_work


def column_threads(T: int, B: int, w_hh_size: int) -> int:
    """Threads splitting the columns of each step's recurrent product (see min_column_work)."""
    if B > LIMITS.column_max_rows or w_hh_size < LIMITS.min_column_work or T * B * w_hh_size < LIMITS.min_loop_work:
        return 1
    return min(threads(), max(1, 2 * w_hh_size // LIMITS.min_column_work))  # (half the minimum each)


def threads() -> int:
    """Threads a call may use: no more than torch may (``torch.set_num_threads`` governs rnnkit
    as it governs torch.nn, so processes that each pin one thread do not oversubscribe the
    cores), within numba's pool. (torch answers in 20 ns, numba in about 0.7 us.)"""
    n = torch.get_num_threads()
    if n < 2:
        return 1
    import numba

    return min(n, numba.get_num_threads())


def chunks(rows: int, work: int, min_work: int) -> int:
    """Threads for ``rows`` independent rows carrying ``work`` multiply-adds in all."""
    most = min(rows, work // min_work)
    if most < 2:  # without asking for the thread count, which costs up to a microsecond
        return 1
    return min(threads(), most)
