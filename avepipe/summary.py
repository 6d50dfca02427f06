"""The heads' summary of a run: `summary.json`, `summary.md` (tables like the papers') and plots.

Each head run writes `heads/<head>[@<variant>]/<features>/<setting>/seed<k>/metrics.json`;
the path names the run, the file holds the metrics (fractions) and provenance. Beside each
head, `summary.md` shows the paper's published number for the same setting and features: a
reference measured on the real dataset, not a target for synthetic data. `plots/` gets the
learning curves, per-class bars and confusion matrices, and each dense run's AP and
precision-recall plots, so the HTML report (`snakemake --report`) shows them all.
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

AVE_KEYS = ("accuracy",)
UNAV_KEYS = tuple(f"mAP@{t:.1f}" for t in np.arange(0.1, 1.0, 0.1)) + ("average_mAP",)

# Published results on the real datasets (%), by (head, features, setting): AVE segment
# accuracy, CML average, UnAV-100 average mAP. Sources: CACE-Net Table 5 (audio/visual-only and
# AVEL from Tian et al.; CACE-Net), CACE-Net Table S3 (UnAV-100 baseline), Ge et al. Table 1
# (AVEL with Cnn14 and weak; Ge et al.), CCLN Tables I and III.
PUBLISHED: dict[tuple[str, str, str], tuple[float, str]] = {
    ("audio_only", "vgg19+vggish", "full"): (59.5, "Tian et al. 2018 (CACE-Net Tab. 5)"),
    ("visual_only", "vgg19+vggish", "full"): (55.3, "Tian et al. 2018 (CACE-Net Tab. 5)"),
    ("avel", "vgg19+vggish", "full"): (72.7, "Tian et al. 2018"),
    ("avel", "vgg19+cnn14", "full"): (73.6, "Ge et al. 2023 Tab. 1"),
    ("avel", "vgg19+vggish", "weak"): (66.7, "Tian et al. 2018"),
    ("avel", "vgg19+cnn14", "weak"): (70.2, "Ge et al. 2023 Tab. 1"),
    ("cace_net", "vgg19+vggish", "full"): (80.8, "CACE-Net Tab. 5"),
    ("cace_net", "resnet50_ft+cnn14", "full"): (82.4, "CACE-Net Tab. 5 (fine-tuned encoders)"),
    ("ccln", "vgg19+vggish", "full"): (79.9, "CCLN Tab. I"),
    ("ccln", "vgg19+vggish", "weak"): (75.2, "CCLN Tab. I"),
    ("ccln", "vgg19+vggish", "cml"): (63.9, "CCLN Tab. III (A2V 63.3, V2A 64.4)"),
    ("event_memory", "vgg19+vggish", "full"): (80.4, "Ge et al. 2023 Tab. 1"),
    ("event_memory", "vgg19+cnn14", "full"): (81.3, "Ge et al. 2023 Tab. 1"),
    ("event_memory", "vgg19+vggish", "weak"): (77.2, "Ge et al. 2023 Tab. 1"),
    ("event_memory", "vgg19+cnn14", "weak"): (78.7, "Ge et al. 2023 Tab. 1"),
    ("dense", "resnet50+vggish", "full"): (46.8, "UnAV-100 baseline, its own features (CACE-Net Tab. S3)"),
}


def published(head: str, features: str, setting: str) -> tuple[float, str] | None:
    """The paper's number for a head (variants excluded: they change the recipe)."""
    if "@" in head:
        return None
    return PUBLISHED.get((head, features, setting))


def parse_run_path(path: Path) -> dict:
    """heads/<head>[@<variant>]/<features>/<setting>/seed<k>/metrics.json -> its names."""
    seed_dir = path.parent
    setting_dir = seed_dir.parent
    features_dir = setting_dir.parent
    head_dir = features_dir.parent
    if not seed_dir.name.startswith("seed"):
        raise ValueError(f"{path}: expected .../<head>/<features>/<setting>/seed<k>/metrics.json")
    head, _, variant = head_dir.name.partition("@")
    return {"head": head_dir.name, "base_head": head, "variant": variant or None, "features": features_dir.name,
            "setting": setting_dir.name, "seed": int(seed_dir.name[4:])}


def load_records(paths: Sequence[Path]) -> list[dict]:
    records = []
    for p in sorted(Path(x) for x in paths):
        m = json.loads(Path(p).read_text())
        rec = parse_run_path(Path(p))
        rec["metrics"] = {k: v for k, v in m.items() if k not in ("provenance", "per_class", "confusion_matrix",
                                                                  "per_class_accuracy", "per_class_ap")}
        rec["select_on"] = m.get("select_on", "val")
        rec["provenance"] = m.get("provenance", {})
        rec["path"] = str(p)
        records.append(rec)
    return records


def _mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=float) * 100
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _notes(recs: list[dict]) -> list[str]:
    """What differs from the papers' protocol in these runs, said once under the table."""
    notes = []
    n_test = sorted({r["metrics"].get("n_test") for r in recs if r["metrics"].get("n_test")})
    if n_test:
        notes.append(f"Test split: {', '.join(map(str, n_test))} videos.")
    noisy = {r["metrics"]["n_noisy_train"] for r in recs if r["metrics"].get("n_noisy_train")}
    if noisy:
        notes.append(f"Weak setting trained with {', '.join(map(str, sorted(noisy)))} extra background-only "
                     "videos (as the references do).")
    return notes


# The section header names how each table's epoch was chosen (`train.select_on`).
SELECTION_LABELS = {"test": "published protocol: model selected on TEST", "val": "model selected on val",
                    "last": "last epoch, no model selection"}


def summary_markdown(run: str, records: list[dict]) -> str:
    lines = [f"# Summary of run `{run}`", ""]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[("average_mAP" in r["metrics"], r["setting"], r["select_on"])].append(r)
    for (is_unav, setting, select_on), recs in sorted(groups.items()):
        keys = UNAV_KEYS if is_unav else AVE_KEYS + tuple(
            k for k in ("cml_a2v", "cml_v2a", "cml_avg") if any(k in r["metrics"] for r in recs))
        label = SELECTION_LABELS.get(select_on, f"model selected on {select_on}")
        task = "UnAV-100 dense localization" if is_unav else "AVE"
        lines += [f"## {task}, setting `{setting}` ({label})", "",
                  "Values in % (mean ± std over seeds where several). *Published* is the paper's number on "
                  "the real dataset with real pretrained features: a reference for real runs, not for "
                  "synthetic data.", ""]
        feats = sorted({r["features"] for r in recs})
        lines.append("| head | features | seeds | " + " | ".join(keys) + " | published (real data) |")
        lines.append("| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- |")
        for head in sorted({r["head"] for r in recs}):
            for f in feats:
                rs = [r for r in recs if r["head"] == head and r["features"] == f]
                if not rs:
                    continue
                cells = [_mean_std([r["metrics"][k] for r in rs]) if all(k in r["metrics"] for r in rs) else "–"
                         for k in keys]
                pub = published(head, f, setting)
                ref = f"{pub[0]:.1f} ({pub[1]})" if pub else "–"
                lines.append(f"| {head} | {f} | {len(rs)} | " + " | ".join(cells) + f" | {ref} |")
        lines += ["", *_notes(recs), ""]
    return "\n".join(lines)


def _run_name(r: dict) -> str:
    return f"{r['head']}_{r['features'].replace('+', '-')}_{r['setting']}_seed{r['seed']}".replace("@", "-")


def _class_names(per_class, n: int) -> list[str]:
    if isinstance(per_class, dict):
        return list(per_class)
    from avepipe.datasets.labels import AVE_CLASSES

    names = list(AVE_CLASSES) + ["background"]
    return names[:n] if n <= len(names) else [str(i) for i in range(n)]


def _plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    # learning curves: one line per head run (the selection metric per epoch)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        logp = Path(r["path"]).with_name("log.jsonl")
        if not logp.exists():
            continue
        rows = [json.loads(line) for line in logp.read_text().splitlines() if line.strip()]
        key = next((k for k in ("val_accuracy", "val_acc", "val_average_mAP", "val_mAP", "train_loss", "loss")
                    if rows and any(k in x for x in rows)), None)
        if key:
            pts = [(x.get("epoch", i + 1), x[key]) for i, x in enumerate(rows) if x.get(key) is not None]
            ax.plot(*zip(*pts), label=f"{r['head']} {r['features']} {r['setting']} s{r['seed']}", lw=1)
            ax.set_ylabel(key)
    ax.set_xlabel("epoch")
    ax.set_title("learning curves")
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)
    made.append(out / "learning_curves.png")
    for r in records:
        m = json.loads(Path(r["path"]).read_text())
        name = _run_name(r)
        per_class = m.get("per_class_accuracy") or m.get("per_class_ap")
        if per_class:
            values = list(per_class.values()) if isinstance(per_class, dict) else list(per_class)
            names = _class_names(per_class, len(values))
            fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(names)), 3.5))
            ax.bar(range(len(names)), [np.nan if v is None else v for v in values])
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_ylim(0, 1)
            ax.set_title(f"per-class {'accuracy' if 'per_class_accuracy' in m else 'AP'}: {name}", fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"per_class_{name}.png", dpi=100)
            plt.close(fig)
            made.append(out / f"per_class_{name}.png")
        cm = m.get("confusion_matrix")
        if cm:
            cm = np.asarray(cm, dtype=float)
            fig, ax = plt.subplots(figsize=(4.5, 4))
            norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true (28 = background)")
            ax.set_title(f"confusion: {name}", fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"confusion_{name}.png", dpi=100)
            plt.close(fig)
            made.append(out / f"confusion_{name}.png")
        # the run's own plots (dense: AP per tIoU and precision-recall) into the report
        for own in ("ap.png", "pr_curve.png", "learning_curve.png"):
            src = Path(r["path"]).with_name(own)
            if src.is_file():
                dst = out / f"{own.removesuffix('.png')}_{name}.png"
                shutil.copyfile(src, dst)
                made.append(dst)
    return made


def summarize(run: str, metrics_paths: Sequence[Path], out_dir: Path) -> list[dict]:
    out_dir = Path(out_dir)
    records = load_records(metrics_paths)
    (out_dir / "summary.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(run, records) + "\n")
    _plots(records, out_dir / "plots")
    return records
