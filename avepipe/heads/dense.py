"""Dense audio-visual event localization head for UnAV-100 (Geng et al., CVPR 2023).

The UnAV baseline's design (docs/reference.md §8), ActionFormer-style: per-modality embeddings,
a multi-scale temporal pyramid whose levels run a transformer block per modality followed
by cross-modal attention, and at every level a classification head (sigmoid focal loss)
and a class-aware boundary-regression head (DIoU loss). CACE-Net's modules are switches
reproducing its Table S3 rows: ``avca`` (audio-visual co-guidance attention before the
pyramid, eq. 1-6 adapted to 1-D features) and ``bece`` (background-event contrast on the
finest level, eq. 7-8, computed with log-sum-exp).

Sequences have variable length: every op takes a (B,T) validity mask.

Coordinates follow the baseline (libs/datasets/unav100.py, loc_generators.py): feature step i
sits at point i (the centre of its window); level l has points at j * 2**l, the centre of
the stride-2 convs' receptive field. Label assignment is the baseline's: a point is
positive for every event that contains it and whose largest boundary distance, in
finest steps, lies in the level's regression range (no centre sampling unless
``center_radius`` is set); targets are distances divided by the level's stride.
Differences from the baseline kept for size: one embedding conv, one transformer block
per modality and level, a linear fusion instead of the dependency block.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TRAIN_DEFAULTS = {
    "full": dict(optimizer="adamw", lr=1e-4, weight_decay=1e-4, epochs=40, warmup_epochs=5, batch_size=16,
                 schedule=dict(kind="cosine"), clip_grad_norm=1.0, ema=0.999),
}

# regression range of each pyramid level, in feature steps (ActionFormer's defaults)
REG_RANGES = [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10_000)]


class MaskedConv(nn.Module):
    """1-D conv that zeroes padded steps, optionally strided (pyramid downsampling)."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride=stride, padding=k // 2)
        self.stride = stride

    def forward(self, x, mask):  # x (B,C,T), mask (B,T) bool
        x = self.conv(x)
        if self.stride > 1:
            mask = mask[:, :: self.stride][:, : x.shape[-1]]
        return x * mask[:, None].to(x.dtype), mask


class CoGuidance(nn.Module):
    """AVCA on 1-D features: each modality gates the other's channels (CACE-Net eq. 1-6:
    audio-guided visual attention and visual-guided audio attention, fused by residual)."""

    def __init__(self, dim):
        super().__init__()
        self.a2v = nn.Sequential(nn.Linear(2 * dim, dim), nn.Sigmoid())
        self.v2a = nn.Sequential(nn.Linear(2 * dim, dim), nn.Sigmoid())

    def forward(self, v, a):  # (B,T,D)
        joint = torch.cat([v, a], -1)
        return v * (1 + self.a2v(joint)), a * (1 + self.v2a(joint))


class PyramidLevel(nn.Module):
    """Self-attention per modality, then cross-modal attention (each queries the other)."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.self_v = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.self_a = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.cross_v = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_a = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_v, self.norm_a = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, v, a, mask):
        pad = ~mask
        v = self.self_v(v, src_key_padding_mask=pad)
        a = self.self_a(a, src_key_padding_mask=pad)
        v2 = v + self.cross_v(self.norm_v(v), a, a, key_padding_mask=pad, need_weights=False)[0]
        a2 = a + self.cross_a(self.norm_a(a), v, v, key_padding_mask=pad, need_weights=False)[0]
        m = mask[..., None].to(v.dtype)
        return v2 * m, a2 * m


class DenseLocalizer(nn.Module):
    settings = ("full",)

    def __init__(self, visual_dim: int, audio_dim: int, num_classes: int = 100, *, dim: int = 256,
                 heads: int = 4, levels: int = 6, dropout: float = 0.1, avca: bool = False, bece: bool = False,
                 bece_temperature: float = 0.01, bece_sigma: float = 0.1, bece_weight: float = 0.1,
                 center_radius: float | None = None, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 init_loss_norm: float = 250.0, loss_norm_momentum: float = 0.9,
                 duration_thresh: float = 0.05):
        super().__init__()
        if levels > len(REG_RANGES):
            raise ValueError(f"levels must be <= {len(REG_RANGES)} (one regression range each), got {levels}")
        self.num_classes, self.levels, self.center_radius = num_classes, levels, center_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_norm_momentum, self.duration_thresh = loss_norm_momentum, duration_thresh
        # EMA of the number of positive points normalises the losses (baseline: init 250,
        # momentum 0.9) -- a per-batch count makes small batches noisy. A buffer, so it
        # is checkpointed and resumes exactly.
        self.register_buffer("loss_norm", torch.tensor(float(init_loss_norm)))
        self.bece, self.bece_t, self.bece_sigma, self.bece_w = bece, bece_temperature, bece_sigma, bece_weight
        self.embed_v = MaskedConv(visual_dim, dim)
        self.embed_a = MaskedConv(audio_dim, dim)
        self.avca = CoGuidance(dim) if avca else None
        self.down_v = nn.ModuleList(MaskedConv(dim, dim, 3, 2) for _ in range(levels - 1))
        self.down_a = nn.ModuleList(MaskedConv(dim, dim, 3, 2) for _ in range(levels - 1))
        self.blocks = nn.ModuleList(PyramidLevel(dim, heads, dropout) for _ in range(levels))
        self.fuse = nn.Linear(2 * dim, dim)
        self.cls_head = nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv1d(dim, num_classes, 3, padding=1))
        self.reg_head = nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv1d(dim, 2 * num_classes, 3, padding=1))
        self.scales = nn.Parameter(torch.ones(levels))
        if self.bece:
            self.proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        # focal-loss prior: start with p = 0.01 so the many negatives don't swamp early training
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - 0.01) / 0.01))

    # ------------------------------------------------------------------ forward
    def forward(self, visual, audio, mask):
        """visual (B,T,Cv), audio (B,T,Ca), mask (B,T) -> per-level logits / distances."""
        v, m0 = self.embed_v(visual.transpose(1, 2), mask)
        a, _ = self.embed_a(audio.transpose(1, 2), mask)
        v, a = F.relu(v).transpose(1, 2), F.relu(a).transpose(1, 2)
        if self.avca is not None:
            v, a = self.avca(v, a)
        cls, reg, masks, fused0 = [], [], [], None
        m = m0
        for lvl in range(self.levels):
            if lvl:
                v, m_new = self.down_v[lvl - 1](v.transpose(1, 2), m)
                a, _ = self.down_a[lvl - 1](a.transpose(1, 2), m)
                v, a, m = v.transpose(1, 2), a.transpose(1, 2), m_new
            v, a = self.blocks[lvl](v, a, m)
            f = self.fuse(torch.cat([v, a], -1))  # (B,Tl,D)
            if lvl == 0:
                fused0 = f
            ft = f.transpose(1, 2)
            cls.append(self.cls_head(ft).transpose(1, 2))  # (B,Tl,K)
            d = F.relu(self.scales[lvl] * self.reg_head(ft)).transpose(1, 2)
            reg.append(d.reshape(d.shape[0], d.shape[1], self.num_classes, 2))  # (B,Tl,K,2) steps of this level
            masks.append(m)
        return {"cls": cls, "reg": reg, "masks": masks, "fused0": fused0}

    # ------------------------------------------------------------------ targets
    def targets(self, events: list[torch.Tensor], T: int, device) -> list[dict]:
        """Per level: cls target (B,Tl,K) and regression target (B,Tl,K,2) in level steps.

        ``events[b]`` is (E,3): start, end (float, finest-level steps; feature i at i), class.
        As the baseline's ``label_points_single_video`` (class-aware): point p of level l
        (at j * 2**l) is positive for an event's class when it lies strictly inside the
        event and max(p - start, end - p), in finest steps, is within ``REG_RANGES[l]``
        (the last level takes everything longer). Two events of one class at a point:
        the shorter is regressed.
        """
        out = []
        B = len(events)
        for lvl in range(self.levels):
            stride = 2 ** lvl
            Tl = math.ceil(T / stride)  # = the strided convs' output length
            cls_t = torch.zeros(B, Tl, self.num_classes, device=device)
            reg_t = torch.zeros(B, Tl, self.num_classes, 2, device=device)
            lo, hi = REG_RANGES[lvl]
            if lvl == self.levels - 1:
                hi = float("inf")
            pts = torch.arange(Tl, device=device, dtype=torch.float32) * stride  # finest steps
            for b, ev in enumerate(events):
                if len(ev) == 0:
                    continue
                s, e, c = ev[:, 0:1].T, ev[:, 1:2].T, ev[:, 2].long()  # (1,E)
                left, right = pts[:, None] - s, e - pts[:, None]  # (Tl,E)
                reach = torch.maximum(left, right)  # finest steps, as the baseline compares
                ok = (left > 0) & (right > 0) & (reach >= lo) & (reach <= hi)
                if self.center_radius is not None:  # ActionFormer's optional centre sampling
                    ok &= (pts[:, None] - (s + e) / 2).abs() <= self.center_radius * stride
                length = (e - s).expand_as(left).masked_fill(~ok, float("inf"))
                for k in c.unique():
                    sel = c == k
                    L = length[:, sel]
                    best = L.argmin(1)
                    has = torch.isfinite(L.gather(1, best[:, None]))[:, 0]
                    idx = sel.nonzero()[:, 0][best]
                    cls_t[b, has, k] = 1.0
                    reg_t[b, has, k, 0] = left[has, idx[has]] / stride
                    reg_t[b, has, k, 1] = right[has, idx[has]] / stride
            out.append({"cls": cls_t, "reg": reg_t})
        return out

    # ------------------------------------------------------------------ losses
    def loss(self, out, events):
        """Focal + class-aware DIoU, both summed and divided by the EMA of the number of
        positive points (baseline ``losses``); plus ``bece_weight`` x BECE when enabled."""
        tg = self.targets(events, out["cls"][0].shape[1], out["cls"][0].device)
        cls_l, reg_l, n_pos = 0.0, 0.0, 0
        for lvl in range(self.levels):
            logits, dist, m = out["cls"][lvl], out["reg"][lvl], out["masks"][lvl]
            Tl = logits.shape[1]
            ct, rt = tg[lvl]["cls"][:, :Tl], tg[lvl]["reg"][:, :Tl]
            valid = m[..., None].expand_as(logits)
            cls_l = cls_l + sigmoid_focal(logits[valid], ct[valid], self.focal_alpha, self.focal_gamma).sum()
            pos = (ct > 0) & valid  # (point, class) pairs regressed (class-aware head)
            if pos.any():
                reg_l = reg_l + diou_loss(dist[pos], rt[pos]).sum()
            n_pos += int(((ct.sum(-1) > 0) & m).sum())  # positive points, as the baseline counts
        if self.training:
            with torch.no_grad():
                mom = self.loss_norm_momentum
                self.loss_norm.mul_(mom).add_((1 - mom) * max(n_pos, 1))
        norm = float(self.loss_norm)
        if not torch.is_tensor(reg_l):
            reg_l = sum(d.sum() for d in out["reg"]) * 0.0  # keep the graph (no positives)
        loss = cls_l / norm + reg_l / norm
        parts = {"cls": float(cls_l.detach() / norm), "reg": float(reg_l.detach() / norm), "n_pos": float(n_pos)}
        if self.bece:
            c = bece_contrast(self, out["fused0"], tg[0]["cls"], out["masks"][0])
            loss = loss + self.bece_w * c
            parts["bece"] = float(c.detach())
        return loss, parts

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, out, b: int, pre_nms_topk=2000, min_score=0.001):
        """Candidates (segments (N,2) in finest steps, labels, scores) of video ``b``.

        As the baseline's ``inference_single_video``: per level keep scores above
        ``min_score``, then that level's ``pre_nms_topk`` best, and drop segments shorter
        than ``duration_thresh`` steps.
        """
        segs, scores, labels = [], [], []
        for lvl in range(self.levels):
            stride = 2 ** lvl
            m = out["masks"][lvl][b]
            p = torch.sigmoid(out["cls"][lvl][b][m])  # (Tl,K)
            d = out["reg"][lvl][b][m]  # (Tl,K,2)
            flat = p.flatten()
            cand = (flat > min_score).nonzero()[:, 0]
            if len(cand) > pre_nms_topk:
                cand = cand[flat[cand].topk(pre_nms_topk).indices]
            t_idx, k_idx = cand // self.num_classes, cand % self.num_classes
            pts = t_idx.to(torch.float32) * stride
            s = pts - d[t_idx, k_idx, 0] * stride
            e = pts + d[t_idx, k_idx, 1] * stride
            keep = (e - s) > self.duration_thresh
            segs.append(torch.stack([s, e], -1)[keep])
            scores.append(flat[cand][keep])
            labels.append(k_idx[keep])
        return torch.cat(segs), torch.cat(labels), torch.cat(scores)


def sigmoid_focal(logits, targets, alpha=0.25, gamma=2.0):
    """Focal loss (Lin et al.) on sigmoid outputs, per element."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return a_t * ce * (1 - p_t) ** gamma


def diou_loss(pred, target, eps=1e-6):
    """1-D Distance-IoU loss on (left, right) distances from the same point."""
    pl, pr = pred[:, 0], pred[:, 1]
    tl, tr = target[:, 0], target[:, 1]
    inter = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    union = pl + pr + tl + tr - inter
    iou = inter / union.clamp(min=eps)
    enclose = torch.maximum(pl, tl) + torch.maximum(pr, tr)
    centre_dist = ((pr - pl) - (tr - tl)) / 2  # offset between the two segment centres
    return 1 - iou + (centre_dist / enclose.clamp(min=eps)) ** 2


def bece_contrast(model, fused, cls_t, mask):
    """Background-event supervised contrast within each video (CACE-Net eq. 7-8): a noisy
    key view of every step; positives share event/background state. Log-sum-exp keeps
    temperature 0.01 finite in float32."""
    q = F.normalize(model.proj(fused), dim=-1)  # (B,T,D)
    k = F.normalize(model.proj(fused + model.bece_sigma * torch.randn_like(fused)), dim=-1)
    is_event = (cls_t[:, : fused.shape[1]].sum(-1) > 0).float()  # (B,T)
    feats = torch.cat([q, k], 1)  # (B,2T,D)
    lab = torch.cat([is_event, is_event], 1)
    valid = torch.cat([mask, mask], 1)
    sim = feats @ feats.transpose(1, 2) / model.bece_t  # (B,2T,2T)
    eye = torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)[None]
    allowed = valid[:, None, :] & valid[:, :, None] & ~eye
    sim = sim.masked_fill(~allowed, float("-inf"))
    pos = (lab[:, :, None] == lab[:, None, :]) & allowed
    log_prob = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
    n_pos = pos.sum(-1)
    per_anchor = -(log_prob.masked_fill(~pos, 0)).sum(-1) / n_pos.clamp(min=1)
    use = valid & (n_pos > 0)
    return per_anchor[use].mean() if use.any() else fused.sum() * 0


def soft_nms(segs, scores, labels, sigma=0.4, iou_threshold=0.7, max_segments=100, min_score=0.001,
             method="gaussian"):
    """Soft-NMS per class (the UnAV baseline's ``batched_nms``, multiclass, docs/reference.md §8):
    repeatedly keep a class's best segment and decay that class's others by
    exp(-IoU^2 / sigma) ("gaussian") or by (1 - IoU) above ``iou_threshold`` ("linear");
    segments decayed below ``min_score`` are discarded; the ``max_segments`` best kept
    segments over all classes are returned, best first.

    All classes run together on a (classes, candidates) table. Scores only decay, so a
    class's i-th pick scores at least as high as its later ones: at most ``max_segments``
    rounds are needed for the overall top ``max_segments``.
    """
    if len(scores) == 0:
        return segs[:0], scores[:0], labels[:0]
    classes, inv = labels.unique(return_inverse=True)
    K = len(classes)
    order = torch.argsort(inv, stable=True)
    counts = torch.bincount(inv, minlength=K)
    first = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(inv), device=inv.device) - first[inv[order]]
    N = int(counts.max())
    S = torch.full((K, N), -1.0, dtype=scores.dtype, device=scores.device)  # -1 = empty / removed
    X0 = torch.zeros(K, N, dtype=segs.dtype, device=segs.device)
    X1 = torch.zeros_like(X0)
    S[inv[order], col] = scores[order]
    X0[inv[order], col] = segs[order, 0]
    X1[inv[order], col] = segs[order, 1]
    area = X1 - X0
    rows = torch.arange(K, device=scores.device)
    kept_s, kept_sc, kept_l = [], [], []
    for _ in range(min(max_segments, N)):
        best_sc, j = S.max(1)
        act = best_sc >= min_score
        if not act.any():
            break
        b0, b1 = X0[rows, j], X1[rows, j]
        kept_s.append(torch.stack([b0, b1], -1)[act])
        kept_sc.append(best_sc[act])
        kept_l.append(classes[act])
        S[rows, j] = -1.0
        inter = (torch.minimum(X1, b1[:, None]) - torch.maximum(X0, b0[:, None])).clamp(min=0)
        iou = inter / (area + (b1 - b0)[:, None] - inter).clamp(min=1e-6)
        if method == "gaussian":  # every overlap decays (ActionFormer/UnAV's soft-NMS)
            decay = torch.exp(-(iou ** 2) / sigma)
        else:  # linear: only overlaps at or above the threshold decay
            decay = torch.where(iou >= iou_threshold, 1 - iou, torch.ones_like(iou))
        live = (S >= 0) & act[:, None]
        S = torch.where(live, S * decay, S)
        S = torch.where(live & (S < min_score), torch.full_like(S, -1.0), S)
    if not kept_sc:
        return segs[:0], scores[:0], labels[:0]
    s, sc, lab = torch.cat(kept_s), torch.cat(kept_sc), torch.cat(kept_l)
    order = sc.argsort(descending=True, stable=True)[:max_segments]
    return s[order], sc[order], lab[order]
