"""Tests for the Ge et al. MM'23 head (avepipe.heads.event_memory.EventMemory)."""
import copy
import io
import math

import pytest
import torch

from avepipe.heads.event_memory import TRAIN_DEFAULTS, EventMemory, jsd

torch.set_num_threads(1)

TINY = dict(hidden=16, heads=2, ffn=32)  # same architecture, small widths: fast tests


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def make_batch(B=4, T=10, vshape=(2, 2, 8), adim=6, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, *vshape, generator=g)
    a = torch.randn(B, T, adim, generator=g)
    cls = torch.arange(B) % C
    mask = torch.zeros(B, T)
    for b in range(B):
        s = int(torch.randint(0, 5, (1,), generator=g))
        mask[b, s:s + 4] = 1
    seg = torch.zeros(B, T, C + 1)
    seg[..., C] = 1 - mask
    seg[torch.arange(B)[:, None], torch.arange(T)[None], cls[:, None].expand(B, T)] += mask
    vl = torch.zeros(B, C + 1)
    vl[torch.arange(B), cls] = 1
    return dict(visual=v, audio=a, segment_labels=seg, event_mask=mask, video_label=vl), cls


# --------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("adim,ref", [(128, 4_857_429), (2048, 5_348_949)])
def test_parameter_count_matches_reference(adim, ref):
    m = EventMemory((7, 7, 512), adim, n_layers=1)
    assert abs(n_params(m) - ref) / ref < 0.002
    # bank is state, not parameters
    assert "bank_visual" in m.state_dict() and "bank_audio" in m.state_dict()


def test_bank_defaults_are_the_released_code():
    """bank_update "reference"; bank size = the released scripts' --bank_size defaults
    (fully_supervised_main.py 32, weakly_supervised_main.py 20); the paper's 16 on request."""
    full, weak = EventMemory((4,), 3, "full"), EventMemory((4,), 3, "weak")
    assert full.bank_update == weak.bank_update == "reference"
    assert full.bank_size == 32 and full.bank_score.shape == (28, 32)
    assert weak.bank_size == 20 and weak.bank_visual.shape == (28, 20, 1, 4)
    paper = EventMemory((4,), 3, bank_size=16, bank_update="paper")
    assert paper.bank_size == 16 and paper.bank_update == "paper"
    with pytest.raises(ValueError, match="bank_update"):
        EventMemory((4,), 3, bank_update="fifo")
    with pytest.raises(ValueError, match="bank_size"):
        EventMemory((4,), 3, bank_size=0)


def test_train_defaults():
    for s in EventMemory.settings:
        d = TRAIN_DEFAULTS[s]
        assert d["optimizer"] == "adam" and d["lr"] == 3e-4 and d["epochs"] == 300
        assert d["batch_size"] == 128 and d["schedule"]["kind"] == "cosine"
    assert EventMemory((4,), 3, "full").margin == 0.7
    assert EventMemory((4,), 3, "weak").margin == 0.9


@pytest.mark.parametrize("vshape", [(2, 2, 8), (8,)])
def test_forward_shapes_map_and_pooled(vshape):
    batch, _ = make_batch(vshape=vshape)
    m = EventMemory(vshape, 6, num_classes=3, bank_size=2, **TINY)
    out = m(batch["visual"], batch["audio"])
    assert out["feats"].shape == (4, 10, 16)
    assert out["event_logits"].shape == (4, 3)
    assert out["relevance_logits"].shape == (4, 10)
    loss, parts = m.loss(out, batch, 0, 1)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in parts.values())
    m.eval()
    p = m.predict(m(batch["visual"], batch["audio"]))
    assert p.shape == (4, 10) and p.dtype == torch.long
    assert int(p.min()) >= 0 and int(p.max()) <= 3


# --------------------------------------------------------------------------- JSD / scores
def test_jsd_matches_hand_computation():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.1, 0.3, 0.6])
    m = [(a + b) / 2 for a, b in zip(p.tolist(), q.tolist())]
    kl = lambda x: sum(xi * math.log(xi / mi) for xi, mi in zip(x, m))  # noqa: E731
    hand = 0.5 * (kl(p.tolist()) + kl(q.tolist()))
    assert abs(float(jsd(p, q)) - hand) < 1e-6
    assert float(jsd(p, p)) == pytest.approx(0.0, abs=1e-7)
    # disjoint supports reach the maximum ln 2 (zeros handled by xlogy)
    assert float(jsd(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2), abs=1e-6)


def test_relation_score_full_and_weak():
    la, lv = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    out = {"audio_logits": la, "visual_logits": lv, "feats": torch.zeros(2, 5, 4)}
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]]).float()
    j = jsd(la.softmax(-1), lv.softmax(-1))
    for setting, em, expect in (("full", mask, 1 - j + mask), ("weak", None, 1 - j)):
        m = EventMemory((4,), 3, setting, num_classes=3, **TINY)
        assert torch.allclose(m.relation_scores(out, em, torch.zeros(2, dtype=torch.long)), expect, atol=1e-6)


# --------------------------------------------------------------------------- memory bank
def _bank_model(**kw):
    return EventMemory((2, 2, 3), 2, num_classes=2, bank_size=3, **TINY, **kw)


def _update(m, vals, scores, labels):
    """One video per entry of ``vals``: all its T=2 segments carry value v (visual) / -v (audio)
    except segment 1, which is distinct; ``scores`` (B,2) pick the segment."""
    B = len(vals)
    v = torch.tensor(vals, dtype=torch.float32)[:, None, None, None, None].expand(B, 2, 2, 2, 3).clone()
    v[:, 1] += 0.5
    a = -torch.tensor(vals, dtype=torch.float32)[:, None, None].expand(B, 2, 2).clone()
    m.update_bank(v, a, None, torch.tensor(scores, dtype=torch.float32), torch.tensor(labels),
                  torch.ones(B, dtype=torch.bool))
    return v, a


def test_bank_fills_keeps_top_n_and_stores_raw_segment():
    m = _bank_model(bank_update="paper")
    v, a = _update(m, [1.0, 2.0], [[0.1, 0.9], [0.8, 0.3]], [0, 0])
    assert m.bank_filled[0].tolist() == [True, True, False] and not m.bank_filled[1].any()
    assert torch.allclose(m.bank_score[0, :2], torch.tensor([0.9, 0.8]))  # sorted best first
    # raw features of the chosen segment are stored (video 0 -> segment 1, video 1 -> segment 0)
    assert torch.equal(m.bank_visual[0, 0], v[0, 1].reshape(4, 3))
    assert torch.equal(m.bank_visual[0, 1], v[1, 0].reshape(4, 3))
    assert torch.equal(m.bank_audio[0, 1], a[1, 0])
    # three more class-0 videos; bank of 3 keeps the top-3 scores overall
    _update(m, [3.0, 4.0, 5.0], [[0.5, 0.2], [0.95, 0.0], [0.1, 0.05]], [0, 0, 0])
    assert torch.allclose(m.bank_score[0], torch.tensor([0.95, 0.9, 0.8]))
    assert torch.equal(m.bank_visual[0, 0], torch.full((4, 3), 4.0))
    # a low-scoring class-1 video enters the empty class-1 bank
    _update(m, [6.0], [[0.01, 0.0]], [1])
    assert m.bank_filled[1].tolist() == [True, False, False]


def test_bank_one_entry_per_video():
    m = _bank_model(bank_update="paper")
    _update(m, [1.0, 2.0], [[0.3, 0.2], [0.5, 0.1]], [0, 0])
    # video 1 returns with a better score on its other segment: replaces its own slot
    _update(m, [2.0], [[0.1, 0.7]], [0])
    assert int(m.bank_filled[0].sum()) == 2
    assert torch.allclose(m.bank_score[0, :2], torch.tensor([0.7, 0.3]))
    assert torch.equal(m.bank_visual[0, 0], torch.full((4, 3), 2.5))  # its segment 1
    # ... and with a worse score: still one entry, carrying the current score
    _update(m, [1.0], [[0.05, 0.0]], [0])
    assert int(m.bank_filled[0].sum()) == 2
    assert torch.allclose(m.bank_score[0, :2], torch.tensor([0.7, 0.05]))
    # a full bank: a newcomer below every entry stays out, the returning video is refreshed
    _update(m, [3.0], [[0.5, 0.0]], [0])
    _update(m, [4.0, 2.0], [[0.01, 0.0], [0.6, 0.0]], [0, 0])
    assert torch.allclose(m.bank_score[0], torch.tensor([0.6, 0.5, 0.05]))
    assert not (m.bank_visual[0] == 4.0).all(-1).all(-1).any()


# Hand-built sequence of bank updates for both modes. Video v has T=2 segments; segment t
# carries visual value 10*v + t everywhere and audio [v + t/4, 0] (audio sum v + t/4) unless
# overridden. Scores are exact binary fractions. Expected banks were derived by hand:
# "reference" from the released AlignedVAMemory._sort_permutation (ShipingGe/AVEL
# memory_bank.py), "paper" from avepipe's one-entry-per-video rule.
def _video(v, audio0=None):
    vis = torch.tensor([10.0 * v, 10.0 * v + 1])[:, None, None].expand(2, 4, 3)
    aud = torch.tensor([[v, 0.0], [v + 0.25, 0.0]])
    if audio0 is not None:
        aud[0] = torch.tensor(audio0)
    return vis, aud


VIDEOS = {v: _video(v) for v in (1, 2, 3, 4, 6, 8, 9)}
VIDEOS[5] = _video(5, audio0=[0.5, -0.5])   # segment 0: audio sum exactly 0 (an empty slot's)
VIDEOS[7] = _video(7, audio0=[6.0, 0.0])    # segment 0: the same audio as video 6's segment 0


def _offer(m, offers, label):
    """offers: [(video, scores (2,))] of one class, in batch order."""
    vis = torch.stack([VIDEOS[v][0] for v, _ in offers])
    aud = torch.stack([VIDEOS[v][1] for v, _ in offers])
    m.update_bank(vis, aud, None, torch.tensor([s for _, s in offers]),
                  torch.full((len(offers),), label), torch.ones(len(offers), dtype=torch.bool))


def _bank(m, c):
    """Class c's slots as (visual value = 10*video + segment, score) ; None for empty."""
    out = []
    for j in range(m.bank_size):
        if not m.bank_filled[c, j]:
            assert float(m.bank_score[c, j]) == 0 and not m.bank_visual[c, j].any()
            out.append(None)
            continue
        vis = m.bank_visual[c, j]
        assert (vis == vis.flatten()[0]).all()
        v, t = divmod(int(vis.flatten()[0]), 10)
        assert torch.equal(m.bank_audio[c, j], VIDEOS[v][1][t])  # raw audio of that segment
        out.append((int(vis.flatten()[0]), float(m.bank_score[c, j])))
    return out


def test_bank_update_reference_hand_sequence():
    m = _bank_model()
    assert m.bank_update == "reference"
    # 1: video 1 offers its segment 1 (0.875), video 2 its segment 0 (0.5); empty slots score 0
    _offer(m, [(1, [0.25, 0.875]), (2, [0.5, 0.125])], 0)
    assert _bank(m, 0) == [(11, 0.875), (20, 0.5), None]
    # 2: video 1 returns with its OTHER segment: a second slot of the same video
    _offer(m, [(1, [0.9375, 0.75])], 0)
    assert _bank(m, 0) == [(10, 0.9375), (11, 0.875), (20, 0.5)]
    # 3: video 2 returns with segment 0 again, higher score: same audio sum is in the bank,
    #    skipped; its stored score stays 0.5 (never re-scored)
    _offer(m, [(2, [0.96875, 0.0])], 0)
    assert _bank(m, 0) == [(10, 0.9375), (11, 0.875), (20, 0.5)]
    # 4: a tie with the lowest entry (0.5): the incumbent stays ahead, the newcomer falls off
    _offer(m, [(3, [0.5, 0.0])], 0)
    assert _bank(m, 0) == [(10, 0.9375), (11, 0.875), (20, 0.5)]
    # 5: batch order matters. [4, 2]: video 4 pushes segment 20 out, then 20 is no longer in
    #    the bank and re-enters with its new score, pushing 11 out. [2, 4]: 20 is still in
    #    when video 2 offers it (skipped), then video 4 pushes it out.
    m2 = copy.deepcopy(m)
    _offer(m, [(4, [0.984375, 0.0]), (2, [0.90625, 0.0])], 0)
    assert _bank(m, 0) == [(40, 0.984375), (10, 0.9375), (20, 0.90625)]
    _offer(m2, [(2, [0.90625, 0.0]), (4, [0.984375, 0.0])], 0)
    assert _bank(m2, 0) == [(40, 0.984375), (10, 0.9375), (11, 0.875)]
    # 6: class 1 (empty bank, 3 slots of audio sum 0): video 5's segment 0 sums to 0 -> skipped;
    #    video 7's segment 0 has the audio of video 6's, inserted just before it -> skipped
    _offer(m, [(5, [0.75, 0.0]), (6, [0.25, 0.0]), (7, [0.875, 0.0])], 1)
    assert _bank(m, 1) == [(60, 0.25), None, None]
    # 7: once no slot is empty, the zero-sum segment enters
    _offer(m, [(8, [0.5, 0.0]), (9, [0.375, 0.0]), (5, [0.75, 0.0])], 1)
    assert _bank(m, 1) == [(50, 0.75), (80, 0.5), (90, 0.375)]
    assert _bank(m, 0) == [(40, 0.984375), (10, 0.9375), (20, 0.90625)]  # class 0 untouched


def test_bank_update_paper_hand_sequence():
    """The same offers under bank_update="paper": one entry per video, re-scored on each visit."""
    m = _bank_model(bank_update="paper")
    _offer(m, [(1, [0.25, 0.875]), (2, [0.5, 0.125])], 0)
    assert _bank(m, 0) == [(11, 0.875), (20, 0.5), None]
    _offer(m, [(1, [0.9375, 0.75])], 0)           # video 1's slot now holds its segment 0
    assert _bank(m, 0) == [(10, 0.9375), (20, 0.5), None]
    _offer(m, [(2, [0.96875, 0.0])], 0)           # video 2 re-scored
    assert _bank(m, 0) == [(20, 0.96875), (10, 0.9375), None]
    _offer(m, [(3, [0.5, 0.0])], 0)
    assert _bank(m, 0) == [(20, 0.96875), (10, 0.9375), (30, 0.5)]
    m2 = copy.deepcopy(m)
    _offer(m, [(4, [0.984375, 0.0]), (2, [0.90625, 0.0])], 0)
    assert _bank(m, 0) == [(40, 0.984375), (10, 0.9375), (20, 0.90625)]
    _offer(m2, [(2, [0.90625, 0.0]), (4, [0.984375, 0.0])], 0)  # order does not matter here
    assert _bank(m2, 0) == _bank(m, 0)
    _offer(m, [(5, [0.75, 0.0]), (6, [0.25, 0.0]), (7, [0.875, 0.0])], 1)
    assert _bank(m, 1) == [(70, 0.875), (50, 0.75), (60, 0.25)]
    _offer(m, [(8, [0.5, 0.0]), (9, [0.375, 0.0]), (5, [0.75, 0.0])], 1)
    assert _bank(m, 1) == [(70, 0.875), (50, 0.75), (80, 0.5)]


class _ReleasedBank:
    """ShipingGe/AVEL memory_bank.py AlignedVAMemory, transcribed line for line (feature shapes
    and class count as arguments instead of 7x7x512 / 128 / 28)."""

    def __init__(self, n_class, n_mu, vshape, adim):
        self.n_mu = n_mu
        self.cls_v_queue = torch.zeros(n_class, n_mu, *vshape)
        self.cls_a_queue = torch.zeros(n_class, n_mu, adim)
        self.cls_sc_queue = torch.zeros(n_class, n_mu)

    def _update_queue(self, inp_v, inp_a, inp_sc, cls_idx):
        for i in range(len(cls_idx)):
            self._sort_permutation(inp_v[i], inp_a[i], inp_sc[i], cls_idx[i])

    def _sort_permutation(self, inp_v, inp_a, inp_sc, idx):
        sf = self.cls_a_queue[idx].sum(-1)
        sa = inp_a.sum(-1)
        if sa not in sf:
            concat_sc = torch.cat([self.cls_sc_queue[idx], inp_sc.unsqueeze(0)], 0)
            concat_v = torch.cat([self.cls_v_queue[idx], inp_v.unsqueeze(0)], 0)
            concat_a = torch.cat([self.cls_a_queue[idx], inp_a.unsqueeze(0)], 0)
            sorted_sc, indices = torch.sort(concat_sc, descending=True)
            self.cls_v_queue[idx] = torch.index_select(concat_v, 0, indices[:self.n_mu])
            self.cls_a_queue[idx] = torch.index_select(concat_a, 0, indices[:self.n_mu])
            self.cls_sc_queue[idx] = sorted_sc[:self.n_mu]


def _released_offer(bank, audio, video, scores, labels):
    """MAML.forward's selection: best segment per video by one-hot product-sum."""
    T = scores.shape[1]
    selected_scores, selected_idx = scores.max(dim=1)
    selected_idx = torch.nn.functional.one_hot(selected_idx, num_classes=T).unsqueeze(-1)
    selected_audio = (audio * selected_idx).sum(1)
    selected_video = (video * selected_idx.unsqueeze(-1).unsqueeze(-1)).sum(1)
    bank._update_queue(selected_video, selected_audio, selected_scores, labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bank_update_reference_equals_released_code_on_random_visits(seed):
    """Random batches of returning videos (some sharing audio, one segment of audio sum 0):
    after every batch the bank equals the transcribed released AlignedVAMemory, slot for
    slot (its empty slots are zeros; so are avepipe's). Distinct scores: no ties."""
    g = torch.Generator().manual_seed(seed)
    V, T, C, n, steps, B = 12, 3, 3, 4, 14, 5
    visual = torch.randn(V, T, 2, 2, 3, generator=g)
    audio = torch.randn(V, T, 4, generator=g)
    audio[5, 0] = audio[2, 1]                      # same audio in two videos of class 2
    audio[7, 0] = torch.tensor([1.5, -1.5, 0.25, -0.25])  # sum exactly 0, class 1
    labels = torch.arange(V) % C
    all_scores = (torch.randperm(steps * B * T, generator=g).float() + 1) / (steps * B * T)
    all_scores = all_scores.reshape(steps, B, T)
    all_scores[:, :, 0] += (torch.arange(B) % 2).float()  # favour segment 0 half the time
    m = EventMemory((2, 2, 3), 4, num_classes=C, bank_size=n, **TINY)
    paper = EventMemory((2, 2, 3), 4, num_classes=C, bank_size=n, bank_update="paper", **TINY)
    ref = _ReleasedBank(C, n, (2, 2, 3), 4)
    differs = False
    for step in range(steps):
        vids = torch.randint(0, V, (B,), generator=g)
        sc = all_scores[step]
        _released_offer(ref, audio[vids], visual[vids], sc, labels[vids])
        for model in (m, paper):
            model.update_bank(visual[vids], audio[vids], None, sc, labels[vids],
                              torch.ones(B, dtype=torch.bool))
        assert torch.equal(m.bank_score, ref.cls_sc_queue), step
        assert torch.equal(m.bank_visual.reshape(ref.cls_v_queue.shape), ref.cls_v_queue), step
        assert torch.equal(m.bank_audio, ref.cls_a_queue), step
        assert torch.equal(m.bank_filled, ref.cls_sc_queue > 0), step
        differs |= not torch.equal(paper.bank_score, ref.cls_sc_queue)
    assert differs  # the "paper" rule is a different bank on the same visits
    # several segments of one video held at once, somewhere (the released behaviour)
    keys = [(int(v), t) for v in range(V) for t in range(T)]
    held = [[k for k in keys if any(torch.equal(audio[k[0], k[1]], m.bank_audio[c, j])
                                    for j in range(n) if m.bank_filled[c, j])] for c in range(C)]
    assert any(len({v for v, _ in h}) < len(h) for h in held)


def test_bank_is_reencoded_with_current_weights():
    torch.manual_seed(0)
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY).eval()
    batch, _ = make_batch()
    m.train()
    m.loss(m(batch["visual"], batch["audio"]), batch)
    m.eval()
    raw = m.bank_visual.clone()
    f1 = m(batch["visual"], batch["audio"])["bank_feats"].clone()
    with torch.no_grad():
        m.video_fc[0].weight.mul_(1.5)  # change the encoder
    f2 = m(batch["visual"], batch["audio"])["bank_feats"]
    filled = m.bank_filled
    assert not torch.allclose(f1[filled], f2[filled])  # eval cache invalidated, features re-encoded
    assert torch.equal(raw, m.bank_visual)  # stored raw inputs untouched


def test_bank_gets_gradient_through_reencoding():
    torch.manual_seed(0)
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY)
    batch, _ = make_batch()
    out = m(batch["visual"], batch["audio"])
    # only the metric losses: L_p + L_c depend on the bank encoding
    m.lambdas = (0.0, 0.0, 0.0, 1.0, 1.0)
    loss, _ = m.loss(out, batch)
    bank = m._encode_bank()
    assert bank.requires_grad
    loss.backward()
    assert m.video_stf.layers[0].lin1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- inference
def test_eadb_inference_rule_margin():
    D = 4
    m = EventMemory((4,), 3, num_classes=2, bank_size=2, hidden=D, heads=2, ffn=8, margin=0.7)
    m.bank_filled.fill_(True)
    s = math.sqrt(D)  # distances are divided by sqrt(D)
    bank = torch.zeros(2, 2, D)
    bank[0, :, 0] = torch.tensor([-3.0, -3.2]) * s  # class 0 far along -x
    bank[1, :, 0] = torch.tensor([1.0, 1.2]) * s  # class 1 at x = 1.0, 1.2 (scaled)
    feats = torch.zeros(1, 4, D)
    feats[0, :, 0] = torch.tensor([1.1, 1.5, 1.95, 0.05]) * s  # min dists to class-1 bank: .1,.3,.75,.95
    out = {"feats": feats, "bank_feats": bank, "event_logits": torch.zeros(1, 2)}
    assert m.predict(out).tolist() == [[1, 1, 2, 2]]
    m.margin = 0.9
    assert m.predict(out).tolist() == [[1, 1, 1, 2]]
    # class by the nearest prototype on average: move segments to class 0
    out["feats"] = -feats - 2.0 * s
    assert set(m.predict(out)[0].tolist()) <= {0, 2}
    # empty banks never win; with no bank at all, everything is background
    m.bank_filled.zero_()
    assert m.predict(out).tolist() == [[2, 2, 2, 2]]


# --------------------------------------------------------------------------- training
def _learnable(B=12, T=10, C=3, seed=0):
    """Class c: audio carries one-hot c on event segments, visual carries it too; background is noise."""
    batch, cls = make_batch(B=B, T=T, C=C, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = batch["event_mask"]
    sig = torch.nn.functional.one_hot(cls, 6).float()[:, None, :] * mask[..., None] * 3.0
    batch["audio"] = 0.3 * torch.randn(B, T, 6, generator=g) + sig
    batch["visual"] = 0.3 * torch.randn(B, T, 2, 2, 8, generator=g) + \
        torch.nn.functional.pad(sig, (0, 2))[:, :, None, None, :]
    return batch


@pytest.mark.parametrize("setting", ["full", "weak"])
def test_loss_decreases_on_tiny_problem(setting):
    torch.manual_seed(0)
    batch = _learnable()
    m = EventMemory((2, 2, 8), 6, setting, num_classes=3, bank_size=3, **TINY)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        out = m(batch["visual"], batch["audio"])
        loss, parts = m.loss(out, batch, step, 40)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    m.eval()
    pred = m.predict(m(batch["visual"], batch["audio"]))
    target = batch["segment_labels"].argmax(-1)
    if setting == "full":
        assert (pred == target).float().mean() > 0.6  # chance (3 classes + bg) is far lower
    else:  # weak: no segment labels; at least the event class must be found (eq. 20)
        ev = batch["event_mask"].bool()
        assert (pred[ev] == target[ev]).float().mean() > 0.6  # chance: 1/3


def test_weak_uses_only_video_labels():
    torch.manual_seed(0)
    batch, _ = make_batch()
    weak = {k: batch[k] for k in ("visual", "audio", "video_label")}  # no segment labels at all
    weak["video_label"] = torch.cat([weak["video_label"], torch.zeros(1, 4)])  # + a background-only video
    weak["visual"] = torch.cat([weak["visual"], torch.randn(1, 10, 2, 2, 8)])
    weak["audio"] = torch.cat([weak["audio"], torch.randn(1, 10, 6)])
    m = EventMemory((2, 2, 8), 6, "weak", num_classes=3, bank_size=8, **TINY)
    m2 = copy.deepcopy(m)
    torch.manual_seed(1)
    a, _ = m.loss(m(weak["visual"], weak["audio"]), weak)
    assert torch.isfinite(a)
    assert int(m.bank_filled.sum()) == 4  # the background-only video is not stored
    # random segment labels / masks, if present, change nothing
    full = dict(weak, segment_labels=torch.rand(5, 10, 4), event_mask=torch.rand(5, 10).round())
    torch.manual_seed(1)
    b, _ = m2.loss(m2(full["visual"], full["audio"]), full)
    assert torch.equal(a, b)
    assert torch.equal(m.bank_score, m2.bank_score) and torch.equal(m.bank_visual, m2.bank_visual)


def test_state_dict_roundtrip_keeps_bank():
    torch.manual_seed(0)
    batch, _ = make_batch()
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY)
    m.loss(m(batch["visual"], batch["audio"]), batch)
    assert m.bank_filled.any()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY)
    m2.load_state_dict(torch.load(buf))
    for k in ("bank_visual", "bank_audio", "bank_score", "bank_filled", "bank_key"):
        assert torch.equal(getattr(m, k), getattr(m2, k)), k
    m.eval(), m2.eval()
    assert torch.equal(m.predict(m(batch["visual"], batch["audio"])),
                       m2.predict(m2(batch["visual"], batch["audio"])))


# --------------------------------------------------------------------------- ablations
@pytest.mark.parametrize("flags", [
    dict(use_audio=False), dict(use_visual=False), dict(use_transformer=False),
    dict(spatial_fusion=False), dict(temporal_fusion=False),
    dict(spatial_fusion=False, temporal_fusion=False), dict(jsd_update=False),
    dict(bank_consistency=False), dict(branch="double"), dict(branch="single"),
    dict(class_branch="prototype+classifier"), dict(n_layers=2),
])
def test_ablation_flags_run(flags):
    torch.manual_seed(0)
    batch, _ = make_batch()
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY, **flags)
    loss, _ = m.loss(m(batch["visual"], batch["audio"]), batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert m.bank_filled.any()
    m.eval()
    p = m.predict(m(batch["visual"], batch["audio"]))
    assert p.shape == (4, 10)


def test_ablations_remove_modules():
    full = n_params(EventMemory((7, 7, 512), 128))
    assert n_params(EventMemory((7, 7, 512), 128, use_audio=False)) < full
    assert n_params(EventMemory((7, 7, 512), 128, use_transformer=False)) < full
    assert n_params(EventMemory((7, 7, 512), 128, spatial_fusion=False)) < full
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_consistency=False, **TINY)
    assert "bank_feats" in m.state_dict() and "bank_visual" not in m.state_dict()


# --------------------------------------------------------------------------- exact shortcuts
def _naive_attention(att, x, mem, drop, key_mask=None):
    """Textbook multi-head cross-attention with att's weights: every memory token projected to
    a key and a value (what _Attention._one_query avoids)."""
    n, lq, d = x.shape
    h, e = att.h, d // att.h
    w, b = att.in_proj.weight, att.in_proj.bias
    split = lambda t: t.reshape(n, -1, h, e).transpose(1, 2)  # noqa: E731
    q, k, v = (split(torch.nn.functional.linear(t, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]))
               for i, t in enumerate((x, mem, mem)))
    s = q @ k.transpose(-1, -2) / math.sqrt(e)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.nn.functional.dropout(s.softmax(-1), att.p, drop)
    return att.out_proj((p @ v).transpose(1, 2).reshape(n, lq, d))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_attention_equals_textbook_attention(training, cross):
    """_Attention's generic path (SDPA in eval; in training explicit softmax + avepipe dropout)
    is textbook attention with the same dropout mask, key mask included."""
    from avepipe.heads.event_memory import _Attention
    torch.manual_seed(0)
    att = _Attention(16, 4, 0.3).train(training)
    x = torch.randn(6, 5, 16)
    mem = torch.randn(6, 9, 16) if cross else x
    key_mask = torch.rand(6, mem.shape[1]) < 0.7
    key_mask[:, 0] = True
    torch.manual_seed(1)
    out = att(x, mem if cross else None, key_mask)
    torch.manual_seed(1)
    ref = _naive_attention(att, x, mem, training, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if training:   # dropout did act: a different draw gives a different output
        assert not torch.allclose(att(x, mem if cross else None, key_mask), ref, atol=1e-3)


@pytest.mark.parametrize("training", [False, True])
def test_one_query_cross_attention_equals_projected_keys_values(training):
    """The spatial decoder's one-query shortcut (keys folded into the query, values projected
    after pooling) is the same function, gradients included; in training with the same
    attention-dropout mask (same RNG draw)."""
    from avepipe.heads.event_memory import _Attention
    torch.manual_seed(0)
    att = _Attention(16, 4, 0.3).train(training)
    with torch.no_grad():
        att.in_proj.bias.normal_()  # non-zero key/value biases: the folded terms must be right
    x = torch.randn(6, 1, 16, requires_grad=True)
    mem = torch.randn(6, 9, 16, requires_grad=True)
    torch.manual_seed(1)
    fast = att(x, mem)
    torch.manual_seed(1)
    ref = _naive_attention(att, x, mem, training)
    assert torch.allclose(fast, ref, atol=1e-5)
    gf = torch.autograd.grad(fast.square().sum(), [x, mem, att.in_proj.weight, att.in_proj.bias])
    gr = torch.autograd.grad(ref.square().sum(), [x, mem, att.in_proj.weight, att.in_proj.bias])
    for a, b in zip(gf, gr):
        assert torch.allclose(a, b, atol=1e-4)
    # against torch's own module too (eval: no dropout)
    if not training:
        mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(att.in_proj.weight), mha.in_proj_bias.copy_(att.in_proj.bias)
            mha.out_proj.weight.copy_(att.out_proj.weight), mha.out_proj.bias.copy_(att.out_proj.bias)
        assert torch.allclose(fast, mha(x, mem, mem, need_weights=False)[0], atol=1e-5)


def test_model_forward_and_loss_same_with_and_without_shortcuts(monkeypatch):
    """Whole model (eval: deterministic): fused features, logits and the loss (bank re-encoded)
    equal those of the generic attention path."""
    from avepipe.heads import event_memory as em
    torch.manual_seed(0)
    batch, _ = make_batch(B=5)
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY)
    m.train()
    m.loss(m(batch["visual"], batch["audio"]), batch)  # fill the bank
    m.eval()
    fast = m(batch["visual"], batch["audio"])
    lf, pf = m.loss(fast, batch)
    monkeypatch.setattr(em._Attention, "one_query_shortcut", False)
    m._cache = None
    slow = m(batch["visual"], batch["audio"])
    ls, ps = m.loss(slow, batch)
    for k in ("feats", "event_logits", "relevance_logits", "audio_logits", "visual_logits", "bank_feats"):
        assert torch.allclose(fast[k], slow[k], atol=1e-5), k
    assert torch.allclose(lf, ls, atol=1e-5)


def test_prototype_and_localization_losses_match_reference_formulas():
    """L_p (reference code: CE over -mean_t dist(f_t, c_n)/tau per video) and the full-setting
    L_c (event / background terms each averaged over their own segments of the video), both
    recomputed independently with torch.cdist from the model's features and bank."""
    torch.manual_seed(0)
    batch, cls = make_batch(B=6)
    m = EventMemory((2, 2, 8), 6, num_classes=3, bank_size=2, **TINY)
    m.train()
    m.loss(m(batch["visual"], batch["audio"]), batch)
    m.eval()
    with torch.no_grad():
        out = m(batch["visual"], batch["audio"])
        _, parts = m.loss(out, batch)
    f, bank = out["feats"], out["bank_feats"]
    assert m.bank_filled.all()  # two videos per class fill banks of 2: plain means / min / max
    dist = lambda x, y: torch.cdist(x, y) / math.sqrt(x.shape[-1])  # noqa: E731
    proto = bank.mean(1)
    lp = torch.nn.functional.cross_entropy(-dist(f, proto).mean(1) / 0.1, cls)
    assert parts["loss_p"] == pytest.approx(float(lp), rel=1e-4)
    y = batch["event_mask"]
    d = dist(f, bank[cls])
    ev = (y * d.amax(-1)).sum(1) / y.sum(1)
    bg = ((1 - y) * torch.relu(0.7 - d.amin(-1))).sum(1) / (1 - y).sum(1)
    assert parts["loss_c"] == pytest.approx(float((ev + bg).mean()), rel=1e-4)
    # eq. 6-7 as printed: one distribution per segment
    m.prototype_loss = "segment"
    with torch.no_grad():
        _, parts = m.loss(out, batch)
    seg = torch.nn.functional.cross_entropy((-dist(f, proto) / 0.1).reshape(-1, 3), cls.repeat_interleave(10))
    assert parts["loss_p"] == pytest.approx(float(seg), rel=1e-4)
