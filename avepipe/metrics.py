"""Evaluation metrics: AVE segment accuracy, cross-modal localization, detection mAP.

All results are fractions in [0, 1], never percent (contracts.md "Metrics").

- ``segment_accuracy`` / ``per_class_accuracy`` / ``confusion_matrix``: the AVE
  protocol (REFERENCE §6) scores every one of the N x T segments, background included.
- ``cml_accuracy``: cross-modality localization as AVE-ECCV18 ``cmm_test.py``.
- ``detection_map``: ActivityNet-style temporal detection mAP (UnAV-100, REFERENCE §7),
  VOC-interpolated AP per class, averaged over classes that have ground truth.
"""
from __future__ import annotations

from typing import Sequence

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
    """Fraction of segments whose predicted class equals the target (REFERENCE §6).

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


def _match(pred_group, pred_rank, ps, pe, gt_group_start, gt_group_len, gs, ge, tious):
    """Greedy ActivityNet matching for all (video, class) groups at once.

    Detections are visited by rank within their group (score order); within a group
    each detection takes the unmatched GT with the highest tIoU >= threshold, else it
    is a false positive. Groups are independent, so one step handles the r-th
    detection of every group together (loop length = largest group, not #detections).
    Returns tp (K, n_pred) bool.
    """
    K = len(tious)
    n_groups = len(gt_group_start)
    gmax = int(gt_group_len.max()) if n_groups else 0
    tp = np.zeros((K, len(pred_group)), dtype=bool)
    if gmax == 0:
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
        best = score.argmax(-1)                                                              # (n, K)
        hit = cand.any(-1)
        tp[:, sel] = hit.T
        n_i, k_i = np.nonzero(hit)
        locked[grp[n_i], k_i, best[n_i, k_i]] = True
    return tp


def detection_map(predictions: pd.DataFrame, ground_truth: pd.DataFrame,
                  tious: Sequence[float] = np.arange(0.1, 1.0, 0.1)) -> dict:
    """ActivityNet-style temporal detection mAP.

    ``predictions``: columns video_id, t_start, t_end, label, score.
    ``ground_truth``: columns video_id, t_start, t_end, label.
    Per class: detections sorted by score (descending, ties keep input order); each is a
    true positive at threshold θ if it matches a not yet matched GT of the same video and
    class with tIoU >= θ (the highest such tIoU); a second detection of a GT is a false
    positive. precision/recall -> VOC-interpolated AP. Classes without GT are excluded
    from the mean (ActivityNet's class list comes from the GT); classes with GT but no
    detections score 0.

    Returns {"mAP@0.1": ..., ..., "average_mAP": mean over thresholds,
    "per_class": {label: {"AP@0.1": ..., "average_AP": ...}}, "n_classes": ...}.
    """
    tious = np.asarray(tious, dtype=np.float64).ravel()
    K = len(tious)
    for name, df, cols in (("predictions", predictions, ("video_id", "t_start", "t_end", "label", "score")),
                           ("ground_truth", ground_truth, ("video_id", "t_start", "t_end", "label"))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    gt_classes = pd.unique(ground_truth["label"])
    if len(gt_classes) == 0:
        raise ValueError("ground truth is empty: mAP undefined")
    # common integer codes for videos and labels
    vid_codes, vid_uni = pd.factorize(pd.concat([ground_truth["video_id"], predictions["video_id"]],
                                                ignore_index=True).astype(str))
    lab_codes, lab_uni = pd.factorize(pd.concat([ground_truth["label"], predictions["label"]], ignore_index=True))
    ng = len(ground_truth)
    g_vid, p_vid = vid_codes[:ng], vid_codes[ng:]
    g_lab, p_lab = lab_codes[:ng], lab_codes[ng:]
    gs = ground_truth["t_start"].to_numpy(np.float64)
    ge = ground_truth["t_end"].to_numpy(np.float64)
    ps = predictions["t_start"].to_numpy(np.float64)
    pe = predictions["t_end"].to_numpy(np.float64)
    score = predictions["score"].to_numpy(np.float64)
    n_vid = len(vid_uni)

    # GT groups = (label, video), GTs sorted so each group is contiguous
    g_key = g_lab.astype(np.int64) * n_vid + g_vid
    g_ord = np.argsort(g_key, kind="stable")
    g_key, gs, ge = g_key[g_ord], gs[g_ord], ge[g_ord]
    grp_keys, grp_start, grp_len = np.unique(g_key, return_index=True, return_counts=True)

    # detections: group of their (label, video); -1 when that group has no GT (-> FP)
    p_key = p_lab.astype(np.int64) * n_vid + p_vid
    pos = np.searchsorted(grp_keys, p_key)
    pos_c = np.minimum(pos, len(grp_keys) - 1)
    has_gt = grp_keys[pos_c] == p_key
    # rank within (label, video) by descending score, stable on input order
    p_ord = np.lexsort((np.arange(len(score)), -score, p_key))
    sorted_key = p_key[p_ord]
    first = np.searchsorted(sorted_key, sorted_key, side="left")
    rank = np.empty(len(score), dtype=np.int64)
    rank[p_ord] = np.arange(len(score)) - first

    tp = np.zeros((K, len(score)), dtype=bool)
    m = np.flatnonzero(has_gt)
    if len(m):
        tp[:, m] = _match(pos_c[m], rank[m], ps[m], pe[m], grp_start, grp_len, gs, ge, tious)

    # per class: ranked by score over all videos, cumulative precision / recall
    ap = np.zeros((len(gt_classes), K))
    npos_all = np.bincount(g_lab, minlength=len(lab_uni))
    c_ord = np.lexsort((np.arange(len(score)), -score, p_lab))
    c_sorted = p_lab[c_ord]
    class_codes = pd.Index(lab_uni).get_indexer(gt_classes)
    for i, c in enumerate(class_codes):
        lo, hi = np.searchsorted(c_sorted, [c, c + 1])
        if hi == lo:
            continue  # GT but no detections: AP 0
        t = tp[:, c_ord[lo:hi]]
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
    out["per_class"] = {
        _plain(c): {**{f"AP@{k}": float(v) for k, v in zip(keys, ap[i])}, "average_AP": float(ap[i].mean())}
        for i, c in enumerate(gt_classes)
    }
    return out


def _plain(x):
    return x.item() if hasattr(x, "item") else x
