"""rnnkit against another checkout of itself (say, the commit before a change) and torch.nn, in one
process, interleaved: ``rnnkit.bench``'s contract with a third implementation.

    git worktree add /tmp/before <commit>
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/against_commit.py /tmp/before/src \
        --cells rnn_tanh gru lstm --reps 7 --json benchmarks/against_commit.json

The other checkout is imported as the package ``rnnkit_before`` (its kernels cache apart, keyed by
its own sources). Prints, per row, torch.nn's time over each rnnkit's and the ratio of the two
rnnkits (this checkout's speed over the other's: above 1 is faster now).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

from rnnkit import bench


def load_other(src: str):
    package = os.path.join(os.path.abspath(src), "rnnkit")
    spec = importlib.util.spec_from_file_location("rnnkit_before", os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rnnkit_before"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the other checkout's src folder")
    parser.add_argument("--cells", nargs="+", default=["rnn_tanh", "gru", "lstm"], choices=list(bench.CELLS))
    parser.add_argument("--shapes", nargs="+", default=None, help="T,B,I,H,L (default: rnnkit.bench's grid)")
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--reps", type=int, default=7, help="alternating repetitions (median; default 7)")
    parser.add_argument("--warmup", type=int, default=3, help="calls before timing (default 3)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per repetition (default 0.05)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    other = load_other(args.other)
    bench.IMPLEMENTATIONS["before"] = lambda cls: getattr(other, cls)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else bench.GRID
    torch.set_num_threads(2)
    rows = []
    print(f"{'cell':9} {'(T, B, I, H, L)':24} {'mode':8} {'torch/before':>12} {'torch/now':>10} {'now/before':>11}",
          flush=True)
    for shape in shapes:
        for cell in args.cells:
            for mode in args.modes:
                row = bench.measure(cell, shape, mode, args.reps, args.warmup, args.min_time)
                s = row.seconds
                noisy = " (noisy)" if row.noisy else ""
                print(f"{cell:9} {str(shape):24} {mode:8} {s['torch.nn'] / s['before']:11.2f}x "
                      f"{s['torch.nn'] / s['rnnkit']:9.2f}x {s['before'] / s['rnnkit']:10.3f}x{noisy}", flush=True)
                rows.append({"cell": cell, "shape": shape, "mode": mode, "seconds": s, "iqr": row.iqr})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bench.machine(), "other": os.path.abspath(args.other), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
