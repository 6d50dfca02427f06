"""Feature store: roundtrip, laziness, reindexing, ragged lengths, atomicity, inspect."""
from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pytest
import zarr

from avepipe import store
from avepipe.store import FeatureShardWriter, format_inspect, inspect_store, open_features, write_feature_shard


def _maps(n, T=10, shape=(7, 7, 8), seed=0):
    return np.random.default_rng(seed).standard_normal((n, T, *shape)).astype(np.float32)


def test_roundtrip_float16_default_and_provenance(tmp_path):
    x = _maps(3)
    out = write_feature_shard(tmp_path / "shard-000.zarr", ["a", "b", "c"], x, provenance={"encoder": "vgg19"})
    fs = open_features(out)
    assert isinstance(fs.features, da.Array)  # lazy
    assert fs.features.dtype == np.float16 and fs.features.shape == x.shape
    np.testing.assert_array_equal(fs.features.compute(), x.astype(np.float16))
    assert list(fs.video_ids) == ["a", "b", "c"]
    assert (fs.lengths == 10).all() and (fs.status == "ok").all()
    np.testing.assert_array_equal(fs.timestamps[0], np.arange(10.0))
    assert fs.attrs["provenance"]["encoder"] == "vgg19"
    g = zarr.open_group(str(out), mode="r")
    assert g["features"].chunks == (3, 10, 7, 7, 8)  # whole videos per chunk (all 3 fit 8 MiB)
    assert g.attrs["provenance"] == {"encoder": "vgg19"}


def test_float32_option_exact(tmp_path):
    x = _maps(2, shape=(128,))
    out = write_feature_shard(tmp_path / "s.zarr", ["a", "b"], x, dtype="float32")
    np.testing.assert_array_equal(open_features(out).features.compute(), x)


def test_small_rows_grouped_into_few_chunks(tmp_path):
    # 10x128 float32 = 5 kB per video: all 300 videos fit one ~8 MiB chunk (one file).
    x = _maps(300, shape=(128,))
    out = write_feature_shard(tmp_path / "s.zarr", [f"v{i:03d}" for i in range(300)], x, dtype="float32")
    arr = zarr.open_group(str(out), mode="r")["features"]
    assert arr.chunks == (300, 10, 128)
    files = [f for f in (out / "features").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(files) == 1
    np.testing.assert_array_equal(open_features(out).features.compute(), x)


def test_big_rows_chunked_by_byte_target(tmp_path, monkeypatch):
    # rows of 10x16 float32 = 640 B; a 2 kB target gives 3 videos per chunk, 7 videos -> 3 chunks
    import avepipe.store as store

    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 2048)
    x = _maps(7, shape=(16,))
    ids = [f"v{i}" for i in range(7)]
    with FeatureShardWriter(tmp_path / "s.zarr", ids, 10, (16,), "float32") as w:
        for i in [6, 0, 3, 1, 5, 2, 4]:  # out of order: chunks flush once complete
            w.write(i, x[i], np.arange(10) * 1.0)
        w.commit()
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]
    assert arr.chunks == (3, 10, 16)
    assert arr.nchunks_initialized == 3
    np.testing.assert_array_equal(open_features(tmp_path / "s.zarr").features.compute(), x)


def test_writer_out_of_order_rows(tmp_path):
    x = _maps(5, shape=(16,))
    ids = [f"v{i}" for i in range(5)]
    with FeatureShardWriter(tmp_path / "s.zarr", ids, 10, (16,), "float32") as w:
        for i in [3, 0, 4, 1, 2]:
            w.write(i, x[i], np.arange(10) * 1.0)
        w.commit()
    np.testing.assert_array_equal(open_features(tmp_path / "s.zarr").features.compute(), x)


def test_ragged_lengths_and_directory_concat(tmp_path):
    rng = np.random.default_rng(1)
    rows0 = [rng.standard_normal((L, 4)).astype(np.float32) for L in (3, 7)]
    rows1 = [rng.standard_normal((L, 4)).astype(np.float32) for L in (12,)]
    ts0 = [np.arange(3) * 0.32, np.arange(7) * 0.32]
    write_feature_shard(tmp_path / "shard-000.zarr", ["a", "b"], rows0, timestamps=ts0, dtype="float32")
    write_feature_shard(tmp_path / "shard-001.zarr", ["c"], rows1, dtype="float32")
    fs = open_features(tmp_path)
    assert fs.features.shape == (3, 12, 4)  # padded to the largest T over shards
    assert list(fs.lengths) == [3, 7, 12]
    got = fs.features.compute()
    for i, r in enumerate(rows0 + rows1):
        np.testing.assert_array_equal(got[i, : len(r)], r)
        assert (got[i, len(r):] == 0).all()
    np.testing.assert_allclose(fs.timestamps[1, :7], np.arange(7) * 0.32)
    assert np.isnan(fs.timestamps[0, 3:]).all()


def test_reindex_with_duplicates_and_unknown(tmp_path):
    x = _maps(3, shape=(4,))
    write_feature_shard(tmp_path / "shard-000.zarr", ["a", "b"], x[:2], dtype="float32")
    write_feature_shard(tmp_path / "shard-001.zarr", ["c"], x[2:], dtype="float32")
    fs = open_features(tmp_path, video_ids=["c", "a", "c", "b"])
    assert list(fs.video_ids) == ["c", "a", "c", "b"]
    np.testing.assert_array_equal(fs.features.compute(), x[[2, 0, 2, 1]])
    with pytest.raises(KeyError, match="zzz"):
        open_features(tmp_path, video_ids=["a", "zzz"])


def test_failed_rows_and_inspect(tmp_path):
    x = _maps(2, shape=(3, 3, 4))
    out = write_feature_shard(
        tmp_path / "shard-000.zarr", ["ok1", "bad"], x, lengths=[10, 0],
        status=["ok", "failed"], reason=["", "no video stream"],
        provenance={"encoder": "vgg19", "weights": {"id": "random", "sha256": "abc"}, "frames_per_segment": 16},
    )
    fs = open_features(out)
    assert list(fs.status) == ["ok", "failed"] and fs.reason[1] == "no video stream"
    assert (fs.features[1].compute() == 0).all()
    info = inspect_store(tmp_path)
    json.dumps(info)  # --json must work
    assert info["shape"] == [2, 10, 3, 3, 4] and info["dtype"] == "float16"
    assert info["chunks"] == [2, 10, 3, 3, 4]
    assert info["failed"] == [{"video_id": "bad", "reason": "no video stream"}]
    text = format_inspect(info)
    assert "bad: no video stream" in text and "vgg19" in text and "float16" in text


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "shard-000.zarr"
    with pytest.raises(ValueError):
        # second row has the wrong step shape -> error mid-write
        write_feature_shard(out, ["a", "b"], [np.zeros((10, 4)), np.zeros((10, 5))])
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_old_shard(tmp_path):
    out = tmp_path / "s.zarr"
    write_feature_shard(out, ["a"], np.zeros((1, 10, 4)), dtype="float32")
    write_feature_shard(out, ["b"], np.ones((1, 10, 4)), dtype="float32")
    fs = open_features(out)
    assert list(fs.video_ids) == ["b"] and float(fs.features.sum().compute()) == 40.0
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_xarray_view(tmp_path):
    x = _maps(2, shape=(4,))
    write_feature_shard(tmp_path / "s.zarr", ["a", "b"], x, dtype="float32")
    ds = open_features(tmp_path / "s.zarr", xarray=True)
    assert ds["features"].dims[:2] == ("video", "step")
    np.testing.assert_array_equal(ds["features"].sel(video=1).values, x[1])
    assert list(ds["video_id"].values) == ["a", "b"]


def test_missing_store_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature shard"):
        store.open_features(tmp_path / "nope")


@pytest.mark.parametrize("compression", ["zstd", "blosc-lz4"])
def test_compression_options_roundtrip(tmp_path, compression):
    x = np.maximum(_maps(3, shape=(4, 4, 8)), 0)  # ReLU-like maps compress
    out = write_feature_shard(tmp_path / "s.zarr", ["a", "b", "c"], x, compression=compression)
    np.testing.assert_array_equal(open_features(out).features.compute(), x.astype(np.float16))
    assert inspect_store(out)["compressors"]
    with pytest.raises(ValueError, match="compression"):
        write_feature_shard(tmp_path / "t.zarr", ["a"], x[:1], compression="gzip9")


def test_default_uncompressed_and_read_blocks_span_videos(tmp_path):
    x = _maps(40, shape=(4,))
    out = write_feature_shard(tmp_path / "s.zarr", [f"v{i}" for i in range(40)], x)
    assert inspect_store(out)["compressors"] == []
    fs = open_features(out)
    assert fs.features.chunks[0][0] == 40  # one dask task for this small store
