"""The layer-normalized cells stepped in a Python loop, fused kernels against rnnkit's torch-ops
reference (torch.nn has no such cell): 50 steps of inference, and 50 steps then backward.
Interleaved in one process after warm-up, medians (rnnkit.bench.interleaved).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/layer_norm_cells.py
"""

from __future__ import annotations

import torch

import rnnkit
from rnnkit.bench import interleaved

STEPS = 50


def loop(cell, x, backend: str, train: bool):
    def run():
        with torch.set_grad_enabled(train), rnnkit.use_backend(backend):
            state, outs = None, []
            for t in range(STEPS):
                state = cell(x[t], state)
                outs.append(state[0] if isinstance(state, tuple) else state)
            if train:
                torch.stack(outs).sum().backward()
    return run


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rnnkit {rnnkit.__version__}")
    for cls in (rnnkit.LayerNormLSTMCell, rnnkit.LayerNormGRUCell):
        for B, H in ((1, 64), (8, 128)):
            cell = cls(32, H)
            x = torch.randn(STEPS, B, 32)
            runs = {f"{backend} {what}": loop(cell, x, backend, what == "train")
                    for what in ("infer", "train") for backend in ("reference", "fused")}
            times = interleaved(runs, 7, warmup=1, min_time=0.1)
            med = {k: sorted(v)[len(v) // 2] / STEPS * 1e6 for k, v in times.items()}
            print(f"{cls.__name__} B={B} H={H}: inference {med['reference infer']:.1f} -> "
                  f"{med['fused infer']:.1f} us/step ({med['reference infer'] / med['fused infer']:.1f}x); "
                  f"training {med['reference train']:.1f} -> {med['fused train']:.1f} us/step "
                  f"({med['reference train'] / med['fused train']:.1f}x)")


if __name__ == "__main__":
    main()
