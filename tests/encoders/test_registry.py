"""Every encoder is one file: each module with a SPEC is registered, and each spec carries all
that the rest of avepipe needs (options, weights, blocks, saved layout), checked on a built
random model."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import avepipe.encoders as encoders_pkg
from avepipe.encoders import ENCODERS, EncoderOptionError, encoder_names, get_encoder
from avepipe.encoders.weights import OfficialWeights, layout_of

torch.set_num_threads(1)
PKG = Path(encoders_pkg.__file__).parent
NAMES = sorted(ENCODERS)


def _spec_modules() -> list[str]:
    """Modules of the package that assign a top-level SPEC (read from the source, not imported)."""
    out = []
    for path in sorted(PKG.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, (ast.Assign, ast.AnnAssign)) and "SPEC" in
               [t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
               for n in tree.body):
            out.append(path.stem)
    return out


def test_every_module_with_a_spec_is_registered():
    mods = _spec_modules()
    assert mods, "no encoder module found"
    names = [importlib.import_module(f"avepipe.encoders.{m}").SPEC.name for m in mods]
    assert sorted(names) == NAMES
    assert encoder_names("visual") == sorted(n for n in NAMES if ENCODERS[n].modality == "visual")
    assert sorted(encoder_names("visual") + encoder_names("audio")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_spec_attributes_are_complete(name):
    spec = get_encoder(name)
    assert spec.name == name and spec.modality in ("visual", "audio")
    assert (spec.sample_rate is None) == (spec.modality == "visual")
    assert spec.default_dtype in ("float16", "float32")
    assert spec.default_weights in spec.official and spec.official_names == tuple(spec.official)
    for key, ow in spec.official.items():
        assert isinstance(ow, OfficialWeights) and key == key.lower()
        assert ow.pinned, f"{name}: official weights {key!r} are trusted by name"
        assert ow.url.startswith("https://") and ow.pinned_by.startswith("https://")
    assert dataclasses.is_dataclass(spec.options)
    for f in dataclasses.fields(spec.options):
        assert f.metadata.get("help"), f"{name}.{f.name}: not declared with avepipe.options.option"
        assert f.default is not dataclasses.MISSING  # every option has a default
    assert spec.options() == spec.check_options({})
    assert callable(spec.blocks) and callable(spec.saved_layout) and callable(spec.loader)
    assert all(isinstance(m, str) for m in spec.frozen)


def test_options_are_checked_with_the_key_path():
    with pytest.raises(EncoderOptionError, match=r"encoders\.vgg19\.preprocessing: 'caffe' is not one of 'ave', "
                                                 r"'torchvision'"):
        get_encoder("vgg19").load("random", preprocessing="caffe")
    with pytest.raises(EncoderOptionError, match=r"encoders\.resnet50\.preprocessing: 'bogus' is not one of "
                                                 r"'imagenet1k_v2', 'imagenet1k_v1'"):
        get_encoder("resnet50").check_options({"preprocessing": "bogus"})
    with pytest.raises(EncoderOptionError, match=r"encoders\.resnet50\.poled: unknown option \(options of "
                                                 r"resnet50: pooled, preprocessing\)"):
        get_encoder("resnet50").check_options({"poled": True})
    with pytest.raises(EncoderOptionError, match=r"encoders\.vggish\.pca: 1 is not true or false"):
        get_encoder("vggish").check_options({"pca": 1})
    with pytest.raises(EncoderOptionError, match=r"encoders\.cnn14\.pooled: unknown option "
                                                 r"\(options of cnn14: none\)"):
        get_encoder("cnn14").check_options({"pooled": True})
    with pytest.raises(EncoderOptionError, match=r"encoders\.vggish\.pca_params is set but encoders\.vggish\.pca"):
        get_encoder("vggish").load("random", pca_params="/x.pth")
    assert get_encoder("vggish").check_options({"pca_params": None}).pca is False
    assert get_encoder("vgg19").check_options({"pooled": True}).pooled is True


def test_output_shape_follows_pooled():
    assert get_encoder("vgg19").output_shape() == (7, 7, 512)
    assert get_encoder("resnet50").output_shape({"pooled": True}) == (2048,)
    assert get_encoder("vggish").output_shape({"pca": True}) == (128,)
    with torch.no_grad():
        for pooled in (False, True):
            out = get_encoder("vgg19").load("random", pooled=pooled).model(torch.zeros(1, 3, 224, 224))
            assert tuple(out.shape[1:]) == get_encoder("vgg19").output_shape({"pooled": pooled})


# --------------------------------------------------------------------------- blocks
def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "vggish":
        return torch.randn(1, 1, 96, 64, generator=g)
    if name == "cnn14":
        return 0.1 * torch.randn(1, 16000, generator=g)
    return torch.randn(1, 3, 64, 64, generator=g)  # both trunks take any size >= 32


def _model(name: str, seed: int = 1) -> nn.Module:
    opts = {"pooled": False} if get_encoder(name).modality == "visual" else {}
    return get_encoder(name).load(f"random:{seed}", **opts).model.float()


@pytest.mark.parametrize("name", NAMES)
def test_blocks_run_in_forward_order_and_cover_all_but_the_frozen_modules(name):
    spec, model = get_encoder(name), _model(name)
    blocks = spec.trainable_blocks(model)
    assert len(blocks) >= 2
    # call order of every leaf module with parameters, in one forward pass
    order: dict[nn.Module, int] = {}

    def seen(mod, inputs, output) -> None:  # returns None: the output is left as it is
        order.setdefault(mod, len(order))

    hooks = [m.register_forward_hook(seen)
             for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    with torch.no_grad():
        model(_input(name))
    for h in hooks:
        h.remove()
    spans = []
    for b in blocks:
        called = [order[m] for m in b.modules() if m in order]
        assert called, f"{name}: a block that never runs"
        spans.append((min(called), max(called)))
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), f"{name}: blocks out of forward order {spans}"
    # every parameter is in exactly one block, or under a frozen top-level module
    in_blocks = [id(p) for b in blocks for p in b.parameters()]
    assert len(in_blocks) == len(set(in_blocks))
    frozen = {id(p) for m in spec.frozen for p in getattr(model, m).parameters()}
    assert set(in_blocks).isdisjoint(frozen)
    assert set(in_blocks) | frozen == {id(p) for p in model.parameters()}


# --------------------------------------------------------------------------- saved layout
@pytest.mark.parametrize("name", NAMES)
def test_official_state_dict_round_trips_through_load(name, tmp_path):
    spec = get_encoder(name)
    model = _model(name, seed=2)
    with torch.no_grad():  # as after fine-tuning: the weights are not those of any seed
        for p in spec.trainable_blocks(model)[-1].parameters():
            p.add_(0.5)
    saved = spec.official_state_dict(model, "random", seed=0)
    path = tmp_path / f"{name}-ft.pth"
    torch.save(saved, path)
    back = spec.load(str(path), **({"pooled": False} if spec.modality == "visual" else {})).model
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the official layout: torchvision's whole model, torchvggish's keys, a PANNs {"model": ...}
    if spec.modality == "visual":
        assert set(saved) == set(layout_of(getattr(torchvision.models, name)))
    elif name == "cnn14":
        assert set(saved) == {"model"} and set(saved["model"]) == set(model.state_dict())
    else:
        assert set(saved) == set(model.state_dict())


def test_saved_layout_keeps_the_base_files_other_keys(tmp_path):
    """Keys the trunk lacks come from the base file (ResNet-50's fc), the trunk's own win."""
    spec = get_encoder("resnet50")
    base = spec.official_state_dict(_model("resnet50", seed=3), "random", seed=0)
    base["fc.bias"] = torch.arange(1000.0)
    torch.save(base, tmp_path / "base.pth")
    model = _model("resnet50", seed=4)
    saved = spec.official_state_dict(model, str(tmp_path / "base.pth"), seed=0)
    assert torch.equal(saved["fc.bias"], torch.arange(1000.0))
    assert torch.equal(saved["conv1.weight"], model.conv1.weight)
    # a random base: the fc of a torchvision resnet50 seeded with `seed`
    a, b = (spec.official_state_dict(model, "random", seed=s)["fc.weight"] for s in (5, 6))
    torch.manual_seed(5)
    assert torch.equal(a, torchvision.models.resnet50().fc.weight) and not torch.equal(a, b)


def test_cnn14_saved_layout_keeps_every_key_of_the_base_checkpoint(tmp_path):
    spec = get_encoder("cnn14")
    base = {"model": _model("cnn14", seed=3).state_dict(), "iteration": 7}
    torch.save(base, tmp_path / "Cnn14_base.pth")
    model = _model("cnn14", seed=4)
    saved = spec.official_state_dict(model, str(tmp_path / "Cnn14_base.pth"), seed=0)
    assert set(saved) == {"model"} and set(saved["model"]) == set(base["model"])
    assert torch.equal(saved["model"]["fc1.weight"], model.fc1.weight)
