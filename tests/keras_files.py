"""Keras' legacy HDF5 VGG19 weight files for tests: random VGG19 conv weights and a writer
of files laid out as Keras' official ImageNet file (names `block1_conv1_W_1:0`). Plain
h5py; no Keras needed."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

# Keras' VGG19: (layer name, output channels) of its 16 convolutions, in model order
CONVS = [(f"block{b}_conv{c}", ch) for b, n, ch in ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512),
                                                    (5, 4, 512)) for c in range(1, n + 1)]
TORCH_IDX = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)  # torchvision features.<i>


def random_weights(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(layer, kernel (3,3,in,out), bias)] with He-scaled kernels and non-zero biases, so
    activations stay O(1) through 16 layers and a swapped bias would show."""
    rng = np.random.default_rng(seed)
    out, c_in = [], 3
    for name, c_out in CONVS:
        k = (rng.standard_normal((3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        out.append((name, k, (rng.standard_normal(c_out) * 0.1).astype(np.float32)))
        c_in = c_out
    out[0] = (out[0][0], out[0][1] / 60.0, out[0][2])  # inputs are pixels minus means, ~±128
    return out


def write_official_style(path: Path, weights, top: bool = False, split_names: bool = False) -> Path:
    """A file laid out as Keras' 2016 official `vgg19_weights_tf_dim_ordering_tf_kernels*.h5`:
    root `layer_names` (input, convs, pools[, flatten, fc1, fc2, predictions]), each layer a
    group whose `weight_names` are `<layer>_W_1:0`, `<layer>_b_1:0` (datasets in the group),
    no keras_version / backend attributes. ``top``: small stand-ins for the dense layers
    (their real shapes are 400 MB; only their kind is checked). ``split_names``: the
    `layer_names` list split into `layer_names0`, `layer_names1` as Keras does for long lists."""
    names = ["input_1"]
    for b in range(1, 6):
        names += [n for n, _ in CONVS if n.startswith(f"block{b}_")] + [f"block{b}_pool"]
    dense = [("fc1", (16, 8)), ("fc2", (8, 8)), ("predictions", (8, 4))] if top else []
    names += (["flatten"] if top else []) + [n for n, _ in dense]
    byname = {n: (k, b) for n, k, b in weights}
    rng = np.random.default_rng(9)
    with h5py.File(path, "w") as f:
        enc = [n.encode() for n in names]
        if split_names:
            f.attrs["layer_names0"], f.attrs["layer_names1"] = enc[:10], enc[10:]
        else:
            f.attrs["layer_names"] = enc
        for n in names:
            g = f.create_group(n)
            if n in byname:
                k, b = byname[n]
            elif n in dict(dense):
                shape = dict(dense)[n]
                k, b = rng.standard_normal(shape).astype(np.float32), np.zeros(shape[1], np.float32)
            else:
                g.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            g.attrs["weight_names"] = [f"{n}_W_1:0".encode(), f"{n}_b_1:0".encode()]
            g.create_dataset(f"{n}_W_1:0", data=k)
            g.create_dataset(f"{n}_b_1:0", data=b)
    return path


def assert_state_is(model: torch.nn.Module, weights) -> None:
    sd = model.state_dict()
    for (name, k, b), i in zip(weights, TORCH_IDX):
        assert torch.equal(sd[f"features.{i}.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1).copy())), name
        assert torch.equal(sd[f"features.{i}.bias"], torch.from_numpy(b)), name
