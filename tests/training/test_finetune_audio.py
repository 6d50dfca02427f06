"""Fine-tuning of the audio side (`side: audio`) and of both sides in one job (`side: both`).

Inputs are built with the real code, as in test_finetune.py: tiny synthetic mp4s (2 s, two
classes) decoded by avepipe.decode.decode_shard (16 and 32 kHz, K=2 frames per second), a
manifest from collect_manifest. The frozen visual partner of `side: audio` is a feature store
of 2x2 maps of quadrant thumbnails of the stored frames (an independent, deterministic visual
feature).
Random encoder weights; a seeded random Cnn14 saved as a PANNs checkpoint file as the base
where the file path matters.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from avepipe.encoders import get_encoder
from avepipe.encoders.vggish import LogMelPatch
from avepipe.options import FinetuneOptions
from avepipe.training import finetune as ft
from avepipe.training import finetune_data as ftd
from avepipe.extract import audio_chunks, extract_shard
from avepipe.store import open_features, write_feature_shard
from training.finetune_cases import decoded_set

from .interrupt import Killed, kill_after

torch.set_num_threads(1)

N_SEG = 2
RATES = [16000, 32000]
KW = dict(epochs=2, lr=1e-2, batch_size=4, trainable="last:1", milestones=[], device="cpu", proj_dim=32)


def _colour_maps(frames: np.ndarray) -> np.ndarray:
    """(T, K, 224, 224, 3) uint8 -> (T, 2, 2, 48): a 2x2 map whose "channels" are the 4x4 RGB
    thumbnail (centred) of each image quadrant, first frame of each second."""
    f = frames[:, 0].astype(np.float32) / 255.0 - 0.5
    t = f.reshape(f.shape[0], 2, 4, 28, 2, 4, 28, 3).mean((3, 6))  # (T, qy, 4, qx, 4, 3)
    return t.transpose(0, 1, 3, 2, 4, 5).reshape(f.shape[0], 2, 2, 48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fta")
    index, shard, manifest = decoded_set(root, N_SEG, RATES, seed=200)
    g = zarr.open_group(str(shard), mode="r")
    vids = [str(v) for v in g["video_id"][:]]
    maps = np.stack([_colour_maps(np.asarray(g["frames"][i])) for i in range(len(vids))])
    vstore = write_feature_shard(root / "visual" / "shard-000.zarr", vids, maps, dtype="float32")
    trainval = sorted(f"vid{i:02d}xxxxx" for i in range(6))
    test_ids = {f"vid{i:02d}xxxxx" for i in (6, 7)}
    return dict(root=root, index=index, manifest=manifest, decoded=[shard], visual=[vstore], trainval=trainval,
                test_ids=test_ids, vids=vids)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _opts(**kw) -> FinetuneOptions:
    return FinetuneOptions(**{"encoder": "resnet50", "audio": "vggish", **KW, **kw})


def _audio(data, out, encoder="vggish", base_weights="random", seed=0, manifest=None, on_epoch_end=None, **kw):
    m = data["manifest"] if manifest is None else manifest
    return ft.finetune(m, data["decoded"], data["visual"], out, _opts(audio=encoder, side="audio", **kw),
                       base_weights={encoder: base_weights}, seed=seed, on_epoch_end=on_epoch_end)


def _both(data, out, seed=0, on_epoch_end=None, **kw):
    return ft.finetune(data["manifest"], data["decoded"], [], out, _opts(side="both", **kw),
                       base_weights={"resnet50": "random", "vggish": "random"}, seed=seed, on_epoch_end=on_epoch_end)


@pytest.fixture(scope="module")
def vggish_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vggish2")
    return dict(out=out, res=_audio(data, out))


@pytest.fixture(scope="module")
def cnn14_base(tmp_path_factory):
    """A seeded random Cnn14 saved as a PANNs checkpoint ({"model": ..., "iteration": ...})."""
    path = tmp_path_factory.mktemp("cnn14base") / "Cnn14_base.pth"
    sd = get_encoder("cnn14").load("random:7").model.state_dict()
    torch.save({"model": sd, "iteration": 1000}, path)
    return path


@pytest.fixture(scope="module")
def vggish_scaled(tmp_path_factory):
    """VGGish with He (fan-in, ReLU) init saved as a torchvggish file: activations keep their
    scale through the layers, as a trained network's do. Under torch's default init the
    embeddings of all inputs are ~0.005 and nearly equal, which leaves InfoNCE nothing to learn."""
    model = get_encoder("vggish").load("random").model
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            torch.nn.init.zeros_(m.bias)
    path = tmp_path_factory.mktemp("vggish_scaled") / "vggish_scaled.pth"
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------- blocks
def test_audio_blocks_and_frozen_front_ends():
    vspec, cspec = get_encoder("vggish"), get_encoder("cnn14")
    vgg = vspec.load("random").model
    assert len(vspec.trainable_blocks(vgg)) == 5
    assert {n.split(".")[0] for n in ft.set_trainable(vgg, vspec, "last:1")} == {"embeddings"}
    names = ft.set_trainable(vgg, vspec, "last:2")
    assert {n.split(".")[0] for n in names} == {"embeddings", "features"}
    assert {n for n in names if n.startswith("features")} == {"features.11.weight", "features.11.bias",
                                                              "features.13.weight", "features.13.bias"}
    cnn = cspec.load("random").model
    assert len(cspec.trainable_blocks(cnn)) == 7
    assert {n.split(".")[0] for n in ft.set_trainable(cnn, cspec, "last:1")} == {"fc1"}
    every = set(ft.set_trainable(cnn, cspec, "all"))
    front = {n for n, _ in cnn.named_parameters() if n.split(".")[0] in
             ("spectrogram_extractor", "logmel_extractor", "bn0", "fc_audioset")}
    assert front and not every & front
    assert every == {n for n, _ in cnn.named_parameters()} - front
    with pytest.raises(ValueError, match="cnn14 has 7 blocks"):
        ft.set_trainable(cnn, cspec, "last:8")


def test_train_mode_keeps_frozen_batchnorms_and_dropout_off():
    cnn = get_encoder("cnn14").load("random").model
    ft.set_trainable(cnn, get_encoder("cnn14"), "last:2")  # conv_block6 + fc1
    ft.train_mode(cnn)
    assert not cnn.training and not cnn.spec_augmenter.training  # no dropout, no SpecAugment
    assert cnn.conv_block6.bn1.training and cnn.conv_block6.bn2.training
    assert not cnn.conv_block5.bn1.training and not cnn.bn0.training


# --------------------------------------------------------------------------- data
def test_audio_data_is_train_val_waves_and_visual_partner(data):
    d = ftd.load_finetune_data(data["manifest"], data["decoded"], data["visual"], frames=False,
                               audio_rate=16000, partner="visual")
    assert d.video_ids == data["trainval"] and d.frames is None and d.audio is None
    g = zarr.open_group(str(data["decoded"][0]), mode="r")
    row = data["vids"].index(d.video_ids[3])
    wave = np.asarray(g["audio_16000"][row])
    np.testing.assert_array_equal(d.waves[3], wave[: N_SEG * 16000])
    # without an encoder's own cut: the extraction stage's 1-s chunks, video after video
    x = ftd.batch_waves(d, np.array([3, 0]))
    assert x.shape == (2 * N_SEG, 16000) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:N_SEG], audio_chunks(wave, 16000, np.arange(N_SEG, dtype=float), 1.0))
    np.testing.assert_array_equal(x[1, :100], wave[16000:16100])
    # VGGish's default framing (clip): patch k of the continuous 0.96-s framing, as extraction cuts it
    spec = get_encoder("vggish")
    clip = ftd.batch_waves(d, np.array([3, 0]), spec.check_options({}))
    assert clip.shape == (2 * N_SEG, 15600)
    for k in range(N_SEG):
        np.testing.assert_array_equal(clip[k], wave[15360 * k: 15360 * k + 15600])
    second = ftd.batch_waves(d, np.array([3]), spec.check_options({"framing": "second"}))
    np.testing.assert_array_equal(second, x[:N_SEG])
    # partner: mean over seconds and space of the stored visual maps
    maps = np.stack([_colour_maps(np.asarray(g["frames"][data["vids"].index(v)])) for v in d.video_ids])
    np.testing.assert_allclose(d.visual, maps.mean((1, 2, 3)), rtol=1e-5, atol=1e-7)  # float32 sums
    with pytest.raises(ValueError, match="no audio_48000"):
        ftd.load_finetune_data(data["manifest"], data["decoded"], data["visual"], frames=False,
                               audio_rate=48000, partner="visual")


def test_damaged_decoded_shard_is_named(data, tmp_path):
    """A flipped byte in a decoded waveform chunk stops fine-tuning with the shard and chunk
    named, never trains on what the codec would make of it."""
    import shutil

    from avepipe.verify import StoreDamagedError

    shard = tmp_path / "shard-000.zarr"
    shutil.copytree(data["decoded"][0], shard)
    chunk = sorted(p for p in (shard / "audio_16000" / "c").rglob("*") if p.is_file())[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    d = ftd.load_finetune_data(data["manifest"], [shard], data["visual"], frames=False,
                               audio_rate=16000, partner="visual")
    with pytest.raises(StoreDamagedError, match="audio_16000") as err:
        [d.waves[i] for i in range(len(d))]
    assert str(shard) in str(err.value)
    chunk.unlink()  # a missing chunk file is found before any read
    with pytest.raises(StoreDamagedError, match="audio_16000"):
        ftd.load_finetune_data(data["manifest"], [shard], data["visual"], frames=False,
                               audio_rate=16000, partner="visual")


def test_test_ids_are_never_read(data, tmp_path, monkeypatch):
    """Every row the loop reads from the decoded shards (frames and waveforms) and every
    partner row it asks the store for, during a whole run of side both and side audio."""
    read, asked = [], []
    orig = ftd._RowSource.__getitem__

    def spy(self, i):
        read.append(data["vids"][self._rows[i]])
        return orig(self, i)

    import avepipe.store as store

    real_open = store.open_features

    def open_spy(paths, video_ids=None, **kw):
        asked.extend(video_ids or ["<all>"])
        return real_open(paths, video_ids=video_ids, **kw)

    monkeypatch.setattr(ftd._RowSource, "__getitem__", spy)
    monkeypatch.setattr(store, "open_features", open_spy)  # store_means imports it at call time
    _both(data, tmp_path / "both", epochs=1)
    _audio(data, tmp_path / "audio", epochs=1)
    # batches of 4 of the 6 train/val videos (the incomplete batch is dropped): a subset is read
    assert len(set(read)) >= 4 and set(read) <= set(data["trainval"])
    assert set(asked) == set(data["trainval"])  # the partner vectors of all train/val videos
    assert not (set(read) | set(asked)) & data["test_ids"]


# --------------------------------------------------------------------------- side audio: VGGish
def test_vggish_outputs_and_provenance(vggish_run, data):
    out, res = vggish_run["out"], vggish_run["res"]
    for name in ("weights.pth", "log.jsonl", "loss.png", "provenance.json"):
        assert (out / name).is_file(), name
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["seconds_per_s"] > 0 for r in log)
    assert "frames_per_s" not in log[0]  # no frames on the audio side
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["side"] == "audio" and prov["encoder"] == "vggish"
    assert prov["encoders"]["vggish"]["base_weights"]["id"] == "random"
    assert prov["base_weights"]["id"] == "random" and prov["base_weights"]["seed"] == 0
    assert prov["data_ids_sha256"] == hashlib.sha256("\n".join(data["trainval"]).encode()).hexdigest()
    assert prov["partner"] == {"modality": "visual", "store": [str(p) for p in data["visual"]]}
    assert prov["weights_sha256"] == hashlib.sha256((out / "weights.pth").read_bytes()).hexdigest()
    assert prov["config"]["audio_front_end"] == "vggish_logmel_patch" and prov["config"]["side"] == "audio"
    assert res["weights"] == {"vggish": str(out / "weights.pth")}


def test_vggish_only_trained_block_changes_in_torchvggish_layout(vggish_run):
    base = get_encoder("vggish").load("random").model.state_dict()
    tuned = _weights(vggish_run["out"] / "weights.pth")
    assert set(tuned) == set(base)  # torchvggish keys exactly (PCA params are not in it)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {k for k in base if k.startswith("embeddings.")}
    prov = json.loads((vggish_run["out"] / "provenance.json").read_text())
    assert set(prov["trainable"]) == {k for k in base if k.startswith("embeddings.")}


def test_vggish_weights_through_extraction(vggish_run, data, tmp_path):
    """Extraction with the saved file == a direct forward of the fine-tuned module on the
    decoded waveform through the VGGish front end (default framing: patch k starts at sample
    15360 k, as the fine-tuning batches cut it)."""
    path = vggish_run["out"] / "weights.pth"
    out = extract_shard(data["decoded"][0], data["index"], "vggish", str(path), tmp_path / "f.zarr",
                        device="cpu", dtype="float32", num_workers=0, progress=False)
    fs = open_features(out, video_ids=["vid01xxxxx", "vid06xxxxx"])
    got = np.asarray(fs.features)
    trunk = vggish_run["res"]["model"].audio_trunk.eval()
    g = zarr.open_group(str(data["decoded"][0]), mode="r")
    for k, vid in enumerate(["vid01xxxxx", "vid06xxxxx"]):
        wave = np.asarray(g["audio_16000"][data["vids"].index(vid)])
        with torch.no_grad():
            patches = np.stack([wave[15360 * j: 15360 * j + 15600] for j in range(N_SEG)])
            want = trunk(LogMelPatch()(torch.from_numpy(patches)))
        np.testing.assert_allclose(got[k], want.numpy(), rtol=1e-4, atol=1e-5)
    base = extract_shard(data["decoded"][0], data["index"], "vggish", "random", tmp_path / "b.zarr",
                         device="cpu", dtype="float32", num_workers=0, progress=False)
    assert not np.allclose(np.asarray(open_features(base, video_ids=["vid01xxxxx"]).features), got[:1])


# --------------------------------------------------------------------------- side audio: Cnn14
def test_cnn14_checkpoint_layout_changes_and_extraction(data, cnn14_base, tmp_path):
    res = _audio(data, tmp_path / "ft", encoder="cnn14", base_weights=str(cnn14_base), trainable="last:2",
                 epochs=1)
    saved = _weights(tmp_path / "ft" / "weights.pth")
    base = torch.load(cnn14_base, weights_only=True)["model"]
    assert set(saved) == {"model"} and set(saved["model"]) == set(base)  # PANNs layout, every key
    changed = {k for k in base if not torch.equal(base[k], saved["model"][k])}
    trained = {k for k in base if k.split(".")[0] in ("conv_block6", "fc1") and not k.endswith("num_batches_tracked")}
    assert changed - {k for k in changed if k.endswith("num_batches_tracked")} == trained
    assert "conv_block6.bn1.running_mean" in changed and "bn0.running_mean" not in changed
    prov = res["provenance"]
    assert prov["base_weights"]["sha256"] == hashlib.sha256(cnn14_base.read_bytes()).hexdigest()
    # extraction loads it as a plain local weights path; equals the fine-tuned module's forward
    out = extract_shard(data["decoded"][0], data["index"], "cnn14", str(tmp_path / "ft" / "weights.pth"),
                        tmp_path / "f.zarr", device="cpu", dtype="float32", num_workers=0, progress=False)
    got = np.asarray(open_features(out, video_ids=["vid02xxxxx"]).features)[0]
    wave = np.asarray(zarr.open_group(str(data["decoded"][0]), mode="r")["audio_32000"][data["vids"].index("vid02xxxxx")])
    trunk = res["model"].audio_trunk.eval()
    with torch.no_grad():
        want = trunk(torch.from_numpy(audio_chunks(wave, 32000, np.arange(N_SEG, dtype=float), 1.0)))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- side both
def test_both_sides_train_together(data, tmp_path):
    out = tmp_path / "both"
    res = _both(data, out, epochs=1)
    for name in ("resnet50.pth", "vggish.pth", "log.jsonl", "loss.png", "provenance.json"):
        assert (out / name).is_file(), name
    assert not (out / "weights.pth").exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["side"] == "both" and set(prov["encoders"]) == {"resnet50", "vggish"}
    for enc, prefix in (("resnet50", "layer4."), ("vggish", "embeddings.")):
        rec = prov["encoders"][enc]
        assert rec["base_weights"]["id"] == "random" and all(n.startswith(prefix) for n in rec["trainable"])
        assert rec["weights_sha256"] == hashlib.sha256((out / f"{enc}.pth").read_bytes()).hexdigest()
        spec = get_encoder(enc)
        basesd = spec.load("random").model.state_dict()
        tuned = _weights(out / f"{enc}.pth")
        changed = {k for k in basesd if not torch.equal(basesd[k], tuned[k])}
        assert changed and all(k.startswith(prefix) for k in changed), sorted(changed)[:5]
        spec.load(str(out / f"{enc}.pth"))  # loads through the extraction path
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["frames_per_s"] == log["seconds_per_s"] > 0
    assert res["model"].trunk is not None and res["model"].audio_trunk is not None


def test_cli_side_audio_equals_the_function(data, vggish_run, tmp_path):
    """`avepipe finetune --side audio` (the rule's command) gives the function's weights."""
    from avepipe.cli import main

    man = tmp_path / "manifest.parquet"
    data["manifest"].to_parquet(man)
    out = tmp_path / "cli"
    rc = main(["finetune", "--manifest", str(man), "--encoder", "resnet50", "--audio", "vggish", "--side", "audio",
               "--epochs", "2", "--lr", str(KW["lr"]), "--milestones", "--batch-size", "4", "--proj-dim", "32",
               "--trainable", "last:1", "--include-val", "--device", "cpu", "--base-weights", "vggish=random",
               "--partner-store", *map(str, data["visual"]), "--decoded", *map(str, data["decoded"]),
               "--out-dir", str(out)])
    assert rc == 0
    a, b = _weights(out / "weights.pth"), _weights(vggish_run["out"] / "weights.pth")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((out / "provenance.json").read_text())["config"]["partner_store"] == [str(p) for p in data["visual"]]


def test_side_and_encoder_checks(data, tmp_path):
    with pytest.raises(ValueError, match="trains finetune.audio, an audio encoder"):
        _audio(data, tmp_path, encoder="resnet50")
    with pytest.raises(ValueError, match="trains finetune.audio"):
        ft.finetune(data["manifest"], data["decoded"], [], tmp_path, _opts(side="both", audio=None),
                    base_weights={}, seed=0)
    with pytest.raises(ValueError, match="partner"):
        ft.finetune(data["manifest"], data["decoded"], [], tmp_path, _opts(side="audio"),
                    base_weights={"vggish": "random"}, seed=0)


# --------------------------------------------------------------------------- learning, reproducibility
@pytest.mark.slow
def test_audio_loss_goes_down(data, vggish_scaled, tmp_path):
    m = data["manifest"]
    m = m[m.video_id.isin(data["trainval"][:4])]  # one fixed batch per epoch
    # 6 epochs: after 4 the loss of these band-limited synthetic sounds was still at 0.80 of chance
    res = _audio(data, tmp_path, base_weights=str(vggish_scaled), manifest=m, epochs=6, lr=0.01)
    losses = [h["loss"] for h in res["history"]]
    assert losses[0] == pytest.approx(np.log(4), abs=0.3)  # chance level at the start
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_audio_same_seed_same_weights_and_resume(vggish_run, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _audio(data, a, epochs=1)
    _audio(data, b, epochs=1)
    wa, wb = _weights(a / "weights.pth"), _weights(b / "weights.pth")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    k = tmp_path / "k"
    with pytest.raises(Killed):
        _audio(data, k, epochs=2, on_epoch_end=kill_after(1))
    res = _audio(data, k, epochs=2)  # resumes from the epoch-1 checkpoint
    w2, wr = _weights(vggish_run["out"] / "weights.pth"), _weights(k / "weights.pth")
    assert not [key for key in w2 if not torch.equal(w2[key], wr[key])]
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in vggish_run["res"]["history"]]
    c = tmp_path / "c"
    _audio(data, c, epochs=1, seed=1)
    assert not torch.equal(wa["embeddings.4.weight"], _weights(c / "weights.pth")["embeddings.4.weight"])


@pytest.mark.slow
def test_both_same_seed_same_weights_and_resume(data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    r2 = _both(data, full, epochs=2)
    with pytest.raises(Killed):
        _both(data, part, epochs=2, on_epoch_end=kill_after(1))
    rr = _both(data, part, epochs=2)  # resumed
    for enc in ("resnet50", "vggish"):
        a, b = _weights(full / f"{enc}.pth"), _weights(part / f"{enc}.pth")
        assert not [k for k in a if not torch.equal(a[k], b[k])], enc
    assert [h["loss"] for h in rr["history"]] == [h["loss"] for h in r2["history"]]


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("side, trained", [("visual", ["resnet50"]), ("audio", ["cnn14"]),
                                           ("both", ["resnet50", "cnn14"])])
def test_config_ft_features_follow_the_side(side, trained):
    import yaml

    from avepipe import config as apcfg

    cfg = yaml.safe_load(open(Path(__file__).parents[2] / "workflow/config/demo.yaml"))
    cfg.update(also=[], features=[], heads={})
    cfg["finetune"]["side"] = side
    apcfg.validate(cfg)
    assert apcfg.trained_encoders(cfg) == trained
    assert [e for e in apcfg.feature_encoders(cfg) if e.endswith("_ft")] == [f"{e}_ft" for e in trained]
    for enc in ("resnet50", "cnn14"):
        cfg["features"] = [f"{enc}_ft+vggish" if enc == "resnet50" else f"vgg19+{enc}_ft"]
        if enc in trained:
            apcfg.validate(cfg)
        else:
            with pytest.raises(apcfg.ConfigError, match=f"'{enc}_ft' needs .* trains {' and '.join(trained)}"):
                apcfg.validate(cfg)
