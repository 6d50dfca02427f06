"""Optimizer and learning-rate schedule of every training loop, from a recipe dict.

A recipe is a head's ``TRAIN_DEFAULTS[setting]`` (avepipe/heads/) with the run's overrides,
or the fine-tuning options: ``optimizer`` (adam | adamw | sgd), ``lr``, ``weight_decay``,
``momentum`` (sgd), ``schedule`` ({kind: none | multistep | cosine, milestones, gamma}) and
``warmup_epochs``. One ``Schedule`` serves per-epoch loops (AVE heads, fine-tuning) and
per-step loops (the dense head's warm-up + cosine): positions count epochs or steps, and
``schedule(..., steps_per_epoch=k)`` scales the epoch-valued recipe keys by ``k``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

SCHEDULES = ("none", "multistep", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the base lr at 0-based position ``t`` (epoch or step).

    Linear warm-up (t+1)/warmup over the first ``warmup`` positions, then: ``none`` 1;
    ``multistep`` gamma ** (number of milestones <= t), i.e. a milestone m (1-based epoch m)
    lowers the lr from position m on, as torch's MultiStepLR stepped after each epoch;
    ``cosine`` half a cosine from 1 towards 0 over the positions after warm-up (CosineAnnealingLR).
    """

    kind: str = "none"
    total: int = 1
    warmup: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule kind {self.kind!r} ({' | '.join(SCHEDULES)})")

    def factor(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        if self.kind == "multistep":
            return float(self.gamma) ** sum(t >= m for m in self.milestones)
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (t - self.warmup) / max(1, self.total - self.warmup)))
        return 1.0


def schedule(recipe: dict, *, epochs: int, steps_per_epoch: int = 1, warmup_epochs: int | None = None) -> Schedule:
    """The recipe's schedule over ``epochs`` (warm-up included), per epoch or per step."""
    s = recipe.get("schedule") or {"kind": "none"}
    warm = int(recipe.get("warmup_epochs") or 0) if warmup_epochs is None else int(warmup_epochs)
    k = int(steps_per_epoch)
    return Schedule(kind=s.get("kind", "none"), total=int(epochs) * k, warmup=warm * k,
                    milestones=tuple(int(m) * k for m in s.get("milestones", ())), gamma=float(s.get("gamma", 0.1)))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    """Every group's lr = its base lr x ``factor``; returns the first group's lr."""
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * factor
    return opt.param_groups[0]["lr"]


def make_optimizer(params: Iterable, recipe: dict, *, fused: bool = True) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params``; the base lr is recorded as ``initial_lr``.

    ``fused`` Adam/AdamW: one kernel per parameter instead of ~10 (the same update up to
    float rounding); the per-op loop costs CACE-Net's 154 tensors several times the fused step
    on a small CPU.
    """
    kind = recipe["optimizer"].lower()
    lr, wd = float(recipe["lr"]), float(recipe.get("weight_decay") or 0.0)
    params = list(params)
    kw = {"fused": True} if fused and params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if kind == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd, **kw)
    elif kind == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, **kw)
    elif kind == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(recipe.get("momentum", 0.9)))
    else:
        raise ValueError(f"unknown optimizer {kind!r} (adam | adamw | sgd)")
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


__all__ = ["Schedule", "schedule", "set_lr", "make_optimizer", "SCHEDULES"]
