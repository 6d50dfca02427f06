"""CCLN: Cross-modal Contrastive Learning Network (Sun et al., "Listen With Seeing", IEEE TMM 2025).

No public code exists (docs/reference.md §5); this follows the paper (seed 003). Structure:

* Fusion stage (eq. 1-3): audio-guided visual attention (AGVA, Tian et al. 2018) over the
  spatial map, then per-modality BiLSTM and self-attention -> v^F, a^F (B,T,d).
* Interaction stage, SBI (eq. 4-10): V1,V2,A1,A2 projections, softmax correlation h^va,
  its transpose h^av, gate threshold tau (rows re-normalised), cross-residual addition.
* Integration stage, FEE (eq. 11-20): self-attention + FFN + LayerNorm per modality,
  P^out = mean of both, segment head P^o, fusion score P^f, event head P^fe = max_t, and
  the TopK weight branch v^e, a^e that gates P^fe into P^e.
* Classification (eq. 21-24), contrastive branch (eq. 25-26), WCCL loss (eq. 27), focal /
  foreground / contrastive losses (eq. 28-35) and the cross-modal localisation task
  (eq. 17, 36-38).

Sizes the paper leaves open are taken from the AVE line of work (AVEL / PSP / CMBS / CMRAN):
AGVA as in AVE-ECCV18 (hidden 512, attention width 49, applied to the raw C-channel map; no
extra v_fc layer before it, which would double the cost of the 49-cell projections),
BiLSTM 128 per direction (d = 256), 4-head attention, FFN 1024, dropout 0.1, TopK k = 4
(CMBS), focal alpha 0.25 / gamma 2 (the common defaults), WCCL temperature 0.07 (SupCon).

Readings where the paper is ambiguous: tau is the SBI gate threshold ("gate thresholding",
Table IV sweeps 0.01-0.10 on rows that sum to 1), not a softmax temperature; "Max" in eq. 16
is over time, so P^e is event-level (R^C, as the text says); WCCL contrasts the T-dim
score profiles P^f / P^v / P^a (R^{T x 1}) masked by Y, L2-normalised, averaged over anchors;
eq. 28 (L_mfl) is the softmax focal loss, eq. 32 (L_bfl) the sigmoid one; eq. 36 is a BCE
with p(match) = exp(-distance).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.heads.baselines import AudioGuidedAttention  # AGVA, eq. 1 (Tian et al.)

# Paper §V-A: Adam (default settings), 200 epochs, batch 128; no schedule is mentioned.
TRAIN_DEFAULTS = {
    s: dict(optimizer="adam", lr=lr, weight_decay=0.0, epochs=200, batch_size=128,
            schedule=dict(kind="none"), clip_grad_norm=None, warmup_epochs=0)
    for s, lr in (("full", 1e-3), ("weak", 1e-4), ("cml", 1e-4))
}

TAU = {"full": 0.05, "weak": 0.06, "cml": 0.05}  # SBI gate threshold (§V-A, Table IV)
BRANCH_MODES = ("AV", "AV+V", "AV+A", "AV+V+A")  # Fig. 5 / Table II


# ----------------------------------------------------------------------------- functional parts
def sbi_gate(h: torch.Tensor, tau: float, eps: float = 1e-8) -> torch.Tensor:
    """h(tau) of eq. 7-8: rows L1-normalised, weights below tau cut to zero, rows re-normalised.

    The paper's "filtered and normalized with hyperparameter tau" / "gate thresholding" is the
    PSP-style soft threshold; the first normalisation makes tau mean the same for h^va (softmax
    rows) and its transpose h^av (softmax columns).
    """
    h = h / h.sum(-1, keepdim=True).clamp_min(eps)
    g = h * (h >= tau).to(h.dtype)
    return g / g.sum(-1, keepdim=True).clamp_min(eps)


def topk_mean(x: torch.Tensor, k: int, dim: int = 1) -> torch.Tensor:
    """Mean(TopK(x)) along ``dim`` (eq. 18-19); k is clamped to the sequence length."""
    return x.topk(min(k, x.shape[dim]), dim=dim).values.mean(dim)


def binary_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                      gamma: float = 2.0) -> torch.Tensor:
    """Element-wise binary focal loss FL (eq. 28/32), -alpha_t (1-p_t)^gamma log p_t."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def softmax_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss terms (eq. 28): -alpha y_k (1-p_k)^gamma log p_k, p = softmax over k.

    The full setting's prediction is a distribution over the C+1 classes (sum_k p_t^fk = 1),
    hence the softmax ("multi-class", L_mfl) form; the weak setting uses the binary form (L_bfl).
    """
    logp = F.log_softmax(logits, -1)
    loss = -targets * (1 - logp.exp()).pow(gamma) * logp
    return loss * alpha if alpha >= 0 else loss


def wccl_loss(views: list[torch.Tensor], labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """WCCL (eq. 27) over all views of a batch: every view of every video is an anchor.

    views: list of (N, D) embeddings (one per branch); labels: (N,) video classes. Positives
    B(i) are the other anchors with the same weak label (always including the anchor's other
    views); the 1/|B(i)| average sits inside the log as in eq. 27. Embeddings are
    L2-normalised (SupCon) and the log-softmax is computed with log-sum-exp (no overflow at
    small temperatures). The paper sums over anchors; we average so the weight eta does not
    scale with the batch size.
    """
    z = F.normalize(torch.cat(views, 0), dim=-1)
    y = labels.repeat(len(views))
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.t() / temperature).masked_fill(eye, float("-inf"))  # A(i) = I \ {i}
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    lse_pos = torch.logsumexp(log_prob.masked_fill(~pos, float("-inf")), dim=1)
    per_anchor = -(lse_pos - n_pos.clamp_min(1).to(z.dtype).log())
    valid = n_pos > 0
    return per_anchor[valid].mean() if bool(valid.any()) else z.sum() * 0


def cml_bce(dist: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """BCE of eq. 36 on the distance P^o_cml: p(match) = exp(-dist), summed over T, mean over B.

    Eq. 36 is written as -sum Y log P^o_cml on a distance; read literally it would push matched
    pairs apart, while the CML evaluation takes the argmin distance. exp(-d) turns the
    distance into a match probability so that BCE pulls matched segments together.
    """
    log_p = -dist
    log_1mp = torch.log((-torch.expm1(-dist)).clamp_min(1e-12))  # log(1 - exp(-d)), stable
    return -(match * log_p + (1 - match) * log_1mp).sum(-1).mean()


def _video_class(video_label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weak label y^w per video: foreground argmax, or background (C) for all-zero rows."""
    fg = video_label[:, :num_classes]
    return torch.where(fg.sum(-1) > 0, fg.argmax(-1), torch.full_like(fg[:, 0], num_classes,
                                                                         dtype=torch.long))


# ----------------------------------------------------------------------------- modules
class SelfAttention(nn.Module):
    """Sa(.) of eq. 2-3: multi-head self-attention with residual and LayerNorm."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.attn(x, x, x, need_weights=False)[0]))


def _sa_fl_ln(d: int, heads: int, ffn: int, dropout: float) -> nn.Module:
    """Ln(Fl(Sa(x))) of eq. 11-12 / 25-26: exactly a post-norm transformer encoder layer."""
    return nn.TransformerEncoderLayer(d, heads, ffn, dropout, batch_first=True)


class SBI(nn.Module):
    """Self-constrained Bi-modal Interaction (eq. 4-10)."""

    def __init__(self, d: int, tau: float, dropout: float):
        super().__init__()
        self.w1, self.w2, self.w3, self.w4 = (nn.Linear(d, d) for _ in range(4))  # eq. 4
        self.drop = nn.Dropout(dropout)
        self.tau = tau
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, vf: torch.Tensor, af: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = self.drop(self.w1(vf)), self.drop(self.w2(vf))
        a1, a2 = self.drop(self.w3(af)), self.drop(self.w4(af))
        h_va = torch.softmax(v2 @ a1.transpose(1, 2) * self.scale, dim=-1)  # eq. 5, rows = visual t
        h_av = h_va.transpose(1, 2)                                          # eq. 6, rows = audio t
        v_m = sbi_gate(h_av, self.tau) @ v1  # eq. 7: visual content indexed by audio time
        a_m = sbi_gate(h_va, self.tau) @ a2  # eq. 8: audio content indexed by visual time
        return vf + a_m, af + v_m            # eq. 9-10: cross residual


class CCLN(nn.Module):
    """CCLN head.

    hparams: hidden (d, 256), v_hidden (AGVA hidden, 512), lstm_hidden (d/2), heads (4),
    ffn (1024), dropout (0.1), tau (SBI gate; 0.05 full / 0.06 weak / 0.05 cml), branch
    ("AV+V"), topk (4), lam (150, eq. 31/35), eta (25, eq. 31/35), cml_weight (1.0, eq. 38),
    focal_alpha (0.25), focal_gamma (2.0), wccl_temperature (delta of eq. 27, 0.07).
    """

    settings = ("full", "weak", "cml")

    def __init__(self, visual_shape: tuple, audio_dim: int, setting: str = "full",
                 num_classes: int = 28, *, hidden: int = 256, v_hidden: int = 512,
                 lstm_hidden: int | None = None, heads: int = 4, ffn: int = 1024,
                 dropout: float = 0.1, tau: float | None = None, branch: str = "AV+V",
                 topk: int = 4, lam: float = 150.0, eta: float = 25.0, cml_weight: float = 1.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 wccl_temperature: float = 0.07):
        super().__init__()
        if setting not in self.settings:
            raise ValueError(f"setting {setting!r} not in {self.settings}")
        if branch not in BRANCH_MODES:
            raise ValueError(f"branch {branch!r} not in {BRANCH_MODES}")
        visual_shape = tuple(int(s) for s in visual_shape)
        if len(visual_shape) not in (1, 3):
            raise ValueError(f"visual_shape must be (H,W,C) or (C,), got {visual_shape}")
        lstm_hidden = lstm_hidden or hidden // 2
        if 2 * lstm_hidden != hidden:
            raise ValueError("BiLSTM output (2*lstm_hidden) must equal hidden")
        self.setting, self.num_classes, self.branch = setting, num_classes, branch
        self.spatial = len(visual_shape) == 3
        self.tau = TAU[setting] if tau is None else float(tau)
        self.topk, self.lam, self.eta, self.cml_weight = topk, lam, eta, cml_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.wccl_temperature = wccl_temperature
        c_v, C = visual_shape[-1], num_classes

        # Fusion stage (eq. 1-3). AGVA needs a spatial map; on pooled vectors the softmax over a
        # single cell is the identity, so it is not built (its weights would get no gradient).
        self.agva = AudioGuidedAttention(c_v, audio_dim, v_hidden, xavier_init=False) if self.spatial else None
        self.lstm_v = nn.LSTM(c_v, lstm_hidden, batch_first=True, bidirectional=True)
        self.lstm_a = nn.LSTM(audio_dim, lstm_hidden, batch_first=True, bidirectional=True)
        self.sa_v = SelfAttention(hidden, heads, dropout)
        self.sa_a = SelfAttention(hidden, heads, dropout)
        # Interaction stage (eq. 4-10).
        self.sbi = SBI(hidden, self.tau, dropout)
        # Integration stage (eq. 11-12).
        self.fee_v = _sa_fl_ln(hidden, heads, ffn, dropout)
        self.fee_a = _sa_fl_ln(hidden, heads, ffn, dropout)
        if setting != "cml":  # CML has no classification head and no FEE event branch (§V-B)
            self.cls = nn.Linear(hidden, C + 1)        # W5 = W_f5 / W_w5 (eq. 14, 21, 22)
            self.event_fc = nn.Linear(hidden, C)       # W7 (eq. 16)
            self.topk_v = nn.Linear(hidden, C)         # lin of eq. 18
            self.topk_a = nn.Linear(hidden, C)         # lin of eq. 19
            if setting == "weak":
                self.weight_branch = nn.Linear(C + 1, 1)  # W_b (eq. 23)
        # Contrastive branch network (eq. 15, 25-26); only the modes' branches are built.
        use_v, use_a = branch in ("AV+V", "AV+V+A"), branch in ("AV+A", "AV+V+A")
        self.fusion_score = nn.Linear(hidden, 1) if (use_v or use_a) else None  # W6 (eq. 15)
        self.branch_v = (nn.Sequential(_sa_fl_ln(hidden, heads, ffn, dropout), nn.Linear(hidden, 1))
                         if use_v else None)
        self.branch_a = (nn.Sequential(_sa_fl_ln(hidden, heads, ffn, dropout), nn.Linear(hidden, 1))
                         if use_a else None)

    # ------------------------------------------------------------------ backbone
    def _backbone(self, visual: torch.Tensor, audio: torch.Tensor):
        B, T = audio.shape[:2]
        v = visual
        if self.agva is not None:
            v, _ = self.agva(visual.reshape(B, T, -1, visual.shape[-1]), audio)  # eq. 1
        vf = self.sa_v(self.lstm_v(v)[0])                               # eq. 2
        af = self.sa_a(self.lstm_a(audio)[0])                           # eq. 3
        vi, ai = self.sbi(vf, af)                                       # eq. 4-10
        vz, az = self.fee_v(vi), self.fee_a(ai)                         # eq. 11-12
        return vf, af, vi, ai, vz, az

    def embed_cml(self, visual: torch.Tensor, audio: torch.Tensor):
        """Per-segment embeddings v^Z, a^Z (B,T,d) whose Euclidean distance is P^o_cml (eq. 17)."""
        vz, az = self._backbone(visual, audio)[4:]
        return vz, az

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> dict:
        vf, af, vi, ai, vz, az = self._backbone(visual, audio)
        p_out = 0.5 * (vz + az)                                         # eq. 13
        out: dict[str, torch.Tensor] = {}
        if self.setting == "cml":
            # eq. 17: per-segment Euclidean distance (clamped so sqrt has a finite gradient)
            out["dist"] = (vz - az).pow(2).sum(-1).clamp_min(1e-8).sqrt()
        else:
            p_o = self.cls(p_out)                                       # eq. 14 / 21 / 22
            # eq. 16: event-level logits, max over time; eq. 18-20: TopK weight branch
            p_fe = self.event_fc(p_out).amax(1)
            v_e = torch.sigmoid(topk_mean(self.topk_v(vi), self.topk))
            a_e = torch.sigmoid(topk_mean(self.topk_a(ai), self.topk))
            out["event_logits"] = p_fe * (v_e * a_e)                    # P^e (B,C)
            if self.setting == "full":
                out["logits"] = p_o                                     # P_full (B,T,C+1)
            else:
                theta = torch.sigmoid(F.relu(self.weight_branch(p_o))).squeeze(-1)  # eq. 23
                out["seg_logits"], out["theta"] = p_o, theta
                out["video_logits"] = torch.einsum("btk,bt->bk", p_o, theta)          # eq. 24
        if self.fusion_score is not None:
            out["pf"] = self.fusion_score(p_out).squeeze(-1)            # P^f (B,T)
        if self.branch_v is not None:
            out["pv"] = self.branch_v(vf).squeeze(-1)                   # P^v (eq. 25)
        if self.branch_a is not None:
            out["pa"] = self.branch_a(af).squeeze(-1)                   # P^a (eq. 26)
        return out

    # ------------------------------------------------------------------ loss / predict
    def _wccl(self, out: dict, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Eq. 30 / 34 / 37: contrast P^f with the branch predictions, masked by Y (the '◁ Y')."""
        if "pf" not in out:
            return None  # mode "AV": fusion branch only, no contrast
        views = [out[k] for k in ("pf", "pv", "pa") if k in out]
        if mask is not None:
            views = [p * mask for p in views]
        return wccl_loss(views, labels, self.wccl_temperature)

    def loss(self, out: dict, batch: dict, epoch: int = 0, n_epochs: int = 1):
        C = self.num_classes
        vl = batch["video_label"].to(next(iter(out.values())).dtype)
        y_w = _video_class(vl, C)
        terms: dict[str, torch.Tensor] = {}
        if self.setting == "full":
            seg = batch["segment_labels"].to(vl.dtype)
            mask = batch["event_mask"].to(vl.dtype)
            # eq. 28: multi-class focal loss over the C+1 classes, summed over k, mean over T
            terms["focal"] = softmax_focal_loss(out["logits"], seg, self.focal_alpha,
                                                self.focal_gamma).sum(-1).mean()
            # eq. 29: CE of P^e against the foreground part of every segment label, mean over T
            logp = F.log_softmax(out["event_logits"], -1)
            terms["fee"] = -(seg[..., :C].mean(1) * logp).sum(-1).mean()
            wccl = self._wccl(out, y_w, mask)
            total = terms["focal"] + self.lam * terms["fee"]
        elif self.setting == "weak":
            # eq. 32: binary focal loss on the video-level P_weak; eq. 33: CE of P^e (video labels only)
            terms["focal"] = binary_focal_loss(out["video_logits"], vl, self.focal_alpha,
                                               self.focal_gamma).sum(-1).mean()
            fg = vl[:, :C]
            fg = fg / fg.sum(-1, keepdim=True).clamp_min(1.0)
            terms["fee"] = -(fg * F.log_softmax(out["event_logits"], -1)).sum(-1).mean()
            wccl = self._wccl(out, y_w, None)  # no segment labels: Y^f_weak enters only via B(i)
            total = terms["focal"] + self.lam * terms["fee"]
        else:  # cml, eq. 36-38; Y^cml = segment-level audio-visual match = event mask
            mask = batch["event_mask"].to(vl.dtype)
            terms["bce"] = cml_bce(out["dist"], mask)
            wccl = self._wccl(out, y_w, mask)
            total = terms["bce"]
        if wccl is not None:
            terms["wccl"] = wccl
            total = total + (self.cml_weight if self.setting == "cml" else self.eta) * wccl
        names = ["loss", *terms]
        values = torch.stack([total.detach(), *(t.detach() for t in terms.values())]).tolist()
        return total, dict(zip(names, values))

    @torch.no_grad()
    def predict(self, out: dict) -> torch.Tensor:
        """(B,T) class per segment (28 = background). full: argmax P_full (eq. 21); weak: per-segment
        argmax of P_w (eq. 22). cml has no classification head (§IV-F): it returns the binary
        audio-visual match map (1 where p(match) = exp(-dist) > 0.5, else 0), not classes;
        evaluate CML with embed_cml."""
        if self.setting == "full":
            return out["logits"].argmax(-1)
        if self.setting == "weak":
            return out["seg_logits"].argmax(-1)
        return (out["dist"] < math.log(2.0)).long()
