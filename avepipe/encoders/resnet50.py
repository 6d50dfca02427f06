"""ResNet-50 trunk maps, as CACE-Net's ``Encoders/`` (docs/reference.md §2.2).

trunk = all children of torchvision ``resnet50()`` but avgpool/fc -> (B,2048,7,7),
returned channels-last (B,7,7,2048); ``pooled=True`` gives the avgpool vector (B,2048).

Preprocessing (the options' frame recipe, avepipe.frames): frames by presentation time;
the shorter side resized to 232 (V2; 256 for V1) with the antialiased bilinear of
torchvision's uint8 kernels (PIL's arithmetic, as CACE-Net's PIL pipeline; the float resize
of ``ResNet50_Weights.transforms()`` differs by at most one grey level and is much slower),
centre crop 224, ImageNet mean/std.

For extraction the trunk folds each BatchNorm into the convolution before it
(:meth:`ResNet50Trunk.fused_for_inference`: y = W'x + b' with W' = W * g/sqrt(v+eps),
b' = beta - m * g/sqrt(v+eps)); equal to the unfused trunk within float rounding. The
module itself, its state dict and the saved / fine-tuned weights keep torchvision's layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet50_Weights, resnet50

from avepipe import frames as fr
from avepipe.encoders import EncoderSpec, LoadedEncoder
from avepipe.encoders.weights import (HUB_NAMING, OfficialWeights, build_with_weights, inference_ready,
                                      layout_of, state_over_base)
from avepipe.options import option

PREPROCESSING = {"imagenet1k_v2": ResNet50_Weights.IMAGENET1K_V2, "imagenet1k_v1": ResNet50_Weights.IMAGENET1K_V1}
RESIZE = {"imagenet1k_v2": "resize232_crop224", "imagenet1k_v1": "resize256_crop224"}  # avepipe.frames.RESIZES


@dataclass
class ResNet50Options:
    """`encoders.resnet50`: ResNet-50 layer4 options."""

    preprocessing: str = option("imagenet1k_v2", help="torchvision's transforms of those weights (V2: resize "
                                "232, centre crop 224, as CACE-Net; V1: resize 256, crop 224)",
                                choices=tuple(PREPROCESSING))
    pooled: bool = option(False, help="store the spatial mean (2048,) instead of the 7x7 map")

    def frame_recipe(self, per_step: int) -> fr.FrameRecipe:
        """Frames by presentation time, resize + centre crop of these weights, mean/std."""
        return fr.FrameRecipe("time", per_step, RESIZE[self.preprocessing], "imagenet")


class ResNet50Trunk(nn.Module):
    """(N,3,224,224) -> (N,7,7,2048) channels-last, or (N,2048) when ``pooled``.

    The trunk's children sit at top level, so the state dict keys are torchvision's
    (conv1.*, bn1.*, layer1..4.*) minus fc.*: fine-tuned weights save in the official layout.
    """

    def __init__(self, pooled: bool = False):
        super().__init__()
        for name, child in resnet50().named_children():
            if name not in ("avgpool", "fc"):
                self.add_module(name, child)
        self.pooled = pooled
        self.memory_format = torch.channels_last  # load(channels_last=False) sets contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        for child in self.children():
            x = child(x)
        return x.mean(dim=(2, 3)) if self.pooled else x.permute(0, 2, 3, 1)

    def fused_for_inference(self) -> "ResNet50Trunk":
        """A copy for inference with every BatchNorm (eval statistics) folded into the
        convolution before it (torch's ``fuse_conv_bn_eval``) and replaced by Identity: 53
        fewer passes over the activations. Never for training (the statistics are baked in)."""
        fused = copy.deepcopy(self).eval().requires_grad_(False)
        pairs = [(fused, "conv1", "bn1")]
        for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4):
            for block in layer:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        for parent, conv, bn in pairs:
            c, b = getattr(parent, conv), getattr(parent, bn)
            if not isinstance(c, nn.Conv2d) or not isinstance(b, nn.BatchNorm2d):
                raise TypeError(f"resnet50: expected Conv2d + BatchNorm2d at {conv}/{bn}, got "
                                f"{type(c).__name__} + {type(b).__name__}")
            setattr(parent, conv, fuse_conv_bn_eval(c, b))
            setattr(parent, bn, nn.Identity())
        if self.memory_format == torch.channels_last:
            fused = fused.to(memory_format=torch.channels_last)
        fused.fusions = [f"batchnorm folded into the preceding convolution ({len(pairs)} pairs)"]
        return fused


def make_preprocess(name: str = "imagenet1k_v2"):
    """uint8 (N,H,W,3) -> float (N,3,224,224): the recipe of those weights (V2: shorter side
    232 bilinear antialiased, centre crop 224, ImageNet mean/std; see the module docstring)."""
    if name not in PREPROCESSING:
        raise ValueError(f"resnet50: preprocessing must be one of {tuple(PREPROCESSING)}, got {name!r}")
    # partial of a module-level function: picklable for DataLoader workers
    return partial(fr.preprocess, ResNet50Options(preprocessing=name).frame_recipe(1))


def load(spec: EncoderSpec, weights: str, device: Any, *, seed: int | None, channels_last: bool,
         preprocessing: str, pooled: bool) -> LoadedEncoder:
    """Build the ResNet-50 trunk. ``weights`` "imagenet" = IMAGENET1K_V2 ("imagenet1k_v1"
    selects V1); ``preprocessing`` "imagenet1k_v2" (default, as CACE-Net) | "imagenet1k_v1"."""
    pre = make_preprocess(preprocessing)
    model, info = build_with_weights(spec, weights, partial(ResNet50Trunk, pooled=pooled),
                                     official_layout=lambda: layout_of(resnet50), seed=seed)
    model = inference_ready(model, device, channels_last)
    options = {"preprocessing": preprocessing, "pooled": pooled, "output": "layer4", "channels_last": channels_last}
    return LoadedEncoder(model=model, preprocess=pre, weights_info=info, options=options)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The stem (conv1 + bn1) and layer1..layer4."""
    return [nn.ModuleList([model.conv1, model.bn1]), model.layer1, model.layer2, model.layer3, model.layer4]


def saved_layout(spec: EncoderSpec, model: nn.Module, base_weights: str, seed: int) -> dict:
    """torchvision's resnet50 state dict: the trunk plus the fc of the base file, or of a
    torchvision resnet50 seeded with ``seed`` when the base is random (unused by extraction)."""
    return state_over_base(spec, model, base_weights, random_base=resnet50, seed=seed)


# torchvision names its files name-<sha256 prefix>.pth (torch.hub's convention): checked on every load
_V1 = OfficialWeights("torchvision:ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth",
                      ResNet50_Weights.IMAGENET1K_V1.url, check_hash=True, pinned_by=HUB_NAMING)
_V2 = OfficialWeights("torchvision:ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth",
                      ResNet50_Weights.IMAGENET1K_V2.url, check_hash=True, pinned_by=HUB_NAMING)

SPEC = EncoderSpec(
    name="resnet50",
    modality="visual",
    feature_shape=(7, 7, 2048),
    sample_rate=None,
    default_weights="imagenet",
    official={"imagenet": _V2, "imagenet1k_v2": _V2, "imagenet1k_v1": _V1},
    loader=load,
    options=ResNet50Options,
    default_dtype="float16",
    blocks=blocks,
    saved_layout=saved_layout,
)
