"""Legacy AVE h5 files <-> avepipe feature stores (REFERENCE §1).

The published AVE heads (AVE-ECCV18, CMBS, PSP, CACE-Net) read one h5 file per array,
key ``avadataset``, one row per *sample* (row of Annotations.txt, duplicate video ids
repeated), and split files ``{train,val,test}_order.h5`` (key ``order``, row indices).
``export_h5`` writes exactly that layout from avepipe stores so those scripts run
unchanged; ``import_h5`` turns the released h5 features into avepipe stores.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import dask.array as da
import h5py
import numpy as np
import pandas as pd

from avepipe.datasets.labels import ave_label_arrays
from avepipe.provenance import provenance, sha256_file
from avepipe.store import FeatureSet, FeatureShardWriter, reindex

log = logging.getLogger(__name__)

KEY = "avadataset"
SPLITS = ("train", "val", "test")
FEATURE_FILES = {"visual": "visual_feature.h5", "audio": "audio_feature.h5"}
LABEL_FILES = ("labels.h5", "labels_closs.h5", "mil_labels.h5")


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


def _shards_of(df: pd.DataFrame) -> dict[int, list[int]]:
    """First sample row of each unique video, grouped by the index's ``shard`` column."""
    first = df.drop_duplicates("video_id", keep="first")
    first = first.sort_values("video_id", kind="stable")  # shards sorted by id, like decode's
    shards = first["shard"].astype(int) if "shard" in first.columns else pd.Series(0, index=first.index)
    return {int(s): first.index[shards == s].tolist() for s in sorted(shards.unique())}


def _check_duplicates(h: h5py.Dataset, df: pd.DataFrame, what: str) -> int:
    """Rows of one video id that differ in the h5 (0 for the released files, we expect)."""
    n_diff = 0
    for vid, rows in df.groupby("video_id").groups.items():
        rows = list(rows)
        if len(rows) > 1:
            ref = h[rows[0]]
            n_diff += sum(not np.array_equal(ref, h[r]) for r in rows[1:])
    if n_diff:
        log.warning("%s: %d duplicate-id rows differ from the first row of their video; "
                    "the store keeps the first", what, n_diff)
    return n_diff


def import_h5(
    h5_dir: str | Path,
    index: pd.DataFrame,
    out_dir: str | Path,
    visual_name: str = "vgg19",
    audio_name: str = "vggish",
    dtype: str = "float32",
    visual_dtype: str | None = None,
    config: dict | None = None,
) -> dict[str, Path]:
    """Turn ``visual_feature.h5`` / ``audio_feature.h5`` into stores under ``out_dir``.

    Rows of the h5 are the index's samples (in ``sample`` order); each unique video id
    becomes one store row (its first sample's features). Stores are split into
    ``shard-XXX.zarr`` by the index's ``shard`` column (one shard without it).
    Returns {"visual": dir, "audio": dir}.
    """
    h5_dir, out_dir = Path(h5_dir), Path(out_dir)
    df = _samples(index)
    groups = _shards_of(df)
    for kind in FEATURE_FILES:
        if not (h5_dir / FEATURE_FILES[kind]).is_file():
            raise FileNotFoundError(f"{h5_dir / FEATURE_FILES[kind]} not found (released AVE features expected)")
    hashes = {p.name: sha256_file(p) for p in sorted(h5_dir.glob("*.h5"))}  # once: files are GBs
    result: dict[str, Path] = {}
    for kind, name, dt in (("visual", visual_name, visual_dtype or dtype), ("audio", audio_name, dtype)):
        path = h5_dir / FEATURE_FILES[kind]
        with h5py.File(path, "r") as f:
            h = f[KEY]
            if h.shape[0] != len(df):
                raise ValueError(f"{path}: {h.shape[0]} rows but the index has {len(df)} samples")
            n_diff = _check_duplicates(h, df, str(path))
            rec = provenance(
                "import_h5", config, source="released_h5", encoder=name, modality=kind,
                weights={"id": "released_h5", "sha256": hashes[path.name], "file": path.name},
                files=hashes,
                h5_file=str(path), h5_dtype=str(h.dtype), dtype=str(np.dtype(dt)),
                duplicate_rows_differing=n_diff,
            )
            T, step_shape = h.shape[1], tuple(h.shape[2:])
            for shard, rows in groups.items():
                vids = df.loc[rows, "video_id"].astype(str).tolist()
                target = out_dir / name / f"shard-{shard:03d}.zarr"
                with FeatureShardWriter(target, vids, T, step_shape, dt, rec) as w:
                    for i, r in enumerate(rows):
                        w.write(i, h[r], np.arange(T, dtype=float))
                    w.commit()
        result[kind] = out_dir / name
    return result
