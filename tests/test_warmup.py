"""Compiling ahead (``rnnkit.compile_kernels``, ``rnnkit compile``), the notice of an on-demand
compile, and ``rnnkit train``'s warm-up. A real cold compile takes minutes: these tests check
what the drive covers, run its small calls, and exercise the notice on a probe function."""

from __future__ import annotations

import types

import numba
import pytest
import torch
from numba.core import caching

import rnnkit
from rnnkit import _warmup, charlm
from rnnkit.cells import CELLS
from rnnkit.cli import main


def test_the_drive_covers_every_registered_cell_and_every_single_step_cell():
    """Every cell that has kernels, as a layer and as a cell module."""
    fused = [mode for mode, cell in CELLS.items() if cell.kernels is not None]
    assert _warmup._labels() == [*fused, "cells"]
    public_cells = {cls for cls in ({getattr(rnnkit, name) for name in rnnkit.__all__}
                                    & set(rnnkit.RNNCellBase.__subclasses__()))
                    if CELLS[cls(1, 1)._mode()].kernels is not None}
    assert {cls for cls, _ in _warmup._cells()} == public_cells
    units = [(dtype, label) for dtype in _warmup.DTYPES for label in _warmup._labels()]
    assert [dtype for dtype, _ in units].count("float32") == len(units) // 2


@pytest.mark.parametrize("jobs", [1, 2, 3, 4, 100])
def test_the_units_split_into_consecutive_shares(jobs):
    units = [(dtype, label) for dtype in _warmup.DTYPES for label in _warmup._labels()]
    shares = _warmup._split(units, jobs)
    assert [u for share in shares for u in share] == units
    assert len(shares) == min(jobs, len(units))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    if jobs == 2:  # one dtype each
        assert [{dtype for dtype, _ in share} for share in shares] == [{"float32"}, {"float64"}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", list(CELLS))
def test_the_drive_runs_its_small_calls(mode, dtype):
    # (its large shapes add threads and sizes to the same calls, whose kernels a cold cache
    # would spend minutes compiling here)
    for shape in _warmup._SHAPES:
        if shape.T * shape.B * shape.H <= 1024:
            _warmup._run_layer(mode, shape, dtype)
    for cls, kwargs in _warmup._cells():
        _warmup._run_cell(cls, kwargs, 5, dtype)
    for layers in (1, 2):
        _warmup._run_stream(mode, layers, dtype)


@pytest.fixture
def watch(monkeypatch):
    """The process's watch as if nothing had compiled yet."""
    monkeypatch.setattr(_warmup._WATCH, "noticed", False)
    monkeypatch.setattr(_warmup._WATCH, "quiet", 0)
    return _warmup._WATCH


def _probe(x):
    return x + 1


def _in_rnnkit(fn):
    """``fn`` as if defined in an rnnkit module (the watch knows rnnkit's kernels by their module;
    numba imports a function's module when it builds its environment, so a real one)."""
    return types.FunctionType(fn.__code__, vars(_warmup), fn.__name__)


def test_the_first_compile_of_a_kernel_prints_one_notice(watch, capsys):
    compiled = watch.compiled
    kernel = numba.njit(_in_rnnkit(_probe))
    kernel(1)
    kernel(1.0)  # another signature: compiles again, no second notice
    assert capsys.readouterr().err == _warmup.NOTICE + "\n"
    assert watch.compiled == compiled + 2
    numba.njit(_probe)(1)  # not rnnkit's
    assert capsys.readouterr().err == ""


def test_no_notice_while_compile_kernels_runs(watch, capsys, monkeypatch):
    monkeypatch.setattr(watch, "quiet", 1)
    numba.njit(_in_rnnkit(_probe))(1)
    assert capsys.readouterr().err == ""


def test_no_notice_when_the_kernel_loads_from_the_cache(watch, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    numba.njit(_in_rnnkit(_probe), cache=True)(1)  # compiles, saves
    assert capsys.readouterr().err == _warmup.NOTICE + "\n"
    watch.noticed = False
    compiled = watch.compiled
    numba.njit(_in_rnnkit(_probe), cache=True)(1)  # a new dispatcher: loads
    assert capsys.readouterr().err == ""
    assert watch.compiled == compiled


def test_cache_writes_are_serialised_and_then_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    save = caching.IndexDataCacheFile.save
    with _warmup._serialised_cache_writes(str(tmp_path / "lock")):
        assert caching.IndexDataCacheFile.save is not save
        numba.njit(_probe, cache=True)(2)
    assert caching.IndexDataCacheFile.save is save
    assert list((tmp_path / "cache").rglob("*.nbi")) and (tmp_path / "lock").exists()


def test_compile_command_help_and_bad_jobs(capsys):
    with pytest.raises(SystemExit) as done:
        main(["compile", "--help"])
    assert done.value.code == 0
    assert "into the on-disk cache" in " ".join(capsys.readouterr().out.split())
    assert main(["compile", "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--jobs must be a positive integer" in err
    with pytest.raises(ValueError, match="jobs"):
        rnnkit.compile_kernels(jobs=0)


TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine.\n" * 20


def test_train_warm_up_leaves_a_seeded_run_unchanged(tmp_path, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")

    def run(name):
        config = charlm.TrainConfig(data=str(data), hidden=16, embed=8, layers=2, dropout=0.3, batch_size=4,
                                    seq_len=12, steps=12, eval_interval=6, time_limit=1e5)
        result = charlm.train(config, tmp_path / name, progress=False, log=lambda line: None)
        state = torch.load(tmp_path / name / charlm.CHECKPOINT, weights_only=True)["state_dict"]
        return [(h["train_loss"], h["val_loss"]) for h in result.history], state, result.sample

    warmed = run("warmed")
    monkeypatch.setattr(charlm, "warm_up", lambda *args: 0.0)
    cold = run("cold")
    assert warmed[0] == cold[0] and warmed[2] == cold[2]
    assert warmed[1].keys() == cold[1].keys()
    for name, tensor in warmed[1].items():
        assert torch.equal(tensor, cold[1][name]), name
