"""Train and evaluate one AVE localization head (contracts.md "Heads").

``train_ave`` trains a registered head in one setting (full / weak / cml), selects an epoch
(on val by default) and writes under ``out_dir``:

- ``checkpoint.pt``  model, optimizer, RNG states, best so far, effective config (every epoch)
- ``log.jsonl``      one JSON line per epoch (1-based ``epoch``; losses, val/test scores, lr, timings)
- ``best.pt``        weights of the selected epoch
- ``metrics.json``   test metrics of the selected epoch, protocol and provenance
- ``learning_curve.png``

Optimizer, schedule, clipping, epochs and batch size come from the head module's
``TRAIN_DEFAULTS[setting]``; ``HeadOptions`` epochs / batch_size / lr override them and its
``hparams`` go to the head constructor. Run plumbing: avepipe.training.harness.

The command-line entry (the CLI's ``avepipe train`` for AVE heads)::

    run(manifest, visual, audio, out_dir, *, head, setting, seed, train, head_opts,
        evaluate=None, features_name="", config=None)

opens the manifest (parquet) and the feature stores (lists of shard paths), then calls
``train_ave``. The dense trainer's ``run`` has the same signature (there ``evaluate`` is
used), so the CLI calls either one the same way; fine-tuning's ``run`` has the same shape.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from avepipe import heads as H
from avepipe import metrics as M
from avepipe.datasets.labels import NUM_CLASSES
from avepipe.devices import resolve_device
from avepipe.options import SELECT_ON, EvaluateOptions, HeadOptions, TrainOptions
from avepipe.progress import Progress
from avepipe.training import harness as R
from avepipe.training.ave_data import (SPLITS, AVEData, BatchFeeder, SplitData, append_train_only,
                                       load_ave_data, standardize)
from avepipe.training.schedule import make_optimizer, schedule, set_lr

log = logging.getLogger(__name__)



def run(manifest: str | Path, visual: Sequence[str | Path], audio: Sequence[str | Path], out_dir: str | Path, *,
        head: str, setting: str, seed: int, train: TrainOptions, head_opts: HeadOptions,
        evaluate: EvaluateOptions | None = None, features_name: str = "", config: dict | None = None) -> dict:
    """Read the manifest and both feature stores (rows aligned to the manifest), train, evaluate.
    ``evaluate`` (UnAV-100 detection settings) is accepted for the dense trainer's signature and
    not used; ``features_name`` (the feature pair) is recorded in provenance."""
    data = load_ave_data(pd.read_parquet(manifest), [Path(p) for p in visual], [Path(p) for p in audio])
    if setting == "weak" and train.noisy:
        add_noisy_videos(data, Path(visual[0]), Path(audio[0]))
    return train_ave(data, out_dir, head=head, setting=setting, seed=seed, train=train, head_opts=head_opts,
                     config={"features_name": features_name, **(config or {})})


def add_noisy_videos(data: AVEData, visual_shard: Path, audio_shard: Path) -> int:
    """The weak setting's background-only videos, when import-h5 stored them beside these stores
    (``<out>/noisy/``, avepipe.interop.load_noisy): appended to the train split with their
    released video labels, as the references do. Returns how many were added."""
    from avepipe.interop import load_noisy

    vdir, adir = visual_shard.parent, audio_shard.parent
    if vdir.parent != adir.parent:
        return 0
    noisy = load_noisy(vdir.parent, vdir.name, adir.name)
    if noisy is None or not len(noisy.video_ids):
        return 0
    append_train_only(data, np.asarray(noisy.visual.features), np.asarray(noisy.audio.features),
                      noisy.video_labels, noisy.video_ids)
    log.info("weak setting: %d background-only videos added to training (%s)", len(noisy.video_ids),
             vdir.parent / "noisy")
    return len(noisy.video_ids)


def train_ave(data: AVEData, out_dir: str | Path, *, head: str, setting: str, seed: int, train: TrainOptions,
              head_opts: HeadOptions, config: dict | None = None, resume: bool = True,
              on_epoch_end: Callable[[int, dict], None] | None = None, eval_batch_size: int = 64,
              reuse_freed_memory: bool = False) -> dict:
    """Train ``head`` in ``setting`` on ``data``; returns the metrics dict (also metrics.json).

    ``train.select_on``: "val" picks the epoch with the best val score; "test" reproduces the
    published protocol (best epoch on TEST, optimistic) and says so; "last" takes the final
    epoch. ``train.normalize`` "standardize" z-scores ``data`` in place (train statistics).
    ``train.precision`` "bf16": autocast on CPU and CUDA. ``config``: recorded in provenance.
    ``on_epoch_end(epoch, record)``: called after the epoch's checkpoint is written (tests kill
    runs there). ``reuse_freed_memory``: glibc keeps freed activations for the next step
    instead of page-faulting them in again (CACE-Net: ~30% less CPU time per step, 0.3-0.8 GB
    higher peak RSS from fragmentation, hence off by default); results identical.
    """
    if train.select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {train.select_on!r}")
    if H.entry(head).trainer != "ave":
        raise ValueError(f"head {head!r} is trained by the {H.entry(head).trainer} trainer, not the AVE one")
    recipe = H.train_defaults(head, setting)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(head_opts, key) is not None:
            recipe[key] = getattr(head_opts, key)
    n_epochs, bs, hparams = int(recipe["epochs"]), int(recipe["batch_size"]), dict(head_opts.hparams)
    dev, select_on, precision = resolve_device(train.device), train.select_on, train.precision
    R.check_precision(precision, dev)
    if len(data.splits["train"]) == 0:
        raise ValueError("no training samples")
    if select_on == "val" and len(data.splits["val"]) == 0:
        raise ValueError("select_on='val' but the val split is empty")
    if len(data.splits["test"]) == 0:
        raise ValueError("no test samples")
    weak = setting == "weak"
    if data.n_extra_train and not weak:
        raise ValueError(f"{data.n_extra_train} train samples have video labels only: the {setting} setting "
                         "needs segment labels (such samples are for the weak setting)")
    if train.normalize == "standardize" and "standardize" not in data.provenance:
        standardize(data)
    stage = f"heads:{head}"
    run_config = {"stage": stage, "code": _fingerprint(stage), "head": head, "setting": setting, "seed": int(seed),
                  "select_on": select_on, "normalize": train.normalize, "precision": precision,
                  "device": dev.type, "train": recipe, "hparams": hparams,
                  "data": {**data.summary(), "ids_sha256": _ids_hash(data),
                           "features_sha256": R.json_sha256(data.provenance)}}

    with R.deterministic(dev, precision), (_reuse_freed_memory() if reuse_freed_memory else contextlib.nullcontext()):
        gen = R.seed_all(seed)
        model = H.build(head, data.visual_shape, data.audio_dim, setting, **hparams).to(dev)
        opt = make_optimizer(model.parameters(), recipe)
        sched = schedule(recipe, epochs=n_epochs)
        train_d, val_d, test_d = (data.splits[s].to(dev) for s in SPLITS)
        if weak:
            # weak supervision: the loss may only read video labels; poison the segment-level
            # ones so that any use turns the loss non-finite and stops training loudly.
            train_d = SplitData(train_d.visual, train_d.audio, torch.full_like(train_d.segment_labels, float("nan")),
                                torch.full_like(train_d.event_mask, float("nan")), train_d.video_label,
                                train_d.video_ids, train_d.samples)
        rd = R.Run(out_dir, run_config)
        best = {"epoch": 0, "score": -math.inf, "state": None}
        ck = rd.resume(resume)
        if ck is not None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            R.set_rng_state(ck["rng"], gen)
            best = ck["best"]

        feeder = BatchFeeder(train_d, bs, dev, getattr(model, "inputs", ("visual", "audio")))
        try:
            with Progress(n_epochs, initial=rd.epoch, desc=f"{head}/{setting}", unit="epoch") as bar:
                for epoch in range(rd.epoch + 1, n_epochs + 1):
                    t0 = time.perf_counter()
                    lr = set_lr(opt, sched.factor(epoch - 1))
                    model.train()
                    perm = torch.randperm(len(train_d), generator=gen).to(train_d.visual.device)
                    sums: dict[str, float] = {}
                    total, seen, data_s = 0.0, 0, 0.0
                    for step, (b, waited) in enumerate(feeder.epoch(perm)):
                        data_s += waited
                        with R.autocast(dev, precision):
                            outp = model(b["visual"], b["audio"])
                            loss, parts = model.loss(outp, b, epoch - 1, n_epochs)  # heads: 0-based epoch index
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"non-finite loss {float(loss.detach())} at epoch {epoch}, batch {step}"
                                + (" (weak setting: the head read segment labels / event mask, which are NaN here)"
                                   if weak else ""))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if recipe.get("clip_grad_norm"):
                            torch.nn.utils.clip_grad_norm_(model.parameters(), float(recipe["clip_grad_norm"]))
                        opt.step()
                        k = len(b["audio"])
                        total += float(loss.detach()) * k
                        for name, v in parts.items():
                            sums[name] = sums.get(name, 0.0) + float(v) * k
                        seen += k
                    train_s = time.perf_counter() - t0
                    te = time.perf_counter()
                    ev_val = evaluate(model, val_d, setting, dev, batch_size=eval_batch_size, precision=precision)
                    ev_test = evaluate(model, test_d, setting, dev, batch_size=eval_batch_size, precision=precision)
                    eval_s = time.perf_counter() - te
                    score = {"val": ev_val["acc"], "test": ev_test["acc"], "last": float(epoch)}[select_on]
                    selected = bool(score > best["score"])      # ties keep the earlier epoch
                    if selected:
                        best = {"epoch": epoch, "score": score, "state": R.cpu_state(model)}
                    rec = {"epoch": epoch, "lr": lr, "loss": total / seen,
                           "losses": {k: v / seen for k, v in sums.items()},
                           "val_acc": _f(ev_val["acc"]), "test_acc": _f(ev_test["acc"]),
                           **({"val_cml": _cml(ev_val), "test_cml": _cml(ev_test)} if setting == "cml" else {}),
                           "select_on": select_on, "selected": selected, "best_epoch": best["epoch"],
                           "time_s": time.perf_counter() - t0, "train_s": train_s, "data_s": data_s,
                           "eval_s": eval_s, "data_share": data_s / train_s if train_s > 0 else 0.0}
                    rd.end_epoch(rec, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "rng": R.rng_state(gen), "best": best})
                    bar.update(loss=f"{rec['loss']:.4f}", val=f"{ev_val['acc']:.3f}", best=best["epoch"])
                    if on_epoch_end is not None:
                        on_epoch_end(epoch, rec)
        finally:
            feeder.close()

        if best["state"] is None:
            raise RuntimeError("no epoch was trained (epochs=0?)")
        model.load_state_dict(best["state"])
        ev = evaluate(model, test_d, setting, dev, batch_size=eval_batch_size, precision=precision)
        ev_val = evaluate(model, val_d, setting, dev, batch_size=eval_batch_size, precision=precision) if len(val_d) else {}
    out = Path(out_dir)
    R.atomic_save({"model": best["state"], "config": rd.config, "epoch": best["epoch"]}, out / "best.pt")
    result = _metrics(run_config, best["epoch"], ev, ev_val, data, config, n_epochs)
    R.write_json(result, out / "metrics.json")
    R.try_plot(history=rd.history, path=out / "learning_curve.png", title=f"{head} / {setting} / seed {seed}",
               metrics=("val_acc", "test_acc"), metric_label="accuracy", selected_epoch=best["epoch"],
               select_on=select_on)
    return result


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, split: SplitData, setting: str, device, *, batch_size: int = 256,
             precision: str = "float32") -> dict:
    """Predictions and scores of ``model`` on one split.

    full/weak: {"acc", "pred" (N,T), "target" (N,T)}; cml: {"acc" (= mean of A2V/V2A),
    "A2V", "V2A", "average"} from ``embed_cml`` and ``metrics.cml_accuracies``.
    """
    model.eval()
    n = len(split)
    if n == 0:
        return {"acc": float("nan")}
    preds, vs, as_ = [], [], []
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, n), device=split.visual.device)
        b = split.batch(idx, device)
        with R.autocast(device, precision):
            if setting == "cml":
                v, a = model.embed_cml(b["visual"], b["audio"])
                vs.append(v.float().cpu())
                as_.append(a.float().cpu())
            else:
                preds.append(model.predict(model(b["visual"], b["audio"])).cpu())
    if setting == "cml":
        accs = M.cml_accuracies(torch.cat(vs), torch.cat(as_), split.event_mask.cpu())
        return {"acc": accs["average"], **accs}
    pred = torch.cat(preds).numpy()
    target = split.segment_labels.argmax(-1).cpu().numpy()
    return {"acc": M.segment_accuracy(pred, target), "pred": pred, "target": target}


def _metrics(run_config: dict, best_epoch: int, ev: dict, ev_val: dict, data: AVEData, config, n_epochs) -> dict:
    from avepipe.provenance import provenance

    head, setting, select_on = run_config["head"], run_config["setting"], run_config["select_on"]
    res: dict = {
        "head": head, "setting": setting, "seed": run_config["seed"], "select_on": select_on,
        "protocol": ("published protocol: epoch selected on the TEST split (optimistic)" if select_on == "test"
                     else "epoch selected on the val split" if select_on == "val" else "last epoch"),
        "selected_epoch": int(best_epoch), "epochs": n_epochs,
        "n_failed_excluded": data.n_failed_excluded,
        "n_train": len(data.splits["train"]), "n_val": len(data.splits["val"]), "n_test": len(data.splits["test"]),
        "n_short": data.n_short,
        # the weak setting's extra background-only videos (released *_noisy.h5), counted in n_train
        "n_noisy_train": data.n_extra_train,
    }
    if setting == "cml":
        res["accuracy"] = ev["average"]
        res["cml"] = {"A2V": ev["A2V"], "V2A": ev["V2A"], "average": ev["average"]}
        if ev_val:
            res["val_cml"] = _cml(ev_val)
    else:
        res["accuracy"] = ev["acc"]
        res["per_class_accuracy"] = _nan_to_none(M.per_class_accuracy(ev["pred"], ev["target"], NUM_CLASSES + 1))
        res["confusion_matrix"] = M.confusion_matrix(ev["pred"], ev["target"], NUM_CLASSES + 1).tolist()
        if ev_val:
            res["val_accuracy"] = ev_val["acc"]
    res["train_config"] = run_config["train"]
    res["hparams"] = run_config["hparams"]
    res["provenance"] = provenance(run_config["stage"], config or {}, features=data.provenance,
                                   run={k: run_config[k] for k in ("head", "setting", "seed")})
    return res


def _fingerprint(stage: str) -> str:
    from avepipe.provenance import code_fingerprint

    return code_fingerprint(stage)


def _ids_hash(data: AVEData) -> str:
    return R.ids_sha256(f"{s}:{v}" for s in SPLITS for v in data.splits[s].video_ids)


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _cml(ev: dict) -> dict | None:
    return {k: ev[k] for k in ("A2V", "V2A", "average")} if "A2V" in ev else None


def _nan_to_none(x: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, float)]


@contextlib.contextmanager
def _reuse_freed_memory():
    """glibc only: keep freed memory in the heap for the next step instead of unmapping it.

    Why: each (B*T, 49, 512) activation is a fresh 64+ MB mmap that is unmapped when freed,
    so every step page-faults all its activations in again (CACE-Net: ~30% of the step's CPU
    time), at the price of a higher peak RSS (fragmentation). No change to any result; the
    glibc defaults are restored (and the heap trimmed) after.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to tune
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, 65536)               # glibc defaults
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        trim(0)


__all__ = ["run", "train_ave", "evaluate", "SELECT_ON"]
