"""The sample index (``index.parquet``, docs/contracts.md): one row per sample, shard assigned."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .ave import AVE_DURATION, DatasetError, Problem, read_annotations, split_rows
from .labels import AVE_CLASSES
from .unav100 import read_unav100

FORMATS = ("ave", "unav100")


def shard_of(video_id: str, n_shards: int) -> int:
    """Shard of a video: sha1(video_id) mod n_shards.

    Stable across runs and machines (not Python's salted ``hash``), depends on the id only, so
    duplicate rows of an id land together and adding videos never moves finished ones.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.sha1(str(video_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % int(n_shards)


def dataset_paths(fmt: str, root: str | Path) -> dict:
    """The real on-disk layout of a dataset under ``root`` (absolute paths).

    AVE: ``videos`` = root/AVE (``<id>.mp4``), ``annotations`` = root/Annotations.txt, split
    files at root. UnAV-100: ``videos`` = root/raw_videos, ``annotations`` =
    root/annotations/unav100_annotations.json (or root/unav100_annotations.json when only that exists).
    """
    root = Path(root).resolve()
    if fmt == "ave":
        return {
            "root": root,
            "videos": root / "AVE",
            "annotations": root / "Annotations.txt",
            "order": {s: root / f"{s}_order.h5" for s in ("train", "val", "test")},
            "split_txt": {"train": root / "trainSet.txt", "val": root / "valSet.txt",
                          "test": root / "testSet.txt"},
        }
    if fmt == "unav100":
        ann = root / "annotations" / "unav100_annotations.json"
        if not ann.exists() and (root / "unav100_annotations.json").exists():
            ann = root / "unav100_annotations.json"  # annotation-only copies keep the JSON at root
        return {"root": root, "videos": root / "raw_videos", "annotations": ann}
    raise ValueError(f"unknown dataset format {fmt!r} (expected one of {FORMATS})")


def _in_dir(directory: Path, name: str) -> bool:
    """``directory/name`` stays directly inside ``directory`` (lexically, no symlink games)."""
    p = os.path.normpath(os.path.join(directory, name))
    return os.path.dirname(p) == os.path.normpath(directory)


def build_index(fmt: str, root: str | Path, n_shards: int, on_error: str = "skip"
                ) -> tuple[pd.DataFrame, list[Problem]]:
    """Build the ``index.parquet`` table of docs/contracts.md for the dataset at ``root``.

    Malformed annotation rows are left out and reported (``file:line`` and the reason), and
    so are AVE rows that no split file lists (a malformed row in no split is reported once,
    for what is wrong with it) and text split rows that match no Annotations row; exact
    duplicate rows are kept with a warning; ids that are not plain file names are rejected
    by the parsers. A missing video file keeps its row (``exists`` False) and adds a problem
    naming the video. Row problems come sorted by file and line. With ``on_error="fail"``
    any error-level problem raises ``DatasetError`` listing them all, the first one first
    (warnings never fail). ``df.attrs``: ``format``, ``source`` (annotation file) and, for
    AVE, ``n_rows`` (data rows of Annotations.txt: the row count of the released h5 files).
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    paths = dataset_paths(fmt, root)
    attrs: dict = {"format": fmt, "source": str(paths["annotations"])}
    if fmt == "ave":
        df, problems = read_annotations(paths["annotations"])
        n_rows, lines = df.attrs["n_rows"], df.attrs["lines"]
        split, source, split_problems = split_rows(paths["root"], n_rows, paths["annotations"])
        problems += split_problems
        df["split"] = split[df["sample"].to_numpy()].astype(str)
        orphan = df["split"] == ""
        for r in df[orphan].itertuples():
            problems.append(Problem(str(paths["annotations"]), lines[r.sample],
                                    f"row {r.sample} is in no split ({source} does not list it); left out",
                                    f"{r.category}&{r.video_id}&{r.quality}&{r.start}&{r.end}", r.video_id))
        df = df[~orphan].copy()
        df["duration"] = float(AVE_DURATION)
        extra = ["category", "label", "quality", "start", "end"]
        attrs["n_rows"] = int(n_rows)
    else:
        df, _, problems = read_unav100(paths["annotations"])
        extra = ["events"]
    problems.sort(key=lambda p: (p.file, p.line if p.line is not None else -1))
    videos: Path = paths["videos"]
    # the parsers reject ids that are not plain file names; checked again where the path is made
    outside = ~df["video_id"].map(lambda v: _in_dir(videos, f"{v}.mp4")).astype(bool)
    for v in df.loc[outside, "video_id"].unique():
        problems.append(Problem(str(paths["annotations"]), None, "video path would leave the video folder; "
                                "row left out", "", str(v)))
    df = df[~outside]
    df["path"] = [str(videos / f"{v}.mp4") for v in df["video_id"]]
    # one stat per unique id: AVE repeats ids
    exists = {v: (videos / f"{v}.mp4").is_file() for v in df["video_id"].unique()}
    df["exists"] = df["video_id"].map(exists).astype(bool)
    df["shard"] = np.array([shard_of(v, n_shards) for v in df["video_id"]], dtype=np.int64)
    for vid in sorted(v for v, ok in exists.items() if not ok):
        problems.append(Problem(str(videos / f"{vid}.mp4"), None, "video file missing", "", vid))
    cols = ["sample", "video_id", "split", "path", "exists", "shard", "duration"] + extra
    df = df[cols].reset_index(drop=True)
    df.attrs = attrs
    errors = [p for p in problems if p.severity == "error"]
    if on_error == "fail" and errors:
        listing = "\n".join(f"  {p}" for p in errors)
        raise DatasetError(f"{len(errors)} problem(s) in {fmt} dataset at {paths['root']}:\n{listing}")
    return df, problems


def _has_overlap(segments: list) -> bool:
    """Any two segments share time (sweep over start-sorted segments with the running max end)."""
    end = -np.inf
    for t0, t1 in sorted(segments):
        if t0 < end:
            return True
        end = max(end, t1)
    return False


def dataset_stats(df: pd.DataFrame, problems: list[Problem] = ()) -> dict:
    """JSON-able summary of an index table (for ``avepipe dataset --json``)."""
    counts = df["video_id"].value_counts()
    dup_ids = sorted(counts[counts > 1].index)
    stats: dict = {
        "n_samples": int(len(df)),
        "n_videos": int(df["video_id"].nunique()),
        "splits": {s: int(n) for s, n in df["split"].value_counts().sort_index().items()},
        "missing_files": int((~df["exists"]).sum()) if "exists" in df else None,
        "duplicates": {
            "n_ids": len(dup_ids),
            "n_rows": int(df["video_id"].isin(dup_ids).sum()),
            "ids_in_several_splits": sorted(
                v for v, s in df[df["video_id"].isin(dup_ids)].groupby("video_id")["split"] if s.nunique() > 1),
        },
        "problems": {
            "total": len(problems),
            "errors": sum(p.severity == "error" for p in problems),
            "warnings": sum(p.severity == "warning" for p in problems),
        },
    }
    if "label" in df:  # AVE
        stats["format"] = "ave"
        stats["class_order"] = list(AVE_CLASSES)
        per = df["label"].value_counts()
        stats["per_class"] = {AVE_CLASSES[i]: int(per.get(i, 0)) for i in range(len(AVE_CLASSES))}
        zero = df[df["start"] == df["end"]]
        stats["zero_length_rows"] = [{"sample": int(r.sample), "video_id": r.video_id} for r in zero.itertuples()]
        stats["event_seconds_mean"] = float((df["end"] - df["start"]).mean()) if len(df) else 0.0
    else:
        stats["format"] = "unav100"
        per: dict[str, int] = {}
        n_events = n_overlap_videos = 0
        for text in df["events"]:
            ev = json.loads(text)
            n_events += len(ev)
            for e in ev:
                per[e["label"]] = per.get(e["label"], 0) + 1
            if _has_overlap([e["segment"] for e in ev]):
                n_overlap_videos += 1
        stats["n_events"] = n_events
        stats["n_classes"] = len(per)
        stats["per_class"] = dict(sorted(per.items()))
        stats["videos_with_overlapping_events"] = n_overlap_videos
        stats["duration"] = {"min": float(df["duration"].min()), "mean": float(df["duration"].mean()),
                             "max": float(df["duration"].max())} if len(df) else {}
    return stats
