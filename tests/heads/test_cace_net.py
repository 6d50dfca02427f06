"""Tests for the CACE-Net head (avepipe/heads/cace_net.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from avepipe.heads.cace_net import TRAIN_DEFAULTS, CACENet, bece_contrast_loss

torch.set_num_threads(1)

# docs/reference.md §3: parameters of Brain-Cog-Lab/CACE-Net supv_main_model (VGG-19 512 maps +
# VGGish 128) that receive a gradient. The no-guide and visual-only-guide values were
# measured the same way on the reference code (built with guide "None" / "Visual-Guide").
REF_USED_CO = 9_283_417
REF_USED_VISUAL = 7_870_295
REF_USED_NONE = 7_326_807


def _batch(B=2, T=10, visual_shape=(7, 7, 512), audio_dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, T, *visual_shape, generator=g)
    audio = torch.randn(B, T, audio_dim, generator=g)
    seg = torch.zeros(B, T, 29)
    seg[..., 28] = 1
    for b in range(B):  # events on seconds [2+b, 7+b) of class 3*b+1
        seg[b, 2 + b:7 + b, 28] = 0
        seg[b, 2 + b:7 + b, 3 * b + 1] = 1
    video_label = seg[..., :28].amax(1)
    video_label = torch.cat([video_label, torch.zeros(B, 1)], dim=1)
    return dict(visual=visual, audio=audio, segment_labels=seg,
                event_mask=1.0 - seg[..., 28], video_label=video_label)


def _used_params(model, batch, epoch=100, n_epochs=200):
    model.zero_grad(set_to_none=True)
    out = model(batch["visual"], batch["audio"])
    loss, logs = model.loss(out, batch, epoch, n_epochs)
    loss.backward()
    used = sum(p.numel() for p in model.parameters() if p.grad is not None)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    return used, missing, logs


def test_train_defaults_and_settings():
    assert CACENet.settings == ("full",)
    d = TRAIN_DEFAULTS["full"]
    assert d["optimizer"] == "adam" and d["lr"] == 7e-4 and d["weight_decay"] == 0
    assert d["epochs"] == 200 and d["batch_size"] == 64 and d["clip_grad_norm"] == 0.5
    assert d["schedule"] == dict(kind="multistep", milestones=[10, 20, 30], gamma=0.5)
    with pytest.raises(ValueError):
        CACENet((7, 7, 512), 128, setting="weak")


def test_parameter_count_matches_reference():
    torch.manual_seed(0)
    model = CACENet((7, 7, 512), 128, guide="co")
    used, missing, _ = _used_params(model, _batch())
    assert abs(used - REF_USED_CO) / REF_USED_CO < 0.005, used
    assert used == REF_USED_CO  # same layer shapes as the reference's live weights
    assert not missing


@pytest.mark.parametrize("guide", ["none", "audio", "visual", "co"])
def test_every_parameter_receives_gradient(guide):
    torch.manual_seed(0)
    model = CACENet((7, 7, 512), 128, guide=guide)
    used, missing, logs = _used_params(model, _batch())
    assert not missing, missing
    assert used == sum(p.numel() for p in model.parameters())
    assert all(math.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_guide_switches_change_count_in_expected_direction():
    counts = {g: sum(p.numel() for p in CACENet((7, 7, 512), 128, guide=g).parameters())
              for g in ["none", "audio", "visual", "co"]}
    assert counts["none"] == REF_USED_NONE
    assert counts["visual"] == REF_USED_VISUAL
    assert counts["co"] == REF_USED_CO
    # each guidance direction adds layers; co-guidance has both
    assert counts["none"] < counts["visual"] < counts["audio"] < counts["co"]
    # co = none + audio-guided-visual part + visual-guided-audio part (shared v_norm counted once)
    assert counts["co"] == counts["audio"] + counts["visual"] - counts["none"] - 1024


@pytest.mark.parametrize("temporal", ["bilstm", "lstm", "none"])
def test_temporal_switch_shapes(temporal):
    torch.manual_seed(0)
    model = CACENet((7, 7, 512), 128, temporal=temporal)
    b = _batch()
    out = model(b["visual"], b["audio"])
    assert out["is_event"].shape == (2, 10) and out["event_logits"].shape == (2, 28)
    assert out["q"].shape == out["k"].shape == (2, 10, 256)
    used, missing, _ = _used_params(model, b)
    assert not missing


@pytest.mark.parametrize("visual_shape,audio_dim", [((7, 7, 2048), 2048), ((512,), 128),
                                                    ((3, 3, 64), 32)])
def test_other_feature_sizes(visual_shape, audio_dim):
    torch.manual_seed(0)
    model = CACENet(visual_shape, audio_dim)
    b = _batch(visual_shape=visual_shape, audio_dim=audio_dim)
    out = model(b["visual"], b["audio"])
    pred = model.predict(out)
    assert pred.shape == (2, 10) and pred.dtype == torch.long
    assert ((pred >= 0) & (pred <= 28)).all()


def _reference_contrast_direct_exp(q, k, m, tau):
    """Eq. 7 as the released code computes it: direct exp, masks, log|K(i)| offset."""
    N, T, _ = q.shape
    f = torch.cat([q, k], 1)
    logits = f @ f.transpose(1, 2) / tau
    off = 1 - torch.eye(T, dtype=q.dtype)
    pos_qq = m.unsqueeze(-1) * m.unsqueeze(1) * off
    pos_qk = (m.unsqueeze(-1) * m.unsqueeze(1) + torch.eye(T, dtype=q.dtype)).clamp(0, 1)
    pos = torch.cat([torch.cat([pos_qq, pos_qk], 2), torch.cat([pos_qk, pos_qq], 2)], 1)
    denom = 1 - torch.eye(2 * T, dtype=q.dtype)
    n = m.sum(1, keepdim=True)
    index = torch.log(torch.cat([m * (2 * n - 2), m * (2 * n - 2)], 1) + 1)
    e = torch.exp(logits)
    lp = torch.log((e * pos).sum(2)) - torch.log((e * denom).sum(2)) - index
    return -lp.mean()


def test_bece_matches_float64_direct_exp_and_stays_finite_in_float32():
    g = torch.Generator().manual_seed(1)
    B, T, D = 4, 10, 256
    q = F.normalize(torch.randn(B, T, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(q + 0.05 * torch.randn(B, T, D, generator=g, dtype=torch.float64), dim=-1)
    m = torch.zeros(B, T, dtype=torch.float64)
    m[0, 2:6] = 1
    m[1, :] = 1
    m[2, 9] = 1  # a single event segment; row 3 all background
    ref = _reference_contrast_direct_exp(q, k, m, 0.01)
    ours64 = bece_contrast_loss(q, k, m, 0.01)
    ours32 = bece_contrast_loss(q.float(), k.float(), m.float(), 0.01)
    assert torch.isfinite(ref)
    assert torch.allclose(ours64, ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(ours32.double(), ref, rtol=1e-4, atol=1e-4)

    # extreme inputs: identical views -> cos = 1 -> exp(100) overflows float32
    q32 = F.normalize(torch.randn(B, T, D, generator=g), dim=-1)
    q32[:, :, :] = q32[:, :1, :]  # every segment identical
    direct32 = _reference_contrast_direct_exp(q32, q32.clone(), m.float(), 0.01)
    assert not torch.isfinite(direct32)  # the reference formula breaks in float32
    loss = bece_contrast_loss(q32.clone().requires_grad_(), q32.clone(), m.float(), 0.01)
    assert torch.isfinite(loss)
    qq = q32.clone().requires_grad_()
    bece_contrast_loss(qq, q32.clone(), m.float(), 0.01).backward()
    assert torch.isfinite(qq.grad).all()


def test_predict_background_where_sigmoid_at_most_half():
    model = CACENet((7, 7, 512), 128)
    logits = torch.full((1, 28), -5.0)
    logits[0, 11] = 5.0
    # 1e-9 is a positive logit whose float32 sigmoid is exactly 0.5 -> background
    is_event = torch.tensor([[-3.0, 0.0, 1e-9, 0.01, 4.0]])
    pred = model.predict({"is_event": is_event, "event_logits": logits})
    assert torch.sigmoid(is_event)[0, 2] == 0.5
    assert pred.tolist() == [[28, 28, 28, 11, 11]]


def test_bece_switch_follows_epoch_and_persists():
    torch.manual_seed(0)
    model = CACENet((2, 2, 16), 8)
    b = _batch(visual_shape=(2, 2, 16), audio_dim=8)
    out = model(b["visual"], b["audio"])
    _, logs = model.loss(out, b, epoch=24, n_epochs=200)  # 24 < 200/8
    assert "contrast" not in logs and not bool(model.bece_on)
    _, logs = model.loss(out, b, epoch=25, n_epochs=200)
    assert "contrast" in logs and bool(model.bece_on)
    model.eval()
    out = model(b["visual"], b["audio"])
    assert torch.equal(out["is_event"], out["is_event_bece"])  # eq. 8 used at inference
    clone = CACENet((2, 2, 16), 8)
    clone.load_state_dict(model.state_dict())
    assert bool(clone.bece_on)


def test_loss_terms_match_eq12():
    torch.manual_seed(0)
    model = CACENet((2, 2, 16), 8)
    b = _batch(visual_shape=(2, 2, 16), audio_dim=8)
    out = model(b["visual"], b["audio"])
    total, logs = model.loss(out, b, epoch=100, n_epochs=200)
    mask = b["event_mask"]
    cls = torch.tensor([1, 4])
    assert logs["is_event"] == pytest.approx(
        F.binary_cross_entropy_with_logits(out["is_event_bece"], mask).item(), rel=1e-5)
    assert logs["class"] == pytest.approx(F.cross_entropy(out["event_logits"], cls).item(),
                                          rel=1e-5)
    assert logs["cas"] == pytest.approx(F.cross_entropy(out["cas"], cls).item(), rel=1e-5)
    parts = logs["is_event"] + logs["class"] + logs["gate"] + logs["cas"] + logs["contrast"]
    assert total.item() == pytest.approx(parts, rel=1e-5)


def _gate_probability_by_hooks(model, b):
    """p = sigmoid(audio gate) * sigmoid(video gate), read off the two gate layers' outputs
    (not the model's own av_gate / gate_logits outputs)."""
    seen = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda mod, inp, o, name=name: seen.__setitem__(name, o.detach()))
        for name in ("audio_gate", "video_gate")]
    out = model(b["visual"], b["audio"])
    for h in hooks:
        h.remove()
    p = (torch.sigmoid(seen["audio_gate"].double()) * torch.sigmoid(seen["video_gate"].double()))
    return out, p.squeeze(-1)


def test_gate_loss_reference_default_and_paper_option():
    """Default = the released code's nn.BCEWithLogitsLoss applied to the gate probability;
    gate_loss="paper" = plain nn.BCELoss on it (eq. 12 / CMBS as printed)."""
    assert CACENet((2, 2, 16), 8).gate_loss == "reference"
    torch.manual_seed(0)
    b = _batch(visual_shape=(2, 2, 16), audio_dim=8)
    mask = b["event_mask"].double()
    ref_model = CACENet((2, 2, 16), 8).eval()  # eval: no dropout, same forward twice
    out, p = _gate_probability_by_hooks(ref_model, b)
    assert p.shape == mask.shape and ((p > 0) & (p < 1)).all()
    _, logs = ref_model.loss(out, b, epoch=100, n_epochs=200)
    released = torch.nn.BCEWithLogitsLoss()(p, mask).item()
    printed = torch.nn.BCELoss()(p, mask).item()
    assert abs(released - printed) > 0.05  # the two readings differ on this batch
    assert logs["gate"] == pytest.approx(released, rel=1e-5)

    paper = CACENet((2, 2, 16), 8, gate_loss="paper").eval()
    paper.load_state_dict(ref_model.state_dict())
    out, p2 = _gate_probability_by_hooks(paper, b)
    assert torch.equal(p, p2)
    _, logs = paper.loss(out, b, epoch=100, n_epochs=200)
    assert logs["gate"] == pytest.approx(printed, rel=1e-5)
    with pytest.raises(ValueError, match="gate_loss"):
        CACENet((2, 2, 16), 8, gate_loss="prob")


@pytest.mark.parametrize("aug", ["noise", "channel_mask", "mixup"])
def test_bece_augmentations(aug):
    torch.manual_seed(0)
    model = CACENet((2, 2, 16), 8, bece_aug=aug)
    b = _batch(visual_shape=(2, 2, 16), audio_dim=8)
    out = model(b["visual"], b["audio"])
    assert not torch.allclose(out["q"], out["k"])  # the key view is perturbed
    loss, logs = model.loss(out, b, epoch=100, n_epochs=200)
    assert math.isfinite(logs["contrast"])


def test_no_bece_builds_no_projection():
    full = CACENet((7, 7, 512), 128)
    plain = CACENet((7, 7, 512), 128, bece=False)
    diff = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in plain.parameters())
    assert diff == 256 * 256 + 256
    b = _batch()
    _, missing, logs = _used_params(plain, b)
    assert not missing and "contrast" not in logs


def test_loss_decreases_on_learnable_problem():
    """Class- and event-dependent features: a few Adam steps must lower the loss."""
    torch.manual_seed(0)
    B, T, C, A, K = 16, 10, 16, 8, 4
    g = torch.Generator().manual_seed(0)
    protos_v, protos_a = torch.randn(K, C, generator=g), torch.randn(K, A, generator=g)
    cls = torch.arange(B) % K
    seg = torch.zeros(B, T, 29)
    seg[..., 28] = 1
    start = torch.randint(0, 5, (B,), generator=g)
    for i in range(B):
        seg[i, start[i]:start[i] + 5, 28] = 0
        seg[i, start[i]:start[i] + 5, cls[i]] = 1
    ev = 1.0 - seg[..., 28]
    visual = (0.3 * torch.randn(B, T, 2, 2, C, generator=g)
              + (ev[..., None] * protos_v[cls][:, None])[:, :, None, None])
    audio = 0.3 * torch.randn(B, T, A, generator=g) + ev[..., None] * protos_a[cls][:, None]
    batch = dict(visual=visual, audio=audio, segment_labels=seg, event_mask=ev,
                 video_label=torch.cat([F.one_hot(cls, 28).float(), torch.zeros(B, 1)], 1))
    model = CACENet((2, 2, C), A, d_model=64, video_fc_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        out = model(visual, audio)
        loss, _ = model.loss(out, batch, epoch=50, n_epochs=200)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
