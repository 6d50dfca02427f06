"""The real UnAV-100 annotation format (docs/reference.md §8).

``{"version": "unav100", "database": {id: {"duration": s, "subset": "train|validation|test",
"annotations": [{"segment": [t0, t1], "label": str, "label_id": int}]}}}``; one sample per
video, events may overlap. Video ids must be plain file names (``raw_videos/<id>.mp4``).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd

from .ave import DatasetError, Problem, video_id_problem

SUBSETS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
COLUMNS = ["sample", "video_id", "split", "duration", "events", "n_events"]
DUPLICATE_TOL = 1e-3  # s; the UnAV evaluation drops an event repeating an earlier one within this

# label_id -> label of the real unav100_annotations.json (copied here so that parsing and the
# synthetic generator do not depend on the data directory; tests check it against the file).
UNAV_CLASSES: tuple[str, ...] = (
    "man speaking", "woman speaking", "kid speaking", "male singing",
    "people laughing", "car passing by", "baby laughter", "wind noise",
    "people clapping", "people shouting", "people crowd", "female singing",
    "dog barking", "playing acoustic guitar", "people eating", "people cheering",
    "basketball bounce", "engine knocking", "playing tennis", "baby babbling",
    "striking bowling", "playing badminton", "cat meowing", "people slapping",
    "playing piano", "baby crying", "people burping", "orchestra",
    "playing drum kit", "playing violin", "machine gun shooting", "child singing",
    "people nose blowing", "playing electronic organ", "people sneezing", "dog howling",
    "skateboarding", "playing base guitar", "auto racing", "sea waves",
    "playing table tennis", "people coughing", "people whispering", "playing ukulele",
    "sheep bleating", "playing tabla", "fire truck siren", "playing volleyball",
    "beat boxing", "playing trumpet", "thunder", "playing cello",
    "playing harp", "hammering nails", "people running", "sailing",
    "telephone bell ringing", "frog croaking", "driving motorcycle", "playing cornet",
    "playing clarinet", "train wheels squealing", "playing flute", "playing trombone",
    "playing erhu", "bull bellowing", "raining", "skidding",
    "chainsawing trees", "police car siren", "playing saxophone", "fireworks banging",
    "driving buses", "tap dancing", "airplane flyby", "people whistling",
    "train horning", "vacuum cleaner cleaning floors", "playing accordion", "bird chirping",
    "vehicle honking", "church bell ringing", "playing snare drum", "playing synthesizer",
    "typing on computer keyboard", "singing choir", "lions roaring", "people slurping",
    "helicopter", "horse clip-clop", "water burbling", "lawn mowing",
    "playing banjo", "playing zither", "playing harmonica", "people battle cry",
    "people sobbing", "ambulance siren", "rope skipping", "hair dryer drying",
)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_label_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _derive_classes(db: dict) -> tuple[dict[int, str], list[str]]:
    """label_id -> name by majority vote over the file's events (ties: first seen)."""
    pairs: Counter = Counter()
    for entry in db.values():
        anns = entry.get("annotations") if isinstance(entry, dict) else None
        for a in anns if isinstance(anns, list) else []:
            if isinstance(a, dict) and _is_label_id(a.get("label_id")) and isinstance(a.get("label"), str) \
                    and a["label"]:
                pairs[(a["label_id"], a["label"])] += 1
    by_id: dict[int, str] = {}
    for (lid, name), n in pairs.most_common():  # most_common keeps first-seen order on ties
        by_id.setdefault(lid, name)
    # A name that wins for two ids keeps the id with more events; the other id is inconsistent.
    owner: dict[str, int] = {}
    for lid, name in sorted(by_id.items(), key=lambda kv: -pairs[(kv[0], kv[1])]):
        owner.setdefault(name, lid)
    mapping = {lid: name for lid, name in by_id.items() if owner[name] == lid}
    n = max([len(UNAV_CLASSES)] + [lid + 1 for lid in mapping])
    agrees = all(lid < len(UNAV_CLASSES) and UNAV_CLASSES[lid] == name for lid, name in mapping.items())
    classes = [mapping.get(i, UNAV_CLASSES[i] if agrees and i < len(UNAV_CLASSES) else "") for i in range(n)]
    return mapping, classes


class _Object(dict):
    """A JSON object that remembers keys it saw more than once (``json.loads`` keeps the last)."""

    repeated: dict


def _object(pairs) -> _Object:
    obj = _Object(pairs)
    seen: dict = {}
    for k, _ in pairs:
        seen[k] = seen.get(k, 0) + 1
    obj.repeated = {k: n for k, n in seen.items() if n > 1}
    return obj


def _duplicate_of(events: list[dict], e: dict, tol: float = DUPLICATE_TOL) -> int | None:
    """Index of an earlier event with the same label and both boundaries within ``tol``."""
    for k, p in enumerate(events):
        if (p["label_id"] == e["label_id"] and abs(p["segment"][0] - e["segment"][0]) <= tol
                and abs(p["segment"][1] - e["segment"][1]) <= tol):
            return k
    return None


def read_unav100(json_path: str | Path, classes: list[str] | None = None
                 ) -> tuple[pd.DataFrame, list[str], list[Problem]]:
    """Parse ``unav100_annotations.json`` into (table, classes, problems).

    Table: one row per video in JSON order, columns ``sample`` (position in the JSON),
    ``video_id``, ``split`` (``validation`` -> ``val``), ``duration`` (float s), ``events``
    (JSON list of ``{"segment": [t0, t1], "label", "label_id"}``), ``n_events``.

    ``classes`` (names indexed by label_id) defaults to the mapping found in the file
    (majority vote per label_id); gaps are filled from ``UNAV_CLASSES`` when the file
    agrees with it. Documented repairs, each logged as a ``Problem``:
      * event times outside [0, duration] are clipped to it (``warning``, event kept);
      * events of zero or negative length (after clipping) are dropped;
      * events whose label is unknown or disagrees with the label_id mapping are dropped;
      * videos with a missing/invalid duration or subset are dropped;
      * videos whose id is not a plain file name (``../x``, ``a/b``, empty, control
        characters) are dropped: ``raw_videos/<id>.mp4`` must stay inside ``raw_videos``;
      * an id listed twice in ``database``: the last entry is used (as ``json.load`` and the
        reference evaluation read it), with a warning;
      * an event repeating an earlier one of its video (same label, both boundaries within
        1e-3 s) is kept for training with a warning; evaluation counts it once
        (``avepipe.metrics.drop_duplicate_events``, as the reference does).
    A file that is not JSON or has no ``database`` object raises ``DatasetError``.
    """
    path = Path(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_object)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    db = data.get("database") if isinstance(data, dict) else None
    if not isinstance(db, dict):
        raise DatasetError(f"{path}: no 'database' object (expected the UnAV-100 annotation format)")
    if classes is None:
        mapping, classes = _derive_classes(db)
    else:
        classes = list(classes)
        mapping = {i: c for i, c in enumerate(classes)}
    f = str(path)
    problems: list[Problem] = []
    rows = []
    for vid, n in getattr(db, "repeated", {}).items():
        problems.append(Problem(f, None, f"video id listed {n} times in 'database'; the last entry is used",
                                "", str(vid), "warning"))
    for sample, (vid, entry) in enumerate(db.items()):
        def bad(reason, row="", severity="error"):
            problems.append(Problem(f, None, reason, row, str(vid), severity))
        if why := video_id_problem(vid):
            bad(f"{why}; video dropped")
            continue
        if not isinstance(entry, dict):
            bad("video entry is not an object", json.dumps(entry)[:200])
            continue
        duration, subset, anns = entry.get("duration"), entry.get("subset"), entry.get("annotations", [])
        if not _is_number(duration) or duration <= 0:
            bad(f"invalid duration {duration!r}; video dropped")
            continue
        if subset not in SUBSETS:
            bad(f"unknown subset {subset!r} (expected train/validation/test); video dropped")
            continue
        if not isinstance(anns, list):
            bad("'annotations' is not a list; video dropped")
            continue
        events = []
        for a in anns:
            text = json.dumps(a)[:200]
            if not isinstance(a, dict):
                bad("event is not an object; dropped", text)
                continue
            seg, label, lid = a.get("segment"), a.get("label"), a.get("label_id")
            if not (isinstance(seg, list) and len(seg) == 2 and all(_is_number(t) for t in seg)):
                bad(f"event segment {seg!r} is not [t0, t1] numbers; dropped", text)
                continue
            if not _is_label_id(lid) or lid not in mapping or not isinstance(label, str):
                bad(f"unknown label {label!r} / label_id {lid!r}; event dropped", text)
                continue
            if mapping[lid] != label:
                bad(f"label {label!r} inconsistent with label_id {lid} ({mapping[lid]!r}); event dropped", text)
                continue
            t0, t1 = float(seg[0]), float(seg[1])
            c0, c1 = min(max(t0, 0.0), float(duration)), min(max(t1, 0.0), float(duration))
            if c1 <= c0:
                bad(f"event [{t0}, {t1}] has zero or negative length within [0, {duration}]; dropped", text)
                continue
            if (c0, c1) != (t0, t1):
                bad(f"event [{t0}, {t1}] outside [0, {duration}]; clipped to [{c0}, {c1}]", text, "warning")
            event = {"segment": [c0, c1], "label": label, "label_id": int(lid)}
            if (k := _duplicate_of(events, event)) is not None:
                bad(f"event repeats event {k} of this video (same label, boundaries within "
                    f"{DUPLICATE_TOL:g} s); kept, evaluation counts it once", text, "warning")
            events.append(event)
        rows.append(dict(sample=sample, video_id=str(vid), split=SUBSETS[subset], duration=float(duration),
                         events=json.dumps(events), n_events=len(events)))
    df = pd.DataFrame.from_records(rows, columns=COLUMNS).astype(
        {"sample": "int64", "video_id": str, "split": str, "duration": "float64", "events": str,
         "n_events": "int64"})
    df.attrs["source"] = f
    return df, classes, problems


def write_unav100(path: str | Path, videos: dict) -> Path:
    """Write ``{id: {"duration", "subset", "annotations"}}`` as an UnAV-100 annotation file.

    ``subset`` ``val`` is written as ``validation``, the spelling of the real file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = {}
    for vid, v in videos.items():
        v = dict(v)
        if v.get("subset") == "val":
            v["subset"] = "validation"
        db[vid] = v
    path.write_text(json.dumps({"version": "unav100", "database": db}), encoding="utf-8")
    return path


def events_of(df_row) -> list[dict]:
    """The decoded ``events`` list of one table row."""
    return json.loads(df_row["events"])
