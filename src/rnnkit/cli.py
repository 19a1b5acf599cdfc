"""The ``rnnkit`` command: ``train``, ``sample``, ``bench`` and ``compile`` (argparse only; the
work is in :mod:`rnnkit.charlm`, :mod:`rnnkit.bench` and :mod:`rnnkit._warmup`).

Exit codes: 0 done, 2 user error (one line on stderr, no traceback), 130 interrupted (Ctrl-C
during training saves a checkpoint first; during the benchmark, the rows measured so far are
printed and written).

This module imports nothing heavy (no torch, numpy, numba, nor the rnnkit modules that load
them): ``--help``, ``--version`` and argument errors need none of it, and each command imports
what it uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ._charlm_config import CHECKPOINT, IMPLS, LOG2E, CharLMError, TrainConfig
from ._version import __version__

USER_ERROR = 2
INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (not usage + message), exit code 2."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = Parser(prog="rnnkit", description="rnnkit: a character-level language model on rnnkit "
                    "layers (train, sample), the layer benchmark (bench) and the kernels' compilation "
                    "ahead of use (compile).")
    parser.add_argument("--version", action="version", version=f"rnnkit {__version__}")
    # (not required: `rnnkit` alone prints this help)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=Parser)

    # Every train option defaults to None: "not given", so --resume can tell what was asked for.
    tr = sub.add_parser("train", help="train a character-level language model",
                        description="Train a character-level language model: embedding -> recurrent "
                        "layers -> linear + softmax, truncated BPTT over parallel streams. "
                        "Defaults finish in about 2.5 minutes on a 2-core CPU.")
    tr.add_argument("--data", metavar="FILE", help="UTF-8 text file (default: CPython's own "
                    "documentation text, pydoc_data.topics)")
    tr.add_argument("--cell", help=f"recurrent cell: rnn_tanh, rnn_relu, gru, lstm or any other registered in "
                    f"rnnkit.cells (default {defaults.cell})")
    tr.add_argument("--layers", type=int, help=f"recurrent layers (default {defaults.layers})")
    tr.add_argument("--hidden", type=int, help=f"hidden size (default {defaults.hidden})")
    tr.add_argument("--embed", type=int, help=f"embedding size (default {defaults.embed})")
    tr.add_argument("--dropout", type=float, help=f"dropout (default {defaults.dropout})")
    tr.add_argument("--bidirectional", action="store_true",
                    help="refused: a language model cannot read the characters it predicts")
    tr.add_argument("--seq-len", type=int, help=f"truncated-BPTT length (default {defaults.seq_len})")
    tr.add_argument("--batch-size", type=int, help=f"parallel streams (default {defaults.batch_size})")
    tr.add_argument("--lr", type=float, help=f"Adam learning rate (default {defaults.lr})")
    tr.add_argument("--clip", type=float, help=f"gradient-norm clipping (default {defaults.clip})")
    tr.add_argument("--steps", type=int, help=f"training steps (default {defaults.steps})")
    tr.add_argument("--time-limit", type=float, metavar="SECONDS",
                    help=f"stop training after this long (default {defaults.time_limit:g})")
    tr.add_argument("--eval-interval", type=int, metavar="STEPS",
                    help=f"validate and checkpoint every this many steps (default {defaults.eval_interval})")
    tr.add_argument("--val-fraction", type=float, help=f"held-out tail (default {defaults.val_fraction})")
    tr.add_argument("--seed", type=int, help=f"random seed (default {defaults.seed})")
    tr.add_argument("--impl", choices=IMPLS, help="rnnkit layers, or torch.nn's for comparison "
                    f"(same initial weights for the same seed; default {defaults.impl})")
    tr.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<timestamp>-<cell>)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint "
                    "(a run that has trained all its steps needs a larger --steps)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="generate text from a trained model",
                        description="Stream text from a trained model, one character at a time.")
    src = sa.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a run folder of rnnkit train")
    src.add_argument("--checkpoint", metavar="FILE", help="a checkpoint file")
    sa.add_argument("--prompt", default="", help="text to start from (default: a newline)")
    sa.add_argument("--length", type=int, default=500, help="characters to generate (default 500)")
    sa.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default 0.8)")
    sa.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    sa.add_argument("--impl", choices=IMPLS, default="rnnkit", help="layer implementation (default rnnkit)")

    sub.add_parser("bench", help="benchmark rnnkit against torch.nn (rnnkit bench --help: its options)",
                   add_help=False)

    co = sub.add_parser("compile", help="compile every kernel ahead of its first use (once per machine)",
                        description="Compile every kernel rnnkit's layers and cells can run, float32 and "
                        "float64, into the on-disk cache, so that no later call compiles (numba compiles "
                        "a kernel on its first call otherwise). Takes minutes the first time on a machine; "
                        "seconds once cached.")
    co.add_argument("--jobs", type=int, help="processes compiling at once (default: 2 on 2 CPUs or more)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to the benchmark's own parser
        return _bench(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "compile":
        return _compile(args)
    try:
        return _train(args) if args.command == "train" else _sample(args)
    except CharLMError as e:
        print(f"rnnkit {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR


def _train(args: argparse.Namespace) -> int:
    from . import charlm

    if args.bidirectional:
        raise CharLMError("--bidirectional is not meaningful for a language model: the backward "
                          "direction would read the very characters it has to predict")
    fields = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        if args.out:
            raise CharLMError("--resume continues in its own run folder; drop --out")
        run_dir = Path(args.resume)
        config = charlm.config_for_resume(run_dir, given)
    else:
        config = TrainConfig(**given)
        config.validate()
        run_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.cell}")
        if (run_dir / CHECKPOINT).exists():
            raise CharLMError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    result = charlm.train(config, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if result.interrupted:
        print(f"\ninterrupted at step {result.step}: checkpoint saved in {run_dir}; "
              f"continue with: rnnkit train --resume {run_dir}", file=sys.stderr)
        return INTERRUPTED
    u, v = result.unigram, result.val_loss
    if result.stopped_by_time:
        print(f"stopped by --time-limit {config.time_limit:g}s at step {result.step} of {config.steps}")
    files = ["config.json", "metrics.csv", "metrics.json", CHECKPOINT] + (["loss.png"] if result.plot else [])
    print(f"run: {run_dir}  ({', '.join(files)})")
    print(f"step {result.step}: validation loss {v:.3f} nats/char = {v * LOG2E:.3f} bits/char; "
          f"unigram baseline {u:.3f} nats/char = {u * LOG2E:.3f} bits/char")
    print(f"sample: {result.sample!r}")
    print(f"more: rnnkit sample --run {run_dir}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from . import charlm

    path = Path(args.run) / CHECKPOINT if args.run else Path(args.checkpoint)
    model, _, vocab = charlm.model_from_checkpoint(charlm.load_checkpoint(path), impl=args.impl)
    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    # (checks the prompt before anything is printed)
    chars = charlm.generate(model, vocab, args.prompt, args.length, args.temperature, generator)
    out = sys.stdout
    out.write(args.prompt)
    for c in chars:
        out.write(c)
        out.flush()
    out.write("\n")
    return 0


def _compile(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        print(f"rnnkit compile: error: --jobs must be a positive integer, got {args.jobs}", file=sys.stderr)
        return USER_ERROR
    from ._warmup import compile_kernels

    report = compile_kernels(jobs=args.jobs)
    done = f"{report.compiled} kernels compiled" if report.compiled else "every kernel was already compiled"
    print(f"rnnkit compile: {done} ({report.seconds:.0f} s); cache: {report.cache_dir}")
    return 0


def _bench(argv: list) -> int:
    try:
        from . import bench
    except ImportError as e:
        if e.name not in ("rnnkit.bench",):
            raise
        print("rnnkit bench: error: the benchmark (rnnkit.bench) is not available in this version "
              "of rnnkit yet", file=sys.stderr)
        return USER_ERROR
    return bench.main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
