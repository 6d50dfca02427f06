"""The audio-visual contrastive model of fine-tuning (CACE-Net §3.4, eq. 9; docs/reference.md §4).

Video-level samples: the visual vector is the mean over the video's sampled frames of the
trunk's map, spatially pooled; the audio vector is the mean over the video's seconds of the
per-second audio embedding. Both go through projection heads to a shared space, are
L2-normalised, and a symmetric (CLIP-style) InfoNCE with temperature pulls matching pairs of
a batch together (eq. 9). A side without a trunk takes its frozen, precomputed video vector.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def video_mean(per_item: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(sum counts, C) -> (len(counts), C): mean over each video's own ``counts[i]`` rows."""
    if len(set(counts)) == 1:
        return per_item.view(len(counts), -1, per_item.shape[-1]).mean(1)
    # videos of different length (UnAV)
    return torch.stack([p.mean(0) for p in per_item.split(list(counts))])


class ContrastiveModel(nn.Module):
    """Visual and/or audio trunk + projection heads to a shared, L2-normalised space."""

    def __init__(self, trunk: nn.Module | None, visual_dim: int, audio_dim: int, proj_dim: int,
                 audio_trunk: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk  # visual
        self.audio_trunk = audio_trunk
        self.v_proj = nn.Linear(visual_dim, proj_dim)
        self.a_proj = nn.Linear(audio_dim, proj_dim)

    def visual(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Frames of several videos, ``counts[i]`` consecutive frames each -> (B, C)."""
        maps = self.trunk(x)  # (sum counts, 7, 7, C)
        return video_mean(maps.mean(dim=(1, 2)) if maps.ndim == 4 else maps, counts)  # spatial pool

    def audio(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Preprocessed 1-s chunks of several videos, ``counts[i]`` each -> (B, D)."""
        return video_mean(self.audio_trunk(x), counts)

    def forward(self, v_in, a_in, counts):
        v = self.visual(v_in, counts) if self.trunk is not None else v_in
        a = self.audio(a_in, counts) if self.audio_trunk is not None else a_in
        return F.normalize(self.v_proj(v), dim=-1), F.normalize(self.a_proj(a), dim=-1)


def info_nce(v: torch.Tensor, a: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (eq. 9): cross-entropy of the matching pair in both directions."""
    logits = v @ a.t() / temperature
    target = torch.arange(len(v), device=v.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


__all__ = ["ContrastiveModel", "info_nce", "video_mean"]
