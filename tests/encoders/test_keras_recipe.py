"""VGG-19 `preprocessing: ave` is the AVE script's Keras recipe: its frame indices (against a
transcription of the script's formula), OpenCV's resize (against cv2), Keras' caffe
preprocessing and VGG19 `block5_pool` (against Keras 3 itself, torch backend), Keras' legacy
HDF5 weight layouts (files written by Keras and by hand in the official file's naming), and
the whole extraction of a synthetic video. Tests that need keras or cv2 skip without them."""

from __future__ import annotations

import os
from pathlib import Path

import av
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr

import media_cases as mc  # tests/ (the rootdir of tests/encoders) is on sys.path
from keras_files import assert_state_is, random_weights, write_official_style

from avepipe.datasets.writer import write_mp4
from avepipe.encoders import get_encoder
from avepipe.encoders.keras_h5 import is_hdf5
from avepipe.encoders.opencv_resize import resize_linear_u8
from avepipe.frames import decode_recipes, script_frame_indices
from avepipe.encoders.weights import WeightsError

torch.set_num_threads(1)
# keras' torch backend converts tensors with np.array(x) (numpy 2 deprecation notice)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def video_frame_sample(frame_interval, video_length, sample_num):
    """The AVE script's frame list, transcribed as it is written there."""
    num = []
    for l in range(video_length):  # noqa: E741
        for i in range(sample_num):
            num.append(int(l * frame_interval + (i * 1.0 / sample_num) * frame_interval))
    return num


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on the {keras.backend.backend()} backend here, not torch")
    return keras


def _images(seed=0, sizes=((360, 640), (170, 250), (100, 100), (480, 854), (225, 223), (50, 30), (7, 9),
                            (448, 448), (224, 224), (256, 341), (1080, 1920))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# --------------------------------------------------------------------------- frame indices
@pytest.mark.parametrize("n", [0, 5, 9, 10, 16, 159, 160, 161, 250, 299, 300, 301, 333, 480, 1234])
@pytest.mark.parametrize("per_step", [1, 8, 16, 25])
def test_frame_indices_equal_the_script_formula(n, per_step):
    t = 10
    if n == 0:
        with pytest.raises(ValueError, match="no frames"):
            script_frame_indices(0, np.arange(t), 1.0, per_step, t)
        return
    ours = script_frame_indices(n, np.arange(t, dtype=np.float64), 1.0, per_step, t)
    assert ours.tolist() == video_frame_sample(int(n / t), t, per_step)
    assert ours.max() < n  # never past the decoded frames


def test_frame_indices_on_a_video_with_known_frame_count(tmp_path):
    """37 frames whose colour encodes their index, 3 segments: fi = int(37 / 3) = 12; the ave
    recipe decodes exactly the frames of the script's formula (one pass, as extraction)."""
    path = write_mp4(tmp_path / "v.mp4", mc.index_frames(37), 12, crf=10)
    from avepipe import media

    assert media.count_frames(path) == 37
    opts = get_encoder("vgg19").check_options({"preprocessing": "ave"})

    def picked(p, per_step):  # the stage's path: the recipe's frames at the decoded size
        sel = decode_recipes(str(p), {"k": opts.frame_recipe(per_step)}, np.arange(3.0), 1.0, 3.0,
                             resize=False)["k"]
        return [mc.frame_index(f) for f in sel.frames[sel.take]]

    assert picked(path, 16) == video_frame_sample(12, 3, 16)
    # a short file: fewer frames than segments gives fi = 0, every step the first frame
    short = write_mp4(tmp_path / "s.mp4", mc.index_frames(2), 12, crf=10)
    assert picked(short, 4) == [0] * 12
    # the torchvision recipes pick frames by presentation time
    assert get_encoder("vgg19").check_options({"preprocessing": "torchvision"}).frame_recipe(16).select == "time"


# --------------------------------------------------------------------------- resize
def test_resize_equals_cv2_on_random_images():
    cv2 = pytest.importorskip("cv2")
    for img in _images():
        ref = cv2.resize(img, (224, 224))
        ours = resize_linear_u8(torch.from_numpy(img)[None], (224, 224))[0].numpy()
        assert np.array_equal(ours, ref), (img.shape, int(np.abs(ours.astype(int) - ref).max()))
    # other output sizes and a batch processed in chunks
    batch = np.stack([np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)] * 5)
    ours = resize_linear_u8(torch.from_numpy(batch), (70, 150), chunk=2).numpy()
    for img, o in zip(batch, ours):
        assert np.array_equal(o, cv2.resize(img, (150, 70)))


def test_resize_is_bilinear_without_antialias():
    """Without cv2: within one uint8 step of a float bilinear (half-pixel centres, no
    antialias), and the identity at the same size."""
    for img in _images(seed=2)[:6]:
        x = torch.from_numpy(img)[None]
        ref = F.interpolate(x.permute(0, 3, 1, 2).double(), size=(224, 224), mode="bilinear",
                            align_corners=False, antialias=False).permute(0, 2, 3, 1)
        diff = (resize_linear_u8(x, (224, 224)).double() - ref).abs()
        assert float(diff.max()) <= 1.0, img.shape
    same = torch.from_numpy(_images(seed=3, sizes=((224, 224),))[0])[None]
    assert torch.equal(resize_linear_u8(same, (224, 224)), same)
    with pytest.raises(ValueError, match="uint8"):
        resize_linear_u8(same.float(), (224, 224))


def test_preprocess_ave_is_bgr_minus_caffe_means():
    img = _images(seed=4, sizes=((224, 224),))[0]
    x = get_encoder("vgg19").load("random").preprocess(torch.from_numpy(img)[None])
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    for c, mean in zip(range(3), (103.939, 116.779, 123.68)):  # B, G, R
        assert torch.equal(x[0, c], torch.from_numpy(img[..., 2 - c]).float() - np.float32(mean))


def test_preprocess_ave_equals_cv2_and_keras_preprocess_input():
    cv2 = pytest.importorskip("cv2")
    keras = _keras()
    from keras.applications.vgg19 import preprocess_input

    frames = np.stack([cv2.resize(i, (300, 200)) for i in _images(seed=5)[:4]])  # one size, a batch
    ref = preprocess_input(np.stack([keras.utils.img_to_array(cv2.resize(f, (224, 224))) for f in frames]))
    ours = get_encoder("vgg19").load("random").preprocess(torch.from_numpy(frames))
    assert np.array_equal(ours.permute(0, 2, 3, 1).numpy(), ref)  # bit for bit


# --------------------------------------------------------------------------- weight files
@pytest.fixture(scope="module")
def keras_model():
    """Keras' VGG19 (include_top=False) with random weights."""
    keras = _keras()
    model = keras.applications.VGG19(include_top=False, weights=None, input_shape=(224, 224, 3))
    weights = random_weights(seed=1)
    for name, k, b in weights:
        model.get_layer(name).set_weights([k, b])
    return model, weights


def test_weight_files_are_read_as_keras_reads_them(keras_model, tmp_path):
    """Keras 3's legacy h5 writer (`block1_conv1/kernel`, nested), a whole model saved as
    .h5 (`model_weights` group), and the official naming (`block1_conv1_W_1:0`, with and
    without the top layers, layer list split) all load to the same torch state dict; Keras
    itself loads the hand-written official-style file to the same weights."""
    keras = _keras()
    from keras.src.legacy.saving import legacy_h5_format

    model, weights = keras_model
    files = {"keras3.h5": tmp_path / "keras3.h5", "model.h5": tmp_path / "model.h5"}
    with h5py.File(files["keras3.h5"], "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)  # what save_weights("x.h5") wrote
    model.save(files["model.h5"])
    with h5py.File(files["keras3.h5"]) as f:
        assert list(f["block1_conv1"].attrs["weight_names"]) == ["block1_conv1/kernel", "block1_conv1/bias"]
    files["official_notop"] = write_official_style(tmp_path / "notop.h5", weights)
    files["official_top"] = write_official_style(tmp_path / "top.weights", weights, top=True, split_names=True)
    for label, path in files.items():
        assert is_hdf5(path)
        enc = get_encoder("vgg19").load(str(path))
        assert_state_is(enc.model, weights)
        assert enc.weights_info["id"] == f"file:{path.name}" and enc.weights_info["layout"].startswith("keras-h5")
    fresh = keras.applications.VGG19(include_top=False, weights=None, input_shape=(224, 224, 3))
    fresh.load_weights(str(files["official_notop"]))
    for name, k, b in weights:
        got_k, got_b = fresh.get_layer(name).get_weights()
        assert np.array_equal(got_k, k) and np.array_equal(got_b, b)


def test_bad_keras_files_are_refused_with_the_reason(tmp_path):
    weights = random_weights()
    path = write_official_style(tmp_path / "few.h5", weights[:12])
    with pytest.raises(WeightsError, match=r"16 convolution layers, the file has 12 layers with weights"):
        get_encoder("vgg19").load(str(path))
    swapped = [(n, k, b) for n, k, b in weights]
    swapped[3] = (swapped[3][0], swapped[3][1].transpose(3, 2, 0, 1).copy(), swapped[3][2])  # torch order
    with pytest.raises(WeightsError, match=r"layer #3 'block2_conv2'.*expected VGG19's \[\(3, 3, 128, 128\)"):
        get_encoder("vgg19").load(str(write_official_style(tmp_path / "order.h5", swapped)))
    theano = write_official_style(tmp_path / "th.h5", weights)
    with h5py.File(theano, "a") as f:
        f.attrs["backend"] = b"theano"
    with pytest.raises(WeightsError, match="Theano backend"):
        get_encoder("vgg19").load(str(theano))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(WeightsError, match="not a Keras weights file"):
        get_encoder("vgg19").load(str(tmp_path / "other.h5"))


def test_keras_file_with_torchvision_recipe_warns(tmp_path, caplog):
    path = write_official_style(tmp_path / "w.h5", random_weights())
    get_encoder("vgg19").load(str(path), preprocessing="torchvision")
    assert "Keras weights file" in caplog.text


# --------------------------------------------------------------------------- against Keras
def test_block5_pool_equals_keras(keras_model, tmp_path):
    """The same frames through Keras (cv2.resize, preprocess_input, VGG19 -> block5_pool) and
    through avepipe (its resize, caffe preprocessing, converted weights)."""
    cv2 = pytest.importorskip("cv2")
    keras = _keras()
    from keras.applications.vgg19 import preprocess_input

    model, weights = keras_model
    path = write_official_style(tmp_path / "w.h5", weights)
    frames = np.stack([cv2.resize(i, (320, 180)) for i in _images(seed=6)[:2]])
    x = preprocess_input(np.stack([keras.utils.img_to_array(cv2.resize(f, (224, 224))) for f in frames]))
    ref = model.predict(x, verbose=0)
    enc = get_encoder("vgg19").load(str(path))
    with torch.no_grad():
        ours = enc.model(enc.preprocess(torch.from_numpy(frames))).numpy()
    assert ours.shape == ref.shape == (2, 7, 7, 512)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours - ref).max())
    print(f"block5_pool: max |avepipe - keras| = {diff:.3g}, max |keras| = {scale:.3g}")
    assert scale > 1.0 and diff <= 1e-4 * scale


# --------------------------------------------------------------------------- the whole recipe
def _decoded_shard(path: Path, vid: str, n_segments: int) -> None:
    """A decoded shard per docs/contracts.md, written by hand (visual extraction reads only
    its ids, status and n_segments)."""
    g = zarr.open_group(str(path), mode="w")
    for name, vals in (("video_id", [vid]), ("status", ["ok"]), ("reason", [""]), ("warnings", [""])):
        g.create_array(name, shape=(1,), dtype=str)[:] = np.array(vals, dtype=object)
    g.create_array("n_segments", data=np.array([n_segments], np.int32))
    g.attrs["provenance"] = {"code_fingerprint": "x"}


@pytest.mark.slow
def test_extraction_equals_the_script_recipe_with_keras(keras_model, tmp_path):
    """A synthetic video (2 s, 10 fps, 250x170) decoded once with PyAV; the script's recipe
    with Keras (n = frames decoded, fi = int(n/2), indices int(l*fi + i/16*fi), cv2.resize,
    img_to_array, preprocess_input, block5_pool, mean of the 16 maps) against avepipe's
    extraction stage (`preprocessing: ave`, the same weights as a Keras .h5 file)."""
    cv2 = pytest.importorskip("cv2")
    keras = _keras()
    from keras.applications.vgg19 import preprocess_input

    from avepipe.extract import extract_shard
    from avepipe.store import open_features

    model, weights = keras_model
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:170, 0:250]
    frames = np.stack([np.clip(np.stack([128 + 90 * np.sin(xx / (9 + c) + t / 3) * np.cos(yy / 13 - c)
                                         for c in range(3)], -1) + rng.normal(0, 12, (170, 250, 3)), 0, 255)
                       for t in range(20)]).astype(np.uint8)
    video = write_mp4(tmp_path / "vid.mp4", frames, 10, crf=12)
    wpath = write_official_style(tmp_path / "vgg19_keras.h5", weights)

    # the script, on frames decoded once
    with av.open(str(video)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    n, t, sample_num = len(decoded), 2, 16
    assert n == 20
    num = video_frame_sample(int(n / t), t, sample_num)
    unique = sorted(set(num))
    x = preprocess_input(np.stack([keras.utils.img_to_array(cv2.resize(decoded[k], (224, 224))) for k in unique]))
    pool = dict(zip(unique, model.predict(x, batch_size=4, verbose=0)))
    feature = np.zeros((t, sample_num, 7, 7, 512))  # float64, as the script's np.zeros
    for j, k in enumerate(num):
        feature[j // sample_num, j % sample_num] = np.float32(pool[k])
    ref = np.float32(np.mean(feature, axis=1))

    _decoded_shard(tmp_path / "dec.zarr", "vid", t)
    index = pd.DataFrame({"video_id": ["vid"], "path": [str(video)]})
    out = extract_shard(tmp_path / "dec.zarr", index, "vgg19", str(wpath), tmp_path / "f.zarr",
                        frames_per_segment=sample_num, batch_size=8, num_workers=0, dtype="float32",
                        progress=False, preprocessing="ave")
    got = open_features(out).features[0].compute()
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    print(f"extraction vs the Keras script: max diff {diff:.3g}, max |ref| {scale:.3g}")
    assert got.shape == ref.shape == (2, 7, 7, 512)
    assert scale > 1.0 and diff <= 1e-4 * scale
