"""A tiny decoded AVE-format set for the fine-tuning tests (test_finetune*.py), built with the
real code: synthetic mp4s (2 classes, one audio-visual event covering the whole video) decoded
by avepipe.decode.decode_shard, and the manifest from collect_manifest.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from avepipe.datasets.synthetic import Track, VideoSpec, write_video
from avepipe.decode import collect_manifest, decode_shard

# v0..v4 train, v5 val, v6 test, v7 in train AND test (AVE has such duplicate ids)
SPLITS = ["train"] * 5 + ["val", "test", "train"]


def decoded_set(root: Path, n_seg: int, rates: list[int], seed: int) -> tuple[pd.DataFrame, Path, pd.DataFrame]:
    """(index, decoded shard, manifest) of ``SPLITS`` videos ``vid00xxxxx``..., K=2 frames per second,
    audio written at max(rates) and decoded at each of ``rates``."""
    rows = []
    for i, split in enumerate(SPLITS):
        vid = f"vid{i:02d}xxxxx"
        cls = i % 2
        spec = VideoSpec(vid, float(n_seg), fps=10.0, width=96, height=64, sample_rate=max(rates), channels=1,
                         tracks=[Track(cls, 0.0, float(n_seg), "av")], seed=seed + i)
        path = write_video(root / "AVE" / f"{vid}.mp4", spec)
        rows.append(dict(sample=len(rows), video_id=vid, split=split, path=str(path), exists=True, shard=0,
                         duration=float(n_seg), label=cls))
    rows.append(dict(rows[7], sample=len(rows), split="test"))  # the duplicate: same video, test row
    index = pd.DataFrame(rows)
    shard = root / "decoded" / "shard-000.zarr"
    decode_shard(index, shard, n_segments=n_seg, audio_rates=list(rates), sample_frames_per_segment=2,
                 progress=False)
    manifest = collect_manifest(index, [shard])
    assert (manifest["status"] == "ok").all()
    return index, shard, manifest
