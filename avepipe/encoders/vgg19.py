"""VGG-19 pool5 maps, as the AVE features (docs/reference.md §2.1).

pool5 = output of torchvision ``vgg19().features`` (B,512,7,7) -- not ``features[:-1]``
(conv5_4, 14x14) -- returned channels-last (B,7,7,512), the layout of the AVE h5.
Only ``features`` is built; the classifier (120M parameters) is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19
from torchvision.models.vgg import cfgs, make_layers
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from avepipe.encoders import EncoderSpec, LoadedEncoder
from avepipe.encoders.weights import (HUB_NAMING, OfficialWeights, build_with_weights, inference_ready,
                                      layout_of, state_over_base)
from avepipe.options import option

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = ("ave", "torchvision")


@dataclass
class VGG19Options:
    """`encoders.vgg19`: VGG-19 pool5 options."""

    preprocessing: str = option("ave", help="ave: resize to 224x224, no crop (the AVE features); torchvision: "
                                "resize 256, centre crop 224", choices=PREPROCESSING)
    pooled: bool = option(False, help="store the spatial mean (512,) instead of the 7x7 map")


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
    x = torch.as_tensor(frames) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        got = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"expected uint8 frames (N,H,W,3), got {got}")
    return x.permute(0, 3, 1, 2)


def preprocess_ave(frames: Any) -> torch.Tensor:
    """AVE recipe: resize to 224x224 (no crop, aspect not kept), ImageNet mean/std."""
    x = frames_to_nchw(frames)
    x = TF.resize(x, [224, 224], interpolation=InterpolationMode.BILINEAR, antialias=True)
    x = TF.to_dtype(x, torch.float32, scale=True)
    return TF.normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def preprocess_torchvision(frames: Any) -> torch.Tensor:
    """torchvision's own recipe for these weights (resize 256, centre crop 224)."""
    return VGG19_Weights.IMAGENET1K_V1.transforms()(frames_to_nchw(frames))


def _official_layout() -> dict[str, tuple]:
    return layout_of(vgg19)


def load(spec: EncoderSpec, weights: str, device: Any, *, seed: int | None, channels_last: bool,
         preprocessing: str, pooled: bool) -> LoadedEncoder:
    """Build VGG-19 pool5 (options: :class:`VGG19Options`; ``seed`` for random weights)."""
    model, info = build_with_weights(spec, weights, partial(VGG19Pool5, pooled=pooled),
                                     official_layout=_official_layout, seed=seed)
    model = inference_ready(model, device, channels_last)
    pre = preprocess_ave if preprocessing == "ave" else preprocess_torchvision
    options = {"preprocessing": preprocessing, "pooled": pooled, "output": "pool5", "channels_last": channels_last}
    return LoadedEncoder(model=model, preprocess=pre, weights_info=info, options=options)


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
    file, or of a torchvision vgg19 seeded with ``seed`` when the base is random (extraction
    never uses the classifier; it is kept so the file is a complete torchvision checkpoint)."""
    return state_over_base(spec, model, base_weights, random_base=vgg19, seed=seed)


# torchvision names its files name-<sha256 prefix>.pth (torch.hub's convention): checked on every load
_IMAGENET = OfficialWeights("torchvision:VGG19_Weights.IMAGENET1K_V1", "vgg19-dcbb9e9d.pth",
                            VGG19_Weights.IMAGENET1K_V1.url, check_hash=True, pinned_by=HUB_NAMING)

SPEC = EncoderSpec(
    name="vgg19",
    modality="visual",
    feature_shape=(7, 7, 512),
    sample_rate=None,
    default_weights="imagenet",
    official={"imagenet": _IMAGENET, "imagenet1k_v1": _IMAGENET},
    loader=load,
    options=VGG19Options,
    default_dtype="float16",
    blocks=blocks,
    saved_layout=saved_layout,
)
