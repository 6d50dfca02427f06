"""UnAV-100 annotation JSON (docs/reference.md §8)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from avepipe.datasets.ave import DatasetError
from avepipe.datasets.unav100 import UNAV_CLASSES, read_unav100, write_unav100

REPO = Path(__file__).resolve().parents[2]


def real_unav_json() -> Path:
    p = Path(os.environ.get("AVEPIPE_SHARED", REPO.parent / "shared")) / "data" / "unav100" / \
        "unav100_annotations.json"
    if not p.exists():
        pytest.skip(f"real UnAV-100 annotations {p} absent")
    return p


def test_real_file():
    path = real_unav_json()
    df, classes, problems = read_unav100(path)
    assert problems == []
    assert len(df) == 10790
    assert df["split"].value_counts().to_dict() == {"train": 6489, "val": 2134, "test": 2167}
    assert len(classes) == 100 and classes == list(UNAV_CLASSES)
    assert df["n_events"].sum() == 30059
    # independent count straight from the JSON
    raw = json.loads(path.read_text())["database"]
    assert sum(len(v["annotations"]) for v in raw.values()) == 30059
    assert {a["label_id"]: a["label"] for v in raw.values() for a in v["annotations"]} == dict(enumerate(classes))
    assert df["video_id"].tolist() == list(raw)
    assert 10 <= df["duration"].min() and df["duration"].max() <= 60

    def overlaps(ev):
        s = [e["segment"] for e in ev]
        return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(s) for b in s[i + 1:])
    n_overlap = sum(overlaps(json.loads(e)) for e in df["events"])
    assert n_overlap > 0


def _write(tmp_path, db) -> Path:
    p = tmp_path / "ann.json"
    p.write_text(json.dumps({"version": "unav100", "database": db}))
    return p


def _ev(t0, t1, lid=3, label=None):
    return {"segment": [t0, t1], "label": UNAV_CLASSES[lid] if label is None else label, "label_id": lid}


def test_repairs_documented(tmp_path):
    db = {
        "vid00000001": {"duration": 20.0, "subset": "validation", "annotations": [
            _ev(-1.0, 5.0),                 # clipped to [0, 5] (warning)
            _ev(15.0, 25.5),                # clipped to [15, 20] (warning)
            _ev(7.0, 7.0),                  # zero length: dropped
            _ev(9.0, 8.0),                  # negative: dropped
            _ev(21.0, 24.0),                # entirely after the end: zero length once clipped: dropped
            _ev(1.0, 2.0, 3, "not a class"),  # label disagrees with label_id 3: dropped
            _ev(1.0, 2.0, 250, "zzz"),      # unknown label_id: dropped
            {"segment": ["a", 2], "label": UNAV_CLASSES[3], "label_id": 3},  # bad segment: dropped
            _ev(2.5, 4.25, 7),
        ]},
        "vid00000002": {"duration": 30, "subset": "train", "annotations": [_ev(1, 2, 3), _ev(1.5, 3, 7)]},
        "vid00000003": {"duration": 30, "subset": "holdout", "annotations": []},   # dropped video
        "vid00000004": {"duration": -3, "subset": "test", "annotations": []},      # dropped video
    }
    df, classes, problems = read_unav100(_write(tmp_path, db), classes=UNAV_CLASSES)
    assert df["video_id"].tolist() == ["vid00000001", "vid00000002"]
    assert df["sample"].tolist() == [0, 1] and df["split"].tolist() == ["val", "train"]
    ev = json.loads(df["events"][0])
    assert [e["segment"] for e in ev] == [[0.0, 5.0], [15.0, 20.0], [2.5, 4.25]]
    assert [e["label_id"] for e in ev] == [3, 3, 7]
    warnings = [p for p in problems if p.severity == "warning"]
    errors = [p for p in problems if p.severity == "error"]
    assert len(warnings) == 2 and all("clipped" in p.reason for p in warnings)
    reasons = [p.reason for p in errors]
    assert sum("zero or negative length" in r for r in reasons) == 3
    assert sum("inconsistent" in r for r in reasons) == 1
    assert sum("unknown label" in r for r in reasons) == 1
    assert sum("not [t0, t1]" in r for r in reasons) == 1
    assert any("unknown subset 'holdout'" in r for r in reasons)
    assert any("invalid duration -3" in r for r in reasons)
    assert all(p.file.endswith("ann.json") and p.video_id for p in problems)
    assert classes == list(UNAV_CLASSES)


def test_classes_derived_and_inconsistent(tmp_path):
    db = {
        "a": {"duration": 10, "subset": "train", "annotations": [_ev(0, 1, 0, "x"), _ev(1, 2, 0, "x"),
                                                                    _ev(2, 3, 1, "y")]},
        "b": {"duration": 10, "subset": "test", "annotations": [_ev(0, 1, 0, "y"), _ev(3, 4, 2, "x")]},
    }
    df, classes, problems = read_unav100(_write(tmp_path, db))
    # majority: id 0 -> "x", id 1 -> "y"; "y" under id 0 and "x" under id 2 disagree -> dropped
    assert classes[:2] == ["x", "y"]
    assert df["n_events"].tolist() == [3, 0]
    assert len(problems) == 2 and all(p.video_id == "b" for p in problems)


def test_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_unav100(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_unav100(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"version": "unav100"}))
    with pytest.raises(DatasetError, match="no 'database'"):
        read_unav100(tmp_path / "y.json")


def test_write_round_trip(tmp_path):
    videos = {"abcdefghijk": {"duration": 33.5, "subset": "val", "annotations": [_ev(1.25, 9.5, 12)]},
              "bcdefghijkl": {"duration": 21.0, "subset": "train", "annotations": []}}
    p = write_unav100(tmp_path / "annotations" / "unav100_annotations.json", videos)
    raw = json.loads(p.read_text())
    assert raw["version"] == "unav100" and raw["database"]["abcdefghijk"]["subset"] == "validation"
    df, classes, problems = read_unav100(p)
    assert problems == []
    assert df["split"].tolist() == ["val", "train"] and df["duration"].tolist() == [33.5, 21.0]
    assert json.loads(df["events"][0]) == [{"segment": [1.25, 9.5], "label": UNAV_CLASSES[12], "label_id": 12}]
    assert classes == list(UNAV_CLASSES)  # file agrees with the real mapping -> gaps filled from it


@pytest.mark.parametrize("vid", ["../../x", "a/b", "/abs/x", "", "..", "a\x00b", " padded"])
def test_video_ids_must_be_plain_file_names(tmp_path, vid):
    db = {vid: {"duration": 10, "subset": "test", "annotations": [_ev(1, 2)]},
          "goodgoodgoo": {"duration": 10, "subset": "test", "annotations": [_ev(1, 2)]}}
    df, _, problems = read_unav100(_write(tmp_path, db))
    assert df["video_id"].tolist() == ["goodgoodgoo"]
    assert [(p.video_id, p.severity) for p in problems] == [(vid, "error")]
    assert "video id" in problems[0].reason and "dropped" in problems[0].reason


def test_repeated_events_warned_and_kept(tmp_path):
    db = {"vvvvvvvvvvv": {"duration": 30, "subset": "test", "annotations": [
        _ev(1.0, 5.0), _ev(1.0008, 4.9995), _ev(1.0, 5.0, 7), _ev(1.002, 5.0)]}}
    df, _, problems = read_unav100(_write(tmp_path, db))
    # event 1 repeats event 0 (same label, both ends within 1e-3 s); 2 has another label; 3 is 2 ms off
    assert df["n_events"].tolist() == [4]
    assert [(p.severity, p.video_id) for p in problems] == [("warning", "vvvvvvvvvvv")]
    assert "repeats event 0" in problems[0].reason and "1.0008" in problems[0].row
