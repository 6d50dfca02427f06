"""Evaluation metrics: AVE segment accuracy, cross-modal localization, detection mAP.

All results are fractions in [0, 1], never percent (contracts.md "Metrics").

- ``segment_accuracy`` / ``per_class_accuracy`` / ``confusion_matrix``: the AVE
  protocol (docs/reference.md §9) scores every one of the N x T segments, background included.
- ``cml_accuracy``: cross-modality localization as AVE-ECCV18 ``cmm_test.py``.
- ``detection_map``: temporal detection mAP as the UnAV-100 evaluation computes it
  (ActivityNet-style, VOC-interpolated AP per class, averaged over classes that have ground
  truth; its duplicate and tie rules below), ``precision_recall`` its curves at one tIoU,
  ``unav_ground_truth`` the ground truth of a split from the annotations.

Why one long module: reproducing the reference's ranking of tied scores needs numpy's
own argsort written out (``reference_argsort``); the detection half could be its own module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

BACKGROUND = 28


def _as_labels(x) -> np.ndarray:
    """Integer class per segment; one-hot / score arrays (N,T,C) are reduced by argmax."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3:
        x = x.argmax(-1)
    return x.astype(np.int64)


# --------------------------------------------------------------------------- AVE segments
def segment_accuracy(pred, target) -> float:
    """Fraction of segments whose predicted class equals the target (the AVE protocol).

    ``pred``/``target``: (N, T) class ids (background = 28), or (N, T, 29) one-hot /
    scores, reduced by argmax. Numpy arrays or torch tensors.
    """
    p, t = _as_labels(pred), _as_labels(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
    if p.size == 0:
        raise ValueError("no segments to score")
    return float((p == t).mean())


def confusion_matrix(pred, target, num_classes: int = 29) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    p, t = _as_labels(pred).ravel(), _as_labels(target).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
    bad = (p < 0) | (p >= num_classes) | (t < 0) | (t >= num_classes)
    if bad.any():
        raise ValueError(f"class ids outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes).astype(np.int64)


def per_class_accuracy(pred, target, num_classes: int = 29) -> np.ndarray:
    """(C,) float: per true class, the fraction of its segments predicted correctly.

    NaN for classes with no target segment (nothing to score).
    """
    cm = confusion_matrix(pred, target, num_classes)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


# --------------------------------------------------------------------------- CML
def cml_accuracy(v_emb, a_emb, event_mask, direction: str = "A2V") -> float:
    """Cross-modality localization accuracy, AVE-ECCV18 ``cmm_test.py``.

    For each video whose event mask is neither all-event nor empty: take the event
    segments ``seg`` (length l) of the query modality and slide them over the 10-l+1
    positions p of the other modality; the score of p is the summed Euclidean
    distance sum_i ||other[p+i] - query[seg[i]]||. Correct iff argmin_p == seg[0].

    ``direction``: "A2V" (audio event given, localize it in the visual stream) or
    "V2A" (visual event given, localize it in the audio stream).
    ``v_emb``, ``a_emb``: (N, T, D); ``event_mask``: (N, T) 0/1.
    """
    if direction not in ("A2V", "V2A"):
        raise ValueError(f"direction must be 'A2V' or 'V2A', got {direction!r}")
    v, a, m = (_np(x) for x in (v_emb, a_emb, event_mask))
    m = m > 0.5
    if v.shape != a.shape or v.shape[:2] != m.shape:
        raise ValueError(f"shapes disagree: v {v.shape}, a {a.shape}, mask {m.shape}")
    n, T = m.shape
    lens = m.sum(1)
    keep = (lens > 0) & (lens < T)     # cmm_test skips all-event videos; empty has no query
    if not keep.any():
        raise ValueError("no video with a partial event: CML accuracy undefined")
    # D[n, i, j] = ||v[n, i] - a[n, j]||: visual step i vs audio step j.
    d = np.sqrt(np.maximum(((v[:, :, None, :] - a[:, None, :, :]) ** 2).sum(-1), 0.0))
    correct = 0
    for l in np.unique(lens[keep]):
        rows = np.flatnonzero(keep & (lens == l))
        # event indices in time order, (n_l, l)
        seg = np.stack([np.flatnonzero(m[r]) for r in rows])
        pos = np.arange(T - l + 1)[:, None] + np.arange(l)[None, :]     # (P, l) window steps
        dd = d[rows]                                                   # (n_l, T, T)
        r_ = np.arange(len(rows))[:, None, None]
        if direction == "A2V":   # query = audio at seg, candidates = visual windows
            s = dd[r_, pos[None], seg[:, None, :]].sum(-1)             # (n_l, P)
        else:                    # query = visual at seg, candidates = audio windows
            s = dd[r_, seg[:, None, :], pos[None]].sum(-1)
        correct += int((s.argmin(1) == seg[:, 0]).sum())
    return correct / int(keep.sum())


def cml_accuracies(v_emb, a_emb, event_mask) -> dict:
    """{"A2V", "V2A", "average"} fractions."""
    a2v = cml_accuracy(v_emb, a_emb, event_mask, "A2V")
    v2a = cml_accuracy(v_emb, a_emb, event_mask, "V2A")
    return {"A2V": a2v, "V2A": v2a, "average": (a2v + v2a) / 2}


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------- detection mAP
# UnAV-100 is scored with the UnAV repository's evaluation (libs/utils/metrics.py there, an
# ActivityNet adaptation); what it does beyond plain ActivityNet mAP, and avepipe with it:
#  * ground truth: every event of every video of the split in the annotation file, after
#    dropping an event that repeats an earlier kept event of its video (same label, both
#    boundaries within 1e-3 s) -- ``drop_duplicate_events`` / ``unav_ground_truth``;
#  * ranking: per class, predictions in input order, then ``scores.argsort()[::-1]`` with
#    numpy's default (quicksort) argsort. That sort is not stable: up to 16 items it is an
#    insertion sort, so tied scores come out last-listed first; beyond that the order is
#    numpy's introsort's. The reference needs numpy < 1.24 (it uses ``np.float``), whose
#    argsort is that plain introsort on every CPU; newer numpy uses SIMD sorts on AVX-512
#    CPUs that order ties differently. ``reference_argsort`` reproduces numpy < 1.24's;
#  * matching: a detection takes the unmatched GT of its video and class with the highest
#    tIoU >= threshold, GTs ranked by ``tiou.argsort()[::-1]`` (so among equal tIoU the
#    last-listed GT first, same sort rules as above).
# Not reproduced: the reference renumbers GT labels to 0..C-1 and renumbers predictions
# with the same map, so a prediction of a label absent from the GT lands in another class
# when the GT does not hold every label (all 100 UnAV-100 test labels are present, so its
# published numbers are unaffected); here such predictions are simply not scored.
#  * thresholds: ``np.linspace(0.1, 0.9, 9)`` (``UNAV_TIOUS``), whose third and seventh values
#    are 0.30000000000000004 and 0.7000000000000001: a tIoU of exactly 0.3 or 0.7 misses them.
SMALL_SORT = 16  # numpy sorts at most this many items by insertion sort (SMALL_QUICKSORT + 1)
UNAV_TIOUS = np.linspace(0.1, 0.9, 9)  # the reference's thresholds, bit for bit


def _tiou_key(t: float) -> str:
    return f"{round(float(t), 6):g}"


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """VOC-style interpolated AP (ActivityNet ``interpolated_prec_rec``), batched.

    ``precision``/``recall``: (K, P) curves over the ranked detections; returns (K,).
    The precision envelope is made monotone from the right, then summed over the
    recall steps: AP = sum_i (r_i - r_{i-1}) * max_{j >= i} p_j.
    """
    k = precision.shape[0]
    mprec = np.concatenate([np.zeros((k, 1)), precision, np.zeros((k, 1))], axis=1)
    mrec = np.concatenate([np.zeros((k, 1)), recall, np.ones((k, 1))], axis=1)
    env = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
    # only steps where recall changes contribute; the closing (recall 1, prec 0) adds 0.
    return ((mrec[:, 1:] - mrec[:, :-1]) * env[:, 1:]).sum(1)


def _sift_down(v: list, idx: list, o: int, i: int, n: int) -> None:
    """Move heap item ``i`` (1-based, ``a[k] = idx[o + k]``) down a heap of ``n`` items."""
    tmp = idx[o + i]
    vt, j = v[tmp], i << 1
    while j <= n:
        if j < n and v[idx[o + j]] < v[idx[o + j + 1]]:
            j += 1
        if not vt < v[idx[o + j]]:
            break
        idx[o + i] = idx[o + j]
        i, j = j, j + j
    idx[o + i] = tmp


def _heapsort(v: list, idx: list, lo: int, n: int) -> None:
    """numpy's ``aheapsort`` on ``idx[lo:lo+n]`` (1-based heap: a[k] = idx[lo + k - 1])."""
    o = lo - 1
    for i in range(n >> 1, 0, -1):
        _sift_down(v, idx, o, i, n)
    while n > 1:
        idx[o + 1], idx[o + n] = idx[o + n], idx[o + 1]
        n -= 1
        _sift_down(v, idx, o, 1, n)


def reference_argsort(values) -> np.ndarray:
    """``np.argsort(values)`` as numpy < 1.24 computes it on any CPU (ties included).

    numpy's default ``quicksort`` kind is an introsort: median-of-3 Hoare partitions down
    to ranges of at most 16 items, which are insertion-sorted; a heapsort takes over a range
    popped after 2*floor(log2 n) partition levels. Written out here because newer numpy
    dispatches to SIMD sorts that order equal values differently on AVX-512 CPUs, and the
    UnAV evaluation's ranking of tied scores is this order reversed. Finite values only.
    """
    v = np.asarray(values, dtype=np.float64).ravel().tolist()
    n = len(v)
    idx = list(range(n))
    stack: list[tuple[int, int, int]] = []
    pl, pr = 0, n - 1
    depth = 2 * (n.bit_length() - 1) if n else 0
    while n > 1:
        if depth < 0:
            _heapsort(v, idx, pl, pr - pl + 1)
        else:
            while pr - pl > SMALL_SORT - 1:
                pm = pl + ((pr - pl) >> 1)
                if v[idx[pm]] < v[idx[pl]]:
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                if v[idx[pr]] < v[idx[pm]]:
                    idx[pr], idx[pm] = idx[pm], idx[pr]
                if v[idx[pm]] < v[idx[pl]]:
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                vp = v[idx[pm]]
                pi, pj = pl, pr - 1
                idx[pm], idx[pj] = idx[pj], idx[pm]
                while True:
                    pi += 1
                    while v[idx[pi]] < vp:
                        pi += 1
                    pj -= 1
                    while vp < v[idx[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    idx[pi], idx[pj] = idx[pj], idx[pi]
                idx[pi], idx[pr - 1] = idx[pr - 1], idx[pi]
                depth -= 1
                if pi - pl < pr - pi:  # the larger part waits on the stack
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            for i in range(pl + 1, pr + 1):
                t = idx[i]
                vt, j = v[t], i
                while j > pl and vt < v[idx[j - 1]]:
                    idx[j] = idx[j - 1]
                    j -= 1
                idx[j] = t
        if not stack:
            break
        pl, pr, depth = stack.pop()
    return np.asarray(idx, dtype=np.int64)


def reference_rank(scores) -> np.ndarray:
    """Positions best first as the UnAV evaluation ranks them: ``scores.argsort()[::-1]``
    (numpy < 1.24). Without ties that is plain descending order; with ties up to 16 items
    the last-listed comes first; beyond that, ``reference_argsort``'s order reversed."""
    v = np.asarray(scores, dtype=np.float64).ravel()
    n = len(v)
    s = np.sort(v)
    if n < 2 or not (s[1:] == s[:-1]).any():
        return np.argsort(-v, kind="stable")
    if n <= SMALL_SORT:  # insertion sort: stable; reversed -> ties last-listed first
        return np.lexsort((-np.arange(n), -v))
    return reference_argsort(v)[::-1].copy()


def drop_duplicate_events(ground_truth: pd.DataFrame, tol: float = 1e-3) -> tuple[pd.DataFrame, int]:
    """Ground truth without repeated events, as the UnAV evaluation reads it.

    Within each video, in row order, an event is dropped when an already kept event has the
    same label and both boundaries within ``tol`` seconds (``|s - s'| <= tol`` and
    ``|e - e'| <= tol``; compared with kept events only). Returns (kept rows, number dropped).
    """
    n = len(ground_truth)
    if n < 2:
        return ground_truth, 0
    vid = pd.factorize(ground_truth["video_id"].astype(str))[0].astype(np.int64)
    lab = pd.factorize(ground_truth["label"])[0].astype(np.int64)
    key = vid * (int(lab.max()) + 1) + lab
    order = np.argsort(key, kind="stable")
    sk = key[order]
    cuts = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    s = ground_truth["t_start"].to_numpy(np.float64)
    e = ground_truth["t_end"].to_numpy(np.float64)
    keep = np.ones(n, dtype=bool)
    for rows in np.split(order, cuts):
        if len(rows) < 2:
            continue
        kept: list[int] = []
        for r in rows:  # rows of one (video, label), in input order
            if any(abs(s[r] - s[k]) <= tol and abs(e[r] - e[k]) <= tol for k in kept):
                keep[r] = False
            else:
                kept.append(r)
    n_drop = int(n - keep.sum())
    return (ground_truth[keep] if n_drop else ground_truth), n_drop


def _match(pred_group, pred_rank, ps, pe, gt_group_start, gt_group_len, gs, ge, tious):
    """Greedy matching as the UnAV / ActivityNet evaluation does it, all (video, class)
    groups at once.

    Detections are visited by rank within their group (score order); each takes the
    unmatched GT with the highest tIoU >= threshold (equal tIoU: the GT the reference's
    ``tiou.argsort()[::-1]`` lists first, i.e. the last-listed for groups of up to 16 GT),
    else it is a false positive. Groups are independent, so one step handles the r-th
    detection of every group together (loop length = largest group, not #detections).
    Returns tp (K, n_pred) bool.
    """
    K = len(tious)
    n_groups = len(gt_group_start)
    gmax = int(gt_group_len.max()) if n_groups else 0
    tp = np.zeros((K, len(pred_group)), dtype=bool)
    if gmax == 0 or len(pred_group) == 0:
        return tp
    # padded GT table per group
    col = np.arange(gmax)
    valid = col[None, :] < gt_group_len[:, None]
    gidx = np.where(valid, gt_group_start[:, None] + col[None, :], 0)
    g_s, g_e = gs[gidx], ge[gidx]
    locked = np.zeros((n_groups, K, gmax), dtype=bool)
    order = np.argsort(pred_rank, kind="stable")
    bounds = np.searchsorted(pred_rank[order], np.arange(int(pred_rank.max()) + 2))
    th = np.asarray(tious, dtype=np.float64)[None, :, None]
    for r in range(len(bounds) - 1):
        sel = order[bounds[r]:bounds[r + 1]]
        if len(sel) == 0:
            continue
        grp = pred_group[sel]
        inter = np.clip(np.minimum(pe[sel, None], g_e[grp]) - np.maximum(ps[sel, None], g_s[grp]), 0, None)
        union = (pe[sel] - ps[sel])[:, None] + (g_e[grp] - g_s[grp]) - inter
        iou = np.where(valid[grp] & (union > 0), inter / np.where(union > 0, union, 1.0), -1.0)  # (n, G)
        cand = (iou[:, None, :] >= th) & ~locked[grp]                                       # (n, K, G)
        score = np.where(cand, iou[:, None, :], -np.inf)
        best = gmax - 1 - score[..., ::-1].argmax(-1)          # highest tIoU, ties: last-listed GT
        hit = cand.any(-1)
        big = np.flatnonzero((gt_group_len[grp] > SMALL_SORT) & hit.any(1))
        for i in big:  # > 16 GT of one class in one video: the reference's introsort order
            L = int(gt_group_len[grp[i]])
            ranked = reference_rank(iou[i, :L])
            for k in np.flatnonzero(hit[i]):
                best[i, k] = ranked[np.argmax(cand[i, k, ranked])]
        tp[:, sel] = hit.T
        n_i, k_i = np.nonzero(hit)
        locked[grp[n_i], k_i, best[n_i, k_i]] = True
    return tp


def _check_columns(predictions: pd.DataFrame, ground_truth: pd.DataFrame) -> None:
    for name, df, cols in (("predictions", predictions, ("video_id", "t_start", "t_end", "label", "score")),
                           ("ground_truth", ground_truth, ("video_id", "t_start", "t_end", "label"))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    score = predictions["score"].to_numpy(np.float64)
    if not np.isfinite(score).all():
        i = int(np.flatnonzero(~np.isfinite(score))[0])
        raise ValueError(f"predictions row {i}: score {score[i]} is not finite")


def _evaluate(predictions: pd.DataFrame, ground_truth: pd.DataFrame, tious) -> dict:
    """Shared by ``detection_map`` and ``precision_recall``: duplicates dropped, predictions
    ranked per class as the reference, matched. Returns the pieces both need."""
    _check_columns(predictions, ground_truth)
    ground_truth, n_dup = drop_duplicate_events(ground_truth)
    gt_classes = pd.unique(ground_truth["label"])
    if len(gt_classes) == 0:
        raise ValueError("ground truth is empty: mAP undefined")
    # common integer codes for videos and labels
    vid_codes, vid_uni = pd.factorize(pd.concat([ground_truth["video_id"], predictions["video_id"]],
                                                ignore_index=True).astype(str))
    lab_codes, lab_uni = pd.factorize(pd.concat([ground_truth["label"], predictions["label"]], ignore_index=True))
    ng = len(ground_truth)
    g_vid, p_vid = vid_codes[:ng], vid_codes[ng:]
    g_lab, p_lab = lab_codes[:ng].astype(np.int64), lab_codes[ng:].astype(np.int64)
    gs = ground_truth["t_start"].to_numpy(np.float64)
    ge = ground_truth["t_end"].to_numpy(np.float64)
    ps = predictions["t_start"].to_numpy(np.float64)
    pe = predictions["t_end"].to_numpy(np.float64)
    score = predictions["score"].to_numpy(np.float64)
    n_vid, n_pred = len(vid_uni), len(score)

    # GT groups = (label, video), GTs sorted so each group is contiguous (input order inside)
    g_key = g_lab * n_vid + g_vid
    g_ord = np.argsort(g_key, kind="stable")
    g_key, gs, ge = g_key[g_ord], gs[g_ord], ge[g_ord]
    grp_keys, grp_start, grp_len = np.unique(g_key, return_index=True, return_counts=True)

    # per class: its predictions in input order, ranked as the reference ranks them
    c_ord = np.argsort(p_lab, kind="stable")
    c_cuts = np.flatnonzero(p_lab[c_ord][1:] != p_lab[c_ord][:-1]) + 1
    ranked: dict[int, np.ndarray] = {}
    class_pos = np.empty(n_pred, dtype=np.int64)
    for rows in (np.split(c_ord, c_cuts) if n_pred else []):
        rows = rows[reference_rank(score[rows])]
        ranked[int(p_lab[rows[0]])] = rows
        class_pos[rows] = np.arange(len(rows))

    # detections: group of their (label, video); none when that group has no GT (-> FP)
    p_key = p_lab * n_vid + p_vid
    tp = np.zeros((len(tious), n_pred), dtype=bool)
    if len(grp_keys) and n_pred:
        pos = np.minimum(np.searchsorted(grp_keys, p_key), len(grp_keys) - 1)
        m = np.flatnonzero(grp_keys[pos] == p_key)
        if len(m):
            # rank within (label, video) follows the class ranking
            o = np.lexsort((class_pos[m], p_key[m]))
            sk = p_key[m][o]
            rank = np.empty(len(m), dtype=np.int64)
            rank[o] = np.arange(len(m)) - np.searchsorted(sk, sk, side="left")
            tp[:, m] = _match(pos[m], rank, ps[m], pe[m], grp_start, grp_len, gs, ge, tious)
    class_codes = pd.Index(lab_uni).get_indexer(gt_classes)
    return {"gt_classes": gt_classes, "class_codes": class_codes, "ranked": ranked, "tp": tp,
            "npos": np.bincount(g_lab, minlength=len(lab_uni)), "n_gt": ng, "score": score,
            "n_duplicates": n_dup}


def detection_map(predictions: pd.DataFrame, ground_truth: pd.DataFrame,
                  tious: Sequence[float] = UNAV_TIOUS) -> dict:
    """Temporal detection mAP as the UnAV-100 / ActivityNet evaluation computes it.

    ``predictions``: columns video_id, t_start, t_end, label, score (finite).
    ``ground_truth``: columns video_id, t_start, t_end, label; build it with
    ``unav_ground_truth`` so that videos without predictions (failed, missing) count.
    Repeated GT events are dropped first (``drop_duplicate_events``). Per class:
    detections ranked by score as the reference ranks them (``reference_rank``: ties are
    not kept in input order); each is a true positive at threshold θ if it matches a not
    yet matched GT of the same video and class with tIoU >= θ (the highest such tIoU); a
    second detection of a GT is a false positive. precision/recall -> VOC-interpolated AP.
    Classes without GT are excluded from the mean (the class list comes from the GT);
    classes with GT but no detections score 0. ``tious`` default to the reference's
    ``UNAV_TIOUS`` (pass those, not rounded decimals, to match it at tIoU exactly 0.3 / 0.7).

    Returns {"mAP@0.1": ..., ..., "average_mAP": mean over thresholds,
    "per_class": {label: {"AP@0.1": ..., "average_AP": ...}}, "n_classes": ...,
    "gt_duplicates_dropped": ...}.
    """
    tious = np.asarray(tious, dtype=np.float64).ravel()
    K = len(tious)
    ev = _evaluate(predictions, ground_truth, tious)
    gt_classes, tp, npos_all = ev["gt_classes"], ev["tp"], ev["npos"]
    ap = np.zeros((len(gt_classes), K))
    for i, c in enumerate(ev["class_codes"]):
        rows = ev["ranked"].get(int(c))
        if rows is None:
            continue  # GT but no detections: AP 0
        t = tp[:, rows]
        ctp = np.cumsum(t, axis=1)
        cfp = np.cumsum(~t, axis=1)
        rec = ctp / npos_all[c]
        prec = ctp / (ctp + cfp)
        ap[i] = interpolated_ap(prec, rec)

    out: dict = {}
    keys = [_tiou_key(t) for t in tious]
    mean = ap.mean(0)
    for k, v in zip(keys, mean):
        out[f"mAP@{k}"] = float(v)
    out["average_mAP"] = float(mean.mean())
    out["n_classes"] = int(len(gt_classes))
    out["gt_duplicates_dropped"] = int(ev["n_duplicates"])
    out["per_class"] = {
        _plain(c): {**{f"AP@{k}": float(v) for k, v in zip(keys, ap[i])}, "average_AP": float(ap[i].mean())}
        for i, c in enumerate(gt_classes)
    }
    return out


def precision_recall(predictions: pd.DataFrame, ground_truth: pd.DataFrame, tiou: float = 0.5) -> dict:
    """Precision / recall curves at one tIoU, matched and ranked exactly as ``detection_map``.

    Returns {"tiou", "per_class": {label: {"precision", "recall" (arrays over that class's
    ranked detections), "n_gt"}} for every class with GT, "pooled": {...}}: "pooled" ranks
    every detection of every class together (same ranking rule), recall over all ground
    truth (a micro-averaged curve). ``interpolated_ap`` of a class's curve is its AP.
    """
    ev = _evaluate(predictions, ground_truth, [float(tiou)])
    tp, score = ev["tp"][0], ev["score"]

    def curve(rows: np.ndarray, n_gt: int) -> dict:
        ctp = np.cumsum(tp[rows])
        k = np.arange(1, len(rows) + 1)
        return {"precision": ctp / np.maximum(k, 1), "recall": ctp / max(n_gt, 1), "n_gt": int(n_gt)}

    empty = np.zeros(0, dtype=np.int64)
    per = {_plain(c): curve(ev["ranked"].get(int(code), empty), int(ev["npos"][code]))
           for c, code in zip(ev["gt_classes"], ev["class_codes"])}
    return {"tiou": float(tiou), "per_class": per, "pooled": curve(reference_rank(score), ev["n_gt"])}


# --------------------------------------------------------------------------- UnAV-100 ground truth
@dataclass
class GroundTruth:
    """Ground truth of one split, from the annotations (not from what decoded).

    ``events``: video_id, t_start, t_end, label (label_id), repeated events dropped.
    ``video_ids``: every annotated video of the split, in annotation order.
    ``not_evaluated``: annotated videos absent from ``evaluated`` (failed decode or
    extraction, missing file): all their events count as missed.
    """

    events: pd.DataFrame
    video_ids: list[str]
    not_evaluated: list[str]
    n_events_not_evaluated: int
    n_duplicates_dropped: int

    def report(self) -> dict:
        """JSON-able counts for ``metrics.json``."""
        return {"n_gt_videos": len(self.video_ids), "n_gt_events": int(len(self.events)),
                "n_videos_not_evaluated": len(self.not_evaluated),
                "videos_not_evaluated": list(self.not_evaluated),
                "n_events_not_evaluated": int(self.n_events_not_evaluated),
                "gt_duplicates_dropped": int(self.n_duplicates_dropped)}


def unav_ground_truth(annotations, split: str = "test", evaluated: Iterable[str] | None = None,
                      tol: float = 1e-3) -> GroundTruth:
    """Ground truth of ``split`` as the UnAV evaluation builds it: every video of the split.

    ``annotations``: the sample index / manifest (columns ``video_id``, ``split``,
    ``events``: JSON list of ``{"segment": [t0, t1], "label_id"}`` as ``read_unav100``
    writes it) or the path of ``unav100_annotations.json``. ``split``: ``test``, ``val``
    (``validation`` accepted) or ``train``. ``evaluated``: the video ids the model was run
    on; every other annotated video of the split is listed in ``not_evaluated`` and its
    events stay in the ground truth, so they count as missed (None: all evaluated).
    Repeated events are dropped as the reference does (``drop_duplicate_events``).
    """
    if isinstance(annotations, (str, Path)):
        from avepipe.datasets.unav100 import read_unav100

        annotations = read_unav100(annotations)[0]
    for col in ("video_id", "split", "events"):
        if col not in annotations.columns:
            raise ValueError(f"annotations lack column {col!r} (an UnAV-100 index or manifest is needed)")
    split = "val" if split == "validation" else split
    rows = annotations[annotations["split"].astype(str) == split]
    rows = rows.drop_duplicates("video_id", keep="first")
    records = []
    for vid, events in zip(rows["video_id"].astype(str), rows["events"]):
        for e in json.loads(events) if isinstance(events, str) else events:
            records.append((vid, float(e["segment"][0]), float(e["segment"][1]), int(e["label_id"])))
    table = pd.DataFrame(records, columns=["video_id", "t_start", "t_end", "label"])
    table, n_dup = drop_duplicate_events(table, tol)
    table = table.reset_index(drop=True)
    video_ids = rows["video_id"].astype(str).tolist()
    done = set(video_ids) if evaluated is None else {str(v) for v in evaluated}
    missing = [v for v in video_ids if v not in done]
    n_missing_events = int(table["video_id"].isin(missing).sum())
    return GroundTruth(table, video_ids, missing, n_missing_events, n_dup)


def _plain(x):
    return x.item() if hasattr(x, "item") else x
