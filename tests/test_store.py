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


# --------------------------------------------------------------------------- integrity, fast reads, xarray
def _chunk_files(shard, array):
    return sorted(p for p in (shard / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def test_every_chunk_written_and_checksummed(tmp_path, monkeypatch):
    # rows of 10x4 float32 = 160 B; a 320 B target gives 2 videos per chunk
    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 320)
    ids = [f"v{i}" for i in range(5)]
    with FeatureShardWriter(tmp_path / "s.zarr", ids, 10, (4,), "float32") as w:
        w.write(0, np.ones((10, 4)))
        w.write(4, np.ones((10, 4)))
        # rows 1-3 never given: chunk 1 (rows 2-3) is all zeros and must still be written
        out = w.commit()
    g = zarr.open_group(str(out), mode="r")
    assert [p.relative_to(out / "features").as_posix() for p in _chunk_files(out, "features")] == [
        "c/0/0/0", "c/1/0/0", "c/2/0/0"]
    for name in ("lengths", "status", "reason", "video_id", "timestamps"):
        assert len(_chunk_files(out, name)) == 1, name  # lengths all zero but row 0/4 -> written anyway
    for name, arr in g.arrays():
        assert type(arr.metadata.codecs[-1]).__name__ == "Crc32cCodec", name
    fs = open_features(out)
    assert list(fs.status) == ["ok", "failed", "failed", "failed", "ok"]
    assert list(fs.reason[1:4]) == ["not written"] * 3
    np.testing.assert_array_equal(fs.read()[1:4], 0)


def test_all_zero_store_still_has_every_chunk(tmp_path):
    # zarr skips chunks equal to the fill value unless told otherwise: a store of failed
    # videos (zeros, lengths 0) must still have all its chunk files
    out = write_feature_shard(tmp_path / "s.zarr", ["a", "b"], np.zeros((2, 10, 4)), lengths=[0, 0],
                              status=["failed", "failed"], dtype="float32")
    for name in ("features", "lengths"):
        assert len(_chunk_files(out, name)) == 1, name


def test_dimension_names_and_xarray_open_zarr(tmp_path):
    import warnings

    import xarray as xr

    x = _maps(3, shape=(2, 2, 4))
    x[1] = 0
    write_feature_shard(tmp_path / "shard-000.zarr", ["a", "b", "c"], x, lengths=[10, 0, 10])
    write_feature_shard(tmp_path / "shard-001.zarr", ["d"], _maps(1, shape=(2, 2, 4), seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: no fallback warning
        ds = xr.open_zarr(tmp_path / "shard-000.zarr")
    assert ds["features"].dims == ("video", "step", "height", "width", "channel")
    assert ds["timestamps"].dims == ("video", "step") and ds["lengths"].dims == ("video",)
    assert "video_id" in ds.coords and list(ds["video_id"].values) == ["a", "b", "c"]
    np.testing.assert_array_equal(ds["features"].values, x.astype(np.float16))  # zeros stay zeros
    assert np.isnan(ds["timestamps"].values[1]).all()
    # vectors: (video, step, channel)
    write_feature_shard(tmp_path / "aud" / "s.zarr", ["a"], _maps(1, shape=(8,)), dtype="float32")
    assert xr.open_zarr(tmp_path / "aud" / "s.zarr")["features"].dims == ("video", "step", "channel")
    # the directory-level dataset of the README
    d = open_features(tmp_path, xarray=True)
    assert d["features"].dims == ("video", "step", "height", "width", "channel")
    assert list(d["video_id"].values) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(d["features"].values, open_features(tmp_path).features.compute())
    np.testing.assert_array_equal(d["features"].isel(video=[3, 0], step=slice(2, 5)).values,
                                  open_features(tmp_path).read([3, 0])[:, 2:5])


def _ragged_dir(tmp_path, monkeypatch):
    """Three shards: T = 10, 6, 10; the first in chunks of 3 videos."""
    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 3 * 10 * 2 * 3 * 2)  # 3 rows of (10,2,3) f16
    rng = np.random.default_rng(3)
    rows = {f"v{i:02d}": rng.standard_normal((10 if i < 7 or i > 10 else 6, 2, 3)).astype(np.float16)
            for i in range(12)}
    ids = list(rows)
    write_feature_shard(tmp_path / "shard-000.zarr", ids[:7], [rows[v] for v in ids[:7]])
    write_feature_shard(tmp_path / "shard-001.zarr", ids[7:11], [rows[v] for v in ids[7:11]])
    write_feature_shard(tmp_path / "shard-002.zarr", ids[11:], [rows[v] for v in ids[11:]])
    assert zarr.open_group(str(tmp_path / "shard-000.zarr"))["features"].chunks[0] == 3
    return rows


def _expected(rows, ids):
    out = np.zeros((len(ids), 10, 2, 3), np.float16)
    for k, v in enumerate(ids):
        out[k, : len(rows[v])] = rows[v]
    return out


@pytest.mark.parametrize("threads,direct", [(1, True), (4, True), (1, False), (4, False)])
def test_read_fast_path_equals_dask_path(tmp_path, monkeypatch, threads, direct):
    rows = _ragged_dir(tmp_path, monkeypatch)
    monkeypatch.setattr(store, "READ_THREADS", threads)
    # rows straight into place (visual maps) or whole chunks copied out (small audio rows)
    monkeypatch.setattr(store, "DIRECT_ROW_BYTES", 0 if direct else 1 << 30)
    # store order, then a permutation with duplicates (AVE samples share videos)
    wanted = ["v05", "v00", "v09", "v05", "v11", "v02", "v07", "v01", "v05"]
    for ids in (None, wanted):
        fs = open_features(tmp_path, video_ids=ids)
        exp = _expected(rows, list(fs.video_ids))
        fast, lazy = fs.read(), fs.features.compute()
        assert fast.dtype == lazy.dtype == np.float16 and fast.flags.c_contiguous
        np.testing.assert_array_equal(fast, lazy)
        np.testing.assert_array_equal(fast, exp)
        # subsets: ints (in any order), a bool mask, a slice
        for sel in ([4, 1, 1], fs.status == "ok", slice(1, None, 2), np.array([], int)):
            np.testing.assert_array_equal(fs.read(sel), lazy[sel])
    got = store.read_features(tmp_path, wanted)
    assert isinstance(got.features, np.ndarray) and list(got.video_ids) == wanted
    np.testing.assert_array_equal(got.features, _expected(rows, wanted))
    sub = store.read_features(tmp_path, wanted, rows=[8, 0])
    assert list(sub.video_ids) == ["v05", "v05"] and sub.features.shape == (2, 10, 2, 3)


def test_read_compressed_and_float32_stores(tmp_path):
    x = np.maximum(_maps(5, shape=(3, 3, 8)), 0)
    write_feature_shard(tmp_path / "z" / "shard-000.zarr", list("abcde"), x, compression="blosc-lz4")
    fs = open_features(tmp_path / "z", video_ids=list("ecae"))
    np.testing.assert_array_equal(fs.read(), x.astype(np.float16)[[4, 2, 0, 4]])
    a = _maps(4, shape=(128,))
    write_feature_shard(tmp_path / "a" / "shard-000.zarr", list("abcd"), a, dtype="float32")
    np.testing.assert_array_equal(open_features(tmp_path / "a").read([3, 0]), a[[3, 0]])


def test_writer_removes_stale_temporaries_only_of_dead_processes(tmp_path, caplog):
    import json as _json
    import logging
    import socket
    import subprocess
    import sys

    out = tmp_path / "shard-000.zarr"
    dead = out.with_name(out.name + ".tmp-999999999")       # a killed job's leftovers
    (dead / "features").mkdir(parents=True)
    old = out.with_name(out.name + ".old-999999998")         # killed between the two renames
    old.mkdir()
    own = out.with_name(out.name + f".tmp-{os.getpid()}")    # an earlier failed write of this process
    own.mkdir()
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out.with_name(out.name + f".tmp-{live_proc.pid}")
        live.mkdir()
        elsewhere = out.with_name(out.name + ".tmp-999999997")  # dead pid here, but another host's
        elsewhere.mkdir()
        (elsewhere / store.WRITER_MARK).write_text(_json.dumps({"host": socket.gethostname() + "-other",
                                                                "pid": 999999997}))
        unrelated = tmp_path / "shard-0001.zarr.tmp-1"          # another shard's temporary
        unrelated.mkdir()
        with caplog.at_level(logging.WARNING, logger="avepipe.store"):
            write_feature_shard(out, ["a"], np.zeros((1, 10, 4)), dtype="float32")
        assert not dead.exists() and not old.exists()
        assert live.exists() and elsewhere.exists() and unrelated.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["shard-000.zarr", live.name, elsewhere.name, unrelated.name])
        text = caplog.text
        assert f"removed stale temporary {dead}" in text and f"removed stale temporary {old}" in text
        assert f"leaving {live} alone" in text and f"on host {socket.gethostname()}-other" in text
        assert not (out / store.WRITER_MARK).exists()  # the mark never reaches the finished store
    finally:
        live_proc.kill()
        live_proc.wait()
