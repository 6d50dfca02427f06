"""AVEL baselines of Tian et al., "Audio-Visual Event Localization in Unconstrained
Videos", ECCV 2018 (repo YapengTian/AVE-ECCV18): A+V-att (``AVEL``) and the
single-modality A / V models (``AudioOnly``, ``VisualOnly``).

Sizes follow the released code (``models.py`` ``att_Net(128, 128, 512, 29)``):
audio-guided visual attention with hidden 512 and 49 attention units, one BiLSTM per
modality with 128 units per direction, fusion by concatenation, MLP 512 -> 64 -> 29.

Settings:
- full: per-segment 29-way classifier, cross-entropy over all segments.
- weak: MIL, the segment scores are max-pooled over time to a video score trained with
  the video label only; segments are classified by their own scores at test time
  (``models_weakly.py``).
- cml: AVDLN, two-branch embedding (512/128 -> 128 -> LeakyReLU(0.3) -> 64) and the
  Hadsell contrastive loss on segment pairs (matched = event segment), as
  ``cmm_train.py`` (margin 2.0); localization by sliding-window distance
  (``avepipe.metrics.cml_accuracy``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Optimisation as AVE-ECCV18 (supervised_main.py / weak_supervised_main.py / cmm_train.py):
# Adam 1e-3, batch 64, StepLR(step_size=15000 *steps*, gamma 0.1) stepped per batch.
# 3339 // 64 = 52 batches per epoch, so the decay falls at step 15000 = epoch 288.5 -> the
# epoch-level milestone 288 (full, 300 epochs). Weak: 250 epochs < 288, so the decay never
# happens. CML (Keras): Adam default 1e-3, 20 epochs, batches of 8 *segments* ~ one
# 10-segment video here.
TRAIN_DEFAULTS = {
    "full": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=300, batch_size=64,
                 schedule=dict(kind="multistep", milestones=[288], gamma=0.1),
                 clip_grad_norm=None, warmup_epochs=0),
    "weak": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=250, batch_size=64,
                 schedule=dict(kind="none"), clip_grad_norm=None, warmup_epochs=0),
    "cml": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=20, batch_size=1,
                schedule=dict(kind="none"), clip_grad_norm=None, warmup_epochs=0),
}


def _xavier(*layers: nn.Linear) -> None:
    # the released code initialises every Linear weight with xavier_uniform
    for layer in layers:
        nn.init.xavier_uniform_(layer.weight)


class AudioGuidedAttention(nn.Module):
    """Audio-guided visual attention (paper eq. 1-2).

    w_t = u_f^T tanh(U_v relu(W_v v_t) + (U_a relu(W_a a_t)) 1^T),  alpha_t = softmax(w_t),
    v_t^att = sum_i alpha_t^i v_t^i  (weights over the H*W regions; raw features pooled).
    """

    def __init__(self, visual_dim: int, audio_dim: int, hidden: int = 512, att_units: int = 49,
                 xavier_init: bool = True):
        super().__init__()
        self.affine_video = nn.Linear(visual_dim, hidden)
        self.affine_audio = nn.Linear(audio_dim, hidden)
        self.affine_v = nn.Linear(hidden, att_units, bias=False)
        self.affine_g = nn.Linear(hidden, att_units, bias=False)
        self.affine_h = nn.Linear(att_units, 1, bias=False)
        if xavier_init:  # as the AVE-ECCV18 code; CCLN keeps PyTorch's default init
            _xavier(self.affine_video, self.affine_audio, self.affine_v, self.affine_g, self.affine_h)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # visual (B,T,R,C) regions, audio (B,T,Ca) -> attended (B,T,C), weights (B,T,R)
        v = F.relu(self.affine_video(visual))
        g = F.relu(self.affine_audio(audio))
        z = self.affine_h(torch.tanh(self.affine_v(v) + self.affine_g(g).unsqueeze(-2))).squeeze(-1)
        alpha = torch.softmax(z, dim=-1)
        return torch.einsum("btr,btrc->btc", alpha, visual), alpha


class _TemporalAVEL(nn.Module):
    """Shared body: per-modality BiLSTM, concatenation, MLP classifier per segment."""

    settings: tuple = ("full", "weak")
    modalities: tuple = ("audio", "visual")

    def __init__(self, visual_shape: tuple, audio_dim: int, setting: str = "full",
                 num_classes: int = 28, hidden: int = 128, att_hidden: int = 512,
                 att_units: int = 49, fc_hidden: int = 64, cml_hidden: int = 128,
                 cml_dim: int = 64, cml_margin: float = 2.0, code_loss: bool = False):
        super().__init__()
        if setting not in self.settings:
            raise ValueError(f"{type(self).__name__} defines settings {self.settings}, not {setting!r}")
        visual_shape = tuple(int(s) for s in visual_shape)
        if len(visual_shape) not in (1, 3):
            raise ValueError(f"visual_shape must be (C,) or (H,W,C), got {visual_shape}")
        self.setting = setting
        self.num_classes = num_classes
        self.n_out = num_classes + 1          # + background
        self.spatial = len(visual_shape) == 3
        self.visual_dim = visual_shape[-1]
        self.audio_dim = int(audio_dim)
        self.cml_margin = float(cml_margin)
        self.code_loss = bool(code_loss)

        if setting == "cml":
            # AVDLN (cmm_train.py): Dense(128) -> LeakyReLU(0.3) -> Dense(64) per modality
            self.cml_visual = nn.Sequential(nn.Linear(self.visual_dim, cml_hidden), nn.LeakyReLU(0.3),
                                            nn.Linear(cml_hidden, cml_dim))
            self.cml_audio = nn.Sequential(nn.Linear(self.audio_dim, cml_hidden), nn.LeakyReLU(0.3),
                                           nn.Linear(cml_hidden, cml_dim))
            return
        width = 0
        if "audio" in self.modalities:
            self.lstm_audio = nn.LSTM(self.audio_dim, hidden, batch_first=True, bidirectional=True)
            width += 2 * hidden
        if "visual" in self.modalities:
            if self.spatial and "audio" in self.modalities:
                self.attention = AudioGuidedAttention(self.visual_dim, self.audio_dim, att_hidden, att_units)
            self.lstm_video = nn.LSTM(self.visual_dim, hidden, batch_first=True, bidirectional=True)
            width += 2 * hidden
        self.L1 = nn.Linear(width, fc_hidden)
        self.L2 = nn.Linear(fc_hidden, self.n_out)
        _xavier(self.L1, self.L2)

    # ------------------------------------------------------------------ features
    def _visual_vector(self, visual: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """(B,T,C): attended (A+V-att) or global-average-pooled (V, CML) visual features."""
        if not self.spatial:
            return visual
        regions = visual.flatten(2, -2)              # (B,T,H*W,C), channels-last maps
        if hasattr(self, "attention"):
            return self.attention(regions, audio)[0]
        return regions.mean(2)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> dict:
        if self.setting == "cml":
            v, a = self.embed_cml(visual, audio)
            return {"v_emb": v, "a_emb": a, "dist": (v - a).pow(2).sum(-1).clamp_min(1e-7).sqrt()}
        parts = []
        if "audio" in self.modalities:
            parts.append(self.lstm_audio(audio)[0])
        if "visual" in self.modalities:
            parts.append(self.lstm_video(self._visual_vector(visual, audio))[0])
        h = F.relu(torch.cat(parts, -1))            # eq. 3: concatenated BiLSTM states
        logits = self.L2(F.relu(self.L1(h)))        # (B,T,29)
        out = {"logits": logits}
        if self.setting == "weak":
            out["video_logits"] = logits.max(dim=1).values   # MIL max-pooling over segments
        return out

    def embed_cml(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.setting != "cml":
            raise RuntimeError("embed_cml needs a head built with setting='cml'")
        v = visual.flatten(2, -2).mean(2) if self.spatial else visual   # pooled 512-d vectors
        return self.cml_visual(v), self.cml_audio(audio)

    # ------------------------------------------------------------------ training
    def loss(self, out: dict, batch: dict, epoch: int, n_epochs: int) -> tuple[torch.Tensor, dict]:
        if self.setting == "cml":
            # Hadsell et al. contrastive loss: y d^2 + (1-y) max(margin - d, 0)^2, y = matched
            # pair (visual and audio of an event segment), as cmm_train.py.
            y = batch["event_mask"].to(out["dist"].dtype)
            d = out["dist"]
            loss = (y * d.pow(2) + (1 - y) * F.relu(self.cml_margin - d).pow(2)).mean()
            return loss, {"contrastive": float(loss.detach())}
        if self.setting == "weak":
            # only the video label is read (weak supervision)
            target = batch["video_label"].to(out["video_logits"].dtype)
            target = self._video_target(target)
            if self.code_loss:   # released code: MultiLabelSoftMargin on softmax scores
                loss = F.multilabel_soft_margin_loss(torch.softmax(out["video_logits"], -1), target)
            else:
                loss = -(target * F.log_softmax(out["video_logits"], -1)).sum(-1).mean()
            return loss, {"mil": float(loss.detach())}
        logits = out["logits"]
        if self.code_loss:
            loss = F.multilabel_soft_margin_loss(torch.softmax(logits, -1).flatten(0, 1),
                                                 batch["segment_labels"].flatten(0, 1).to(logits.dtype))
        else:
            target = batch["segment_labels"].argmax(-1)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return loss, {"ce": float(loss.detach())}

    def _video_target(self, video_label: torch.Tensor) -> torch.Tensor:
        """Normalised class distribution; a label-less (background-only) video -> background."""
        s = video_label.sum(-1, keepdim=True)
        bg = torch.zeros_like(video_label)
        bg[..., self.num_classes] = 1.0
        return torch.where(s > 0, video_label / s.clamp_min(1e-12), bg)

    def predict(self, out: dict) -> torch.Tensor:
        if self.setting == "cml":
            raise RuntimeError("the CML setting has no per-segment class; use embed_cml with "
                               "avepipe.metrics.cml_accuracy")
        return out["logits"].argmax(-1)


class AVEL(_TemporalAVEL):
    """A+V-att: audio-guided visual attention + audio/visual BiLSTMs + fusion (Tian et al. 2018)."""

    settings = ("full", "weak", "cml")
    modalities = ("audio", "visual")


class AudioOnly(_TemporalAVEL):
    """A: the same temporal model on audio features only."""

    settings = ("full", "weak")
    modalities = ("audio",)
    inputs = ("audio",)        # the loop may pass a placeholder for the visual stream


class VisualOnly(_TemporalAVEL):
    """V: the same temporal model on (globally average pooled) visual features only."""

    settings = ("full", "weak")
    modalities = ("visual",)
    inputs = ("visual",)
