"""Run plumbing shared by the three training loops (AVE heads, the dense UnAV-100 head,
InfoNCE fine-tuning): seeding and RNG state, determinism, autocast, the run's checkpoint and
log.jsonl, z-scoring and the learning-curve plot. Optimizer and schedule: ``schedule.py``.

Conventions every loop follows:

- Epochs are 1-based wherever they are written: ``log.jsonl`` ``epoch``, the checkpoint's
  ``epoch`` (= epochs finished), ``selected_epoch`` in metrics.json. (Heads' ``loss`` still
  receives the 0-based epoch index: their in-loss schedules are written for it.)
- A run is its effective configuration: every option that affects the result, the recipe,
  the head's hyper-parameters, a hash of the data ids and shapes, the device type and the
  stage's code fingerprint. ``checkpoint.pt`` holds it; a run resumes only from a checkpoint
  whose configuration is exactly its own, else it starts fresh and logs which keys differ.
- Checkpoints are written atomically (a temporary file, then ``os.replace``) and read with
  ``torch.load(weights_only=True)``: everything in them is tensors and plain Python values,
  so a crafted pickle cannot run code; an unreadable checkpoint means a fresh start.
- The log line of an epoch is written before its checkpoint; on resume ``log.jsonl`` is
  rewritten from the checkpoint's history, which drops lines of an epoch a kill cut short.

Determinism: on CPU a run is bit-reproducible. Torch's deterministic algorithms are on, every
RNG (torch, numpy, Python, CUDA) is seeded, and shuffles draw from their own generator whose
state is checkpointed with the others, so two runs with one seed, and a run killed and
resumed, end with identical weights (tests/training). On CUDA the same holds for float32
runs on one GPU model and software stack (deterministic algorithms, cuBLAS workspace
config, no cuDNN autotuning); bf16 autocast runs do not ask for deterministic kernels and
agree to rounding only. Other hardware, thread counts or library versions may round
differently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from avepipe.options import PRECISIONS

log = logging.getLogger("avepipe.training")


# --------------------------------------------------------------------------- RNG
def seed_all(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA), numpy and Python; return the shuffle generator (its own
    stream, so a head that draws more random numbers does not change the batch order)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state(shuffle: torch.Generator) -> dict:
    """Every RNG state as tensors and plain values (loads with ``weights_only=True``)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(),
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "words": list(words), "gauss": py_gauss},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- determinism, precision
@contextlib.contextmanager
def deterministic(device: torch.device, precision: str = "float32"):
    """Deterministic algorithms on CPU, and on CUDA in float32 (see the module docstring);
    the process-wide settings are restored on exit."""
    enabled = device.type == "cpu" or precision == "float32"
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench


def check_precision(precision: str, device: torch.device) -> None:
    """Raise on an unknown ``precision``; warn where bf16 has no hardware support (it still
    runs, emulated, slower than float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "bf16":
        return
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("precision bf16 on a CPU without native bf16 (AVX512-BF16/AMX): emulated, "
                    "expect it slower than float32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("precision bf16 on a GPU without bf16 support: emulated, expect it slow")


def autocast(device: torch.device, precision: str):
    """bf16: autocast (matmuls, convolutions, LSTMs in bf16; reductions and losses in float32;
    weights, optimizer state and gradients stay float32). float32: no autocast."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the run's files
def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (tuples -> lists, numpy scalars -> numbers, paths -> str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def ids_sha256(ids: Iterable[str]) -> str:
    """Hash of a sequence of ids, in order (the data a run trains and selects on)."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def json_sha256(obj: Any) -> str:
    """Hash of a JSON-like value (keys sorted): e.g. the feature stores' provenance."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configurations."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(key)
            else:
                out += config_diff(old[k], new[k], key)
        return out
    return [] if old == new else [prefix or "<config>"]


def write_json(obj: Any, path: Path) -> None:
    """Atomically write ``obj`` as indented JSON."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill mid-save leaves the old file whole."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """One training run's ``checkpoint.pt`` and ``log.jsonl`` in ``out_dir``.

    ``config``: the effective configuration (see the module docstring). Use::

        run = Run(out_dir, config)
        ck = run.resume()            # None: fresh start (log.jsonl emptied)
        for epoch in range(run.epoch + 1, n + 1):
            ...
            run.end_epoch(record, {"model": ..., "optimizer": ..., "rng": ...})
    """

    def __init__(self, out_dir: str | Path, config: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = jsonable(config)
        self.checkpoint, self.log_path = self.dir / "checkpoint.pt", self.dir / "log.jsonl"
        self.history: list[dict] = []
        self.epoch = 0  # epochs finished

    def resume(self, enabled: bool = True) -> dict | None:
        """The checkpoint to continue from (its config equals this run's), or None."""
        ck = self._load() if enabled else None
        if ck is not None:
            self.history, self.epoch = list(ck["history"]), int(ck["epoch"])
        self._rewrite_log()
        return ck

    def _load(self) -> dict | None:
        path = self.checkpoint
        if not path.exists():
            return None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or not {"config", "epoch", "history"} <= set(ck):
                raise ValueError("not a checkpoint of this trainer")
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means a fresh start
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning("%s cannot be read safely (%s: %s); starting fresh", path, type(e).__name__, why[:200])
            return None
        diff = config_diff(ck["config"], self.config)
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            log.warning("%s is of another run configuration (differs in %s); starting fresh", path, shown)
            return None
        log.info("resuming %s after epoch %d", path, ck["epoch"])
        return ck

    def end_epoch(self, record: dict, state: dict) -> None:
        """Append the epoch's log line, then write the checkpoint (``state`` + config, epoch, history)."""
        record = jsonable(record)
        self.history.append(record)
        self.epoch = int(record["epoch"])
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        atomic_save({"config": self.config, "epoch": self.epoch, "history": self.history, **state},
                    self.checkpoint)

    def _rewrite_log(self) -> None:
        tmp = self.log_path.with_name(self.log_path.name + f".tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.log_path)


def cpu_state(module: torch.nn.Module) -> dict:
    """A detached CPU copy of ``module``'s state dict (kept as the selected weights)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- z-scoring
def zscore_stats(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (last axis) mean and std of ``train`` in float32; stds are floored at
    1e-6 of the overall std so constant channels do not blow up."""
    flat = train.float().reshape(-1, train.shape[-1])
    return flat.mean(0), flat.std(0).clamp(min=1e-6 * float(flat.std()) + 1e-12)


def zscore(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` in float32, returned in ``x``'s dtype."""
    return ((x.float() - mean) / std).to(x.dtype)


# --------------------------------------------------------------------------- the plot
def plot_learning_curve(history: Sequence[dict], path: str | Path, *, title: str = "",
                        metrics: Sequence[str] = (), metric_label: str = "score",
                        loss_label: str = "train loss", selected_epoch: int | None = None,
                        select_on: str | None = None) -> Path:
    """Training loss per epoch and, when given, the selection metrics (``metrics``: log keys,
    missing or null values skipped) beside it, the selected epoch marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = [k for k in metrics if any(r.get(k) is not None for r in history)]
    fig, axes = plt.subplots(1, 2 if shown else 1, figsize=(10 if shown else 5.5, 3.6), squeeze=False)
    ax1 = axes[0][0]
    ax1.plot([r["epoch"] for r in history], [r["loss"] for r in history], marker="." if len(history) < 30 else None,
             label=loss_label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if shown:
        ax2 = axes[0][1]
        for key in shown:
            pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            ax2.plot(*zip(*pts), marker=".", label=key.replace("_", " "))
        if selected_epoch:
            ax2.axvline(selected_epoch, color="k", ls="--", lw=0.8, label=f"selected ({select_on})")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(metric_label)
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def try_plot(**kw) -> None:
    """The learning curve, never at the cost of a finished training."""
    try:
        plot_learning_curve(**kw)
    except Exception as e:  # noqa: BLE001
        log.warning("learning curve not written: %s", e)


__all__ = ["seed_all", "rng_state", "set_rng_state", "deterministic", "check_precision", "autocast", "Run",
           "config_diff", "ids_sha256", "json_sha256", "jsonable", "write_json", "atomic_save", "cpu_state", "zscore_stats",
           "zscore", "plot_learning_curve", "try_plot", "PRECISIONS"]
