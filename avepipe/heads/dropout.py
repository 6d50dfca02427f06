"""Dropout for the heads' large activation maps: fast CPU masks, at most 1 byte per element kept.

Why not ``nn.Dropout``: on CPU, torch draws dropout masks with one serial Mersenne-Twister
stream (``bernoulli_``); in CACE-Net and Ge et al. those draws were a fifth to a third of a
training step (benchmarks/README.md). Here a CPU mask comes from numpy's PCG64 raw bits, in
fixed 2^20-element blocks that each get their own stream (spawned from one seed), filled on
a thread pool: several times faster, and the same mask whatever the thread count.
The seed is drawn from torch's default generator, so ``torch.manual_seed`` and a checkpoint's
saved torch RNG state fix every mask (exact resume). On CUDA torch's own Philox draw is used.

The values are those of ``F.dropout``: x * keep / (1 - p), keep ~ Bernoulli(1 - p); only
the random stream differs (``torch_keep_mask`` restores torch's, a test compares the two).
The kept fraction is exact to 2^-32 (a uint32 threshold).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dropout", "dropout", "relu_dropout", "keep_mask", "torch_keep_mask"]

BLOCK = 1 << 20           # elements per independent stream; fixed so masks ignore the thread count
_SMALL = 1 << 16          # below this, torch's own draw is cheaper than the numpy round trip
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)),
                                   thread_name_prefix="avepipe-dropout")
    return _pool


def torch_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The mask ``F.dropout(x, p)`` would draw (bool ``bernoulli_`` draws the same stream; the
    mask takes x's memory layout as F.dropout's does)."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)


def _cpu_keep_mask(shape, p: float) -> torch.Tensor:
    n = int(np.prod(shape))
    # one torch draw per mask: torch's RNG state (seeded, checkpointed) decides every bit
    seed = int(torch.randint(0, 2**62, (1,)).item())
    out = np.empty(n, dtype=np.bool_)
    threshold = np.uint32(min(round((1 - p) * 2**32), 2**32 - 1))
    streams = np.random.SeedSequence(seed).spawn(-(-n // BLOCK))

    def fill(i: int) -> None:
        lo, hi = i * BLOCK, min(n, (i + 1) * BLOCK)
        bits = np.random.PCG64(streams[i]).random_raw((hi - lo + 1) // 2).view(np.uint32)[:hi - lo]
        np.less(bits, threshold, out=out[lo:hi])  # numpy releases the GIL: blocks run in parallel

    list(_executor().map(fill, range(len(streams))))
    return torch.from_numpy(out).view(tuple(shape))


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep mask for ``x``, P(keep) = 1 - p, drawn from torch's seeded state (module doc)."""
    if x.device.type != "cpu" or x.numel() < _SMALL:
        return torch_keep_mask(x, p)
    return _cpu_keep_mask(x.shape, p)


def _masked(t: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """t * keep * scale in one multiply pass. The mask goes through uint8: a bool -> float
    cast (or ``where`` / ``t * bool``) takes torch's slow scalar path, ~4x one multiply."""
    return torch.addcmul(t.new_zeros(()), t, keep.view(torch.uint8).to(t.dtype), value=scale)


class _MaskScale(torch.autograd.Function):
    """y = x * keep * scale with a bool ``keep`` (1 byte per element) saved for backward.

    ``F.dropout`` keeps a mask in x's dtype (2-4 bytes per element: 64 MB per dropout on a
    (B*T, 49, 512) float32 map); ``torch.where`` / ``x * bool`` on a bool mask run ~4x slower
    than one multiply. Same products as F.dropout in float32 (one rounding of x * scale).
    """

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None, None


class _ReluMaskScale(torch.autograd.Function):
    """y = relu(h) * keep * scale, saving only y (the next Linear saves it anyway).

    Backward: dh = dy * scale where y > 0, since y > 0 exactly where h > 0 and the mask keeps
    the entry (scale > 1 cannot round a positive value to 0), so no mask is kept at all.
    """

    @staticmethod
    def forward(ctx, h, keep, scale):
        y = _masked(h, keep, scale).clamp_min_(0)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a fast bool mask."""
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    return _MaskScale.apply(x, keep_mask(x, p), 1.0 / (1 - p))


def relu_dropout(h: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(F.relu(h), p, training)``, keeping only the output for backward."""
    if not training or p == 0:
        return F.relu(h)
    if p == 1:
        return F.relu(h) * 0
    return _ReluMaskScale.apply(h, keep_mask(h, p), 1.0 / (1 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same attribute ``p``, no parameters) drawing its mask with ``keep_mask``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            raise ValueError("avepipe Dropout does not support inplace=True")
        return dropout(x, self.p, self.training)
