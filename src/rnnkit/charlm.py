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
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnnkit

LOG2E = 1.0 / math.log(2.0)
CHECKPOINT = "checkpoint.pt"
DEFAULT_DATA = "pydoc_data.topics"  # CPython's own documentation text: no download needed
SAMPLE_PROMPT = "The "  # the sample at the end of a run starts here (when the text has these characters)

# --cell name -> (class name in torch.nn / rnnkit, extra constructor arguments)
CELL_TYPES: dict[str, tuple[str, dict]] = {
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "gru": ("GRU", {}),
    "lstm": ("LSTM", {}),
}
IMPLS = ("rnnkit", "torch")

# Config fields that a resumed run may change; every other field must match the checkpoint.
RESUME_OVERRIDES = ("steps", "time_limit", "eval_interval", "impl")


class CharLMError(Exception):
    """A user error (bad data, bad value, mismatched checkpoint): one line, no traceback."""


@dataclass
class TrainConfig:
    """Everything that defines a run. The defaults are the default ``rnnkit train``."""

    data: Optional[str] = None  # UTF-8 text file; None: CPython's pydoc_data.topics
    val_fraction: float = 0.1  # held-out tail of the text
    cell: str = "gru"
    layers: int = 1
    hidden: int = 256
    embed: int = 64
    dropout: float = 0.0  # between recurrent layers and before the output layer
    seq_len: int = 64  # truncated-BPTT chunk length
    batch_size: int = 64  # parallel streams
    lr: float = 3e-3  # Adam; cosine decay to lr/10 over `steps`
    clip: float = 1.0  # gradient-norm clipping
    steps: int = 1500
    time_limit: float = 140.0  # seconds of training; stops early if reached before `steps`
    eval_interval: int = 100
    seed: int = 0
    impl: str = "rnnkit"

    def validate(self) -> None:
        positive_ints = ("layers", "hidden", "embed", "seq_len", "batch_size", "steps", "eval_interval")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CharLMError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.cell not in CELL_TYPES:
            raise CharLMError(f"--cell must be one of {', '.join(CELL_TYPES)}, got {self.cell!r}")
        if self.impl not in IMPLS:
            raise CharLMError(f"--impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise CharLMError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise CharLMError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("lr", "clip", "time_limit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CharLMError(f"--{name.replace('_', '-')} must be a positive number, got {value}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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


@dataclass
class Result:
    step: int
    val_loss: float  # nats/char
    unigram: float  # nats/char
    interrupted: bool
    stopped_by_time: bool
    sample: str
    run_dir: Path
    history: list


def train(config: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> Result:
    """Train (or resume) a run in ``run_dir``; writes config.json, metrics, checkpoint, loss.png.

    A KeyboardInterrupt stops training after saving a checkpoint (``Result.interrupted``).
    """
    config.validate()
    corpus = Corpus.load(config.data, config.val_fraction)
    vocab = corpus.vocab
    model = build_model(config, len(vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ckpt_path = run_dir / CHECKPOINT
    start_step, state, history = 0, None, []
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["vocab"] != vocab.chars:
            raise CharLMError(f"checkpoint {ckpt_path} was trained on another vocabulary than this data")
        load_weights(model, ckpt["state_dict"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        state = _state_from_list(ckpt.get("train_state"), config.cell)
        history = _read_history(run_dir)
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
    losses: list[float] = []
    chars = 0
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    t0 = time.perf_counter()
    bar = _progress_bar(config.steps, start_step, progress)

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
        _write_metrics(run_dir, history, unigram)

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
            losses.append(loss.item())
            chars += y.numel()
            elapsed = time.perf_counter() - t0
            out_of_time = elapsed >= config.time_limit
            if step % config.eval_interval == 0 or step == config.steps or out_of_time:
                record()
            if bar is not None:
                bar.update(1)
                done = step - start_step
                eta = min(elapsed / done * (config.steps - step), max(0.0, config.time_limit - elapsed))
                val = f"{last_val:.3f} ({last_val * LOG2E:.2f} bits)" if math.isfinite(last_val) else "-"
                bar.set_postfix_str(
                    f"loss {losses[-1] if losses else history[-1]['train_loss']:.3f}, val {val}, "
                    f"{chars / max(elapsed, 1e-9):,.0f} chars/s, ETA {bar.format_interval(eta)}",
                    refresh=False,
                )
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
        _write_metrics(run_dir, history, unigram)
        return Result(step, last_val, unigram, True, False, "", run_dir, history)
    if not history or history[-1]["step"] != step:
        record()
    plot_losses(run_dir, history, unigram)
    prompt = SAMPLE_PROMPT
    text = "".join(generate(model, vocab, prompt if set(prompt) <= vocab.index.keys() else "",
                            200, 0.8, torch.Generator().manual_seed(config.seed)))
    final = history[-1]["val_loss"]
    _write_metrics(run_dir, history, unigram, final={"step": step, "val_loss": final,
                                                      "val_bpc": final * LOG2E})
    return Result(step, final, unigram, False, stopped_by_time, prompt + text, run_dir, history)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # tqdm's own remaining time ignores --time-limit: the postfix carries the real ETA.
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.5,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")


# -------------------------------------------------------------------------------------- metrics

METRIC_FIELDS = ("step", "train_loss", "val_loss", "val_bpc", "elapsed_s", "chars_per_s")


def _write_metrics(run_dir: Path, history: list, unigram: float, final: Optional[dict] = None) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    summary = {"unigram_nats": unigram, "unigram_bits": unigram * LOG2E, "history": history}
    if final is not None:
        summary["final"] = final
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def _read_history(run_dir: Path) -> list:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("history", [])


def plot_losses(run_dir: Path, history: list, unigram: float) -> Path:
    """loss.png: training and validation loss (nats/char) against step, with the unigram line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, [h["train_loss"] for h in history], label="train", marker=".")
    ax.plot(steps, [h["val_loss"] for h in history], label="validation", marker=".")
    ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title("rnnkit character language model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(model: CharLM, vocab: Vocab, prompt: str, length: int, temperature: float,
             generator: Optional[torch.Generator] = None) -> Iterator[str]:
    """Yield ``length`` characters one at a time: the prompt is fed once, then each sampled
    character is fed back with the carried state. An empty prompt starts from a newline (or
    the first character of the vocabulary)."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise CharLMError(f"--temperature must be a positive number, got {temperature}")
    if length < 0:
        raise CharLMError(f"--length must be zero or more, got {length}")
    model.eval()
    if not prompt:
        prompt = "\n" if "\n" in vocab.index else vocab.chars[0]
    ids = vocab.encode(prompt).unsqueeze(1)  # (T, 1)
    logits, state = model(ids)
    for _ in range(length):
        probs = torch.softmax(logits[-1, 0] / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        yield vocab.chars[nxt]
        logits, state = model(torch.tensor([[nxt]]), state)
