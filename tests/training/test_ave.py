"""The AVE heads loop: learning, determinism, resume after a kill, config-change restart,
protocol records, settings, data checks, the batch feeder and the train-only seam."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import avepipe.heads as H
from avepipe.datasets.labels import ave_label_arrays
from avepipe.options import HeadOptions, TrainOptions
from avepipe.training import ave_data as AD
from avepipe.training.ave import train_ave
from avepipe.training.schedule import make_optimizer

from .interrupt import Killed, kill_after

torch.set_num_threads(1)
T = 10


def _manifest(n_train=24, n_val=8, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    start = rng.integers(0, 6, n)
    return pd.DataFrame({
        "sample": np.arange(n), "video_id": [f"vid{i:03d}" for i in range(n)],
        "split": ["train"] * n_train + ["val"] * n_val + ["test"] * n_test,
        "label": rng.integers(0, 4, n), "start": start, "end": start + rng.integers(2, 5, n),
    })


def _features(man, noise=0.3, seed=0, vshape=(2, 2, 16), adim=8):
    """Both modalities carry the segment's class: an easily learnable problem."""
    rng = np.random.default_rng(seed)
    seg, _, _ = ave_label_arrays(man)
    cls = seg.argmax(-1)
    pv = rng.normal(size=(29, vshape[-1])).astype(np.float32)
    pa = rng.normal(size=(29, adim)).astype(np.float32)
    n = len(man)
    visual = pv[cls].reshape(n, T, *([1] * (len(vshape) - 1)), vshape[-1]) + \
        noise * rng.normal(size=(n, T, *vshape)).astype(np.float32)
    audio = pa[cls] + noise * rng.normal(size=(n, T, adim)).astype(np.float32)
    return visual.astype(np.float32), audio.astype(np.float32)


def _fs(feats, ids, status=None):
    """A FeatureSet look-alike (avepipe.store.FeatureSet fields)."""
    n = len(ids)
    return SimpleNamespace(features=feats, video_ids=np.asarray(ids), lengths=np.full(n, T, np.int32),
                           status=np.asarray(status if status is not None else ["ok"] * n),
                           reason=np.array([""] * n), attrs={"provenance": {"encoder": "synthetic"}})


@pytest.fixture(scope="module")
def data():
    man = _manifest()
    v, a = _features(man)
    return AD.load_ave_data(man, _fs(v, man.video_id), _fs(a, man.video_id))


def _run(data, out, *, head="avel", setting="full", seed=0, epochs=3, batch_size=8, lr=None, select_on="val",
         precision="float32", normalize="none", hparams=None, **kw):
    return train_ave(data, out, head=head, setting=setting, seed=seed,
                     train=TrainOptions(select_on=select_on, precision=precision, normalize=normalize, device="cpu"),
                     head_opts=HeadOptions(epochs=epochs, batch_size=batch_size, lr=lr, hparams=hparams or {}), **kw)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- learning + outputs
def test_avel_learns_easy_problem_and_writes_outputs(data, tmp_path):
    res = _run(data, tmp_path, epochs=8, lr=3e-3)
    assert res["accuracy"] > 0.85
    for f in ("checkpoint.pt", "best.pt", "log.jsonl", "metrics.json", "learning_curve.png"):
        assert (tmp_path / f).exists(), f
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(res["accuracy"]) and 0 <= m["accuracy"] <= 1
    assert m["select_on"] == "val" and m["n_failed_excluded"] == 0
    assert np.array(m["confusion_matrix"]).shape == (29, 29)
    assert np.array(m["confusion_matrix"]).sum() == 8 * T
    assert len(m["per_class_accuracy"]) == 29
    assert 1 <= m["selected_epoch"] <= 8
    assert m["provenance"]["code_fingerprint"] and m["provenance"]["features"]["visual"]["encoder"] == "synthetic"
    log = _log(tmp_path)
    assert [r["epoch"] for r in log] == list(range(1, 9))     # 1-based
    for key in ("loss", "losses", "val_acc", "test_acc", "lr", "time_s", "data_share"):
        assert key in log[0]
    assert log[-1]["loss"] < log[0]["loss"]
    # the selected epoch is the best val epoch (first of ties), numbered as in the log
    vals = [r["val_acc"] for r in log]
    assert m["selected_epoch"] == int(np.argmax(vals)) + 1
    assert log[m["selected_epoch"] - 1]["selected"] and log[-1]["best_epoch"] == m["selected_epoch"]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == m["selected_epoch"] and best["config"]["head"] == "avel"


def test_deterministic_on_cpu(data, tmp_path):
    r1 = _run(data, tmp_path / "a")
    r2 = _run(data, tmp_path / "b")
    _assert_same_state(_weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "b" / "checkpoint.pt"))
    assert r1["accuracy"] == r2["accuracy"] and r1["confusion_matrix"] == r2["confusion_matrix"]
    _run(data, tmp_path / "c", seed=1)
    w1, w3 = _weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "c" / "checkpoint.pt")
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_resume_after_kill_equals_uninterrupted(data, tmp_path):
    full = _run(data, tmp_path / "full", epochs=4)
    with pytest.raises(Killed):
        _run(data, tmp_path / "killed", epochs=4, on_epoch_end=kill_after(2))
    ck = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and not (tmp_path / "killed" / "metrics.json").exists()
    # a kill between the log line and the checkpoint leaves a line for an epoch never saved
    with open(tmp_path / "killed" / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "loss": 123.0}) + "\n")
    resumed = _run(data, tmp_path / "killed", epochs=4)
    _assert_same_state(_weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "killed" / "checkpoint.pt"))
    _assert_same_state(_weights(tmp_path / "full" / "best.pt"), _weights(tmp_path / "killed" / "best.pt"))
    assert resumed["accuracy"] == full["accuracy"] and resumed["selected_epoch"] == full["selected_epoch"]
    log = _log(tmp_path / "killed")
    assert [r["epoch"] for r in log] == [1, 2, 3, 4] and all(r["loss"] != 123.0 for r in log)
    assert [r["loss"] for r in log] == [r["loss"] for r in _log(tmp_path / "full")]
    # a finished run run again: nothing retrained, the same metrics
    again = _run(data, tmp_path / "killed", epochs=4)
    assert again["accuracy"] == full["accuracy"] and len(_log(tmp_path / "killed")) == 4


def test_config_change_starts_fresh_and_says_which_keys(data, tmp_path, caplog):
    _run(data, tmp_path / "run", epochs=2)
    with caplog.at_level("WARNING", logger="avepipe.training"):
        changed = _run(data, tmp_path / "run", epochs=2, lr=5e-4, hparams={"hidden": 64})
    line = [r.getMessage() for r in caplog.records if "another run configuration" in r.getMessage()]
    assert len(line) == 1 and "train.lr" in line[0] and "hparams.hidden" in line[0] and "starting fresh" in line[0]
    fresh = _run(data, tmp_path / "fresh", epochs=2, lr=5e-4, hparams={"hidden": 64})
    _assert_same_state(_weights(tmp_path / "run" / "checkpoint.pt"), _weights(tmp_path / "fresh" / "checkpoint.pt"))
    assert changed["accuracy"] == fresh["accuracy"] and [r["epoch"] for r in _log(tmp_path / "run")] == [1, 2]
    # resume=False: a fresh start even with a matching checkpoint
    caplog.clear()
    _run(data, tmp_path / "fresh", epochs=2, lr=5e-4, hparams={"hidden": 64}, resume=False)
    assert not any("resuming" in r.getMessage() for r in caplog.records)


def test_malicious_checkpoint_runs_nothing_and_training_starts_fresh(data, tmp_path):
    from training.test_harness import plant_crafted_checkpoint

    out = tmp_path / "run"
    marker = plant_crafted_checkpoint(out)
    res = _run(data, out, epochs=2)
    assert not marker.exists()
    assert [r["epoch"] for r in _log(out)] == [1, 2] and 0 <= res["accuracy"] <= 1
    torch.load(out / "checkpoint.pt", weights_only=True)   # replaced by a clean checkpoint


def test_select_on_test_and_last_are_recorded(data, tmp_path):
    res = _run(data, tmp_path / "t", epochs=2, select_on="test")
    assert res["select_on"] == "test" and "TEST" in res["protocol"]
    log = _log(tmp_path / "t")
    assert all(r["select_on"] == "test" for r in log)
    assert res["selected_epoch"] == int(np.argmax([r["test_acc"] for r in log])) + 1
    last = _run(data, tmp_path / "l", epochs=3, select_on="last")
    assert last["selected_epoch"] == 3 and last["protocol"] == "last epoch"
    with pytest.raises(ValueError):
        _run(data, tmp_path / "x", select_on="train")


# --------------------------------------------------------------------------- settings
def test_weak_setting_never_reads_segment_labels(data, tmp_path):
    tr = data.splits["train"]
    poisoned = AD.AVEData(dict(data.splits), data.visual_shape, data.audio_dim, T)
    poisoned.splits["train"] = AD.SplitData(tr.visual, tr.audio, torch.full_like(tr.segment_labels, float("nan")),
                                            torch.full_like(tr.event_mask, float("nan")), tr.video_label,
                                            tr.video_ids, tr.samples)
    res = _run(poisoned, tmp_path, setting="weak", epochs=2)
    assert all(np.isfinite(r["loss"]) for r in _log(tmp_path))
    assert 0 <= res["accuracy"] <= 1          # evaluated per segment on (clean) test labels


class Cheater(torch.nn.Module):
    """A 'weak' head that wrongly reads segment labels: the loop must stop it."""
    settings = ("weak",)

    def __init__(self, visual_shape, audio_dim, setting="weak", num_classes=28):
        super().__init__()
        self.fc = torch.nn.Linear(audio_dim, 29)

    def forward(self, visual, audio):
        return {"logits": self.fc(audio)}

    def loss(self, out, batch, epoch, n_epochs):
        loss = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1),
                                                 batch["segment_labels"].flatten(0, 1))
        return loss, {}

    def predict(self, out):
        return out["logits"].argmax(-1)


TRAIN_DEFAULTS = {"weak": dict(optimizer="adam", lr=1e-3, epochs=1, batch_size=8)}


def test_weak_setting_stops_a_head_that_reads_segment_labels(data, tmp_path, monkeypatch):
    monkeypatch.setitem(H.HEADS, "cheater", H.Head(f"{__name__}:Cheater", "ave"))
    with pytest.raises(FloatingPointError, match="weak"):
        train_ave(data, tmp_path, head="cheater", setting="weak", seed=0, train=TrainOptions(device="cpu"),
                  head_opts=HeadOptions())


def test_cml_setting_reports_cml_accuracies(data, tmp_path):
    res = _run(data, tmp_path, setting="cml", epochs=2, batch_size=4)
    assert set(res["cml"]) == {"A2V", "V2A", "average"}
    assert res["accuracy"] == pytest.approx(res["cml"]["average"])
    assert _log(tmp_path)[0]["val_cml"]["A2V"] is not None


def test_the_loop_refuses_what_it_does_not_train(data, tmp_path):
    with pytest.raises(ValueError, match="dense"):
        _run(data, tmp_path, head="dense")
    with pytest.raises((KeyError, ValueError), match="settings"):
        _run(data, tmp_path, head="cace_net", setting="weak")


def test_train_only_samples_with_video_labels_weak_setting_only(data, tmp_path):
    """The seam for AVE's background-only "noisy" videos: appended to train with video labels;
    the weak setting trains on them, full and cml refuse them."""
    d = AD.AVEData(dict(data.splits), data.visual_shape, data.audio_dim, T)
    n = 5
    rng = np.random.default_rng(3)
    bg = np.zeros((n, 29), np.float32)
    bg[:, 28] = 1                                           # background-only videos
    AD.append_train_only(d, rng.normal(size=(n, T, 2, 2, 16)).astype(np.float32),
                         rng.normal(size=(n, T, 8)).astype(np.float32), bg, [f"noisy{i}" for i in range(n)])
    tr = d.splits["train"]
    assert len(tr) == len(data.splits["train"]) + n and tr.video_ids[-1] == "noisy4"
    assert torch.isnan(tr.segment_labels[-n:]).all() and torch.equal(tr.video_label[-n:], torch.from_numpy(bg))
    assert d.summary()["n_extra_train"] == n and len(data.splits["train"]) == 24  # the fixture is untouched
    res = _run(d, tmp_path / "weak", setting="weak", epochs=1)
    assert res["n_train"] == 24 + n
    with pytest.raises(ValueError, match="video labels only"):
        _run(d, tmp_path / "full", setting="full", epochs=1)
    with pytest.raises(AD.DataMismatchError, match="do not match"):
        AD.append_train_only(d, np.zeros((1, T, 3)), np.zeros((1, T, 8)), bg[:1], ["x"])


def test_standardize_in_the_loop_equals_standardized_data(tmp_path):
    man = _manifest(8, 4, 4)
    v, a = _features(man)
    raw = AD.load_ave_data(man, 5 * v + 2, a / 100)
    pre = copy.deepcopy(raw)
    stats = AD.standardize(pre)
    tr = pre.splits["train"].visual.reshape(-1, 16)
    assert tr.mean(0).abs().max() < 1e-5 and (tr.std(0) - 1).abs().max() < 1e-4 and "visual" in stats
    r1 = _run(raw, tmp_path / "a", epochs=1, normalize="standardize")
    r2 = _run(pre, tmp_path / "b", epochs=1, normalize="standardize")   # already done: not z-scored twice
    assert r1["confusion_matrix"] == r2["confusion_matrix"]
    _assert_same_state(_weights(tmp_path / "a" / "best.pt"), _weights(tmp_path / "b" / "best.pt"))


# --------------------------------------------------------------------------- data loading
def test_failed_videos_are_excluded_and_counted(tmp_path):
    man = _manifest()
    v, a = _features(man)
    vstat = ["ok"] * len(man)
    vstat[0] = vstat[30] = "failed"          # a train and a val sample
    man["exists"] = True
    man.loc[35, "exists"] = False              # a test sample whose file is missing
    astat = ["ok"] * len(man)
    astat[0] = "failed"                        # same sample failed in both: counted once
    d = AD.load_ave_data(man, _fs(v, man.video_id, vstat), _fs(a, man.video_id, astat))
    assert d.n_failed_excluded == 3
    assert {f["video_id"] for f in d.failed} == {"vid000", "vid030", "vid035"}
    assert (len(d.splits["train"]), len(d.splits["val"]), len(d.splits["test"])) == (23, 7, 7)
    assert "vid000" not in d.splits["train"].video_ids
    # rows follow the manifest: vid001 is the first train row, features intact
    np.testing.assert_array_equal(d.splits["train"].audio[0].numpy(), a[1])
    res = _run(d, tmp_path, epochs=1)
    assert res["n_failed_excluded"] == 3 and res["n_train"] == 23


def test_mismatched_ids_raise_before_training():
    man = _manifest()
    v, a = _features(man)
    ids = list(man.video_id)
    ids[3], ids[4] = ids[4], ids[3]
    with pytest.raises(AD.DataMismatchError, match="video ids differ"):
        AD.load_ave_data(man, _fs(v, ids), _fs(a, man.video_id))


def test_mismatched_rows_steps_and_shapes_raise():
    man = _manifest()
    v, a = _features(man)
    with pytest.raises(AD.DataMismatchError, match="rows"):
        AD.load_ave_data(man, v[:-1], a)
    with pytest.raises(AD.DataMismatchError, match="steps"):
        AD.load_ave_data(man, v[:, :9], a[:, :9])
    with pytest.raises(AD.DataMismatchError, match=r"\(N,T,C\)"):
        AD.load_ave_data(man, v, a[..., None])
    with pytest.raises(AD.DataMismatchError, match="column"):
        AD.load_ave_data(man.drop(columns=["label"]), v, a)


def test_plain_arrays_and_zarr_store(tmp_path):
    from avepipe.store import open_features, write_feature_shard

    man = _manifest(6, 2, 2)
    v, a = _features(man)
    d = AD.load_ave_data(man, v, a)           # plain arrays aligned with the manifest
    assert d.visual_shape == (2, 2, 16) and d.audio_dim == 8
    assert d.splits["train"].visual.dtype == torch.float32
    # a real float16 store, opened in a different row order, reindexed to the manifest
    order = np.random.default_rng(0).permutation(len(man))
    write_feature_shard(tmp_path / "v.zarr", list(man.video_id[order]), v[order], dtype="float16")
    write_feature_shard(tmp_path / "a.zarr", list(man.video_id[order]), a[order], dtype="float32")
    d2 = AD.load_ave_data(man, open_features(tmp_path / "v.zarr", video_ids=list(man.video_id)), tmp_path / "a.zarr")
    assert d2.splits["train"].visual.dtype == torch.float16   # kept half in memory, cast per batch
    np.testing.assert_allclose(d2.splits["test"].visual.float().numpy(), v[8:], atol=2e-3)
    np.testing.assert_array_equal(d2.splits["test"].audio.numpy(), a[8:])
    b = d2.splits["train"].batch(torch.tensor([0, 1]), "cpu")
    assert b["visual"].dtype == torch.float32 and b["segment_labels"].shape == (2, T, 29)
    # lists of shard paths (what `run` passes) read the same
    d3 = AD.load_ave_data(man, [tmp_path / "v.zarr"], [str(tmp_path / "a.zarr")])
    assert torch.equal(d3.splits["val"].visual, d2.splits["val"].visual)


def test_batch_feeder_matches_direct_gather_and_reuses_buffers(data):
    tr = data.splits["train"]
    half = AD.SplitData(tr.visual.half(), tr.audio, tr.segment_labels, tr.event_mask, tr.video_label,
                        tr.video_ids, tr.samples)
    feeder = AD.BatchFeeder(half, 10, "cpu")
    perm = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))
    got, ptrs = [], set()
    for b, waited in feeder.epoch(perm):
        assert waited >= 0 and b["visual"].dtype == torch.float32
        got.append({k: v.clone() for k, v in b.items()})
        ptrs.add(b["visual"].data_ptr())
    feeder.close()
    assert [len(g["audio"]) for g in got] == [10, 10, 4]         # last batch partial
    assert len(ptrs) == 2                                         # two buffer sets, reused
    for i, g in enumerate(got):
        ref = half.batch(perm[10 * i:10 * i + 10], "cpu")
        for k in ref:
            assert torch.equal(g[k], ref[k]), k
    # a head reading only audio gets a zero-stride visual placeholder of the right shape
    only_audio = AD.BatchFeeder(tr, 8, "cpu", inputs=("audio",))
    b, _ = next(only_audio.epoch(perm))
    assert b["visual"].shape == (8, T, 2, 2, 16) and b["visual"].stride()[0] == 0
    only_audio.close()


@pytest.mark.parametrize("head", ["audio_only", "visual_only"])
def test_single_modality_heads_train(data, tmp_path, head):
    res = _run(data, tmp_path, head=head, epochs=2)
    assert 0 <= res["accuracy"] <= 1


def test_fused_adam_matches_plain_adam():
    """make_optimizer's fused Adam/AdamW: the same updates as the per-tensor loop (float rounding)."""
    for kind, wd in (("adam", 0.0), ("adam", 1e-2), ("adamw", 1e-2)):
        torch.manual_seed(0)
        a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        b = copy.deepcopy(a)
        w0 = a[0].weight.detach().clone()
        opt_a = make_optimizer(a.parameters(), {"optimizer": kind, "lr": 1e-2, "weight_decay": wd})
        assert opt_a.defaults.get("fused") is True
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        opt_b = cls(b.parameters(), lr=1e-2, weight_decay=wd, foreach=False)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(32, 8, generator=g)
            for m, o in ((a, opt_a), (b, opt_b)):
                o.zero_grad()
                m(x).pow(2).mean().backward()
                o.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        assert (a[0].weight - w0).abs().max() > 1e-3  # the steps did move the weights


# --------------------------------------------------------------------------- precision
def test_bf16_trains_deterministically_and_resumes_exactly(data, tmp_path, monkeypatch):
    """precision bf16 (CPU autocast) on CACE-Net with every dropout mask drawn by the numpy
    path: it learns, is recorded, two runs give identical weights, and a run killed after
    epoch 1 resumes to exactly the uninterrupted result (the masks follow the checkpointed
    torch RNG state)."""
    from avepipe.heads import dropout as D

    monkeypatch.setattr(D, "_SMALL", 0)
    kw = dict(head="cace_net", epochs=3, lr=2e-3, precision="bf16")
    r1 = _run(data, tmp_path / "a", **kw)
    log = _log(tmp_path / "a")
    assert log[-1]["loss"] < log[0]["loss"] and all(np.isfinite(r["loss"]) for r in log)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ck["config"]["precision"] == "bf16"
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())  # weights stay float32
    _run(data, tmp_path / "b", **kw)
    _assert_same_state(_weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "b" / "checkpoint.pt"))
    with pytest.raises(Killed):
        _run(data, tmp_path / "k", on_epoch_end=kill_after(1), **kw)
    resumed = _run(data, tmp_path / "k", **kw)
    _assert_same_state(_weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "k" / "checkpoint.pt"))
    assert resumed["accuracy"] == r1["accuracy"]
    # float32 is a different run (a fresh start, not a resume) with different weights
    _run(data, tmp_path / "f", **{**kw, "precision": "float32"})
    w16, w32 = _weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "f" / "checkpoint.pt")
    assert any(not torch.equal(w16[k], w32[k]) for k in w16)


def test_unknown_precision_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        _run(data, tmp_path, precision="float16")
