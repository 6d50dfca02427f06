"""avepipe.frames: recipes, the device form of preprocessing, one decoding pass for several
recipes, the frames store, and extraction from it (equal to decoding in the job)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models import ResNet50_Weights

import media_cases as mc
from avepipe import frames as fr
from avepipe import media
from avepipe.datasets.writer import write_mp4
from avepipe.encoders import get_encoder, vgg19
from avepipe.frames import script_frame_indices
from avepipe.extract import data_path, extract_shard
from avepipe.store import open_features


def _frames(n=2, h=240, w=320, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 13 + c) * np.cos(yy / 29 - c) for c in range(3)], -1)
    return np.clip(base[None] + rng.normal(0, 20, (n, h, w, 3)), 0, 255).astype(np.uint8)


def _recipe(enc: str, **opts) -> fr.FrameRecipe:
    return fr.recipe_of(enc, get_encoder(enc).check_options(opts), 4)


# ----------------------------------------------------------------- recipes and preprocessing
def test_recipes_of_the_encoders():
    assert _recipe("vgg19", preprocessing="ave") == fr.FrameRecipe("script_index", 4, "cv2_linear224", "caffe_bgr")
    assert _recipe("vgg19", preprocessing="torchvision").key == "time4-bilinear224"
    assert _recipe("resnet50").key == "time4-resize232_crop224"
    assert _recipe("resnet50", preprocessing="imagenet1k_v1") == _recipe("vgg19", preprocessing="imagenet_crop")
    assert fr.recipe_of("resnet50_ft", get_encoder("resnet50").check_options({}), 4) == _recipe("resnet50")
    assert fr.recipe_of("vggish", get_encoder("vggish").check_options({}), 4) is None  # no recipe: its own way
    assert _recipe("vgg19", preprocessing="ave").device_resize and _recipe("resnet50").device_resize
    with pytest.raises(ValueError, match="resize"):
        fr.FrameRecipe("time", 1, "nearest", "imagenet")


@pytest.mark.parametrize("preprocessing", ["ave", "torchvision"])
def test_vgg19_stages_equal_its_own_preprocessing(preprocessing):
    """The two stages (resize, normalise) give exactly VGG-19's own preprocessing."""
    frames = _frames()
    got = fr.preprocess(_recipe("vgg19", preprocessing=preprocessing), frames)
    want = vgg19.PREPROCESS[preprocessing](frames)
    assert got.shape == want.shape == (2, 3, 224, 224)
    assert torch.equal(got, want)


@pytest.mark.parametrize("enc,opts,reference", [
    ("resnet50", {}, lambda f: ResNet50_Weights.IMAGENET1K_V2.transforms()(torch.from_numpy(f).permute(0, 3, 1, 2))),
    ("resnet50", {"preprocessing": "imagenet1k_v1"},
     lambda f: ResNet50_Weights.IMAGENET1K_V1.transforms()(torch.from_numpy(f).permute(0, 3, 1, 2))),
    ("vgg19", {"preprocessing": "imagenet_crop"}, vgg19.preprocess_imagenet_crop),
])
def test_device_form_equals_torchvision_float_transform_and_cpu_form_is_one_grey_level_off(enc, opts, reference):
    """On the model's device the resize runs in float, rounded to integers (what torchvision
    does with uint8 images on a GPU, and what its CPU transform does for these weights):
    run on the CPU here, it equals torchvision's transform within float rounding. The CPU
    form (torchvision's uint8 kernels, PIL's arithmetic) is within one grey level of it."""
    frames = _frames(seed=1)
    recipe = _recipe(enc, **opts)
    want = reference(frames)
    device_form = fr.preprocess(recipe, frames, on_device=True)
    cpu_form = fr.preprocess(recipe, frames)
    assert float((device_form - want).abs().max()) < 1e-5
    one_level = 1.0 / 255 / min(fr.IMAGENET_STD)
    assert float((cpu_form - want).abs().max()) <= 1.01 * one_level
    u8_cpu, u8_dev = fr.resize_frames(recipe, frames), fr.resize_frames(recipe, frames, on_device=True)
    assert u8_cpu.dtype == u8_dev.dtype == torch.uint8 and u8_cpu.shape == (2, 224, 224, 3)
    assert int((u8_cpu.int() - u8_dev.int()).abs().max()) == 1


@pytest.mark.parametrize("size", [(37, 53), (224, 224), (360, 640), (500, 300), (448, 448)])
def test_cv2_resize_device_form_is_bit_identical(size):
    """The AVE script's cv2.resize on the model's device: the same integer arithmetic with its
    tensors on the input's device (run on the CPU here) equals the CPU implementation (itself
    tested equal to OpenCV) bit for bit, at any input size."""
    x = torch.from_numpy(np.random.default_rng(size[0]).integers(0, 256, (3, *size, 3), dtype=np.uint8))
    assert torch.equal(fr.resize_frames("cv2_linear224", x, on_device=True), fr.resize_frames("cv2_linear224", x))


def test_device_form_features_within_tolerance_of_the_cpu_form():
    """ResNet-50 (random weights, folded BatchNorms) on both forms of the same frames."""
    frames = _frames(seed=2)
    recipe = _recipe("resnet50")
    model = get_encoder("resnet50").load("random").model.fused_for_inference()
    with torch.inference_mode():
        a = model(fr.preprocess(recipe, frames))
        b = model(fr.preprocess(recipe, frames, on_device=True))
    assert float((a - b).abs().max()) <= 0.02 * float(a.abs().max())


def test_normalisation_is_channels_last_model_input():
    x = fr.normalize_frames("imagenet", fr.resize_frames("bilinear224", _frames()))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    bgr = fr.normalize_frames("caffe_bgr", torch.full((1, 2, 2, 3), 100, dtype=torch.uint8))
    np.testing.assert_allclose(bgr[0, :, 0, 0], 100 - np.array(fr.CAFFE_BGR_MEAN), rtol=1e-6)


# ----------------------------------------------------------------- one pass for several recipes
@pytest.fixture
def clip(tmp_path):
    return write_mp4(tmp_path / "c.mp4", mc.index_frames(30, 48, 64), 12, crf=10)  # 2.5 s, 30 frames


def test_one_pass_selects_as_the_single_purpose_readers(clip):
    starts = np.arange(2.0)
    recipes = {"t": _recipe("resnet50"), "i": _recipe("vgg19", preprocessing="ave")}
    sel = fr.decode_recipes(str(clip), recipes, starts, 1.0, 2.0)
    # by time: the frames read_frames picks, resized as the recipe says
    by_time = media.read_frames(clip, fr.frame_times(starts, 1.0, 4))
    np.testing.assert_array_equal(sel["t"].frames[sel["t"].take], fr.resize_frames(recipes["t"], by_time).numpy())
    # by index (the AVE script over the 30 decoded frames)
    idx = script_frame_indices(30, starts, 1.0, 4, 2.0)
    by_index = media.read_frames_by_index(clip, idx)
    np.testing.assert_array_equal(sel["i"].frames[sel["i"].take], fr.resize_frames(recipes["i"], by_index).numpy())
    assert sel["i"].positions.tolist() == sorted(set(idx.tolist()))  # each chosen frame kept once
    # resize left to the device: the decoded size
    raw = fr.decode_recipes(str(clip), recipes, starts, 1.0, 2.0, resize=False)
    assert raw["t"].frames.shape[1:] == raw["i"].frames.shape[1:] == (48, 64, 3)


def test_overlapping_windows_keep_each_frame_once(clip):
    starts = fr.step_starts(2.0, 0.96, 0.32)
    sel = fr.decode_recipes(str(clip), {"t": _recipe("resnet50")}, starts, 0.96, 2.0)["t"]
    assert len(sel.take) == len(starts) * 4 and len(sel.frames) < len(sel.take)
    assert [mc.frame_index(f) for f in media.read_frames(clip, fr.frame_times(starts, 0.96, 4))] == \
        [int(p) for p in sel.positions[sel.take]]


def test_bad_video_raises_media_error(tmp_path):
    with pytest.raises(media.MediaError, match="file missing"):
        fr.decode_recipes(str(tmp_path / "none.mp4"), {"t": _recipe("resnet50")}, np.arange(2.0), 1.0, 2.0)


# ----------------------------------------------------------------- the frames store and extraction from it
def _shard(tmp_path, seconds=(2, 3)):
    """Videos + a decoded shard with a missing video, written by the real decode stage."""
    from avepipe.decode import decode_shard

    paths = [write_mp4(tmp_path / f"v{i}.mp4", _frames(int(s * 8), 72, 96, seed=i), 8, mc.sine(440, s, 16000), 16000,
                       crf=20) for i, s in enumerate(seconds)]
    index = pd.DataFrame({"video_id": [p.stem for p in paths] + ["gone"],
                          "path": [str(p) for p in paths] + [str(tmp_path / "gone.mp4")],
                          "duration": [float(s) for s in seconds] + [2.0], "exists": [True] * len(paths) + [False]})
    decode_shard(index, tmp_path / "dec.zarr", n_segments=None, audio_rates=[16000], sample_frames_per_segment=0,
                 progress=False)
    return index


def test_store_round_trip_and_failures(tmp_path):
    index = _shard(tmp_path)
    recipes = fr.recipes_for({"vgg19": {"frames_per_segment": 2, "preprocessing": "ave"},
                              "resnet50": {"frames_per_segment": 2}})
    out = fr.write_frames_shard(tmp_path / "dec.zarr", index, list(recipes.values()), tmp_path / "f.zarr",
                                workers=1, progress=False)
    reader = fr.FramesReader(out)
    for r in recipes.values():
        frames, take = reader.get(r.key, "v1")
        sel = fr.decode_recipes(str(tmp_path / "v1.mp4"), {"x": r}, np.arange(3.0), 1.0, 3.0)["x"]
        np.testing.assert_array_equal(frames, sel.frames)
        np.testing.assert_array_equal(take, sel.take)
        assert reader.get(r.key, "gone") == "not decoded"  # the decode stage failed it
    assert reader.get("time9-bilinear224", "v1") is None  # a recipe the store lacks: decode yourself
    fr.empty_frames_store(out)
    assert sorted(p.name for p in out.iterdir()) == ["EMPTIED"]
    assert fr.FramesReader(out).get(recipes["resnet50"].key, "v1") is None


@pytest.mark.parametrize("enc,opts", [("resnet50", {}), ("vgg19", {"preprocessing": "ave"})])
def test_extraction_from_the_store_equals_decoding_in_the_job(tmp_path, enc, opts):
    index = _shard(tmp_path)
    recipes = fr.recipes_for({"vgg19": {"frames_per_segment": 2, "preprocessing": "ave"},
                              "resnet50": {"frames_per_segment": 2}})
    store = fr.write_frames_shard(tmp_path / "dec.zarr", index, list(recipes.values()), tmp_path / "f.zarr",
                                  workers=0, progress=False)
    kw = dict(frames_per_segment=2, batch_size=3, progress=False, dtype="float32", **opts)
    a = extract_shard(tmp_path / "dec.zarr", index, enc, "random", tmp_path / "a.zarr", frames=store,
                      stats=tmp_path / "a.json", **kw)
    b = extract_shard(tmp_path / "dec.zarr", index, enc, "random", tmp_path / "b.zarr", num_workers=0, **kw)
    fa, fb = open_features(a), open_features(b)
    assert list(fa.status) == list(fb.status) == ["failed", "ok", "ok"]  # sorted ids: gone, v0, v1
    np.testing.assert_array_equal(fa.features.compute(), fb.features.compute())
    stats = json.loads((tmp_path / "a.json").read_text())
    assert stats["frames_from"] == {"store": 2, "decoded": 0} and stats["videos"] == 2
    assert stats["frames"] == 2 * (2 + 3) and 0 <= stats["data_wait_share"] <= 1
    prov = fa.attrs["provenance"]
    assert prov["frame_recipe"]["key"] == recipes[enc].key and prov["resize_on"] == "cpu"
    assert prov["inference_fusions"] == ([] if enc == "vgg19" else [
        "batchnorm folded into the preceding convolution (53 pairs)"])


def test_unav_windows_run_each_frame_once_and_equal_the_per_frame_mean(tmp_path):
    """0.96-s windows at 0.32-s hop, 6 frames each: window k+1's times are window k's
    shifted by two frames, so most frames serve several windows; each goes through the
    model once, and every window is still the mean of its 6 frames' outputs."""
    index = _shard(tmp_path, seconds=(3,))
    out = extract_shard(tmp_path / "dec.zarr", index, "resnet50", "random", tmp_path / "u.zarr", window=0.96,
                        hop=0.32, frames_per_segment=6, batch_size=8, num_workers=0, progress=False, dtype="float32",
                        stats=tmp_path / "u.json", pooled=True)
    fs = open_features(out)
    starts = fr.step_starts(3.0, 0.96, 0.32)
    stats = json.loads((tmp_path / "u.json").read_text())
    assert stats["frames"] == 6 * len(starts) and stats["model_frames"] <= stats["frames"] // 2
    frames = media.read_frames(tmp_path / "v0.mp4", fr.frame_times(starts, 0.96, 6))
    model = get_encoder("resnet50").load("random", pooled=True).model.fused_for_inference()
    with torch.inference_mode():
        want = model(fr.preprocess(_recipe("resnet50"), frames)).reshape(len(starts), 6, -1).mean(1)
    got = fs.features[1, : len(starts)].compute()  # row 1: v0 (row 0: the missing video)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# ----------------------------------------------------------------- data path sizing
def test_data_path_sized_from_the_device_and_cores():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    d = data_path(cpu, cores=16)
    assert (d.workers, d.resize_on, d.pin_memory) == (1, "cpu", False)
    d = data_path(cuda, recipe=_recipe("resnet50"), cores=16)
    assert (d.workers, d.decoder_threads, d.resize_on, d.pin_memory) == (15, 1, "device", True)
    assert d.prefetch >= 2
    assert data_path(cuda, recipe=_recipe("vgg19", preprocessing="ave"), cores=16).resize_on == "device"
    assert data_path(cuda, resize_on="cpu", recipe=_recipe("resnet50"), cores=16).resize_on == "cpu"
    assert data_path(cuda, workers=3, resize_on="cpu", recipe=_recipe("resnet50"), cores=16).workers == 3
    with pytest.raises(ValueError, match="resize_on"):
        data_path(cpu, resize_on="gpu")


def test_resize_on_the_device_path_run_on_the_cpu(tmp_path):
    """resize_on='device' (what CUDA runs use): workers send frames at the decoded size and
    the model's device resizes them in float; frames from the store are already resized and
    are used as they are. Run on the CPU here: store frames give the CPU path's features
    exactly, decoded ones within the one-grey-level tolerance of the two resize forms."""
    index = _shard(tmp_path)
    recipe = fr.recipes_for({"resnet50": {"frames_per_segment": 2}})["resnet50"]
    store = fr.write_frames_shard(tmp_path / "dec.zarr", index, [recipe], tmp_path / "f.zarr", workers=0,
                                  progress=False)
    kw = dict(frames_per_segment=2, batch_size=4, progress=False, dtype="float32", num_workers=0, pooled=True)
    cpu = open_features(extract_shard(tmp_path / "dec.zarr", index, "resnet50", "random", tmp_path / "c.zarr",
                                      resize_on="cpu", **kw)).features.compute()
    dev_store = open_features(extract_shard(tmp_path / "dec.zarr", index, "resnet50", "random", tmp_path / "s.zarr",
                                            resize_on="device", frames=store, **kw))
    dev_decoded = open_features(extract_shard(tmp_path / "dec.zarr", index, "resnet50", "random",
                                              tmp_path / "d.zarr", resize_on="device", **kw))
    assert dev_decoded.attrs["provenance"]["resize_on"] == "device"
    np.testing.assert_array_equal(dev_store.features.compute(), cpu)
    got = dev_decoded.features.compute()
    assert not np.array_equal(got, cpu)  # the other resize form: not bit-equal ...
    assert np.abs(got - cpu).max() <= 0.02 * np.abs(cpu).max()  # ... but within its tolerance
