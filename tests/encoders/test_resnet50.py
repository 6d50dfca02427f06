"""ResNet-50 trunk encoder vs an independent torchvision forward on the same frames."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from avepipe.encoders import get_encoder
from avepipe.encoders.weights import WeightsError

torch.set_num_threads(1)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
LSB = 1.0 / 255 / 0.224


def _frames(n=1, h=240, w=320, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 13 + c) * np.cos(yy / 29 - c) for c in range(3)], -1)
    return np.clip(base[None] + rng.normal(0, 20, (n, h, w, 3)), 0, 255).astype(np.uint8)


def ref_preprocess(frames: np.ndarray, short: int = 232) -> torch.Tensor:
    """Resize the shorter side to ``short`` (bilinear, antialiased), centre crop 224, mean/std."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False).round().clamp(0, 255)
    top, left = int(round((nh - 224) / 2)), int(round((nw - 224) / 2))
    return (x[..., top:top + 224, left:left + 224] / 255 - MEAN) / STD


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(11)
    tv = torchvision.models.resnet50()
    for m in tv.modules():  # non-trivial BN statistics so the eval-mode BN path is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.uniform_(-0.1, 0.1)
    tv.eval()
    path = tmp_path_factory.mktemp("resnet50") / "resnet50-random.pth"
    torch.save(tv.state_dict(), path)  # the full official layout, fc included
    trunk = nn.Sequential(*list(tv.children())[:-2])  # all children but avgpool/fc
    return tv, trunk, path


@pytest.fixture(scope="module")
def encoder(reference):
    return get_encoder("resnet50").load(weights=str(reference[2]))


def test_preprocess_matches_resize232_crop224():
    frames = _frames(2)
    ours = get_encoder("resnet50").load(weights="random").preprocess(torch.from_numpy(frames))
    ref = ref_preprocess(frames)
    assert ours.shape == (2, 3, 224, 224)
    assert float((ours - ref).abs().max()) <= 1.01 * LSB


def test_preprocess_v1_option_resizes_to_256():
    frames = _frames(1, 300, 200)  # portrait: the width is the short side
    enc = get_encoder("resnet50").load(weights="random", preprocessing="imagenet1k_v1")
    assert float((enc.preprocess(frames) - ref_preprocess(frames, 256)).abs().max()) <= 1.01 * LSB


def test_trunk_equals_torchvision(reference, encoder):
    tv, trunk, _ = reference
    x = ref_preprocess(_frames(1, seed=3))
    with torch.no_grad():
        ours = encoder.model(x)
        ref = trunk(x)
        logits_path = tv.fc(torch.flatten(tv.avgpool(ref), 1))  # sanity: the trunk feeds torchvision's head
    assert ours.shape == (1, 7, 7, 2048) == (1, *get_encoder("resnet50").feature_shape)
    assert float((ours - ref.permute(0, 2, 3, 1)).abs().max()) <= 1e-4 * float(ref.abs().max())
    with torch.no_grad():
        logits = tv(x)
    assert torch.allclose(logits, logits_path, rtol=1e-4, atol=1e-4 * float(logits.abs().max()))


def test_pooled_is_avgpool(reference):
    tv, trunk, path = reference
    enc = get_encoder("resnet50").load(weights=str(path), pooled=True)
    x = ref_preprocess(_frames(1, seed=4))
    with torch.no_grad():
        ours = enc.model(x)
        ref = torch.flatten(tv.avgpool(trunk(x)), 1)
    assert ours.shape == (1, 2048)
    assert float((ours - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_state_dict_is_official_layout_without_fc(reference, encoder):
    tv, _, path = reference
    official = set(tv.state_dict())
    assert set(encoder.model.state_dict()) == {k for k in official if not k.startswith("fc.")}
    assert encoder.weights_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert encoder.options["preprocessing"] == "imagenet1k_v2"
    assert not encoder.model.training


def test_wrong_shapes_rejected(reference, tmp_path):
    sd = torch.load(reference[2], weights_only=True)
    sd["layer4.2.conv3.weight"] = torch.zeros(2048, 512, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"shape: layer4.2.conv3.weight file \[2048, 512, 3, 3\] "
                                           r"expected \[2048, 512, 1, 1\]"):
        get_encoder("resnet50").load(weights=str(tmp_path / "bad.pth"))


def test_random_deterministic_per_seed():
    a = get_encoder("resnet50").load(weights="random", seed=3).model.conv1.weight
    b = get_encoder("resnet50").load(weights="random:3").model.conv1.weight
    c = get_encoder("resnet50").load(weights="random:4").model.conv1.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------- inference fusions
def test_batchnorm_folding_equals_the_unfused_trunk(reference, encoder):
    """Every BatchNorm (non-trivial statistics) folded into its convolution: the same maps
    within float rounding, and no BatchNorm left. The encoder's own module is untouched."""
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    fused = encoder.model.fused_for_inference()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in encoder.model.modules()) == 53
    assert fused.fusions == ["batchnorm folded into the preceding convolution (53 pairs)"]
    x = ref_preprocess(_frames(2, seed=5))
    with torch.no_grad():
        want, got = encoder.model(x), fused(x)
    assert got.shape == want.shape == (2, 7, 7, 2048)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    # the weights layout (saved / fine-tuned files) is the unfused one, unchanged
    after = encoder.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in fused.parameters())


def test_batchnorm_folding_pooled(reference):
    enc = get_encoder("resnet50").load(weights=str(reference[2]), pooled=True)
    x = ref_preprocess(_frames(1, seed=6))
    with torch.no_grad():
        want, got = enc.model(x), enc.model.fused_for_inference()(x)
    assert got.shape == (1, 2048)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
