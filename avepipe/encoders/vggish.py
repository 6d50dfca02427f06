"""VGGish (Hershey et al. 2017) in torch: log-mel front end + network + optional PCA.

Recipe of docs/reference.md §2.3 (= the TF ``vggish_input`` / ``mel_features`` code):
16 kHz mono, 400-sample periodic-Hann frames every 160 samples, no centre padding, |rfft|
with 512 points, 64 HTK-mel bands 125-7500 Hz with triangles linear *in mel* (not in Hz as librosa /
torchaudio build them), log(mel + 0.01), 96x64 patches; a patch is 96 frames = 15600
samples, and consecutive patches of a continuous waveform start 96 * 160 = 15360 samples
(0.96 s) apart. The network and state-dict keys follow torchvggish (final ReLU included).

Which samples make a step's patch (``encoders.vggish.framing``):

- ``clip`` (default): as the AVE script (Tian et al., copied in CACE-Net
  ``Encoders/audio_feature_extractor.py``), which runs ``vggish_input.wavfile_to_examples``
  on the whole 10-s clip: step k gets patch k of the continuous framing, samples
  [15360k, 15360k + 15600), i.e. it starts 0.04k s before second k. Frames do not depend
  on their neighbours, so cutting the patch out first gives the whole-clip log-mel's
  patch. UnAV-style windows (0.96 s every ``hop`` s): the window is one patch, cut from
  the continuous waveform at the window's start (as ``vggish_input`` frames a whole
  waveform with an example hop of ``hop``), so its last 240 samples are the audio that
  follows the window.
- ``second``: the first 15600 samples of each 1-s chunk (segment k starts at second k);
  a window is zero-padded to 1 s, so its patch ends in 240 zero samples.

The released script read a 44.1-kHz wav and resampled it to 16 kHz with resampy inside
``vggish_input``; avepipe's decode stage resamples the file's own audio with soxr (HQ).
Equality with torchvggish is tested on the same 16-kHz waveform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from avepipe.encoders import EncoderOptionError, EncoderSpec, LoadedEncoder
from avepipe.encoders.vgg19 import split_at_pools
from avepipe.encoders.weights import (OfficialWeights, WeightsError, as_tensor_dict, build_with_weights,
                                      check_state_dict, file_sha256, inference_ready, official_file,
                                      read_checkpoint, state_over_base)
from avepipe.options import option

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
N_FFT = 512  # next power of two >= WINDOW
N_MELS = 64
FMIN, FMAX = 125.0, 7500.0
LOG_OFFSET = 0.01
PATCH_FRAMES = 96  # 0.96 s
PATCH_SAMPLES = (PATCH_FRAMES - 1) * HOP + WINDOW  # 15600
PATCH_HOP = PATCH_FRAMES * HOP  # 15360: start of patch k+1 of a continuous waveform, 0.96 s
FRAMING = ("clip", "second")
PCA_CLIP = (-2.0, 2.0)  # quantisation range of the released embeddings


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale as mel_features.hertz_to_mel."""
    return 1127.0 * torch.log1p(hz / 700.0)


def mel_matrix(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(N_FFT//2+1, N_MELS) weights, as mel_features.spectrogram_to_mel_matrix."""
    bins_mel = hz_to_mel(torch.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64))
    edges = torch.linspace(float(hz_to_mel(torch.tensor(FMIN, dtype=torch.float64))),
                           float(hz_to_mel(torch.tensor(FMAX, dtype=torch.float64))), N_MELS + 2,
                           dtype=torch.float64)
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lo) / (centre - lo)
    down = (hi - bins_mel[:, None]) / (hi - centre)
    w = torch.clamp(torch.minimum(up, down), min=0.0)
    w[0, :] = 0.0  # the reference drops the DC bin
    return w.to(dtype)


class LogMelPatch(nn.Module):
    """waveform (N, >=15600) at 16 kHz -> one log-mel patch per row (N,1,96,64)."""

    def __init__(self):
        super().__init__()
        n = torch.arange(WINDOW, dtype=torch.float64)
        # periodic Hann, as the reference (scipy.signal.get_window('hann', 400) equivalent)
        self.register_buffer("window", (0.5 - 0.5 * torch.cos(2 * math.pi * n / WINDOW)).float(), persistent=False)
        self.register_buffer("mel", mel_matrix(torch.float32), persistent=False)

    def forward(self, wave: Any) -> torch.Tensor:
        wave = torch.as_tensor(wave)
        if wave.ndim != 2 or wave.shape[-1] < PATCH_SAMPLES:
            raise ValueError(f"vggish: expected waveform (N, >= {PATCH_SAMPLES}) at {SAMPLE_RATE} Hz, "
                             f"got {tuple(wave.shape)}")
        # float32 even under autocast: log of bf16 mel energies loses too much
        with torch.autocast(wave.device.type, enabled=False):
            # computed where the input is: CPU in DataLoader workers, or the GPU if given there
            x = wave[:, :PATCH_SAMPLES].float()
            frames = x.unfold(-1, WINDOW, HOP) * self.window.to(x.device)  # (N,96,400) as the reference
            spec = torch.fft.rfft(frames, n=N_FFT).abs()  # zero-padded at the end, |X|
            logmel = torch.log(spec @ self.mel.to(x.device) + LOG_OFFSET)
        return logmel.unsqueeze(1)


class VGGish(nn.Module):
    """(N,1,96,64) log-mel -> (N,128); keys features.{0,3,6,8,11,13}, embeddings.{0,2,4}."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 128), nn.ReLU(inplace=True),  # torchvggish keeps the final ReLU
        )
        self.pca: nn.Module | None = None
        self.memory_format = torch.channels_last  # load(channels_last=False) sets contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.contiguous(memory_format=self.memory_format))
        # flatten in NHWC order, as the TF model (torchvggish: transpose(1,3).transpose(1,2))
        x = self.embeddings(x.permute(0, 2, 3, 1).flatten(1))
        return self.pca(x) if self.pca is not None else x


class PCAQuantize(nn.Module):
    """The released postprocessing: PCA, clip to [-2,2], 8-bit quantise (values 0..255 as float)."""

    def __init__(self, eigen_vectors: torch.Tensor, means: torch.Tensor):
        super().__init__()
        # non-persistent: the network's state dict stays in torchvggish's layout
        self.register_buffer("eigen_vectors", eigen_vectors.float(), persistent=False)
        self.register_buffer("means", means.float().reshape(-1), persistent=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(emb.device.type, enabled=False):
            x = (emb.float() - self.means) @ self.eigen_vectors.T
            lo, hi = PCA_CLIP
            return torch.round((x.clamp(lo, hi) - lo) * (255.0 / (hi - lo)))


@dataclass
class VGGishOptions:
    """`encoders.vggish`: VGGish options."""

    framing: str = option("clip", choices=FRAMING,
                          help="clip: step k gets patch k of the continuous 0.96-s framing of the clip (the AVE "
                               "script: starts 0.04k s before second k; a UnAV window is one patch of the "
                               "continuous audio); second: the first 0.96 s of each 1-s chunk (a window "
                               "zero-padded to 1 s)")
    pca: bool = option(False, help="apply the released PCA + 8-bit quantisation (AVE / CACE-Net use the raw "
                       "embeddings: false)")
    pca_params: str | None = option(None, help="with pca: a PCA params file (pca_eigen_vectors, pca_means); "
                                    "default: the official torchvggish file")


    def cut_audio(self, wave: np.ndarray, rate: int, starts: np.ndarray, span: float,
                  windowed: bool) -> np.ndarray | None:
        """The extraction stage's audio hook: (len(starts), 15600) float32 patches for
        ``clip`` (zero-padded past the end of ``wave``); None for ``second`` (the stage's
        default 1-s chunks, of which the front end keeps the first 15600 samples)."""
        if self.framing == "second":
            return None
        if rate != SAMPLE_RATE:
            raise ValueError(f"vggish: waveform at {rate} Hz, expected {SAMPLE_RATE}")
        starts = np.asarray(starts, np.float64)
        # segments: patch k of the clip's framing; windows: the patch at the window's start
        offsets = np.round(starts * rate).astype(np.int64) if windowed else np.arange(len(starts)) * PATCH_HOP
        out = np.zeros((len(starts), PATCH_SAMPLES), np.float32)
        for k, a in enumerate(offsets):
            seg = wave[a:a + PATCH_SAMPLES]
            out[k, :len(seg)] = seg
        return out


def load_pca(source: str = "audioset") -> tuple[PCAQuantize, dict]:
    """PCA params from the official file ("audioset", verified) or a path (keys
    pca_eigen_vectors, pca_means; its sha256 is recorded)."""
    if source.lower() == "audioset":
        (path, sha), src = official_file(PCA_PARAMS), PCA_PARAMS.url
    else:
        path, sha, src = source, None, source
    where = f"vggish PCA params {path}"
    state = as_tensor_dict(read_checkpoint(path), where)
    if "pca_means" in state:
        state["pca_means"] = state["pca_means"].reshape(-1)  # torchvggish stores (128,) or (128,1)
    check_state_dict(state, {"pca_eigen_vectors": (128, 128), "pca_means": (128,)}, where=where)
    info = {"sha256": sha or file_sha256(path), "source": str(src)}
    return PCAQuantize(state["pca_eigen_vectors"], state["pca_means"]), info


def load(spec: EncoderSpec, weights: str, device: Any, *, seed: int | None, channels_last: bool,
         framing: str, pca: bool, pca_params: str | None) -> LoadedEncoder:
    """Build VGGish (options: :class:`VGGishOptions`): raw embeddings, or with ``pca`` the
    released PCA params (``pca_params``: another file). ``framing`` is applied where the
    waveform is cut (:meth:`VGGishOptions.cut_audio`, called by the extraction stage); the
    front end takes the first 15600 samples of each row it is given."""
    if pca_params is not None and not pca:
        raise EncoderOptionError("encoders.vggish.pca_params is set but encoders.vggish.pca is false")
    pca_module = pca_info = None
    if pca:  # first: a missing PCA file fails before the network is built
        try:
            pca_module, pca_info = load_pca(pca_params or "audioset")
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"vggish: cannot load PCA params {pca_params or 'audioset'!r}: {e}") from e
    model, info = build_with_weights(spec, weights, VGGish, seed=seed)
    if pca_module is not None:
        model.pca, info["pca"] = pca_module, pca_info
    model = inference_ready(model, device, channels_last)
    front = LogMelPatch()  # stays on CPU: extraction runs preprocessing in DataLoader workers
    options = {"preprocessing": "vggish_logmel_patch", "framing": framing, "pca": bool(pca), "window": WINDOW,
               "hop": HOP, "n_fft": N_FFT, "n_mels": N_MELS, "fmin": FMIN, "fmax": FMAX, "patch_frames": PATCH_FRAMES,
               "channels_last": channels_last}
    return LoadedEncoder(model=model, preprocess=front, weights_info=info, options=options)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The 4 conv blocks (each ending in its max-pool) and the embedding MLP."""
    return [*split_at_pools(model.features), model.embeddings]


def saved_layout(spec: EncoderSpec, model: nn.Module, base_weights: str, seed: int) -> dict:
    """torchvggish's state dict (features.*, embeddings.*); the PCA params stay in their own file."""
    return state_over_base(spec, model, base_weights)


# torchvggish names its release files as torch.hub does, name-<sha256 prefix>.pth: its loader
# of May 2019 fetched vggish-10086976.pth with torch.hub.load_state_dict_from_url, which then
# always checked that prefix, and its PCA params went through the same check; no full hash
# is published. Checked on every load.
_RELEASE = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
_PINNED_BY = "https://github.com/harritaylor/torchvggish/blob/master/hubconf.py"
PCA_PARAMS = OfficialWeights("torchvggish:vggish_pca_params", "vggish_pca_params-970ea276.pth",
                             _RELEASE + "vggish_pca_params-970ea276.pth", check_hash=True, pinned_by=_PINNED_BY)
_AUDIOSET = OfficialWeights("torchvggish:vggish", "vggish-10086976.pth", _RELEASE + "vggish-10086976.pth",
                            check_hash=True, pinned_by=_PINNED_BY)

SPEC = EncoderSpec(
    name="vggish",
    modality="audio",
    feature_shape=(128,),
    sample_rate=SAMPLE_RATE,
    default_weights="audioset",
    official={"audioset": _AUDIOSET},
    loader=load,
    options=VGGishOptions,
    default_dtype="float32",
    blocks=blocks,
    saved_layout=saved_layout,
    extra_files=lambda o: [PCA_PARAMS] if o.get("pca") and o.get("pca_params") in (None, "audioset") else [],
)
