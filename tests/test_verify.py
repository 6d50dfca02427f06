"""avepipe.verify: damaged feature and decoded shards are found, named and refused.

Each kind of damage (a deleted chunk file, a truncated one, flipped bytes, unreadable
metadata, a wrong dtype) is made by hand on a store written by the pipeline's own
writers; verify must exit 1 with one line naming store, array and chunk, and the readers
must raise ``StoreDamagedError`` with the very same lines.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import media_cases as mc
from avepipe import decode, verify
from avepipe.store import open_features, write_feature_shard
from avepipe.verify import StoreDamagedError, run, verify_store


def _features(tmp_path: Path, monkeypatch) -> Path:
    """A feature dir of two shards, 3 chunks of 2 videos in the first (small chunk target)."""
    import avepipe.store as store

    monkeypatch.setattr(store, "CHUNK_TARGET_BYTES", 2 * 10 * 2 * 2 * 4 * 2)  # 2 rows of (10,2,2,4) f16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10, 2, 2, 4)).astype(np.float32)
    d = tmp_path / "features" / "vgg19"
    write_feature_shard(d / "shard-000.zarr", [f"v{i}" for i in range(5)], x[:5])
    write_feature_shard(d / "shard-001.zarr", ["v5"], x[5:])
    return d


def _chunk(shard: Path, array: str, *coords: int) -> Path:
    return shard / array / "c" / "/".join(map(str, coords))


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_feature_dir_exits_0(tmp_path, monkeypatch, capsys):
    d = _features(tmp_path, monkeypatch)
    assert verify_store(d) == []
    assert run([str(d)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok {d}:") and "2 store(s)" in out


def test_deleted_chunk_named_and_refused(tmp_path, monkeypatch, capsys):
    d = _features(tmp_path, monkeypatch)
    shard = d / "shard-000.zarr"
    f = _chunk(shard, "features", 1, 0, 0, 0, 0)
    f.unlink()
    problems = verify_store(d)
    assert [(p.store, p.array, p.chunk, p.kind) for p in problems] == [
        (str(shard), "features", (1, 0, 0, 0, 0), "missing")]
    assert run([str(d)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [str(problems[0])]
    assert str(shard) in lines[0] and "array features" in lines[0] and "chunk (1, 0, 0, 0, 0)" in lines[0]
    assert str(f) in lines[0]
    # the reader refuses the store with exactly verify's lines (not zeros)
    with pytest.raises(StoreDamagedError) as e:
        open_features(d)
    assert str(e.value) == "\n".join(lines)
    assert isinstance(e.value, Exception) and e.value.problems == problems


def test_truncated_chunk_names_path(tmp_path, monkeypatch, capsys):
    d = _features(tmp_path, monkeypatch)
    # (the cheap check at open sees the size; a file truncated after the open is caught by
    # the read itself: test_truncated_after_open)
    f = _chunk(d / "shard-000.zarr", "features", 2, 0, 0, 0, 0)
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:100])
    assert run([str(d)]) == 1
    line = capsys.readouterr().out.strip()
    assert "truncated" in line and f"100 of {size} bytes" in line and str(f) in line
    with pytest.raises(StoreDamagedError, match="truncated") as e:
        open_features(d).read()
    assert str(e.value) == line


@pytest.mark.parametrize("direct", [True, False])
def test_flipped_bytes_are_a_checksum_error(tmp_path, monkeypatch, capsys, direct):
    import avepipe.store as store

    monkeypatch.setattr(store, "DIRECT_ROW_BYTES", 0 if direct else 1 << 30)
    d = _features(tmp_path, monkeypatch)
    f = _chunk(d / "shard-000.zarr", "features", 0, 0, 0, 0, 0)
    _flip(f)
    assert run([str(d)]) == 1
    line = capsys.readouterr().out.strip()
    assert "checksum" in line and "chunk (0, 0, 0, 0, 0)" in line and str(f) in line
    fs = open_features(d)  # the cheap check at open cannot see it: sizes are right
    for read in (fs.read, lambda: fs.features.compute(), lambda: fs.read([1]),
                 lambda: open_features(d, xarray=True)["features"].values):
        with pytest.raises(StoreDamagedError) as e:
            read()
        assert str(e.value) == line
    # rows of intact chunks still read
    assert fs.read([2, 3, 5]).shape == (3, 10, 2, 2, 4)


@pytest.mark.parametrize("direct", [True, False])
def test_truncated_after_open(tmp_path, monkeypatch, direct):
    import avepipe.store as store

    monkeypatch.setattr(store, "DIRECT_ROW_BYTES", 0 if direct else 1 << 30)
    d = _features(tmp_path, monkeypatch)
    fs = open_features(d)
    f = _chunk(d / "shard-000.zarr", "features", 1, 0, 0, 0, 0)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(StoreDamagedError, match="truncated") as e:
        fs.read()
    assert str(f) in str(e.value) and "chunk (1, 0, 0, 0, 0)" in str(e.value)


@pytest.mark.parametrize("array", ["status", "lengths", "timestamps", "video_id"])
def test_damaged_small_array_refused_at_open(tmp_path, monkeypatch, array):
    d = _features(tmp_path, monkeypatch)
    shard = d / "shard-001.zarr"
    f = _chunk(shard, array, *([0] * (2 if array == "timestamps" else 1)))
    _flip(f, at=0)
    problems = verify_store(d)
    assert [(p.array, p.kind) for p in problems] == [(array, "checksum")]
    with pytest.raises(StoreDamagedError) as e:
        open_features(d)
    assert str(e.value) == str(problems[0])


def test_compressed_store_damage_named(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 10, 8)).astype(np.float32)
    out = write_feature_shard(tmp_path / "s.zarr", ["a", "b", "c"], x, compression="zstd", dtype="float32")
    f = _chunk(out, "features", 0, 0, 0)
    _flip(f)
    [p] = verify_store(out)
    assert (p.array, p.chunk, p.kind) == ("features", (0, 0, 0), "checksum")
    with pytest.raises(StoreDamagedError) as e:
        open_features(out).read()
    assert str(e.value) == str(p)


def test_unreadable_metadata_and_wrong_dtype(tmp_path, monkeypatch):
    d = _features(tmp_path, monkeypatch)
    (d / "shard-001.zarr" / "reason" / "zarr.json").write_text("{not json")
    kinds = {(p.store, p.array, p.kind) for p in verify_store(d)}
    assert (str(d / "shard-001.zarr"), "reason", "metadata") in kinds
    # a hand-made store with int64 lengths and a missing timestamps array
    g = zarr.open_group(str(tmp_path / "odd.zarr"), mode="w")
    g.create_array("features", data=np.zeros((2, 3, 4), np.float32))
    g.create_array("lengths", data=np.zeros(2, np.int64))
    for k in ("video_id", "status", "reason"):
        g.create_array(k, shape=(2,), dtype=str)[:] = np.array(["a", "b"])
    found = {(p.array, p.kind) for p in verify_store(tmp_path / "odd.zarr")}
    assert {("lengths", "dtype"), ("timestamps", "missing"), ("features", "no-checksum")} <= found


def test_json_output_and_not_a_store(tmp_path, monkeypatch, capsys):
    d = _features(tmp_path, monkeypatch)
    _chunk(d / "shard-001.zarr", "features", 0, 0, 0, 0, 0).unlink()
    assert run([str(d), str(tmp_path / "nothing")], as_json=True) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    first, second = doc["stores"]
    assert first["problems"][0]["array"] == "features" and first["problems"][0]["chunk"] == [0, 0, 0, 0, 0]
    assert second["problems"][0]["kind"] == "missing"


# --------------------------------------------------------------------------- decoded shards
@pytest.fixture()
def decoded(tmp_path) -> Path:
    paths = {"a": mc.av_clip(tmp_path / "a.mp4", 2.0), "b": mc.av_clip(tmp_path / "b.mp4", 2.0),
             "gone": tmp_path / "gone.mp4"}
    rows = pd.DataFrame({"video_id": list(paths), "path": [str(p) for p in paths.values()],
                         "exists": [p.is_file() for p in paths.values()], "duration": 2.0})
    out = tmp_path / "decoded" / "shard-000.zarr"
    decode.decode_shard(rows, out, n_segments=2, audio_rates=[16000], progress=False)
    return out


def test_decoded_shard_intact_with_a_failed_video(decoded, capsys):
    # the failed video's rows are written zeros: every chunk exists, verify is clean
    assert verify_store(decoded) == []
    assert run([str(decoded.parent)]) == 0
    g = zarr.open_group(str(decoded), mode="r")
    assert list(g["status"][:]) == ["ok", "ok", "failed"]
    assert _chunk(decoded, "frames", 2, 0, 0, 0, 0, 0).is_file() and _chunk(decoded, "audio_16000", 2, 0).is_file()
    for name in ("frames", "audio_16000", "n_segments", "status"):
        assert verify.has_checksum(g[name])


def test_decoded_shard_damage_named_and_refused(decoded, capsys):
    _chunk(decoded, "frames", 1, 0, 0, 0, 0, 0).unlink()
    _flip(_chunk(decoded, "audio_16000", 0, 0))
    assert run([str(decoded)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert any("array frames chunk (1, 0, 0, 0, 0, 0): missing" in x for x in lines)
    assert any("array audio_16000 chunk (0, 0): checksum" in x for x in lines)
    with pytest.raises(StoreDamagedError, match=r"frames chunk \(1, 0, 0, 0, 0, 0\)"):
        decode.open_decoded(decoded)
    g = decode.open_decoded(decoded, ["audio_16000"])  # present, but its bytes are wrong
    with pytest.raises(StoreDamagedError, match=r"audio_16000 chunk \(0, 0\): checksum"):
        verify.read_checked(decoded, g, "audio_16000", 0)
    decode.read_status(decoded)  # the status arrays themselves are intact


def test_decoded_status_damage_refused(decoded):
    _chunk(decoded, "n_segments", 0).unlink()
    with pytest.raises(StoreDamagedError, match="n_segments chunk"):
        decode.read_status(decoded)
