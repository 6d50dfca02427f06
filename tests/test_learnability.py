"""Learnability: every fused AVEL head learns the audio-visual *event* rule that neither
modality alone can express (issue "AVE localization heads").

The features mimic the synthetic AVE generator (``avepipe.datasets.synthetic``) and what the
demo's encoders make of it: every class has a picture pattern (at one spatial cell of the
map) and a sound pattern, over noise. An event second shows the video's class in picture
AND sound; background seconds show nothing, only the picture, only the sound, or picture
and sound of different classes. An audio-only (visual-only) model cannot tell "sound
(picture) alone" or "sound (picture) with a mismatched picture (sound)" from an event, so
its accuracy is capped well below a model that fuses both.

No files under results/ are read; everything is generated from a seed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avepipe.datasets.labels import BACKGROUND, NUM_CLASSES
from avepipe.options import HeadOptions, TrainOptions
from avepipe.training.ave import train_ave
from avepipe.training.ave_data import SPLITS, data_from_arrays

T = 10
K = 4                      # classes in use (of the 28 AVE classes)
VSHAPE = (2, 2, 32)        # small (H, W, C) visual maps
ADIM = 32
MODES = ("none", "v", "a", "v+other_a", "a+other_v")  # as synthetic._ave_tracks
FUSED = ("avel", "cace_net", "ccln", "event_memory")

# Per-head run settings for this problem (epochs / batch / lr / hparams). CCLN: the paper's
# eq. 31 weights lambda 150 / eta 25 drown the segment focal loss on 64 training videos, and
# the WCCL term (eta) on masked T-step score profiles holds segment accuracy near 0.89 even
# at eta 1 (lam 1, eta 0.1: 0.975; measured, seed 0).
RUNS = {
    "audio_only": dict(epochs=20, batch_size=16),
    "visual_only": dict(epochs=20, batch_size=16),
    "avel": dict(epochs=20, batch_size=16),
    "cace_net": dict(epochs=12, batch_size=16),
    "ccln": dict(epochs=20, batch_size=16, lam=1.0, eta=0.1),
    # Ge et al.: eq. 14 trade-off weights lambda_3 (L_umc) 0.01 -> 1 and lambda_5 (L_c) 0.1 -> 1.
    # Its visual embedding is small on these features next to the unit-amplitude positions
    # added before E_s^v, so the fused features are audio-dominated at first and "sound only"
    # seconds sit inside the bank margin that eq. 20-21 decide background by; L_umc is the
    # term that teaches the visual path the picture classes directly (lambda_3 0.01: 0.84 at
    # 60 epochs; 1: 0.92 at 30, 0.93 / 0.91 at 40 on data seeds 0 / 1 — measured). lr 1e-3
    # for the 64-video budget (the paper trains 300 epochs of 26 batches).
    "event_memory": dict(epochs=40, batch_size=16, lr=1e-3, lambdas=(1.0, 1.0, 1.0, 0.1, 1.0)),
}
KNOWN_SHORT: set[str] = set()   # heads allowed to fall short (xfail); none at present


def synthetic_ave_features(n_per_split=(64, 16, 32), seed=0, noise=0.6, event_len=(2, 6)):
    """(visual (N,T,H,W,C), audio (N,T,A), segment labels (N,T,29), split (N,), modes (N,T)).

    Class c is video i's class for i % K (balanced splits); each video has one contiguous
    event of ``event_len`` seconds; every other second draws a background mode from MODES.
    """
    rng = np.random.default_rng(seed)
    n = sum(n_per_split)
    pv = rng.normal(size=(K, VSHAPE[-1])).astype(np.float32)
    pa = rng.normal(size=(K, ADIM)).astype(np.float32)
    visual = noise * rng.normal(size=(n, T, *VSHAPE)).astype(np.float32)
    audio = noise * rng.normal(size=(n, T, ADIM)).astype(np.float32)
    labels = np.zeros((n, T, NUM_CLASSES + 1), np.float32)
    modes = np.full((n, T), "ev", dtype=object)
    cells = VSHAPE[0] * VSHAPE[1]
    vflat = visual.reshape(n, T, cells, VSHAPE[-1])
    for i in range(n):
        c = i % K
        cell = rng.integers(cells)                      # where the object sits in this video
        length = rng.integers(event_len[0], event_len[1] + 1)
        start = rng.integers(0, T - length + 1)
        for t in range(T):
            if start <= t < start + length:
                pic, snd = c, c
            else:
                mode = MODES[rng.integers(len(MODES))]
                other = int((c + 1 + rng.integers(K - 1)) % K)
                pic, snd = {"none": (None, None), "v": (c, None), "a": (None, c),
                            "v+other_a": (c, other), "a+other_v": (other, c)}[mode]
                modes[i, t] = mode
            if pic is not None:
                vflat[i, t, cell] += pv[pic]
            if snd is not None:
                audio[i, t] += pa[snd]
            labels[i, t, c if modes[i, t] == "ev" else BACKGROUND] = 1.0
    split = np.repeat(np.array(SPLITS), n_per_split)
    return visual, audio, labels, split, modes


@pytest.fixture(scope="module")
def data():
    v, a, y, split, _ = synthetic_ave_features()
    return data_from_arrays(v, a, y, split)


@pytest.fixture(scope="module")
def accuracy(data, tmp_path_factory):
    """Test accuracy per head, trained once each through the real training loop."""
    torch.set_num_threads(1)
    cache: dict[str, float] = {}

    def run(head: str, precision: str = "float32") -> float:
        if (head, precision) not in cache:
            kw = dict(RUNS[head])
            res = train_ave(data, tmp_path_factory.mktemp(head), head=head, setting="full", seed=0,
                            train=TrainOptions(precision=precision),
                            head_opts=HeadOptions(epochs=kw.pop("epochs"), batch_size=kw.pop("batch_size"),
                                                  lr=kw.pop("lr", None), hparams=kw))
            cache[head, precision] = res["accuracy"]
        return cache[head, precision]
    return run


def test_features_need_both_modalities():
    """The problem is what it claims: a large share of background, and a good part of it
    (sound alone, sound with another class's picture) looks like an event to audio alone."""
    v, a, y, split, modes = synthetic_ave_features()
    bg = (y.argmax(-1) == BACKGROUND).mean()
    confusable = np.isin(modes, ["a", "a+other_v"]).mean()   # audio says "event"
    assert 0.45 < bg < 0.75 and confusable > 0.15


@pytest.mark.slow
@pytest.mark.parametrize("head", [pytest.param(h, marks=pytest.mark.xfail(
    reason="known shortfall (see KNOWN_SHORT)",
    strict=False)) if h in KNOWN_SHORT else h for h in FUSED])
def test_fused_head_learns_event_rule(head, accuracy):
    acc = accuracy(head)
    single = max(accuracy("audio_only"), accuracy("visual_only"))
    assert acc >= 0.90, f"{head}: segment accuracy {acc:.3f} < 0.90"
    assert acc >= single + 0.05, f"{head}: {acc:.3f} does not clearly beat one modality ({single:.3f})"


@pytest.mark.slow
@pytest.mark.parametrize("head", ["cace_net", "event_memory"])
def test_bf16_training_learns_the_event_rule_too(head, accuracy):
    """precision bf16 (autocast) trains the two heavy heads as well as float32 does here."""
    acc = accuracy(head, "bf16")
    assert acc >= 0.90, f"{head} bf16: segment accuracy {acc:.3f} < 0.90"
    assert acc >= accuracy(head) - 0.03, f"{head}: bf16 {acc:.3f} vs float32 {accuracy(head):.3f}"
