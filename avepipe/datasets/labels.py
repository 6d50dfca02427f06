"""AVE class list and the label arrays the published heads consume (docs/reference.md §1).

Label layouts match the legacy AVE-ECCV18 files: ``labels.h5`` / ``labels_closs.h5``
(segment one-hot, background = column 28), the binary event mask, and ``mil_labels.h5``
(video-level one-hot whose background column is always 0).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# First-appearance order of the Category field in the real Annotations.txt.
AVE_CLASSES: tuple[str, ...] = (
    "Church bell",
    "Male speech, man speaking",
    "Bark",
    "Fixed-wing aircraft, airplane",
    "Race car, auto racing",
    "Female speech, woman speaking",
    "Helicopter",
    "Violin, fiddle",
    "Flute",
    "Ukulele",
    "Frying (food)",
    "Truck",
    "Shofar",
    "Motorcycle",
    "Acoustic guitar",
    "Train horn",
    "Clock",
    "Banjo",
    "Goat",
    "Baby cry, infant cry",
    "Bus",
    "Chainsaw",
    "Cat",
    "Horse",
    "Toilet flush",
    "Rodents, rats, mice",
    "Accordion",
    "Mandolin",
)
NUM_CLASSES = 28
BACKGROUND = 28
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(AVE_CLASSES)}


def _check(label: int, start: int, end: int, n_segments: int) -> None:
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label {label} outside 0..{NUM_CLASSES - 1}")
    if not 0 <= start <= end <= n_segments:
        raise ValueError(f"event [{start},{end}) not inside 0..{n_segments}")


def event_mask(label: int, start: int, end: int, n_segments: int = 10) -> np.ndarray:
    """(T,) float32: 1 on seconds [start, end), 0 elsewhere."""
    _check(label, start, end, n_segments)
    t = np.arange(n_segments)
    return ((t >= start) & (t < end)).astype(np.float32)


def segment_labels(label: int, start: int, end: int, n_segments: int = 10) -> np.ndarray:
    """(T, 29) float32 one-hot: ``label`` on seconds [start, end), background (28) elsewhere."""
    mask = event_mask(label, start, end, n_segments).astype(bool)
    out = np.zeros((n_segments, NUM_CLASSES + 1), dtype=np.float32)
    out[mask, int(label)] = 1.0
    out[~mask, BACKGROUND] = 1.0
    return out


def video_label(label: int, start: int = 0, end: int = 10, n_segments: int = 10) -> np.ndarray:
    """(29,) float32 video-level one-hot (the background column is always 0, as ``mil_labels.h5``).

    A zero-length event still carries its class: the video is annotated with it.
    """
    _check(label, start, end, n_segments)
    out = np.zeros(NUM_CLASSES + 1, dtype=np.float32)
    out[int(label)] = 1.0
    return out


def ave_label_arrays(df: pd.DataFrame, n_segments: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised labels for an annotations table with columns ``label``, ``start``, ``end``.

    Returns (segment (N,T,29), mask (N,T), video (N,29)), float32, rows in ``df`` order.
    """
    label = df["label"].to_numpy(dtype=np.int64)
    start = df["start"].to_numpy(dtype=np.int64)
    end = df["end"].to_numpy(dtype=np.int64)
    bad = (label < 0) | (label >= NUM_CLASSES) | (start < 0) | (end < start) | (end > n_segments)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"row {i}: label {label[i]} / event [{start[i]},{end[i]}) invalid")
    n = len(label)
    t = np.arange(n_segments)[None, :]
    mask = (t >= start[:, None]) & (t < end[:, None])
    seg = np.zeros((n, n_segments, NUM_CLASSES + 1), dtype=np.float32)
    rows = np.broadcast_to(np.arange(n)[:, None], mask.shape)
    cols = np.where(mask, label[:, None], BACKGROUND)
    seg[rows, np.broadcast_to(t, mask.shape), cols] = 1.0
    video = np.zeros((n, NUM_CLASSES + 1), dtype=np.float32)
    video[np.arange(n), label] = 1.0
    return seg, mask.astype(np.float32), video
