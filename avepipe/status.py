"""`avepipe status`: where a run stands, stage by stage, and roughly when it will be done.

Snakemake itself says which outputs are done (`snakemake --summary`: one line per output
file with its rule, log and whether an update is pending); this groups them into jobs (one
log per job), counts done / total per rule, names the jobs whose last attempt failed (their
log shows an error and their outputs are not done), counts the videos that failed to
decode (the manifest), and estimates the time left from the benchmark files of finished
jobs (`results/<run>/benchmarks/<rule>/...tsv`, Snakemake's `benchmark:` directive): the
mean seconds per job of each rule times the jobs left, over the cores given.
"""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULE_ORDER = ["synth", "index", "decode", "decode_report", "extract", "store_summary", "finetune",
              "finetune_both", "train", "summary"]
ERROR_MARKS = ("Traceback (most recent call last)", "avepipe ", "Error", "error:")


def summary_rows(configfile: str | None, cwd: Path, snakefile: Path = REPO / "Snakefile") -> list[dict]:
    """`snakemake --summary` as dicts (output_file, rule, log-file(s), status, plan)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--summary", "--cores", "1"]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "AVEPIPE_PREFLIGHT": "0"})
    if r.returncode != 0:
        raise RuntimeError(f"snakemake --summary failed:\n{(r.stderr or r.stdout)[-3000:]}")
    text = r.stdout[r.stdout.index("output_file"):] if "output_file" in r.stdout else ""
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def _failed(log: Path) -> bool:
    if not log.is_file():
        return False
    tail = log.read_text(errors="replace")[-4000:]
    return "Traceback (most recent call last)" in tail or ": error:" in tail


def _log_rule(rel: Path) -> str:
    """The rule of a log under results/<run>/logs/ (the workflow's naming)."""
    first = rel.parts[0]
    if len(rel.parts) == 1:
        return rel.stem  # synth.log, index.log, decode_report.log, summary.log
    if first == "heads":
        return "train"
    if first == "finetune":
        return "finetune_both" if "+" in rel.name else "finetune"
    return first  # decode/, extract/, store_summary/


def _logs(run_dir: Path, rule: str) -> list[Path]:
    base = run_dir / "logs"
    return [p for p in base.rglob("*.log") if _log_rule(p.relative_to(base)) == rule] if base.is_dir() else []


def _mean_seconds(run_dir: Path, rule: str) -> tuple[float | None, int]:
    files = list((run_dir / "benchmarks" / rule).rglob("*.tsv")) if (run_dir / "benchmarks" / rule).is_dir() \
        else list(run_dir.glob(f"benchmarks/{rule}*.tsv"))
    secs = []
    for f in files:
        rows = list(csv.DictReader(f.open(), delimiter="\t"))
        secs += [float(r["s"]) for r in rows if r.get("s") not in (None, "", "NA")]
    return (sum(secs) / len(secs), len(files)) if secs else (None, 0)


def status(configfile: str | None = None, runs: list[str] | None = None, cwd: Path | None = None,
           cores: int | None = None) -> dict:
    """{run: {"rules": {rule: {done, total, failed: [log...]}}, "eta_s", "eta_basis", "failed_videos"}}."""
    cwd = Path(cwd or Path.cwd())
    rows = summary_rows(configfile, cwd)
    jobs: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)  # (run, rule) -> job key -> info
    for r in rows:
        out = r["output_file"]
        parts = Path(out).parts
        if len(parts) < 2 or parts[0] != "results":
            continue
        run, rule = parts[1], r["rule"]
        log = r.get("log-file(s)", "-")
        key = log if log not in ("-", "") else out
        info = jobs[(run, rule)].setdefault(key, {"done": True, "log": None if log in ("-", "") else log})
        info["done"] &= r["plan"].strip() == "no update"
    cores = cores or os.cpu_count() or 1
    out: dict[str, dict] = {}
    for (run, rule), js in jobs.items():
        if runs and run not in runs:
            continue
        rec = out.setdefault(run, {"rules": {}, "eta_s": 0.0, "eta_basis": [], "failed_videos": None})
        done = sum(j["done"] for j in js.values())
        # Snakemake names no log for a job that has not finished: logs with an error, of a rule
        # that still has jobs to do, are its failed attempts
        failed = sorted(str(p.relative_to(cwd)) for p in _logs(cwd / "results" / run, rule)
                        if done < len(js) and _failed(p))
        rec["rules"][rule] = {"done": done, "total": len(js), "failed": failed}
        left = len(js) - done
        if left:
            mean, n = _mean_seconds(cwd / "results" / run, rule)
            if mean is not None:
                rec["eta_s"] += mean * left / cores
                rec["eta_basis"].append(f"{rule}: {left} x {mean:.0f} s (from {n} finished)")
            else:
                rec["eta_basis"].append(f"{rule}: {left} job(s), no timing yet")
    for run, rec in out.items():
        man = cwd / "results" / run / "manifest.parquet"
        if man.is_file():
            import pandas as pd

            m = pd.read_parquet(man).drop_duplicates("video_id")
            rec["failed_videos"] = {"decode": int((m["status"] != "ok").sum()), "videos": len(m)}
    return out


def format_status(st: dict, cores: int) -> str:
    lines = []
    for run, rec in st.items():
        lines.append(f"run {run}")
        rules = sorted(rec["rules"], key=lambda r: RULE_ORDER.index(r) if r in RULE_ORDER else 99)
        for rule in rules:
            r = rec["rules"][rule]
            mark = "done" if r["done"] == r["total"] else f"{r['done']}/{r['total']}"
            lines.append(f"  {rule:<14} {mark:>9}" + (f"   FAILED: {', '.join(r['failed'][:3])}"
                                                      + (" ..." if len(r["failed"]) > 3 else "") if r["failed"] else ""))
        fv = rec["failed_videos"]
        if fv:
            lines.append(f"  videos: {fv['videos']}, {fv['decode']} failed to decode (see decode_report.md)")
        left = sum(r["total"] - r["done"] for r in rec["rules"].values())
        if not left:
            lines.append("  complete")
        else:
            eta = rec["eta_s"]
            lines.append(f"  {left} job(s) left; ETA ~{eta / 60:.0f} min on {cores} core(s) for the timed ones ("
                         + "; ".join(rec["eta_basis"]) + ")")
    return "\n".join(lines) or "no results for this config yet"
