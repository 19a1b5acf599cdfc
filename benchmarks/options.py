"""What rnnkit's own options cost in a training step (forward and backward), and the
layer-normalized layers against the same model written as a loop of torch ops.

- options: the same rnnkit layer with and without lengths= (random lengths in T/2..T),
  recurrent_dropout, zoneout, weight_drop; the ratio is time with the option / time without.
- layer norm: rnnkit.LayerNormLSTM / LayerNormGRU against a hand-written layer-normalized cell
  stepped in a Python loop (nn.LayerNorm on the gates' two products and, for the LSTM, on c: the
  way such models are commonly written); the ratio is loop / rnnkit.

Timings interleaved in one process after warm-up, medians (rnnkit.bench.interleaved).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/options.py [--shapes T,B,I,H ...]
        [--only options|layernorm]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import rnnkit
from rnnkit.bench import interleaved


class LoopLayerNormCell(nn.Module):
    """A layer-normalized LSTM or GRU cell written with torch ops, as users write it."""

    def __init__(self, kind: str, input_size: int, hidden_size: int):
        super().__init__()
        G = 4 if kind == "lstm" else 3
        self.kind = kind
        bound = hidden_size ** -0.5
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(G * hidden_size).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(G * hidden_size).uniform_(-bound, bound))
        self.ln_ih = nn.LayerNorm(G * hidden_size, bias=False)
        self.ln_hh = nn.LayerNorm(G * hidden_size, bias=False)
        self.ln_c = nn.LayerNorm(hidden_size) if kind == "lstm" else None

    def forward(self, x, state):
        h, c = state
        xw = self.ln_ih(x @ self.weight_ih.t()) + self.bias_ih
        hw = self.ln_hh(h @ self.weight_hh.t()) + self.bias_hh
        if self.kind == "lstm":
            i, f, g, o = (xw + hw).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(self.ln_c(c)), c
        x_r, x_z, x_n = xw.chunk(3, 1)
        h_r, h_z, h_n = hw.chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, c


def loop_layer(cell: LoopLayerNormCell, x):
    h = x.new_zeros(x.shape[1], cell.weight_hh.shape[1])
    state = (h, h)
    outs = []
    for x_t in x:
        state = cell(x_t, state)
        outs.append(state[0])
    return torch.stack(outs)


def train_step(run, x):
    def step():
        out = run(x)
        out.sum().backward()
    return step


def median(values) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["100,32,64,128", "100,64,512,512"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["options", "layernorm"], help="one of the two comparisons")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rnnkit {rnnkit.__version__}")
    for shape in args.shapes:
        T, B, I, H = map(int, shape.split(","))
        x = torch.randn(T, B, I)
        lengths = torch.randint(T // 2, T + 1, (B,))
        for kind, cls in (("lstm", rnnkit.LSTM), ("gru", rnnkit.GRU)):
            if args.only != "layernorm":
                options_cost(kind, cls, x, H, lengths, args.reps)
            if args.only != "options":
                layer_norm_speed(kind, x, H, args.reps)


def options_cost(kind: str, cls, x, H: int, lengths, reps: int) -> None:
    """The same layer's training step with each option against without it."""
    T, B, I = x.shape
    options = {"plain": {}, "recurrent_dropout=0.25": {"recurrent_dropout": 0.25},
               "zoneout=0.1": {"zoneout": 0.1}, "weight_drop=0.5": {"weight_drop": 0.5}}
    runs = {}
    for name, kwargs in options.items():
        layer = cls(I, H, **kwargs)
        runs[name] = train_step(lambda x, layer=layer: layer(x)[0], x)
    plain = cls(I, H)
    runs["lengths="] = train_step(lambda x: plain(x, lengths=lengths)[0], x)
    times = interleaved(runs, reps, warmup=1, min_time=0.2)
    base = median(times["plain"])
    print(f"{kind} training step T={T} B={B} I={I} H={H}: plain {base * 1e3:.1f} ms")
    for name in runs:
        if name != "plain":
            t = median(times[name])
            print(f"  {name:24s} {t * 1e3:9.1f} ms  {t / base:5.2f}x the plain layer")


def layer_norm_speed(kind: str, x, H: int, reps: int) -> None:
    """rnnkit's layer-normalized layer against the hand-written loop, a training step each."""
    T, B, I = x.shape
    ours = (rnnkit.LayerNormLSTM if kind == "lstm" else rnnkit.LayerNormGRU)(I, H)
    loop = LoopLayerNormCell(kind, I, H)
    times = interleaved({"rnnkit": train_step(lambda x: ours(x)[0], x),
                         "torch loop": train_step(lambda x: loop_layer(loop, x), x)},
                        reps, warmup=1, min_time=0.2)
    a, b = median(times["rnnkit"]), median(times["torch loop"])
    print(f"LayerNorm{kind.upper()} training step T={T} B={B} I={I} H={H}: rnnkit {a * 1e3:.1f} ms, "
          f"torch-ops loop {b * 1e3:.1f} ms: {b / a:.2f}x")


if __name__ == "__main__":
    main()
