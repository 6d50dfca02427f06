"""index.parquet builder, shards, dataset stats (docs/contracts.md)."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avepipe.datasets.ave import DatasetError, write_annotations, write_order_h5
from avepipe.datasets.index import build_index, dataset_paths, dataset_stats, shard_of
from avepipe.datasets.unav100 import UNAV_CLASSES, write_unav100

REPO = Path(__file__).resolve().parents[2]
AVE_COLS = ["sample", "video_id", "split", "path", "exists", "shard", "duration",
            "category", "label", "quality", "start", "end"]


def real_ave() -> Path:
    p = Path(os.environ.get("AVEPIPE_SHARED", REPO.parent / "shared")) / "data" / "ave"
    if not (p / "Annotations.txt").exists():
        pytest.skip(f"real AVE annotations under {p} absent")
    return p


def test_shard_of_stable_and_spread():
    # independent reference: first 8 bytes of sha1 as a big-endian integer
    assert shard_of("RUhOCu3LNXM", 7) == int(hashlib.sha1(b"RUhOCu3LNXM").hexdigest()[:16], 16) % 7
    assert shard_of("abc", 1) == 0
    ids = [f"id{i:09d}" for i in range(4000)]
    counts = Counter(shard_of(v, 8) for v in ids)
    assert set(counts) == set(range(8)) and min(counts.values()) > 400
    with pytest.raises(ValueError):
        shard_of("abc", 0)


def test_dataset_paths(tmp_path):
    p = dataset_paths("ave", tmp_path)
    assert p["videos"] == tmp_path.resolve() / "AVE"
    assert p["annotations"] == tmp_path.resolve() / "Annotations.txt"
    assert p["order"]["val"] == tmp_path.resolve() / "val_order.h5"
    u = dataset_paths("unav100", tmp_path)
    assert u["videos"] == tmp_path.resolve() / "raw_videos"
    assert u["annotations"] == tmp_path.resolve() / "annotations" / "unav100_annotations.json"
    with pytest.raises(ValueError, match="unknown dataset format"):
        dataset_paths("kinetics", tmp_path)


def _tiny_ave(root: Path) -> None:
    rows = [("Bark", "aaaaaaaaaaa", 2, 5), ("Cat", "bbbbbbbbbbb", 0, 10), ("Bark", "aaaaaaaaaaa", 1, 3),
            ("Cat", "ccccccccccc", 4, 9), ("Nope", "ddddddddddd", 0, 1)]
    df = pd.DataFrame([dict(category=c, video_id=v, quality="good", start=s, end=e) for c, v, s, e in rows])
    write_annotations(root / "Annotations.txt", df)
    write_order_h5(root / "train_order.h5", [0, 1, 4])
    write_order_h5(root / "val_order.h5", [2])
    write_order_h5(root / "test_order.h5", [3])
    for vid in ("aaaaaaaaaaa", "bbbbbbbbbbb"):
        (root / "AVE").mkdir(exist_ok=True)
        (root / "AVE" / f"{vid}.mp4").write_bytes(b"\0")


def test_build_index_ave(tmp_path):
    _tiny_ave(tmp_path)
    df, problems = build_index("ave", tmp_path, n_shards=4)
    assert list(df.columns) == AVE_COLS
    assert df["sample"].tolist() == [0, 1, 2, 3]  # the bad row 4 is reported, not indexed
    assert df["split"].tolist() == ["train", "train", "val", "test"]
    assert df["exists"].tolist() == [True, True, True, False]
    assert df["label"].tolist() == [2, 22, 2, 22] and (df["duration"] == 10.0).all()
    assert all(Path(p).is_absolute() and p.endswith(f"AVE/{v}.mp4") for p, v in zip(df["path"], df["video_id"]))
    assert df["shard"].tolist() == [shard_of(v, 4) for v in df["video_id"]]
    assert df.dtypes["sample"] == np.int64 and df.dtypes["shard"] == np.int64 and df.dtypes["exists"] == bool
    kinds = sorted(p.reason.split(" ")[0] for p in problems)
    assert len(problems) == 2 and "unknown" in kinds
    missing = [p for p in problems if "missing" in p.reason]
    assert missing[0].video_id == "ccccccccccc" and "ccccccccccc.mp4" in missing[0].file
    with pytest.raises(DatasetError) as e:
        build_index("ave", tmp_path, n_shards=4, on_error="fail")
    assert "2 problem(s)" in str(e.value) and "ccccccccccc" in str(e.value) and "Nope" in str(e.value)
    # round trip through parquet keeps the contract dtypes
    df.to_parquet(tmp_path / "index.parquet")
    back = pd.read_parquet(tmp_path / "index.parquet")
    pd.testing.assert_frame_equal(back, df)

    stats = dataset_stats(df, problems)
    json.dumps(stats)
    assert stats["n_samples"] == 4 and stats["n_videos"] == 3
    assert stats["splits"] == {"test": 1, "train": 2, "val": 1}
    assert stats["per_class"]["Bark"] == 2 and stats["per_class"]["Cat"] == 2
    assert stats["duplicates"] == {"n_ids": 1, "n_rows": 2, "ids_in_several_splits": ["aaaaaaaaaaa"]}
    assert stats["problems"]["total"] == 2 and stats["missing_files"] == 1


def test_build_index_unav(tmp_path):
    ev = lambda t0, t1, lid: {"segment": [t0, t1], "label": UNAV_CLASSES[lid], "label_id": lid}  # noqa: E731
    write_unav100(tmp_path / "annotations" / "unav100_annotations.json", {
        "uuuuuuuuuuu": {"duration": 30.0, "subset": "val", "annotations": [ev(1, 5, 4), ev(3, 8, 9)]},
        "vvvvvvvvvvv": {"duration": 25.5, "subset": "train", "annotations": [ev(2, 31, 4)]},
    })
    (tmp_path / "raw_videos").mkdir()
    (tmp_path / "raw_videos" / "uuuuuuuuuuu.mp4").write_bytes(b"\0")
    df, problems = build_index("unav100", tmp_path, n_shards=3)
    assert list(df.columns) == ["sample", "video_id", "split", "path", "exists", "shard", "duration", "events"]
    assert df["split"].tolist() == ["val", "train"] and df["exists"].tolist() == [True, False]
    assert df["duration"].tolist() == [30.0, 25.5]
    assert sorted(p.severity for p in problems) == ["error", "warning"]  # missing file, clipped event
    with pytest.raises(DatasetError, match="1 problem"):
        build_index("unav100", tmp_path, n_shards=3, on_error="fail")
    stats = dataset_stats(df, problems)
    json.dumps(stats)
    assert stats["n_events"] == 3 and stats["videos_with_overlapping_events"] == 1
    assert stats["per_class"] == {UNAV_CLASSES[4]: 2, UNAV_CLASSES[9]: 1}


def test_build_index_real_ave():
    root = real_ave()
    df, problems = build_index("ave", root, n_shards=16)
    assert len(df) == 4143
    stats = dataset_stats(df, problems)
    json.dumps(stats)
    assert stats["splits"] == {"test": 402, "train": 3339, "val": 402}
    assert stats["n_videos"] == 4097 and stats["duplicates"]["n_ids"] == 45
    assert stats["zero_length_rows"] == [{"sample": 26, "video_id": "VWi2ENBuTbw"}]
    assert sum(stats["per_class"].values()) == 4143
    # duplicate ids share a shard; the real copy has no videos, each missing id is reported once
    assert (df.groupby("video_id")["shard"].nunique() == 1).all()
    assert stats["missing_files"] == int((~df["exists"]).sum())
    assert sum("missing" in p.reason for p in problems) == df.loc[~df["exists"], "video_id"].nunique()


# ---------------------------------------------------------------- bad rows never stop the index
def _ave_rows(root: Path, lines: list[str], splits: dict[str, list[int]]) -> Path:
    f = root / "Annotations.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, rows in splits.items():
        write_order_h5(root / f"{name}_order.h5", rows)
    return f


GOOD = ["Bark&aaaaaaaaaaa&good&2&5", "Cat&bbbbbbbbbbb&good&0&10", "Cat&ccccccccccc&good&4&9"]


def test_malformed_rows_in_no_split_reported_with_line_and_run_goes_on(tmp_path):
    # two junk rows appended after the rows the split files cover (what "8 Annotations rows
    # in no split" was): each is reported as file:line with its reason, the index is built
    lines = ["Category&VideoID&Quality&StartTime&EndTime", *GOOD, "Bark&ddddddddddd&good&3", "Nope&eeeeeeeeeee&good&1&2"]
    f = _ave_rows(tmp_path, lines, {"train": [0, 1], "val": [], "test": [2]})
    df, problems = build_index("ave", tmp_path, n_shards=2)
    assert df["sample"].tolist() == [0, 1, 2] and df["split"].tolist() == ["train", "train", "test"]
    rows = [(p.file, p.line, p.severity) for p in problems if p.line is not None]
    assert rows == [(str(f.resolve()), 5, "error"), (str(f.resolve()), 6, "error")]
    assert "5 '&'-separated fields" in problems[0].reason and "unknown class 'Nope'" in problems[1].reason
    assert "Annotations.txt:5" in str(problems[0])
    assert df.attrs["n_rows"] == 5  # rows of the released h5 files, malformed ones included
    # on_error: fail stops, the first problem first
    with pytest.raises(DatasetError) as e:
        build_index("ave", tmp_path, n_shards=2, on_error="fail")
    listing = str(e.value).splitlines()
    assert "Annotations.txt:5" in listing[1] and "Annotations.txt:6" in listing[2]


def test_well_formed_row_in_no_split_reported_and_left_out(tmp_path):
    f = _ave_rows(tmp_path, GOOD, {"train": [0], "val": [], "test": [2]})
    df, problems = build_index("ave", tmp_path, n_shards=2)
    assert df["video_id"].tolist() == ["aaaaaaaaaaa", "ccccccccccc"]
    p = [p for p in problems if p.line is not None]
    assert [(q.file, q.line, q.video_id) for q in p] == [(str(f.resolve()), 2, "bbbbbbbbbbb")]
    assert "in no split" in p[0].reason and "row 1" in p[0].reason


def test_text_split_row_not_in_annotations_reported(tmp_path):
    f = tmp_path / "Annotations.txt"
    f.write_text("\n".join(GOOD) + "\n")
    (tmp_path / "trainSet.txt").write_text(GOOD[0] + "\n" + GOOD[1] + "\n")
    (tmp_path / "valSet.txt").write_text("Bark&zzzzzzzzzzz&good&1&3\n")
    (tmp_path / "testSet.txt").write_text(GOOD[2] + "\n")
    df, problems = build_index("ave", tmp_path, n_shards=2)
    assert df["split"].tolist() == ["train", "train", "test"]
    p = [p for p in problems if p.line is not None]
    assert [(Path(q.file).name, q.line) for q in p] == [("valSet.txt", 1)]
    assert "not found in Annotations.txt" in p[0].reason


def test_duplicate_rows_warned_numbering_follows_split_files(tmp_path):
    lines = [GOOD[0], GOOD[1], GOOD[0], GOOD[2]]
    _ave_rows(tmp_path, lines, {"train": [0, 1], "val": [2], "test": [3]})
    df, problems = build_index("ave", tmp_path, n_shards=2)
    # both copies kept: sample k is still Annotations row k, as the *_order.h5 indices say
    assert df["sample"].tolist() == [0, 1, 2, 3] and df["split"].tolist() == ["train", "train", "val", "test"]
    w = [p for p in problems if p.severity == "warning"]
    assert [(q.line, q.video_id) for q in w] == [(3, "aaaaaaaaaaa")] and "duplicate of line 1" in w[0].reason
    (tmp_path / "AVE").mkdir()
    for v in ("aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"):
        (tmp_path / "AVE" / f"{v}.mp4").write_bytes(b"\0")
    df2, _ = build_index("ave", tmp_path, n_shards=2, on_error="fail")  # a warning never fails
    assert len(df2) == 4


def test_video_ids_cannot_leave_the_video_folder(tmp_path):
    outside = tmp_path / "x.mp4"
    outside.write_bytes(b"\0")  # what "../../x" would reach from <root>/a/AVE
    root = tmp_path / "a"
    root.mkdir()
    lines = [GOOD[0], "Bark&../../x&good&1&3", "Bark&/etc/passwd&good&1&3", GOOD[2]]
    _ave_rows(root, lines, {"train": [0, 1, 2], "val": [], "test": [3]})
    df, problems = build_index("ave", root, n_shards=2)
    assert df["video_id"].tolist() == ["aaaaaaaaaaa", "ccccccccccc"]
    videos = (root / "AVE").resolve()
    assert all(Path(p).parent == videos for p in df["path"])
    bad = [(p.line, "path separator" in p.reason) for p in problems if p.line is not None]
    assert bad == [(2, True), (3, True)]


def test_unav_bad_and_duplicate_ids(tmp_path):
    ev = {"segment": [1, 5], "label": UNAV_CLASSES[4], "label_id": 4}
    ann = tmp_path / "annotations" / "unav100_annotations.json"
    ann.parent.mkdir()
    ann.write_text('{"version": "unav100", "database": {'
                   '"../../x": {"duration": 30.0, "subset": "test", "annotations": []}, '
                   '"": {"duration": 30.0, "subset": "test", "annotations": []}, '
                   '"okokokokoko": {"duration": 30.0, "subset": "test", "annotations": []}, '
                   f'"okokokokoko": {{"duration": 20.0, "subset": "train", "annotations": [{json.dumps(ev)}]}}}}}}')
    df, problems = build_index("unav100", tmp_path, n_shards=2)
    assert df["video_id"].tolist() == ["okokokokoko"]
    # json.load keeps the last entry of a repeated key; so does the reference evaluation
    assert df["split"].tolist() == ["train"] and df["duration"].tolist() == [20.0]
    msgs = {(p.video_id, p.severity): p.reason for p in problems}
    assert "path separator" in msgs[("../../x", "error")] and "empty" in msgs[("", "error")]
    assert "listed 2 times" in msgs[("okokokokoko", "warning")]
