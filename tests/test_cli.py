"""End-to-end tests of the ``rnnkit`` command (train, sample, bench) on a tiny corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest
import torch

import rnnkit
import rnnkit.cli
from rnnkit import charlm
from rnnkit.cli import main

TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n"
    "to be or not to be, that is the question. all that glitters is not gold.\n"
) * 12
TINY = ["--hidden", "16", "--embed", "8", "--batch-size", "4", "--seq-len", "12",
        "--eval-interval", "10", "--no-progress", "--time-limit", "100000"]
HAS_LSTM = getattr(rnnkit, "LSTM", None) is not None


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run(*argv) -> int:
    """main(argv) as a shell would see it: argparse's own errors become exit codes too."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def train(corpus, out, *extra) -> int:
    return run("train", "--data", corpus, "--out", out, *TINY, *extra)


def history(run_dir) -> list:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def test_train_lowers_loss_and_writes_the_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "40", "--lr", "0.01") == 0
    for name in ("config.json", "metrics.csv", "metrics.json", "checkpoint.pt", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    vocab_size = len(set(TEXT))
    hist = history(out)
    assert [h["step"] for h in hist] == [10, 20, 30, 40]
    assert hist[0]["train_loss"] < math.log(vocab_size)  # below uniform guessing
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.3
    assert hist[-1]["val_bpc"] == pytest.approx(hist[-1]["val_loss"] / math.log(2))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["final"]["step"] == 40
    assert summary["unigram_bits"] == pytest.approx(summary["unigram_nats"] / math.log(2))
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + len(hist)
    printed = capsys.readouterr().out
    assert "bits/char" in printed and "unigram baseline" in printed
    # TEXT has no "T": the sample's prompt is the start of the training text
    assert "sample: 'the " in printed and "loss.png" in printed


def test_checkpoint_loads_with_weights_only(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "10", "--cell", "rnn_relu", "--layers", "2") == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10
    assert ckpt["vocab"] == sorted(set(TEXT))
    assert ckpt["config"]["cell"] == "rnn_relu" and ckpt["config"]["layers"] == 2
    assert ckpt["config"] == json.loads((out / "config.json").read_text())
    assert ckpt["state_dict"]["rnn.weight_hh_l1"].shape == (16, 16)
    model, _, _ = charlm.model_from_checkpoint(ckpt)
    assert isinstance(model.rnn, rnnkit.RNN)
    torch.testing.assert_close(model.state_dict(), ckpt["state_dict"], rtol=0, atol=0)


def test_sample_streams_text_from_the_prompt(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "10") == 0
    capsys.readouterr()
    assert run("sample", "--run", out, "--prompt", "the ", "--length", "40", "--seed", "3") == 0
    first = capsys.readouterr().out
    assert first.startswith("the ") and len(first) == len("the ") + 40 + 1
    assert set(first) <= set(TEXT)
    assert run("sample", "--checkpoint", out / "checkpoint.pt", "--prompt", "the ", "--length", "40",
               "--seed", "3", "--impl", "torch") == 0
    assert capsys.readouterr().out == first  # same seed, same text, either impl


@pytest.mark.parametrize("cell, impl", [
    ("gru", "rnnkit"),
    ("lstm", "torch"),
    pytest.param("lstm", "rnnkit", marks=pytest.mark.skipif(not HAS_LSTM, reason="no rnnkit.LSTM yet")),
])
def test_interrupt_then_resume_matches_an_uninterrupted_run(corpus, tmp_path, monkeypatch, capsys,
                                                            cell, impl):
    args = ("--steps", "30", "--cell", cell, "--impl", impl)
    straight = tmp_path / "straight"
    assert train(corpus, straight, *args) == 0

    lr_at = charlm.lr_at

    def ctrl_c_at_step_20(config, step, time_used=0.0):
        if step == 20:
            raise KeyboardInterrupt
        return lr_at(config, step, time_used)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(charlm, "lr_at", ctrl_c_at_step_20)
        assert train(corpus, resumed, *args) == 130
    assert "--resume" in capsys.readouterr().err
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 20
    assert run("train", "--resume", resumed, "--no-progress") == 0

    assert [h["step"] for h in history(resumed)] == [10, 20, 30]
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert b["step"] == 30
    torch.testing.assert_close(b["state_dict"], a["state_dict"], rtol=1e-5, atol=1e-6)
    assert history(resumed)[-1]["val_loss"] == pytest.approx(history(straight)[-1]["val_loss"], rel=1e-5)


def test_resume_can_train_longer(corpus, tmp_path):
    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "10") == 0
    assert run("train", "--resume", out, "--steps", "20", "--no-progress") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    assert json.loads((out / "config.json").read_text())["steps"] == 20


@pytest.mark.parametrize("cell", [
    "rnn_tanh", "rnn_relu", "gru",
    pytest.param("lstm", marks=pytest.mark.skipif(not HAS_LSTM, reason="no rnnkit.LSTM yet")),
])
def test_torch_and_rnnkit_impls_train_alike(corpus, tmp_path, cell):
    config = charlm.TrainConfig(cell=cell, hidden=16, embed=8, layers=2)
    ours = charlm.build_model(config, 30)
    theirs = charlm.build_model(charlm.TrainConfig(**{**config.to_dict(), "impl": "torch"}), 30)
    assert type(ours.rnn).__module__.startswith("rnnkit")
    assert type(theirs.rnn).__module__.startswith("torch")
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)

    losses = {}
    for impl in ("rnnkit", "torch"):
        out = tmp_path / impl
        assert train(corpus, out, "--steps", "20", "--cell", cell, "--layers", "2", "--impl", impl) == 0
        losses[impl] = [(h["train_loss"], h["val_loss"]) for h in history(out)]
    for (t_ours, v_ours), (t_theirs, v_theirs) in zip(losses["rnnkit"], losses["torch"], strict=True):
        assert t_ours == pytest.approx(t_theirs, rel=1e-4)
        assert v_ours == pytest.approx(v_theirs, rel=1e-4)


def test_same_seed_same_run_other_seed_other_run(corpus, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert train(corpus, tmp_path / name, "--steps", "10", "--seed", seed) == 0
    a, b, c = (history(tmp_path / n)[-1]["val_loss"] for n in "abc")
    assert a == b and a != c


@pytest.mark.parametrize("make_args, message", [
    (lambda c, t: ["train", "--data", t / "missing.txt"], "data file not found"),
    (lambda c, t: ["train", "--data", _write(t / "empty.txt", "")], "data file is empty"),
    (lambda c, t: ["train", "--data", _write_bytes(t / "bin.txt", b"\xff\xfe\x00abc")], "not UTF-8"),
    (lambda c, t: ["train", "--data", _write(t / "one.txt", "a")], "data too short"),
    (lambda c, t: ["train", "--data", c, "--bidirectional"], "--bidirectional is not meaningful"),
    (lambda c, t: ["train", "--data", c, "--hidden", "0"], "--hidden must be a positive integer"),
    (lambda c, t: ["train", "--data", c, "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (lambda c, t: ["train", "--data", c, "--lr", "nan"], "--lr must be a positive number"),
    (lambda c, t: ["train", "--data", c, "--cell", "transformer"], "--cell must be one of rnn_tanh, rnn_relu, gru"),
    (lambda c, t: ["train", "--resume", t / "nowhere"], "checkpoint not found"),
    (lambda c, t: ["sample", "--checkpoint", _write(t / "x.pt", "junk")], "cannot read checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys, make_args, message):
    assert run(*make_args(corpus, tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_argparse_value_is_one_line_and_exit_2(capsys):
    assert run("train", "--impl", "keras") == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice" in err and len(err.splitlines()) == 1


@pytest.fixture
def trained(corpus, tmp_path):
    out = tmp_path / "trained"
    assert train(corpus, out, "--steps", "10") == 0
    return out


@pytest.mark.parametrize("make_args, message", [
    (lambda r, c, t: ["train", "--resume", r, "--hidden", "32"], "hidden=16, got 32"),
    (lambda r, c, t: ["train", "--resume", r, "--cell", "rnn_tanh"], "cell='gru', got 'rnn_tanh'"),
    (lambda r, c, t: ["train", "--resume", r, "--data", _write(t / "other.txt", "xyz" * 300)],
     "data="),
    (lambda r, c, t: ["sample", "--run", r, "--prompt", "QZ"], "not in the model's vocabulary"),
    (lambda r, c, t: ["sample", "--run", r, "--temperature", "0"], "--temperature must be"),
    (lambda r, c, t: ["train", "--data", c, "--out", r], "already holds a run"),
])
def test_mismatched_checkpoint_is_refused(trained, corpus, tmp_path, capsys, make_args, message):
    assert run(*make_args(trained, corpus, tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_checkpoint_with_wrong_shapes_or_vocab_is_refused(trained, corpus, tmp_path, capsys):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    ckpt["state_dict"]["rnn.weight_hh_l0"] = torch.zeros(48, 32)
    torch.save(ckpt, tmp_path / "bad_shape.pt")
    assert run("sample", "--checkpoint", tmp_path / "bad_shape.pt") == 2
    assert "rnn.weight_hh_l0 has shape (48, 32), the model expects (48, 16)" in capsys.readouterr().err

    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    ckpt["vocab"] = ckpt["vocab"][:-1]
    torch.save(ckpt, trained / "checkpoint.pt")
    assert run("train", "--resume", trained, "--steps", "20", "--no-progress") == 2
    assert "another vocabulary" in capsys.readouterr().err


def test_bench_calls_rnnkit_bench_main(monkeypatch):
    seen = []
    fake = types.ModuleType("rnnkit.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "rnnkit.bench", fake)
    monkeypatch.setattr(rnnkit, "bench", fake, raising=False)
    assert run("bench", "--quick", "--json", "x.json") == 0
    assert seen == [["--quick", "--json", "x.json"]]


def test_python_dash_m_rnnkit_help():
    done = subprocess.run([sys.executable, "-m", "rnnkit", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert all(cmd in done.stdout for cmd in ("train", "sample", "bench"))


# ------------------------------------------------------------------ first use: rough edges (issue 24)
@pytest.fixture
def reference():
    """Tiny runs on the torch-ops reference: no kernel compile or kernel work in these tests."""
    with rnnkit.use_backend("reference"):
        yield


def test_rnnkit_alone_prints_help(capsys):
    assert run() == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: rnnkit") and all(cmd in out for cmd in ("train", "sample", "bench"))
    assert "required" not in out + err


def test_version(capsys):
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"rnnkit {rnnkit.__version__}"


def test_cli_module_imports_nothing_heavy():
    """The rnnkit command (help, version, argument errors) loads no torch, numpy, numba or
    plotting: checked in a fresh process (rnnkit's own __init__ loads torch only once a program
    uses it)."""
    code = """
import sys
import rnnkit.cli
for argv in (["--help"], ["--version"], ["train", "--help"], ["train", "--impl", "x"], ["sample", "--help"], []):
    try:
        rnnkit.cli.main(argv)
    except SystemExit:
        pass
heavy = {"torch", "numpy", "numba", "scipy", "matplotlib", "tqdm"}
print(sorted({name.split(".")[0] for name in sys.modules} & heavy))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("shape, message", [
    ("1,2,3", "it needs 5 numbers, got 3"),
    ("0,1,1,1,1", "its numbers must be positive"),
    ("4,1,-2,8,1", "its numbers must be positive"),
    ("a,b", "its numbers must be integers"),
    ("10,1,4,8,1.5", "its numbers must be integers"),
])
def test_bench_bad_shape_is_one_line_and_exit_2(capsys, shape, message):
    assert run("bench", "--shapes", "10,1,4,8,1", shape) == 2
    err = capsys.readouterr().err
    assert f"argument --shapes: {shape!r} is not a shape T,B,I,H,L: {message}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bench_options_have_help_and_defaults():
    from rnnkit import bench

    actions = [a for a in bench.build_parser()._actions if a.dest != "help"]
    assert len(actions) >= 13
    for action in actions:
        assert action.help and "default" in action.help, action.dest


def _fake_row(interrupt_at):
    from rnnkit import bench

    calls = []

    def measure(cell, shape, mode, *args, **kwargs):
        calls.append((cell, shape, mode))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return bench.Row(cell, shape, mode, seconds={"torch.nn": 2e-3, "rnnkit": 1e-3},
                         iqr={"torch.nn": 0, "rnnkit": 0}, gflops={"torch.nn": 1.0, "rnnkit": 2.0}, ratio=2.0)
    return measure


def test_bench_shows_progress_and_ctrl_c_keeps_the_rows_measured(monkeypatch, tmp_path, capsys):
    from rnnkit import bench

    monkeypatch.setattr(bench, "measure", _fake_row(interrupt_at=3))
    monkeypatch.setattr(bench, "machine", lambda: {"cores": 2})
    out = tmp_path / "bench.json"
    assert run("bench", "--cells", "gru", "--shapes", "10,1,4,8,1", "20,1,4,8,1", "--no-memory",
               "--json", out) == 130
    printed, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split()[0] for line in progress] == ["[1/4]", "[2/4]", "[3/4]"]
    assert "estimate after the first row" in progress[0] and "left)" in progress[1]
    assert "interrupted: 2 of 4 rows measured" in err
    table = printed.split("\n\n")[-1]
    assert "(10, 1, 4, 8, 1)         forward" in table and "(10, 1, 4, 8, 1)         train" in table
    assert "(20, 1, 4, 8, 1)" not in table
    saved = json.loads(out.read_text())
    assert saved["interrupted"] and saved["rows_planned"] == 4
    assert [(r["shape"], r["mode"]) for r in saved["rows"]] == [([10, 1, 4, 8, 1], "forward"),
                                                               ([10, 1, 4, 8, 1], "train")]


def test_sample_refuses_a_prompt_outside_the_vocabulary_before_printing(trained, capsys):
    capsys.readouterr()
    assert run("sample", "--run", trained, "--prompt", "the QUIZ", "--length", "5") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "not in the model's vocabulary" in err and "'I', 'Q', 'U', 'Z'" in err
    assert len(err.strip().splitlines()) == 1


def test_end_of_run_sample_prompt_is_made_of_the_data():
    vocab = charlm.Vocab.from_text(TEXT)
    ids = vocab.encode(TEXT)
    assert charlm.sample_prompt(vocab, ids) == "the "  # TEXT has no "T": its own first characters
    with_the = charlm.Vocab.from_text("A cat. The cat.")
    assert charlm.sample_prompt(with_the, with_the.encode("A cat")) == "The "


def test_resuming_a_finished_run_says_so(trained, capsys):
    capsys.readouterr()
    assert run("train", "--resume", trained, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "has trained 10 steps of --steps 10" in err and "--steps 20" in err
    assert len(err.strip().splitlines()) == 1
    assert torch.load(trained / "checkpoint.pt", weights_only=True)["step"] == 10


def test_short_run_loss_plot_is_lines_with_markers(corpus, tmp_path, reference):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "run"
    assert train(corpus, out, "--steps", "5", "--eval-interval", "1000") == 0  # one evaluation only
    summary = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in summary["history"]] == [5]
    assert [s for s, _ in summary["step_losses"]] == [1, 2, 3, 4, 5]
    fig = charlm.loss_figure(plt, summary["history"], summary["step_losses"], summary["unigram_nats"])
    try:
        each, mean, val = fig.axes[0].lines[:3]
        for line in (each, mean):
            assert list(line.get_xdata()) == [1, 2, 3, 4, 5] and line.get_linestyle() == "-"
        assert each.get_marker() == "." and val.get_marker() == "o" and val.get_linestyle() == "-"
        losses = [v for _, v in summary["step_losses"]]
        assert list(mean.get_ydata()) == pytest.approx([sum(losses[:i + 1]) / (i + 1) for i in range(5)])
    finally:
        plt.close(fig)
    assert (out / "loss.png").stat().st_size > 0


class _Bar:
    """Stands in for tqdm's bar: keeps every postfix."""

    def __init__(self):
        self.postfixes = []

    def update(self, n):
        pass

    def set_postfix_str(self, text, refresh=True):
        self.postfixes.append(text)

    @staticmethod
    def format_interval(seconds):
        return f"{seconds:.0f}s"

    def close(self):
        pass


def test_progress_loss_is_always_the_labelled_running_mean(corpus, tmp_path, monkeypatch, reference):
    bar = _Bar()
    monkeypatch.setattr(charlm, "_progress_bar", lambda total, initial, log: bar)
    args = [a for a in TINY if a != "--no-progress"]
    assert run("train", "--data", corpus, "--out", tmp_path / "run", *args, "--steps", "25") == 0
    losses = [v for _, v in history_file(tmp_path / "run")["step_losses"]]
    assert len(bar.postfixes) == 25
    window = charlm.LOSS_WINDOW
    for k, text in enumerate(bar.postfixes):
        last = losses[max(0, k + 1 - window):k + 1]
        assert text.startswith(f"loss {sum(last) / len(last):.3f} (mean of last {len(last)} steps), val ")


def test_without_tqdm_and_matplotlib_train_degrades(corpus, tmp_path, monkeypatch, capsys, reference):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # (None in sys.modules: the import fails)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = [a for a in TINY if a != "--no-progress"]
    out = tmp_path / "run"
    assert run("train", "--data", corpus, "--out", out, *args, "--steps", "20") == 0
    printed = capsys.readouterr().out
    assert "tqdm is not installed (pip install 'rnnkit[cli]')" in printed
    assert "matplotlib is not installed (pip install 'rnnkit[cli]')" in printed
    assert "step 10/20: loss " in printed and "step 20/20: loss " in printed  # plain progress lines
    assert not (out / "loss.png").exists()
    assert "(config.json, metrics.csv, metrics.json, checkpoint.pt)" in printed
    assert (out / "checkpoint.pt").exists()


def history_file(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path
