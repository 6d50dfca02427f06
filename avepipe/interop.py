"""Legacy AVE h5 files <-> avepipe feature stores (docs/reference.md §1).

The published AVE heads (AVE-ECCV18, CMBS, PSP, CACE-Net) read one h5 file per array,
key ``avadataset``, one row per *sample* (row of Annotations.txt, duplicate video ids
repeated), and split files ``{train,val,test}_order.h5`` (key ``order``, row indices).
``export_h5`` writes exactly that layout from avepipe stores so those scripts run
unchanged; ``import_h5`` turns the released h5 features into avepipe stores, and the
178 background-only videos of the weak setting (``*_noisy.h5``) into a separate store
pair that ``load_noisy`` reads back.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import dask.array as da
import h5py
import numpy as np
import pandas as pd

from avepipe.datasets.ave import DatasetError
from avepipe.datasets.labels import NUM_CLASSES, ave_label_arrays
from avepipe.provenance import provenance, sha256_file
from avepipe.store import FeatureSet, FeatureShardWriter, open_features, reindex

log = logging.getLogger(__name__)

KEY = "avadataset"
SPLITS = ("train", "val", "test")
FEATURE_FILES = {"visual": "visual_feature.h5", "audio": "audio_feature.h5"}
LABEL_FILES = ("labels.h5", "labels_closs.h5", "mil_labels.h5")
NOISY_FILES = {"visual": "visual_feature_noisy.h5", "audio": "audio_feature_noisy.h5",
               "labels": "labels_noisy.h5"}
NOISY_DIR = "noisy"                 # <out_dir>/noisy/{<visual>,<audio>}/shard-000.zarr + labels.parquet
NOISY_LABELS = "labels.parquet"
N_SEGMENTS = 10
VISUAL_STEP_SHAPES = ((7, 7, 512), (512,))  # VGG-19 pool5 maps, or their pooled vectors
AUDIO_STEP_SHAPES = ((128,),)               # VGGish
_CHECK_BLOCK_BYTES = 64 << 20               # finiteness is checked this many bytes at a time
_STAGE = ".import-h5.tmp-"


class H5ImportError(DatasetError):
    """A released h5 file cannot be imported; the message (one line) names the file and why."""


def _samples(index: pd.DataFrame) -> pd.DataFrame:
    """Index rows in sample order (Annotations.txt order), positions 0..N-1."""
    need = {"video_id", "split", "label", "start", "end"}
    if missing := need - set(index.columns):
        raise ValueError(f"index lacks columns {sorted(missing)} (an AVE sample index is needed)")
    df = index.sort_values("sample", kind="stable") if "sample" in index.columns else index
    return df.reset_index(drop=True)


def _features_for(fs: FeatureSet, ids: Sequence[str], what: str, allow_failed: bool) -> da.Array:
    rows = reindex(fs, ids)
    bad = sorted(set(rows.video_ids[rows.status != "ok"]))
    if bad and not allow_failed:
        raise ValueError(f"{what}: {len(bad)} video(s) failed extraction and would be exported as zeros: "
                         f"{bad[:5]} (pass allow_failed=True to export anyway)")
    return rows.features


def _write_h5(path: Path, data, key: str = KEY, dtype: str | None = None) -> Path:
    """One contiguous dataset (as the released files), written block by block from dask."""
    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    if dtype is not None:
        arr = arr.astype(dtype)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h:
        dset = h.create_dataset(key, shape=arr.shape, dtype=arr.dtype, track_times=False)
        da.store(arr, dset, lock=True)  # h5py is not thread-safe: serialise writes
    tmp.replace(path)
    return path


def export_h5(
    index: pd.DataFrame,
    visual: FeatureSet,
    audio: FeatureSet,
    out_dir: str | Path,
    dtype: str = "float32",
    allow_failed: bool = False,
) -> dict[str, Path]:
    """Write the legacy AVE layout into ``out_dir``.

    ``index``: AVE sample index (``sample``, ``video_id``, ``split``, ``label``, ``start``,
    ``end``). Rows follow ``sample`` order; ids repeat as in Annotations.txt. ``dtype``
    "float32" (default) or "float64" (as released) for features and labels.
    Returns {file name: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = _samples(index)
    ids = df["video_id"].astype(str).tolist()
    seg, mask, video = ave_label_arrays(df)
    written: dict[str, Path] = {}
    for name, fs in (("visual", visual), ("audio", audio)):
        feats = _features_for(fs, ids, name, allow_failed)
        written[FEATURE_FILES[name]] = _write_h5(out / FEATURE_FILES[name], feats, dtype=dtype)
    for fname, arr in zip(LABEL_FILES, (seg, mask, video)):
        written[fname] = _write_h5(out / fname, arr, dtype=dtype)
    for split in SPLITS:
        rows = np.flatnonzero(df["split"].to_numpy() == split).astype(np.int64)
        written[f"{split}_order.h5"] = _write_h5(out / f"{split}_order.h5", rows, key="order")
    return written


def _first_rows(df: pd.DataFrame) -> dict[int, list[int]]:
    """Index positions of each video's first sample, grouped by the index's ``shard`` column
    (ids sorted within a shard, like decode's)."""
    first = df.drop_duplicates("video_id", keep="first")
    first = first.sort_values("video_id", kind="stable")
    shards = first["shard"].astype(int) if "shard" in first.columns else pd.Series(0, index=first.index)
    return {int(s): first.index[shards == s].tolist() for s in sorted(shards.unique())}


def _check_duplicates(h: h5py.Dataset, df: pd.DataFrame, what: str) -> int:
    """Rows of one video id that differ in the h5 (0 for the released files, we expect)."""
    n_diff = 0
    for vid, rows in df.groupby("video_id").groups.items():
        rows = df.loc[list(rows), "h5_row"].tolist()
        if len(rows) > 1:
            ref = h[rows[0]]
            n_diff += sum(not np.array_equal(ref, h[r]) for r in rows[1:])
    if n_diff:
        log.warning("%s: %d duplicate-id rows differ from the first row of their video; "
                    "the store keeps the first", what, n_diff)
    return n_diff


def _shape_text(step_shapes: Sequence[tuple], n_steps: int | None) -> str:
    lead = "N" if n_steps is None else f"N, {n_steps}"
    return " or ".join(f"({lead}, {', '.join(map(str, s))})" for s in step_shapes)


def _inspect_h5(path: Path, step_shapes: Sequence[tuple], n_steps: int | None, n_rows: int | None,
                rows_what: str = "") -> tuple[tuple, np.dtype]:
    """(shape, dtype) of ``path``'s ``avadataset`` after checking key, dtype, shape and rows.

    ``step_shapes``: the allowed shapes after (N, T); ``n_steps`` T (None: no step axis);
    ``n_rows`` the required N, ``rows_what`` says where it comes from.
    Raises ``H5ImportError`` with one line naming the file and what is wrong.
    """
    if not path.is_file():
        raise H5ImportError(f"{path}: not found")
    try:
        with h5py.File(path, "r") as f:
            if KEY not in f:
                raise H5ImportError(f"{path}: no dataset {KEY!r} (keys: {sorted(f.keys())})")
            h = f[KEY]
            if not isinstance(h, h5py.Dataset):
                raise H5ImportError(f"{path}: {KEY!r} is a group, not a dataset")
            shape, dtype = tuple(h.shape), h.dtype
    except OSError as e:
        raise H5ImportError(f"{path}: cannot read HDF5 ({e})") from None
    if not np.issubdtype(dtype, np.floating):
        raise H5ImportError(f"{path}: key {KEY!r} has dtype {dtype}; float features expected")
    lead = 1 if n_steps is None else 2
    ok = len(shape) >= lead and (n_steps is None or shape[1] == n_steps) and tuple(shape[lead:]) in {
        tuple(s) for s in step_shapes}
    if not ok:
        raise H5ImportError(f"{path}: key {KEY!r} has shape {shape}; expected {_shape_text(step_shapes, n_steps)}")
    if n_rows is not None and shape[0] != n_rows:
        raise H5ImportError(f"{path}: key {KEY!r} has {shape[0]} rows but {rows_what}")
    return shape, dtype


def _check_finite(path: Path) -> None:
    """Every value finite; else ``H5ImportError`` naming file, key and the first bad row."""
    with h5py.File(path, "r") as f:
        h = f[KEY]
        row_bytes = max(1, int(np.prod(h.shape[1:], dtype=np.int64)) * h.dtype.itemsize)
        step = max(1, _CHECK_BLOCK_BYTES // row_bytes)
        for lo in range(0, h.shape[0], step):
            block = h[lo:lo + step]
            good = np.isfinite(block.reshape(len(block), -1)).all(1)
            if not good.all():
                r = lo + int(np.argmin(good))
                bad = block[r - lo]
                n_nan, n_inf = int(np.isnan(bad).sum()), int(np.isinf(bad).sum())
                raise H5ImportError(f"{path}: key {KEY!r} row {r}: {n_nan} NaN and {n_inf} Inf value(s) "
                                    f"(first bad row; a damaged file or not the released features)")


def _expected_rows(df: pd.DataFrame, index: pd.DataFrame) -> int:
    """Rows the released h5 must have: the Annotations.txt data rows behind the index."""
    n = index.attrs.get("n_rows") if isinstance(getattr(index, "attrs", None), dict) else None
    return int(n) if n is not None else (int(df["h5_row"].max()) + 1 if len(df) else 0)


def _clean_stale(out_dir: Path) -> None:
    """Remove staging folders of imports that were killed (their process is gone)."""
    for p in out_dir.glob(f"{_STAGE}*"):
        try:
            os.kill(int(p.name[len(_STAGE):]), 0)
            continue  # still running
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(p, ignore_errors=True)


def _write_store(target: Path, h5_path: Path, rows_by_shard: dict[int, list[int]], ids_by_shard,
                 dtype: str, rec: dict) -> None:
    with h5py.File(h5_path, "r") as f:
        h = f[KEY]
        T, step_shape = h.shape[1], tuple(h.shape[2:])
        for shard, rows in rows_by_shard.items():
            with FeatureShardWriter(target / f"shard-{shard:03d}.zarr", ids_by_shard[shard], T, step_shape,
                                    dtype, rec) as w:
                for i, r in enumerate(rows):
                    w.write(i, h[r], np.arange(T, dtype=float))
                w.commit()


def import_h5(
    h5_dir: str | Path,
    index: pd.DataFrame,
    out_dir: str | Path,
    visual_name: str = "vgg19",
    audio_name: str = "vggish",
    dtype: str = "float32",
    visual_dtype: str | None = None,
    config: dict | None = None,
    noisy: bool | None = None,
    visual_step_shapes: Sequence[tuple] = VISUAL_STEP_SHAPES,
    audio_step_shapes: Sequence[tuple] = AUDIO_STEP_SHAPES,
) -> dict[str, Path]:
    """Turn ``visual_feature.h5`` / ``audio_feature.h5`` (and the ``*_noisy.h5`` set) into stores.

    Rows of the h5 are Annotations.txt rows: row ``r`` is the index's ``sample`` r (the
    index may lack malformed rows; ``index.attrs["n_rows"]``, written by ``build_index``,
    gives the file's row count, else ``max(sample) + 1``). Each unique video id becomes one
    store row (its first sample's features), stores split into ``shard-XXX.zarr`` by the
    index's ``shard`` column (one shard without it).

    Everything is checked before anything is written: key ``avadataset``, float dtype,
    shapes (visual (N,10,7,7,512) or pooled (N,10,512), audio (N,10,128); other step shapes
    through ``visual_step_shapes`` / ``audio_step_shapes``), row counts, and that every value
    is finite (each file is read once for this). A failure raises ``H5ImportError``, one line
    naming the file and why. Stores are written into ``<out_dir>/.import-h5.tmp-<pid>/`` and
    renamed into place only when all are complete: a failure leaves nothing behind (a killed
    import's folder is removed by the next one).

    ``noisy``: the weak setting's background-only videos (``visual_feature_noisy.h5``,
    ``audio_feature_noisy.h5``, ``labels_noisy.h5`` (M,29), M = 178 as released). None
    (default): imported when all three files are present, an error when only some are;
    True: required; False: not imported. They go to ``<out_dir>/noisy/<visual_name>/`` and
    ``<out_dir>/noisy/<audio_name>/`` (``shard-000.zarr``, ids ``noisy_000``...) and
    ``<out_dir>/noisy/labels.parquet``; read them with ``load_noisy(out_dir)``. An import
    without them removes an older ``noisy/`` folder (it would pair with other features).

    Returns {"visual": dir, "audio": dir} (+ "noisy": dir when imported).
    """
    h5_dir, out_dir = Path(h5_dir), Path(out_dir)
    names = {"visual": visual_name, "audio": audio_name}
    for kind, name in names.items():
        if not name or name.startswith(".") or name == NOISY_DIR or "/" in name or "\\" in name:
            raise ValueError(f"{kind}_name {name!r} cannot name a store folder")
    if visual_name == audio_name:
        raise ValueError(f"visual_name and audio_name are both {visual_name!r}")
    df = _samples(index)
    df["h5_row"] = df["sample"].astype(np.int64) if "sample" in df.columns else np.arange(len(df))
    n_rows = _expected_rows(df, index)
    rows_what = f"the index's Annotations.txt has {n_rows} rows (one h5 row per Annotations row)"
    files = {k: h5_dir / f for k, f in FEATURE_FILES.items()}
    step_shapes = {"visual": visual_step_shapes, "audio": audio_step_shapes}
    shapes = {k: _inspect_h5(files[k], step_shapes[k], N_SEGMENTS, n_rows, rows_what)[0] for k in files}

    present = {k: (h5_dir / f).is_file() for k, f in NOISY_FILES.items()}
    if noisy is None and any(present.values()) and not all(present.values()):
        have = [NOISY_FILES[k] for k, v in present.items() if v]
        lack = [NOISY_FILES[k] for k, v in present.items() if not v]
        raise H5ImportError(f"{h5_dir}: has {', '.join(have)} but not {', '.join(lack)} (the weak setting's "
                            f"background videos need all three; add the missing file or pass noisy=False)")
    use_noisy = all(present.values()) if noisy is None else bool(noisy)
    nfiles = {k: h5_dir / f for k, f in NOISY_FILES.items()}
    if use_noisy:
        m, _ = _inspect_h5(nfiles["labels"], [(NUM_CLASSES + 1,)], None, None)
        for k in ("visual", "audio"):  # same feature space as the main files
            _inspect_h5(nfiles[k], [shapes[k][2:]], N_SEGMENTS, m[0],
                        f"{nfiles['labels'].name} has {m[0]} rows")
    for path in [*files.values(), *(nfiles.values() if use_noisy else [])]:
        _check_finite(path)

    hashes = {p.name: sha256_file(p) for p in sorted(h5_dir.glob("*.h5"))}  # once: files are GBs
    groups = _first_rows(df)
    ids_by_shard = {s: df.loc[rows, "video_id"].astype(str).tolist() for s, rows in groups.items()}
    h5_rows = {s: df.loc[rows, "h5_row"].astype(int).tolist() for s, rows in groups.items()}
    dtypes = {"visual": visual_dtype or dtype, "audio": dtype}
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    stage = out_dir / f"{_STAGE}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    result: dict[str, Path] = {}
    try:
        stage.mkdir()
        for kind, path in files.items():
            with h5py.File(path, "r") as f:
                n_diff = _check_duplicates(f[KEY], df, str(path))
                h5_dtype = str(f[KEY].dtype)
            rec = provenance(
                "import_h5", config, source="released_h5", encoder=names[kind], modality=kind,
                weights={"id": "released_h5", "sha256": hashes[path.name], "file": path.name},
                files=hashes, h5_file=str(path), h5_dtype=h5_dtype, h5_rows=n_rows,
                dtype=str(np.dtype(dtypes[kind])), duplicate_rows_differing=n_diff,
            )
            _write_store(stage / names[kind], path, h5_rows, ids_by_shard, dtypes[kind], rec)
            result[kind] = out_dir / names[kind]
        if use_noisy:
            _stage_noisy(stage / NOISY_DIR, nfiles, names, dtypes, hashes, config)
        # all stores complete: swap them in (an older store moves into the stage, removed below)
        moves = [names["visual"], names["audio"]] + ([NOISY_DIR] if use_noisy else [])
        if not use_noisy and (out_dir / NOISY_DIR).exists():
            log.warning("%s: removing %s (the new stores come without background videos)",
                        out_dir, out_dir / NOISY_DIR)
            os.replace(out_dir / NOISY_DIR, stage / f".old-{NOISY_DIR}")
        for name in moves:
            if (out_dir / name).exists():
                os.replace(out_dir / name, stage / f".old-{name}")
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if use_noisy:
        result["noisy"] = out_dir / NOISY_DIR
    return result


def _stage_noisy(target: Path, files: dict[str, Path], names: dict[str, str], dtypes: dict[str, str],
                 hashes: dict[str, str], config: dict | None) -> None:
    with h5py.File(files["labels"], "r") as f:
        labels = np.asarray(f[KEY][...], dtype=np.float32)
    width = max(3, len(str(len(labels) - 1)))
    ids = [f"noisy_{i:0{width}d}" for i in range(len(labels))]
    for kind in ("visual", "audio"):
        path = files[kind]
        with h5py.File(path, "r") as f:
            h5_dtype = str(f[KEY].dtype)
        rec = provenance(
            "import_h5", config, source="released_h5_noisy", encoder=names[kind], modality=kind,
            weights={"id": "released_h5", "sha256": hashes[path.name], "file": path.name},
            files=hashes, h5_file=str(path), h5_dtype=h5_dtype, dtype=str(np.dtype(dtypes[kind])),
            background_only=True,
        )
        _write_store(target / names[kind], path, {0: list(range(len(ids)))}, {0: ids}, dtypes[kind], rec)
    table = pd.DataFrame({"video_id": ids, "video_label": list(labels)})
    table.attrs = {"visual": names["visual"], "audio": names["audio"], "labels_file": files["labels"].name,
                   "labels_sha256": hashes[files["labels"].name]}
    table.to_parquet(target / NOISY_LABELS, index=False)


class NoisySet(NamedTuple):
    """The weak setting's background-only training videos, as ``load_noisy`` returns them."""

    visual: FeatureSet          # (M, 10, 7, 7, 512) or (M, 10, 512), lazy (dask), rows = video_ids
    audio: FeatureSet           # (M, 10, 128)
    video_labels: np.ndarray    # (M, 29) float32, exactly labels_noisy.h5 (released: column 28 = 1)
    video_ids: np.ndarray       # (M,) str, noisy_000 ...


def load_noisy(out_dir: str | Path, visual_name: str | None = None,
               audio_name: str | None = None) -> NoisySet | None:
    """The background-only videos ``import_h5`` stored under ``out_dir`` (None if there are none).

    ``out_dir`` is the folder given to ``import_h5`` (the parent of its visual/audio stores).
    ``visual_name`` / ``audio_name``, when given, must be the stores the set was imported
    beside (``ValueError`` otherwise: features of two different extractors must not be
    mixed). Weak-setting training appends these M videos to the train split only, with
    ``video_labels`` as their video-level targets (AVE-ECCV18, CMBS, CACE-Net, Ge et al.).
    """
    d = Path(out_dir) / NOISY_DIR
    if not (d / NOISY_LABELS).is_file():
        return None
    table = pd.read_parquet(d / NOISY_LABELS)
    meta = table.attrs
    for kind, want in (("visual", visual_name), ("audio", audio_name)):
        if want is not None and meta.get(kind) != want:
            raise ValueError(f"{d}: background videos were imported beside {kind} store "
                             f"{meta.get(kind)!r}, not {want!r}")
    ids = table["video_id"].astype(str).to_numpy()
    labels = np.stack(table["video_label"].to_numpy()).astype(np.float32) if len(table) else \
        np.zeros((0, NUM_CLASSES + 1), np.float32)
    visual = open_features(d / meta["visual"], video_ids=list(ids))
    audio = open_features(d / meta["audio"], video_ids=list(ids))
    return NoisySet(visual, audio, labels, ids)
