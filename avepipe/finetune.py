"""InfoNCE audio-visual fine-tuning of the encoders (CACE-Net §3.4, eq. 9; REFERENCE §3).

Video-level samples: the visual vector is the mean over the sampled frames (one per second,
from the decode stage's frame sample) of the trunk's map, spatially pooled; the audio vector
is the mean over the video's seconds of the per-second audio embedding. Both go through
projection heads to a shared space, are L2-normalised, and a symmetric (CLIP-style) InfoNCE
with temperature pulls matching pairs of a batch together (eq. 9).

``side`` picks what trains: ``visual`` (CACE-Net; the audio vector is read from the audio
store, frozen), ``audio`` (the audio encoder on the decoded waveforms, through the same front
end extraction uses; the visual vector is read from the visual store, frozen) or ``both``
(frames and waveforms, both encoders in one job). Data loading: avepipe.finetune_data.

Frames / waveforms are read from the decoded shards batch by batch in a background thread;
a random one of the K stored frames is picked for every second, each epoch. Resume restores
model, optimiser, schedule and both RNG streams, so an interrupted run ends with the same
weights as an unbroken one (tested).

Each fine-tuned encoder is saved in its official state-dict layout (torchvision keys with the
base weights' classifier / fc; torchvggish keys; PANNs ``{"model": state_dict}`` with every
key of the base checkpoint), so extraction loads it as a local weights path, no special case.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from avepipe.config import AUDIO_ENCODERS, VISUAL_ENCODERS
from avepipe.devices import resolve_device
from avepipe.encoders import get_encoder
from avepipe.finetune_data import (FinetuneData, TestSplitError, batch_frames, batch_waves,  # noqa: F401
                                   load_finetune_data, select_videos)
from avepipe.provenance import provenance, sha256_file

log = logging.getLogger(__name__)

SIDES = ("visual", "audio", "both")


# --------------------------------------------------------------------------- model
def trainable_blocks(model: nn.Module, encoder: str) -> list[nn.Module]:
    """The encoder's blocks in forward order (the unit of `trainable: last:<n>`). Audio front
    ends (log-mel, Cnn14's bn0) and Cnn14's AudioSet classifier are no block: always frozen."""
    def split_at_pools(seq: nn.Sequential) -> list[nn.Module]:
        blocks, cur = [], []
        for m in seq:
            cur.append(m)
            if isinstance(m, nn.MaxPool2d):
                blocks.append(nn.ModuleList(cur))
                cur = []
        return blocks

    if encoder == "resnet50":
        return [nn.ModuleList([model.conv1, model.bn1]), model.layer1, model.layer2, model.layer3, model.layer4]
    if encoder == "vgg19":
        return split_at_pools(model.features)
    if encoder == "vggish":  # 4 conv blocks + the embedding MLP
        return [*split_at_pools(model.features), model.embeddings]
    if encoder == "cnn14":  # conv_block1..6 + fc1 (the embedding layer)
        return [getattr(model, f"conv_block{i}") for i in range(1, 7)] + [model.fc1]
    raise ValueError(f"fine-tuning supports {', '.join(VISUAL_ENCODERS + AUDIO_ENCODERS)}, got {encoder!r}")


def set_trainable(model: nn.Module, encoder: str, trainable: str) -> list[str]:
    """Freeze all but the chosen blocks; returns the names of trainable parameters."""
    model.requires_grad_(False)
    blocks = trainable_blocks(model, encoder)
    if trainable == "all":
        chosen = blocks
    elif trainable.startswith("last:"):
        n = int(trainable.split(":", 1)[1])
        if not 1 <= n <= len(blocks):
            raise ValueError(f"finetune.trainable = {trainable!r}: {encoder} has {len(blocks)} blocks")
        chosen = blocks[-n:]
    else:
        raise ValueError(f"finetune.trainable = {trainable!r}: use 'all' or 'last:<n>'")
    for b in chosen:
        b.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def train_mode(model: nn.Module) -> None:
    """eval() everywhere except the BatchNorms of trained blocks: frozen BatchNorm statistics
    stay as in the weights, and model-level training switches stay off (Cnn14's dropout and
    SpecAugment: training must see what extraction sees)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters()):
            m.train()


def video_mean(per_item: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(sum counts, C) -> (len(counts), C): mean over each video's own ``counts[i]`` rows."""
    if len(set(counts)) == 1:
        return per_item.view(len(counts), -1, per_item.shape[-1]).mean(1)
    # videos of different length (UnAV)
    return torch.stack([p.mean(0) for p in per_item.split(list(counts))])


class ContrastiveModel(nn.Module):
    """Visual and/or audio trunk + projection heads to a shared, L2-normalised space. A side
    without a trunk takes its (frozen, precomputed) video vector as input."""

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


def official_state_dict(encoder: str, trunk: nn.Module, base_weights: str, seed: int) -> dict:
    """The trunk's weights over every key of the base weights, in the encoder's official
    layout: torchvision / torchvggish state dict, or PANNs ``{"model": state_dict}``."""
    from avepipe.encoders.weights import as_tensor_dict, read_checkpoint, resolve_weights

    state = {k: v.detach().cpu().clone().contiguous() for k, v in trunk.state_dict().items()}
    r = resolve_weights(get_encoder(encoder), str(base_weights))
    full: dict = {}
    if r.kind == "file":
        obj = read_checkpoint(r.path)
        if encoder == "cnn14" and isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]
        full = as_tensor_dict(obj, str(r.path))
    elif encoder in VISUAL_ENCODERS:  # random base: the head of a seeded torchvision model (unused by extraction)
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = getattr(torchvision.models, encoder)().state_dict()
    for k, v in full.items():
        state.setdefault(k, v)
    return {"model": state} if encoder == "cnn14" else state


# --------------------------------------------------------------------------- loop
def _encoders_of(side: str, encoder: str, audio_encoder: str | None) -> tuple[str | None, str | None]:
    """(trained visual encoder, trained audio encoder) for ``side``; checks the names."""
    if side not in SIDES:
        raise ValueError(f"finetune.side = {side!r}: use one of {', '.join(SIDES)}")
    if side == "audio":
        if encoder not in AUDIO_ENCODERS:
            raise ValueError(f"finetune side 'audio' trains an audio encoder ({', '.join(AUDIO_ENCODERS)}), got {encoder!r}")
        return None, encoder
    if encoder not in VISUAL_ENCODERS:
        raise ValueError(f"finetune side {side!r} trains a visual encoder ({', '.join(VISUAL_ENCODERS)}), got {encoder!r}")
    if side == "visual":
        return encoder, None
    if audio_encoder not in AUDIO_ENCODERS:
        raise ValueError(f"finetune side 'both' needs audio_encoder in {AUDIO_ENCODERS}, got {audio_encoder!r}")
    return encoder, audio_encoder


def _load_trunk(encoder: str, weights: str, trainable: str):
    spec = get_encoder(encoder)
    # raw embeddings for VGGish: PCA + 8-bit quantisation has no useful gradient
    opts = {"pooled": False} if spec.modality == "visual" else {}
    loaded = spec.load(weights, device="cpu", **opts)
    trunk = loaded.model.float()
    names = set_trainable(trunk, encoder, trainable)
    return spec, loaded, trunk, names


def finetune(
    manifest: pd.DataFrame,
    decoded: Sequence[Path],
    partner_store: Sequence[Path],
    encoder: str,
    out_dir: Path,
    *,
    base_weights: str = "random",
    side: str = "visual",
    audio_encoder: str | None = None,
    audio_base_weights: str = "random",
    temperature: float = 0.2,
    epochs: int = 50,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] = (15, 30),
    batch_size: int = 128,
    proj_dim: int = 128,
    trainable: str = "all",
    include_val: bool = True,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    config: dict | None = None,
) -> dict:
    """Fine-tune the ``side``'s encoder(s); write the weights, log.jsonl, loss.png, provenance.json.

    side visual: ``encoder`` is the visual encoder, ``partner_store`` the audio store; writes
    weights.pth. side audio: ``encoder`` is the audio encoder, ``partner_store`` the visual
    store; writes weights.pth. side both: ``encoder`` (visual) and ``audio_encoder`` train
    together, no partner store; writes ``<encoder>.pth`` and ``<audio_encoder>.pth``.
    """
    v_enc, a_enc = _encoders_of(side, encoder, audio_encoder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)

    trained = {}  # encoder -> (spec, loaded, trunk, trainable names, base weights)
    if v_enc:
        trained[v_enc] = (*_load_trunk(v_enc, base_weights, trainable), base_weights)
    if a_enc:
        a_base = base_weights if side == "audio" else audio_base_weights
        trained[a_enc] = (*_load_trunk(a_enc, a_base, trainable), a_base)
    a_spec = trained[a_enc][0] if a_enc else None
    data = load_finetune_data(manifest, decoded, partner_store, include_val, frames=v_enc is not None,
                              audio_rate=a_spec.sample_rate if a_spec else None,
                              partner={"visual": "audio", "audio": "visual", "both": None}[side])
    log.info("fine-tuning %s on %d videos", " + ".join(trained), len(data))
    v_dim = trained[v_enc][0].feature_shape[-1] if v_enc else data.visual.shape[1]
    a_dim = a_spec.feature_shape[-1] if a_enc else data.audio.shape[1]
    model = ContrastiveModel(trained[v_enc][2] if v_enc else None, v_dim, a_dim, proj_dim,
                             audio_trunk=trained[a_enc][2] if a_enc else None).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)

    ckpt_path = out_dir / "checkpoint.pt"
    gen = torch.Generator().manual_seed(seed)  # shuffles and frame picks: its own stream
    start, history = 0, []
    if ckpt_path.exists():  # resume from the last finished epoch
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck.get("data_ids") != data.video_ids or ck.get("encoders", [encoder]) != list(trained):
            raise ValueError(f"{ckpt_path}: checkpoint was trained on other videos or encoders; remove it to restart")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        gen.set_state(ck["gen"])
        if dev.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], dev)
        start, history = ck["epoch"], ck["history"][: ck["epoch"]]
        log.info("resuming fine-tuning at epoch %d", start)

    bs = min(batch_size, len(data))
    v_pre = trained[v_enc][1].preprocess if v_enc else None
    a_pre = trained[a_enc][1].preprocess if a_enc else None
    K = data.frames.per_second if v_enc else 0
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def plan(idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        idx = idx.numpy()
        # one random frame of the K stored per second, independently for every second
        pick = torch.randint(K, (int(data.n_segments[idx].sum()),), generator=gen).numpy() if v_enc else None
        return idx, pick

    def fetch(idx: np.ndarray, pick: np.ndarray | None):
        out = []
        for arr in (batch_frames(data, idx, pick) if v_enc else None, batch_waves(data, idx) if a_enc else None):
            x = torch.from_numpy(arr) if arr is not None else None
            out.append(x.pin_memory() if x is not None and dev.type == "cuda" else x)
        return out

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-read")
    try:
        for epoch in range(start, epochs):
            train_mode(model)
            order = torch.randperm(len(data), generator=gen)
            # drop the last incomplete batch: InfoNCE needs negatives
            batches = [plan(order[i:i + bs]) for i in range(0, len(order) - bs + 1, bs)] or [plan(order)]
            t0, losses, n_items = time.perf_counter(), [], 0
            # the next batch is read from the shards while this one trains
            pending = reader.submit(fetch, *batches[0])
            for j, (idx, pick) in enumerate(tqdm(batches, disable=not progress, desc=f"finetune {epoch + 1}/{epochs}")):
                frames, waves = pending.result()
                if j + 1 < len(batches):
                    pending = reader.submit(fetch, *batches[j + 1])
                if v_enc:
                    v_in = v_pre(frames.to(dev, non_blocking=True))  # resize/normalise on the device
                    if dev.type == "cuda":
                        v_in = v_in.contiguous(memory_format=torch.channels_last)
                else:
                    v_in = torch.from_numpy(data.visual[idx]).to(dev)
                # the extraction front end (log-mel patch / waveform), on the device
                a_in = a_pre(waves.to(dev, non_blocking=True)) if a_enc else torch.from_numpy(data.audio[idx]).to(dev)
                counts = [int(c) for c in data.n_segments[idx]]
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    v, a = model(v_in, a_in, counts)
                loss = info_nce(v.float(), a.float(), temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                n_items += sum(counts)
            losses = torch.stack(losses).float().cpu().numpy()  # one sync per epoch, not per step
            sched.step()
            dt = time.perf_counter() - t0
            if not np.isfinite(losses).all():
                raise FloatingPointError(f"fine-tuning loss is not finite in epoch {epoch + 1}; lower finetune.lr")
            # video-seconds per second: frames/s on the visual side, 1-s audio chunks/s on the audio side
            rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                   "steps": len(losses), "seconds_per_s": n_items / dt, "seconds": dt}
            if v_enc:
                rec["frames_per_s"] = rec["seconds_per_s"]
            history.append(rec)
            log.info("epoch %d loss %.4f (%.1f video-seconds/s)", epoch + 1, rec["loss"], rec["seconds_per_s"])
            tmp = ckpt_path.with_suffix(".pt.tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": torch.get_rng_state(), "gen": gen.get_state(),
                        "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                        "epoch": epoch + 1, "history": history, "data_ids": data.video_ids,
                        "encoders": list(trained)}, tmp)
            tmp.replace(ckpt_path)  # a crash mid-save leaves the previous checkpoint whole
    finally:
        reader.shutdown(wait=True)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=True)

    per_enc = {}
    for name, (spec, loaded, trunk, names, base) in trained.items():
        path = out_dir / ("weights.pth" if side != "both" else f"{name}.pth")
        torch.save(official_state_dict(name, trunk, base, seed), path)
        per_enc[name] = {"weights": str(path), "weights_sha256": sha256_file(path),
                         "base_weights": loaded.weights_info, "trainable": names}
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    plot_loss(history, out_dir / "loss.png", " + ".join(trained))
    ids_hash = hashlib.sha256("\n".join(sorted(data.video_ids)).encode()).hexdigest()
    # the effective settings, whatever the caller passed as config
    effective = {"encoder": encoder, "base_weights": str(base_weights), "side": side,
                 "audio_encoder": a_enc if side == "both" else None,
                 "audio_base_weights": str(audio_base_weights) if side == "both" else None,
                 "temperature": temperature, "epochs": epochs, "lr": lr, "momentum": momentum,
                 "weight_decay": weight_decay, "milestones": list(milestones), "batch_size": batch_size,
                 "proj_dim": proj_dim, "trainable": trainable, "include_val": include_val, "seed": seed,
                 "device": str(dev), "frames_per_second_stored": K or None,
                 "audio_front_end": trained[a_enc][1].options.get("preprocessing") if a_enc else None}
    partner = None if side == "both" else {"modality": "audio" if side == "visual" else "visual",
                                          "store": [str(p) for p in partner_store]}
    extra = {}
    if side != "both":  # one trained encoder: its record also at the top level
        extra = {k: per_enc[encoder][k] for k in ("base_weights", "trainable", "weights_sha256")}
    prov = provenance("finetune", {**(config or {}), **effective}, encoder=" + ".join(trained), side=side,
                      encoders=per_enc, partner=partner, data_ids_sha256=ids_hash, n_videos=len(data), **extra)
    (out_dir / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    return {"history": history, "weights": {k: v["weights"] for k, v in per_enc.items()}, "provenance": prov,
            "model": model.cpu()}


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(f"{title} audio-visual fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finetune_from_cli(a) -> int:
    manifest = pd.read_parquet(a.manifest)
    cfg = {k: v for k, v in vars(a).items() if k not in ("fn",)}
    finetune(manifest, [Path(p) for p in a.decoded], [Path(p) for p in a.partner_store], a.encoder,
             Path(a.out_dir), base_weights=a.base_weights, side=a.side, audio_encoder=a.audio_encoder,
             audio_base_weights=a.audio_base_weights, temperature=a.temperature,
             epochs=a.epochs, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
             milestones=[int(m) for m in str(a.milestones).split(",") if m],
             batch_size=a.batch_size, proj_dim=a.proj_dim, trainable=a.trainable,
             include_val=a.include_val, seed=a.seed, device=a.device,
             progress=not a.no_progress, config=cfg)
    return 0
