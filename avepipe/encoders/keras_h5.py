"""Keras' legacy HDF5 weight files, read as Keras reads them, converted to torch layouts.

Keras (1.x to 3.x, ``load_weights`` on a ``.h5`` file) reads such a file by position:
the root's ``layer_names`` attribute lists the layers in model order; a layer whose group
has a non-empty ``weight_names`` attribute carries weights, and those are read in the
order of ``weight_names`` (the datasets may sit at nested paths); the n-th such layer
of the file goes to the n-th layer with weights of the model. Details kept here:

- a whole-model file (``model.save("x.h5")``) keeps the same layout under ``model_weights``;
- long attribute lists are split into ``<name>0``, ``<name>1``, ... attributes;
- names differ by Keras version: the official 2016 ImageNet files name the VGG-19 weights
  ``block1_conv1_W_1:0`` / ``block1_conv1_b_1:0``, Keras 2 ``block1_conv1/kernel:0``,
  Keras 3 ``block1_conv1/kernel``: only the order matters;
- a Conv2D kernel is stored (kh, kw, in, out), channels-last, as the TensorFlow backend
  uses it (cross-correlation, like torch); a file whose ``backend`` attribute says
  ``theano`` holds flipped kernels and is refused rather than guessed at.

Nothing here imports Keras or TensorFlow; h5py is imported when a file is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from avepipe.encoders.weights import WeightsError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# torchvision ``vgg19().features`` indices of the 16 convolutions, in forward order
VGG19_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file, by content (the signature at offset 0, or after a
    user block of 512 * 2**k bytes, as HDF5 allows), not by its name."""
    try:
        with open(path, "rb") as f:
            offset = 0
            while True:
                f.seek(offset)
                head = f.read(len(HDF5_SIGNATURE))
                if head == HDF5_SIGNATURE:
                    return True
                if len(head) < len(HDF5_SIGNATURE):
                    return False
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False


def _names(group, attr: str) -> list[str]:
    """A list-valued attribute, joined across ``attr0``, ``attr1``, ... when split."""
    if attr in group.attrs:
        raw = list(group.attrs[attr])
    else:
        raw, k = [], 0
        while f"{attr}{k}" in group.attrs:
            raw.extend(group.attrs[f"{attr}{k}"])
            k += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in raw]


def _text_attr(group, attr: str) -> str | None:
    v = group.attrs.get(attr)
    return v.decode("utf8") if isinstance(v, bytes) else (None if v is None else str(v))


def read_layers(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """[(layer name, [(weight name, array), ...]), ...] of every layer with weights, in the
    file's layer order, each layer's weights in its ``weight_names`` order."""
    import h5py

    path = Path(path)
    where = f"Keras weights {path}"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{where}: cannot open as HDF5: {e}") from e
    with f:
        root = f
        if "layer_names" not in f.attrs and "layer_names0" not in f.attrs and "model_weights" in f:
            root = f["model_weights"]  # a whole model saved with model.save("x.h5")
        layer_names = _names(root, "layer_names")
        if not layer_names:
            raise WeightsError(f"{where}: not a Keras weights file (no 'layer_names' attribute at its root "
                               "or under 'model_weights')")
        backend = _text_attr(root, "backend")
        if backend == "theano":
            raise WeightsError(f"{where}: saved with the Theano backend (flipped convolution kernels); "
                               "use a file saved with the TensorFlow (or any later) backend")
        layers = []
        for name in layer_names:
            if name not in root:
                raise WeightsError(f"{where}: layer {name!r} is listed in 'layer_names' but has no group")
            group = root[name]
            weight_names = _names(group, "weight_names")
            if not weight_names:
                continue  # input, pooling, flatten ...: no weights
            values = []
            for wn in weight_names:
                if wn not in group:
                    raise WeightsError(f"{where}: layer {name!r} lists weight {wn!r} but has no such dataset")
                values.append((wn, np.asarray(group[wn])))
            layers.append((name, values))
    return layers


def vgg19_features_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torchvision ``vgg19().features`` state dict (``features.{i}.weight/bias``) from a
    Keras VGG19 weights file: the first 16 layers with weights are the convolutions
    (kernel, bias each), converted (kh, kw, in, out) -> (out, in, kh, kw). Layers after them
    (the ``fc1``, ``fc2``, ``predictions`` of the include-top file) are not needed for
    ``block5_pool`` and are skipped, but must be dense layers (2-d kernel and a bias)."""
    where = f"Keras VGG19 weights {path}"
    layers = read_layers(path)
    if len(layers) < len(VGG19_CONV_INDICES):
        found = ", ".join(n for n, _ in layers) or "none"
        raise WeightsError(f"{where}: VGG19 has {len(VGG19_CONV_INDICES)} convolution layers, the file has "
                           f"{len(layers)} layers with weights ({found})")
    state: dict[str, torch.Tensor] = {}
    c_in = 3
    for k, (idx, (name, values)) in enumerate(zip(VGG19_CONV_INDICES, layers)):
        shapes = [tuple(v.shape) for _, v in values]
        c_out = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)[k]
        expected = [(3, 3, c_in, c_out), (c_out,)]
        if shapes != expected:
            raise WeightsError(f"{where}: layer #{k} {name!r} ({', '.join(n for n, _ in values)}) has shapes "
                               f"{shapes}, expected VGG19's {expected} (kernel (kh, kw, in, out), bias)")
        kernel, bias = (np.asarray(v, dtype=np.float32) for _, v in values)
        state[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
        c_in = c_out
    for k, (name, values) in enumerate(layers[len(VGG19_CONV_INDICES):], start=len(VGG19_CONV_INDICES)):
        shapes = [tuple(v.shape) for _, v in values]
        if len(shapes) != 2 or len(shapes[0]) != 2 or len(shapes[1]) != 1:
            raise WeightsError(f"{where}: layer #{k} {name!r} after the 16 convolutions has shapes {shapes}; "
                               "only the dense top layers (2-d kernel, bias) may follow them")
    return state
