"""avepipe.metrics against hand-computed values and a plain-loop ActivityNet reference."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from avepipe import metrics as M


# --------------------------------------------------------------------------- AVE segments
PRED = np.array([[0, 28, 1], [2, 2, 28]])
TARGET = np.array([[0, 28, 28], [2, 1, 28]])


def test_segment_accuracy_by_hand():
    # matches: 0=0 yes, 28=28 yes, 1 vs 28 no, 2=2 yes, 2 vs 1 no, 28=28 yes -> 4/6
    assert M.segment_accuracy(PRED, TARGET) == pytest.approx(4 / 6)


def test_segment_accuracy_accepts_one_hot_and_checks_shapes():
    onehot = np.eye(29)[TARGET]
    assert M.segment_accuracy(PRED, onehot) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        M.segment_accuracy(PRED[:1], TARGET)


def test_confusion_matrix_by_hand():
    cm = M.confusion_matrix(PRED, TARGET, num_classes=29)
    assert cm.shape == (29, 29) and cm.sum() == 6
    expected = {(0, 0): 1, (28, 28): 2, (28, 1): 1, (2, 2): 1, (1, 2): 1}  # (true, pred)
    for (t, p), n in expected.items():
        assert cm[t, p] == n
    assert sum(expected.values()) == cm.sum()


def test_per_class_accuracy_by_hand():
    acc = M.per_class_accuracy(PRED, TARGET, num_classes=29)
    # class 0: 1/1; class 1: 0/1 (predicted 2); class 2: 1/1; background: 2 of 3
    assert acc[0] == 1.0 and acc[1] == 0.0 and acc[2] == 1.0
    assert acc[28] == pytest.approx(2 / 3)
    assert np.isnan(acc[3:28]).all()       # no target segment: undefined, not 0


# --------------------------------------------------------------------------- CML
def test_cml_accuracy_constructed():
    T = 10
    t = np.arange(T, dtype=float)
    zeros = np.zeros(T)
    v = np.zeros((4, T, 2))
    a = np.zeros((4, T, 2))
    mask = np.zeros((4, T))
    # video 0: event [3,6), both streams v[t] = a[t] = (t,0): distance |i-j|.
    #   A2V score(p) = sum_i |p+i - (3+i)| = 3|p-3| -> argmin 3 == start: correct; V2A same.
    v[0] = np.stack([t, zeros], 1)
    a[0] = np.stack([t, zeros], 1)
    mask[0, 3:6] = 1
    # video 1: event [0,2), audio shifted by 4: a[t] = (t+4, 0).
    #   A2V score(p) = sum_i |(p+i) - (i+4)| = 2|p-4| -> argmin 4 != 0: wrong.
    #   V2A score(p) = sum_i |i - (p+i+4)| = 2(p+4)  -> argmin 0 == 0: correct.
    v[1] = np.stack([t, zeros], 1)
    a[1] = np.stack([t + 4, zeros], 1)
    mask[1, 0:2] = 1
    # video 2: all-event -> skipped (cmm_test.py); video 3: no event -> skipped.
    v[2] = np.random.default_rng(0).normal(size=(T, 2))
    mask[2] = 1
    assert M.cml_accuracy(v, a, mask, "A2V") == pytest.approx(1 / 2)
    assert M.cml_accuracy(v, a, mask, "V2A") == pytest.approx(2 / 2)
    assert M.cml_accuracies(v, a, mask) == pytest.approx({"A2V": 0.5, "V2A": 1.0, "average": 0.75})
    with pytest.raises(ValueError):
        M.cml_accuracy(v, a, mask, "AV")


def test_cml_accuracy_matches_loop_reference():
    rng = np.random.default_rng(1)
    n, T, D = 30, 10, 4
    v, a = rng.normal(size=(n, T, D)), rng.normal(size=(n, T, D))
    mask = np.zeros((n, T))
    for i in range(n):
        s = rng.integers(0, 9)
        e = rng.integers(s + 1, 11)
        mask[i, s:e] = 1
    for direction in ("A2V", "V2A"):
        correct = total = 0
        for i in range(n):      # cmm_test.py, written as a plain loop
            seg = np.flatnonzero(mask[i])
            l = len(seg)
            if l == T:
                continue
            total += 1
            score = []
            for p in range(T - l + 1):
                s = 0.0
                for j in range(l):
                    if direction == "A2V":
                        s += np.linalg.norm(v[i, p + j] - a[i, seg[j]])
                    else:
                        s += np.linalg.norm(v[i, seg[j]] - a[i, p + j])
                score.append(s)
            correct += int(np.argmin(score) == seg[0])
        assert M.cml_accuracy(v, a, mask, direction) == pytest.approx(correct / total)


# --------------------------------------------------------------------------- detection mAP
def _df(rows, score=True):
    cols = ["video_id", "t_start", "t_end", "label"] + (["score"] if score else [])
    return pd.DataFrame(rows, columns=cols)


def test_detection_ap_duplicates_by_hand():
    gt = _df([("v1", 0, 10, "a"), ("v2", 20, 30, "a")], score=False)
    pred = _df([
        ("v1", 0, 10, "a", 0.9),   # tIoU 1 with v1 GT -> TP
        ("v1", 0, 10, "a", 0.8),   # same GT again -> FP (duplicate)
        ("v2", 20, 25, "a", 0.7),  # tIoU 5/10 = 0.5 with v2 GT
        ("v3", 0, 5, "a", 0.6),    # video without GT -> FP
    ])
    res = M.detection_map(pred, gt, tious=[0.5, 0.6])
    # theta 0.5: TP FP TP FP, npos 2 -> precision 1, 1/2, 2/3, 1/2; recall 1/2, 1/2, 1, 1
    #   envelope at recall steps: 1 (0->1/2), 2/3 (1/2->1) -> AP = 0.5*1 + 0.5*2/3 = 5/6
    assert res["mAP@0.5"] == pytest.approx(5 / 6)
    # theta 0.6: the 0.5 match fails -> TP FP FP FP: recall stays 1/2 -> AP = 0.5*1 = 1/2
    assert res["mAP@0.6"] == pytest.approx(1 / 2)
    assert res["average_mAP"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert res["per_class"]["a"]["AP@0.5"] == pytest.approx(5 / 6)


def test_detection_ap_overlapping_gts_takes_highest_tiou():
    gt = _df([("v", 0, 10, "a"), ("v", 5, 15, "a")], score=False)
    pred = _df([
        # [4,12]: with GT1 [0,10] inter 6, union 12 -> 0.5; with GT2 [5,15] inter 7, union 11 -> 0.636
        ("v", 4, 12, "a", 0.9),
        # [0,10]: GT1 tIoU 1, GT2 5/15
        ("v", 0, 10, "a", 0.8),
    ])
    res = M.detection_map(pred, gt, tious=[0.5, 0.6, 0.7])
    # 0.5: first detection takes GT2 (highest tIoU, not the first GT), second takes GT1
    #   -> TP TP, AP = 1. (Taking GT1 first would leave the second an FP: AP 0.5.)
    assert res["mAP@0.5"] == pytest.approx(1.0)
    # 0.6: 0.636 >= 0.6 -> GT2; second -> GT1: AP 1
    assert res["mAP@0.6"] == pytest.approx(1.0)
    # 0.7: FP then TP -> precision 0, 1/2; recall 0, 1/2 -> AP = 0.5 * 0.5 = 0.25
    assert res["mAP@0.7"] == pytest.approx(0.25)


def test_detection_classes_without_gt_excluded_and_missing_predictions_zero():
    gt = _df([("v", 0, 10, "a"), ("v", 20, 30, "b")], score=False)
    pred = _df([("v", 0, 10, "a", 0.9),       # perfect for a -> AP 1
                ("v", 40, 50, "c", 0.8)])     # class c has no GT -> not in the mean
    res = M.detection_map(pred, gt)           # b has GT but no detection -> AP 0
    assert res["n_classes"] == 2
    assert set(res["per_class"]) == {"a", "b"}
    assert res["per_class"]["b"]["average_AP"] == 0.0
    for k in ["mAP@0.1", "mAP@0.5", "mAP@0.9"]:
        assert res[k] == pytest.approx(0.5)   # (1 + 0) / 2
    assert res["average_mAP"] == pytest.approx(0.5)


def test_detection_ranking_by_score_not_input_order():
    gt = _df([("v", 0, 10, 3)], score=False)
    pred = _df([("v", 50, 60, 3, 0.1), ("v", 0, 10, 3, 0.9)])   # the TP is listed last but scores highest
    res = M.detection_map(pred, gt, tious=[0.5])
    assert res["mAP@0.5"] == pytest.approx(1.0)
    assert list(res["per_class"]) == [3]


def _reference_map(pred: pd.DataFrame, gt: pd.DataFrame, tious, ties: str = "stable") -> np.ndarray:
    """ActivityNet compute_average_precision_detection, as a plain loop (per class).
    ``ties``: "stable" ranks tied scores / tIoUs in input order; "reference" as the UnAV
    evaluation does (numpy < 1.24's argsort, reversed)."""

    def descending(x: np.ndarray) -> np.ndarray:
        return np.argsort(-x, kind="stable") if ties == "stable" else M.reference_argsort(x)[::-1]

    aps = []
    for c in pd.unique(gt["label"]):
        g = gt[gt.label == c].reset_index(drop=True)
        p = pred[pred.label == c].reset_index(drop=True)
        p = p.iloc[descending(p["score"].to_numpy())].reset_index(drop=True)
        tp = np.zeros((len(tious), len(p)))
        fp = np.zeros((len(tious), len(p)))
        lock = -np.ones((len(tious), len(g)))
        for i, row in p.iterrows():
            cand = g[g.video_id == row.video_id]
            if len(cand) == 0:
                fp[:, i] = 1
                continue
            inter = np.clip(np.minimum(row.t_end, cand.t_end) - np.maximum(row.t_start, cand.t_start), 0, None)
            union = (row.t_end - row.t_start) + (cand.t_end - cand.t_start) - inter
            iou = (inter / union).to_numpy()
            order = descending(iou)
            for k, th in enumerate(tious):
                for j in order:
                    if iou[j] < th:
                        fp[k, i] = 1
                        break
                    if lock[k, cand.index[j]] >= 0:
                        continue
                    tp[k, i] = 1
                    lock[k, cand.index[j]] = i
                    break
                if tp[k, i] == 0 and fp[k, i] == 0:
                    fp[k, i] = 1
        ap = np.zeros(len(tious))
        for k in range(len(tious)):
            ctp, cfp = np.cumsum(tp[k]), np.cumsum(fp[k])
            rec = ctp / len(g)
            prec = ctp / np.maximum(ctp + cfp, 1e-12)
            mprec = np.hstack([[0], prec, [0]])
            mrec = np.hstack([[0], rec, [1]])
            for j in range(len(mprec) - 2, -1, -1):
                mprec[j] = max(mprec[j], mprec[j + 1])
            idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
            ap[k] = np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx])
        aps.append(ap)
    return np.mean(aps, 0)


def test_detection_map_matches_loop_reference_random():
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for v in range(25):
        for _ in range(rng.integers(1, 4)):
            s = rng.uniform(0, 50)
            gts.append((f"v{v}", s, s + rng.uniform(1, 15), int(rng.integers(0, 5))))
        for _ in range(rng.integers(0, 12)):
            s = rng.uniform(0, 50)
            preds.append((f"v{v}", s, s + rng.uniform(1, 15), int(rng.integers(0, 6)), float(rng.random())))
    gt, pred = _df(gts, score=False), _df(preds)
    tious = np.arange(0.1, 1.0, 0.1)
    res = M.detection_map(pred, gt, tious)
    ref = _reference_map(pred, gt, tious)
    got = np.array([res[f"mAP@{round(t, 1):g}"] for t in tious])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert res["average_mAP"] == pytest.approx(ref.mean())


def test_detection_map_unav_sized_runs():
    # 2,167 videos x 100 detections, ~3 GT each, 100 classes (UnAV-100 test size); vectorised
    # matching keeps this around a second (no timing assertion: the machine is shared).
    rng = np.random.default_rng(0)
    nv, npv = 2167, 100
    vids = np.repeat([f"v{i}" for i in range(nv)], 3)
    s = rng.uniform(0, 40, len(vids))
    gt = pd.DataFrame({"video_id": vids, "t_start": s, "t_end": s + rng.uniform(1, 10, len(vids)),
                       "label": rng.integers(0, 100, len(vids))})
    pv = np.repeat([f"v{i}" for i in range(nv)], npv)
    ps = rng.uniform(0, 40, len(pv))
    pred = pd.DataFrame({"video_id": pv, "t_start": ps, "t_end": ps + rng.uniform(1, 10, len(pv)),
                         "label": rng.integers(0, 100, len(pv)), "score": rng.random(len(pv))})
    res = M.detection_map(pred, gt)
    assert 0 <= res["average_mAP"] <= 1 and res["n_classes"] == 100
    assert all(math.isfinite(res[f"mAP@{k / 10:g}"]) for k in range(1, 10))


def test_interpolated_ap_envelope():
    # precision 1, 0, 2/3 at recall 1/3, 1/3, 2/3: envelope 1 on (0,1/3], 2/3 on (1/3,2/3] -> 1/3 + 2/9
    ap = M.interpolated_ap(np.array([[1, 0, 2 / 3]]), np.array([[1 / 3, 1 / 3, 2 / 3]]))
    assert ap[0] == pytest.approx(1 / 3 + 2 / 9)


# --------------------------------------------------------------------------- UnAV reference rules
# The UnAV evaluation (ttgeng233/UnAV libs/utils/metrics.py) drops repeated GT events, ranks
# each class by ``scores.argsort()[::-1]`` (numpy < 1.24: not a stable sort) and walks a
# detection's GT by ``tiou.argsort()[::-1]``. Expected values below are worked out by hand
# from those rules; argsort permutations come from numpy 1.23.5 itself.

def test_repeated_gt_events_dropped_as_reference_by_hand():
    gt = _df([("v1", 0.0, 10.0, "a"),
              ("v1", 0.0005, 10.0008, "a"),   # repeats the first (both ends within 1e-3 s): dropped
              ("v1", 20.0, 30.0, "a"),
              ("v2", 0.0, 10.0, "a")], score=False)
    pred = _df([("v1", 0.0, 10.0, "a", 0.9),
                ("v1", 0.0, 10.0, "a", 0.8),   # would match the repeat if it were kept
                ("v2", 0.0, 10.0, "a", 0.7)])
    res = M.detection_map(pred, gt, tious=[0.5])
    # npos 3: TP FP TP -> precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3 -> AP = 1/3 + 1/3 * 2/3
    assert res["mAP@0.5"] == pytest.approx(1 / 3 + 2 / 9)
    assert res["gt_duplicates_dropped"] == 1
    # (counting the repeat: npos 4, TP TP TP -> 3/4)


def test_drop_duplicate_events_compares_with_kept_events_only():
    gt = _df([("v", 0.0, 10.0, 1), ("v", 0.0008, 10.0008, 1), ("v", 0.0016, 10.0016, 1),
              ("v", 0.0, 10.0, 2), ("w", 0.0, 10.0, 1), ("v", 0.0, 10.001, 1)], score=False)
    kept, n = M.drop_duplicate_events(gt)
    # row 1 repeats row 0; row 2 is 1.6 ms from row 0 (the only kept one) -> kept although
    # within 1e-3 of the dropped row 1; other label / other video kept; row 5: |10.001-10| <= 1e-3
    assert kept.index.tolist() == [0, 2, 3, 4] and n == 2


def test_tied_scores_ranked_as_reference_small_class():
    gt = _df([("v1", 0, 10, "a"), ("v2", 0, 10, "a")], score=False)
    pred = _df([("v3", 0, 10, "a", 0.5),    # no GT in v3: FP
                ("v1", 0, 10, "a", 0.5),    # TP
                ("v2", 0, 10, "a", 0.9)])   # TP
    # argsort([.5, .5, .9]) = [0, 1, 2] (insertion sort, stable); reversed: 2, 1, 0 -> TP TP FP
    # -> precision 1, 1, 2/3 at recall 1/2, 1, 1 -> AP 1. (Input order for the tie: 5/6.)
    assert M.detection_map(pred, gt, tious=[0.5])["mAP@0.5"] == pytest.approx(1.0)
    assert M.reference_rank([0.5, 0.5, 0.9]).tolist() == [2, 1, 0]


SCORES_20 = [0.3, 0.7, 0.3, 0.9, 0.7, 0.1, 0.3, 0.5, 0.7, 0.9, 0.5, 0.3, 0.1, 0.7, 0.5, 0.3, 0.9, 0.1, 0.7, 0.3]
NUMPY_1_23_ARGSORT_20 = [17, 12, 5, 0, 15, 11, 19, 2, 6, 7, 10, 14, 8, 18, 4, 13, 1, 3, 16, 9]  # numpy 1.23.5


def test_reference_argsort_equals_numpy_1_23():
    assert M.reference_argsort(SCORES_20).tolist() == NUMPY_1_23_ARGSORT_20
    # 500 values with heavy ties: sha256 of numpy 1.23.5's np.argsort(w).astype(int64)
    w = np.array([(i * 7 % 13) / 10 for i in range(500)])
    import hashlib
    got = hashlib.sha256(M.reference_argsort(w).astype(np.int64).tobytes()).hexdigest()
    assert got == "d352d42708dfdd1c379cdcd51dd1c5ffb6de6eb7b046a1dbc7aae17cbf930696"
    # no ties: plain descending order
    assert M.reference_rank([0.2, 0.9, 0.5]).tolist() == [1, 2, 0]


def test_tied_scores_ranked_as_reference_large_class():
    # 20 detections of class "a" in 20 videos; only detection 0 (score 0.3, tied with 5 others)
    # hits the one GT. Reference ranking = numpy 1.23.5 argsort reversed, where 0 is 17th
    # -> AP = 1/17. (Ties in input order put it 12th: 1/12.)
    gt = _df([("v0", 0, 10, "a")], score=False)
    pred = _df([(f"v{i}", 0, 10, "a", s) for i, s in enumerate(SCORES_20)])
    assert list(reversed(NUMPY_1_23_ARGSORT_20)).index(0) == 16
    res = M.detection_map(pred, gt, tious=[0.5])
    assert res["mAP@0.5"] == pytest.approx(1 / 17)
    cur = M.precision_recall(pred, gt, 0.5)["per_class"]["a"]
    np.testing.assert_allclose(cur["recall"], [0] * 16 + [1] * 4)


def test_equal_tiou_gt_taken_as_reference():
    # detection [5,15] has tIoU 5/15 with both GT [0,10] and [10,20]; tiou.argsort()[::-1] lists
    # the second GT first, so it is taken; the next detection [10,20] then finds its GT locked
    # and [0,10] at tIoU 0 < 0.3 -> FP. TP FP: precision 1, 1/2 at recall 1/2 -> AP 0.5.
    gt = _df([("v", 0, 10, "a"), ("v", 10, 20, "a")], score=False)
    pred = _df([("v", 5, 15, "a", 0.9), ("v", 10, 20, "a", 0.8)])
    assert M.detection_map(pred, gt, tious=[0.3])["mAP@0.3"] == pytest.approx(0.5)


def test_equal_tiou_gt_taken_as_reference_past_16_gt():
    # 17 GT of one class in one video: the reference walks them in numpy's introsort order.
    # Detection [0,10] has tIoU 0.5 with GT 0 [0,5], GT 8 [2.5,7.5] and GT 9 [5,10] (the other
    # 14 are far away); numpy 1.23.5's argsort of those tIoUs, reversed, starts [8, 9, 0, 13],
    # so GT 8 is taken: neither the first nor the last tied GT. The next detection is exactly
    # GT 8 (locked); GT 0 and 9 are at tIoU 1/3 < 0.4 -> FP. TP FP over 17 GT -> AP 1/17.
    # (Taking GT 0 or GT 9 for the first detection would make the second a TP: 2/17.)
    far = [("v", 100 + 10 * k, 105 + 10 * k, "a") for k in range(14)]
    gt = _df([("v", 0, 5, "a"), *far[:7], ("v", 2.5, 7.5, "a"), ("v", 5, 10, "a"), *far[7:]], score=False)
    pred = _df([("v", 0, 10, "a", 0.9), ("v", 2.5, 7.5, "a", 0.8)])
    assert M.detection_map(pred, gt, tious=[0.4])["mAP@0.4"] == pytest.approx(1 / 17)


def test_reference_thresholds_are_linspace():
    # the reference's np.linspace(0.1, 0.9, 9) third value is 0.30000000000000004: a detection
    # at tIoU exactly 0.3 (inter 3, union 10) misses it, while it meets a threshold of 0.3
    assert M.UNAV_TIOUS.tolist()[2] == 0.30000000000000004 and M.UNAV_TIOUS.tolist()[6] == 0.7000000000000001
    gt = _df([("v", 0.0, 10.0, "a")], score=False)
    pred = _df([("v", 0.0, 3.0, "a", 0.9)])
    res = M.detection_map(pred, gt)
    assert res["mAP@0.2"] == 1.0 and res["mAP@0.3"] == 0.0
    assert M.detection_map(pred, gt, [0.3])["mAP@0.3"] == 1.0


def test_unav_ground_truth_counts_failed_videos_as_missed():
    ev = lambda *e: json.dumps([{"segment": [s, t], "label": "x", "label_id": k} for s, t, k in e])  # noqa: E731
    index = pd.DataFrame({
        "video_id": ["tr", "t1", "t2", "t3", "t4"],
        "split": ["train", "test", "test", "test", "test"],
        "events": [ev((0, 5, 0)), ev((0, 10, 0)), ev((5, 10, 0), (5.0004, 10.0, 0)), ev((0, 5, 0)), ev()],
    })
    # t3 failed to decode: no predictions, its event still counts; t4 has no events
    gt = M.unav_ground_truth(index, "test", evaluated=["t1", "t2", "t4"])
    assert gt.video_ids == ["t1", "t2", "t3", "t4"] and gt.not_evaluated == ["t3"]
    assert gt.events[["video_id", "t_start", "t_end", "label"]].values.tolist() == [
        ["t1", 0.0, 10.0, 0], ["t2", 5.0, 10.0, 0], ["t3", 0.0, 5.0, 0]]
    rep = gt.report()
    assert rep["n_videos_not_evaluated"] == 1 and rep["n_events_not_evaluated"] == 1
    assert rep["gt_duplicates_dropped"] == 1 and rep["n_gt_events"] == 3 and rep["videos_not_evaluated"] == ["t3"]
    pred = _df([("t1", 0, 10, 0, 0.9), ("t2", 5, 10, 0, 0.8)])
    # 3 GT: TP TP -> precision 1, 1 at recall 1/3, 2/3 -> AP 2/3 (GT from decoded videos only: 1)
    assert M.detection_map(pred, gt.events, tious=[0.5])["mAP@0.5"] == pytest.approx(2 / 3)


def test_unav_ground_truth_from_json(tmp_path):
    from avepipe.datasets.unav100 import UNAV_CLASSES, write_unav100

    e = lambda s, t, k: {"segment": [s, t], "label": UNAV_CLASSES[k], "label_id": k}  # noqa: E731
    p = write_unav100(tmp_path / "a.json", {"aaaaaaaaaaa": {"duration": 20, "subset": "val", "annotations": [e(1, 2, 5)]},
                                            "bbbbbbbbbbb": {"duration": 20, "subset": "test", "annotations": [e(3, 4, 7)]}})
    gt = M.unav_ground_truth(p, "validation")
    assert gt.video_ids == ["aaaaaaaaaaa"] and gt.events["label"].tolist() == [5] and gt.not_evaluated == []


def test_precision_recall_by_hand_and_equal_to_detection_map():
    gt = _df([("v", 0.0, 10.0, 0), ("v", 20.0, 30.0, 0), ("w", 0.0, 5.0, 1)], score=False)
    pred = _df([("v", 0.0, 10.0, 0, 0.9),    # TP
                ("v", 0.0, 9.0, 0, 0.8),     # second detection of a matched GT: FP
                ("v", 21.0, 30.0, 0, 0.7),   # TP (tIoU 0.9)
                ("w", 3.0, 10.0, 1, 0.95)])  # tIoU 2/10: FP at 0.5
    cur = M.precision_recall(pred, gt, 0.5)
    np.testing.assert_allclose(cur["per_class"][0]["precision"], [1, 0.5, 2 / 3])
    np.testing.assert_allclose(cur["per_class"][0]["recall"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(cur["per_class"][1]["precision"], [0.0])
    assert cur["per_class"][0]["n_gt"] == 2 and cur["tiou"] == 0.5
    # pooled: 0.95 (FP), 0.9 (TP), 0.8 (FP), 0.7 (TP) over 3 GT
    np.testing.assert_allclose(cur["pooled"]["precision"], [0, 0.5, 1 / 3, 0.5])
    np.testing.assert_allclose(cur["pooled"]["recall"], [0, 1 / 3, 1 / 3, 2 / 3])
    # with heavy ties the curve still gives detection_map's AP for every class
    rng = np.random.default_rng(1)
    gt = _df([(f"v{rng.integers(6)}", s, s + rng.uniform(1, 8), int(rng.integers(3)))
              for s in rng.uniform(0, 30, 40)], score=False)
    pred = _df([(f"v{rng.integers(6)}", s, s + rng.uniform(1, 8), int(rng.integers(3)), round(rng.uniform(), 1))
                for s in rng.uniform(0, 30, 300)])
    cur = M.precision_recall(pred, gt, 0.5)
    ref = M.detection_map(pred, gt, [0.5])["per_class"]
    for c, cv in cur["per_class"].items():
        assert M.interpolated_ap(cv["precision"][None], cv["recall"][None])[0] == pytest.approx(
            ref[c]["AP@0.5"], abs=1e-12)


def test_detection_map_matches_reference_loop_with_ties_and_crowded_videos():
    # rounded scores (many ties, classes over 16 detections) and one video with 20 GT of a class
    # (the GT walk past 16 items); boundaries on a 0.5 s grid give tied tIoUs
    rng = np.random.default_rng(5)
    gts, preds = [], []
    for v in range(12):
        for _ in range(20 if v == 0 else int(rng.integers(1, 4))):
            s = float(rng.integers(0, 80)) / 2
            gts.append((f"v{v}", s, s + float(rng.integers(1, 20)) / 2, 0 if v == 0 else int(rng.integers(0, 3))))
        for _ in range(40 if v == 0 else int(rng.integers(0, 12))):
            s = float(rng.integers(0, 80)) / 2
            preds.append((f"v{v}", s, s + float(rng.integers(1, 20)) / 2, int(rng.integers(0, 3)),
                          round(float(rng.random()), 1)))
    gt, pred = _df(gts, score=False), _df(preds)
    tious = np.round(np.arange(0.1, 1.0, 0.1), 1)
    res = M.detection_map(pred, gt, tious)
    ref = _reference_map(pred, M.drop_duplicate_events(gt)[0], tious, ties="reference")
    got = np.array([res[f"mAP@{t:g}"] for t in tious])
    np.testing.assert_allclose(got, ref, atol=1e-12)
