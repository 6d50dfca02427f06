"""CACE-Net (He et al., ACM MM 2024): co-guidance attention + background-event contrast.

Paper: "CACE-Net: Co-guidance Attention and Contrastive Enhancement for Effective
Audio-Visual Event Localization" (seeds 000/001). Reference code: Brain-Cog-Lab/CACE-Net,
``CACE/model/main_model.py::supv_main_model`` and ``CACE/supv_main.py::train_epoch``
(facts taken, code written anew).

Pipeline for one video of T segments::

    v_fc(visual maps) --AVCA (eq. 1-6)--> v_t (512), a_t (Ca)
      --BiLSTM--> (512, 256) --CMRAN relation encoders/decoders--> (256, 256)
      --CMBS background gates + class-activation sequences--> AV interaction --> F_av
      --BECE (eq. 7-8)--> F_o = F_av + lambda * proj(F_av) --> is-event logit (eq. 10)
      max_t F_av --> video class (eq. 11) (+ gamma * CAS score)

Only the layers the reference's forward pass uses are built, so the parameter count equals
the reference's *trained* parameters (9,283,417 for VGG-19 + VGGish with co-guidance), not its
13.1M as-built count (which includes dead template copies and unused layers).

Departures from the printed equations. The defaults follow the released code, which trained
the published 80.8; the option named restores the printed reading where one exists:

- eq. 12, L_supp (the CMBS background-suppression loss [30]): the released code feeds the gate
  *probability* p = sigmoid(z_a) * sigmoid(z_v) to ``BCEWithLogitsLoss`` (as CMBS does), i.e.
  BCE(sigmoid(p), y) with p in (0, 1). ``gate_loss="paper"``: plain BCE(p, y).
- eq. 11: the video class score adds gamma * the CAS score (top-4 mean of the CMBS
  class-activation sequences). ``gamma=0`` removes it from eq. 11.
- eq. 12: one more term, the cross-entropy of the CAS score (released code). No option.
- eq. 7-8, 10: BECE is switched on at epoch ``bece_start`` * n_epochs (1/8, the released
  ``contrastive_switch``); before it eq. 10 reads F_av and eq. 7 is not in eq. 12.
  ``bece_start=0``: from the first epoch.
- eq. 3 (and the visual self-attention that makes v^g in eq. 1): the self-attention output
  is added to its input and layer-normalised (released code). No option.
- eq. 7: evaluated with log-sum-exp instead of a direct ``exp(cos / 0.01)``: the same
  function (the reference trains in float64; in float32 the direct form overflows).

Why one long module: one model per file (co-guidance attention, relation modules, gates,
BECE and the losses of eq. 10-12).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dropout as D

__all__ = ["CACENet", "TRAIN_DEFAULTS", "bece_contrast_loss"]

# docs/reference.md §3: README command of the released code (80.80% with VGG-19 + VGGish).
TRAIN_DEFAULTS = {
    "full": dict(
        optimizer="adam",
        lr=7e-4,
        weight_decay=0.0,
        epochs=200,
        batch_size=64,
        schedule=dict(kind="multistep", milestones=[10, 20, 30], gamma=0.5),
        clip_grad_norm=0.5,
        warmup_epochs=0,
    ),
}

GUIDES = ("none", "audio", "visual", "co")
TEMPORALS = ("bilstm", "lstm", "none")
BECE_AUGS = ("noise", "channel_mask", "mixup")
GATE_LOSSES = ("reference", "paper")  # eq. 12 L_supp: released code | printed


def _self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The reference uses unscaled dot-product energies (no 1/sqrt(d)).
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class CoGuidanceAttention(nn.Module):
    """Audio-visual co-guidance attention (AVCA, paper §3.2, eq. 1-6).

    ``guide``: "co" (both directions), "audio" (audio guides visual only, audio kept raw),
    "visual" (visual guides audio only, visual = spatial mean), "none" (spatial mean, raw audio).
    Input visual (N, P, Cv) with N = B*T and P = H*W; audio (B, T, Ca).
    """

    def __init__(self, guide: str, dv: int, da: int, hidden: int = 256, latent: int = 4,
                 beta: float = 0.4, psi: float = 0.3, dropout: float = 0.2):
        super().__init__()
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
        self.guide, self.beta, self.psi = guide, beta, psi
        self.a2v = guide in ("audio", "co")  # audio-guided visual (eq. 1-2)
        self.v2a = guide in ("visual", "co")  # visual-guided audio (eq. 3-6)
        dq = dv // latent
        # One spatial self-attention over the map per used direction; their q/k/v projections
        # are rows of one Linear, weight rows [q1 k1 v1 q2 k2 v2] (dq, dq, dv each).
        self.n_sa = int(self.a2v) + int(self.v2a)
        self.dq, self._rows = dq, 2 * dq + dv   # weight rows per direction
        if self.n_sa:
            self.v_qkv = nn.Linear(dv, self._rows * self.n_sa)
            self.v_norm = nn.LayerNorm(dv)  # shared by both self-attentions, as in the reference
        self.drop = D.Dropout(dropout)
        if self.a2v:
            # eq. 1: global calibration feature from the self-attended map
            self.g_ave = nn.Linear(dv, hidden)
            # affine_video_1 (channel att, dv) and affine_video_3 (eq. 1 W2, hidden) fused
            self.g_vid = nn.Linear(dv, dv + hidden)
            self.g_att = nn.Linear(hidden, 1)  # U_v (tanh)
            # CMRAN audio-guided channel attention
            self.c_aud = nn.Linear(da, dv)
            self.c_bottleneck = nn.Linear(dv, hidden)
            self.c_att = nn.Linear(hidden, dv)
            # CMRAN audio-guided spatial attention
            self.s_vid = nn.Linear(dv, hidden)
            self.s_aud = nn.Linear(da, hidden)
            self.s_att = nn.Linear(hidden, 1)
        if self.v2a:
            self.a_qkv = nn.Linear(da, 3 * da)  # eq. 4
            self.a_norm = nn.LayerNorm(da)
            self.va_q = nn.Linear(dv, da)  # eq. 5 W_v^Q
            self.va_kv = nn.Linear(da, 2 * da)  # eq. 5 W_a^K, W_a^V

    def _qkv(self, x: torch.Tensor, i: int):
        """q, k, v of direction ``i``: q/k from one GEMM, v from its own, so that v is a
        contiguous tensor (a column slice of one wide GEMM output makes both attention bmms
        and their backward copy it, and the split's backward concatenates the full gradient)."""
        w, b = self.v_qkv.weight, self.v_qkv.bias
        o, dq = i * self._rows, self.dq
        q, k = F.linear(x, w[o:o + 2 * dq], b[o:o + 2 * dq]).split(dq, dim=-1)
        return q, k, F.linear(x, w[o + 2 * dq:o + self._rows], b[o + 2 * dq:o + self._rows])

    def forward(self, x: torch.Tensor, audio: torch.Tensor):
        B, T, da = audio.shape
        N, P, dv = x.shape
        a_flat = audio.reshape(N, da)
        if self.n_sa:
            # global spatial features v^g, one per guidance direction (N, P, dv)
            g = [self.v_norm(x + D.dropout(_self_attention(*self._qkv(x, i)), self.drop.p,
                                          self.training))
                 for i in range(self.n_sa)]

        if self.a2v:
            vg = g[0]
            # eq. 1: v^gc = W1 F_sq(v^g) (.) W2 v^g ; spatial softmax of U_v -> calibration v~^g
            h_ch, h_sp = self.g_vid(vg).split([dv, self.g_ave.out_features], dim=-1)
            # sum/P, not mean: bf16 mean upcasts a copy of the whole map first (~10x slower)
            avg = F.relu(self.g_ave(vg.sum(1) / P)).unsqueeze(1)
            s = torch.softmax(torch.tanh(self.g_att(F.relu(h_sp) * avg)).squeeze(-1), dim=-1)
            v_cal = (s.unsqueeze(1) @ vg).squeeze(1)  # (N, dv)
            # channel attention: mean_p(relu(A a) * relu(V v^g)) = relu(A a) * mean_p(relu(V v^g))
            cq = F.relu(self.c_aud(a_flat)) * (F.relu(h_ch).sum(1) / P)
            ch = torch.sigmoid(self.c_att(F.relu(self.c_bottleneck(cq))))  # (N, dv)
            xc = x * (1.0 + ch.unsqueeze(1))
            # spatial attention on the channel-attended map
            hs = F.relu(self.s_vid(xc)) * F.relu(self.s_aud(a_flat)).unsqueeze(1)
            s2 = torch.softmax(torch.tanh(self.s_att(hs)).squeeze(-1), dim=-1)
            v_cs = (s2.unsqueeze(1) @ xc).squeeze(1)  # v^cs, (N, dv)
            v_out = v_cs + self.beta * torch.sigmoid(v_cal) * v_cs  # eq. 2
        else:
            v_out = x.sum(1) / P
        v_out = v_out.reshape(B, T, dv)

        if self.v2a:
            vq = (g[-1].sum(1) / P).reshape(B, T, dv)  # F_sq(v^g) -> v^g'
            qa, ka, va = self.a_qkv(audio).chunk(3, dim=-1)
            ag = self.a_norm(audio + self.drop(_self_attention(qa, ka, va)))  # eq. 3-4
            kk, vv = self.va_kv(ag).chunk(2, dim=-1)
            a_tilde = _self_attention(self.va_q(vq), kk, vv)  # eq. 5
            a_out = audio + self.psi * torch.sigmoid(a_tilde) * audio  # eq. 6
        else:
            a_out = audio
        return v_out, a_out


class _CrossLayer(nn.Module):
    """CMRAN cross-modal relation layer: query attends to [memory; query] (post-norm)."""

    def __init__(self, d: int, nhead: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.drop = D.Dropout(dropout)
        self.drop1 = D.Dropout(dropout)
        self.drop2 = D.Dropout(dropout)

    def forward(self, tgt, memory):
        mem = torch.cat([memory, tgt], dim=1)
        tgt = self.norm1(tgt + self.drop1(self.attn(tgt, mem, mem, need_weights=False)[0]))
        ff = self.linear2(self.drop(F.relu(self.linear1(tgt))))
        return self.norm2(tgt + self.drop2(ff))


class RelationEncoder(nn.Module):
    """CMRAN internal temporal relation module: affine + 2 self-attention layers."""

    def __init__(self, din: int, d: int, nhead: int = 4, ffn: int = 1024, layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.affine = nn.Linear(din, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, nhead, ffn, dropout, batch_first=True)
            for _ in range(layers))
        for layer in self.layers:  # torch's layer, its dropouts drawn by avepipe's fast masks
            layer.dropout, layer.dropout1, layer.dropout2 = (D.Dropout(dropout) for _ in range(3))

    def forward(self, x):
        x = self.affine(x)
        for layer in self.layers:
            x = layer(x)
        return x


class RelationDecoder(nn.Module):
    """CMRAN cross-modal relation attention module: affine + 1 cross layer."""

    def __init__(self, din: int, d: int, nhead: int = 4, ffn: int = 512, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.affine = nn.Linear(din, d)
        self.layers = nn.ModuleList(_CrossLayer(d, nhead, ffn, dropout) for _ in range(layers))

    def forward(self, query, memory):
        x = self.affine(query)
        for layer in self.layers:
            x = layer(x, memory)
        return x


class AVInteraction(nn.Module):
    """Audio-visual interaction: (v * a) attends to [a; v] (CMBS/CACE ``AudioVideoInter``)."""

    def __init__(self, d: int, nhead: int = 4, attn_dropout: float = 0.2, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nhead, dropout=attn_dropout, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.drop = D.Dropout(dropout)

    def forward(self, x, other):
        g = x * other
        mem = torch.cat([other, x], dim=1)
        return self.norm(g + self.drop(self.attn(g, mem, mem, need_weights=False)[0]))


def bece_contrast_loss(q: torch.Tensor, k: torch.Tensor, event_mask: torch.Tensor,
                       tau: float = 0.01) -> torch.Tensor:
    """BECE supervised contrast within each video (eq. 7), via log-sum-exp.

    q, k: (B, T, D) L2-normalised query / augmented-key views; event_mask (B, T) in {0, 1}.
    Over the 2T samples of a video, positives of sample i: for a background segment only its
    own other view; for an event segment every other event sample (both views). Denominator
    P(i) = all samples but i. Loss_i = -[log sum_K exp - log sum_P exp - log |K(i)|].
    """
    B, T, _ = q.shape
    f = torch.cat([q, k], dim=1)  # (B, 2T, D)
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()  # cosines / 0.01 need float32 resolution
    with torch.autocast(f.device.type, enabled=False):
        logits = (f @ f.transpose(1, 2)) / tau
    m = torch.cat([event_mask, event_mask], dim=1).to(logits.dtype) > 0.5  # (B, 2T)
    eye = torch.eye(2 * T, dtype=torch.bool, device=q.device)
    other_view = eye.roll(T, dims=1)  # i <-> i +- T
    pos = ((m.unsqueeze(2) & m.unsqueeze(1)) | other_view) & ~eye
    neg_inf = torch.finfo(logits.dtype).min
    lse_pos = logits.masked_fill(~pos, neg_inf).logsumexp(-1)
    lse_all = logits.masked_fill(eye, neg_inf).logsumexp(-1)
    return -(lse_pos - lse_all - pos.sum(-1).to(logits.dtype).log()).mean()


class CACENet(nn.Module):
    """CACE-Net head (fully supervised AVE localisation).

    hparams: guide ("co"), temporal ("bilstm"), d_model 256, beta 0.4, psi 0.3, alpha 0.1
    (gate scaling), gamma 0.3 (CAS weight), bece (True), lam 0.6 (eq. 8), tau 0.01,
    bece_aug ("noise"), sigma 0.1, contrast_weight 1.0, bece_start 1/8 (fraction of epochs),
    gate_loss ("reference": the released code's BCE-with-logits applied to the gate
    probability; "paper": plain BCE on that probability, as eq. 12 / CMBS print L_supp).
    """

    settings = ("full",)

    def __init__(self, visual_shape: tuple, audio_dim: int, setting: str = "full",
                 num_classes: int = 28, *, guide: str = "co", temporal: str = "bilstm",
                 d_model: int = 256, video_fc_dim: int = 512, beta: float = 0.4,
                 psi: float = 0.3, alpha: float = 0.1, gamma: float = 0.3, bece: bool = True,
                 lam: float = 0.6, tau: float = 0.01, bece_aug: str = "noise",
                 sigma: float = 0.1, contrast_weight: float = 1.0, bece_start: float = 1 / 8,
                 gate_loss: str = "reference"):
        super().__init__()
        if setting not in self.settings:
            raise ValueError(f"CACE-Net defines settings {self.settings}, got {setting!r}")
        if temporal not in TEMPORALS:
            raise ValueError(f"temporal must be one of {TEMPORALS}, got {temporal!r}")
        if bece_aug not in BECE_AUGS:
            raise ValueError(f"bece_aug must be one of {BECE_AUGS}, got {bece_aug!r}")
        if gate_loss not in GATE_LOSSES:
            raise ValueError(f"gate_loss must be one of {GATE_LOSSES}, got {gate_loss!r}")
        visual_shape = tuple(visual_shape)
        if len(visual_shape) not in (1, 3):
            raise ValueError(f"visual_shape must be (H, W, C) or (C,), got {visual_shape}")
        self.setting, self.num_classes = setting, num_classes
        self.visual_shape, self.audio_dim = visual_shape, audio_dim
        self.alpha, self.gamma, self.lam, self.tau = alpha, gamma, lam, tau
        self.bece, self.bece_aug, self.sigma = bece, bece_aug, sigma
        self.contrast_weight, self.bece_start = contrast_weight, bece_start
        self.gate_loss = gate_loss
        d, dv, da = d_model, video_fc_dim, audio_dim

        self.v_fc = nn.Linear(visual_shape[-1], dv)  # adapts any visual width (VGG/ResNet)
        self.v_drop = D.Dropout(0.2)
        self.avca = CoGuidanceAttention(guide, dv, da, beta=beta, psi=psi)

        # Temporal encoder (appendix Table S1): outputs audio d, visual 2d.
        self.temporal = temporal
        if temporal == "bilstm":
            self.a_rnn = nn.LSTM(da, d // 2, batch_first=True, bidirectional=True)
            self.v_rnn = nn.LSTM(dv, d, batch_first=True, bidirectional=True)
        elif temporal == "lstm":
            self.a_rnn = nn.LSTM(da, d, batch_first=True)
            self.v_rnn = nn.LSTM(dv, 2 * d, batch_first=True)
        else:  # no temporal modelling: per-segment projections (reference ``FcEncoder``)
            self.a_rnn = nn.Linear(da, d)
            self.v_rnn = nn.Linear(dv, 2 * d)

        # CMRAN relation modules
        self.video_encoder = RelationEncoder(2 * d, d, ffn=1024)
        self.audio_encoder = RelationEncoder(d, d, ffn=1024)
        self.video_decoder = RelationDecoder(2 * d, d, ffn=512)
        self.audio_decoder = RelationDecoder(d, d, ffn=512)

        # CMBS background suppression gates and class-activation sequences
        self.audio_gate = nn.Linear(d, 1)
        self.video_gate = nn.Linear(d, 1)
        self.audio_cas = nn.Linear(d, num_classes)
        self.video_cas = nn.Linear(d, num_classes)

        self.av_inter = AVInteraction(d)
        self.va_inter = AVInteraction(d)

        # eq. 10-11 heads and the BECE projection (query and key encoder, one layer)
        self.is_event_fc = nn.Linear(d, 1)
        self.event_fc = nn.Linear(d, num_classes)
        if bece:
            self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        # Whether eq. 8 is in use; set by loss() from the epoch and persisted in checkpoints,
        # like the reference's contrastive_switch.
        self.register_buffer("bece_on", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ forward
    def _temporal(self, a, v):
        if self.temporal == "none":
            return self.a_rnn(a), self.v_rnn(v)
        if a.device.type != "cpu":
            return self.a_rnn(a)[0], self.v_rnn(v)[0]
        # oneDNN has no reduced-precision LSTM on many CPUs: run it outside CPU autocast
        wa, wv = self.a_rnn.weight_ih_l0.dtype, self.v_rnn.weight_ih_l0.dtype
        with torch.autocast("cpu", enabled=False):
            return self.a_rnn(a.to(wa))[0], self.v_rnn(v.to(wv))[0]

    def _augment(self, f):
        """Table S4 augmentations of the fused features for the BECE key view."""
        if self.bece_aug == "noise":
            return f + torch.randn_like(f) * self.sigma
        if self.bece_aug == "channel_mask":  # zero one random channel (reference: batch-shared)
            c = torch.randint(f.shape[-1], (1,), device=f.device)
            keep = torch.ones(f.shape[-1], device=f.device, dtype=f.dtype).index_fill(0, c, 0.0)
            return f * keep
        perm = torch.randperm(f.shape[1], device=f.device)  # mixup along time, weight 0.1
        return f + 0.1 * f[:, perm]

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> dict:
        B, T = audio.shape[:2]
        x = visual.reshape(B * T, -1, visual.shape[-1])  # (N, P, C); pooled input -> P = 1
        x = D.relu_dropout(self.v_fc(x), self.v_drop.p, self.training)  # = v_drop(relu(v_fc(x)))
        v, a = self.avca(x, audio)  # eq. 1-6 -> (B,T,dv), (B,T,da)
        a, v = self._temporal(a, v)  # (B,T,d), (B,T,2d)

        v_kv = self.video_encoder(v)
        a_q = self.audio_decoder(a, v_kv)
        a_kv = self.audio_encoder(a)
        v_q = self.video_decoder(v, a_kv)

        # CMBS background suppression: each modality's query scaled by the other's gate
        za, zv = self.audio_gate(a_kv), self.video_gate(v_kv)  # (B,T,1) logits
        ga, gv = torch.sigmoid(za), torch.sigmoid(zv)
        v_q = v_q + ga * v_q * self.alpha
        a_q = a_q + gv * a_q * self.alpha

        # class-activation sequences, top-4 mean over time per class
        k = min(4, T)
        cas_v = self.video_cas(v_q).topk(k, dim=1).values.mean(1)
        cas_a = self.audio_cas(a_q).topk(k, dim=1).values.mean(1)
        cas = (cas_v + cas_a) / 2  # (B, C)

        v_q = self.av_inter(v_q, a_q)
        a_q = self.va_inter(a_q, v_q)
        fused = (v_q + a_q) / 2  # F_av (B,T,d)

        out = {}
        plain = self.is_event_fc(fused).squeeze(-1)
        if self.bece:
            z = self.proj(fused)  # F_FT
            enhanced = self.is_event_fc(fused + self.lam * z).squeeze(-1)  # eq. 8, 10
            out["is_event_plain"], out["is_event_bece"] = plain, enhanced
            out["is_event"] = torch.where(self.bece_on, enhanced, plain)
            out["q"] = F.normalize(z, dim=-1)
            out["k"] = F.normalize(self.proj(self._augment(fused)), dim=-1)
        else:
            out["is_event_plain"] = out["is_event"] = plain
        # eq. 11 (+ gamma * CAS score, as in the reference)
        out["event_logits"] = self.event_fc(fused.max(dim=1).values) + self.gamma * cas
        out["cas"] = cas
        out["gate_logits"] = torch.cat([za, zv], dim=-1)  # (B,T,2)
        out["av_gate"] = (ga * gv).squeeze(-1)  # (B,T)
        return out

    # --------------------------------------------------------------------- loss
    def _gate_loss(self, gate_logits, target):
        """L_supp on p = sigmoid(z_a) * sigmoid(z_v), (B,T), against the event mask, in float32
        at least (bf16 under autocast would round p to 3 digits)."""
        dt = torch.promote_types(gate_logits.dtype, torch.float32)
        gate_logits, target = gate_logits.to(dt), target.to(dt)
        if self.gate_loss == "reference":
            # released code: nn.BCEWithLogitsLoss()(audio_visual_gate, labels), the gate being
            # a probability already (a second sigmoid inside the loss), as in CMBS
            return F.binary_cross_entropy_with_logits(torch.sigmoid(gate_logits).prod(-1), target)
        # eq. 12 as printed: BCE on p, in log space for float32 stability
        logp = F.logsigmoid(gate_logits).sum(-1)
        log1mp = torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)),
                             torch.log1p(-torch.exp(logp)))
        loss = -(target * logp.clamp_min(-100) + (1 - target) * log1mp.clamp_min(-100))
        return loss.mean()

    def loss(self, out: dict, batch: dict, epoch: int, n_epochs: int):
        seg = batch["segment_labels"]
        mask = batch["event_mask"].to(out["is_event_plain"].dtype)
        # video class as the reference derives it: max over time of the per-segment fg argmax
        cls = seg[..., :self.num_classes].argmax(-1).max(dim=1).values.long()
        on = self.bece and epoch >= n_epochs * self.bece_start
        self.bece_on.fill_(bool(on))
        is_event = out["is_event_bece"] if on else out["is_event_plain"]
        l_event = F.binary_cross_entropy_with_logits(is_event, mask)  # L_e
        l_class = F.cross_entropy(out["event_logits"], cls)  # L_c
        l_gate = self._gate_loss(out["gate_logits"], mask)  # L_supp (CMBS)
        l_cas = F.cross_entropy(out["cas"], cls)
        total = l_event + l_class + l_gate + l_cas  # eq. 12
        parts = {"is_event": l_event, "class": l_class, "gate": l_gate, "cas": l_cas}
        if on:
            parts["contrast"] = bece_contrast_loss(out["q"], out["k"], mask, self.tau)
            total = total + self.contrast_weight * parts["contrast"]
        parts["total"] = total
        # one device sync for all logged values
        logs = dict(zip(parts, torch.stack([t.detach() for t in parts.values()]).tolist()))
        return total, logs

    # ------------------------------------------------------------------ predict
    @torch.no_grad()
    def predict(self, out: dict) -> torch.Tensor:
        """o_t = H(sigmoid(is_event_t) - 0.5) * argmax class, else background (28)."""
        cls = out["event_logits"].argmax(-1, keepdim=True)
        is_ev = torch.sigmoid(out["is_event"]) > 0.5
        bg = torch.full_like(cls, self.num_classes)  # background = 28 for AVE
        return torch.where(is_ev, cls.expand_as(is_ev), bg).long()
