"""Benchmark: rnnkit against torch.nn in one process, on the same inputs and weights.

Contract: each implementation is registered under a name (torch.nn always among them); both are
warmed up first (JIT compile and allocator warm-up stay out of the figures); then repetitions
alternate between implementations, so drift hits both alike; we report medians, the ratio
torch.nn / rnnkit, achieved GFLOP/s and, for training, the peak memory of one step measured in
a fresh process. When an implementation's repetitions disagree widely (interquartile range over
25% of the median) the ratio is withheld: something else was using the CPU.

    python -m rnnkit.bench                       # the grid, all cells, table on stdout
    python -m rnnkit.bench --json out.json --plot out.png --cells gru --reps 15
    python -m rnnkit.bench --suite cells         # RNNCell / GRUCell / LSTMCell stepped in a loop
    python -m rnnkit.bench --suite stream        # rnnkit.Stream's latency per step
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

import rnnkit
from rnnkit import _loops
from rnnkit.cells import CELLS as REGISTRY
from rnnkit.cli import Parser
from rnnkit.kernels import blas

# (T, B, input, hidden, layers)
GRID = [(100, 1, 32, 64, 1), (100, 32, 64, 128, 1), (200, 64, 128, 256, 2),
        (100, 64, 512, 512, 1), (50, 128, 1024, 1024, 1)]
# --cells name -> (class name in torch.nn / rnnkit, extra constructor arguments, gates): the registry's cells
CELLS = {cell.key: (cell.module, cell.module_kwargs, cell.gates) for cell in REGISTRY.values() if cell.key}
IMPLEMENTATIONS: dict[str, Callable] = {
    "torch.nn": lambda cls: getattr(nn, cls),
    "rnnkit": lambda cls: getattr(rnnkit, cls),
}
NOISY_IQR = 0.25


@dataclass
class Row:
    cell: str
    shape: tuple
    mode: str  # "forward" (no_grad) or "train" (forward + backward of a scalar loss)
    variant: str = ""  # off the default grid: "float64", "packed", "bidirectional", "projP", joined by +
    seconds: dict = field(default_factory=dict)  # implementation -> median seconds
    iqr: dict = field(default_factory=dict)  # implementation -> interquartile range / median
    gflops: dict = field(default_factory=dict)
    peak_mib: dict = field(default_factory=dict)
    ratio: float | None = None  # torch.nn time / rnnkit time; None when the timings were noisy

    @property
    def noisy(self) -> bool:
        return any(v > NOISY_IQR for v in self.iqr.values())


def flops(cell: str, shape: tuple, mode: str, bidirectional: bool = False) -> float:
    """Multiply-adds x2 of the GEMMs: input and recurrent products (backward costs twice forward)."""
    T, B, I, H, L = shape
    G = CELLS[cell][2]
    D = 2 if bidirectional else 1
    total = 0.0
    for layer in range(L):
        inp = I if layer == 0 else D * H
        total += D * 2.0 * T * B * G * H * (inp + H)
    return total * (3 if mode == "train" else 1)


def _modules(cell: str, shape: tuple, dtype=torch.float32, packed: bool = False, bidirectional: bool = False,
             proj_size: int = 0):
    """Twin modules (same weights) and one input; packed input has lengths drawn in [T/2, T]."""
    T, B, I, H, L = shape
    cls, kwargs, _ = CELLS[cell]
    if proj_size:
        kwargs = dict(kwargs, proj_size=proj_size)
    torch.manual_seed(0)
    mods = {name: make(cls)(I, H, L, bidirectional=bidirectional, **kwargs).to(dtype)
            for name, make in IMPLEMENTATIONS.items()}
    ref = mods["torch.nn"].state_dict()
    for m in mods.values():
        m.load_state_dict(ref)
    x = torch.randn(T, B, I, dtype=dtype)
    if packed:
        lengths = torch.randint(max(1, T // 2), T + 1, (B,))
        lengths[0] = T
        x = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    return mods, x


def _step(module, x, mode: str) -> Callable[[], None]:
    if mode == "forward":
        def run():
            with torch.no_grad():
                module(x)
    else:
        def run():
            module.zero_grad(set_to_none=True)
            out, _ = module(x)
            (out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out).sum().backward()
    return run


def _quartiles(values: list) -> tuple:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[1], q[2]


def interleaved(runs: dict, reps: int, warmup: int, min_time: float) -> dict:
    """Seconds per call of each of ``runs`` (name -> callable), ``reps`` times each: warmed up
    first, then repetitions alternating between them, each a batch of calls lasting about
    ``min_time`` (timer noise dwarfed)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    inner = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-6)))
    times: dict = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():  # alternate implementations every repetition
            start = time.perf_counter()
            for _ in range(inner[name]):
                run()
            times[name].append((time.perf_counter() - start) / inner[name])
    return times


def _summarise(row: "Row", times: dict, work: float) -> "Row":
    """Medians, spreads, GFLOP/s and the ratio torch.nn / rnnkit (None when noisy) into ``row``."""
    for name, values in times.items():
        lo, med, hi = _quartiles(values)
        row.seconds[name] = med
        row.iqr[name] = (hi - lo) / med
        row.gflops[name] = work / med / 1e9
    if not row.noisy:
        row.ratio = row.seconds["torch.nn"] / row.seconds["rnnkit"]
    return row


def measure(cell: str, shape: tuple, mode: str, reps: int, warmup: int, min_time: float,
            dtype=torch.float32, packed: bool = False, bidirectional: bool = False, proj_size: int = 0) -> Row:
    mods, x = _modules(cell, shape, dtype, packed, bidirectional, proj_size)
    runs = {name: _step(m, x, mode) for name, m in mods.items()}
    times = interleaved(runs, reps, warmup, min_time)
    variant = "+".join(v for v, on in (("float64", dtype == torch.float64), ("packed", packed),
                                        ("bidirectional", bidirectional),
                                        (f"proj{proj_size}", proj_size > 0)) if on)
    row = Row(cell, shape, mode, variant)
    work = flops(cell, shape, mode, bidirectional)
    if packed:  # count the steps sequences really have
        work *= x.batch_sizes.sum().item() / (shape[0] * shape[1])
    return _summarise(row, times, work)


# ---- cells in a Python loop, and streaming (the single-step suites)
# cells: (B, I, H); I = H / 2 (at least 32), as a decoder's input beside its state
CELL_GRID = [(1, 32, 32), (1, 32, 64), (4, 64, 128), (8, 128, 256), (8, 256, 512), (32, 128, 256),
             (64, 256, 512), (128, 256, 512), (256, 512, 1024)]
# streaming: (B, I, H, layers)
STREAM_GRID = [(1, 32, 64, 1), (1, 32, 64, 2), (1, 32, 256, 1), (1, 32, 256, 2), (16, 32, 64, 1),
               (16, 32, 64, 2), (16, 32, 256, 1), (16, 32, 256, 2)]


def measure_cell(cell: str, shape: tuple, mode: str, reps: int, warmup: int, min_time: float,
                 dtype=torch.float32) -> Row:
    """One step of a cell module (``RNNCell``, ``GRUCell``, ``LSTMCell``), the state carried from
    step to step as a loop carries it: under no_grad ("forward"), or ("train") a step's forward
    and a backward of its output's sum."""
    B, I, H = shape
    cls, kwargs, gates = CELLS[cell]
    torch.manual_seed(0)
    mods = {name: make(cls + "Cell")(I, H, **kwargs).to(dtype) for name, make in IMPLEMENTATIONS.items()}
    for m in mods.values():
        m.load_state_dict(mods["torch.nn"].state_dict())
    x = torch.randn(B, I, dtype=dtype)

    def runner(module):
        state = [None]

        def run():
            if mode == "forward":
                with torch.no_grad():
                    state[0] = module(x, state[0])
            else:
                module.zero_grad(set_to_none=True)
                new = module(x, state[0])
                (new[0] if isinstance(new, tuple) else new).sum().backward()
                state[0] = tuple(s.detach() for s in new) if isinstance(new, tuple) else new.detach()
        return run

    times = interleaved({name: runner(m) for name, m in mods.items()}, reps, warmup, min_time)
    work = 2.0 * B * gates * H * (I + H) * (3 if mode == "train" else 1)
    return _summarise(Row(cell, shape, mode, "float64" if dtype == torch.float64 else ""), times, work)


def _onnx_step(module, B: int):
    """An ONNX Runtime session of one step of a torch.nn layer with its state as inputs and
    outputs, or None when onnxruntime (or torch's exporter) is not there: an optional peer."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    import io

    import onnxruntime

    L = module.num_layers
    H = module.hidden_size
    lstm = isinstance(module, nn.LSTM)
    state = (torch.zeros(L, B, H), torch.zeros(L, B, H)) if lstm else torch.zeros(L, B, H)
    x = torch.zeros(1, B, module.input_size)
    names = ["x", "h", "c"] if lstm else ["x", "h"]
    buffer = io.BytesIO()
    try:
        torch.onnx.export(module, (x, state), buffer, input_names=names,
                          output_names=["y", "h_n", "c_n"] if lstm else ["y", "h_n"], dynamo=False)
    except Exception as e:  # (the exporter needs packages of its own)
        print(f"onnxruntime: not measured ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "h": (state[0] if lstm else state).numpy()}
    if lstm:
        feeds["c"] = state[1].numpy()
    return session, feeds


def measure_stream(cell: str, shape: tuple, reps: int, warmup: int, min_time: float, dtype=torch.float32) -> Row:
    """Latency of one step through a stack of layers, the state carried: rnnkit.Stream (torch
    tensors in and out; and NumPy arrays) against torch.nn's cells stepping the same stack in
    Python, torch.nn's layer called with T = 1, and ONNX Runtime's session of one step where it
    is installed. The ratio is torch.nn's cells over rnnkit's stream with tensors."""
    B, I, H, L = shape
    cls, kwargs, gates = CELLS[cell]
    torch.manual_seed(0)
    layer = getattr(nn, cls)(I, H, L, **kwargs).to(dtype).eval()
    cells = [getattr(nn, cls + "Cell")(I if k == 0 else H, H, **kwargs).to(dtype) for k in range(L)]
    for k, c in enumerate(cells):
        c.load_state_dict({name[:-3]: p for name, p in layer.state_dict().items() if name.endswith(f"_l{k}")})
    x = torch.randn(B, I, dtype=dtype)
    xn = x.numpy()
    stream = rnnkit.Stream(layer, batch_size=B)
    lstm = cls == "LSTM"
    carried = {"cells": [None] * L, "layer": None}

    def torch_cells():
        with torch.no_grad():
            inp = x
            for k, c in enumerate(cells):
                carried["cells"][k] = c(inp, carried["cells"][k])
                inp = carried["cells"][k][0] if lstm else carried["cells"][k]

    x1 = x.unsqueeze(0)

    def torch_layer():
        with torch.no_grad():
            _, carried["layer"] = layer(x1, carried["layer"])

    runs = {"torch.nn": torch_cells, "torch.nn layer": torch_layer, "rnnkit": lambda: stream(x),
            "rnnkit numpy": lambda: stream(xn)}
    onnx = _onnx_step(layer, B) if dtype == torch.float32 else None
    if onnx is not None:
        session, feeds = onnx
        outputs = ["y", "h_n", "c_n"] if lstm else ["y", "h_n"]
        feeds = dict(feeds, x=x1.numpy())

        def ort():
            result = session.run(outputs, feeds)
            feeds["h"] = result[1]
            if lstm:
                feeds["c"] = result[2]
        runs["onnxruntime"] = ort
    times = interleaved(runs, reps, warmup, min_time)
    work = 2.0 * B * gates * H * sum((I if k == 0 else H) + H for k in range(L))
    return _summarise(Row(cell, shape, "stream", "float64" if dtype == torch.float64 else ""), times, work)


def format_steps(rows: list) -> str:
    """The single-step suites' table: microseconds per step of each implementation, and each
    one's time over rnnkit's."""
    names = []
    for r in rows:
        names += [n for n in r.seconds if n not in names]
    lines = [f"{'cell':9} {'shape':18} {'mode':8} " + " ".join(f"{n + ' us':>16}" for n in names)
             + "  ratio (torch.nn / rnnkit)  variant"]
    for r in rows:
        cols = " ".join(f"{r.seconds[n] * 1e6:16.2f}" if n in r.seconds else f"{'':16}" for n in names)
        ratio = f"{r.ratio:6.2f}x" if r.ratio is not None else " noisy"
        lines.append(f"{r.cell:9} {str(r.shape):18} {r.mode:8} {cols}  {ratio:>25}  {r.variant}")
    return "\n".join(lines)


_MEMORY_SNIPPET = """
import sys, torch, rnnkit.bench as b
name, cell, shape = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3:])
mods, x = b._modules(cell, shape)
run = b._step(mods[name], x, "train")
run()
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
run()
print((rss("VmHWM:") - base) / 2**20)
"""


def peak_memory_mib(name: str, cell: str, shape: tuple) -> float | None:
    """Peak resident memory added by one training step (after a first one), in a fresh process."""
    # A fixed mmap threshold makes glibc return every freed large block to the system, so the
    # resident peak follows live allocations (its default adaptive threshold keeps freed blocks
    # of the first step resident, and the second step's peak then hides whatever reuses them).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SNIPPET, name, cell, *map(str, shape)],
                          capture_output=True, text=True, timeout=600, env=env)
    return float(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def machine() -> dict:
    import numba
    import numpy

    return {
        "python": platform.python_version(), "torch": torch.__version__, "numba": numba.__version__,
        "numpy": numpy.__version__, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "rnnkit_backend": rnnkit.get_backend(),
        # which implementation computes the weight gradients (see kernels/blas.py)
        "weight_grads": f"scipy OpenBLAS {blas.CORE}" if _loops.WEIGHT_GRADS_BY_BLAS else "rnnkit tiles",
    }


def format_table(rows: list) -> str:
    lines = [f"{'cell':9} {'(T, B, I, H, L)':24} {'mode':8} {'torch.nn ms':>11} {'rnnkit ms':>10} "
             f"{'ratio':>7} {'GFLOP/s t/r':>13} {'peak MiB t/r':>14}  variant"]
    for r in rows:
        ratio = f"{r.ratio:6.2f}x" if r.ratio is not None else " noisy"
        mem = (f"{r.peak_mib.get('torch.nn', float('nan')):6.1f}/{r.peak_mib.get('rnnkit', float('nan')):<6.1f}"
               if r.peak_mib else "")
        lines.append(
            f"{r.cell:9} {str(r.shape):24} {r.mode:8} {r.seconds['torch.nn'] * 1e3:11.3f} "
            f"{r.seconds['rnnkit'] * 1e3:10.3f} {ratio:>7} "
            f"{r.gflops['torch.nn']:6.1f}/{r.gflops['rnnkit']:<6.1f} {mem:>14}  {r.variant}"
        )
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.cell} {r.mode}\n{r.shape}" for r in rows]
    ratios = [r.seconds["torch.nn"] / r.seconds["rnnkit"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    bars = ax.bar(range(len(rows)), ratios, color=["tab:blue" if r.mode == "forward" else "tab:orange" for r in rows])
    for bar, r in zip(bars, rows):
        if r.noisy:
            bar.set_hatch("//")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("speed-up over torch.nn (x)")
    ax.set_title("rnnkit vs torch.nn (blue: forward, orange: train; hatched: noisy repetitions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shape_of(names: str) -> Callable[[str], tuple]:
    """A shapes option's type: positive integers, one per letter of ``names`` (say "T,B,I,H,L")."""
    size = len(names.split(","))

    def parse(text: str) -> tuple:
        try:
            shape = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a shape {names}: its numbers must be integers") from None
        if len(shape) != size:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a shape {names}: it needs {size} numbers, got {len(shape)}")
        if min(shape) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a shape {names}: its numbers must be positive")
        return shape

    return parse


_shape = _shape_of("T,B,I,H,L")


def _number(kind: type, low: float, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: a ``kind`` (int or float) of at least ``low`` (above it if not inclusive)."""
    what = "an integer" if kind is int else "a number"
    bound = f"at least {low}" if inclusive else f"above {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {bound}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    available = [c for c in CELLS if hasattr(rnnkit, CELLS[c][0])]
    grid = " ".join(",".join(map(str, shape)) for shape in GRID)
    parser = Parser(prog="rnnkit bench", description=__doc__.split("\n\n")[0])  # (one-line errors)
    parser.add_argument("--suite", choices=["layers", "cells", "stream"], default="layers",
                        help="layers: whole sequences through RNN / GRU / LSTM; cells: one step of RNNCell / "
                        "GRUCell / LSTMCell, state carried as a loop carries it; stream: one step through a "
                        "stack by rnnkit.Stream against torch.nn's cells and layer (and ONNX Runtime where "
                        "installed) (default: %(default)s)")
    parser.add_argument("--cells", nargs="+", default=available, choices=list(CELLS), metavar="CELL",
                        help=f"cells to measure, of {', '.join(CELLS)} (default: {' '.join(available)})")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=GRID, metavar="T,B,I,H,L",
                        help="shapes: sequence length, batch, input size, hidden size, layers "
                        f"(default: the standard grid, {grid})")
    parser.add_argument("--cell-shapes", nargs="+", type=_shape_of("B,I,H"), default=CELL_GRID, metavar="B,I,H",
                        help="--suite cells: batch, input size, hidden size (default: "
                        f"{' '.join(','.join(map(str, s)) for s in CELL_GRID)})")
    parser.add_argument("--stream-shapes", nargs="+", type=_shape_of("B,I,H,L"), default=STREAM_GRID,
                        metavar="B,I,H,L", help="--suite stream: batch, input size, hidden size, layers (default: "
                        f"{' '.join(','.join(map(str, s)) for s in STREAM_GRID)})")
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"],
                        help="forward (under no_grad) and/or train (forward + backward) (default: forward train)")
    parser.add_argument("--reps", type=_number(int, 1), default=11,
                        help="alternating repetitions, of which the median is reported (default: %(default)s)")
    parser.add_argument("--warmup", type=_number(int, 0), default=3,
                        help="untimed calls of each implementation first (default: %(default)s)")
    parser.add_argument("--min-time", type=_number(float, 0, inclusive=False), default=0.05, metavar="SECONDS",
                        help="seconds per repetition: calls are batched to last this long (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="parameter and input dtype (default: %(default)s)")
    parser.add_argument("--packed", action="store_true",
                        help="PackedSequence input, lengths drawn in [T/2, T] (default: dense input)")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional layers (default: off)")
    parser.add_argument("--proj-size", type=_number(int, 0), default=0, metavar="P",
                        help="LSTM projections of this size, below every hidden size; GFLOP/s then omit "
                        "W_hr (default: 0, none)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurement of training rows, two fresh processes a "
                        "row (default: measured, on the default variant)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here (default: not written)")
    parser.add_argument("--plot", metavar="FILE",
                        help="write a bar chart of the ratios (PNG) here; needs matplotlib (default: not drawn)")
    return parser


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _progress(done: int, total: int, what: str, elapsed: float) -> str:
    """'[k/n] what' with the time so far and a rough estimate of the rest (rows take roughly
    alike: each is timed for about reps x min_time per implementation)."""
    eta = f"about {_duration(elapsed / done * (total - done))} left" if done else "estimate after the first row"
    return f"[{done + 1}/{total}] {what}  ({_duration(elapsed)} so far, {eta})"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.proj_size:
        if args.cells != ["lstm"]:
            parser.error("--proj-size needs --cells lstm (projections are an LSTM feature)")
        if any(args.proj_size >= shape[3] for shape in args.shapes):
            parser.error(f"--proj-size {args.proj_size} must be below every shape's hidden size H")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed: pip install 'rnnkit[cli]'")
    info = machine()
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    dtype = getattr(torch, args.dtype)
    if args.suite == "stream":
        plan = [(cell, shape, "stream") for cell in args.cells for shape in args.stream_shapes]
    elif args.suite == "cells":
        plan = [(cell, shape, mode) for cell in args.cells for shape in args.cell_shapes for mode in args.modes]
    else:
        plan = [(cell, shape, mode) for cell in args.cells for shape in args.shapes for mode in args.modes]
    table = format_table if args.suite == "layers" else format_steps
    rows = []
    interrupted = False
    start = time.perf_counter()
    if args.suite == "layers":
        print(format_table([]), flush=True)  # the header; each row follows as it is measured
    try:
        for done, (cell, shape, mode) in enumerate(plan):
            print(_progress(done, len(plan), f"{cell} {shape} {mode}", time.perf_counter() - start),
                  file=sys.stderr, flush=True)
            if args.suite == "stream":
                row = measure_stream(cell, shape, args.reps, args.warmup, args.min_time, dtype)
            elif args.suite == "cells":
                row = measure_cell(cell, shape, mode, args.reps, args.warmup, args.min_time, dtype)
            else:
                row = measure(cell, shape, mode, args.reps, args.warmup, args.min_time, dtype, args.packed,
                              args.bidirectional, args.proj_size)
                if mode == "train" and not args.no_memory and not row.variant:  # memory: default grid only
                    row.peak_mib = {name: peak_memory_mib(name, cell, shape) for name in IMPLEMENTATIONS}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    except KeyboardInterrupt:  # keep what was measured: report and write it
        interrupted = True
        print(f"\ninterrupted: {len(rows)} of {len(plan)} rows measured; reporting those", file=sys.stderr)
    print()
    print(table(rows))
    if any(r.noisy for r in rows):
        print(f"\n'noisy': an implementation's interquartile range exceeded {NOISY_IQR:.0%} of its median; "
              "close other programs and re-run.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "command": " ".join(sys.argv), "interrupted": interrupted,
                       "rows_planned": len(plan),
                       "rows": [dict(asdict(r), ratio=r.ratio, noisy=r.noisy) for r in rows]}, f, indent=1)
    if args.plot and rows:
        plot(rows, args.plot)
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
