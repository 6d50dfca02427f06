"""AVE format: Annotations.txt, split files, label arrays (docs/reference.md §1)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from avepipe.datasets.ave import (
    DatasetError,
    read_annotations,
    read_splits,
    write_annotations,
    write_order_h5,
    write_split_txt,
)
from avepipe.datasets.labels import AVE_CLASSES, BACKGROUND, ave_label_arrays, event_mask, segment_labels, video_label

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """/work/shared (env AVEPIPE_SHARED overrides); skip when absent."""
    p = Path(os.environ.get("AVEPIPE_SHARED", REPO.parent / "shared"))
    if not p.is_dir():
        pytest.skip(f"shared data directory {p} absent")
    return p


def real_ave() -> Path:
    p = shared_dir() / "data" / "ave"
    if not (p / "Annotations.txt").exists():
        pytest.skip("real AVE annotations absent")
    return p


# ---------------------------------------------------------------- real files
def test_real_annotations():
    root = real_ave()
    df, problems = read_annotations(root / "Annotations.txt")
    assert problems == []
    assert len(df) == 4143
    assert df["sample"].tolist() == list(range(4143))
    # class order = first appearance of the Category field (computed here independently)
    first_seen = list(dict.fromkeys(line.split("&")[0] for line in
                                    (root / "Annotations.txt").read_text().splitlines() if line.strip()))
    assert first_seen == list(AVE_CLASSES) and len(AVE_CLASSES) == 28
    assert (df["label"] == df["category"].map(AVE_CLASSES.index)).all()
    counts = df["video_id"].value_counts()
    assert (counts > 1).sum() == 45 and set(counts[counts > 1]) <= {2, 3}
    zero = df[df["start"] == df["end"]]
    assert zero["video_id"].tolist() == ["VWi2ENBuTbw"]
    assert zero.iloc[0][["category", "start", "end"]].tolist() == ["Church bell", 0, 0]


def test_real_splits_and_labels():
    root = real_ave()
    df, _ = read_annotations(root / "Annotations.txt")
    split = read_splits(root, len(df))
    assert Counter(split) == {"train": 3339, "val": 402, "test": 402}
    df["split"] = split
    by_id = df.groupby("video_id")["split"].agg(set)
    assert sum({"train", "test"} <= s for s in by_id) == 8
    seg, mask, video = ave_label_arrays(df)
    assert seg.shape == (4143, 10, 29) and mask.shape == (4143, 10) and video.shape == (4143, 29)
    assert seg.dtype == mask.dtype == video.dtype == np.float32
    np.testing.assert_array_equal(seg.sum(-1), 1.0)
    assert (video[:, BACKGROUND] == 0).all() and (video.sum(1) == 1).all()
    z = int(np.flatnonzero((df["video_id"] == "VWi2ENBuTbw").to_numpy())[0])
    assert (seg[z, :, BACKGROUND] == 1).all() and mask[z].sum() == 0 and video[z, 0] == 1
    # every other video has >= 2 event seconds
    assert (np.delete(mask.sum(1), z) >= 2).all()


# ---------------------------------------------------------------- labels
def test_segment_labels_by_hand():
    y = segment_labels(label=5, start=2, end=5)
    expected = np.zeros((10, 29), np.float32)
    expected[[2, 3, 4], 5] = 1
    expected[[0, 1, 5, 6, 7, 8, 9], 28] = 1
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(event_mask(5, 2, 5), [0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    v = video_label(5, 2, 5)
    assert v.shape == (29,) and v[5] == 1 and v.sum() == 1
    with pytest.raises(ValueError):
        segment_labels(28, 0, 2)
    with pytest.raises(ValueError):
        segment_labels(3, 5, 4)


def test_label_arrays_match_rowwise():
    df = pd.DataFrame({"label": [0, 27, 3, 9], "start": [0, 3, 0, 4], "end": [10, 5, 0, 6]})
    seg, mask, video = ave_label_arrays(df)
    for i, r in df.iterrows():
        np.testing.assert_array_equal(seg[i], segment_labels(r.label, r.start, r.end))
        np.testing.assert_array_equal(mask[i], event_mask(r.label, r.start, r.end))
        np.testing.assert_array_equal(video[i], video_label(r.label, r.start, r.end))


# ---------------------------------------------------------------- parsing
ROWS = ["Church bell&aaaaaaaaaaa&good&0&10", "Bark&bbbbbbbbbbb&good&3&7", "Bark&aaaaaaaaaaa&good&2&4"]


def test_header_and_no_header_equal(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(ROWS) + "\n")
    b.write_text("Category&VideoID&Quality&StartTime&EndTime\r\n" + "\r\n".join(ROWS) + "\r\n\r\n")
    da, pa = read_annotations(a)
    db, pb = read_annotations(b)
    assert pa == pb == []
    pd.testing.assert_frame_equal(da, db)
    assert da["video_id"].tolist() == ["aaaaaaaaaaa", "bbbbbbbbbbb", "aaaaaaaaaaa"]  # duplicates kept
    assert da["label"].tolist() == [0, 2, 2] and da["start"].tolist() == [0, 3, 2]
    assert list(da.columns) == ["sample", "category", "video_id", "quality", "start", "end", "label"]


@pytest.mark.parametrize("row,reason", [
    ("Bark&ccccccccccc&good&3", "5 '&'-separated fields"),
    ("Bark&ccccccccccc&good&3&7&9", "5 '&'-separated fields"),
    ("Barking dog&ccccccccccc&good&3&7", "unknown class 'Barking dog'"),
    ("Bark&ccccccccccc&good&7&3", "EndTime 3 < StartTime 7"),
    ("Bark&ccccccccccc&good&x&3", "non-numeric"),
    ("Bark&ccccccccccc&good&2.5&3", "non-numeric or fractional"),
    ("Bark&ccccccccccc&good&3&11", "outside [0, 10]"),
    ("Bark&ccccccccccc&good&-1&3", "outside [0, 10]"),
])
def test_malformed_rows_reported(tmp_path, row, reason):
    f = tmp_path / "Annotations.txt"
    f.write_text("\n".join([ROWS[0], row, ROWS[1]]) + "\n")
    df, problems = read_annotations(f)
    assert len(problems) == 1
    p = problems[0]
    assert p.file == str(f) and p.line == 2 and reason in p.reason and p.row == row
    assert str(f) in str(p) and ":2" in str(p)
    # the bad row is left out but keeps its sample number, so split indices still line up
    assert df["sample"].tolist() == [0, 2] and df.attrs["n_rows"] == 3


def test_line_numbers_count_header(tmp_path):
    f = tmp_path / "Annotations.txt"
    f.write_text("Category&VideoID&Quality&StartTime&EndTime\n" + ROWS[0] + "\nNope&x&good&0&1\n")
    _, problems = read_annotations(f)
    assert [p.line for p in problems] == [3]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_annotations(tmp_path / "Annotations.txt")


# ---------------------------------------------------------------- splits
def _ave_root(tmp_path, rows=ROWS + ["Bark&bbbbbbbbbbb&good&3&7"]):
    df = pd.DataFrame([r.split("&") for r in rows], columns=["category", "video_id", "quality", "start", "end"])
    write_annotations(tmp_path / "Annotations.txt", df)
    return df


def test_text_splits_with_duplicate_rows(tmp_path):
    df = _ave_root(tmp_path)  # rows 1 and 3 are identical
    write_split_txt(tmp_path / "trainSet.txt", df.iloc[[0, 1]])
    write_split_txt(tmp_path / "valSet.txt", df.iloc[[2]])
    write_split_txt(tmp_path / "testSet.txt", df.iloc[[3]])
    assert read_splits(tmp_path).tolist() == ["train", "train", "val", "test"]


def test_text_split_errors(tmp_path):
    df = _ave_root(tmp_path)
    write_split_txt(tmp_path / "trainSet.txt", df.iloc[[0, 1, 3, 3]])  # three copies of a 2x row
    write_split_txt(tmp_path / "valSet.txt", df.iloc[[2]])
    write_split_txt(tmp_path / "testSet.txt", df.iloc[[]])
    with pytest.raises(DatasetError, match=r"trainSet.txt:4: .*more copies"):
        read_splits(tmp_path)
    write_split_txt(tmp_path / "trainSet.txt", df.iloc[[0]])
    # strict reader: names the uncovered rows as file:line (1-based), not 0-based row numbers
    with pytest.raises(DatasetError, match=r"2 Annotations rows in no split, e\.g\. .*Annotations.txt:2, "
                                           r".*Annotations.txt:4"):
        read_splits(tmp_path)
    (tmp_path / "testSet.txt").write_text("Bark&zzzzzzzzzzz&good&1&3\n")
    with pytest.raises(DatasetError, match="testSet.txt:1: .*not found in Annotations"):
        read_splits(tmp_path)


def test_order_h5_splits_and_errors(tmp_path):
    _ave_root(tmp_path)
    with pytest.raises(DatasetError, match="no split files"):
        read_splits(tmp_path)
    write_order_h5(tmp_path / "train_order.h5", [0, 3])
    with pytest.raises(DatasetError, match="incomplete"):
        read_splits(tmp_path)
    write_order_h5(tmp_path / "val_order.h5", [1])
    write_order_h5(tmp_path / "test_order.h5", [2])
    with h5py.File(tmp_path / "train_order.h5") as h:
        assert h["order"].dtype == np.int64
    assert read_splits(tmp_path, 4).tolist() == ["train", "val", "test", "train"]
    write_order_h5(tmp_path / "test_order.h5", [2, 1])
    with pytest.raises(DatasetError, match=r"test_order.h5: row 1 already in split 'val'"):
        read_splits(tmp_path, 4)
    write_order_h5(tmp_path / "test_order.h5", [2, 4])
    with pytest.raises(DatasetError, match=r"test_order.h5: row indices \[4\] outside"):
        read_splits(tmp_path, 4)
    write_order_h5(tmp_path / "test_order.h5", [])
    with pytest.raises(DatasetError, match=r"1 Annotations rows in no split"):
        read_splits(tmp_path, 4)


def test_write_annotations_round_trip(tmp_path):
    df = _ave_root(tmp_path)
    for header in (False, True):
        f = write_annotations(tmp_path / f"A{header}.txt", df, header=header)
        back, problems = read_annotations(f)
        # rows 1 and 3 of the fixture are identical: a warning, both kept
        assert [(p.severity, p.line) for p in problems] == [("warning", 4 + header)]
        assert back[["category", "video_id", "quality"]].values.tolist() == df[
            ["category", "video_id", "quality"]].values.tolist()
        assert back["start"].tolist() == df["start"].astype(int).tolist()
    assert (tmp_path / "AFalse.txt").read_text().splitlines()[0] == ROWS[0]


# ---------------------------------------------------------------- row problems
def test_exact_duplicate_rows_warned_and_kept(tmp_path):
    f = tmp_path / "Annotations.txt"
    f.write_text("\n".join([ROWS[0], ROWS[1], ROWS[2], "", ROWS[1], ROWS[1]]) + "\n")
    df, problems = read_annotations(f)
    # both copies stay samples 1, 3, 4: split files and released h5 rows count every row
    assert df["sample"].tolist() == [0, 1, 2, 3, 4]
    assert df["video_id"].tolist() == ["aaaaaaaaaaa", "bbbbbbbbbbb", "aaaaaaaaaaa", "bbbbbbbbbbb", "bbbbbbbbbbb"]
    assert [(p.severity, p.line) for p in problems] == [("warning", 5), ("warning", 6)]
    assert all("duplicate of line 2" in p.reason for p in problems)
    assert f"{f}:5" in str(problems[0])


@pytest.mark.parametrize("vid", ["../../x", "a/b", "/abs/path", "a\\b", "..", ".", "a\x00b", "a\tb"])
def test_video_id_must_be_plain_file_name(tmp_path, vid):
    f = tmp_path / "Annotations.txt"
    f.write_text("\n".join([ROWS[0], f"Bark&{vid}&good&3&7", ROWS[1]]) + "\n", encoding="utf-8")
    df, problems = read_annotations(f)
    assert df["sample"].tolist() == [0, 2] and vid not in df["video_id"].tolist()
    assert len(problems) == 1 and problems[0].line == 2 and problems[0].severity == "error"
    assert "video id" in problems[0].reason
    # the message is one line even for ids with control characters
    assert "\n" not in str(problems[0]) and "\x00" not in str(problems[0])


def test_line_numbers_as_an_editor_counts(tmp_path):
    # \r\n, \r and \n end lines; a form feed / vertical tab inside a row does not
    f = tmp_path / "Annotations.txt"
    f.write_bytes(b"Category&VideoID&Quality&StartTime&EndTime\r\n" + ROWS[0].encode() + b"\r"
                  + b"Bark&ccccccccccc&go\x0cod&3&7\n" + b"Bark&ddddddddddd&go\x0bod&x&7\n" + ROWS[1].encode() + b"\n")
    df, problems = read_annotations(f)
    assert df["sample"].tolist() == [0, 1, 3]
    assert [(p.line, "non-numeric" in p.reason) for p in problems] == [(4, True)]
