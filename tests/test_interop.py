"""Legacy AVE h5 export/import: layout, keys, shapes, sample order, exact round trip."""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from avepipe.datasets.labels import BACKGROUND
from avepipe.interop import H5ImportError, export_h5, import_h5, load_noisy
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
    res = import_h5(tmp_path / "h5", idx, tmp_path / "imported", visual_step_shapes=[VIS])
    assert res["visual"] == tmp_path / "imported" / "vgg19"
    assert sorted(p.name for p in (tmp_path / "imported").iterdir()) == ["vgg19", "vggish"]  # no leftovers
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


# --------------------------------------------------------------------------- import checks
REAL_VIS = (7, 7, 512)


def _h5(path, arr, key="avadataset"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f[key] = arr
    return path


def _released(d, n=6, vis=REAL_VIS, seed=0, noisy=0):
    """A released-style h5 folder: float64 like the real files; ``noisy`` background videos."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 10, *vis))
    a = rng.standard_normal((n, 10, 128))
    _h5(d / "visual_feature.h5", v)
    _h5(d / "audio_feature.h5", a)
    out = {"visual": v, "audio": a}
    if noisy:
        out["nv"] = rng.standard_normal((noisy, 10, *vis))
        out["na"] = rng.standard_normal((noisy, 10, 128))
        out["nl"] = np.zeros((noisy, 29), np.float32)
        out["nl"][:, 28] = 1  # as the released labels_noisy.h5: background column set
        _h5(d / "visual_feature_noisy.h5", out["nv"])
        _h5(d / "audio_feature_noisy.h5", out["na"])
        _h5(d / "labels_noisy.h5", out["nl"])
    return out


def _left(out):
    """Everything under ``out`` (stores, staging folders), relative."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def test_import_rejects_row_mismatch(tmp_path):
    (tmp_path / "h5").mkdir()
    for name, shape in (("visual_feature.h5", (4, 10, *VIS)), ("audio_feature.h5", (4, 10, 128))):
        with h5py.File(tmp_path / "h5" / name, "w") as f:
            f["avadataset"] = np.zeros(shape)
    with pytest.raises(H5ImportError, match=r"visual_feature.h5: key 'avadataset' has 4 rows but the index's "
                                            r"Annotations.txt has 6 rows"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out", visual_step_shapes=[VIS])
    assert _left(tmp_path / "out") == []


@pytest.mark.parametrize("what,bad", [("visual", np.nan), ("visual", np.inf), ("audio", -np.inf), ("audio", np.nan)])
def test_import_rejects_non_finite_naming_file_key_row(tmp_path, what, bad):
    arrays = _released(tmp_path / "h5")
    arr = arrays[what].copy()
    tail = (-1,) * (arr.ndim - 2)
    arr[(3, 9, *tail)] = bad  # one value in row 3, one in row 5: the first bad row is named
    arr[(5, 0, *tail)] = bad
    _h5(tmp_path / "h5" / f"{what}_feature.h5", arr)
    with pytest.raises(H5ImportError) as e:
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    msg = str(e.value)
    assert f"{what}_feature.h5: key 'avadataset' row 3:" in msg and "\n" not in msg
    assert ("1 NaN" in msg) if np.isnan(bad) else ("1 Inf" in msg)
    assert _left(tmp_path / "out") == []


@pytest.mark.parametrize("what,shape,expect", [
    ("visual", (6, 10, 100), "(N, 10, 7, 7, 512) or (N, 10, 512)"),
    ("visual", (6, 5, 7, 7, 512), "(N, 10, 7, 7, 512) or (N, 10, 512)"),
    ("audio", (6, 10, 128, 2), "(N, 10, 128)"),
    ("audio", (6, 10), "(N, 10, 128)"),
])
def test_import_rejects_shapes(tmp_path, what, shape, expect):
    _released(tmp_path / "h5")
    _h5(tmp_path / "h5" / f"{what}_feature.h5", np.zeros(shape))
    with pytest.raises(H5ImportError) as e:
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    assert f"{what}_feature.h5: key 'avadataset' has shape {shape}; expected {expect}" in str(e.value)
    assert _left(tmp_path / "out") == []


def test_import_rejects_dtype_and_key(tmp_path):
    _released(tmp_path / "h5")
    _h5(tmp_path / "h5" / "audio_feature.h5", np.zeros((6, 10, 128), np.int32))
    with pytest.raises(H5ImportError, match="audio_feature.h5: key 'avadataset' has dtype int32; float"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    _h5(tmp_path / "h5" / "audio_feature.h5", np.zeros((6, 10, 128)), key="features")
    with pytest.raises(H5ImportError, match=r"audio_feature.h5: no dataset 'avadataset' \(keys: \['features'\]\)"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    assert _left(tmp_path / "out") == []


def test_import_pooled_visual_accepted(tmp_path):
    rng = np.random.default_rng(3)
    v = rng.standard_normal((6, 10, 512))
    _released(tmp_path / "h5")
    _h5(tmp_path / "h5" / "visual_feature.h5", v)
    res = import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    fs = open_features(res["visual"], video_ids=["vB", "vE"])
    np.testing.assert_array_equal(fs.features.compute(), v[[1, 5]].astype(np.float32))


def test_import_second_file_failing_leaves_nothing(tmp_path):
    arrays = _released(tmp_path / "h5")
    _h5(tmp_path / "h5" / "audio_feature.h5", arrays["audio"][:5])  # the second file is short
    with pytest.raises(H5ImportError, match="audio_feature.h5: key 'avadataset' has 5 rows"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    assert _left(tmp_path / "out") == []  # today's code left out/vgg19 behind


def test_import_failure_while_writing_keeps_previous_stores(tmp_path, monkeypatch):
    import avepipe.interop as interop

    arrays = _released(tmp_path / "h5")
    out = tmp_path / "out"
    import_h5(tmp_path / "h5", _index(), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _released(tmp_path / "h5", seed=1)  # new values; the import breaks while writing the audio store
    real, calls = interop._write_store, []

    def flaky(target, *a, **k):
        calls.append(target.name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(target, *a, **k)

    monkeypatch.setattr(interop, "_write_store", flaky)
    with pytest.raises(OSError, match="disk full"):
        import_h5(tmp_path / "h5", _index(), out)
    assert calls == ["vgg19", "vggish"]
    # the first import's stores are untouched (no new visual store beside an old audio one)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    v = open_features(out / "vgg19", video_ids=["vA"]).features.compute()
    np.testing.assert_array_equal(v[0], arrays["visual"][0].astype(np.float32))


def test_import_cleans_stale_staging_of_killed_imports(tmp_path):
    _released(tmp_path / "h5")
    out = tmp_path / "out"
    (out / ".import-h5.tmp-999999999" / "vgg19").mkdir(parents=True)  # no such process
    import_h5(tmp_path / "h5", _index(), out)
    assert sorted(p.name for p in out.iterdir()) == ["vgg19", "vggish"]


def test_import_rows_are_annotation_rows_when_index_has_gaps(tmp_path):
    # the index lost sample 2 (a malformed Annotations row); h5 row r is still sample r
    arrays = _released(tmp_path / "h5")
    idx = _index().drop(index=2)
    idx.attrs["n_rows"] = 6
    res = import_h5(tmp_path / "h5", idx, tmp_path / "out")
    got = open_features(res["audio"], video_ids=["vD", "vE"]).features.compute()
    np.testing.assert_array_equal(got, arrays["audio"][[4, 5]].astype(np.float32))
    idx.attrs["n_rows"] = 7  # Annotations.txt has a trailing row the h5 lacks
    with pytest.raises(H5ImportError, match="6 rows but the index's Annotations.txt has 7 rows"):
        import_h5(tmp_path / "h5", idx, tmp_path / "out2")


# --------------------------------------------------------------------------- background videos
def test_noisy_videos_imported_and_read_back(tmp_path):
    arrays = _released(tmp_path / "h5", noisy=4)
    out = tmp_path / "out"
    res = import_h5(tmp_path / "h5", _index(), out)
    assert res["noisy"] == out / "noisy"
    assert sorted(p.name for p in out.iterdir()) == ["noisy", "vgg19", "vggish"]
    # the main stores do not see the background videos
    assert sorted(open_features(out / "vgg19").video_ids) == ["vA", "vB", "vC", "vD", "vE"]
    got = load_noisy(out)
    visual, audio, labels, ids = got
    assert ids.tolist() == ["noisy_000", "noisy_001", "noisy_002", "noisy_003"]
    np.testing.assert_array_equal(visual.features.compute(), arrays["nv"].astype(np.float32))
    np.testing.assert_array_equal(audio.features.compute(), arrays["na"].astype(np.float32))
    np.testing.assert_array_equal(labels, arrays["nl"])
    assert labels.dtype == np.float32 and labels.shape == (4, 29) and (labels[:, 28] == 1).all()
    prov = visual.attrs["provenance"]
    assert prov["source"] == "released_h5_noisy" and prov["background_only"] is True
    assert prov["weights"]["sha256"] == sha256_file(tmp_path / "h5" / "visual_feature_noisy.h5")
    assert load_noisy(out, visual_name="vgg19", audio_name="vggish") is not None
    with pytest.raises(ValueError, match="imported beside visual store 'vgg19', not 'resnet50'"):
        load_noisy(out, visual_name="resnet50")
    # an import without them removes the old set (it belongs to other features)
    for f in ("visual_feature_noisy.h5", "audio_feature_noisy.h5", "labels_noisy.h5"):
        (tmp_path / "h5" / f).unlink()
    res = import_h5(tmp_path / "h5", _index(), out)
    assert "noisy" not in res and load_noisy(out) is None and not (out / "noisy").exists()


def test_noisy_checks(tmp_path):
    arrays = _released(tmp_path / "h5", noisy=3)
    (tmp_path / "h5" / "visual_feature_noisy.h5").unlink()
    with pytest.raises(H5ImportError, match="not visual_feature_noisy.h5"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out")
    res = import_h5(tmp_path / "h5", _index(), tmp_path / "out", noisy=False)
    assert "noisy" not in res and load_noisy(tmp_path / "out") is None
    # rows must agree with labels_noisy.h5, steps with the main visual file, values finite
    _h5(tmp_path / "h5" / "visual_feature_noisy.h5", arrays["nv"][:2])
    with pytest.raises(H5ImportError, match="visual_feature_noisy.h5: key 'avadataset' has 2 rows but "
                                            "labels_noisy.h5 has 3 rows"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out2")
    _h5(tmp_path / "h5" / "visual_feature_noisy.h5", arrays["nv"].mean((2, 3)))  # pooled vs maps
    with pytest.raises(H5ImportError, match=r"visual_feature_noisy.h5: .*expected \(N, 10, 7, 7, 512\)"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out2")
    bad = arrays["na"].copy()
    bad[2, 4, 7] = np.nan
    _h5(tmp_path / "h5" / "visual_feature_noisy.h5", arrays["nv"])
    _h5(tmp_path / "h5" / "audio_feature_noisy.h5", bad)
    with pytest.raises(H5ImportError, match="audio_feature_noisy.h5: key 'avadataset' row 2: 1 NaN"):
        import_h5(tmp_path / "h5", _index(), tmp_path / "out2")
    assert _left(tmp_path / "out2") == []
