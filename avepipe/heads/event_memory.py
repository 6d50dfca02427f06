"""Ge et al., "Learning Event-Specific Localization Preferences for Audio-Visual Event
Localization", ACM MM 2023 (reference code: ShipingGe/AVEL, class ``MAML``).

Spatial-temporal audio-visual fusion encoder (paper 3.3) + memory-assisted metric learning
(MAML, paper 3.4, eq. 2-8) + general classification / localization losses (eq. 9-19) +
event-aware double-branch inference (EADB, eq. 20-21).

The memory bank holds RAW input features (one segment per training video per class) and is
re-encoded by the current fusion network at every step (paper 3.4.1, "feature consistency").
It is model state: persistent buffers, updated inside ``loss()`` during training.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dropout as D

__all__ = ["EventMemory", "TRAIN_DEFAULTS"]

# Paper 4.1.3 / reference main scripts: Adam 3e-4, cosine annealing over 300 epochs, batch 128.
TRAIN_DEFAULTS = {
    s: dict(optimizer="adam", lr=3e-4, weight_decay=0.0, epochs=300, batch_size=128,
            schedule=dict(kind="cosine"), clip_grad_norm=None, warmup_epochs=0)
    for s in ("full", "weak")
}

_NEG = float("-inf")


# ----------------------------------------------------------------------------- blocks
class _Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (packed in-proj),
    batch-first, on fused scaled_dot_product_attention (no attention-weight tensors kept)."""

    one_query_shortcut = True  # see _one_query; False: the generic path (tests compare them)

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.d, self.h, self.p = d, heads, dropout
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, mem=None, key_mask=None):
        n, lq, d = x.shape
        if mem is not None and lq == 1 and key_mask is None and self.one_query_shortcut:
            return self._one_query(x, mem)
        if mem is None:
            q, k, v = self.in_proj(x).chunk(3, -1)
        else:
            w, b = self.in_proj.weight, self.in_proj.bias
            q = F.linear(x, w[:d], b[:d])
            k, v = F.linear(mem, w[d:], b[d:]).chunk(2, -1)
        sh = lambda t: t.reshape(n, -1, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if self.training and self.p > 0:
            # SDPA would draw its attention-dropout mask with torch's serial CPU bernoulli
            # (~150 ms per step on the spatial maps); same math, avepipe's masks
            att = torch.matmul(sh(q), sh(k).transpose(-1, -2)).mul_(1.0 / math.sqrt(d // self.h))
            if mask is not None:
                att = att.masked_fill(~mask, _NEG)   # every row keeps >= 1 key (filled slots)
            o = torch.matmul(D.dropout(att.softmax(-1), self.p, True), sh(v))
        else:
            o = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(n, lq, d))

    def _one_query(self, x, mem):
        """Cross-attention of ONE query token over ``mem`` (the spatial decoder: one audio token
        over the h*w visual tokens), without projecting the L memory tokens to keys/values.
        Same function as ``forward``'s generic path (to float rounding; a test checks it):
          score_j = q_h.(W_k,h m_j + b_k,h) = (W_k,h^T q_h).m_j + const   (softmax drops const)
          out_h   = sum_j p_j (W_v,h m_j + b_v,h) = W_v,h (sum_j p_j m_j) + b_v,h sum_j p_j
        (sum_j p_j is 1 up to attention dropout). Saves 2 x L x d x d multiply-adds per query."""
        n, _, d = x.shape
        h, e = self.h, d // self.h
        w, b = self.in_proj.weight, self.in_proj.bias
        q = F.linear(x[:, 0], w[:d], b[:d]).reshape(n, h, e).transpose(0, 1)       # (h,n,e)
        qk = torch.bmm(q, w[d:2 * d].reshape(h, e, d)).transpose(0, 1)             # (n,h,d)
        p = torch.bmm(qk, mem.transpose(1, 2)).mul_(1.0 / math.sqrt(e)).softmax(-1)  # (n,h,L)
        p = D.dropout(p, self.p, self.training)
        pooled = torch.bmm(p, mem).transpose(0, 1)                                 # (h,n,d)
        o = torch.bmm(pooled, w[2 * d:].reshape(h, e, d).transpose(1, 2)).transpose(0, 1)  # (n,h,e)
        o = o + b[2 * d:].reshape(h, e) * p.sum(-1, keepdim=True)
        return self.out_proj(o.reshape(n, 1, d))


class _Block(nn.Module):
    """Post-norm transformer block (PyTorch layer defaults: ReLU, dropout 0.1). ``cross=True``
    is the reference decoder layer: cross-attention + FFN, its self-attention removed."""

    def __init__(self, d, heads, ffn, dropout, cross=False):
        super().__init__()
        self.cross = cross
        self.attn = _Attention(d, heads, dropout)
        self.lin1, self.lin2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop, self.drop1, self.drop2 = D.Dropout(dropout), D.Dropout(dropout), D.Dropout(dropout)

    def forward(self, x, mem=None, key_mask=None):
        x = self.norm1(x + self.drop1(self.attn(x, mem if self.cross else None, key_mask)))
        return self.norm2(x + self.drop2(self.lin2(D.relu_dropout(self.lin1(x), self.drop.p, self.training))))


class _VanillaAttention(nn.Module):
    """Table 2 '- Transformer': one attention layer with residual + LayerNorm, no FFN."""

    def __init__(self, d, heads, dropout, cross=False):
        super().__init__()
        self.cross = cross
        self.attn, self.norm, self.drop = _Attention(d, heads, dropout), nn.LayerNorm(d), D.Dropout(dropout)

    def forward(self, x, mem=None, key_mask=None):
        return self.norm(x + self.drop(self.attn(x, mem if self.cross else None, key_mask)))


class _Stack(nn.Module):
    def __init__(self, make, n):
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(n))

    def forward(self, x, mem=None, key_mask=None):
        for layer in self.layers:
            x = layer(x, mem, key_mask)
        return x


def _sinusoid(n, d):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


def _dist(x, y):
    """Euclidean distance between rows of x (..., P, D) and y (..., R, D), float32, divided by
    sqrt(D) as the reference code does (the paper's margins 0.7 / 0.9 live on this scale).
    Clamped before sqrt so the gradient stays finite at zero distance."""
    x, y = x.float(), y.float()
    d2 = (x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2)
          - 2.0 * x @ y.transpose(-1, -2))
    return d2.clamp_min(1e-12).sqrt() / math.sqrt(x.shape[-1])


def jsd(p, q):
    """Jensen-Shannon divergence (natural log) between distributions along the last dim."""
    p, q = p.float(), q.float()
    m = 0.5 * (p + q)
    kl = lambda a: (torch.special.xlogy(a, a) - torch.special.xlogy(a, m)).sum(-1)  # noqa: E731
    return 0.5 * (kl(p) + kl(q))


# ----------------------------------------------------------------------------- head
class EventMemory(nn.Module):
    """Spatial-temporal fusion encoder + memory-assisted metric learning + EADB inference.

    Table 2 ablations as flags: ``use_audio`` / ``use_visual`` (drop a modality's encoding),
    ``use_transformer`` (vanilla attention layers instead of transformer blocks),
    ``spatial_fusion`` / ``temporal_fusion`` (a removed fusion module is replaced by its
    identity path), ``jsd_update`` (False: random event-related segment), ``bank_consistency``
    (False: store fused features directly, detached), ``branch`` ("eadb" | "double" |
    "single"). ``class_branch="prototype+classifier"`` is the reference weak-code inference.
    ``prototype_loss``: "video" (reference code: one eq. 6 distribution per video from the
    segment-mean distance, as eq. 20) or "segment" (eq. 6-7 as printed, every segment).
    """

    settings = ("full", "weak")

    def __init__(self, visual_shape, audio_dim, setting="full", num_classes=28, *,
                 hidden=256, heads=4, ffn=1024, n_layers=1, dropout=0.1, bank_size=16,
                 margin=None, tau=0.1, lambdas=(1.0, 1.0, 0.01, 0.1, 0.1), prototype_loss="video",
                 use_audio=True, use_visual=True, use_transformer=True, spatial_fusion=True,
                 temporal_fusion=True, jsd_update=True, bank_consistency=True,
                 branch="eadb", class_branch="prototype"):
        super().__init__()
        if setting not in self.settings:
            raise ValueError(f"setting {setting!r} not in {self.settings}")
        if branch not in ("eadb", "double", "single"):
            raise ValueError(f"branch {branch!r}")
        if class_branch not in ("prototype", "prototype+classifier"):
            raise ValueError(f"class_branch {class_branch!r}")
        if prototype_loss not in ("video", "segment"):
            raise ValueError(f"prototype_loss {prototype_loss!r} not in ('video', 'segment')")
        if branch == "single" and setting != "full":
            raise ValueError("branch='single' needs segment labels (full setting)")
        if not (use_audio or use_visual):
            raise ValueError("need at least one modality")
        visual_shape = tuple(int(s) for s in visual_shape)
        if len(visual_shape) not in (1, 3):
            raise ValueError(f"visual_shape must be (H,W,C) or (C,), got {visual_shape}")
        self.visual_shape, self.audio_dim = visual_shape, int(audio_dim)
        self.n_tok, vdim = (visual_shape[0] * visual_shape[1] if len(visual_shape) == 3 else 1), visual_shape[-1]
        self.setting, self.N, self.D = setting, num_classes, hidden
        self.margin = float(margin if margin is not None else (0.7 if setting == "full" else 0.9))
        # tau 0.1 and a video-level L_p are what the reference code trains with (it scores
        # -mean_t dist(f_t, c_n) / 0.1, the eq. 20 distance); "segment" is eq. 6-7 as printed.
        self.tau, self.lambdas = float(tau), tuple(float(x) for x in lambdas)
        self.prototype_loss = prototype_loss
        self.use_audio, self.use_visual = use_audio, use_visual
        self.spatial_fusion, self.temporal_fusion = spatial_fusion, temporal_fusion
        self.jsd_update, self.bank_consistency = jsd_update, bank_consistency
        self.branch, self.class_branch, self.bank_size = branch, class_branch, int(bank_size)

        if use_transformer:
            enc = lambda: _Stack(lambda: _Block(hidden, heads, ffn, dropout), n_layers)  # noqa: E731
            dec = lambda: _Stack(lambda: _Block(hidden, heads, ffn, dropout, cross=True), n_layers)  # noqa: E731
        else:
            enc = lambda: _Stack(lambda: _VanillaAttention(hidden, heads, dropout), n_layers)  # noqa: E731
            dec = lambda: _Stack(lambda: _VanillaAttention(hidden, heads, dropout, cross=True), n_layers)  # noqa: E731
        mlp = lambda i: nn.Sequential(nn.Linear(i, hidden), nn.LeakyReLU(),  # noqa: E731
                                      nn.Linear(hidden, hidden), D.Dropout(0.2))
        # base encoders E_b^a, E_b^v (reference: 2-layer MLPs, dropout 0.2)
        self.audio_fc = mlp(self.audio_dim) if use_audio else None
        self.video_fc = mlp(vdim) if use_visual else None
        # 3.3.1 spatial fusion: E_s^v over the h*w tokens (sinusoidal positions), D_s audio->visual
        if use_visual and spatial_fusion:
            self.register_buffer("pe", _sinusoid(self.n_tok, hidden), persistent=False)
            self.pe_drop = D.Dropout(dropout)
            self.video_stf = enc()
        self.spatial_decoder = dec() if (use_visual and use_audio and spatial_fusion) else None
        # 3.3.2 temporal fusion: E_t^a, E_t^v, D_t (no positional encoding in the reference)
        self.audio_tf = enc() if (use_audio and temporal_fusion) else None
        self.video_ttf = enc() if (use_visual and temporal_fusion) else None
        self.temporal_decoder = dec() if (use_audio and use_visual and temporal_fusion) else None
        # 3.3.3 eq. 1 final fusion: Conv1d(2d->d,k3) -> LeakyReLU -> Conv1d(d->d,k3) -> LayerNorm
        self.fusion_conv = nn.Sequential(nn.Conv1d(2 * hidden, hidden, 3, padding=1), nn.LeakyReLU(),
                                         nn.Conv1d(hidden, hidden, 3, padding=1))
        self.fusion_norm = nn.LayerNorm(hidden)
        # eq. 2 uni-modal classifiers (only feed the JSD relation score and L_umc)
        self.audio_classifier = nn.Linear(hidden, num_classes) if use_audio else None
        self.video_classifier = nn.Linear(hidden, num_classes) if use_visual else None
        # eq. 9 event classifier, eq. 12 relevance classifier
        self.event_classifier = nn.Linear(hidden, num_classes)
        self.relevance_classifier = nn.Linear(hidden, 1)
        self.logit_drop = D.Dropout(0.2)  # reference applies dropout 0.2 to these logits
        self.segment_classifier = nn.Linear(hidden, num_classes + 1) if branch == "single" else None

        # ---- memory bank (3.4.1-3.4.2): persistent buffers so checkpoints keep it.
        n = self.bank_size
        if bank_consistency:
            self.register_buffer("bank_visual", torch.zeros(num_classes, n, self.n_tok, vdim))
            self.register_buffer("bank_audio", torch.zeros(num_classes, n, self.audio_dim))
        else:  # ablation: store fused features (stale w.r.t. the encoder)
            self.register_buffer("bank_feats", torch.zeros(num_classes, n, hidden))
        self.register_buffer("bank_score", torch.zeros(num_classes, n))
        self.register_buffer("bank_filled", torch.zeros(num_classes, n, dtype=torch.bool))
        # per-entry video fingerprint: one segment per training video per class
        self.register_buffer("bank_key", torch.zeros(num_classes, n, 2, dtype=torch.float64))
        self._cache = None

    # ------------------------------------------------------------------ encoder
    def _prep(self, visual, audio):
        B, T = audio.shape[:2]
        visual = visual.reshape(B, T, self.n_tok, self.visual_shape[-1])
        dt = self.fusion_norm.weight.dtype
        return visual.to(dt), audio.to(dt)

    def encode(self, visual, audio, key_mask=None):
        """visual (N,S,n_tok,Cv), audio (N,S,Ca) -> fused (N,S,D), audio-temporal, visual-temporal.
        ``key_mask`` (N,S) bool masks empty bank slots out of the temporal attention."""
        N, S = visual.shape[:2]
        a = self.audio_fc(audio) if self.use_audio else None
        if self.use_visual:
            v = self.video_fc(visual).reshape(N * S, self.n_tok, self.D)
            if self.spatial_fusion:
                v = self.video_stf(self.pe_drop(v + self.pe.to(v.dtype)))
            vbar = (v.sum(1) / self.n_tok).reshape(N, S, self.D)  # not mean: bf16 mean copies the map
        # 3.3.1 spatial branch; without spatial fusion its identity path (the segment's own feature)
        if self.spatial_decoder is not None:
            fs = self.spatial_decoder(a.reshape(N * S, 1, self.D), v).reshape(N, S, self.D)
        else:
            fs = a if a is not None else vbar
        # 3.3.2 temporal branch
        at = self.audio_tf(a, key_mask=key_mask) if self.audio_tf is not None else a
        vt = (self.video_ttf(vbar, key_mask=key_mask) if self.video_ttf is not None else vbar) \
            if self.use_visual else None
        if self.temporal_decoder is not None:
            ft = self.temporal_decoder(at, vt, key_mask=key_mask)
        else:  # identity path: the (temporally encoded) visual, or audio when there is no visual
            ft = vt if self.use_visual else at
        # eq. 1: conv over time on [spatial; temporal]
        x = torch.cat([fs, ft], -1).transpose(1, 2)
        # float32 from here under bf16 autocast: the bank distances and eq. 20-21 margins are
        # decided on these features (a no-op in float32 runs)
        fused = self.fusion_norm(self.fusion_conv(x).transpose(1, 2).float())
        return fused, at, vt

    def _encode_bank(self):
        """Bank features (C,n,D) under the current weights (feature consistency, 3.4.1).
        Each class's n raw segments are encoded as one sequence, as the reference does."""
        if not self.bank_consistency:
            return self.bank_feats
        filled = self.bank_filled
        has = filled.any(1)
        if bool(has.all()):
            feats, _, _ = self.encode(self.bank_visual, self.bank_audio, filled)
            return feats
        # Only classes with entries are encoded: an empty class's features are never read
        # (its prototype logit and distances are masked out), and with few classes present
        # (small data sets, early batches) encoding all C x n slots would cost more than the batch.
        idx = has.nonzero().squeeze(1)
        out = self.bank_visual.new_zeros(*filled.shape, self.D)
        if len(idx):
            feats, _, _ = self.encode(self.bank_visual[idx], self.bank_audio[idx], filled[idx])
            out = out.to(feats.dtype).index_copy(0, idx, feats)
        return out

    def _bank_for_eval(self):
        """Re-encoding the bank costs ~1/3 of a batch; in eval reuse it while weights and bank
        are unchanged (parameter/buffer versions bump on every in-place update)."""
        key = (torch.is_autocast_enabled(), self.training) + tuple(
            (t.data_ptr(), t._version) for t in list(self.parameters()) + list(self.buffers()))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._encode_bank().float())
        return self._cache[1]

    # ------------------------------------------------------------------ forward
    def forward(self, visual, audio):
        visual, audio = self._prep(visual, audio)
        fused, at, vt = self.encode(visual, audio)
        out = {"feats": fused}
        out["event_logits"] = self.logit_drop(self.event_classifier(fused).mean(1))  # eq. 9-10
        out["relevance_logits"] = self.logit_drop(self.relevance_classifier(fused).squeeze(-1))  # eq. 12
        if self.audio_classifier is not None:
            out["audio_logits"] = self.audio_classifier(at)
        if self.video_classifier is not None:
            out["visual_logits"] = self.video_classifier(vt)
        if self.segment_classifier is not None:
            out["segment_logits"] = self.segment_classifier(fused)
        if not self.training and self.branch == "eadb":
            out["bank_feats"] = self._bank_for_eval()
        return out

    # ------------------------------------------------------------------ memory bank
    def relation_scores(self, out, event_mask=None, labels=None):
        """eq. 3 (full: + y^r) / eq. 4 (weak): s_i = 1 - JSD(u^a_i, u^v_i); (B,T)."""
        if self.jsd_update and self.use_audio and self.use_visual:
            s = 1.0 - jsd(out["audio_logits"].float().softmax(-1), out["visual_logits"].float().softmax(-1))
        elif self.jsd_update:  # one modality: no JSD; use its confidence in the label (our choice)
            lg = out["audio_logits"] if self.use_audio else out["visual_logits"]
            s = lg.float().softmax(-1).gather(-1, labels[:, None, None].expand(-1, lg.shape[1], 1)).squeeze(-1)
        else:  # Table 2 '- JSD-based bank update': random event-related segment
            s = torch.rand(out["feats"].shape[:2], device=out["feats"].device)
        return s if event_mask is None else s + event_mask.float()

    @staticmethod
    def _video_key(visual, audio):
        B = audio.shape[0]
        return torch.stack([audio.reshape(B, -1).double().sum(1),
                            visual.reshape(B, visual.shape[1], -1)[..., :visual.shape[-1]]
                            .double().reshape(B, -1).sum(1)], -1)

    @torch.no_grad()
    def update_bank(self, visual, audio, feats, scores, labels, valid):
        """3.4.2: per video take its highest-scoring segment; per class keep the top-n by score,
        one entry per video (a returning video's entry is replaced by its current candidate).
        Vectorised over the batch: one top-k over [bank | candidates] per class."""
        visual, audio = self._prep(visual, audio)
        C, n = self.bank_score.shape
        B = labels.shape[0]
        dev = self.bank_score.device
        sel_score, sel = scores.float().max(1)
        ar = torch.arange(B, device=dev)
        key = self._video_key(visual, audio)
        # candidate score matrix (C, n + B): existing entries, then this batch's videos
        bank_s = self.bank_score.masked_fill(~self.bank_filled, _NEG)
        cand = torch.full((C, B), _NEG, device=dev)
        cand[labels, ar] = torch.where(valid, sel_score, torch.full_like(sel_score, _NEG))  # no host sync
        # one entry per video: a returning video gives up its old slot and competes again with
        # its current best segment and current score (stale scores would otherwise pin the
        # near-uniform first-epoch entries, whose JSD is ~0, in the bank for good)
        same = (self.bank_key[labels] == key[:, None, :]).all(-1) & self.bank_filled[labels] & valid[:, None]
        hit, slot = same.any(1), same.float().argmax(1)
        drop = torch.where(hit, torch.full_like(sel_score, _NEG), torch.full_like(sel_score, float("inf")))
        bank_s.view(-1).scatter_reduce_(0, labels * n + slot, drop, "amin")  # +inf: leave as is
        top_s, idx = torch.cat([bank_s, cand], 1).topk(n, dim=1)  # sorted: best first
        filled = top_s > _NEG
        from_bank = idx < n
        flat = torch.where(from_bank, torch.arange(C, device=dev)[:, None] * n + idx, C * n + idx - n)

        def merge(old, new):
            pool = torch.cat([old.reshape(C * n, *old.shape[2:]), new.to(old.dtype)], 0)
            m = pool[flat.reshape(-1)].reshape(C, n, *old.shape[2:])
            return m * filled.reshape(C, n, *([1] * (m.dim() - 2))).to(m.dtype)

        if self.bank_consistency:  # store RAW features (3.4.1)
            self.bank_visual.copy_(merge(self.bank_visual, visual[ar, sel]))
            self.bank_audio.copy_(merge(self.bank_audio, audio[ar, sel]))
        else:
            self.bank_feats.copy_(merge(self.bank_feats, feats[ar, sel].detach().float()))
        self.bank_key.copy_(merge(self.bank_key, key))
        self.bank_score.copy_(torch.where(filled, top_s, torch.zeros_like(top_s)))
        self.bank_filled.copy_(filled)

    # ------------------------------------------------------------------ metric learning
    def _metric(self, feats, bank, labels):
        """eq. 5-6 prototype log-probs ((B,1,C) video-level or (B,T,C)) and distances to the
        label's bank (B,T,n)."""
        filled = self.bank_filled
        w = filled.float()
        has = filled.any(1)
        proto = (bank.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # eq. 5
        pd = _dist(feats, proto)
        if self.prototype_loss == "video":
            pd = pd.mean(1, keepdim=True)
        logits = (-pd / self.tau).masked_fill(~has, _NEG)  # eq. 6
        d = _dist(feats, bank[labels].float())
        return logits.log_softmax(-1), d, filled[labels][:, None, :]

    def loss(self, out, batch, epoch=0, n_epochs=1):
        lam = self.lambdas
        N = self.N
        feats = out["feats"]
        B, T = feats.shape[:2]
        if self.setting == "full":
            seg = batch["segment_labels"].float()
            yr = batch["event_mask"].float()
            valid = yr.sum(1) > 0
            labels = seg[..., :N].sum(1).argmax(-1)
            seg_cls = seg[..., :N].argmax(-1)
        else:  # weak: video-level labels only (3.5.2)
            vl = batch["video_label"].float()[:, :N]
            valid = vl.sum(1) > 0
            labels = vl.argmax(-1)
            seg_cls = labels[:, None].expand(B, T)
            yr = None
        vf = valid.float()
        nv = vf.sum().clamp_min(1)

        if self.training:  # 3.4.2 bank update every training batch, before it is used
            with torch.no_grad():
                s = self.relation_scores(out, yr, labels)
                self.update_bank(batch["visual"], batch["audio"], feats, s, labels, valid)
            bank = self._encode_bank()
        else:
            bank = out.get("bank_feats")
            if bank is None:
                bank = self._bank_for_eval()

        ce = lambda lg, y: F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), y.reshape(-1),  # noqa: E731
                                           reduction="none").reshape(y.shape)
        # eq. 11: video-level event classification
        l_e = (ce(out["event_logits"], labels) * vf).sum() / nv
        rel = out["relevance_logits"].float()
        if self.setting == "full":  # eq. 13
            l_r = F.binary_cross_entropy_with_logits(rel, yr)
            umc_w = yr  # eq. 2: event segments only
        else:  # eq. 15-16 MIL on the mean relevance
            lbar = rel.sigmoid().mean(1).clamp(1e-6, 1 - 1e-6)
            l_r = F.binary_cross_entropy(lbar, vf)
            umc_w = vf[:, None].expand(B, T)  # eq. 17: all segments
        # eq. 2 / 17 uni-modal classification
        l_u = feats.new_zeros(()).float()
        for k in ("audio_logits", "visual_logits"):
            if k in out:
                l_u = l_u + ce(out[k], seg_cls)
        l_u = (l_u * umc_w).sum() / (nv * T)
        # eq. 5-7 prototype loss over all segments
        logp, d, fm = self._metric(feats, bank, labels)
        nll = -logp.gather(-1, labels[:, None, None].expand(B, logp.shape[1], 1)).squeeze(-1)
        ok = (valid & self.bank_filled.any(1)[labels])[:, None]
        l_p = torch.where(ok, nll, torch.zeros_like(nll)).sum() / (nv * nll.shape[1])
        # eq. 8 / 18 event-aware localisation alignment (distances to own class's bank);
        # empty slots are masked to values that contribute nothing (distances are >= 0)
        dmax = d.masked_fill(~fm, 0.0).amax(-1)
        dmin = d.masked_fill(~fm, self.margin).amin(-1)
        if self.setting == "full":
            # reference: the event and the background terms are each averaged over their own
            # segments of the video (eq. 8's 1/T would let a video's few background seconds,
            # the ones eq. 20-21 must keep outside the margin, weigh little)
            ev = (yr * dmax).sum(1) / yr.sum(1).clamp_min(1)
            bg = ((1 - yr) * F.relu(self.margin - dmin)).sum(1) / (1 - yr).sum(1).clamp_min(1)
            l_c = ((ev + bg) * vf).sum() / nv
        else:  # eq. 18 with the relevance scores as soft labels, 1/T as the reference
            w = rel.sigmoid()
            l_c = w * dmax + (1 - w) * F.relu(self.margin - dmin)
            l_c = (l_c * vf[:, None]).sum() / (nv * T)
        total = lam[0] * l_e + lam[1] * l_r + lam[2] * l_u + lam[3] * l_p + lam[4] * l_c  # eq. 14 / 19
        parts = {"loss_e": l_e, "loss_r": l_r, "loss_umc": l_u, "loss_p": l_p, "loss_c": l_c}
        if self.segment_classifier is not None and self.setting == "full":
            l_s = ce(out["segment_logits"], seg.argmax(-1)).mean()
            total = total + l_s
            parts["loss_seg"] = l_s
        parts["loss"] = total
        vals = torch.stack([v.detach().float() for v in parts.values()]).tolist()  # one sync
        return total, dict(zip(parts, vals))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, out):
        feats = out["feats"]
        B, T = feats.shape[:2]
        bg = self.N
        if self.branch == "single":
            p = out["segment_logits"].argmax(-1)
            return p.masked_fill(p >= bg, bg).long()
        if self.branch == "double":
            cls = out["event_logits"].argmax(-1)
            ev = out["relevance_logits"].sigmoid() > 0.5
            return torch.where(ev, cls[:, None].expand(B, T), torch.full_like(cls[:, None], bg).expand(B, T))
        bank = out.get("bank_feats")
        if bank is None:
            bank = self._bank_for_eval()
        filled = self.bank_filled
        w = filled.float()
        proto = (bank.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        pd = _dist(feats, proto).mean(1).masked_fill(~filled.any(1), float("inf"))  # eq. 20
        if self.class_branch == "prototype":
            cls = pd.argmin(-1)
        else:  # reference weak code: softmax(prototype) + softmax(classifier)
            score = (-pd / self.tau).softmax(-1).nan_to_num(0.0) + out["event_logits"].float().softmax(-1)
            cls = score.argmax(-1)
        d = _dist(feats, bank[cls].float()).masked_fill(~filled[cls][:, None, :], float("inf"))
        alpha = d.amin(-1)  # eq. 21
        return torch.where(alpha < self.margin, cls[:, None].expand(B, T),
                           torch.full_like(cls[:, None], bg).expand(B, T)).long()
