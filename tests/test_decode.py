"""Decode stage: bad input is marked failed and the run goes on; odd input decodes ok."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import media_cases as mc
from avepipe import decode, media
from avepipe.decode_report import decode_report

RATES = [16000, 32000]
FPS = 8.0


def _rows(paths: dict[str, Path], duration: float | dict = 10.0) -> pd.DataFrame:
    ids = list(paths)
    dur = [duration[v] if isinstance(duration, dict) else duration for v in ids]
    return pd.DataFrame({
        "sample": np.arange(len(ids), dtype=np.int64), "video_id": ids,
        "split": "test", "path": [str(paths[v]) for v in ids],
        "exists": [paths[v].is_file() for v in ids], "shard": np.int64(0),
        "duration": np.asarray(dur, dtype=np.float64)})


@pytest.fixture(scope="module")
def ave_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("ave")
    vfr_times = np.cumsum(np.r_[0.0, np.random.default_rng(1).uniform(0.05, 0.3, 60)])
    vfr_times = vfr_times[vfr_times < 10.0]
    paths = {
        "ok": mc.av_clip(d / "ok.mp4", 10.0, channels=2),
        "short7": mc.av_clip(d / "short7.mp4", 7.0),
        "long12": mc.av_clip(d / "long12.mp4", 12.0),
        "silent": mc.av_clip(d / "silent.mp4", 10.0, silent=True),
        "mono8k": mc.av_clip(d / "mono8k.mp4", 10.0, rate=8000, channels=1),
        "surround48k": mc.av_clip(d / "surround48k.mp4", 10.0, rate=48000, channels=6),
        "odd444": mc.av_clip(d / "odd444.mp4", 10.0, rate=8000, size=(233, 317), pix_fmt="yuv444p"),
        "portrait": mc.av_clip(d / "portrait.mp4", 10.0, rate=8000, size=(640, 360)),
        "vfr": mc.vfr(d / "vfr.mp4", vfr_times, 10.0),
        "random": mc.random_bytes(d / "random.mp4"),
        "truncated": mc.truncated(d / "truncated.mp4"),
        "truncfs": mc.truncated_faststart(d / "truncfs.mp4"),
        "noaudio": mc.no_audio(d / "noaudio.mp4"),
        "novideo": mc.no_video(d / "novideo.mp4"),
        "missing": d / "missing.mp4",
    }
    rows = _rows(paths)
    # AVE: a video annotated twice is two samples but one decoded entry
    rows = pd.concat([rows, rows[rows.video_id == "ok"].assign(sample=len(rows))], ignore_index=True)
    out = d / "decoded" / "shard-000.zarr"
    stale = out.with_name(out.name + ".tmp-999999999")  # a dead run's leftovers
    (stale / "frames").mkdir(parents=True)
    (stale / "frames" / "junk").write_bytes(b"not zarr")
    table = decode.decode_shard(rows, out, n_segments=10, audio_rates=RATES, progress=False)
    return {"rows": rows, "out": out, "table": table.set_index("video_id"), "paths": paths,
            "vfr_times": vfr_times, "stale": stale}


def _entry(shard, vid):
    root = zarr.open_group(str(shard["out"]), mode="r")
    i = [str(v) for v in root["video_id"][:]].index(vid)
    return root, i


@pytest.mark.parametrize("vid,reason", [
    ("random", "unreadable container"), ("truncated", "unreadable container"),
    ("truncfs", "truncated or corrupt"), ("noaudio", "no audio stream"),
    ("novideo", "no video stream"), ("missing", "file missing")])
def test_bad_input_failed_with_reason(ave_shard, vid, reason):
    row = ave_shard["table"].loc[vid]
    assert row["status"] == "failed" and reason in row["reason"]
    root, i = _entry(ave_shard, vid)
    assert root["status"][i] == "failed" and reason in str(root["reason"][i])
    assert root["n_segments"][i] == 0 and not root["audio_16000"][i].any()


@pytest.mark.parametrize("vid,warning", [
    ("ok", None), ("mono8k", None), ("surround48k", None), ("odd444", None), ("portrait", None),
    ("vfr", None), ("silent", "audio is silent"), ("short7", "zero-padded"), ("long12", "trimmed")])
def test_odd_input_decoded_ok(ave_shard, vid, warning):
    row = ave_shard["table"].loc[vid]
    assert row["status"] == "ok" and row["reason"] == "" and row["n_segments"] == 10
    if warning is None:
        assert row["warnings"] == ""
    else:
        assert warning in row["warnings"]
    root, i = _entry(ave_shard, vid)
    for rate in RATES:
        a = root[f"audio_{rate}"][i]
        assert a.shape == (10 * rate,)
        if vid != "silent":
            assert np.abs(a[: rate]).max() > 0.2  # the 0.5-amplitude sine is there


def test_store_layout_matches_contract(ave_shard):
    root = zarr.open_group(str(ave_shard["out"]), mode="r")
    ids = [str(v) for v in root["video_id"][:]]
    assert ids == sorted(set(ave_shard["rows"]["video_id"]))  # unique, sorted
    n = len(ids)
    assert root["frames"].shape == (n, 10, 1, 224, 224, 3) and root["frames"].dtype == np.uint8
    assert root["frames"].chunks[0] == 1
    for rate in RATES:
        assert root[f"audio_{rate}"].shape == (n, 10 * rate)
        assert root[f"audio_{rate}"].dtype == np.float32 and root[f"audio_{rate}"].chunks == (1, 10 * rate)
    assert root["n_segments"].dtype == np.int32
    for name in ("status", "reason", "warnings"):
        assert root[name].shape == (n,)
    probe = root.attrs["probe"]
    assert probe["portrait"]["width"] == 360 and probe["portrait"]["height"] == 640
    assert probe["odd444"]["pix_fmt"] == "yuv444p" and probe["surround48k"]["audio_channels"] == 6
    assert root.attrs["resampler"]["name"] == "soxr"
    prov = root.attrs["provenance"]
    assert prov["stage"] == "decode" and prov["config"]["audio_rates"] == RATES


def test_stale_tmp_removed_and_no_tmp_left(ave_shard):
    out = ave_shard["out"]
    assert not ave_shard["stale"].exists()
    assert list(out.parent.glob(out.name + ".tmp-*")) == []


def test_frames_sampled_inside_their_second(ave_shard):
    root, i = _entry(ave_shard, "ok")
    idx = np.array([mc.frame_index(f) for f in root["frames"][i][:, 0]])
    # one frame per second, at a random time inside second k: index in [8k, 8k+8)
    assert ((idx >= np.arange(10) * FPS) & (idx < (np.arange(10) + 1) * FPS)).all()


def test_vfr_frames_by_presentation_time(ave_shard):
    root, i = _entry(ave_shard, "vfr")
    idx = np.array([mc.frame_index(f) for f in root["frames"][i][:, 0]])
    ft = ave_shard["vfr_times"]
    # the shown frame's time lies in its second, or it was shown since before that second
    shown = ft[idx]
    nxt = np.r_[ft, np.inf][idx + 1]
    k = np.arange(10)
    assert (shown < k + 1).all() and (nxt > k).all()


def test_short_video_padded_and_last_frame_repeated(ave_shard):
    root, i = _entry(ave_shard, "short7")
    a = root["audio_16000"][i]
    assert np.abs(a[6 * 16000: 7 * 16000 - 800]).max() > 0.2  # the sine runs to 7 s
    assert not a[7 * 16000 + 800:].any()  # zero-padded after 7 s
    idx = [mc.frame_index(f) for f in root["frames"][i][:, 0]]
    assert idx[7:] == [55, 55, 55]  # 56 frames at 8 fps: the last one repeats


def test_long_video_trimmed(ave_shard):
    root, i = _entry(ave_shard, "long12")
    idx = [mc.frame_index(f) for f in root["frames"][i][:, 0]]
    assert max(idx) < 80  # nothing from seconds 10-12


def test_audio_of_8k_mono_and_51_resampled(ave_shard):
    for vid in ("mono8k", "surround48k"):
        root, i = _entry(ave_shard, vid)
        a = root["audio_32000"][i][32000:64000]
        spec = np.abs(np.fft.rfft(a * np.hanning(len(a))))
        assert np.argmax(spec) * 32000 / len(a) == pytest.approx(440.0, abs=2.0)


def test_manifest_and_report(ave_shard, tmp_path):
    rows = ave_shard["rows"]
    extra = pd.DataFrame([{"sample": 99, "video_id": "never_decoded", "split": "train",
                           "path": "/nowhere/never_decoded.mp4", "exists": False, "shard": 1,
                           "duration": 10.0}])
    index = pd.concat([rows, extra], ignore_index=True)
    m = decode.collect_manifest(index, [ave_shard["out"]])
    assert len(m) == len(index) and (m["sample"].to_numpy() == index["sample"].to_numpy()).all()
    assert (m.loc[m.video_id == "ok", "status"] == "ok").all() and (m.video_id == "ok").sum() == 2
    never = m[m.video_id == "never_decoded"].iloc[0]
    assert never["status"] == "failed" and never["reason"] == "file missing"
    port = m[m.video_id == "portrait"].iloc[0]
    assert (port["width"], port["height"], port["audio_rate"]) == (360, 640, 8000)
    assert port["probe_duration"] == pytest.approx(10.0, abs=0.05)
    for col in ("status", "reason", "warnings", "probe_duration", "fps", "width", "height",
                "audio_rate", "audio_channels"):
        assert col in m

    summary = decode_report(m, tmp_path)
    js = json.loads((tmp_path / "decode_report.json").read_text())
    n_videos = m.video_id.nunique()
    n_failed = m.drop_duplicates("video_id").eval("status != 'ok'").sum()
    assert js == summary and js["videos"]["total"] == n_videos and js["videos"]["failed"] == n_failed == 7
    assert js["samples"]["total"] == len(m)
    md = (tmp_path / "decode_report.md").read_text()
    assert "no audio stream" in md and "random" in md and "zero-padded" in md
    assert (tmp_path / "decode_report.png").read_bytes()[:4] == b"\x89PNG"


def test_whole_seconds_of_annotation_for_unav(tmp_path):
    paths = {"a": mc.av_clip(tmp_path / "a.mp4", 4.5), "b": mc.av_clip(tmp_path / "b.mp4", 2.3)}
    rows = _rows(paths, {"a": 4.5, "b": np.nan})  # b: no annotated duration -> probed
    out = tmp_path / "s.zarr"
    table = decode.decode_shard(rows, out, n_segments=None, audio_rates=[16000],
                                sample_frames_per_segment=2, progress=False).set_index("video_id")
    assert table.loc["a", "n_segments"] == 4 and table.loc["a", "warnings"] == ""
    assert table.loc["b", "n_segments"] == 2 and "probed" in table.loc["b", "warnings"]
    root = zarr.open_group(str(out), mode="r")
    assert root["frames"].shape == (2, 4, 2, 224, 224, 3)
    assert root["audio_16000"].shape == (2, 4 * 16000)
    assert not root["audio_16000"][1, 2 * 16000:].any() and not root["frames"][1, 2:].any()
    idx = np.array([[mc.frame_index(f) for f in seg] for seg in root["frames"][0]])
    # two frames per second, one in each half: [8k, 8k+4) and [8k+4, 8k+8)
    lo = np.arange(4)[:, None] * 8 + np.array([[0, 4]])
    assert ((idx >= lo) & (idx < lo + 4)).all()


def test_seeded_frame_times_are_reproducible(tmp_path):
    paths = {"a": mc.av_clip(tmp_path / "a.mp4", 3.0, fps=25)}
    rows = _rows(paths, 3.0)
    kw = dict(n_segments=3, audio_rates=[16000], sample_frames_per_segment=3, progress=False)
    decode.decode_shard(rows, tmp_path / "x.zarr", seed=0, **kw)
    decode.decode_shard(rows, tmp_path / "y.zarr", seed=0, **kw)
    decode.decode_shard(rows, tmp_path / "z.zarr", seed=5, **kw)
    f = {k: zarr.open_group(str(tmp_path / f"{k}.zarr"), mode="r")["frames"][0] for k in "xyz"}
    assert np.array_equal(f["x"], f["y"]) and not np.array_equal(f["x"], f["z"])


def test_on_error_fail_raises_naming_file_and_leaves_nothing(tmp_path):
    paths = {"good": mc.av_clip(tmp_path / "good.mp4", 2.0), "bad": mc.random_bytes(tmp_path / "bad.mp4")}
    out = tmp_path / "shard.zarr"
    with pytest.raises(media.MediaError, match="bad.mp4"):
        decode.decode_shard(_rows(paths, 2.0), out, n_segments=2, audio_rates=[16000],
                            on_error="fail", progress=False)
    assert not out.exists() and list(tmp_path.glob("shard.zarr.tmp-*")) == []


def test_on_error_fail_during_decode(tmp_path):
    paths = {"t": mc.truncated_faststart(tmp_path / "t.mp4")}  # probes fine, fails mid-decode
    out = tmp_path / "shard.zarr"
    with pytest.raises(media.MediaError, match="t.mp4"):
        decode.decode_shard(_rows(paths, 4.0), out, n_segments=4, audio_rates=[16000],
                            on_error="fail", progress=False)
    assert not out.exists() and list(tmp_path.glob("shard.zarr.tmp-*")) == []


def test_rerun_replaces_existing_store_and_keeps_live_tmp(tmp_path):
    paths = {"a": mc.av_clip(tmp_path / "a.mp4", 2.0)}
    out = tmp_path / "shard.zarr"
    out.mkdir()
    (out / "junk").write_text("old")
    live = out.with_name(out.name + f".tmp-{os.getppid()}")  # a running process's tmp dir
    live.mkdir()
    decode.decode_shard(_rows(paths, 2.0), out, n_segments=2, audio_rates=[16000], progress=False)
    assert not (out / "junk").exists() and zarr.open_group(str(out), mode="r")["status"][0] == "ok"
    assert live.exists()


def test_no_frame_sample_still_decodes(tmp_path):
    """k = 0 (runs without fine-tuning, e.g. UnAV-100): audio only is stored, videos stay ok."""
    import numpy as np
    import pandas as pd
    import zarr

    from avepipe.datasets.writer import write_mp4
    from avepipe.decode import decode_shard

    t = np.arange(3 * 16000) / 16000
    path = write_mp4(tmp_path / "v.mp4", np.full((36, 64, 64, 3), 90, np.uint8), 12,
                     (0.3 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32), 16000)
    rows = pd.DataFrame({"sample": [0], "video_id": ["v"], "split": ["train"], "path": [str(path)],
                         "exists": [True], "shard": [0], "duration": [3.0]})
    status = decode_shard(rows, tmp_path / "s.zarr", n_segments=None, audio_rates=[16000],
                          sample_frames_per_segment=0, progress=False)
    assert status["status"].tolist() == ["ok"], status["reason"].tolist()
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g["frames"].shape[2] == 0 and g["n_segments"][0] == 3


def test_parallel_videos_write_the_same_store(ave_shard, tmp_path):
    """threads=3: three videos decode at once (one FFmpeg thread each), rows still land in
    video order: every array and the status table equal the one-at-a-time store's (a file
    cut short fails either way; FFmpeg's single-threaded decoder notices it while decoding,
    its frame threads only at the end: the reasons' wording differs)."""
    out = tmp_path / "par.zarr"
    table = decode.decode_shard(ave_shard["rows"], out, n_segments=10, audio_rates=RATES, progress=False, threads=3)
    table, want = table.set_index("video_id"), ave_shard["table"]
    assert table.loc["truncfs", "status"] == "failed" and "truncated or corrupt" in table.loc["truncfs", "reason"]
    pd.testing.assert_frame_equal(table.drop(index="truncfs"), want.drop(index="truncfs"))
    a, b = zarr.open_group(str(ave_shard["out"]), mode="r"), zarr.open_group(str(out), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for k in a.array_keys():
        if k != "reason":
            np.testing.assert_array_equal(a[k][...], b[k][...], err_msg=k)


def test_parallel_on_error_fail_raises_and_leaves_nothing(tmp_path):
    paths = {f"g{i}": mc.av_clip(tmp_path / f"g{i}.mp4", 2.0) for i in range(3)}
    paths["t"] = mc.truncated_faststart(tmp_path / "t.mp4")  # probes fine, fails mid-decode
    out = tmp_path / "shard.zarr"
    with pytest.raises(media.MediaError, match="t.mp4"):
        decode.decode_shard(_rows(paths, 2.0), out, n_segments=2, audio_rates=[16000], on_error="fail",
                            progress=False, threads=2)
    assert not out.exists() and list(tmp_path.glob("shard.zarr.tmp-*")) == []


def test_progress_lines_in_a_log(tmp_path, caplog):
    """Not a terminal (a Snakemake job's log): rate-limited progress lines with rate and ETA."""
    import logging

    paths = {f"g{i}": mc.av_clip(tmp_path / f"g{i}.mp4", 1.0) for i in range(2)}
    with caplog.at_level(logging.INFO):
        decode.decode_shard(_rows(paths, 1.0), tmp_path / "s.zarr", n_segments=1, audio_rates=[16000])
    lines = [r.getMessage() for r in caplog.records if "decode s.zarr" in r.getMessage()]
    assert lines and lines[-1].startswith("decode s.zarr: 2/2 (100%)"), lines
