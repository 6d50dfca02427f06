"""VGG-19 pool5 encoder vs an independent torchvision forward on the same frames; the three
recipes' names, weights pairing and frame hooks. (The Keras recipe against Keras and OpenCV
themselves: test_keras_recipe.py.)"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from avepipe.encoders import EncoderOptionError, get_encoder
from avepipe.encoders.weights import WeightsError

torch.set_num_threads(1)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
LSB = 1.0 / 255 / 0.224  # one uint8 step after normalisation (worst channel)


def _frames(n=2, h=300, w=400, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    frames = base[None] + rng.normal(0, 20, (n, h, w, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


def _ref_resize(x: torch.Tensor, size) -> torch.Tensor:
    """uint8-valued float NCHW -> resized, rounded back to uint8 values (as image libraries do)."""
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).round().clamp(0, 255)


def ref_preprocess_torchvision(frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    return (_ref_resize(x, (224, 224)) / 255 - MEAN) / STD


def ref_preprocess_imagenet_crop(frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    nh, nw = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    x = _ref_resize(x, (nh, nw))
    top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
    return (x[..., top:top + 224, left:left + 224] / 255 - MEAN) / STD


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torchvision vgg19().features with seeded random weights, saved in the official layout."""
    with torch.device("meta"):
        tv = torchvision.models.vgg19()  # meta: skip the 120M-parameter classifier init
    feats = tv.features.to_empty(device="cpu")
    g = torch.Generator().manual_seed(5)
    for m in feats.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    feats.eval()
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    path = tmp_path_factory.mktemp("vgg19") / "vgg19-random.pth"
    torch.save(sd, path)
    return feats, path, sd


@pytest.fixture(scope="module")
def encoder(reference):
    return get_encoder("vgg19").load(weights=str(reference[1]), preprocessing="torchvision")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_preprocess_torchvision_matches_independent_resize():
    frames = _frames()
    ours = get_encoder("vgg19").load(weights="random", preprocessing="torchvision").preprocess(torch.from_numpy(frames))
    ref = ref_preprocess_torchvision(frames)
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    diff = (ours - ref).abs()
    assert float(diff.max()) <= 1.01 * LSB  # at most one uint8 rounding step
    assert float(diff.mean()) < 0.25 * LSB  # uint8 fixed-point resize: some pixels round the other way


def test_preprocess_imagenet_crop_option_matches_resize256_crop224():
    frames = _frames(1, 240, 320)
    enc = get_encoder("vgg19").load(weights="random", preprocessing="imagenet_crop")
    ours = enc.preprocess(frames)  # numpy input accepted too
    ref = ref_preprocess_imagenet_crop(frames)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert float((ours - ref).abs().max()) <= 1.01 * LSB
    assert enc.options["preprocessing"] == "imagenet_crop"


def test_pool5_equals_torchvision_features(reference, encoder):
    feats, path, _ = reference
    x = ref_preprocess_torchvision(_frames(1))
    with torch.no_grad():
        ours = encoder.model(x)
        ref = feats(x)  # plain NCHW torchvision forward
    assert ours.shape == (1, 7, 7, 512) == (1, *get_encoder("vgg19").feature_shape)
    assert _close(ours, ref.permute(0, 2, 3, 1), 1e-4)


def test_end_to_end_with_own_preprocessing(reference, encoder):
    feats, _, _ = reference
    # 224x224 frames (as decode stores them): the resize is the identity, so the whole
    # path must agree tightly (other sizes differ by 1-LSB rounding, tested above)
    frames = _frames(1, 224, 224, seed=1)
    with torch.no_grad():
        ours = encoder.model(encoder.preprocess(torch.from_numpy(frames)))
        ref = feats(ref_preprocess_torchvision(frames)).permute(0, 2, 3, 1)
    assert _close(ours, ref, 1e-4)


def test_weights_info_and_eval_state(reference, encoder):
    import hashlib
    path = reference[1]
    assert encoder.weights_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert encoder.weights_info["id"] == f"file:{path.name}"
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    # state dict of the loaded model is the official (features.*) layout
    assert set(encoder.model.state_dict()) == set(reference[2])


def test_pooled_is_spatial_mean(reference, encoder):
    pooled = get_encoder("vgg19").load(weights=str(reference[1]), pooled=True, preprocessing="torchvision")
    x = ref_preprocess_torchvision(_frames(1))
    with torch.no_grad():
        assert torch.allclose(pooled.model(x), encoder.model(x).mean(dim=(1, 2)), atol=1e-5)


def test_classifier_keys_are_optional_but_checked(reference, tmp_path):
    sd = dict(reference[2])
    sd["classifier.6.bias"] = torch.zeros(1000)  # part of the official layout: accepted
    torch.save(sd, tmp_path / "ok.pth")
    get_encoder("vgg19").load(weights=str(tmp_path / "ok.pth"))
    sd["classifier.6.bias"] = torch.zeros(10)
    sd["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    sd["head.weight"] = torch.zeros(3)
    del sd["features.34.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        get_encoder("vgg19").load(weights=str(tmp_path / "bad.pth"))
    lines = str(err.value).splitlines()
    assert "  missing: features.34.bias" in lines
    assert "  unexpected: head.weight" in lines
    assert "  shape: features.0.weight file [64, 1, 3, 3] expected [64, 3, 3, 3]" in lines
    assert "  shape: classifier.6.bias file [10] expected [1000]" in lines


def test_bad_frames_rejected():
    enc = get_encoder("vgg19").load(weights="random")
    with pytest.raises(ValueError, match="uint8 frames"):
        enc.preprocess(torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match="preprocessing"):
        get_encoder("vgg19").load(weights="random", preprocessing="caffe")
    with pytest.raises(ValueError, match="uint8 frames"):
        enc.preprocess(np.zeros((1, 224, 224, 4), np.uint8))


# --------------------------------------------------------------------------- recipes and weights
def test_recipe_names_and_defaults():
    """`ave` (default) is the AVE script's Keras recipe with Keras' weights; `torchvision` is
    the former `ave` (torchvision weights, no crop); `imagenet_crop` the former `torchvision`."""
    spec = get_encoder("vgg19")
    assert spec.check_options({}).preprocessing == "ave" and spec.default_weights == "keras"
    fields = {f.name: f for f in dataclasses.fields(spec.options)}
    assert fields["preprocessing"].metadata["choices"] == ("ave", "torchvision", "imagenet_crop")
    for name, colour in (("ave", "BGR"), ("torchvision", "RGB"), ("imagenet_crop", "RGB")):
        enc = spec.load("random", preprocessing=name)
        assert enc.options["preprocessing"] == name and enc.options["colour"] == colour
    assert "decode index" in spec.load("random").options["frames"]


@pytest.mark.parametrize("weights,preprocessing", [("imagenet", "ave"), ("IMAGENET1K_V1", "ave"),
                                                   ("keras", "torchvision"), ("keras_top", "imagenet_crop")])
def test_official_weights_must_fit_the_recipe(weights, preprocessing, tmp_path, monkeypatch):
    """Refused before any file is looked for (an empty cache, offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("AVEPIPE_OFFLINE", "1")
    with pytest.raises(EncoderOptionError, match=r"encoders\.vgg19: .*" + preprocessing):
        get_encoder("vgg19").load(weights, preprocessing=preprocessing)


def test_keras_official_files_are_pinned_by_keras_md5(tmp_path, monkeypatch):
    spec = get_encoder("vgg19")
    notop, top = spec.official["keras"], spec.official["keras_top"]
    assert notop.filename == "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert notop.md5 == "253f8cb515780f3b799900260a226db6" and top.md5 == "cbe5617147190e668d6c5d5026f83318"
    assert notop.url == ("https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
                         "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert top.url.endswith("/vgg19_weights_tf_dim_ordering_tf_kernels.h5") and "keras" in notop.pinned_by
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("AVEPIPE_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"vgg19_weights_tf_dim_ordering_tf_kernels_notop\.h5.*\n.*"
                                           r"storage\.googleapis\.com"):
        get_encoder("vgg19").load()  # the default: Keras' file, never random


def test_keras_file_under_the_official_name_is_verified_on_every_load(tmp_path, monkeypatch):
    from keras_files import random_weights, write_official_style

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("AVEPIPE_OFFLINE", "1")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    weights = random_weights(seed=3)
    path = write_official_style(cache / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", weights)
    with pytest.raises(WeightsError, match=r"md5 expected 253f8cb515780f3b799900260a226db6, found [0-9a-f]{32}"):
        get_encoder("vgg19").load("keras")
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    spec = get_encoder("vgg19")
    monkeypatch.setitem(spec.official, "keras", dataclasses.replace(spec.official["keras"], md5=md5))
    enc = spec.load("keras")
    assert enc.weights_info["id"] == "keras:vgg19_weights_tf_dim_ordering_tf_kernels_notop"
    assert enc.weights_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert enc.weights_info["source"].startswith("https://storage.googleapis.com/")
    sd = enc.model.state_dict()
    assert torch.equal(sd["features.34.weight"], torch.from_numpy(weights[-1][1].transpose(3, 2, 0, 1).copy()))


def test_finetuned_keras_weights_save_in_the_torchvision_layout(tmp_path):
    """A Keras base has no torchvision classifier: a seeded random one completes the file;
    the saved .pth loads back with the `ave` recipe."""
    from keras_files import random_weights, write_official_style

    base = write_official_style(tmp_path / "base.h5", random_weights(seed=4))
    spec = get_encoder("vgg19")
    model = spec.load(str(base)).model
    saved = spec.official_state_dict(model, str(base), seed=0)
    assert set(saved) == set(torchvision.models.vgg19().state_dict())
    torch.save(saved, tmp_path / "ft.pth")
    back = spec.load(str(tmp_path / "ft.pth"), preprocessing="ave").model
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_frames_by_index_only_for_the_ave_recipe():
    spec = get_encoder("vgg19")
    for name in ("torchvision", "imagenet_crop"):
        assert spec.check_options({"preprocessing": name}).frame_recipe(4).select == "time"
    assert spec.check_options({}).frame_recipe(4).select == "script_index"
    from avepipe.frames import decode_recipes
    from avepipe.media import MediaError

    with pytest.raises(MediaError, match="file missing"):
        decode_recipes("/no/such.mp4", {"k": spec.check_options({}).frame_recipe(4)}, np.arange(2.0), 1.0, 2.0)
