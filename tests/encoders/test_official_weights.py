"""Official weights are checked against what their publisher states, on every load; a missing
`weights` means the official file, never random; a path is loaded as it is."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from avepipe.encoders import get_encoder
from avepipe.encoders import vggish as vggish_module
from avepipe.encoders.weights import WeightsError, official_file

torch.set_num_threads(1)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("AVEPIPE_OFFLINE", "1")
    return tmp_path / "torch_home"


def _cache(torch_home: Path) -> Path:
    d = torch_home / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _random_state(name: str, seed: int = 1) -> dict:
    return get_encoder(name).load(f"random:{seed}").model.state_dict()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(monkeypatch, name: str, key: str, **changes):
    """Replace spec.official[key] of encoder ``name`` by a copy with ``changes``."""
    spec = get_encoder(name)
    ow = dataclasses.replace(spec.official[key], **changes)
    monkeypatch.setitem(spec.official, key, ow)
    return ow


# --------------------------------------------------------------------------- the pins
@pytest.mark.parametrize("name,key,check", [
    ("vgg19", "imagenet", {"hash_prefix": "dcbb9e9d"}),
    ("resnet50", "imagenet", {"hash_prefix": "11ad3fa6"}),
    ("resnet50", "imagenet1k_v1", {"hash_prefix": "0676ba61"}),
    ("vggish", "audioset", {"hash_prefix": "10086976"}),
    ("cnn14", "audioset", {"md5": "541141fa2ee191a88f24a3219fff024e", "size": 327428481}),
])
def test_what_is_pinned(name, key, check):
    ow = get_encoder(name).official[key]
    assert ow.pinned and ow.pinned_by.startswith("https://")
    for attr, value in check.items():
        assert getattr(ow, attr) == value
    assert vggish_module.PCA_PARAMS.hash_prefix == "970ea276"


# --------------------------------------------------------------------------- refused by content
def test_random_vggish_under_the_official_name_is_refused(torch_home):
    """The reproduction of issue 13 item 9: a random VGGish saved as vggish-10086976.pth."""
    path = _cache(torch_home) / "vggish-10086976.pth"
    torch.save(_random_state("vggish"), path)
    found = _sha256(path)
    assert not found.startswith("10086976")  # a random file: its hash cannot have the prefix
    with pytest.raises(WeightsError) as err:
        get_encoder("vggish").load("audioset")
    msg = str(err.value)
    assert str(path) in msg and "expected 10086976" in msg and f"found {found}" in msg
    assert "torchvggish" in msg and "download it again from https://github.com/harritaylor/torchvggish" in msg
    assert path.exists()  # the user's file is not deleted, only refused


def test_missing_weights_means_the_official_file_not_random(torch_home):
    path = _cache(torch_home) / "vggish-10086976.pth"
    torch.save(_random_state("vggish"), path)
    for call in (lambda: get_encoder("vggish").load(), lambda: get_encoder("vggish").load(None)):
        with pytest.raises(WeightsError, match="vggish-10086976.pth"):
            call()


def test_missing_weights_offline_names_the_official_file(torch_home):
    with pytest.raises(WeightsError) as err:
        get_encoder("cnn14").load()
    assert "Cnn14_mAP=0.431.pth" in str(err.value) and "zenodo.org" in str(err.value)


def test_vggish_pca_params_are_checked(torch_home):
    path = _cache(torch_home) / "vggish_pca_params-970ea276.pth"
    torch.save({"pca_eigen_vectors": torch.eye(128), "pca_means": torch.zeros(128)}, path)
    with pytest.raises(WeightsError, match=r"expected 970ea276, found [0-9a-f]{64}"):
        get_encoder("vggish").load("random", pca=True)


@pytest.mark.parametrize("name,filename", [("vgg19", "vgg19-dcbb9e9d.pth"), ("resnet50", "resnet50-11ad3fa6.pth")])
def test_torchvision_prefix_is_checked_on_load_not_only_on_download(torch_home, name, filename):
    path = _cache(torch_home) / filename
    torch.save(_random_state(name), path)
    with pytest.raises(WeightsError) as err:
        get_encoder(name).load("imagenet", **({"preprocessing": "torchvision"} if name == "vgg19" else {}))
    assert str(path) in str(err.value) and f"expected {filename.split('-')[1][:8]}" in str(err.value)
    assert f"found {_sha256(path)}" in str(err.value)


def test_cnn14_wrong_size_is_refused_before_hashing(torch_home, monkeypatch):
    path = _cache(torch_home) / "Cnn14_mAP=0.431.pth"
    path.write_bytes(b"x" * 1000)
    monkeypatch.setattr(hashlib, "md5", lambda *a, **k: pytest.fail("hashed a file of the wrong size"))
    with pytest.raises(WeightsError, match="size expected 327428481 bytes, found 1000 bytes"):
        get_encoder("cnn14").load("audioset")


# --------------------------------------------------------------------------- accepted by content
def test_torchvision_file_whose_hash_has_the_name_prefix_loads(torch_home, monkeypatch):
    """A file's own sha256 prefix in its official name: loaded, provenance has that sha256."""
    sd = _random_state("resnet50", seed=4)
    tmp = _cache(torch_home) / "tmp.pth"
    torch.save(sd, tmp)
    sha = _sha256(tmp)
    name = f"resnet50-{sha[:8]}.pth"
    tmp.rename(tmp.with_name(name))
    _pin(monkeypatch, "resnet50", "imagenet", filename=name)
    enc = get_encoder("resnet50").load("imagenet")
    assert enc.weights_info["sha256"] == sha and enc.weights_info["id"].startswith("torchvision:")
    assert torch.equal(enc.model.conv1.weight, sd["conv1.weight"])
    # one byte more and the same name is refused
    with open(tmp.with_name(name), "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsError, match=f"expected {sha[:8]}"):
        get_encoder("resnet50").load("imagenet")


def test_cnn14_md5_and_size_checked(torch_home, monkeypatch):
    path = _cache(torch_home) / "Cnn14_mAP=0.431.pth"
    torch.save({"model": _random_state("cnn14"), "iteration": 0}, path)
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    _pin(monkeypatch, "cnn14", "audioset", md5=md5, size=len(data))
    enc = get_encoder("cnn14").load()  # no weights: the official file
    assert enc.weights_info["id"] == "panns:Cnn14_mAP=0.431"
    assert enc.weights_info["sha256"] == hashlib.sha256(data).hexdigest()
    _pin(monkeypatch, "cnn14", "audioset", md5="0" * 32, size=len(data))
    with pytest.raises(WeightsError) as err:
        get_encoder("cnn14").load("audioset")
    assert f"md5 expected {'0' * 32}, found {md5}" in str(err.value)
    assert "zenodo.org/records/3987831" in str(err.value)


def test_full_sha256_pin(torch_home, monkeypatch):
    path = _cache(torch_home) / "vggish-10086976.pth"
    torch.save(_random_state("vggish"), path)
    sha = _sha256(path)
    ow = _pin(monkeypatch, "vggish", "audioset", check_hash=False, sha256=sha)
    assert official_file(ow) == (path, sha)
    ow = _pin(monkeypatch, "vggish", "audioset", check_hash=False, sha256="f" * 64)
    with pytest.raises(WeightsError, match=f"sha256 expected {'f' * 64}, found {sha}"):
        get_encoder("vggish").load("audioset")


def test_a_path_is_not_an_official_file(tmp_path, torch_home):
    """Given as a path, a file is loaded and its sha256 recorded, whatever its name."""
    path = tmp_path / "vggish-10086976.pth"
    torch.save(_random_state("vggish", seed=5), path)
    enc = get_encoder("vggish").load(str(path))
    assert enc.weights_info["id"] == "file:vggish-10086976.pth"
    assert enc.weights_info["sha256"] == _sha256(path)


def test_a_bad_download_is_removed(torch_home, monkeypatch):
    """A downloaded file that fails the check does not stay under the official name."""
    monkeypatch.delenv("AVEPIPE_OFFLINE")

    def fake_download(url, dst, hash_prefix=None, progress=True):
        Path(dst).write_bytes(b"not the checkpoint")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(WeightsError, match="size expected 327428481 bytes, found 18 bytes"):
        get_encoder("cnn14").load("audioset")
    assert not (_cache(torch_home) / "Cnn14_mAP=0.431.pth").exists()
