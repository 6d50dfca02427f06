"""The real AVE dataset format (docs/reference.md §1): ``Annotations.txt`` and the split files.

``Annotations.txt`` holds one row per annotation, ``Category&VideoID&Quality&StartTime&EndTime``,
with or without a header line. Rows, not ids, are the samples: 45 ids have 2-3 rows and
the row index is what ``{train,val,test}_order.h5`` refer to.

Bad rows never stop a run: each becomes a ``Problem`` naming ``file:line`` (1-based, as an
editor shows it) and the reason, and is left out of the table (``build_index`` with
``on_error="fail"`` turns errors into a ``DatasetError``). Exact duplicate rows are kept
(each is its own sample, as the split files and the released h5 features count them) with a
warning. A VideoID must be a plain file name: anything that could resolve outside ``AVE/``
(``../x``, ``a/b``, absolute paths, empty, control characters) is a row problem.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .labels import AVE_CLASSES, CLASS_INDEX

FIELDS = ("category", "video_id", "quality", "start", "end")
HEADER = "Category&VideoID&Quality&StartTime&EndTime"
SPLITS = ("train", "val", "test")
ORDER_FILES = {s: f"{s}_order.h5" for s in SPLITS}
TEXT_SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
AVE_DURATION = 10  # seconds; every AVE clip is ten one-second segments
COLUMNS = ["sample", "category", "video_id", "quality", "start", "end", "label"]


class DatasetError(ValueError):
    """A dataset file cannot be used; the message names the file (and row / video)."""


@dataclass
class Problem:
    """One bad row, event or file found while reading a dataset.

    ``line`` is 1-based in ``file`` (None when the format has no lines, e.g. JSON);
    ``severity`` is ``error`` (the row/event was dropped) or ``warning`` (it was repaired).
    """

    file: str
    line: int | None
    reason: str
    row: str = ""
    video_id: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        vid = f" [{self.video_id}]" if self.video_id else ""
        return f"{where}{vid}: {self.severity}: {self.reason}" + (f" (row: {self.row!r})" if self.row else "")

    def to_dict(self) -> dict:
        return asdict(self)


def problems_to_json(problems: list[Problem]) -> str:
    """JSON text (a list of problem dicts) for ``index_problems.json``."""
    return json.dumps([p.to_dict() for p in problems], indent=1)


def _is_header(fields: list[str]) -> bool:
    return len(fields) == 5 and fields[0].strip().lower() == "category" and fields[1].strip().lower() == "videoid"


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines, header dropped.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (as editors count them; ``str.splitlines``
    would also split at form feeds and other separators an editor shows inside a line).
    Blank lines are not samples (a trailing newline is common); a UTF-8 BOM is removed.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # universal newlines: \r\n and \r -> \n
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for i, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        if not out and _is_header(line.split("&")):
            continue
        out.append((i, line))
    return out


def video_id_problem(video_id: str) -> str:
    """Why ``video_id`` is not a plain file name ('' when it is one).

    Video files are ``<dir>/<video_id>.mp4``: an id with a path separator, ``.``/``..``,
    control characters (NUL included) or nothing at all could name a file outside ``<dir>``
    or no file, so it is rejected rather than resolved.
    """
    if not isinstance(video_id, str) or not video_id:
        return "empty video id"
    if video_id in (".", ".."):
        return f"video id {video_id!r} is not a file name"
    if "/" in video_id or "\\" in video_id:
        return f"video id {video_id!r} contains a path separator (must be a plain file name)"
    if any(ord(c) < 32 or ord(c) == 127 for c in video_id):
        return f"video id {video_id!r} contains control characters"
    if video_id != video_id.strip():
        return f"video id {video_id!r} has leading or trailing whitespace"
    return ""


def _parse_time(text: str) -> int:
    value = float(text)  # raises ValueError for non-numbers
    if not np.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number of seconds")
    return int(value)


def _parse_row(fields: list[str]) -> tuple[dict | None, str]:
    """Parsed record or (None, reason)."""
    if len(fields) != 5:
        return None, f"expected 5 '&'-separated fields ({HEADER}), got {len(fields)}"
    category, video_id, quality, start_s, end_s = (f.strip() for f in fields)
    if category not in CLASS_INDEX:
        return None, f"unknown class {category!r} (not one of the 28 AVE classes)"
    if not video_id:
        return None, "empty VideoID"
    if why := video_id_problem(video_id):
        return None, why
    try:
        start, end = _parse_time(start_s), _parse_time(end_s)
    except ValueError as e:
        return None, f"non-numeric or fractional time: {e}"
    if not (0 <= start <= AVE_DURATION and 0 <= end <= AVE_DURATION):
        return None, f"times {start}&{end} outside [0, {AVE_DURATION}]"
    if end < start:
        return None, f"EndTime {end} < StartTime {start}"
    rec = dict(category=category, video_id=video_id, quality=quality, start=start, end=end,
               label=CLASS_INDEX[category])
    return rec, ""


def _row_key(line: str) -> tuple:
    return tuple(f.strip() for f in line.split("&"))


def read_annotations(path: str | Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse an AVE ``Annotations.txt`` (header line optional).

    Returns (table, problems). One table row per file row (duplicate video ids kept), columns
    ``sample`` (0-based data-row index, header and blank lines excluded — the index the
    ``*_order.h5`` files use), ``category``, ``video_id``, ``quality``, ``start``, ``end``
    (int seconds, event on [start, end)), ``label`` (0..27, first-appearance order).

    Malformed rows (wrong field count, unknown class, a VideoID that is not a plain file
    name, non-numeric/fractional times, times outside [0, 10], end < start) become error
    ``Problem`` entries naming file and line and are left out of the table; they keep their
    ``sample`` number so split indices still line up. A row that repeats an earlier row
    exactly is kept as its own sample (the split files and the released h5 features have a
    row for each) and reported as a warning naming the first copy's line.
    The zero-length row of the real file (``VWi2ENBuTbw``, Church bell, 0&0) is kept: it is a
    real sample of the published splits, its ten segments are all background and its
    video-level label is still Church bell. ``df.attrs``: ``n_rows`` (data-row count),
    ``source`` (the file), ``lines`` (1-based line number of each sample, indexed by
    ``sample``; ``build_index`` drops it from the index).
    """
    path = Path(path)
    records, problems = [], []
    lines = _read_lines(path)
    first_line: dict[tuple, int] = {}
    for sample, (lineno, line) in enumerate(lines):
        rec, reason = _parse_row(line.split("&"))
        if rec is None:
            problems.append(Problem(str(path), lineno, reason, line))
            continue
        key = _row_key(line)
        if key in first_line:
            problems.append(Problem(
                str(path), lineno, f"exact duplicate of line {first_line[key]}; kept as its own sample "
                f"(sample {sample}: split files and released features count every row)", line,
                rec["video_id"], severity="warning"))
        else:
            first_line[key] = lineno
        rec["sample"] = sample
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df = df.astype({"sample": "int64", "start": "int64", "end": "int64", "label": "int64",
                    "category": str, "video_id": str, "quality": str})
    df.attrs["n_rows"] = len(lines)
    df.attrs["source"] = str(path)
    df.attrs["lines"] = [n for n, _ in lines]
    return df, problems


def _order_splits(root: Path, n_rows: int) -> np.ndarray:
    split = np.full(n_rows, "", dtype=object)
    for name in SPLITS:
        f = root / ORDER_FILES[name]
        try:
            with h5py.File(f, "r") as h:
                if "order" not in h:
                    raise DatasetError(f"{f}: no dataset 'order' (keys: {list(h.keys())})")
                idx = np.asarray(h["order"][...]).ravel()
        except OSError as e:
            raise DatasetError(f"{f}: cannot read HDF5 ({e})") from None
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise DatasetError(f"{f}: 'order' must hold integer row indices, got {idx.dtype}")
        bad = idx[(idx < 0) | (idx >= n_rows)]
        if bad.size:
            raise DatasetError(f"{f}: row indices {bad[:5].tolist()} outside 0..{n_rows - 1}")
        uniq, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise DatasetError(f"{f}: rows listed twice: {uniq[counts > 1][:5].tolist()}")
        clash = idx[split[idx] != ""]
        if clash.size:
            r = int(clash[0])
            raise DatasetError(f"{f}: row {r} already in split {split[r]!r} (splits must be disjoint)")
        split[idx] = name
    return split


def _text_splits(root: Path, n_rows: int, annotations: Path) -> tuple[np.ndarray, list[Problem]]:
    """Match each text split row to the next unused identical row of Annotations.txt.

    A split row that matches no free Annotations row is a ``Problem`` (file:line).
    """
    slots: dict[tuple, list[int]] = {}
    ann_lines = _read_lines(annotations)
    if len(ann_lines) != n_rows:
        raise DatasetError(f"{annotations}: {len(ann_lines)} data rows, expected {n_rows}")
    for row, (_, line) in enumerate(ann_lines):
        slots.setdefault(_row_key(line), []).append(row)
    split = np.full(n_rows, "", dtype=object)
    problems: list[Problem] = []
    for name in SPLITS:
        f = root / TEXT_SPLIT_FILES[name]
        for lineno, line in _read_lines(f):
            key = _row_key(line)
            free = slots.get(key)
            if not free:
                why = "more copies than in Annotations.txt" if key in slots else "not found in Annotations.txt"
                vid = key[1] if len(key) > 1 else ""
                problems.append(Problem(str(f), lineno, why, line, vid))
                continue
            split[free.pop(0)] = name
    return split, problems


def split_rows(root: str | Path, n_rows: int | None = None, annotations: str | Path | None = None
               ) -> tuple[np.ndarray, str, list[Problem]]:
    """(split per Annotations row, split source, row problems of text split files).

    Like ``read_splits`` but rows in no split are left as ``''`` (the caller reports them)
    and text split rows that match no Annotations row come back as problems. Structural
    faults of the split files (missing, unreadable, indices out of range, overlapping
    splits) still raise ``DatasetError``.
    """
    root = Path(root)
    annotations = Path(annotations) if annotations is not None else root / "Annotations.txt"
    if n_rows is None:
        n_rows = len(_read_lines(annotations))
    have_h5 = [(root / ORDER_FILES[s]).exists() for s in SPLITS]
    have_txt = [(root / TEXT_SPLIT_FILES[s]).exists() for s in SPLITS]
    if all(have_h5):
        return _order_splits(root, n_rows), "*_order.h5", []
    if any(have_h5):
        missing = [ORDER_FILES[s] for s, h in zip(SPLITS, have_h5) if not h]
        raise DatasetError(f"{root}: split files incomplete, missing {missing}")
    if all(have_txt):
        split, problems = _text_splits(root, n_rows, annotations)
        return split, "*Set.txt", problems
    raise DatasetError(f"{root}: no split files ({', '.join(ORDER_FILES.values())} "
                       f"or {', '.join(TEXT_SPLIT_FILES.values())})")


def read_splits(root: str | Path, n_rows: int | None = None,
                annotations: str | Path | None = None) -> np.ndarray:
    """Split name (``train``/``val``/``test``) of every Annotations row, as an object array.

    Uses ``{train,val,test}_order.h5`` (key ``order``, int64 row indices) when present,
    otherwise ``trainSet.txt``/``valSet.txt``/``testSet.txt`` (5-field rows matched to the
    Annotations rows in order; an id with several identical rows consumes them one by one).
    Strict: the splits must be disjoint and cover rows ``0..n_rows-1`` and every text split
    row must match, else ``DatasetError`` (``build_index`` uses ``split_rows`` and reports
    such rows instead). ``n_rows`` defaults to the data-row count of ``annotations``
    (default root/Annotations.txt).
    """
    annotations = Path(annotations) if annotations is not None else Path(root) / "Annotations.txt"
    split, source, problems = split_rows(root, n_rows, annotations)
    if problems:
        p = problems[0]
        raise DatasetError(f"{p.file}:{p.line}: row {p.row!r} {p.reason}")
    uncovered = np.flatnonzero(split == "")
    if uncovered.size:
        lines = [n for n, _ in _read_lines(annotations)] if annotations.exists() else []
        where = [f"{annotations}:{lines[r]}" if r < len(lines) else f"row {r}" for r in uncovered[:5]]
        raise DatasetError(f"{Path(root)} ({source}): {uncovered.size} Annotations rows in no split, "
                           f"e.g. {', '.join(where)}")
    return split


def write_annotations(path: str | Path, df: pd.DataFrame, header: bool = False) -> Path:
    """Write ``df`` (category, video_id, quality, start, end) in the ``&`` format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] if header else []
    for r in df.itertuples(index=False):
        lines.append(f"{r.category}&{r.video_id}&{r.quality}&{int(r.start)}&{int(r.end)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_split_txt(path: str | Path, df: pd.DataFrame) -> Path:
    """Write a ``trainSet.txt``-style split file (same 5-field format, no header)."""
    return write_annotations(path, df, header=False)


def write_order_h5(path: str | Path, indices) -> Path:
    """Write ``{split}_order.h5`` with key ``order`` = int64 row indices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        h.create_dataset("order", data=np.asarray(indices, dtype=np.int64), track_times=False)
    return path


__all__ = ["AVE_CLASSES", "DatasetError", "Problem", "read_annotations", "read_splits", "split_rows",
           "video_id_problem", "write_annotations", "write_order_h5", "write_split_txt", "problems_to_json"]
