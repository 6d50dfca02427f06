"""AVE-ECCV18 baselines: sizes, shapes, attention, losses per setting."""
import math

import pytest
import torch

from avepipe.heads import baselines as B

torch.set_num_threads(1)

B_, T = 3, 10


def _batch(visual_shape=(7, 7, 512), audio_dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 28, (B_,), generator=g)
    mask = torch.zeros(B_, T)
    mask[:, 2:6] = 1
    seg = torch.zeros(B_, T, 29)
    lab = torch.where(mask.bool(), cls[:, None].expand(B_, T), torch.full((B_, T), 28))
    seg.scatter_(2, lab[..., None], 1.0)
    video = torch.zeros(B_, 29)
    video[torch.arange(B_), cls] = 1
    return {"visual": torch.randn(B_, T, *visual_shape, generator=g),
            "audio": torch.randn(B_, T, audio_dim, generator=g),
            "segment_labels": seg, "event_mask": mask, "video_label": video}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_released_code():
    # att_Net(128, 128, 512, 29) in AVE-ECCV18 models.py, counted by hand:
    #   BiLSTM audio 128->128: 2 dirs * 4*128*(128+128+2) = 264,192
    #   BiLSTM video 512->128: 2 * 4*128*(512+128+2)      = 657,408
    #   affine_audio 128*512+512 = 66,048; affine_video 512*512+512 = 262,656
    #   affine_v, affine_g 512*49 = 25,088 each; affine_h 49
    #   L1 512*64+64 = 32,832; L2 64*29+29 = 1,885            total 1,335,246
    assert n_params(B.AVEL((7, 7, 512), 128)) == 1_335_246
    # A only: 264,192 + L1 256*64+64 (16,448) + 1,885 = 282,525
    assert n_params(B.AudioOnly((7, 7, 512), 128)) == 282_525
    # V only: 657,408 + 16,448 + 1,885 = 675,741
    assert n_params(B.VisualOnly((7, 7, 512), 128)) == 675_741
    # AVDLN (cmm_train.py): 512*128+128 + 128*64+64 + 128*128+128 + 128*64+64 = 98,688
    assert n_params(B.AVEL((512,), 128, setting="cml")) == 98_688


@pytest.mark.parametrize("cls", [B.AVEL, B.AudioOnly, B.VisualOnly])
@pytest.mark.parametrize("vshape,adim", [((7, 7, 512), 128), ((512,), 128), ((7, 7, 2048), 2048)])
@pytest.mark.parametrize("setting", ["full", "weak"])
def test_shapes_and_predict(cls, vshape, adim, setting):
    m = cls(vshape, adim, setting=setting)
    b = _batch(vshape, adim)
    out = m(b["visual"], b["audio"])
    assert out["logits"].shape == (B_, T, 29)
    if setting == "weak":
        assert out["video_logits"].shape == (B_, 29)
        assert torch.equal(out["video_logits"], out["logits"].max(1).values)
    pred = m.predict(out)
    assert pred.shape == (B_, T) and pred.dtype == torch.long
    assert int(pred.min()) >= 0 and int(pred.max()) <= 28
    loss, parts = m.loss(out, b, 0, 10)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach())) and parts
    assert all(isinstance(v, float) for v in parts.values())


def test_attention_is_a_convex_combination_of_regions():
    att = B.AudioGuidedAttention(16, 8, hidden=32, att_units=49)
    v = torch.randn(2, 10, 49, 16)
    a = torch.randn(2, 10, 8)
    pooled, alpha = att(v, a)
    assert alpha.shape == (2, 10, 49)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 10))
    torch.testing.assert_close(pooled, (alpha[..., None] * v).sum(2))
    # the audio changes where it looks
    _, alpha2 = att(v, a + 3.0)
    assert not torch.allclose(alpha, alpha2)


def test_visual_only_ignores_audio_and_audio_only_ignores_visual():
    b = _batch()
    torch.manual_seed(0)
    vo, ao = B.VisualOnly((7, 7, 512), 128), B.AudioOnly((7, 7, 512), 128)
    torch.testing.assert_close(vo(b["visual"], b["audio"])["logits"], vo(b["visual"], b["audio"] * 0)["logits"])
    torch.testing.assert_close(ao(b["visual"], b["audio"])["logits"], ao(b["visual"] * 0, b["audio"])["logits"])


def test_weak_loss_reads_only_video_labels():
    m = B.AVEL((7, 7, 512), 128, setting="weak")
    b = _batch()
    b["segment_labels"] = torch.full_like(b["segment_labels"], float("nan"))
    b["event_mask"] = torch.full_like(b["event_mask"], float("nan"))
    loss, _ = m.loss(m(b["visual"], b["audio"]), b, 0, 1)
    assert torch.isfinite(loss)


def test_weak_background_only_video_targets_background():
    m = B.AVEL((512,), 128, setting="weak")
    t = m._video_target(torch.zeros(2, 29))
    assert torch.equal(t.argmax(-1), torch.tensor([28, 28]))


def test_cml_embeddings_loss_and_no_predict():
    m = B.AVEL((7, 7, 512), 128, setting="cml")
    b = _batch()
    v, a = m.embed_cml(b["visual"], b["audio"])
    assert v.shape == a.shape == (B_, T, 64)
    out = m(b["visual"], b["audio"])
    torch.testing.assert_close(out["dist"], (v - a).norm(dim=-1))
    # contrastive loss by hand for one batch
    y, d = b["event_mask"], out["dist"]
    want = (y * d**2 + (1 - y) * torch.clamp(2.0 - d, min=0) ** 2).mean()
    torch.testing.assert_close(m.loss(out, b, 0, 1)[0], want)
    with pytest.raises(RuntimeError):
        m.predict(out)
    with pytest.raises(ValueError):
        B.AudioOnly((512,), 128, setting="cml")


def _learnable(setting, n=24, seed=0):
    """Segments whose class is written in both modalities: easy to learn."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 28, (n,), generator=g)
    start = torch.randint(0, 5, (n,), generator=g)
    t = torch.arange(T)[None]
    mask = ((t >= start[:, None]) & (t < start[:, None] + 4)).float()
    lab = torch.where(mask.bool(), cls[:, None].expand(n, T), torch.full((n, T), 28))
    seg = torch.nn.functional.one_hot(lab, 29).float()
    pv, pa = torch.randn(29, 32, generator=g), torch.randn(29, 16, generator=g)
    visual = pv[lab][:, :, None, None, :].expand(n, T, 2, 2, 32) + 0.3 * torch.randn(n, T, 2, 2, 32, generator=g)
    audio = pa[lab] + 0.3 * torch.randn(n, T, 16, generator=g)
    video = torch.zeros(n, 29)
    video[torch.arange(n), cls] = 1
    return {"visual": visual, "audio": audio, "segment_labels": seg, "event_mask": mask, "video_label": video}


@pytest.mark.parametrize("name,setting", [("AVEL", "full"), ("AVEL", "weak"), ("AVEL", "cml"),
                                          ("AudioOnly", "full"), ("VisualOnly", "weak")])
def test_loss_decreases(name, setting):
    torch.manual_seed(0)
    m = getattr(B, name)((2, 2, 32), 16, setting=setting)
    b = _learnable(setting)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, _ = m.loss(m(b["visual"], b["audio"]), b, step, 30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_code_loss_option_runs_and_decreases():
    torch.manual_seed(0)
    m = B.AVEL((2, 2, 32), 16, code_loss=True)
    b = _learnable("full")
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = last = None
    for _ in range(15):
        loss, _ = m.loss(m(b["visual"], b["audio"]), b, 0, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < first


def test_train_defaults_follow_ave_eccv18():
    full = B.TRAIN_DEFAULTS["full"]
    assert (full["optimizer"], full["lr"], full["batch_size"], full["epochs"]) == ("adam", 1e-3, 64, 300)
    # StepLR(step_size=15000 steps, gamma 0.1) at 3339 // 64 = 52 steps per epoch -> epoch 288
    assert full["schedule"] == {"kind": "multistep", "milestones": [15000 // (3339 // 64)], "gamma": 0.1}
    assert B.TRAIN_DEFAULTS["weak"]["epochs"] == 250
    assert set(B.TRAIN_DEFAULTS) == set(B.AVEL.settings)
