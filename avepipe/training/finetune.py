"""InfoNCE audio-visual fine-tuning of the encoders (CACE-Net §3.4, eq. 9; docs/reference.md §4).

``opts.side`` picks what trains: ``visual`` (``opts.encoder``, as CACE-Net; the audio vector
is read from the partner store, frozen), ``audio`` (``opts.audio`` on the decoded waveforms,
through the same front end extraction uses; the visual vector is read from the partner
store, frozen) or ``both`` (frames and waveforms, both encoders in one job, no partner).
Model and loss: avepipe.training.contrastive; data: avepipe.training.finetune_data; run
plumbing (seeding, resume, checkpoint, log.jsonl, schedule): avepipe.training.harness.

Frames / waveforms are read from the decoded shards batch by batch in a background thread;
a random one of the K stored frames is picked for every second, each epoch. Each trained
encoder is saved in its official layout (``EncoderSpec.official_state_dict``), so
extraction loads it as a local weights path. Outputs: ``weights.pth`` (side both:
``<encoder>.pth`` each), ``log.jsonl`` (1-based ``epoch``), ``loss.png``, ``provenance.json``,
``checkpoint.pt`` (resume).

The command-line entry (the CLI's ``avepipe finetune``)::

    run(manifest, decoded, partner_store, out_dir, opts, *, base_weights, seed,
        encoder_options=None, config=None)

opens the manifest (parquet), then calls ``finetune`` on the decoded shards and the partner
feature store (empty for side both). ``base_weights``: {encoder: weights} of the trained
encoders; an encoder without an entry starts from its official weights (``default_weights``).
``encoder_options``: {encoder: its own options (config ``encoders.<name>``)}, the ones its
``<enc>_ft`` features are extracted with, so that training sees what extraction sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from avepipe.devices import resolve_device
from avepipe.encoders import EncoderSpec, encoder_names, get_encoder
from avepipe.options import FinetuneOptions, asdict
from avepipe.progress import Progress
from avepipe.training import harness as R
from avepipe.training.contrastive import ContrastiveModel, info_nce
from avepipe.training.finetune_data import batch_frames, batch_waves, load_finetune_data
from avepipe.training.schedule import Schedule, make_optimizer, set_lr

log = logging.getLogger(__name__)

SIDES = ("visual", "audio", "both")


def run(manifest: str | Path, decoded: Sequence[str | Path], partner_store: Sequence[str | Path],
        out_dir: str | Path, opts: FinetuneOptions, *, base_weights: dict[str, str], seed: int,
        encoder_options: dict[str, dict] | None = None, config: dict | None = None) -> dict:
    """Read the manifest, fine-tune on the decoded shards (and the partner store)."""
    return finetune(pd.read_parquet(manifest), [Path(p) for p in decoded], [Path(p) for p in partner_store],
                    out_dir, opts, base_weights=base_weights, seed=seed, encoder_options=encoder_options,
                    config=config)


# --------------------------------------------------------------------------- encoders
@dataclass
class Trained:
    """One trained encoder: its spec, the loaded encoder (front end, weights info), the
    trunk being trained, its trainable parameter names and its options object."""

    spec: EncoderSpec
    loaded: Any
    trunk: nn.Module
    trainable: list[str]
    options: Any


def trained_encoders(opts: FinetuneOptions) -> list[str]:
    """The encoders ``opts.side`` trains, visual first; checks their modality."""
    if opts.side not in SIDES:
        raise ValueError(f"finetune.side = {opts.side!r}: use one of {', '.join(SIDES)}")
    out = []
    for key, modality, sides in (("encoder", "visual", ("visual", "both")), ("audio", "audio", ("audio", "both"))):
        if opts.side in sides:
            name = getattr(opts, key)
            if name not in encoder_names(modality):
                article = "an" if modality == "audio" else "a"
                raise ValueError(f"finetune.side = {opts.side!r} trains finetune.{key}, {article} {modality} encoder "
                                 f"({', '.join(encoder_names(modality))}); got {name!r}")
            out.append(name)
    return out


def set_trainable(model: nn.Module, spec: EncoderSpec, trainable: str) -> list[str]:
    """Freeze all but the chosen blocks (``spec.trainable_blocks``); returns the names of
    trainable parameters. Front ends and classifiers are in no block: always frozen."""
    model.requires_grad_(False)
    blocks = spec.trainable_blocks(model)
    if trainable == "all":
        chosen = blocks
    elif trainable.startswith("last:"):
        n = int(trainable.split(":", 1)[1])
        if not 1 <= n <= len(blocks):
            raise ValueError(f"finetune.trainable = {trainable!r}: {spec.name} has {len(blocks)} blocks")
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


# --------------------------------------------------------------------------- loop
def finetune(manifest: pd.DataFrame, decoded: Sequence[Path], partner_store: Sequence[Path], out_dir: str | Path,
             opts: FinetuneOptions, *, base_weights: dict[str, str], seed: int,
             encoder_options: dict[str, dict] | None = None, config: dict | None = None,
             resume: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune the encoder(s) of ``opts.side``; write the weights, log.jsonl, loss.png and
    provenance.json. ``base_weights``: {encoder name: weights} (missing: the encoder's official
    weights; entries of encoders this side does not train are ignored). ``encoder_options``:
    {encoder name: its own options} (missing: its defaults): the front end and, for audio, how
    the waveform is cut, as extraction does with the same options.
    Returns {"history", "weights" {encoder: path}, "provenance", "model" (on CPU)}."""
    names = trained_encoders(opts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(opts.device)
    precision = "bf16" if dev.type == "cuda" else "float32"  # autocast on GPUs; CPU runs in float32
    with R.deterministic(dev, precision):
        gen = R.seed_all(seed)  # the generator: shuffles and frame picks
        trained: dict[str, Trained] = {}
        for name in names:
            spec = get_encoder(name)
            own = dict((encoder_options or {}).get(name, {}))
            loaded = spec.load(base_weights.get(name), device="cpu", **own)  # weights None: the official ones
            trunk = loaded.model.float()
            trained[name] = Trained(spec, loaded, trunk, set_trainable(trunk, spec, opts.trainable),
                                    spec.check_options(own))
        v_enc = names[0] if trained[names[0]].spec.modality == "visual" else None
        a_enc = names[-1] if trained[names[-1]].spec.modality == "audio" else None
        a_spec = trained[a_enc].spec if a_enc else None
        data = load_finetune_data(manifest, decoded, partner_store, opts.include_val, frames=v_enc is not None,
                                  audio_rate=a_spec.sample_rate if a_spec else None,
                                  partner={"visual": "audio", "audio": "visual", "both": None}[opts.side])
        log.info("fine-tuning %s on %d videos", " + ".join(trained), len(data))
        v_dim = trained[v_enc].spec.feature_shape[-1] if v_enc else data.visual.shape[1]
        a_dim = a_spec.feature_shape[-1] if a_enc else data.audio.shape[1]
        model = ContrastiveModel(trained[v_enc].trunk if v_enc else None, v_dim, a_dim, opts.proj_dim,
                                 audio_trunk=trained[a_enc].trunk if a_enc else None).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad],
                             {"optimizer": "sgd", "lr": opts.lr, "momentum": opts.momentum,
                              "weight_decay": opts.weight_decay})
        sched = Schedule("multistep", total=opts.epochs, milestones=tuple(opts.milestones), gamma=0.1)
        K = data.frames.per_second if v_enc else 0
        effective = {
            "stage": "finetune", "code": _fingerprint(), "side": opts.side, "seed": int(seed), "device": dev.type,
            **{k: v for k, v in asdict(opts).items() if k not in ("enabled", "device", "encoder", "audio", "side")},
            "encoders": {n: {"base_weights": {k: t.loaded.weights_info.get(k) for k in ("id", "sha256", "seed")},
                             "options": t.loaded.options} for n, t in trained.items()},
            "data": {"ids_sha256": R.ids_sha256(data.video_ids), "n_videos": len(data), "frames_per_second": K,
                     "partner_sha256": _array_hash(data.audio if opts.side == "visual" else
                                                   data.visual if opts.side == "audio" else None)}}
        rd = R.Run(out_dir, effective)
        ck = rd.resume(resume)
        if ck is not None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            R.set_rng_state(ck["rng"], gen)

        bs = min(opts.batch_size, len(data))
        v_pre = trained[v_enc].loaded.preprocess if v_enc else None
        a_pre = trained[a_enc].loaded.preprocess if a_enc else None

        def plan(idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
            idx = idx.numpy()
            # one random frame of the K stored per second, independently for every second
            pick = torch.randint(K, (int(data.n_segments[idx].sum()),), generator=gen).numpy() if v_enc else None
            return idx, pick

        def fetch(idx: np.ndarray, pick: np.ndarray | None):
            out = []
            for arr in (batch_frames(data, idx, pick) if v_enc else None,
                        batch_waves(data, idx, trained[a_enc].options) if a_enc else None):
                x = torch.from_numpy(arr) if arr is not None else None
                out.append(x.pin_memory() if x is not None and dev.type == "cuda" else x)
            return out

        # drop the last incomplete batch: InfoNCE needs negatives
        n_batches = max(1, (len(data) - bs) // bs + 1)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-read")
        try:
            with Progress(opts.epochs * n_batches, initial=rd.epoch * n_batches, desc=f"finetune {'+'.join(trained)}",
                          unit="batch") as bar:
                for epoch in range(rd.epoch + 1, opts.epochs + 1):
                    lr = set_lr(opt, sched.factor(epoch - 1))
                    train_mode(model)
                    order = torch.randperm(len(data), generator=gen)
                    batches = [plan(order[i:i + bs]) for i in range(0, len(order) - bs + 1, bs)] or [plan(order)]
                    t0, losses, n_items = time.perf_counter(), [], 0
                    pending = reader.submit(fetch, *batches[0])  # the next batch is read while this one trains
                    for j, (idx, pick) in enumerate(batches):
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
                        with R.autocast(dev, precision):
                            v, a = model(v_in, a_in, counts)
                        loss = info_nce(v.float(), a.float(), opts.temperature)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        losses.append(loss.detach())
                        n_items += sum(counts)
                        bar.update(epoch=epoch)
                    losses = torch.stack(losses).float().cpu().numpy()  # one sync per epoch, not per step
                    dt = time.perf_counter() - t0
                    if not np.isfinite(losses).all():
                        raise FloatingPointError(f"fine-tuning loss is not finite in epoch {epoch}; lower finetune.lr")
                    # video-seconds per second: frames/s on the visual side, 1-s audio chunks/s on the audio side
                    rec = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": lr, "steps": len(losses),
                           "seconds_per_s": n_items / dt, "seconds": dt}
                    if v_enc:
                        rec["frames_per_s"] = rec["seconds_per_s"]
                    log.info("epoch %d loss %.4f (%.1f video-seconds/s)", epoch, rec["loss"], rec["seconds_per_s"])
                    rd.end_epoch(rec, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "rng": R.rng_state(gen)})
                    if on_epoch_end is not None:
                        on_epoch_end(epoch, rec)
        finally:
            reader.shutdown(wait=True)

    per_enc = {}
    for name, t in trained.items():
        path = out_dir / ("weights.pth" if opts.side != "both" else f"{name}.pth")
        torch.save(t.spec.official_state_dict(t.trunk, base_weights.get(name), seed), path)
        per_enc[name] = {"weights": str(path), "weights_sha256": _sha256_file(path),
                         "base_weights": t.loaded.weights_info, "trainable": t.trainable}
    R.try_plot(history=rd.history, path=out_dir / "loss.png", title=f"{' + '.join(trained)} audio-visual fine-tuning",
               loss_label="InfoNCE loss")
    # the effective settings, whatever the caller passed as config
    settings = {**asdict(opts), "base_weights": {n: str(base_weights.get(n) or t.spec.default_weights)
                                                 for n, t in trained.items()}, "seed": seed,
                "encoder_options": {n: t.loaded.options for n, t in trained.items()},
                "device": str(dev), "frames_per_second_stored": K or None,
                "audio_front_end": trained[a_enc].loaded.options.get("preprocessing") if a_enc else None}
    partner = None if opts.side == "both" else {"modality": "audio" if opts.side == "visual" else "visual",
                                               "store": [str(p) for p in partner_store]}
    extra = {}
    if opts.side != "both":  # one trained encoder: its record also at the top level
        extra = {k: per_enc[names[0]][k] for k in ("base_weights", "trainable", "weights_sha256")}
    ids_hash = hashlib.sha256("\n".join(sorted(data.video_ids)).encode()).hexdigest()
    from avepipe.provenance import provenance

    prov = provenance("finetune", {**(config or {}), **settings}, encoder=" + ".join(trained), side=opts.side,
                      encoders=per_enc, partner=partner, data_ids_sha256=ids_hash, n_videos=len(data), **extra)
    (out_dir / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    return {"history": rd.history, "weights": {k: v["weights"] for k, v in per_enc.items()}, "provenance": prov,
            "model": model.cpu()}


def _fingerprint() -> str:
    from avepipe.provenance import code_fingerprint

    return code_fingerprint("finetune")


def _sha256_file(path: Path) -> str:
    from avepipe.provenance import sha256_file

    return sha256_file(path)


def _array_hash(x: np.ndarray | None) -> str | None:
    return None if x is None else hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


__all__ = ["run", "finetune", "Trained", "trained_encoders", "set_trainable", "train_mode", "SIDES"]
