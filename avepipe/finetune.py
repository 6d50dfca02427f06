"""InfoNCE audio-visual fine-tuning of an encoder (CACE-Net §3.4, eq. 9; REFERENCE §3).

Video-level samples: the visual vector is the mean over the sampled frames (one per second,
from the decode stage's frame sample) of the trunk's map, spatially pooled; the audio vector
is the mean of the per-second audio features read from the audio store. Both go through
projection heads to a shared space, are L2-normalised, and a symmetric (CLIP-style) InfoNCE
with temperature pulls matching pairs of a batch together (eq. 9).

Frames are read from the decoded shards batch by batch in a background thread (not held in
memory); a random one of the K stored frames is picked for every second, each epoch. Resume
restores model, optimiser, schedule and both RNG streams, so an interrupted run ends with the
same weights as an unbroken one (tested).

Only train (+ val, by config) videos are used: the split filter runs on the manifest before
any feature or frame is read, and `FinetuneData` refuses test ids (tested).

The fine-tuned encoder is saved in the encoder's official state-dict layout (torchvision
keys including the classifier / fc of the base weights), so extraction loads it as a local
weights path with no special case.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from avepipe.devices import resolve_device
from avepipe.encoders import get_encoder
from avepipe.provenance import provenance, sha256_file

log = logging.getLogger(__name__)


class TestSplitError(RuntimeError):
    """Test videos reached the fine-tuning data (forbidden: it would leak the test split)."""


# --------------------------------------------------------------------------- data
class FrameSource:
    """Per-second frame samples of the chosen videos, read from the decoded shards on demand
    (AVE train+val is ~6 GB of frames, UnAV-100 ~60 GB: they are not held in memory).

    ``source[i]`` -> uint8 (n_segments_i, K, 224, 224, 3); rows past a video's real seconds
    (zero padding of the shard) are not returned.
    """

    def __init__(self, arrays: list, rows: list[int], n_segments: np.ndarray):
        self._arrays, self._rows, self._nseg = arrays, rows, n_segments

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._arrays[i][self._rows[i], : int(self._nseg[i])])

    @property
    def per_second(self) -> int:
        return int(self._arrays[0].shape[2]) if self._arrays else 0


@dataclass
class FinetuneData:
    video_ids: list[str]
    frames: FrameSource  # frames[i]: (T_i, K, 224, 224, 3) uint8 — per-second frame sample
    n_segments: np.ndarray  # (N,) real seconds per video
    audio: np.ndarray  # (N, D) mean of per-second audio features

    def __len__(self) -> int:
        return len(self.video_ids)


def select_videos(manifest: pd.DataFrame, include_val: bool) -> list[str]:
    """Unique ok video ids of train (+val); test never passes. A video id that also appears
    in test (AVE has 8 such duplicates) is dropped: its frames are test data."""
    for col in ("video_id", "split", "status"):
        if col not in manifest:
            raise ValueError(f"fine-tuning manifest lacks column {col!r} (expected manifest.parquet)")
    splits = {"train", "val"} if include_val else {"train"}
    ok = manifest[manifest["status"] == "ok"]
    test_ids = set(manifest.loc[manifest["split"] == "test", "video_id"])
    ids = sorted(set(ok.loc[ok["split"].isin(splits), "video_id"]) - test_ids)
    return ids


def load_finetune_data(manifest: pd.DataFrame, decoded: Sequence[Path], audio_store: Sequence[Path],
                       include_val: bool = True) -> FinetuneData:
    """Train (+val) videos with their frame sample (lazy) and mean audio feature vector."""
    from avepipe.store import open_features

    ids = select_videos(manifest, include_val)
    test_ids = set(manifest.loc[manifest["split"] == "test", "video_id"])
    if test_ids & set(ids):  # defensive: select_videos must never let this happen
        raise TestSplitError(f"test videos in fine-tuning data: {sorted(test_ids & set(ids))[:5]}")
    wanted = set(ids)
    arrays, rows, nseg, got, seen = [], [], [], [], set()
    for path in decoded:
        g = zarr.open_group(str(path), mode="r")
        vids = [str(v) for v in g["video_id"][:]]
        sel = [i for i, v in enumerate(vids) if v in wanted and v not in seen]
        if not sel:
            continue
        if "frames" not in g or g["frames"].shape[2] == 0:
            raise ValueError(f"{path}: no frame sample stored; set decode.sample_frames_per_segment >= 1")
        status = [str(v) for v in g["status"][:]]
        n_segments = np.asarray(g["n_segments"][:])
        for i in sel:
            if status[i] != "ok" or n_segments[i] < 1:
                raise ValueError(f"{path}: video {vids[i]} is {status[i]!r} with {n_segments[i]} seconds "
                                 "in the decoded shard but ok in the manifest")
            arrays.append(g["frames"])
            rows.append(i)
            nseg.append(int(n_segments[i]))
            got.append(vids[i])
            seen.add(vids[i])
    if not got:
        raise ValueError("no train/val videos with decoded frames for fine-tuning")
    missing = sorted(wanted - set(got))
    if missing:
        log.warning("%d train/val videos are in no decoded shard, e.g. %s", len(missing), missing[:3])
    if len({a.shape[2] for a in arrays}) > 1:
        raise ValueError("decoded shards disagree on frames per second (decode.sample_frames_per_segment)")
    fs = open_features([Path(p) for p in audio_store], video_ids=got)
    feats = np.asarray(fs.features.compute(), dtype=np.float32)
    lengths = np.asarray(fs.lengths)
    # mean over the real seconds of each video (the store may be padded)
    mask = (np.arange(feats.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
    audio = (feats.reshape(len(got), feats.shape[1], -1) * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None]
    nseg = np.asarray(nseg)
    return FinetuneData(got, FrameSource(arrays, rows, nseg), nseg, audio.astype(np.float32))


def batch_frames(data: FinetuneData, idx: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """uint8 (sum T_i, 224, 224, 3): for each video of ``idx`` and each of its seconds, the
    frame ``pick`` chooses among that second's K samples (one random frame per second)."""
    out, at = [], 0
    for i in idx:
        f = data.frames[int(i)]  # (T, K, H, W, 3)
        t = f.shape[0]
        out.append(f[np.arange(t), pick[at:at + t]])
        at += t
    return np.ascontiguousarray(np.concatenate(out))


# --------------------------------------------------------------------------- model
def trainable_blocks(model: nn.Module, encoder: str) -> list[nn.Module]:
    """The encoder's blocks in forward order (the unit of `trainable: last:<n>`)."""
    if encoder == "resnet50":
        return [nn.ModuleList([model.conv1, model.bn1]), model.layer1, model.layer2, model.layer3, model.layer4]
    if encoder == "vgg19":
        blocks, cur = [], []
        for m in model.features:
            cur.append(m)
            if isinstance(m, nn.MaxPool2d):
                blocks.append(nn.ModuleList(cur))
                cur = []
        return blocks
    raise ValueError(f"fine-tuning supports visual encoders vgg19 / resnet50, got {encoder!r}")


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


class ContrastiveModel(nn.Module):
    """Visual trunk + projection heads to a shared, L2-normalised space."""

    def __init__(self, trunk: nn.Module, visual_dim: int, audio_dim: int, proj_dim: int):
        super().__init__()
        self.trunk = trunk
        self.v_proj = nn.Linear(visual_dim, proj_dim)
        self.a_proj = nn.Linear(audio_dim, proj_dim)

    def visual(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Frames of several videos, ``counts[i]`` consecutive frames each -> (B, C)."""
        maps = self.trunk(x)  # (sum counts, 7, 7, C)
        pooled = maps.mean(dim=(1, 2)) if maps.ndim == 4 else maps  # spatial pool
        if len(set(counts)) == 1:
            return pooled.view(len(counts), -1, pooled.shape[-1]).mean(1)
        # videos of different length (UnAV): mean over each video's own frames
        return torch.stack([p.mean(0) for p in pooled.split(list(counts))])

    def forward(self, x, audio, counts):
        v = F.normalize(self.v_proj(self.visual(x, counts)), dim=-1)
        a = F.normalize(self.a_proj(audio), dim=-1)
        return v, a


def info_nce(v: torch.Tensor, a: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (eq. 9): cross-entropy of the matching pair in both directions."""
    logits = v @ a.t() / temperature
    target = torch.arange(len(v), device=v.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def official_state_dict(encoder: str, trunk: nn.Module, base_weights: str, seed: int) -> dict[str, torch.Tensor]:
    """Trunk weights plus the base weights' classifier / fc, in torchvision's key layout."""
    import torchvision

    state = {k: v.detach().cpu().clone() for k, v in trunk.state_dict().items()}
    ctor = getattr(torchvision.models, encoder)
    if Path(base_weights).is_file():
        from avepipe.encoders.weights import as_tensor_dict, read_checkpoint

        full = as_tensor_dict(read_checkpoint(base_weights), str(base_weights))
    else:  # random base: the head of a seeded torchvision model (unused by extraction)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = ctor().state_dict()
    for k, v in full.items():
        state.setdefault(k, v)
    return state


# --------------------------------------------------------------------------- loop
def finetune(
    manifest: pd.DataFrame,
    decoded: Sequence[Path],
    audio_store: Sequence[Path],
    encoder: str,
    out_dir: Path,
    *,
    base_weights: str = "random",
    side: str = "visual",
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
    """Fine-tune ``encoder`` and write weights.pth, log.jsonl, loss.png, provenance.json."""
    if side != "visual":
        # the audio side of CACE-Net's recipe is frozen; training it needs the raw-audio
        # front ends inside the loop, which avepipe does not do yet
        raise NotImplementedError(f"finetune.side = {side!r}: only 'visual' is implemented")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)

    spec = get_encoder(encoder)
    loaded = spec.load(base_weights, device="cpu", pooled=False)
    trunk = loaded.model.float()
    names = set_trainable(trunk, encoder, trainable)
    data = load_finetune_data(manifest, decoded, audio_store, include_val)
    log.info("fine-tuning %s on %d videos (%d trainable tensors)", encoder, len(data), len(names))
    model = ContrastiveModel(trunk, spec.feature_shape[-1], data.audio.shape[1], proj_dim).to(dev)
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
        if ck.get("data_ids") != data.video_ids:
            raise ValueError(f"{ckpt_path}: checkpoint was trained on other videos; remove it to restart")
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
    pre = loaded.preprocess
    K = data.frames.per_second
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def plan(idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        idx = idx.numpy()
        # one random frame of the K stored per second, independently for every second
        pick = torch.randint(K, (int(data.n_segments[idx].sum()),), generator=gen).numpy()
        return idx, pick

    def fetch(idx: np.ndarray, pick: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch_frames(data, idx, pick))
        return x.pin_memory() if dev.type == "cuda" else x

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-read")
    try:
        for epoch in range(start, epochs):
            model.train()
            # BatchNorm statistics stay frozen in frozen blocks (their running stats are part of the weights)
            for m in model.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
            order = torch.randperm(len(data), generator=gen)
            # drop the last incomplete batch: InfoNCE needs negatives
            batches = [plan(order[i:i + bs]) for i in range(0, len(order) - bs + 1, bs)] or [plan(order)]
            t0, losses, n_frames = time.perf_counter(), [], 0
            # the next batch is read from the shards while this one trains
            pending = reader.submit(fetch, *batches[0])
            for j, (idx, pick) in enumerate(tqdm(batches, disable=not progress, desc=f"finetune {epoch + 1}/{epochs}")):
                frames = pending.result()
                if j + 1 < len(batches):
                    pending = reader.submit(fetch, *batches[j + 1])
                x = pre(frames.to(dev, non_blocking=True))  # resize/normalise on the device
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                audio = torch.from_numpy(data.audio[idx]).to(dev)
                counts = [int(c) for c in data.n_segments[idx]]
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    v, a = model(x, audio, counts)
                loss = info_nce(v.float(), a.float(), temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                n_frames += x.shape[0]
            losses = torch.stack(losses).float().cpu().numpy()  # one sync per epoch, not per step
            sched.step()
            dt = time.perf_counter() - t0
            if not np.isfinite(losses).all():
                raise FloatingPointError(f"fine-tuning loss is not finite in epoch {epoch + 1}; lower finetune.lr")
            rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                   "steps": len(losses), "frames_per_s": n_frames / dt, "seconds": dt}
            history.append(rec)
            log.info("epoch %d loss %.4f (%.1f frames/s)", epoch + 1, rec["loss"], rec["frames_per_s"])
            tmp = ckpt_path.with_suffix(".pt.tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": torch.get_rng_state(), "gen": gen.get_state(),
                        "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                        "epoch": epoch + 1, "history": history, "data_ids": data.video_ids}, tmp)
            tmp.replace(ckpt_path)  # a crash mid-save leaves the previous checkpoint whole
    finally:
        reader.shutdown(wait=True)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=True)

    state = official_state_dict(encoder, model.trunk, base_weights, seed)
    weights_path = out_dir / "weights.pth"
    torch.save(state, weights_path)
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    plot_loss(history, out_dir / "loss.png", encoder)
    ids_hash = hashlib.sha256("\n".join(sorted(data.video_ids)).encode()).hexdigest()
    # the effective settings, whatever the caller passed as config
    effective = {"encoder": encoder, "base_weights": str(base_weights), "side": side,
                 "temperature": temperature, "epochs": epochs, "lr": lr, "momentum": momentum,
                 "weight_decay": weight_decay, "milestones": list(milestones), "batch_size": batch_size,
                 "proj_dim": proj_dim, "trainable": trainable, "include_val": include_val, "seed": seed,
                 "device": str(dev), "frames_per_second_stored": K}
    prov = provenance("finetune", {**(config or {}), **effective}, encoder=encoder, base_weights=loaded.weights_info,
                      data_ids_sha256=ids_hash, n_videos=len(data), trainable=names,
                      weights_sha256=sha256_file(weights_path))
    (out_dir / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    return {"history": history, "weights": str(weights_path), "provenance": prov}


def plot_loss(history: list[dict], path: Path, encoder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(f"{encoder} audio-visual fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finetune_from_cli(a) -> int:
    manifest = pd.read_parquet(a.manifest)
    cfg = {k: v for k, v in vars(a).items() if k not in ("fn",)}
    finetune(manifest, [Path(p) for p in a.decoded], [Path(p) for p in a.audio_store], a.encoder,
             Path(a.out_dir), base_weights=a.base_weights, side=a.side, temperature=a.temperature,
             epochs=a.epochs, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
             milestones=[int(m) for m in str(a.milestones).split(",") if m],
             batch_size=a.batch_size, proj_dim=a.proj_dim, trainable=a.trainable,
             include_val=a.include_val, seed=a.seed, device=a.device,
             progress=not a.no_progress, config=cfg)
    return 0
