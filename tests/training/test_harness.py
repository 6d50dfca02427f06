"""The run harness shared by the three loops: resume exactness (every RNG stream), restart on a
config change, checkpoints that cannot run code, atomic writes, 1-based epochs, schedules
against hand values and torch's schedulers, the z-score helper, the learning-curve plot."""
from __future__ import annotations

import json
import logging
import math
import pickle
import random

import numpy as np
import pytest
import torch

from avepipe.training import harness as R
from avepipe.training.schedule import Schedule, make_optimizer, schedule, set_lr


class Payload:
    """Unpickling this creates ``marker`` (what a crafted checkpoint.pt could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_is_live(marker) -> None:
    """Control: a plain unpickler does run the payload (so a test that sees no file means the
    loader refused it, not that the payload is inert)."""
    f = pickle.loads(pickle.dumps(Payload(marker)))
    f.close()
    assert marker.exists()
    marker.unlink()


def plant_crafted_checkpoint(out, epoch: int = 1):
    """``out/checkpoint.pt`` whose unpickling would create ``out.parent / "PWNED"`` (checked
    live first); returns that marker path."""
    marker = out.parent / "PWNED"
    payload_is_live(marker)
    out.mkdir(exist_ok=True)
    torch.save({"config": Payload(marker), "epoch": epoch, "history": []}, out / "checkpoint.pt")
    return marker


class Killed(Exception):
    pass


def toy_run(out, *, epochs=4, lr=0.1, kill_after=None, resume=True):
    """A loop drawing from every RNG stream each epoch (torch, numpy, Python, the shuffle generator)."""
    gen = R.seed_all(7)
    model = torch.nn.Linear(4, 1)
    opt = make_optimizer(model.parameters(), {"optimizer": "sgd", "lr": lr, "momentum": 0.9})
    sched = Schedule("cosine", total=epochs, warmup=1)
    run = R.Run(out, {"lr": lr, "epochs": epochs, "nested": {"a": [1, 2]}})
    ck = run.resume(resume)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        R.set_rng_state(ck["rng"], gen)
    for epoch in range(run.epoch + 1, epochs + 1):
        cur = set_lr(opt, sched.factor(epoch - 1))
        perm = torch.randperm(8, generator=gen)
        x = torch.randn(8, 4)[perm] * float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.end_epoch({"epoch": epoch, "lr": cur, "loss": float(loss.detach()), "np": float(np.random.rand()),
                       "py": random.random()},
                      {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": R.rng_state(gen)})
        if epoch == kill_after:
            raise Killed
    return model.state_dict(), run


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- resume
def test_resume_after_kill_is_exact_for_every_rng_stream(tmp_path):
    full, run_full = toy_run(tmp_path / "full")
    with pytest.raises(Killed):
        toy_run(tmp_path / "k", kill_after=2)
    with open(tmp_path / "k" / "log.jsonl", "a") as f:   # a line of an epoch never checkpointed
        f.write('{"epoch": 3, "loss": 99.0}\n{"epoch": 4, "lo')  # ... and one cut short by the kill
    resumed, run_res = toy_run(tmp_path / "k")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert run_res.history == run_full.history            # numpy / Python draws included
    assert _log(tmp_path / "k") == run_full.history
    assert [r["epoch"] for r in run_full.history] == [1, 2, 3, 4]   # 1-based
    ck = torch.load(tmp_path / "k" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 4 and ck["config"]["nested"] == {"a": [1, 2]}


def test_a_config_change_starts_fresh_and_names_the_keys(tmp_path, caplog):
    toy_run(tmp_path, epochs=3)
    with caplog.at_level(logging.WARNING, logger="avepipe.training"):
        _, run = toy_run(tmp_path, epochs=3, lr=0.05)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "differs in lr" in msgs[0] and "starting fresh" in msgs[0]
    _, ref = toy_run(tmp_path / "ref", epochs=3, lr=0.05)
    assert run.history == ref.history
    # the same config resumes (nothing left to train); resume=False starts fresh
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="avepipe.training"):
        _, again = toy_run(tmp_path, epochs=3, lr=0.05)
    assert any("resuming" in r.getMessage() for r in caplog.records) and again.history == ref.history
    r = R.Run(tmp_path, {"lr": 0.05, "epochs": 3, "nested": {"a": [1, 2]}})
    assert r.resume(enabled=False) is None and r.epoch == 0 and (tmp_path / "log.jsonl").read_text() == ""


def test_config_diff_names_nested_added_and_removed_keys():
    a = {"train": {"lr": 1e-3, "schedule": {"kind": "none"}}, "seed": 0, "old": 1}
    b = {"train": {"lr": 5e-4, "schedule": {"kind": "none"}}, "seed": 0, "new": 2}
    assert R.config_diff(a, b) == ["new", "old", "train.lr"]
    assert R.config_diff(a, json.loads(json.dumps(a))) == []
    assert R.config_diff([1, 2], [1, 3]) == ["<config>"]


def test_malicious_pickle_runs_nothing_and_the_run_starts_fresh(tmp_path, caplog):
    out = tmp_path / "run"
    marker = plant_crafted_checkpoint(out, epoch=3)
    with caplog.at_level(logging.WARNING, logger="avepipe.training"):
        _, run = toy_run(out, epochs=2)
    assert not marker.exists()
    assert any("cannot be read safely" in r.getMessage() for r in caplog.records)
    assert [r["epoch"] for r in run.history] == [1, 2]
    _, ref = toy_run(tmp_path / "ref", epochs=2)
    assert run.history == ref.history


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_unreadable_or_foreign_checkpoints_mean_a_fresh_start(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content is None:  # a pre-harness checkpoint: numpy RNG state, no config
        torch.save({"epoch": 1, "rng": {"numpy": np.random.get_state()}}, path)
    else:
        path.write_bytes(content)
    _, run = toy_run(tmp_path, epochs=2)
    assert [r["epoch"] for r in run.history] == [1, 2]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    R.atomic_save({"epoch": 1}, path)

    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt   # killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        R.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_rng_state_loads_with_weights_only_and_restores_every_stream(tmp_path):
    gen = R.seed_all(3)
    torch.randn(5), np.random.rand(3), random.random(), np.random.normal()  # a cached Gaussian too
    torch.save(R.rng_state(gen), tmp_path / "rng.pt")
    want = (torch.randn(4), torch.randperm(9, generator=gen), np.random.rand(4), np.random.normal(), random.random())
    R.seed_all(99)
    R.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), gen)
    got = (torch.randn(4), torch.randperm(9, generator=gen), np.random.rand(4), np.random.normal(), random.random())
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert np.array_equal(want[2], got[2]) and want[3:] == got[3:]


# --------------------------------------------------------------------------- schedules
def test_schedule_values_by_hand():
    ms = Schedule("multistep", total=10, milestones=(2, 5), gamma=0.5)
    assert [ms.factor(e) for e in (0, 1, 2, 4, 5, 9)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    cos = Schedule("cosine", total=4)
    assert [cos.factor(e) for e in range(4)] == pytest.approx([1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2])
    assert [Schedule("none", total=6, warmup=2).factor(e) for e in range(4)] == [0.5, 1, 1, 1]
    # per step: 1 warm-up epoch of 4 steps, then cosine over the remaining 8 steps (the dense recipe)
    dense = schedule({"schedule": {"kind": "cosine"}}, epochs=3, steps_per_epoch=4, warmup_epochs=1)
    assert (dense.warmup, dense.total) == (4, 12)
    assert [dense.factor(s) for s in range(12)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    # epoch milestones scale to steps
    step_ms = schedule({"schedule": {"kind": "multistep", "milestones": [1], "gamma": 0.1}}, epochs=2, steps_per_epoch=3)
    assert [step_ms.factor(s) for s in range(6)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1])
    assert schedule({}, epochs=5).factor(4) == 1.0   # no schedule: constant
    with pytest.raises(ValueError, match="poly"):
        Schedule("poly", total=1)


@pytest.mark.parametrize("kind", ["multistep", "cosine"])
def test_schedule_matches_torch_schedulers(kind):
    """Per-epoch factors x base lr == the lr torch's MultiStepLR / CosineAnnealingLR give each epoch."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    if kind == "multistep":
        ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.1)
        ours = Schedule("multistep", total=10, milestones=(3, 7), gamma=0.1)
    else:
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        ours = Schedule("cosine", total=10)
    for epoch in range(10):
        assert 0.3 * ours.factor(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        ref.step()


def test_set_lr_scales_every_group_from_its_base():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    assert set_lr(opt, 0.5) == 0.05 and opt.param_groups[1]["lr"] == 0.005
    set_lr(opt, 0.25)   # from the base, not compounded
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.0025]


# --------------------------------------------------------------------------- z-score
def test_zscore_matches_a_hand_computation_and_floors_constant_channels():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 10, 3)) * [1.0, 50.0, 0.0] + [5.0, -3.0, 7.0]).astype(np.float32)
    mean, std = R.zscore_stats(torch.from_numpy(x))
    flat = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.numpy()[:2], flat.std(0, ddof=1)[:2], rtol=1e-5)
    assert std[2] == pytest.approx(1e-6 * flat.std(ddof=1) + 1e-12, rel=1e-3)  # constant channel: floored
    z = R.zscore(torch.from_numpy(x), mean, std)
    assert torch.isfinite(z).all() and z.dtype == torch.float32
    np.testing.assert_allclose(z.numpy()[..., :2].reshape(-1, 2).std(0, ddof=1), [1, 1], rtol=1e-4)
    h = R.zscore(torch.from_numpy(x).half(), mean, std)
    assert h.dtype == torch.float16     # stored dtype kept


def test_ave_and_dense_standardize_with_the_same_helper():
    """One z-score: the AVE data and the dense data built from the same train rows get the
    same statistics and the same z-scored values."""
    from avepipe.training.ave_data import data_from_arrays, standardize
    from avepipe.training.dense_data import DenseData, standardize_dense

    rng = np.random.default_rng(1)
    n, T = 6, 10
    v = (3 * rng.normal(size=(n, T, 5)) + 2).astype(np.float32)
    a = (rng.normal(size=(n, T, 4)) / 100).astype(np.float32)
    seg = np.zeros((n, T, 29), np.float32)
    seg[..., 28] = 1
    split = ["train"] * 4 + ["val", "test"]
    ave = data_from_arrays(v, a, seg, split)
    dense = DenseData([f"v{i}" for i in range(n)], np.array(split), list(v), list(a), np.zeros(n), 1.0, 1.0,
                      np.full(n, 10.0), [np.zeros((0, 3))] * n, ["c"])
    s1, s2 = standardize(ave), standardize_dense(dense)
    assert s1 == s2
    np.testing.assert_array_equal(ave.splits["train"].visual.numpy(), np.stack(dense.visual[:4]))
    np.testing.assert_array_equal(ave.splits["test"].audio.numpy()[0], dense.audio[5])


# --------------------------------------------------------------------------- plot, misc
def test_learning_curve_with_and_without_a_metric(tmp_path):
    hist = [{"epoch": e, "loss": 1 / e, "val_acc": None if e == 2 else 0.1 * e} for e in range(1, 5)]
    R.plot_learning_curve(hist, tmp_path / "a.png", title="t", metrics=("val_acc", "missing"), selected_epoch=3,
                          select_on="val")
    R.plot_learning_curve(hist, tmp_path / "b.png", title="loss only")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deterministic_context_restores_the_process_settings():
    before = torch.are_deterministic_algorithms_enabled()
    with R.deterministic(torch.device("cpu"), "bf16"):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with pytest.raises(ValueError, match="precision must be one of"):
        R.check_precision("float16", torch.device("cpu"))
