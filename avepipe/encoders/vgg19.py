"""VGG-19 pool5 maps, as the AVE features (docs/reference.md §2.1).

pool5 = output of torchvision ``vgg19().features`` (B,512,7,7) -- not ``features[:-1]``
(conv5_4, 14x14) -- returned channels-last (B,7,7,512), the layout of the AVE h5; it is
Keras' ``block5_pool`` too. Only ``features`` is built; the classifier is never used.

Three recipes (``encoders.vgg19.preprocessing``):

- ``ave`` (default): Tian et al.'s script, which produced the released
  ``visual_feature.h5``. Weights ``keras`` (Keras' official VGG19 ImageNet file, the Caffe
  model converted; read from its HDF5 file and converted to the torch layout on load, no
  Keras or TensorFlow involved). Frames picked by decode index: with n = the number of
  frames the decoder returns and ``fi = int(n / D)`` (D = the video's length in segments:
  10 for AVE), segment l frame i of F is ``int(l*fi + i/F*fi)`` (F = ``frames_per_segment``,
  16 in the script). Each frame is resized to 224x224 exactly as ``cv2.resize`` does (no
  antialias, aspect not kept; see :mod:`avepipe.encoders.opencv_resize`), then Keras'
  ``preprocess_input`` in caffe mode: RGB -> BGR, minus the BGR means 103.939 / 116.779 /
  123.68, no scaling. The F maps of a segment are averaged by the extraction stage.
  Short videos behave as in the script: the index grid is spread over the frames that
  exist (a 5-s file gives each "second" half a second of frames; fewer than D frames gives
  ``fi = 0``: every step uses the first frame). UnAV-style windows (start s, length w)
  generalise the formula to ``int(s*fi + i/F*w*fi)`` with ``fi = int(n / duration)``.
- ``torchvision``: torchvision's VGG-19 weights (``imagenet``); frames by presentation
  time at the centres of F equal parts of each step; antialiased bilinear resize to
  224x224 (no crop), RGB, ImageNet mean/std. (Called ``ave`` before the Keras recipe
  existed.) A different feature space from the released features.
- ``imagenet_crop``: torchvision's own transform for those weights (resize 256, centre
  crop 224, mean/std), frames as ``torchvision``. (Called ``torchvision`` before.)

Weights and recipe must agree: the Keras weights expect BGR caffe input, torchvision's
expect RGB mean/std. ``ave`` with ``imagenet`` and ``torchvision`` / ``imagenet_crop`` with
``keras`` / ``keras_top`` are errors; a Keras-layout file given as a path with a torchvision
recipe is loaded with a warning; other paths and ``random`` go with any recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19
from torchvision.models.vgg import cfgs, make_layers
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from avepipe.encoders import EncoderOptionError, EncoderSpec, LoadedEncoder
from avepipe.encoders import keras_h5
from avepipe.encoders.opencv_resize import resize_linear_u8
from avepipe.encoders.weights import (HUB_NAMING, OfficialWeights, WeightsError, build_with_weights,
                                      check_state_dict, file_sha256, inference_ready, layout_of,
                                      official_file, state_over_base)
from avepipe.options import option

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # Keras imagenet_utils, caffe mode
PREPROCESSING = ("ave", "torchvision", "imagenet_crop")
KERAS_NAMES = ("keras", "keras_top")
TORCHVISION_NAMES = ("imagenet", "imagenet1k_v1")


@dataclass
class VGG19Options:
    """`encoders.vgg19`: VGG-19 pool5 options."""

    preprocessing: str = option(
        "ave", choices=PREPROCESSING,
        help="ave: the released AVE features' recipe (Keras weights `keras`, frames by decode index, cv2 "
             "resize 224x224, BGR minus the Caffe means); torchvision: torchvision weights `imagenet`, frames "
             "by time, antialiased resize 224x224, RGB mean/std; imagenet_crop: as torchvision but resize "
             "256 and centre crop 224")
    pooled: bool = option(False, help="store the spatial mean (512,) instead of the 7x7 map")

    def frame_recipe(self, per_step: int):
        """How this recipe picks, resizes and normalises frames (shared decoding, avepipe.frames)."""
        from avepipe.frames import FrameRecipe

        return {"ave": FrameRecipe("script_index", per_step, "cv2_linear224", "caffe_bgr"),
                "torchvision": FrameRecipe("time", per_step, "bilinear224", "imagenet"),
                "imagenet_crop": FrameRecipe("time", per_step, "resize256_crop224", "imagenet"),
                }[self.preprocessing]


class VGG19Pool5(nn.Module):
    """(N,3,224,224) -> pool5 (N,7,7,512) channels-last, or (N,512) when ``pooled``."""

    def __init__(self, pooled: bool = False):
        super().__init__()
        self.features = make_layers(cfgs["E"])  # key layout features.* as torchvision
        self.pooled = pooled
        self.memory_format = torch.channels_last  # load(channels_last=False) sets contiguous_format
        # torchvision's VGG init rule for convs (explicit: we skip VGG.__init__)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.contiguous(memory_format=self.memory_format))
        # a channels_last (N,C,7,7) permuted to (N,7,7,C) is already contiguous
        return x.mean(dim=(2, 3)) if self.pooled else x.permute(0, 2, 3, 1)


def frames_to_nchw(frames: Any) -> torch.Tensor:
    """uint8 (N,H,W,3) array/tensor -> uint8 (N,3,H,W) view (no copy)."""
    x = _frames_nhwc(frames)
    return x.permute(0, 3, 1, 2)


def _frames_nhwc(frames: Any) -> torch.Tensor:
    x = torch.as_tensor(frames) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        got = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"expected uint8 frames (N,H,W,3), got {got}")
    return x


def preprocess_ave(frames: Any) -> torch.Tensor:
    """The AVE script: ``cv2.resize`` to 224x224 (uint8, fixed point), then Keras
    ``preprocess_input`` caffe mode: RGB -> BGR and minus the BGR means, float32, no std.
    Returns (N,3,224,224) with channels in B, G, R order, as the Keras weights expect."""
    x = resize_linear_u8(_frames_nhwc(frames), (224, 224))
    x = x.flip(-1).to(torch.float32) - torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()


def preprocess_torchvision(frames: Any) -> torch.Tensor:
    """torchvision weights, no crop: antialiased bilinear resize to 224x224 (aspect not
    kept), ImageNet mean/std, RGB."""
    x = TF.resize(frames_to_nchw(frames), [224, 224], interpolation=InterpolationMode.BILINEAR, antialias=True)
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def preprocess_imagenet_crop(frames: Any) -> torch.Tensor:
    """torchvision's own transform for these weights (resize 256, centre crop 224)."""
    return VGG19_Weights.IMAGENET1K_V1.transforms()(frames_to_nchw(frames))


PREPROCESS = {"ave": preprocess_ave, "torchvision": preprocess_torchvision,
              "imagenet_crop": preprocess_imagenet_crop}
RECIPES = {  # for provenance
    "ave": {"frames": "by decode index: int(l*fi + i/F*fi), fi = int(n_decoded / segments)",
            "resize": "cv2.resize INTER_LINEAR 224x224 (bit-exact)", "colour": "BGR",
            "normalize": "minus BGR means 103.939/116.779/123.68 (Keras caffe)"},
    "torchvision": {"frames": "by presentation time, centres of F equal parts of each step",
                    "resize": "bilinear antialiased 224x224", "colour": "RGB", "normalize": "ImageNet mean/std"},
    "imagenet_crop": {"frames": "by presentation time, centres of F equal parts of each step",
                      "resize": "resize 256 + centre crop 224", "colour": "RGB", "normalize": "ImageNet mean/std"},
}


def _official_layout() -> dict[str, tuple]:
    return layout_of(vgg19)


def _keras_file(spec: EncoderSpec, weights: str) -> tuple[Path, str | None, str, str] | None:
    """(path, sha256 or None, id, source) when ``weights`` is a Keras HDF5 file: an official
    Keras name (verified against Keras' published md5) or a path whose content is HDF5."""
    text = str(weights)
    ow = spec.official.get(text.lower())
    if text.lower() in KERAS_NAMES and ow is not None:
        path, sha = official_file(ow)
        return path, sha, ow.id, ow.url
    path = Path(text).expanduser()
    if text.lower() not in spec.official and path.is_file() and keras_h5.is_hdf5(path):
        path = path.resolve()
        return path, None, f"file:{path.name}", str(path)
    return None


def _check_pairing(weights: str, preprocessing: str) -> None:
    """Official weights with a recipe they were not trained for: an error, before any file
    is read."""
    w = str(weights).lower()
    if preprocessing == "ave" and w in TORCHVISION_NAMES:
        raise EncoderOptionError(
            f"encoders.vgg19: preprocessing 'ave' is the AVE script's Keras recipe (BGR, Caffe means) and needs "
            f"Keras' weights (weights: keras); {weights!r} are torchvision's weights, trained on RGB mean/std "
            f"input: use them with preprocessing: torchvision (or imagenet_crop)")
    if preprocessing != "ave" and w in KERAS_NAMES:
        raise EncoderOptionError(
            f"encoders.vgg19: weights {weights!r} are Keras' (Caffe-converted) weights, which expect the 'ave' "
            f"recipe's BGR input; preprocessing {preprocessing!r} feeds RGB mean/std: use preprocessing: ave, "
            f"or weights: imagenet")


def _warn_keras_path(weights: str, preprocessing: str) -> None:
    if preprocessing != "ave":
        log.warning("vgg19: %s is a Keras weights file (Keras' VGG19 expects BGR Caffe input) but preprocessing "
                    "is %r (RGB mean/std)", weights, preprocessing)


def _build_from_keras(spec: EncoderSpec, found: tuple, build) -> tuple[nn.Module, dict]:
    path, sha, wid, source = found
    where = f"{spec.name} weights {path}"
    try:
        state = keras_h5.vgg19_features_state_dict(path)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any h5py / numpy failure becomes one clear error
        raise WeightsError(f"{where}: cannot read as a Keras weights file: {type(e).__name__}: {e}") from e
    with torch.device("meta"):
        model = build()
    check_state_dict(state, _official_layout(), required=model.state_dict().keys(), where=where)
    model.load_state_dict(state, strict=True, assign=True)
    info = {"id": wid, "sha256": sha or file_sha256(path), "source": source, "file": path.name,
            "layout": "keras-h5 (block1_conv1..block5_conv4, converted to torchvision features.*)"}
    log.info("%s: loaded Keras weights %s (sha256 %s)", spec.name, path, info["sha256"][:12])
    return model, info


def load(spec: EncoderSpec, weights: str, device: Any, *, seed: int | None, channels_last: bool,
         preprocessing: str, pooled: bool) -> LoadedEncoder:
    """Build VGG-19 pool5 (options: :class:`VGG19Options`; ``seed`` for random weights).
    ``weights``: ``keras`` / ``keras_top`` (Keras' official files), ``imagenet``
    (torchvision's), a path (a Keras HDF5 file, detected by content, or a torchvision
    state dict), or random[:seed]."""
    _check_pairing(weights, preprocessing)
    build = partial(VGG19Pool5, pooled=pooled)
    found = _keras_file(spec, weights)
    if found is not None:
        if found[2].startswith("file:"):
            _warn_keras_path(weights, preprocessing)
        model, info = _build_from_keras(spec, found, build)
    else:
        model, info = build_with_weights(spec, weights, build, official_layout=_official_layout, seed=seed)
    model = inference_ready(model, device, channels_last)
    options = {"preprocessing": preprocessing, **RECIPES[preprocessing], "pooled": pooled, "output": "pool5",
               "channels_last": channels_last}
    return LoadedEncoder(model=model, preprocess=PREPROCESS[preprocessing], weights_info=info, options=options)


def split_at_pools(seq: nn.Sequential) -> list[nn.Module]:
    """A VGG-style conv stack cut after each max-pool: its conv blocks, in forward order."""
    blocks, cur = [], []
    for m in seq:
        cur.append(m)
        if isinstance(m, nn.MaxPool2d):
            blocks.append(nn.ModuleList(cur))
            cur = []
    return blocks


def blocks(model: nn.Module) -> list[nn.Module]:
    """The 5 conv blocks (conv1_x .. conv5_x, each ending in its max-pool)."""
    return split_at_pools(model.features)


def saved_layout(spec: EncoderSpec, model: nn.Module, base_weights: str, seed: int) -> dict:
    """torchvision's vgg19 state dict: the trunk's features.* plus the classifier of the base
    file, or of a torchvision vgg19 seeded with ``seed`` when the base is random or a Keras
    file (extraction never uses the classifier; it is kept so the file is a complete
    torchvision checkpoint). Fine-tuned Keras weights are saved in this torch layout too."""
    text = str(base_weights)
    path = Path(text).expanduser()
    keras_base = text.lower() in KERAS_NAMES or (
        text.lower() not in spec.official and path.is_file() and keras_h5.is_hdf5(path))
    return state_over_base(spec, model, "random" if keras_base else base_weights, random_base=vgg19, seed=seed)


# torchvision names its files name-<sha256 prefix>.pth (torch.hub's convention): checked on every load
_IMAGENET = OfficialWeights("torchvision:VGG19_Weights.IMAGENET1K_V1", "vgg19-dcbb9e9d.pth",
                            VGG19_Weights.IMAGENET1K_V1.url, check_hash=True, pinned_by=HUB_NAMING)
# Keras' ImageNet VGG19 files: URLs and md5 as keras.applications.vgg19 gives them to get_file
# (file_hash, 32 hex digits: md5); both files hold the same convolution weights.
_KERAS_SOURCE = "https://github.com/keras-team/keras/blob/master/keras/src/applications/vgg19.py"
_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
_KERAS_NOTOP = OfficialWeights("keras:vgg19_weights_tf_dim_ordering_tf_kernels_notop",
                               "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                               _KERAS_URL + "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                               md5="253f8cb515780f3b799900260a226db6", pinned_by=_KERAS_SOURCE)
_KERAS_TOP = OfficialWeights("keras:vgg19_weights_tf_dim_ordering_tf_kernels",
                             "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
                             _KERAS_URL + "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
                             md5="cbe5617147190e668d6c5d5026f83318", pinned_by=_KERAS_SOURCE)

SPEC = EncoderSpec(
    name="vgg19",
    modality="visual",
    feature_shape=(7, 7, 512),
    sample_rate=None,
    default_weights="keras",  # the default recipe, `ave`, is defined with Keras' weights
    official={"keras": _KERAS_NOTOP, "keras_top": _KERAS_TOP, "imagenet": _IMAGENET, "imagenet1k_v1": _IMAGENET},
    loader=load,
    options=VGG19Options,
    default_dtype="float16",
    blocks=blocks,
    saved_layout=saved_layout,
)
