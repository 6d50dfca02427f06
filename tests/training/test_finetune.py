"""InfoNCE fine-tuning (avepipe.training.finetune): learning, frozen blocks, split hygiene,
determinism, weights layout, resume, restart on a changed config, provenance.

Inputs are built with the real code: tiny synthetic mp4s (avepipe.datasets.synthetic, 2 s,
two classes), decoded by avepipe.decode.decode_shard (n_segments=1, K=2 frame samples per second),
a manifest from avepipe.decode.collect_manifest, and an audio store written by
avepipe.store.write_feature_shard (per-second band energies of the decoded waveform, so audio
and picture carry the same class). ResNet-50 with random weights, batch 4, ``last:1``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avepipe.encoders import get_encoder
from avepipe.options import FinetuneOptions
from avepipe.store import write_feature_shard
from avepipe.training import finetune as ft
from avepipe.training.contrastive import ContrastiveModel, info_nce
from avepipe.training.finetune_data import batch_frames, load_finetune_data, select_videos
from training.finetune_cases import decoded_set

from .interrupt import Killed, kill_after

torch.set_num_threads(1)

N_SEG = 1  # one second per video keeps a ResNet-50 step cheap on CPU
RATE = 16000
KW = dict(encoder="resnet50", audio="vggish", side="visual", epochs=2, lr=1e-2, batch_size=4,
          trainable="last:1", milestones=[], device="cpu", proj_dim=32)


def _audio_features(wave: np.ndarray, n_seg: int, rate: int, dim: int = 64) -> np.ndarray:
    """(n_seg, dim) log band energies of each second (an independent, deterministic audio feature)."""
    sec = wave[: n_seg * rate].reshape(n_seg, rate)
    spec = np.abs(np.fft.rfft(sec, axis=1))[:, 1: 1 + dim * 40]
    return np.log1p(spec.reshape(n_seg, dim, -1).mean(-1)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    index, shard, manifest = decoded_set(root, N_SEG, [RATE], seed=100)

    import zarr

    g = zarr.open_group(str(shard), mode="r")
    vids = [str(v) for v in g["video_id"][:]]
    feats = np.stack([_audio_features(np.asarray(g[f"audio_{RATE}"][i]), N_SEG, RATE) for i in range(len(vids))])
    store = write_feature_shard(root / "audio" / "shard-000.zarr", vids, feats, dtype="float32")
    trainval = sorted(f"vid{i:02d}xxxxx" for i in range(6))
    return dict(root=root, manifest=manifest, decoded=[shard], audio=[store], trainval=trainval)


def _run(data, out: Path, seed=0, manifest=None, on_epoch_end=None, **kw):
    return ft.finetune(data["manifest"] if manifest is None else manifest, data["decoded"], data["audio"], out,
                       FinetuneOptions(**{**KW, **kw}), base_weights={"resnet50": "random"}, seed=seed,
                       on_epoch_end=on_epoch_end)


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """One uninterrupted 2-epoch run shared by several tests."""
    out = tmp_path_factory.mktemp("run2")
    res = _run(data, out)
    return dict(out=out, res=res)


# --------------------------------------------------------------------------- split hygiene
def test_select_videos_never_passes_test_ids(data):
    m = data["manifest"]
    assert select_videos(m, include_val=True) == data["trainval"]
    assert select_videos(m, include_val=False) == [v for v in data["trainval"] if v != "vid05xxxxx"]
    # the id with a train row and a test row is excluded
    both = set(m.loc[m.split == "train", "video_id"]) & set(m.loc[m.split == "test", "video_id"])
    assert both == {"vid07xxxxx"}
    assert "vid07xxxxx" not in select_videos(m, include_val=True)


def test_loaded_data_holds_exactly_train_val_ids(data):
    d = load_finetune_data(data["manifest"], data["decoded"], data["audio"], include_val=True)
    assert sorted(d.video_ids) == data["trainval"]
    assert len(d) == 6
    test_ids = set(data["manifest"].loc[data["manifest"].split == "test", "video_id"])
    assert not test_ids & set(d.video_ids)
    d2 = load_finetune_data(data["manifest"], data["decoded"], data["audio"], include_val=False)
    assert sorted(d2.video_ids) == data["trainval"][:5]
    # the audio vector is the mean over the video's seconds of the stored features
    import zarr

    from avepipe.store import open_features

    fs = open_features(data["audio"], video_ids=d.video_ids)
    np.testing.assert_allclose(d.audio, np.asarray(fs.features).mean(1), rtol=1e-6)
    g = zarr.open_group(str(data["decoded"][0]), mode="r")
    row = [str(v) for v in g["video_id"][:]].index(d.video_ids[0])
    np.testing.assert_array_equal(d.frames[0], np.asarray(g["frames"][row]))


# --------------------------------------------------------------------------- learning
def test_info_nce_matches_hand_computation():
    v = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    s = (v @ a.T).numpy() / 0.2
    lv = -np.mean([s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(5)])
    la = -np.mean([s[i, i] - np.log(np.exp(s[:, i]).sum()) for i in range(5)])
    assert info_nce(v, a, 0.2).item() == pytest.approx(0.5 * (lv + la), rel=1e-5)
    # perfectly aligned, well separated pairs: loss near 0
    eye = torch.eye(5, 8)
    assert info_nce(eye, eye, 0.05).item() < 1e-6


@pytest.mark.slow
def test_loss_goes_down(data, tmp_path):
    # four train videos = one fixed batch per epoch: the pairs can be learnt in a few steps
    m = data["manifest"]
    m = m[m.video_id.isin(data["trainval"][:4])]
    res = _run(data, tmp_path, manifest=m, epochs=4, lr=0.01)
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(4), abs=0.3)  # chance level at the start
    assert losses[-1] < 0.8 * losses[0], losses


def test_outputs_written(run2, data):
    out = run2["out"]
    for name in ("weights.pth", "log.jsonl", "loss.png", "provenance.json"):
        assert (out / name).is_file(), name
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["frames_per_s"] > 0 and np.isfinite(r["loss"]) for r in log)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "finetune"
    assert prov["base_weights"]["id"] == "random" and prov["base_weights"]["seed"] == 0
    assert prov["data_ids_sha256"] == hashlib.sha256("\n".join(data["trainval"]).encode()).hexdigest()
    assert prov["n_videos"] == 6
    cfg = prov["config"]
    assert cfg["temperature"] == 0.2 and cfg["trainable"] == "last:1" and cfg["epochs"] == 2
    assert cfg["lr"] == KW["lr"] and cfg["batch_size"] == 4 and cfg["seed"] == 0
    assert prov["weights_sha256"] == hashlib.sha256((out / "weights.pth").read_bytes()).hexdigest()
    assert all(n.startswith("layer4.") for n in prov["trainable"])


# --------------------------------------------------------------------------- what changes
def test_only_trained_block_changes(run2):
    base = get_encoder("resnet50").load("random").model.state_dict()
    tuned = _weights(run2["out"] / "weights.pth")
    assert set(base) <= set(tuned)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    frozen = [k for k in base if not k.startswith("layer4.")]
    # frozen blocks bit-identical, BatchNorm running stats and counters included
    assert not changed & set(frozen), sorted(changed & set(frozen))[:5]
    assert any(k.endswith("running_mean") for k in frozen)
    # the trained block moved: its convs and its BatchNorm statistics
    assert "layer4.2.conv3.weight" in changed and "layer4.0.conv1.weight" in changed
    assert "layer4.2.bn3.running_mean" in changed
    assert int(tuned["layer4.0.bn1.num_batches_tracked"]) == 2  # one batch per epoch, 2 epochs
    # the trained tensors are exactly the trained block's parameters
    names = set(json.loads((run2["out"] / "provenance.json").read_text())["trainable"])
    trunk = get_encoder("resnet50").load("random").model
    assert names == {k for k, _ in trunk.named_parameters() if k.startswith("layer4.")}


def test_visual_vector_is_mean_over_each_videos_frames():
    """Ragged videos (UnAV): each video's vector is the mean of its own frames, spatially pooled."""
    class Flat(torch.nn.Module):  # (N,3,2,2) -> (N,2,2,3) channels-last, like a trunk
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    model = ContrastiveModel(Flat(), 3, 4, 8)
    x = torch.randn(6, 3, 2, 2)
    got = model.visual(x, [1, 3, 2])
    want = torch.stack([x[:1].mean((0, 2, 3)), x[1:4].mean((0, 2, 3)), x[4:].mean((0, 2, 3))])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.visual(x, [3, 3]), torch.stack([x[:3].mean((0, 2, 3)), x[3:].mean((0, 2, 3))]))


def test_batch_frames_picks_one_frame_per_second(data):
    d = load_finetune_data(data["manifest"], data["decoded"], data["audio"])
    assert d.frames.per_second == 2
    idx = np.array([2, 0])
    pick = np.array([1, 0])  # N_SEG = 1 second per video
    x = batch_frames(d, idx, pick)
    assert x.shape == (2, 224, 224, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], d.frames[2][0, 1])
    np.testing.assert_array_equal(x[1], d.frames[0][0, 0])
    assert not np.array_equal(d.frames[2][0, 0], d.frames[2][0, 1])  # two distinct samples per second


def test_weights_load_through_extraction_path(run2, data):
    path = run2["out"] / "weights.pth"
    spec = get_encoder("resnet50")
    tuned = spec.load(weights=str(path))
    base = spec.load("random")
    assert tuned.weights_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    import zarr

    frames = torch.from_numpy(np.asarray(zarr.open_group(str(data["decoded"][0]), mode="r")["frames"][0, :, 0]))
    x = tuned.preprocess(frames)
    with torch.no_grad():
        yt, yb = tuned.model(x), base.model(x)
    assert yt.shape == (N_SEG, 7, 7, 2048)
    assert not torch.allclose(yt, yb)
    # the fine-tuned trunk rebuilt by hand from the file gives the same maps
    import torchvision

    ref = torchvision.models.resnet50()
    ref.load_state_dict(_weights(path), strict=True)  # official layout, fc included
    ref.eval()
    trunk = torch.nn.Sequential(*list(ref.children())[:-2])
    with torch.no_grad():
        yr = trunk(x).permute(0, 2, 3, 1)
    torch.testing.assert_close(yt, yr, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.slow
def test_same_seed_same_weights_and_resume(run2, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(data, a, epochs=1)
    _run(data, b, epochs=1)
    wa, wb = _weights(a / "weights.pth"), _weights(b / "weights.pth")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a 2-epoch run killed after epoch 1, run again: equals the uninterrupted 2-epoch run
    k = tmp_path / "k"
    with pytest.raises(Killed):
        _run(data, k, epochs=2, on_epoch_end=kill_after(1))
    assert not (k / "weights.pth").exists()
    res = _run(data, k, epochs=2)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    w2, wr = _weights(run2["out"] / "weights.pth"), _weights(k / "weights.pth")
    diff = [key for key in w2 if not torch.equal(w2[key], wr[key])]
    assert not diff, diff[:5]
    l2 = [h["loss"] for h in run2["res"]["history"]]
    assert [h["loss"] for h in res["history"]] == l2
    # a different seed gives different weights
    c = tmp_path / "c"
    _run(data, c, epochs=1, seed=1)
    wc = _weights(c / "weights.pth")
    assert not torch.equal(wa["layer4.2.conv3.weight"], wc["layer4.2.conv3.weight"])


def test_a_changed_temperature_reruns_instead_of_resuming(data, tmp_path, caplog):
    """Issue 13.3: a finished run rerun with another temperature (or lr) must train again,
    not hand back the old weights under the new provenance."""
    out = tmp_path / "run"
    _run(data, out, epochs=1, temperature=0.2)
    first = hashlib.sha256((out / "weights.pth").read_bytes()).hexdigest()
    with caplog.at_level("WARNING", logger="avepipe.training"):
        _run(data, out, epochs=1, temperature=0.9)
    assert any("differs in temperature" in r.getMessage() for r in caplog.records)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["temperature"] == 0.9 and prov["weights_sha256"] != first
    _run(data, tmp_path / "fresh", epochs=1, temperature=0.9)
    wa, wb = _weights(out / "weights.pth"), _weights(tmp_path / "fresh" / "weights.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_crafted_checkpoint_runs_nothing(data, tmp_path):
    from training.test_harness import plant_crafted_checkpoint

    out = tmp_path / "run"
    marker = plant_crafted_checkpoint(out)
    res = _run(data, out, epochs=1)
    assert not marker.exists() and [h["epoch"] for h in res["history"]] == [1]


def test_bad_trainable_and_encoder(data, tmp_path):
    with pytest.raises(ValueError, match="last:9"):
        _run(data, tmp_path, trainable="last:9")
    with pytest.raises(ValueError, match="'all' or 'last"):
        _run(data, tmp_path, trainable="layer4")
