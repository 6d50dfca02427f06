"""Legacy AVE h5 export/import: layout, keys, shapes, sample order, exact round trip."""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from avepipe.datasets.labels import BACKGROUND
from avepipe.interop import export_h5, import_h5
from avepipe.provenance import sha256_file
from avepipe.store import open_features, write_feature_shard

VIS = (2, 2, 8)  # small stand-in for (7,7,512); the layout code is shape-agnostic


def _index():
    # 6 samples, "vB" twice (AVE duplicates), one sample per row in Annotations order
    return pd.DataFrame({
        "sample": [0, 1, 2, 3, 4, 5],
        "video_id": ["vA", "vB", "vC", "vB", "vD", "vE"],
        "split": ["train", "train", "val", "test", "train", "test"],
        "label": [0, 17, 3, 27, 5, 1],
        "start": [0, 2, 0, 4, 9, 3],
        "end": [10, 5, 1, 8, 10, 3],
        "shard": [0, 1, 0, 1, 1, 0],
    })


def _stores(tmp_path, dtype="float16"):
    rng = np.random.default_rng(0)
    ids = sorted({"vA", "vB", "vC", "vD", "vE"})
    vis = {v: rng.standard_normal((10, *VIS)).astype(np.float32) for v in ids}
    aud = {v: rng.standard_normal((10, 128)).astype(np.float32) for v in ids}
    # two shards, like features/<enc>/shard-XXX.zarr
    for name, feats, dt in (("vgg19", vis, dtype), ("vggish", aud, "float32")):
        for k, part in enumerate([ids[:2], ids[2:]]):
            write_feature_shard(tmp_path / "features" / name / f"shard-{k:03d}.zarr", part,
                                np.stack([feats[v] for v in part]), dtype=dt)
    return vis, aud


def test_export_layout_and_labels(tmp_path):
    vis, aud = _stores(tmp_path)
    idx = _index().sample(frac=1.0, random_state=1)  # shuffled: export must sort by sample
    v = open_features(tmp_path / "features" / "vgg19")
    a = open_features(tmp_path / "features" / "vggish")
    written = export_h5(idx, v, a, tmp_path / "h5")
    assert set(written) == {"visual_feature.h5", "audio_feature.h5", "labels.h5", "labels_closs.h5",
                            "mil_labels.h5", "train_order.h5", "val_order.h5", "test_order.h5"}
    order = ["vA", "vB", "vC", "vB", "vD", "vE"]
    with h5py.File(tmp_path / "h5" / "visual_feature.h5") as f:
        assert list(f) == ["avadataset"]
        x = f["avadataset"][...]
        assert x.shape == (6, 10, *VIS) and x.dtype == np.float32
        for i, vid in enumerate(order):
            np.testing.assert_array_equal(x[i], vis[vid].astype(np.float16).astype(np.float32))
    with h5py.File(tmp_path / "h5" / "audio_feature.h5") as f:
        y = f["avadataset"][...]
        assert y.shape == (6, 10, 128)
        np.testing.assert_array_equal(y[3], aud["vB"])
    with h5py.File(tmp_path / "h5" / "labels.h5") as f:
        seg = f["avadataset"][...]
    assert seg.shape == (6, 10, 29)
    # sample 1: Banjo (17) on seconds [2,5), background elsewhere -- computed by hand
    expect = np.zeros((10, 29), np.float32)
    expect[2:5, 17] = 1
    expect[[0, 1, 5, 6, 7, 8, 9], BACKGROUND] = 1
    np.testing.assert_array_equal(seg[1], expect)
    assert (seg[5, :, BACKGROUND] == 1).all()  # zero-length event: all background
    with h5py.File(tmp_path / "h5" / "labels_closs.h5") as f:
        m = f["avadataset"][...]
    assert m.shape == (6, 10)
    np.testing.assert_array_equal(m[4], [0] * 9 + [1])
    with h5py.File(tmp_path / "h5" / "mil_labels.h5") as f:
        mil = f["avadataset"][...]
    assert mil.shape == (6, 29) and mil[:, BACKGROUND].sum() == 0
    assert list(mil.argmax(1)) == [0, 17, 3, 27, 5, 1]
    orders = {}
    for s in ("train", "val", "test"):
        with h5py.File(tmp_path / "h5" / f"{s}_order.h5") as f:
            assert list(f) == ["order"]
            orders[s] = f["order"][...]
            assert orders[s].dtype == np.int64
    assert list(orders["train"]) == [0, 1, 4] and list(orders["val"]) == [2] and list(orders["test"]) == [3, 5]


def test_export_float64_option(tmp_path):
    _stores(tmp_path)
    export_h5(_index(), open_features(tmp_path / "features" / "vgg19"),
              open_features(tmp_path / "features" / "vggish"), tmp_path / "h5", dtype="float64")
    with h5py.File(tmp_path / "h5" / "visual_feature.h5") as f:
        assert f["avadataset"].dtype == np.float64


def test_roundtrip_export_import_exact(tmp_path):
    vis, aud = _stores(tmp_path, dtype="float32")
    idx = _index()
    v = open_features(tmp_path / "features" / "vgg19")
    a = open_features(tmp_path / "features" / "vggish")
    export_h5(idx, v, a, tmp_path / "h5")
    res = import_h5(tmp_path / "h5", idx, tmp_path / "imported")
    assert res["visual"] == tmp_path / "imported" / "vgg19"
    assert sorted(p.name for p in res["visual"].iterdir()) == ["shard-000.zarr", "shard-001.zarr"]
    v2 = open_features(res["visual"], video_ids=v.video_ids)
    a2 = open_features(res["audio"], video_ids=a.video_ids)
    np.testing.assert_array_equal(v2.features.compute(), v.features.compute())
    np.testing.assert_array_equal(a2.features.compute(), a.features.compute())
    assert (v2.lengths == 10).all() and (v2.status == "ok").all()
    prov = v2.attrs["provenance"]
    assert prov["source"] == "released_h5" and prov["encoder"] == "vgg19"
    assert prov["weights"]["sha256"] == sha256_file(tmp_path / "h5" / "visual_feature.h5")
    assert prov["files"]["audio_feature.h5"] == sha256_file(tmp_path / "h5" / "audio_feature.h5")
    assert prov["duplicate_rows_differing"] == 0
    # and exporting the imported stores again gives byte-identical arrays
    export_h5(idx, open_features(res["visual"]), open_features(res["audio"]), tmp_path / "h5b")
    for name in ("visual_feature.h5", "audio_feature.h5", "labels.h5"):
        with h5py.File(tmp_path / "h5" / name) as f, h5py.File(tmp_path / "h5b" / name) as g:
            np.testing.assert_array_equal(f["avadataset"][...], g["avadataset"][...])


def test_export_refuses_failed_and_unknown(tmp_path):
    _stores(tmp_path)
    write_feature_shard(tmp_path / "bad" / "shard-000.zarr", ["vA", "vB", "vC", "vD", "vE"],
                        np.zeros((5, 10, *VIS)), status=["ok", "failed", "ok", "ok", "ok"],
                        reason=["", "x", "", "", ""])
    a = open_features(tmp_path / "features" / "vggish")
    with pytest.raises(ValueError, match="vB"):
        export_h5(_index(), open_features(tmp_path / "bad"), a, tmp_path / "h5")
    idx = _index()
    idx.loc[5, "video_id"] = "vZ"
    with pytest.raises(KeyError, match="vZ"):
        export_h5(idx, open_features(tmp_path / "features" / "vgg19"), a, tmp_path / "h5")


def test_import_rejects_row_mismatch(tmp_path):
    (tmp_path / "h5").mkdir()
    for name, shape in (("visual_feature.h5", (4, 10, *VIS)), ("audio_feature.h5", (4, 10, 128))):
        with h5py.File(tmp_path / "h5" / name, "w") as f:
            f["avadataset"] = np.zeros(shape)
    with pytest.raises(ValueError, match="4 rows but the index has 6"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
