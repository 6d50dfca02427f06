"""Dense audio-visual event localization head for UnAV-100 (Geng et al., CVPR 2023).

The UnAV baseline's design (REFERENCE §7), ActionFormer-style: per-modality embeddings,
a multi-scale temporal pyramid whose levels run a transformer block per modality followed
by cross-modal attention, and at every level a classification head (sigmoid focal loss)
and a class-aware boundary-regression head (DIoU loss). CACE-Net's modules are switches
reproducing its Table S3 rows: ``avca`` (audio-visual co-guidance attention before the
pyramid, eq. 1-6 adapted to 1-D features) and ``bece`` (background-event contrast on the
finest level, eq. 7-8, computed with log-sum-exp).

Sequences have variable length: every op takes a (B,T) validity mask.
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
                 center_radius: float = 1.5, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes, self.levels, self.center_radius = num_classes, levels, center_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
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

        ``events[b]`` is (E,3): start step, end step (float, in finest-level steps), class.
        A point is positive for an event's class when it lies in the event's centre region
        (radius ``center_radius`` x stride) and the event's max distance fits the level's range.
        """
        out = []
        B = len(events)
        for lvl in range(self.levels):
            stride = 2 ** lvl
            Tl = math.ceil(T / stride)  # = the strided convs' output length
            cls_t = torch.zeros(B, Tl, self.num_classes, device=device)
            reg_t = torch.zeros(B, Tl, self.num_classes, 2, device=device)
            lo, hi = REG_RANGES[min(lvl, len(REG_RANGES) - 1)]
            if lvl == self.levels - 1:
                hi = 10_000
            pts = (torch.arange(Tl, device=device, dtype=torch.float32) + 0.5) * stride  # centres, finest steps
            for b, ev in enumerate(events):
                if len(ev) == 0:
                    continue
                s, e, c = ev[:, 0:1].T, ev[:, 1:2].T, ev[:, 2].long()  # (1,E)
                left, right = pts[:, None] - s, e - pts[:, None]  # (Tl,E)
                inside = (left > 0) & (right > 0)
                centre = (s + e) / 2
                near = (pts[:, None] - centre).abs() <= self.center_radius * stride
                reach = torch.maximum(left, right) / stride
                ok = inside & near & (reach >= lo) & (reach <= hi)
                # for overlapping events of one class at a point, keep the shortest (ActionFormer)
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
        tg = self.targets(events, out["cls"][0].shape[1], out["cls"][0].device)
        cls_l, reg_l, n_pos = 0.0, 0.0, 0.0
        for lvl in range(self.levels):
            logits, dist, m = out["cls"][lvl], out["reg"][lvl], out["masks"][lvl]
            Tl = logits.shape[1]
            ct, rt = tg[lvl]["cls"][:, :Tl], tg[lvl]["reg"][:, :Tl]
            valid = m[..., None].expand_as(logits)
            cls_l = cls_l + sigmoid_focal(logits[valid], ct[valid], self.focal_alpha, self.focal_gamma).sum()
            pos = (ct > 0) & valid
            if pos.any():
                reg_l = reg_l + diou_loss(dist[pos], rt[pos]).sum()
            n_pos += float(pos.sum())
        norm = max(n_pos, 1.0)
        loss = cls_l / norm + reg_l / norm
        parts = {"cls": float(cls_l.detach() / norm),
                 "reg": float(reg_l.detach() / norm) if torch.is_tensor(reg_l) else 0.0}
        if self.bece:
            c = bece_contrast(self, out["fused0"], tg[0]["cls"], out["masks"][0])
            loss = loss + self.bece_w * c
            parts["bece"] = float(c.detach())
        return loss, parts

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, out, b: int, pre_nms_topk=2000, min_score=0.001):
        """Candidate (start, end, class, score) in finest steps for video ``b``."""
        segs, scores, labels = [], [], []
        for lvl in range(self.levels):
            stride = 2 ** lvl
            m = out["masks"][lvl][b]
            p = torch.sigmoid(out["cls"][lvl][b][m])  # (Tl,K)
            d = out["reg"][lvl][b][m]  # (Tl,K,2)
            pts = (torch.arange(len(p), device=p.device, dtype=torch.float32) + 0.5) * stride
            keep = p > min_score
            t_idx, k_idx = keep.nonzero(as_tuple=True)
            s = pts[t_idx] - d[t_idx, k_idx, 0] * stride
            e = pts[t_idx] + d[t_idx, k_idx, 1] * stride
            segs.append(torch.stack([s, e], -1))
            scores.append(p[t_idx, k_idx])
            labels.append(k_idx)
        segs, scores, labels = torch.cat(segs), torch.cat(scores), torch.cat(labels)
        if len(scores) > pre_nms_topk:
            top = scores.topk(pre_nms_topk).indices
            segs, scores, labels = segs[top], scores[top], labels[top]
        valid = segs[:, 1] > segs[:, 0]
        return segs[valid], labels[valid], scores[valid]


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
    """Soft-NMS per class (the UnAV baseline's post-processing, REFERENCE §7: Gaussian,
    sigma 0.4, at most 100 segments, min score 0.001; ``iou_threshold`` is for "linear")."""
    keep_s, keep_sc, keep_l = [], [], []
    for k in labels.unique():
        sel = labels == k
        s, sc = segs[sel].clone(), scores[sel].clone()
        while len(sc):
            i = int(sc.argmax())
            best, best_sc = s[i], sc[i]
            if best_sc < min_score:
                break
            keep_s.append(best)
            keep_sc.append(best_sc)
            keep_l.append(k)
            rest = torch.ones(len(sc), dtype=torch.bool, device=sc.device)
            rest[i] = False
            s, sc = s[rest], sc[rest]
            if not len(sc):
                break
            inter = (torch.minimum(s[:, 1], best[1]) - torch.maximum(s[:, 0], best[0])).clamp(min=0)
            iou = inter / ((s[:, 1] - s[:, 0]) + (best[1] - best[0]) - inter).clamp(min=1e-6)
            if method == "gaussian":  # every overlap decays (ActionFormer/UnAV's soft-NMS)
                decay = torch.exp(-(iou ** 2) / sigma)
            else:  # linear: only overlaps above the threshold decay
                decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
            sc = sc * decay
    if not keep_sc:
        return segs[:0], scores[:0], labels[:0]
    s, sc, lab = torch.stack(keep_s), torch.stack(keep_sc), torch.stack(keep_l)
    order = sc.argsort(descending=True)[:max_segments]
    return s[order], sc[order], lab[order]
