"""Aggregate head runs into `summary.json`, `summary.md` (tables like the papers') and plots.

Each head run writes `heads/<head>/<features>/<setting>/seed<k>/metrics.json`; the path
names the run, the file holds the metrics (fractions) and provenance.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

AVE_KEYS = ("accuracy",)
UNAV_KEYS = tuple(f"mAP@{t:.1f}" for t in np.arange(0.1, 1.0, 0.1)) + ("average_mAP",)


def parse_run_path(path: Path) -> dict:
    """heads/<head>/<features>/<setting>/seed<k>/metrics.json -> its four names."""
    seed_dir = path.parent
    setting_dir = seed_dir.parent
    features_dir = setting_dir.parent
    head_dir = features_dir.parent
    if not seed_dir.name.startswith("seed"):
        raise ValueError(f"{path}: expected .../<head>/<features>/<setting>/seed<k>/metrics.json")
    return {"head": head_dir.name, "features": features_dir.name, "setting": setting_dir.name,
            "seed": int(seed_dir.name[4:])}


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


def summary_markdown(run: str, records: list[dict]) -> str:
    lines = [f"# Summary of run `{run}`", ""]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["setting"], r["select_on"])].append(r)
    for (setting, select_on), recs in sorted(groups.items()):
        is_unav = any("average_mAP" in r["metrics"] for r in recs)
        keys = UNAV_KEYS if is_unav else AVE_KEYS + tuple(
            k for k in ("cml_a2v", "cml_v2a", "cml_avg") if any(k in r["metrics"] for r in recs))
        label = "published protocol: model selected on TEST" if select_on == "test" else "model selected on val"
        lines += [f"## Setting `{setting}` ({label})", "",
                  "Values in % (mean ± std over seeds where several).", ""]
        feats = sorted({r["features"] for r in recs})
        lines.append("| head | features | seeds | " + " | ".join(keys) + " |")
        lines.append("| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |")
        for head in sorted({r["head"] for r in recs}):
            for f in feats:
                rs = [r for r in recs if r["head"] == head and r["features"] == f]
                if not rs:
                    continue
                cells = [_mean_std([r["metrics"][k] for r in rs]) if all(k in r["metrics"] for r in rs) else "–"
                         for k in keys]
                lines.append(f"| {head} | {f} | {len(rs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    # learning curves: one line per head run (validation metric per epoch)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        logp = Path(r["path"]).with_name("log.jsonl")
        if not logp.exists():
            continue
        rows = [json.loads(line) for line in logp.read_text().splitlines() if line.strip()]
        key = next((k for k in ("val_accuracy", "val_acc", "val_average_mAP", "val_mAP", "train_loss", "loss")
                    if rows and k in rows[0]), None)
        if key:
            ax.plot([x.get("epoch", i + 1) for i, x in enumerate(rows)], [x[key] for x in rows],
                    label=f"{r['head']} {r['features']} {r['setting']} s{r['seed']}", lw=1)
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
        name = f"{r['head']}_{r['features'].replace('+', '-')}_{r['setting']}_seed{r['seed']}"
        per_class = m.get("per_class_accuracy") or m.get("per_class_ap")
        if isinstance(per_class, dict) and per_class:
            fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(per_class)), 3.5))
            names = list(per_class)
            ax.bar(range(len(names)), [np.nan if v is None else v for v in per_class.values()])
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
    return made


def summarize(run: str, metrics_paths: Sequence[Path], out_dir: Path) -> list[dict]:
    out_dir = Path(out_dir)
    records = load_records(metrics_paths)
    (out_dir / "summary.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(run, records) + "\n")
    _plots(records, out_dir / "plots")
    return records
