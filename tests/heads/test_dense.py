"""Dense UnAV-100 head: losses and soft-NMS against hand computations; learnability vs random segments."""
import math

import numpy as np
import pytest
import torch

from avepipe.heads.dense import DenseLocalizer, diou_loss, sigmoid_focal, soft_nms
from avepipe.metrics import detection_map
from avepipe.options import EvaluateOptions, HeadOptions, TrainOptions
from avepipe.training.dense import ground_truth, train_dense
from avepipe.training.dense_data import DenseData


def test_diou_hand_values():
    pred = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    tgt = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    # identical -> 0; nested same centre: IoU 2/4 -> 0.5;
    # [0,2] vs [-1,1]: inter 1, union 3, centres 1 apart, enclosure 3 -> 1 - 1/3 + (1/3)^2
    expect = torch.tensor([0.0, 0.5, 1 - 1 / 3 + 1 / 9])
    assert torch.allclose(diou_loss(pred, tgt), expect, atol=1e-6)


def test_focal_hand_value():
    logit = torch.tensor([0.0, 2.0])
    target = torch.tensor([1.0, 0.0])
    # p=0.5, y=1: 0.25 * ln2 * 0.5^2 ; p=s(2), y=0: 0.75 * -ln(1-p) * p^2
    p = 1 / (1 + math.exp(-2))
    expect = torch.tensor([0.25 * math.log(2) * 0.25, 0.75 * -math.log(1 - p) * p ** 2])
    assert torch.allclose(sigmoid_focal(logit, target), expect, atol=1e-6)


def test_soft_nms_gaussian_decay_per_class():
    segs = torch.tensor([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0], [20.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    s, sc, lab = soft_nms(segs, scores, labels, sigma=0.4)
    got = {(round(float(a), 1), round(float(b), 1), int(l)): float(x) for (a, b), x, l in zip(s, sc, lab)}
    # the duplicate of class 0 decays by exp(-1/0.4); class 1 and the disjoint segment keep their scores
    assert got[(0.0, 10.0, 1)] == pytest.approx(0.7)
    assert got[(20.0, 30.0, 0)] == pytest.approx(0.6)
    assert sorted(sc.tolist(), reverse=True) == sc.tolist()
    assert pytest.approx(0.8 * math.exp(-1 / 0.4), rel=1e-5) in [x for x in sc.tolist()]


def test_targets_assign_level_and_overlap():
    m = DenseLocalizer(4, 4, num_classes=3, dim=16, heads=2, levels=3)
    # a short event (3 steps) -> level 0; two overlapping events of different classes both kept
    ev = [torch.tensor([[2.0, 5.0, 0], [3.0, 6.0, 2]])]
    tg = m.targets(ev, 16, "cpu")
    pos0 = tg[0]["cls"][0].nonzero().tolist()
    assert {k for _, k in pos0} == {0, 2}
    t, k = pos0[0]
    left, right = tg[0]["reg"][0, t, k].tolist()
    assert left + right == pytest.approx(3.0)


def _toy(n_videos=36, n_classes=3, seed=0):
    """Features that carry the events: class k's event steps get +3 on channel k of both modalities."""
    rng = np.random.default_rng(seed)
    vis, aud, evs, split = [], [], [], []
    for i in range(n_videos):
        T = int(rng.integers(40, 80))
        v = rng.normal(0, 1, (T, 8)).astype(np.float32)
        a = rng.normal(0, 1, (T, 6)).astype(np.float32)
        ev = []
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(n_classes))
            s = int(rng.integers(0, T - 12))
            e = s + int(rng.integers(4, 12))
            v[s:e, k] += 3
            a[s:e, k] += 3
            hop, win = 0.32, 0.96
            ev.append((s * hop, (e - 1) * hop + win, k))  # seconds covered by the steps
        vis.append(v)
        aud.append(a)
        evs.append(np.asarray(ev, dtype=np.float64))
        split.append("train" if i < n_videos * 2 // 3 else ("val" if i % 2 else "test"))
    dur = np.asarray([(len(v) - 1) * 0.32 + 0.96 for v in vis])
    return DenseData([f"v{i:03d}" for i in range(n_videos)], np.asarray(split), vis, aud, np.zeros(n_videos),
                     0.32, 0.96, dur, evs, [f"c{k}" for k in range(n_classes)])


@pytest.mark.slow
def test_learns_far_above_random_segments(tmp_path):
    torch.set_num_threads(1)
    data = _toy()
    metrics = train_dense(data, tmp_path, head="dense", setting="full", seed=0, train=TrainOptions(device="cpu"),
                          head_opts=HeadOptions(epochs=25, batch_size=8, lr=1e-3, hparams=dict(dim=32, heads=2,
                                                                                               levels=3)),
                          evaluate=EvaluateOptions(), eval_every=5)
    # baseline: random segments with random labels and scores, as many as the model predicts per video
    rng = np.random.default_rng(0)
    test = data.subset("test")
    rows = []
    for i in test:
        for _ in range(20):
            s = rng.uniform(0, data.duration[i] - 1)
            rows.append((data.video_ids[i], s, min(data.duration[i], s + rng.uniform(1, 5)),
                         int(rng.integers(3)), rng.uniform()))
    import pandas as pd

    rand = detection_map(pd.DataFrame(rows, columns=["video_id", "t_start", "t_end", "label", "score"]),
                         ground_truth(data, test))
    assert metrics["average_mAP"] > 0.4
    assert metrics["average_mAP"] > 3 * rand["average_mAP"]
    assert (tmp_path / "predictions.json").exists() and (tmp_path / "metrics.json").exists()
    assert set(k for k in metrics if k.startswith("mAP@")) == {f"mAP@{t / 10:.1f}" for t in range(1, 10)}


def test_targets_regression_range_in_finest_steps_and_points_at_stride_multiples():
    # baseline label_points: points at j * 2**l; the range (0,4),(4,8),(8,inf) is compared with
    # max(p - s, e - p) in finest steps. Event [0.5, 12.5]: reach >= 6 everywhere inside -> no
    # level-0 point; level 1 (points 0,2,..): p=6 (reach 6.5), p=8 (7.5); level 2: p=4 (8.5), p=12 (11.5).
    m = DenseLocalizer(4, 4, num_classes=2, dim=16, heads=2, levels=3)
    tg = m.targets([torch.tensor([[0.5, 12.5, 1]])], 32, "cpu")
    assert tg[0]["cls"].sum() == 0
    assert tg[1]["cls"][0, :, 1].nonzero()[:, 0].tolist() == [3, 4]
    assert tg[2]["cls"][0, :, 1].nonzero()[:, 0].tolist() == [1, 3]
    assert tg[1]["reg"][0, 3, 1].tolist() == pytest.approx([5.5 / 2, 6.5 / 2])  # distances / stride
    assert tg[2]["reg"][0, 3, 1].tolist() == pytest.approx([11.5 / 4, 0.5 / 4])


def _soft_nms_reference(segs, scores, labels, sigma, min_score, max_segments):
    """Sequential port of the baseline's softnms_1d_cpu (method 2) + batched_nms (multiclass)."""
    out = []
    for k in sorted(set(labels)):
        cand = [[s, e, sc] for (s, e), sc, l in zip(segs, scores, labels) if l == k]
        kept = []
        while cand:
            i = max(range(len(cand)), key=lambda j: cand[j][2])
            b = cand.pop(i)
            kept.append((b[0], b[1], b[2], k))
            rest = []
            for s, e, sc in cand:
                inter = max(0.0, min(e, b[1]) - max(s, b[0]))
                iou = inter / ((e - s) + (b[1] - b[0]) - inter)
                sc *= math.exp(-iou * iou / sigma)
                if sc >= min_score:
                    rest.append([s, e, sc])
            cand = rest
        out += kept[:max_segments]
    return sorted(out, key=lambda r: -r[2])[:max_segments]


def test_soft_nms_matches_sequential_baseline_port():
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 50, 300)
    segs = np.stack([s, s + rng.uniform(0.5, 15, 300)], 1)
    scores = rng.uniform(0.002, 1, 300)
    labels = rng.integers(0, 6, 300)
    ref = _soft_nms_reference(segs.tolist(), scores.tolist(), labels.tolist(), 0.4, 0.001, 40)
    got_s, got_sc, got_l = soft_nms(torch.tensor(segs), torch.tensor(scores), torch.tensor(labels),
                                    sigma=0.4, max_segments=40, min_score=0.001)
    assert len(got_sc) == len(ref) == 40
    np.testing.assert_allclose(got_sc.numpy(), [r[2] for r in ref], rtol=1e-9)
    np.testing.assert_allclose(got_s.numpy(), [[r[0], r[1]] for r in ref])
    assert got_l.tolist() == [r[3] for r in ref]
