"""The decode report (Markdown + JSON + PNG): what decoded, what failed and why.

``decode_report`` summarises ``manifest.parquet`` (one row per sample, with the decode
status of its video). Counts are given per unique video and per
sample, because AVE has videos annotated more than once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def _per_video(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.drop_duplicates("video_id").reset_index(drop=True)


def _duration_stats(values: pd.Series) -> dict:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return {"n": 0}
    return {"n": int(len(v)), "min": float(v.min()), "median": float(np.median(v)),
            "mean": float(v.mean()), "max": float(v.max()), "total_hours": float(v.sum() / 3600)}


def decode_summary(manifest: pd.DataFrame) -> dict:
    """JSON-able summary: counts, failures with reasons, warnings, durations."""
    videos = _per_video(manifest)
    failed = videos[videos["status"] != "ok"]
    warned = videos[(videos["status"] == "ok") & (videos["warnings"].fillna("") != "")]
    split_counts = {}
    if "split" in manifest:
        for split, g in manifest.groupby("split", sort=True):
            split_counts[str(split)] = {"samples": int(len(g)), "ok": int((g["status"] == "ok").sum())}
    return {
        "videos": {"total": int(len(videos)), "ok": int((videos["status"] == "ok").sum()),
                   "failed": int(len(failed)), "with_warnings": int(len(warned))},
        "samples": {"total": int(len(manifest)), "ok": int((manifest["status"] == "ok").sum()),
                    "failed": int((manifest["status"] != "ok").sum())},
        "splits": split_counts,
        "failure_reasons": {str(k): int(v) for k, v in failed["reason"].value_counts().items()},
        "failures": [{"video_id": r.video_id, "reason": r.reason} for r in failed.itertuples()],
        "warnings": [{"video_id": r.video_id, "warnings": r.warnings} for r in warned.itertuples()],
        "probe_duration_s": _duration_stats(videos.get("probe_duration", pd.Series(dtype=float))),
        "annotated_duration_s": _duration_stats(videos.get("duration", pd.Series(dtype=float))),
    }


def _markdown(s: dict, png_name: str) -> str:
    v, smp = s["videos"], s["samples"]
    lines = ["# Decode report", "",
             f"Videos: {v['total']} — ok {v['ok']}, failed {v['failed']}, "
             f"ok with warnings {v['with_warnings']}.",
             f"Samples: {smp['total']} — ok {smp['ok']}, failed {smp['failed']}.", ""]
    if s["splits"]:
        lines += ["| split | samples | ok |", "| --- | --- | --- |"]
        lines += [f"| {k} | {c['samples']} | {c['ok']} |" for k, c in s["splits"].items()]
        lines.append("")
    d = s["probe_duration_s"]
    if d.get("n"):
        lines += [f"Probed durations (s): min {d['min']:.2f}, median {d['median']:.2f}, "
                  f"mean {d['mean']:.2f}, max {d['max']:.2f}; total {d['total_hours']:.2f} h.", ""]
    lines += ["## Failures", ""]
    if s["failures"]:
        lines += ["| reason | videos |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {n} |" for k, n in s["failure_reasons"].items()]
        lines += ["", "| video | reason |", "| --- | --- |"]
        lines += [f"| {_cell(f['video_id'])} | {_cell(f['reason'])} |" for f in s["failures"]]
    else:
        lines.append("None.")
    lines += ["", "## Warnings (decoded, adjusted)", ""]
    if s["warnings"]:
        lines += ["| video | warnings |", "| --- | --- |"]
        lines += [f"| {_cell(w['video_id'])} | {_cell(w['warnings'])} |" for w in s["warnings"]]
    else:
        lines.append("None.")
    lines += ["", f"![durations and status]({png_name})", ""]
    return "\n".join(lines)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _plot(manifest: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = _per_video(manifest)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    dur = pd.to_numeric(videos.get("probe_duration", pd.Series(dtype=float)), errors="coerce").dropna()
    if len(dur):
        ax1.hist(dur, bins=min(40, max(5, len(dur) // 5)), color="tab:blue")
    ax1.set(title="Probed duration per video", xlabel="seconds", ylabel="videos")
    counts = videos["status"].value_counts()
    warned = int(((videos["status"] == "ok") & (videos["warnings"].fillna("") != "")).sum())
    labels = ["ok", "ok, warned", "failed"]
    values = [int(counts.get("ok", 0)) - warned, warned, int(len(videos) - counts.get("ok", 0))]
    bars = ax2.bar(labels, values, color=["tab:green", "tab:orange", "tab:red"])
    ax2.bar_label(bars)
    ax2.set(title="Decode status", ylabel="videos")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def decode_report(manifest: pd.DataFrame, out_dir: str | Path, name: str = "decode_report",
                  problems: list[dict] | None = None) -> dict:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``out_dir``; return the summary.

    ``problems``: the index stage's annotation problems (malformed rows, missing files),
    listed in the report with file, line and reason."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for col in ("video_id", "status"):
        if col not in manifest:
            raise ValueError(f"decode_report: manifest lacks column {col!r}")
    manifest = manifest.copy()
    manifest["warnings"] = manifest.get("warnings", pd.Series("", index=manifest.index)).fillna("")
    manifest["reason"] = manifest.get("reason", pd.Series("", index=manifest.index)).fillna("")
    summary = decode_summary(manifest)
    png = out_dir / f"{name}.png"
    _plot(manifest, png)
    summary["annotation_problems"] = list(problems or [])
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = _markdown(summary, png.name)
    if problems:
        md += "\n## Annotation problems (index stage)\n\n| file | line | video | severity | reason |\n| --- | --- | --- | --- | --- |\n"
        for p in problems:
            md += (f"| {p.get('file', '')} | {p.get('line', '')} | {p.get('video_id', '') or ''} | "
                   f"{p.get('severity', 'error')} | {p.get('reason', '')} |\n")
    (out_dir / f"{name}.md").write_text(md)
    return summary
