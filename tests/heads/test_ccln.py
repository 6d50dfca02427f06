"""Tests for the CCLN head (seed 003, docs/reference.md §5): shapes, per-equation hand checks, losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avepipe.heads import ccln
from avepipe.heads.ccln import (CCLN, TRAIN_DEFAULTS, binary_focal_loss, cml_bce, sbi_gate, softmax_focal_loss,
                                topk_mean, wccl_loss)

torch.set_num_threads(1)
B, T, C = 4, 10, 28
SMALL = dict(hidden=32, v_hidden=24, heads=2, ffn=48)  # keeps the many-config tests fast


def make_batch(visual_shape=(7, 7, 16), audio_dim=12, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(b, T, *visual_shape, generator=g)
    audio = torch.randn(b, T, audio_dim, generator=g)
    cls = torch.arange(b) % 3
    seg = torch.zeros(b, T, C + 1)
    seg[..., C] = 1
    mask = torch.zeros(b, T)
    for i in range(b):
        s = (i * 2) % 6
        mask[i, s:s + 3] = 1
        seg[i, s:s + 3, C] = 0
        seg[i, s:s + 3, cls[i]] = 1
    vl = torch.zeros(b, C + 1)
    vl[torch.arange(b), cls] = 1
    return dict(visual=visual, audio=audio, segment_labels=seg, event_mask=mask, video_label=vl)


@pytest.mark.parametrize("visual_shape", [(7, 7, 16), (16,)])
@pytest.mark.parametrize("setting", ["full", "weak", "cml"])
def test_shapes_every_setting(setting, visual_shape):
    batch = make_batch(visual_shape)
    m = CCLN(visual_shape, 12, setting, **SMALL)
    out = m(batch["visual"], batch["audio"])
    if setting == "full":
        assert out["logits"].shape == (B, T, C + 1) and out["event_logits"].shape == (B, C)
    elif setting == "weak":
        assert out["seg_logits"].shape == (B, T, C + 1) and out["theta"].shape == (B, T)
        assert out["video_logits"].shape == (B, C + 1) and out["event_logits"].shape == (B, C)
    else:
        assert out["dist"].shape == (B, T) and "logits" not in out
    assert out["pf"].shape == out["pv"].shape == (B, T)
    loss, logs = m.loss(out, batch, 0, 10)
    assert loss.ndim == 0 and torch.isfinite(loss) and math.isclose(logs["loss"], loss.item(), rel_tol=1e-6)
    pred = m.predict(out)
    assert pred.shape == (B, T) and pred.dtype == torch.long
    assert int(pred.min()) >= 0 and int(pred.max()) <= (1 if setting == "cml" else C)
    v, a = m.embed_cml(batch["visual"], batch["audio"])
    assert v.shape == a.shape == (B, T, 32)


def test_default_sizes_and_parameter_count():
    # VGG-19 pool5 (7,7,512) + VGGish 128, the paper's inputs; sizes from AVEL/PSP/CMBS (d=256).
    counts = {s: sum(p.numel() for p in CCLN((7, 7, 512), 128, s).parameters()) for s in ("full", "weak", "cml")}
    assert counts == {"full": 4_489_892, "weak": 4_489_922, "cml": 4_460_851}
    m = CCLN((7, 7, 512), 128, "full")
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    # AGVA of AVE-ECCV18: 512->512, 128->512, 512->49 (x2, no bias), 49->1 (no bias)
    assert n(m.agva) == (512 * 512 + 512) + (128 * 512 + 512) + 2 * 512 * 49 + 49
    assert n(m.lstm_v) == 2 * 4 * 128 * (512 + 128 + 2) and n(m.lstm_a) == 2 * 4 * 128 * (128 + 128 + 2)
    assert n(m.sbi) == 4 * (256 * 256 + 256)  # W1..W4 of eq. 4
    # weak adds only W_b (29 -> 1); cml drops W5 / W7 / the two TopK linears
    assert counts["weak"] - counts["full"] == 29 + 1
    assert counts["full"] - counts["cml"] == (256 * 29 + 29) + 3 * (256 * 28 + 28)
    assert CCLN((2048,), 2048).agva is None  # pooled input: no spatial attention to learn


def test_train_defaults_match_paper():
    assert set(TRAIN_DEFAULTS) == set(CCLN.settings) == {"full", "weak", "cml"}
    for s, lr in (("full", 1e-3), ("weak", 1e-4), ("cml", 1e-4)):
        d = TRAIN_DEFAULTS[s]
        assert (d["optimizer"], d["lr"], d["epochs"], d["batch_size"]) == ("adam", lr, 200, 128)
        assert d["schedule"]["kind"] == "none" and d["weight_decay"] == 0.0


def test_tau_per_setting():
    assert CCLN((16,), 12, "full", **SMALL).sbi.tau == 0.05
    assert CCLN((16,), 12, "weak", **SMALL).sbi.tau == 0.06
    assert CCLN((16,), 12, "cml", **SMALL).sbi.tau == 0.05
    assert CCLN((16,), 12, "full", tau=0.02, **SMALL).sbi.tau == 0.02


def test_sbi_gate_hand_case():
    h = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.04, 0.06, 0.2, 0.7]])
    g = sbi_gate(h, 0.06)
    expect = torch.tensor([[0.5, 0.3, 0.15, 0.0], [0.0, 0.06, 0.2, 0.7]])
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(g, expect)
    # an un-normalised matrix (h^av = columns of a softmax) is row-normalised before the threshold
    torch.testing.assert_close(sbi_gate(3 * h, 0.06), expect)
    # softmax rows with random logits: rows of the gated weights sum to 1, nothing below tau survives
    s = torch.softmax(torch.randn(2, 10, 10), -1)
    gs = sbi_gate(s, 0.05)
    torch.testing.assert_close(gs.sum(-1), torch.ones(2, 10))
    assert bool(((s < 0.05) <= (gs == 0)).all())


def test_sbi_orientation_against_hand_computation():
    torch.manual_seed(0)
    d = 4
    sbi = ccln.SBI(d, tau=0.2, dropout=0.0).eval()
    with torch.no_grad():
        for lin in (sbi.w1, sbi.w2, sbi.w3, sbi.w4):
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
    vf, af = torch.randn(1, 3, d), torch.randn(1, 3, d)
    vi, ai = sbi(vf, af)
    h_va = torch.softmax(vf[0] @ af[0].T / 2.0, -1)  # eq. 5, sqrt(d) = 2
    # eq. 8 + 9: each visual step t adds audio steps t' weighted by the gated row t of h^va
    exp_vi = vf[0] + sbi_gate(h_va, 0.2) @ af[0]
    # eq. 7 + 10: each audio step adds visual steps weighted by the gated row of h^av = h^va^T
    exp_ai = af[0] + sbi_gate(h_va.T, 0.2) @ vf[0]
    torch.testing.assert_close(vi[0], exp_vi)
    torch.testing.assert_close(ai[0], exp_ai)


def test_topk_branch_picks_top_k_segments():
    x = torch.tensor([[[1.0, -1.0], [5.0, 0.0], [3.0, 2.0], [2.0, 9.0]]])  # (B=1, T=4, C=2)
    torch.testing.assert_close(topk_mean(x, 2), torch.tensor([[4.0, 5.5]]))
    torch.testing.assert_close(topk_mean(x, 10), x.mean(1))  # k clamped to T
    # the FEE branch of the model: P^e = P^fe * sigmoid(topk mean v) * sigmoid(topk mean a) (eq. 16-20)
    m = CCLN((16,), 12, "full", topk=3, **SMALL).eval()
    batch = make_batch((16,))
    got = {}
    m.topk_v.register_forward_hook(lambda mod, i, o: got.__setitem__("v", o))
    m.topk_a.register_forward_hook(lambda mod, i, o: got.__setitem__("a", o))
    m.event_fc.register_forward_hook(lambda mod, i, o: got.__setitem__("fe", o))
    out = m(batch["visual"], batch["audio"])
    ve = torch.sigmoid(got["v"].sort(1, descending=True).values[:, :3].mean(1))
    ae = torch.sigmoid(got["a"].sort(1, descending=True).values[:, :3].mean(1))
    torch.testing.assert_close(out["event_logits"], got["fe"].max(1).values * ve * ae)


def test_multiclass_focal_loss_hand_values():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))  # softmax = (0.7, 0.2, 0.1)
    targets = torch.tensor([[0.0, 1.0, 0.0]])
    got = softmax_focal_loss(logits, targets, alpha=0.25, gamma=2.0).sum(-1)
    torch.testing.assert_close(got, torch.tensor([0.25 * 0.8**2 * -math.log(0.2)]))
    assert softmax_focal_loss(logits, targets, -1, 0.0).sum().item() == pytest.approx(-math.log(0.2))


def test_focal_loss_hand_values():
    logits = torch.tensor([math.log(0.8 / 0.2), math.log(0.3 / 0.7)])  # p = 0.8, 0.3
    targets = torch.tensor([1.0, 0.0])
    got = binary_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    expect = torch.tensor([0.25 * 0.2**2 * -math.log(0.8), 0.75 * 0.3**2 * -math.log(0.7)])
    torch.testing.assert_close(got, expect)
    # gamma = 0, alpha < 0 reduces to plain BCE
    torch.testing.assert_close(binary_focal_loss(logits, targets, -1, 0.0),
                               F.binary_cross_entropy_with_logits(logits, targets, reduction="none"))


def test_wccl_one_positive_equals_infonce():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # view 1 of videos 0, 1
    b = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # view 2 of videos 0, 1
    tau = 0.5
    loss = wccl_loss([a, b], torch.tensor([0, 1]), tau)
    z = [a[0], a[1], b[0], b[1]]
    pos = {0: 2, 1: 3, 2: 0, 3: 1}  # different labels: the only positive is the other view
    hand = 0.0
    for i in range(4):
        den = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(4) if j != i)
        hand += -math.log(math.exp(float(z[i] @ z[pos[i]]) / tau) / den)
    assert math.isclose(loss.item(), hand / 4, rel_tol=1e-5)


def test_wccl_mean_inside_log_and_normalisation():
    # every anchor shares one label: sum over B(i)=A(i) of the ratios is 1, so the loss is log|A(i)|
    views = [torch.randn(3, 5), torch.randn(3, 5)]
    assert math.isclose(wccl_loss(views, torch.zeros(3, dtype=torch.long)).item(), math.log(5), rel_tol=1e-5)
    # scale invariance (L2-normalised embeddings) and no overflow at tiny temperatures
    lab = torch.tensor([0, 1, 2])
    assert math.isclose(wccl_loss(views, lab).item(), wccl_loss([5 * v for v in views], lab).item(), rel_tol=1e-5)
    assert torch.isfinite(wccl_loss(views, lab, temperature=1e-4))


@pytest.mark.parametrize("mode,keys", [("AV", set()), ("AV+V", {"pf", "pv"}), ("AV+A", {"pf", "pa"}),
                                       ("AV+V+A", {"pf", "pv", "pa"})])
def test_branch_modes(mode, keys):
    batch = make_batch()
    m = CCLN((7, 7, 16), 12, "full", branch=mode, **SMALL).eval()
    out = m(batch["visual"], batch["audio"])
    assert {"pf", "pv", "pa"} & set(out) == keys
    loss, logs = m.loss(out, batch)
    if mode == "AV":
        assert "wccl" not in logs
        assert math.isclose(logs["loss"], logs["focal"] + 150 * logs["fee"], rel_tol=1e-5)
    else:
        views = [out[k] * batch["event_mask"] for k in ("pf", "pv", "pa") if k in out]
        expect = wccl_loss(views, batch["video_label"][:, :C].argmax(-1), 0.07)
        assert math.isclose(logs["wccl"], expect.item(), rel_tol=1e-5)
        assert math.isclose(logs["loss"], logs["focal"] + 150 * logs["fee"] + 25 * logs["wccl"], rel_tol=1e-5)
    with pytest.raises(ValueError):
        CCLN((16,), 12, "full", branch="V+A")


def test_weak_uses_only_video_labels():
    batch = make_batch()
    m = CCLN((7, 7, 16), 12, "weak", **SMALL).eval()
    out = m(batch["visual"], batch["audio"])
    l1, _ = m.loss(out, batch)
    poisoned = dict(batch, segment_labels=torch.full_like(batch["segment_labels"], float("nan")),
                    event_mask=torch.full_like(batch["event_mask"], float("nan")))
    l2, _ = m.loss(out, poisoned)
    l3, _ = m.loss(out, {"video_label": batch["video_label"]})
    assert torch.isfinite(l1) and l1.item() == l2.item() == l3.item()
    # eq. 23-24: video prediction = theta-weighted sum of segment predictions, theta in [0.5, 1)
    assert bool((out["theta"] >= 0.5).all() and (out["theta"] < 1).all())
    torch.testing.assert_close(out["video_logits"], (out["seg_logits"] * out["theta"][..., None]).sum(1))


def test_cml_distance_and_bce():
    batch = make_batch((16,))
    m = CCLN((16,), 12, "cml", **SMALL).eval()
    out = m(batch["visual"], batch["audio"])
    v, a = m.embed_cml(batch["visual"], batch["audio"])
    torch.testing.assert_close(out["dist"], (v - a).norm(dim=-1))  # eq. 17
    d = torch.tensor([[0.5, 2.0]])
    y = torch.tensor([[1.0, 0.0]])
    hand = -(math.log(math.exp(-0.5)) + math.log(1 - math.exp(-2.0)))
    assert math.isclose(cml_bce(d, y).item(), hand, rel_tol=1e-6)
    assert not hasattr(m, "cls") and not hasattr(m, "event_fc")  # CML: no classification head


@pytest.mark.parametrize("visual_shape", [(7, 7, 16), (16,)])
@pytest.mark.parametrize("setting", ["full", "weak", "cml"])
@pytest.mark.parametrize("mode", ["AV", "AV+V+A"])
def test_all_parameters_receive_gradients(setting, mode, visual_shape):
    torch.manual_seed(0)
    batch = make_batch(visual_shape, b=6)
    m = CCLN(visual_shape, 12, setting, branch=mode, **SMALL)
    loss, _ = m.loss(m(batch["visual"], batch["audio"]), batch)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def learnable_batch():
    """The event class is written into the event segments of both modalities."""
    batch = make_batch((7, 7, 8), audio_dim=8, b=6)
    code = F.one_hot(batch["video_label"][:, :C].argmax(-1) % 8, 8).float()
    ev = batch["event_mask"][..., None]
    batch["audio"] = 0.3 * batch["audio"] + 2 * ev * code[:, None]
    batch["visual"] = 0.3 * batch["visual"] + 2 * (ev * code[:, None])[:, :, None, None]
    return batch


def train(m, batch, steps, lr):
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = m.loss(m(batch["visual"], batch["audio"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("setting", ["full", "weak", "cml"])
def test_loss_decreases_on_tiny_problem(setting):
    torch.manual_seed(0)
    batch = learnable_batch()
    losses = train(CCLN((7, 7, 8), 8, setting, **SMALL), batch, 40, 2e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_full_setting_learns_segment_labels():
    # balanced weights: with the paper's lambda = 150 the FEE term dominates and the segment head
    # needs many more steps on this toy problem
    torch.manual_seed(0)
    batch = learnable_batch()
    m = CCLN((7, 7, 8), 8, "full", lam=1.0, eta=1.0, **SMALL)
    train(m, batch, 50, 5e-3)
    m.eval()
    pred = m.predict(m(batch["visual"], batch["audio"]))
    assert (pred == batch["segment_labels"].argmax(-1)).float().mean().item() >= 0.9
