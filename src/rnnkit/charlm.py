"""Character-level language model on rnnkit layers: data, model, training loop and sampling.

The library half of ``rnnkit train`` / ``rnnkit sample`` (``rnnkit.cli`` is only argparse):

    text -> Vocab -> ids -> B parallel streams (time-major) -> chunks of seq_len characters
    CharLM: Embedding -> stack of recurrent layers (rnnkit or torch.nn) -> Linear -> softmax

Training is truncated backpropagation through time: the recurrent state is carried from one
chunk of a stream to the next and detached in between, so gradients span one chunk while the
state sees the whole stream. Validation runs the same way over the held-out tail of the text
and reports nats/char and bits/char next to the unigram baseline (the entropy of the training
split's character distribution: what a model that ignores context can reach).

Every default lives in :class:`TrainConfig`; they were measured for the default run to finish
in under three minutes on a 2-core CPU, and are retuned there when the kernels get faster.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnnkit

# The config, its defaults and choices, and the user-error type live in a module without torch
# (the command line reads them before it loads anything heavy); they are this module's too.
from ._charlm_config import (
    CHECKPOINT, DEFAULT_DATA, IMPLS, LOG2E, RESUME_OVERRIDES, CharLMError, TrainConfig, cell_types,
)
SAMPLE_PROMPT = "The "  # the sample at the end of a run starts here (when the text has these characters)

CELL_TYPES = cell_types()

# ----------------------------------------------------------------------------------------- data


def load_text(path: Optional[str]) -> str:
    """The training text: a UTF-8 file, or CPython's documentation topics when ``path`` is None."""
    if path is None:
        from pydoc_data.topics import topics

        return "".join(topics.values())
    p = Path(path)
    if not p.is_file():
        raise CharLMError(f"data file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CharLMError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CharLMError(f"cannot read data file {path}: {e.strerror}") from None
    if not text:
        raise CharLMError(f"data file is empty: {path}")
    return text


class Vocab:
    """The characters of a text, sorted; ids are positions in that list."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        missing = sorted(set(text) - self.index.keys())
        if missing:
            raise CharLMError(f"characters not in the model's vocabulary: {''.join(missing)!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass
class Corpus:
    vocab: Vocab
    train: Tensor  # (N_train,) int64
    val: Tensor  # (N_val,) int64

    @classmethod
    def load(cls, path: Optional[str], val_fraction: float) -> "Corpus":
        text = load_text(path)
        n_val = int(len(text) * val_fraction)
        if len(text) - n_val < 2 or n_val < 2:
            raise CharLMError(
                f"data too short: {len(text)} characters cannot be split into training and "
                f"validation parts of at least 2 characters each (--val-fraction {val_fraction})"
            )
        vocab = Vocab.from_text(text)
        ids = vocab.encode(text)
        return cls(vocab, ids[: len(text) - n_val], ids[len(text) - n_val :])

    def unigram_entropy(self) -> float:
        """Entropy (nats/char) of the training split's character distribution."""
        p = torch.bincount(self.train, minlength=len(self.vocab)).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())


def streams(ids: Tensor, n: int) -> Tensor:
    """Cut ``ids`` into ``n`` contiguous streams side by side: ``(L, n)``, time-major."""
    n = max(1, min(n, len(ids) // 2))
    length = len(ids) // n
    return ids[: length * n].view(n, length).t().contiguous()


def chunk_starts(stream_len: int, seq_len: int) -> list[int]:
    """Start of each chunk of a stream; chunk ``k`` predicts ids[s+1 : s+1+seq_len]."""
    return list(range(0, stream_len - 1, seq_len))


def chunk(data: Tensor, start: int, seq_len: int) -> tuple[Tensor, Tensor]:
    end = min(start + seq_len, data.shape[0] - 1)
    return data[start:end], data[start + 1 : end + 1]


# ---------------------------------------------------------------------------------------- model


State = Union[Tensor, tuple]


def recurrent_class(cell: str, impl: str) -> type:
    """The recurrent layer class for ``--cell`` in ``--impl`` (rnnkit's looked up lazily)."""
    name, _ = CELL_TYPES[cell]
    if impl == "torch":
        return getattr(nn, name)
    cls = getattr(rnnkit, name, None)
    if cls is None:
        raise CharLMError(
            f"--cell {cell} needs rnnkit.{name}, which this rnnkit version does not have yet; "
            f"use --impl torch or another --cell"
        )
    return cls


class CharLM(nn.Module):
    """Embedding -> recurrent stack -> dropout -> Linear; outputs logits ``(T, B, V)``."""

    def __init__(self, vocab_size: int, config: TrainConfig):
        super().__init__()
        name_kwargs = CELL_TYPES[config.cell][1]
        rnn_kwargs = dict(
            input_size=config.embed,
            hidden_size=config.hidden,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            **name_kwargs,
        )
        self.embed = nn.Embedding(vocab_size, config.embed)
        # torch.nn's layer is built first in every impl so one seed gives the same weights;
        # an rnnkit layer then takes its state (same names and shapes by design).
        self.rnn = recurrent_class(config.cell, "torch")(**rnn_kwargs)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, vocab_size)
        if config.impl == "rnnkit":
            ours = recurrent_class(config.cell, "rnnkit")(**rnn_kwargs)
            ours.load_state_dict(self.rnn.state_dict())
            self.rnn = ours

    def forward(self, ids: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        out, state = self.rnn(self.embed(ids), state)
        return self.head(self.drop(out)), state


def build_model(config: TrainConfig, vocab_size: int) -> CharLM:
    """The model for ``config``; the same seed gives the same initial weights in either impl."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return CharLM(vocab_size, config)


def detach(state: Optional[State]) -> Optional[State]:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def _state_to_list(state: Optional[State]) -> Optional[list]:
    if state is None:
        return None
    return [s.detach().clone() for s in state] if isinstance(state, tuple) else [state.detach().clone()]


def _state_from_list(saved: Optional[list], cell: str) -> Optional[State]:
    if saved is None:
        return None
    return tuple(saved) if cell == "lstm" else saved[0]


# ----------------------------------------------------------------------------------- checkpoint


def save_checkpoint(path: Path, model: CharLM, config: TrainConfig, vocab: Vocab, step: int,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    state: Optional[State] = None) -> None:
    """Write a checkpoint loadable with ``torch.load(path, weights_only=True)``, atomically."""
    ckpt = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "vocab": list(vocab.chars),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "train_state": _state_to_list(state),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CharLMError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise CharLMError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "config", "vocab", "step"} <= ckpt.keys():
        raise CharLMError(f"{path} is not an rnnkit charlm checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict, impl: Optional[str] = None) -> tuple[CharLM, TrainConfig, Vocab]:
    """Rebuild the model of a checkpoint (optionally in another impl) and load its weights."""
    config = TrainConfig.from_dict(ckpt["config"])
    if impl is not None:
        config.impl = impl
    config.validate()
    vocab = Vocab(ckpt["vocab"])
    model = build_model(config, len(vocab))
    load_weights(model, ckpt["state_dict"])
    return model, config, vocab


def load_weights(model: nn.Module, state_dict: dict) -> None:
    own = model.state_dict()
    if own.keys() != state_dict.keys():
        missing, extra = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
        raise CharLMError(f"checkpoint does not match the model: missing {missing}, unexpected {extra}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CharLMError(
                f"checkpoint does not match the model: {k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state_dict)


def config_for_resume(run_dir: Path, overrides: dict) -> TrainConfig:
    """The config of the run in ``run_dir`` with ``overrides`` (only RESUME_OVERRIDES may differ)."""
    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT)
    config = TrainConfig.from_dict(ckpt["config"])
    for name, value in overrides.items():
        if name in RESUME_OVERRIDES:
            setattr(config, name, value)
        elif getattr(config, name) != value:
            raise CharLMError(
                f"checkpoint does not match: the run in {run_dir} has {name}={getattr(config, name)!r}, "
                f"got {value!r} (only {', '.join(RESUME_OVERRIDES)} can change on --resume)"
            )
    return config


# ------------------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: CharLM, data: Tensor, seq_len: int) -> float:
    """Mean cross-entropy (nats/char) over the streams ``data (L, B)``, state carried."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for start in chunk_starts(data.shape[0], seq_len):
        x, y = chunk(data, start, seq_len)
        logits, state = model(x, state)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


def lr_at(config: TrainConfig, step: int, time_used: float = 0.0) -> float:
    """Cosine decay from lr to lr/10, after a short linear warm-up. Progress is the larger of
    step/steps and time_used (a fraction of time_limit), so a run that the time limit stops
    still ends with a decayed learning rate."""
    warmup = min(50, config.steps // 10)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, config.steps - warmup), time_used))
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warm_up(model: CharLM, vocab: Vocab, train_data: Tensor, val_data: Tensor, seq_len: int) -> float:
    """Run each kind of call that training makes once: a training step's forward and backward,
    an evaluation chunk and the sampling at the end (a prompt, then single steps), so that the
    kernels they need are compiled, or loaded from the cache, before the clock and the
    learning-rate schedule start. The model's weights, its training mode and the random
    generators are left as they were and its gradients unset: the run trains exactly as it would
    without this. Returns the seconds it took."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model.train()
        x, y = chunk(train_data, 0, seq_len)
        logits, _ = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
        evaluate(model, val_data[:seq_len + 1], seq_len)
        prompt = SAMPLE_PROMPT if set(SAMPLE_PROMPT) <= vocab.index.keys() else ""
        list(generate(model, vocab, prompt, 2, 1.0, torch.Generator().manual_seed(0)))
    model.train()
    return time.perf_counter() - t0


# The training loss the progress bar shows and loss.png draws beside each step's: the mean over
# the last LOSS_WINDOW steps (fewer at the start of a run or of a resumed one).
LOSS_WINDOW = 10


@dataclass
class Result:
    step: int
    val_loss: float  # nats/char
    unigram: float  # nats/char
    interrupted: bool
    stopped_by_time: bool
    sample: str  # the end-of-run sample, its prompt included
    run_dir: Path
    history: list
    plot: Optional[Path] = None  # loss.png; None when matplotlib is not installed


def train(config: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> Result:
    """Train (or resume) a run in ``run_dir``; writes config.json, metrics, checkpoint, loss.png.

    A KeyboardInterrupt stops training after saving a checkpoint (``Result.interrupted``).
    Resuming a run that has already trained ``config.steps`` steps is a CharLMError.
    """
    config.validate()
    ckpt_path = run_dir / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if resume else None
    if ckpt is not None and ckpt["step"] >= config.steps:
        raise CharLMError(
            f"nothing to resume: the run in {run_dir} has trained {ckpt['step']} steps of --steps "
            f"{config.steps}; to train it longer, raise --steps (e.g. rnnkit train --resume {run_dir} "
            f"--steps {2 * ckpt['step']})"
        )
    corpus = Corpus.load(config.data, config.val_fraction)
    vocab = corpus.vocab
    model = build_model(config, len(vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_step, state, history, step_losses = 0, None, [], []
    if ckpt is not None:
        if ckpt["vocab"] != vocab.chars:
            raise CharLMError(f"checkpoint {ckpt_path} was trained on another vocabulary than this data")
        load_weights(model, ckpt["state_dict"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        state = _state_from_list(ckpt.get("train_state"), config.cell)
        history, step_losses = _read_metrics(run_dir, start_step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    torch.manual_seed(config.seed + start_step)  # dropout masks: reproducible, and fresh on resume
    train_data = streams(corpus.train, config.batch_size)
    val_data = streams(corpus.val, config.batch_size)
    starts = chunk_starts(train_data.shape[0], config.seq_len)
    unigram = corpus.unigram_entropy()
    log(
        f"data: {config.data or DEFAULT_DATA}: {len(corpus.train):,} training / {len(corpus.val):,} "
        f"validation chars, vocab {len(vocab)}; unigram baseline {unigram:.3f} nats/char "
        f"({unigram * LOG2E:.3f} bits/char)"
    )
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {config.cell} {config.layers}x{config.hidden} ({config.impl}), {n_params:,} parameters")
    log("warm-up: one call of each kind before the clock starts (on a machine's first run this "
        "compiles the kernels, unless `rnnkit compile` did)")
    log(f"warm-up: {warm_up(model, vocab, train_data, val_data, config.seq_len):.1f} s")

    step = start_step
    interrupted = stopped_by_time = False
    last_val = history[-1]["val_loss"] if history else float("nan")
    losses: list[float] = []  # since the last record: history's train_loss
    recent: deque = deque(maxlen=LOSS_WINDOW)
    chars = 0
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    t0 = time.perf_counter()
    bar = _progress_bar(config.steps, start_step, log) if progress else None
    plain = progress and bar is None  # asked for progress, no tqdm: a line per record instead

    def record() -> None:
        nonlocal last_val, losses, chars
        elapsed = time.perf_counter() - t0
        last_val = evaluate(model, val_data, config.seq_len)
        history.append({
            "step": step,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "val_loss": last_val,
            "val_bpc": last_val * LOG2E,
            "elapsed_s": round(elapsed_before + elapsed, 3),
            "chars_per_s": round(chars / max(elapsed, 1e-9)),
        })
        losses = []
        save_checkpoint(ckpt_path, model, config, vocab, step, optimizer, state)
        _write_metrics(run_dir, history, step_losses, unigram)
        if plain:
            log(f"step {step}/{config.steps}: {_progress_text(recent, last_val, chars / max(elapsed, 1e-9))}")

    try:
        model.train()
        while step < config.steps:
            k = step % len(starts)
            if k == 0:
                state = None  # a new pass over the streams starts from zeros
            x, y = chunk(train_data, starts[k], config.seq_len)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step, (time.perf_counter() - t0) / config.time_limit)
            logits, state = model(x, state)
            state = detach(state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            step += 1
            value = loss.item()
            losses.append(value)
            recent.append(value)
            step_losses.append([step, value])
            chars += y.numel()
            elapsed = time.perf_counter() - t0
            out_of_time = elapsed >= config.time_limit
            if step % config.eval_interval == 0 or step == config.steps or out_of_time:
                record()
            if bar is not None:
                bar.update(1)
                done = step - start_step
                eta = min(elapsed / done * (config.steps - step), max(0.0, config.time_limit - elapsed))
                bar.set_postfix_str(f"{_progress_text(recent, last_val, chars / max(elapsed, 1e-9))}, "
                                    f"ETA {bar.format_interval(eta)}", refresh=False)
            if out_of_time and step < config.steps:
                stopped_by_time = True
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    if interrupted:
        save_checkpoint(ckpt_path, model, config, vocab, step, optimizer, state)
        _write_metrics(run_dir, history, step_losses, unigram)
        return Result(step, last_val, unigram, True, False, "", run_dir, history)
    if not history or history[-1]["step"] != step:
        record()
    plot = plot_losses(run_dir, history, step_losses, unigram)
    if plot is None:
        log("no loss.png: matplotlib is not installed (pip install 'rnnkit[cli]')")
    prompt = sample_prompt(vocab, corpus.train)
    text = "".join(generate(model, vocab, prompt, 200, 0.8, torch.Generator().manual_seed(config.seed)))
    final = history[-1]["val_loss"]
    _write_metrics(run_dir, history, step_losses, unigram,
                   final={"step": step, "val_loss": final, "val_bpc": final * LOG2E})
    return Result(step, final, unigram, False, stopped_by_time, prompt + text, run_dir, history, plot)


def sample_prompt(vocab: Vocab, train_ids: Tensor) -> str:
    """The prompt of the end-of-run sample: ``"The "`` when the data has those characters, else
    the first characters of the training text (a prompt made of the data's own characters)."""
    if set("The ") <= vocab.index.keys():
        return "The "
    return vocab.decode(train_ids[:4].tolist())


def _progress_text(recent: deque, val: float, chars_per_s: float) -> str:
    """The progress report: the training loss always as the mean of the last steps (labelled),
    the latest validation loss, the speed."""
    train = f"loss {sum(recent) / len(recent):.3f} (mean of last {len(recent)} steps)" if recent else "loss -"
    val_text = f"{val:.3f} ({val * LOG2E:.2f} bits)" if math.isfinite(val) else "-"
    return f"{train}, val {val_text}, {chars_per_s:,.0f} chars/s"


def _optional(name: str):
    """An optional dependency of the command line (the ``cli`` extra: tqdm, matplotlib), or None
    when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _progress_bar(total: int, initial: int, log: Callable[[str], None]):
    tqdm = _optional("tqdm")
    if tqdm is None:
        log("no progress bar: tqdm is not installed (pip install 'rnnkit[cli]'); a line per evaluation instead")
        return None
    # tqdm's own remaining time ignores --time-limit: the postfix carries the real ETA.
    return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5,
                     bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")


# -------------------------------------------------------------------------------------- metrics

METRIC_FIELDS = ("step", "train_loss", "val_loss", "val_bpc", "elapsed_s", "chars_per_s")


def _write_metrics(run_dir: Path, history: list, step_losses: list, unigram: float,
                   final: Optional[dict] = None) -> None:
    """metrics.csv: a row per evaluation; metrics.json: the same, the unigram baseline, every
    step's training loss ([step, loss] pairs) and, at the end, the final figures."""
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    summary = {"unigram_nats": unigram, "unigram_bits": unigram * LOG2E, "history": history,
               "step_losses": step_losses}
    if final is not None:
        summary["final"] = final
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def _read_metrics(run_dir: Path, step: int) -> tuple[list, list]:
    """The history and step losses of a run up to ``step`` (its checkpoint's)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return [], []
    summary = json.loads(path.read_text())
    return ([h for h in summary.get("history", []) if h["step"] <= step],
            [s for s in summary.get("step_losses", []) if s[0] <= step])


def running_mean(values: list, window: int) -> list:
    """The mean of the last ``window`` values (fewer at the start) at each position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(run_dir: Path, history: list, step_losses: list, unigram: float) -> Optional[Path]:
    """loss.png (see :func:`loss_figure`); None, and no file, when matplotlib is not installed."""
    matplotlib = _optional("matplotlib")
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure(plt, history, step_losses, unigram)
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_figure(plt, history: list, step_losses: list, unigram: float):
    """Training loss at every step and its running mean, validation loss at every evaluation
    (markers and lines), nats/char against step, with the unigram line. Every step is drawn, so
    a short or time-limited run with one evaluation still has a training curve."""
    steps = [s for s, _ in step_losses]
    losses = [v for _, v in step_losses]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    few = len(steps) <= 100
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=0.8, marker="." if few else None,
            label="train, each step")
    ax.plot(steps, running_mean(losses, LOSS_WINDOW), color="tab:blue",
            label=f"train, mean of last {LOSS_WINDOW} steps")
    ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], color="tab:orange",
            marker="o", label="validation")
    ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title("rnnkit character language model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- sampling


def generate(model: CharLM, vocab: Vocab, prompt: str, length: int, temperature: float,
             generator: Optional[torch.Generator] = None) -> Iterator[str]:
    """An iterator over ``length`` generated characters: the prompt is fed once, then each
    sampled character is fed back with the carried state. An empty prompt starts from a newline
    (or the first character of the vocabulary). The arguments are checked here, when called
    (a prompt with characters the vocabulary lacks is a CharLMError naming them), so that a
    caller printing the prompt first never prints one that is then refused."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise CharLMError(f"--temperature must be a positive number, got {temperature}")
    if length < 0:
        raise CharLMError(f"--length must be zero or more, got {length}")
    missing = sorted(set(prompt) - vocab.index.keys())
    if missing:
        raise CharLMError(f"the prompt has characters not in the model's vocabulary (the characters of "
                          f"its training text): {', '.join(map(repr, missing))}")
    if not prompt:
        prompt = "\n" if "\n" in vocab.index else vocab.chars[0]
    return _generate(model, vocab, vocab.encode(prompt).unsqueeze(1), length, temperature, generator)


@torch.no_grad()
def _generate(model: CharLM, vocab: Vocab, ids: Tensor, length: int, temperature: float,
              generator: Optional[torch.Generator]) -> Iterator[str]:
    model.eval()
    logits, state = model(ids)  # ids: (T, 1)
    for _ in range(length):
        probs = torch.softmax(logits[-1, 0] / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        yield vocab.chars[nxt]
        logits, state = model(torch.tensor([[nxt]]), state)
