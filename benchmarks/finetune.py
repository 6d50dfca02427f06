"""Fine-tuning throughput: the InfoNCE loop (avepipe.finetune.finetune) against a bare
forward + backward + SGD step of the same encoder on the same batch shape, in the same run.

The loop's number is the ``frames_per_s`` of its last epoch (log.jsonl): it includes reading
the frame sample from the decoded shard (background thread), host->device copy, resize /
normalisation on the device, the projection heads and the loss. The bare number feeds one
preprocessed tensor already on the device to the trunk (same trainable blocks, same frozen
BatchNorms, same autocast / channels-last), loss = mean of the maps. Goal: ratio >= 0.85.

    python benchmarks/finetune.py                               # resnet50, 4 videos x 10 s, last:1 and all
    python benchmarks/finetune.py --batch 32 --videos 128 --device cuda

Inputs are synthetic: random frames written in the decoded-shard layout (docs/contracts.md),
random 128-d audio features in a feature store; random encoder weights.
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

from avepipe import finetune as ft  # noqa: E402
from avepipe.encoders import get_encoder  # noqa: E402
from avepipe.store import write_feature_shard  # noqa: E402


def make_inputs(root: Path, videos: int, seconds: int, per_second: int, seed: int = 0):
    """A decoded shard with random frames, an audio store and a train-only manifest."""
    rng = np.random.default_rng(seed)
    ids = [f"bench{i:06d}" for i in range(videos)]
    g = zarr.open_group(str(root / "shard-000.zarr"), mode="w")
    f = g.create_array("frames", shape=(videos, seconds, per_second, 224, 224, 3), dtype="uint8",
                       chunks=(1, seconds, per_second, 224, 224, 3))
    for i in range(videos):
        f[i] = rng.integers(0, 256, size=f.shape[1:], dtype=np.uint8)
    for name, values in (("video_id", ids), ("status", ["ok"] * videos), ("reason", [""] * videos),
                         ("warnings", [""] * videos)):
        a = g.create_array(name, shape=(videos,), dtype=str, chunks=(videos,))
        a[:] = np.array(values, dtype=object)
    g.create_array("n_segments", data=np.full(videos, seconds, np.int32))
    audio = write_feature_shard(root / "audio" / "shard-000.zarr", ids,
                                rng.standard_normal((videos, seconds, 128)).astype(np.float32), dtype="float32")
    manifest = pd.DataFrame({"video_id": ids, "split": "train", "status": "ok"})
    return manifest, [root / "shard-000.zarr"], [audio]


def bare_rate(encoder: str, trainable: str, n_frames: int, device: torch.device, steps: int,
              warmup: int = 3) -> float:
    """Frames/s of forward + backward + SGD step of the trunk alone on a device-resident batch."""
    loaded = get_encoder(encoder).load("random", device="cpu", pooled=False)
    trunk = loaded.model.float()
    ft.set_trainable(trunk, encoder, trainable)
    trunk = trunk.to(device)
    trunk.train()
    for m in trunk.modules():  # as the loop: frozen BatchNorms keep their statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    params = [p for p in trunk.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = loaded.preprocess(torch.randint(0, 256, (n_frames, 224, 224, 3), dtype=torch.uint8, device=device))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

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
    return steps * n_frames / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="resnet50", choices=["resnet50", "vgg19"])
    p.add_argument("--batch", type=int, default=4, help="videos per batch")
    p.add_argument("--seconds", type=int, default=10, help="frames per video (one per second)")
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
    dev = ft._device(a.device)
    videos = a.videos or 4 * a.batch
    n_frames = a.batch * a.seconds
    results = []
    with tempfile.TemporaryDirectory(prefix="avepipe-bench-ft-") as tmp:
        tmp = Path(tmp)
        manifest, decoded, audio = make_inputs(tmp, videos, a.seconds, 1)
        for trainable in a.trainable:
            out = tmp / f"run-{trainable.replace(':', '_')}"
            res = ft.finetune(manifest, decoded, audio, a.encoder, out, epochs=a.epochs, batch_size=a.batch,
                              trainable=trainable, milestones=(), device=str(dev), progress=False)
            loop = res["history"][-1]["frames_per_s"]
            steps = a.bare_steps or res["history"][-1]["steps"]
            bare = bare_rate(a.encoder, trainable, n_frames, dev, steps)
            r = {"encoder": a.encoder, "trainable": trainable, "device": str(dev),
                 "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                 "batch_videos": a.batch, "frames_per_video": a.seconds, "videos": videos,
                 "loop_frames_per_s": loop, "bare_frames_per_s": bare, "ratio": loop / bare}
            results.append(r)
            print(f"{a.encoder} trainable={trainable:7s} batch {a.batch}x{a.seconds} on {dev}: "
                  f"loop {loop:8.1f} frames/s  bare fwd+bwd {bare:8.1f} frames/s  ratio {loop / bare:.3f}"
                  f"  (goal >= 0.85)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
