"""The weak setting trains with the released background-only videos when import-h5 stored
them beside the features (as AVE-ECCV18, CACE-Net and Ge et al. do), says so in metrics, and
can be turned off; other settings never see them."""
import json

import h5py
import numpy as np
import pandas as pd
import pytest

from avepipe.interop import import_h5
from avepipe.options import HeadOptions, TrainOptions
from avepipe.training import ave


def _h5(path, arr):
    with h5py.File(path, "w") as f:
        f["avadataset"] = arr


@pytest.fixture
def released(tmp_path):
    rng = np.random.default_rng(0)
    n, m = 8, 3
    d = tmp_path / "h5"
    d.mkdir()
    _h5(d / "visual_feature.h5", rng.standard_normal((n, 10, 7, 7, 512)))
    _h5(d / "audio_feature.h5", rng.standard_normal((n, 10, 128)))
    _h5(d / "visual_feature_noisy.h5", rng.standard_normal((m, 10, 7, 7, 512)))
    _h5(d / "audio_feature_noisy.h5", rng.standard_normal((m, 10, 128)))
    labels = np.zeros((m, 29), np.float32)
    labels[:, 28] = 1
    _h5(d / "labels_noisy.h5", labels)
    index = pd.DataFrame({"sample": range(n), "video_id": [f"v{i}" for i in range(n)],
                          "split": ["train"] * 4 + ["val"] * 2 + ["test"] * 2, "label": [i % 3 for i in range(n)],
                          "start": [2] * n, "end": [7] * n, "shard": [0] * n, "exists": [True] * n,
                          "status": ["ok"] * n, "duration": [10.0] * n})
    out = tmp_path / "stores"
    import_h5(d, index, out)
    man = tmp_path / "manifest.parquet"
    index.to_parquet(man)
    return man, sorted((out / "vgg19").glob("shard-*.zarr")), sorted((out / "vggish").glob("shard-*.zarr")), m


@pytest.mark.parametrize("setting, noisy, want", [("weak", True, 3), ("weak", False, 0), ("full", True, 0)])
def test_weak_setting_adds_the_background_videos(released, tmp_path, setting, noisy, want):
    man, vis, aud, m = released
    metrics = ave.run(man, vis, aud, tmp_path / f"run_{setting}_{noisy}", head="avel", setting=setting, seed=0,
                      train=TrainOptions(device="cpu", noisy=noisy), head_opts=HeadOptions(epochs=1, batch_size=4))
    assert metrics["n_noisy_train"] == want
    assert metrics["n_train"] == 4 + want
    saved = json.loads((tmp_path / f"run_{setting}_{noisy}" / "metrics.json").read_text())
    assert saved["n_noisy_train"] == want
