"""Weight resolution and loading for the encoders.

``weights`` given to an encoder is one of
- None: the encoder's official ``default_weights`` (never random);
- ``"random"`` / ``"random:<seed>"``: explicit seeded init (the model's own constructor
  init under ``torch.manual_seed``), logged and stamped in ``weights_info``;
- an official name of the encoder (``"imagenet"``, ``"audioset"``, aliases such as
  ``"IMAGENET1K_V1"``): the publisher's file under its official name in the standard
  torch cache ``torch.hub.get_dir()/checkpoints``, downloaded there when online, and
  checked on every load against what the publisher states (the sha256 prefix in the name,
  a published md5 / sha256, the size): a file is not trusted by its name;
- a path: a state dict in the encoder's official layout (keys and shapes checked; its
  sha256 is recorded, nothing is compared: it is not an official file).

Everything that can go wrong with weights raises :class:`WeightsError` while the
encoder is loaded, before any extraction work starts.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

OFFLINE_ENV = "AVEPIPE_OFFLINE"  # "1": never try to download
TIMEOUT_ENV = "AVEPIPE_DOWNLOAD_TIMEOUT"  # socket timeout in s for downloads (default 20)
DEFAULT_SEED = 0
_HASH_RE = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub naming: name-<sha256 prefix>.ext
# the page that states torch.hub's naming convention (the name's hex suffix is a sha256 prefix)
HUB_NAMING = "https://pytorch.org/docs/stable/hub.html#torch.hub.load_state_dict_from_url"


class WeightsError(RuntimeError):
    """Weights cannot be found, read, or do not fit the encoder."""


@dataclass(frozen=True)
class OfficialWeights:
    """A publisher's weight file, identified by its official file name and checked against
    what the publisher states about it (``pinned_by`` says where)."""

    id: str  # provenance id, e.g. "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    filename: str  # official file name, kept as is in the cache
    url: str
    # True where the name carries the sha256 prefix (torch.hub's `name-<sha256 prefix>.ext`)
    check_hash: bool = False
    sha256: str | None = None  # full digests / size where the publisher gives them
    md5: str | None = None
    size: int | None = None  # bytes
    pinned_by: str | None = None  # URL of the page that states the hash / size

    @property
    def hash_prefix(self) -> str | None:
        m = _HASH_RE.search(self.filename)
        return m.group(1) if (self.check_hash and m) else None

    @property
    def pinned(self) -> bool:
        """Whether anything about the file's content is checked."""
        return bool(self.hash_prefix or self.sha256 or self.md5 or self.size is not None)


@dataclass(frozen=True)
class ResolvedWeights:
    kind: str  # "random" | "file"
    id: str
    path: Path | None = None
    source: str | None = None  # URL or local path
    seed: int | None = None
    sha256: str | None = None  # of the file, when already computed (official files)


def checkpoint_dir() -> Path:
    """The standard torch cache for weight files (honours TORCH_HOME / hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _missing_message(ow: OfficialWeights, dest: Path, why: str) -> str:
    return (
        f"weights {ow.id!r}: file {ow.filename!r} is not in {dest.parent} ({why}).\n"
        f"  Download it from {ow.url}\n"
        f"  and save it as {dest}\n"
        f"  (directory: {dest.parent}; set TORCH_HOME to use another cache)."
    )


def file_digests(path: str | os.PathLike, md5: bool = False) -> dict[str, str]:
    """{"sha256": ..., ("md5": ...)} of a file, in one read."""
    hs = {"sha256": hashlib.sha256(), **({"md5": hashlib.md5(usedforsecurity=False)} if md5 else {})}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            for h in hs.values():
                h.update(block)
    return {k: h.hexdigest() for k, h in hs.items()}


def verify_official(ow: OfficialWeights, path: Path) -> str:
    """Check ``path`` against what the publisher states for ``ow``; return its sha256.
    A mismatch is a WeightsError naming the file, what was expected and what was found."""
    def refuse(what: str, expected: Any, found: Any) -> WeightsError:
        return WeightsError(
            f"{path}: not the official {ow.id} file {ow.filename!r}: {what} expected {expected}, "
            f"found {found}" + (f" (what the publisher states: {ow.pinned_by})" if ow.pinned_by else "") + ".\n"
            f"  Delete it and download it again from {ow.url}\n"
            f"  (or give your own file as a path: its sha256 is then recorded, not checked).")

    if ow.size is not None:  # cheap: first
        size = path.stat().st_size
        if size != ow.size:
            raise refuse("size", f"{ow.size} bytes", f"{size} bytes")
    found = file_digests(path, md5=ow.md5 is not None)
    sha = found["sha256"]
    prefix = ow.hash_prefix
    if prefix and not sha.startswith(prefix):
        raise refuse("sha256 prefix (from the file name)", prefix, sha)
    if ow.sha256 and sha != ow.sha256:
        raise refuse("sha256", ow.sha256, sha)
    if ow.md5 and found["md5"] != ow.md5:
        raise refuse("md5", ow.md5, found["md5"])
    return sha


def official_file(ow: OfficialWeights) -> tuple[Path, str]:
    """(path, sha256) of ``ow`` in the torch cache, downloaded when absent and allowed,
    verified on every call (see :func:`verify_official`)."""
    dest = checkpoint_dir() / ow.filename
    if dest.is_file():
        return dest, verify_official(ow, dest)
    _download(ow, dest)
    try:
        return dest, verify_official(ow, dest)
    except WeightsError:
        dest.unlink(missing_ok=True)  # our own download: do not leave a bad file under the official name
        raise


def fetch_official(ow: OfficialWeights) -> Path:
    """Path of ``ow`` in the torch cache (downloaded when absent and allowed), verified."""
    return official_file(ow)[0]


def _download(ow: OfficialWeights, dest: Path) -> None:
    if offline():
        raise WeightsError(_missing_message(ow, dest, f"{OFFLINE_ENV}=1, no download tried"))
    timeout = float(os.environ.get(TIMEOUT_ENV, "20"))
    log.info("downloading %s -> %s", ow.url, dest)
    old = socket.getdefaulttimeout()
    # download_url_to_file has no timeout argument: bound every socket op instead,
    # so an unreachable host fails fast rather than hanging a cluster job.
    socket.setdefaulttimeout(timeout)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # writes to a temp file in the same dir and renames: no partial file is left
        torch.hub.download_url_to_file(ow.url, str(dest), hash_prefix=ow.hash_prefix, progress=False)
    except Exception as e:  # noqa: BLE001 - any network/hash failure becomes one clear error
        raise WeightsError(_missing_message(ow, dest, f"download failed: {type(e).__name__}: {e}")) from e
    finally:
        socket.setdefaulttimeout(old)


def _parse_random(weights: str) -> int | None:
    if weights == "random":
        return DEFAULT_SEED
    m = re.fullmatch(r"random:(-?\d+)", weights)
    return int(m.group(1)) if m else None


def resolve_weights(spec: Any, weights: str | None, seed: int | None = None) -> ResolvedWeights:
    """Resolve ``weights`` for encoder ``spec`` (see module docstring).

    None means ``spec.default_weights``. ``seed`` overrides the seed of ``"random"``.
    Official names are matched case-insensitively against ``spec.official``.
    """
    if weights is None:
        weights = spec.default_weights
    if not isinstance(weights, (str, os.PathLike)):
        raise WeightsError(f"{spec.name}: weights must be a string or path, got {type(weights).__name__}")
    text = str(weights)
    rseed = _parse_random(text)
    if rseed is not None:
        return ResolvedWeights("random", "random", seed=int(seed) if seed is not None else rseed)
    official = {k.lower(): v for k, v in (spec.official or {}).items()}
    ow = official.get(text.lower())
    if ow is not None:
        path, sha = official_file(ow)
        return ResolvedWeights("file", ow.id, path=path, source=ow.url, sha256=sha)
    path = Path(text).expanduser()
    if path.is_file():
        path = path.resolve()
        return ResolvedWeights("file", f"file:{path.name}", path=path, source=str(path))
    names = ", ".join(["random", "random:<seed>", *sorted(spec.official or {})])
    raise WeightsError(
        f"{spec.name}: weights {text!r} is neither a known name ({names}) nor an existing file"
    )


def file_sha256(path: str | os.PathLike) -> str:
    return file_digests(path)["sha256"]


_NUMPY_FALLBACK = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)


def _resolve_global(name: str) -> Any | None:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _numpy_globals(path: Path) -> list:
    """numpy types a checkpoint pickles (torchvggish's PCA file holds numpy arrays)."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - legacy (non-zip) format: use the known list
        names = list(_NUMPY_FALLBACK)
    import numpy as np

    # dtype classes are reached through numpy.dtype's state and are not listed above
    names += [f"numpy.dtypes.{type(np.dtype(t)).__name__}" for t in ("f2", "f4", "f8", "i8", "i4", "u1", "b1")]
    bad = [n for n in names if not n.startswith("numpy")]
    if bad:
        raise WeightsError(f"{path}: checkpoint pickles non-tensor objects {bad}; refusing to unpickle them")
    return [g for g in map(_resolve_global, names) if g is not None]


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` (numpy arrays allowed), on CPU."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # maybe numpy arrays: retry with numpy's reconstructors allowed
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot read as a torch checkpoint: {type(e).__name__}: {e}") from e
    try:
        with torch.serialization.safe_globals(_numpy_globals(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot read as a torch checkpoint: {type(e).__name__}: {e}") from e


def as_tensor_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A mapping of names to tensors (numpy arrays converted), or a WeightsError."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v)
            except Exception:  # noqa: BLE001
                raise WeightsError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor") from None
        out[str(k)] = v
    return out


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, tuple],
    required: Iterable[str] | None = None,
    where: str = "state dict",
    layout_name: str = "official",
    max_lines: int = 20,
) -> None:
    """Raise a WeightsError with a readable diff unless ``state`` fits ``layout``.

    ``layout`` maps every key of the official layout to its shape; ``required``
    (default: all) are the keys the encoder actually uses. Keys outside the layout
    are unexpected; shapes must match for every present key.
    """
    required = set(layout if required is None else required)
    missing = sorted(k for k in required if k not in state)
    unexpected = sorted(k for k in state if k not in layout)
    shapes = sorted(
        (k, tuple(state[k].shape), tuple(layout[k]))
        for k in state
        if k in layout and tuple(state[k].shape) != tuple(layout[k])
    )
    if not (missing or unexpected or shapes):
        return
    lines = [f"{where}: does not match the {layout_name} layout "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} wrong shape)"]

    def section(title: str, items: list[str]) -> None:
        for s in items[:max_lines]:
            lines.append(f"  {title}: {s}")
        if len(items) > max_lines:
            lines.append(f"  {title}: ... and {len(items) - max_lines} more")

    section("missing", missing)
    section("unexpected", unexpected)
    section("shape", [f"{k} file {list(a)} expected {list(b)}" for k, a, b in shapes])
    raise WeightsError("\n".join(lines))


def layout_of(build: Callable[[], torch.nn.Module]) -> dict[str, tuple]:
    """Key -> shape of a module's state dict, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_with_weights(
    spec: Any,
    weights: str | None,
    build: Callable[[], torch.nn.Module],
    official_layout: Callable[[], dict[str, tuple]] | None = None,
    unwrap: Callable[[Any, str], Any] | None = None,
    seed: int | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Build ``build()`` with ``weights``; return (model on CPU, weights_info).

    ``official_layout`` gives the publisher's full key->shape layout when the model
    keeps only part of it (e.g. VGG-19 without its classifier); the keys the model
    holds are then the required ones. ``unwrap(obj, where)`` extracts the state dict
    from a checkpoint object (e.g. panns' ``{"model": ...}``).
    """
    r = resolve_weights(spec, weights, seed=seed)
    if r.kind == "random":
        # fork_rng: seed the init without disturbing the caller's global RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.seed)
            model = build()
        log.warning("%s: RANDOM weights (seed %d): features carry no pretrained knowledge", spec.name, r.seed)
        info = {"id": "random", "seed": r.seed, "sha256": None,
                "source": f"constructor init under torch.manual_seed({r.seed})"}
        return model, info

    where = f"{spec.name} weights {r.path}"
    obj = read_checkpoint(r.path)
    if unwrap is not None:
        obj = unwrap(obj, where)
    state = as_tensor_dict(obj, where)
    try:
        with torch.device("meta"):
            model = build()  # meta: no init cost; real tensors come from the file below
    except Exception:  # noqa: BLE001 - e.g. torchlibrosa copies numpy data in __init__
        model = build()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layout = official_layout() if official_layout is not None else own
    for k in own:  # files saved before torch 0.4.1 lack BatchNorm's counter; it is unused in eval
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    check_state_dict(state, layout, required=own.keys(), where=where)
    # cast to the model's dtypes (a float16 file still loads into a float32 model)
    ref = model.state_dict()
    load = {k: state[k].to(ref[k].dtype) for k in own}
    model.load_state_dict(load, strict=True, assign=any(t.is_meta for t in ref.values()))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # would only happen for state outside the state dict; fail loudly
        raise WeightsError(f"{where}: model tensors not set by the file: {left}")
    info = {"id": r.id, "sha256": r.sha256 or file_sha256(r.path), "source": r.source, "file": r.path.name}
    log.info("%s: loaded %s (sha256 %s)", spec.name, r.path, info["sha256"][:12])
    return model, info


def state_over_base(spec: Any, model: torch.nn.Module, base_weights: str | None,
                    unwrap: Callable[[Any], Any] | None = None,
                    random_base: Callable[[], torch.nn.Module] | None = None,
                    seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """``model``'s state dict (CPU copies) completed with every other key of ``base_weights``:
    the base file's entries (after ``unwrap``), or, for a random base, those of
    ``random_base()`` built under ``torch.manual_seed(seed)`` (None: nothing added).
    The model's own tensors always win."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    r = resolve_weights(spec, None if base_weights is None else str(base_weights))
    full: dict = {}
    if r.kind == "file":
        obj = read_checkpoint(r.path)
        full = as_tensor_dict(unwrap(obj) if unwrap is not None else obj, str(r.path))
    elif random_base is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = random_base().state_dict()
    for k, v in full.items():
        state.setdefault(k, v)
    return state


def inference_ready(model: torch.nn.Module, device: Any, channels_last: bool) -> torch.nn.Module:
    """eval(), frozen, on ``device``; channels_last memory (faster for convs with oneDNN and
    cuDNN) unless disabled, in which case a model that converts its input itself
    (``memory_format`` attribute) is told to keep NCHW."""
    model = model.eval().requires_grad_(False).to(device)
    if channels_last:
        return model.to(memory_format=torch.channels_last)
    if hasattr(model, "memory_format"):
        model.memory_format = torch.contiguous_format
    return model
