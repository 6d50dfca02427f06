"""Weight resolution / loading: official names, local files, random init, errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from avepipe.encoders import EncoderSpec, get_encoder
from avepipe.encoders.weights import (OfficialWeights, WeightsError, build_with_weights, check_state_dict,
                                      checkpoint_dir, fetch_official, read_checkpoint, resolve_weights)

torch.set_num_threads(1)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


TINY = EncoderSpec(name="tiny", modality="visual", feature_shape=(2,), sample_rate=None,
                   default_weights="imagenet",
                   official={"imagenet": OfficialWeights("test:tiny", "tiny-0123abcd.pth",
                                                         "http://127.0.0.1:9/tiny-0123abcd.pth")})


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("AVEPIPE_OFFLINE", "1")
    return tmp_path / "torch_home"


def test_checkpoint_dir_follows_torch_home(torch_home):
    assert checkpoint_dir() == torch_home / "hub" / "checkpoints"


@pytest.mark.parametrize("name,weights,filename,url_part", [
    ("vgg19", "imagenet", "vgg19-dcbb9e9d.pth", "download.pytorch.org/models/vgg19-dcbb9e9d.pth"),
    ("resnet50", "imagenet", "resnet50-11ad3fa6.pth", "download.pytorch.org/models/resnet50-11ad3fa6.pth"),
    ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", "download.pytorch.org/models/resnet50-0676ba61.pth"),
    ("vggish", "audioset", "vggish-10086976.pth", "torchvggish/releases/download/v0.1/vggish-10086976.pth"),
    ("cnn14", "audioset", "Cnn14_mAP=0.431.pth", "zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth"),
    ("vgg19", "keras", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
     "storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
])
def test_offline_official_error_names_file_url_and_directory(torch_home, name, weights, filename, url_part):
    spec = get_encoder(name)
    with pytest.raises(WeightsError) as err:
        spec.load(weights=weights, **({"preprocessing": "torchvision"} if weights == "imagenet" and name == "vgg19"
                                      else {}))
    msg = str(err.value)
    assert filename in msg and url_part in msg
    assert str(torch_home / "hub" / "checkpoints") in msg
    assert not (torch_home / "hub" / "checkpoints" / filename).exists()


def test_vggish_pca_offline_error(torch_home):
    with pytest.raises(WeightsError, match="vggish_pca_params-970ea276.pth"):
        get_encoder("vggish").load(weights="random", pca=True)


def test_failed_download_is_fast_clear_and_leaves_no_file(torch_home, monkeypatch):
    monkeypatch.delenv("AVEPIPE_OFFLINE")
    monkeypatch.setenv("AVEPIPE_DOWNLOAD_TIMEOUT", "3")
    with pytest.raises(WeightsError) as err:
        fetch_official(TINY.official["imagenet"])  # port 9 on localhost: connection refused
    assert "download failed" in str(err.value) and "tiny-0123abcd.pth" in str(err.value)
    left = list((torch_home / "hub" / "checkpoints").glob("*")) if (torch_home / "hub").exists() else []
    assert left == []


def test_official_file_in_cache_is_used_and_hashed(torch_home):
    torch.manual_seed(1)
    sd = _tiny().state_dict()
    dest = torch_home / "hub" / "checkpoints" / "tiny-0123abcd.pth"
    dest.parent.mkdir(parents=True)
    torch.save(sd, dest)
    model, info = build_with_weights(TINY, "imagenet", _tiny)
    assert info["id"] == "test:tiny"
    assert info["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert info["source"].startswith("http://")
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)


def test_local_path_loads_and_records_sha256(tmp_path):
    torch.manual_seed(2)
    sd = _tiny().state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    model, info = build_with_weights(TINY, str(path), _tiny)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["id"] == "file:w.pth" and info["source"] == str(path.resolve())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert not any(t.is_meta for t in model.state_dict().values())


def test_float16_file_loads_into_float32_model(tmp_path):
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in _tiny().state_dict().items()}
    torch.save(sd, tmp_path / "h.pth")
    model, _ = build_with_weights(TINY, str(tmp_path / "h.pth"), _tiny)
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, sd["0.weight"].float())


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    sd = {k: v for k, v in _tiny().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    model, _ = build_with_weights(TINY, str(tmp_path / "old.pth"), _tiny)
    assert int(model[1].num_batches_tracked) == 0


def test_layout_mismatch_gives_readable_diff(tmp_path):
    sd = _tiny().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["3.bias"]
    sd["0.weight"] = torch.zeros(4, 3, 5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        build_with_weights(TINY, str(tmp_path / "bad.pth"), _tiny)
    lines = str(err.value).splitlines()
    assert "bad.pth" in lines[0] and "1 missing, 1 unexpected, 1 wrong shape" in lines[0]
    assert "  missing: 3.bias" in lines
    assert "  unexpected: extra.weight" in lines
    assert "  shape: 0.weight file [4, 3, 5, 5] expected [4, 3, 3, 3]" in lines


def test_check_state_dict_optional_keys_and_truncation():
    layout = {f"k{i}": (2,) for i in range(30)}
    check_state_dict({"k0": torch.zeros(2)}, layout, required=["k0"])  # others optional: fine
    with pytest.raises(WeightsError) as err:
        check_state_dict({}, layout, max_lines=5)
    assert "... and 25 more" in str(err.value)


def test_unknown_name_and_missing_path():
    with pytest.raises(WeightsError, match="neither a known name"):
        resolve_weights(get_encoder("vgg19"), "imagenet21k")
    with pytest.raises(WeightsError, match="/no/such/file.pth"):
        resolve_weights(get_encoder("vgg19"), "/no/such/file.pth")


def test_random_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, ia = build_with_weights(TINY, "random", _tiny, seed=7)
    b, _ = build_with_weights(TINY, "random:7", _tiny)
    c, ic = build_with_weights(TINY, "random:8", _tiny)
    d, idf = build_with_weights(TINY, "random", _tiny)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert ia == {"id": "random", "seed": 7, "sha256": None, "source": ia["source"]}
    assert ic["seed"] == 8 and idf["seed"] == 0
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    assert not torch.equal(a[0].weight, d[0].weight)


def test_random_is_logged(caplog):
    with caplog.at_level("WARNING"):
        build_with_weights(TINY, "random:3", _tiny)
    assert any("RANDOM weights (seed 3)" in r.getMessage() for r in caplog.records)


def test_read_checkpoint_with_numpy_arrays(tmp_path):
    # torchvggish's PCA params file pickles numpy arrays; weights_only loading must still work
    params = {"pca_eigen_vectors": np.eye(3, dtype=np.float64), "pca_means": np.arange(3.0)}
    torch.save(params, tmp_path / "np.pth")
    got = read_checkpoint(tmp_path / "np.pth")
    assert np.array_equal(np.asarray(got["pca_eigen_vectors"]), np.eye(3))


def test_read_checkpoint_garbage(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")


def test_registry_names_and_shapes():
    from avepipe.encoders import ENCODERS
    assert {n: ENCODERS[n].feature_shape for n in ENCODERS} == {
        "vgg19": (7, 7, 512), "resnet50": (7, 7, 2048), "vggish": (128,), "cnn14": (2048,)}
    assert get_encoder("vggish").sample_rate == 16000 and get_encoder("cnn14").sample_rate == 32000
    with pytest.raises(KeyError, match="known: cnn14, resnet50, vgg19, vggish"):
        get_encoder("clip")
