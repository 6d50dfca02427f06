"""Fine-tuning throughput: the InfoNCE loop (avepipe.training.finetune.finetune) against a bare
forward + backward + SGD step of the same encoder on the same batch shape, in the same run.

The loop's number is the ``seconds_per_s`` (video-seconds per second: frames/s on the visual
side, 1-s audio chunks/s on the audio side) of its last epoch (log.jsonl): it includes reading
the frame sample / waveforms from the decoded shard (background thread), host->device copy,
the front end on the device (resize / normalisation; VGGish log-mel patch, Cnn14's own STFT
inside the model), the projection heads and the loss. The bare number feeds one
preprocessed tensor already on the device to the trunk (same trainable blocks, same frozen
BatchNorms, same autocast / channels-last), loss = mean of the output. Goal: ratio >= 0.85.

    python benchmarks/finetune.py                      # resnet50 + vggish, 4 videos x 10 s, last:1 and all
    python benchmarks/finetune.py --sides audio --audio-encoder cnn14
    python benchmarks/finetune.py --batch 32 --videos 128 --device cuda

Inputs are synthetic: random frames and waveforms written in the decoded-shard layout
(docs/contracts.md), random partner features in a feature store; random encoder weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avepipe.devices import resolve_device  # noqa: E402
from avepipe.encoders import get_encoder  # noqa: E402
from avepipe.options import FinetuneOptions  # noqa: E402
from avepipe.store import write_feature_shard  # noqa: E402
from avepipe.training import finetune as ft  # noqa: E402


def make_inputs(root: Path, videos: int, seconds: int, per_second: int, rate: int, seed: int = 0):
    """A decoded shard with random frames and waveforms, audio and visual partner stores and a
    train-only manifest."""
    rng = np.random.default_rng(seed)
    ids = [f"bench{i:06d}" for i in range(videos)]
    g = zarr.open_group(str(root / "shard-000.zarr"), mode="w")
    f = g.create_array("frames", shape=(videos, seconds, per_second, 224, 224, 3), dtype="uint8",
                       chunks=(1, seconds, per_second, 224, 224, 3))
    w = g.create_array(f"audio_{rate}", shape=(videos, seconds * rate), dtype="float32", chunks=(1, seconds * rate))
    for i in range(videos):
        f[i] = rng.integers(0, 256, size=f.shape[1:], dtype=np.uint8)
        w[i] = (0.1 * rng.standard_normal(seconds * rate)).astype(np.float32)
    for name, values in (("video_id", ids), ("status", ["ok"] * videos), ("reason", [""] * videos),
                         ("warnings", [""] * videos)):
        a = g.create_array(name, shape=(videos,), dtype=str, chunks=(videos,))
        a[:] = np.array(values, dtype=object)
    g.create_array("n_segments", data=np.full(videos, seconds, np.int32))
    stores = {m: [write_feature_shard(root / m / "shard-000.zarr", ids,
                                      rng.standard_normal((videos, seconds, d)).astype(np.float32), dtype="float32")]
              for m, d in (("audio", 128), ("visual", 2048))}
    manifest = pd.DataFrame({"video_id": ids, "split": "train", "status": "ok"})
    return manifest, [root / "shard-000.zarr"], stores


def bare_rate(encoder: str, trainable: str, n_items: int, device: torch.device, steps: int,
              warmup: int = 3) -> float:
    """Items/s (frames or 1-s chunks) of forward + backward + SGD step of the trunk alone on a
    device-resident, preprocessed batch."""
    spec = get_encoder(encoder)
    loaded = spec.load("random", device="cpu", **({"pooled": False} if spec.modality == "visual" else {}))
    trunk = loaded.model.float()
    ft.set_trainable(trunk, spec, trainable)
    trunk = trunk.to(device)
    ft.train_mode(trunk)  # as the loop: frozen BatchNorms keep their statistics
    params = [p for p in trunk.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    if spec.modality == "visual":
        x = loaded.preprocess(torch.randint(0, 256, (n_items, 224, 224, 3), dtype=torch.uint8, device=device))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = loaded.preprocess(0.1 * torch.randn(n_items, spec.sample_rate, device=device))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = trunk(x).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * n_items / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="resnet50", choices=["resnet50", "vgg19"])
    p.add_argument("--audio-encoder", default="vggish", choices=["vggish", "cnn14"])
    p.add_argument("--sides", nargs="+", default=["visual", "audio"], choices=["visual", "audio"])
    p.add_argument("--batch", type=int, default=4, help="videos per batch")
    p.add_argument("--seconds", type=int, default=10, help="seconds per video (one frame / chunk each)")
    p.add_argument("--videos", type=int, default=None, help="videos in the shard (default: 4 batches)")
    p.add_argument("--trainable", nargs="+", default=["last:1", "all"])
    p.add_argument("--epochs", type=int, default=2, help="loop epochs; the last one is timed")
    p.add_argument("--bare-steps", type=int, default=None, help="timed bare steps (default: batches per epoch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    videos = a.videos or 4 * a.batch
    n_items = a.batch * a.seconds
    results = []
    with tempfile.TemporaryDirectory(prefix="avepipe-bench-ft-") as tmp:
        tmp = Path(tmp)
        rate = get_encoder(a.audio_encoder).sample_rate
        manifest, decoded, stores = make_inputs(tmp, videos, a.seconds, 1, rate)
        for side in a.sides:
            encoder = a.encoder if side == "visual" else a.audio_encoder
            partner = stores["audio" if side == "visual" else "visual"]
            for trainable in a.trainable:
                out = tmp / f"run-{side}-{trainable.replace(':', '_')}"
                opts = FinetuneOptions(encoder=a.encoder, audio=a.audio_encoder, side=side, epochs=a.epochs,
                                       batch_size=a.batch, trainable=trainable, milestones=[], device=str(dev))
                res = ft.finetune(manifest, decoded, partner, out, opts, base_weights={encoder: "random"}, seed=0)
                loop = res["history"][-1]["seconds_per_s"]
                steps = a.bare_steps or res["history"][-1]["steps"]
                bare = bare_rate(encoder, trainable, n_items, dev, steps)
                r = {"side": side, "encoder": encoder, "trainable": trainable, "device": str(dev),
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                     "batch_videos": a.batch, "seconds_per_video": a.seconds, "videos": videos,
                     "loop_items_per_s": loop, "bare_items_per_s": bare, "ratio": loop / bare}
                results.append(r)
                unit = "frames/s" if side == "visual" else "chunks/s"
                print(f"{side:6s} {encoder:8s} trainable={trainable:7s} batch {a.batch}x{a.seconds} on {dev}: "
                      f"loop {loop:8.1f} {unit}  bare fwd+bwd {bare:8.1f} {unit}  ratio {loop / bare:.3f}"
                      f"  (goal >= 0.85)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
