"""Preflight: everything a run needs that can be checked before its first job, in one summary.

- the dataset root is laid out as the format's real download, and the annotated videos are
  there (more than ``data.max_missing`` of them missing stops the run, naming the folder);
- the weights of every configured encoder are present and verified against what their
  publisher states, or can be downloaded (one message lists every missing file with its URL
  and where to put it);
- a cluster profile has no placeholders left (``CHANGE_ME``).

The Snakefile runs these checks when it is parsed (every `snakemake` call, dry runs
included); ``avepipe check CONFIG [--profile DIR]`` runs them by hand. They are cheap: the
annotation file is parsed and the video folder listed, weight files are hashed once and the
result is remembered by (path, size, mtime) beside them.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

PLACEHOLDER = "CHANGE_ME"


class PreflightError(RuntimeError):
    """A check failed: the run would fail or produce wrong results."""


@dataclass
class Finding:
    level: str   # "ok" | "warning" | "error"
    check: str   # "data" | "weights" | "profile"
    message: str


# --------------------------------------------------------------------------- data
def data_findings(cfg: dict) -> list[Finding]:
    """The root's layout and how many annotated videos are on disk."""
    data = cfg["data"]
    if data.get("synthetic"):
        return [Finding("ok", "data", f"synthetic {data['format']} dataset, generated at {data['root']}")]
    from avepipe.datasets.ave import DatasetError
    from avepipe.datasets.index import build_index, dataset_paths

    fmt, root = data["format"], data["root"]
    paths = dataset_paths(fmt, root)
    if not paths["root"].is_dir():
        return [Finding("error", "data", f"data.root {root!r}: no such folder ({paths['root']})")]
    try:
        df, problems = build_index(fmt, root, n_shards=1, on_error="skip")
    except (DatasetError, OSError, ValueError) as e:
        return [Finding("error", "data", f"data.root {root!r} is not a {fmt} dataset: {e}")]
    videos = df.drop_duplicates("video_id")
    n, found = len(videos), int(videos["exists"].sum())
    out = []
    bad_rows = [p for p in problems if "missing" not in str(p).lower()]
    if bad_rows:
        out.append(Finding("warning", "data", f"{len(bad_rows)} annotation problem(s) (rows left out, see "
                                              f"index_problems.json after the index job), first: {bad_rows[0]}"))
    share = 1 - found / n if n else 1.0
    msg = (f"{found} of {n} annotated videos found in {paths['videos']}"
           + (f"; {n - found} missing ({share:.1%}, data.max_missing = {data.get('max_missing', 0.05):.0%})"
              if found < n else ""))
    if n == 0:
        out.append(Finding("error", "data", f"no annotated videos in {paths['annotations']}"))
    elif share > data.get("max_missing", 0.05):
        first = ", ".join(videos.loc[~videos["exists"], "video_id"].astype(str).head(3))
        out.append(Finding("error", "data", f"{msg}. Is data.root right? Looked for <id>.mp4 in "
                                            f"{paths['videos']} (first missing: {first})"))
    else:
        out.append(Finding("warning" if found < n else "ok", "data", msg))
    return out


# --------------------------------------------------------------------------- weights
def _cache_path() -> Path:
    from avepipe.encoders.weights import checkpoint_dir

    return checkpoint_dir() / ".avepipe-verified.json"


def _verified(ow, path: Path) -> None:
    """verify_official, remembered by (path, size, mtime): a file is hashed once, not per call."""
    from avepipe.encoders.weights import verify_official

    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{ow.filename}"
    cache = _cache_path()
    try:
        seen = json.loads(cache.read_text())
    except (OSError, ValueError):
        seen = {}
    if key in seen:
        return
    verify_official(ow, path)  # raises WeightsError
    seen[key] = True
    try:
        cache.write_text(json.dumps(seen))
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    if not host:
        return False
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def official_files(cfg: dict) -> list[tuple[str, object]]:
    """(``encoders.<name>.weights``, OfficialWeights) of every official file the run loads."""
    from avepipe.config import RANDOM_WEIGHTS, load_schema

    encs = load_schema()["properties"]["encoders"]["properties"]
    out = []
    for name, ec in cfg.get("encoders", {}).items():
        w = ec.get("weights") or encs[name]["x-default-weights"]
        if RANDOM_WEIGHTS.match(str(w)):
            continue  # (random weights need no file: the demo never imports torch here)
        from avepipe.encoders import get_encoder

        spec = get_encoder(name)
        official = {k.lower(): v for k, v in spec.official.items()}
        if str(w).lower() in official:
            out.append((f"encoders.{name}.weights = {w!r}", official[str(w).lower()]))
        for extra in spec.extra_official_files(ec):
            out.append((f"encoders.{name}", extra))
    return out


def weights_findings(cfg: dict) -> list[Finding]:
    out, missing = [], []
    files = official_files(cfg)
    if not files:
        return [Finding("ok", "weights", "no official weight files needed (random or local weights)")]
    from avepipe.encoders.weights import WeightsError, checkpoint_dir, offline

    for key, ow in files:
        dest = checkpoint_dir() / ow.filename
        if dest.is_file():
            try:
                _verified(ow, dest)
                out.append(Finding("ok", "weights", f"{key}: {dest} verified"))
            except WeightsError as e:
                out.append(Finding("error", "weights", f"{key}: {e}"))
        else:
            missing.append((key, ow, dest))
    if missing:
        lines = "\n".join(f"  {key}: {ow.filename}\n    from {ow.url}\n    to   {dest}" for key, ow, dest in missing)
        if offline() or not all(_reachable(ow.url) for _, ow, _ in missing):
            why = "AVEPIPE_OFFLINE=1" if offline() else "their host cannot be reached"
            out.append(Finding("error", "weights", f"{len(missing)} official weight file(s) missing and cannot be "
                                                   f"downloaded ({why}); download them and save them as:\n{lines}"))
        else:
            out.append(Finding("warning", "weights", f"{len(missing)} official weight file(s) will be downloaded by "
                                                     f"the first job that needs them:\n{lines}"))
    return out


# --------------------------------------------------------------------------- profile
def profile_dir(argv: Iterable[str], environ: dict | None = None) -> Path | None:
    """The profile folder of a snakemake command line (``--profile X`` / SNAKEMAKE_PROFILE)."""
    argv, env = list(argv), os.environ if environ is None else environ
    name = env.get("SNAKEMAKE_PROFILE")
    for i, a in enumerate(argv):
        if a == "--profile" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--profile="):
            name = a.split("=", 1)[1]
    if not name:
        return None
    for cand in (Path(name), Path.home() / ".config" / "snakemake" / name, Path("/etc/xdg/snakemake") / name):
        if cand.is_dir():
            return cand
    return None


def profile_findings(profile: Path | None, *, dry_run: bool, executor: str | None = None) -> list[Finding]:
    """Placeholders left in a profile: an error for a real cluster run, a warning in a dry run."""
    if profile is None:
        return []
    import yaml

    files = [p for p in (profile / "profile.yaml", profile / "config.yaml") if p.is_file()]
    if not files:
        return []
    prof = yaml.safe_load(files[0].read_text()) or {}
    executor = executor or prof.get("executor", "local")
    left = []

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif PLACEHOLDER in str(obj):
            left.append(f"{path} = {obj}")

    walk(prof, "")
    if not left:
        return [Finding("ok", "profile", f"{files[0]}: no placeholders")]
    level = "warning" if dry_run or executor in ("local", "dryrun") else "error"
    shown = "; ".join(left[:4]) + (f"; and {len(left) - 4} more" if len(left) > 4 else "")
    return [Finding(level, "profile", f"{files[0]}: {len(left)} placeholder(s) left, set your cluster's "
                                      f"values: {shown}")]


# --------------------------------------------------------------------------- all
NO_JOBS = {"-n", "--dry-run", "--dryrun", "--lint", "--report", "--summary", "-S", "--detailed-summary", "-D",
           "--list-rules", "-l", "--dag", "--rulegraph", "--filegraph", "--list-target-rules", "--lt"}


def runs_no_jobs(argv: Iterable[str]) -> bool:
    """A snakemake command line that plans or reports but runs no job (weights and profile
    problems are then warnings: the user is looking, not running)."""
    argv = list(argv)
    return bool(NO_JOBS & set(argv)) or any(a in ("--executor=dryrun",) for a in argv) or (
        "--executor" in argv and argv.index("--executor") + 1 < len(argv)
        and argv[argv.index("--executor") + 1] == "dryrun")
def run_checks(cfg: dict, *, profile: Path | None = None, dry_run: bool = False,
               executor: str | None = None) -> list[Finding]:
    """Every check; in a dry run, weights and profile errors are downgraded to warnings (a
    wrong data root stays an error: planning it is never useful)."""
    found = [*data_findings(cfg), *weights_findings(cfg),
             *profile_findings(profile, dry_run=dry_run, executor=executor)]
    if dry_run:
        for f in found:
            if f.check != "data" and f.level == "error":
                f.level = "warning"
    return found


def report(run: str, findings: list[Finding], *, verbose: bool = True) -> str:
    """The findings, one per line; ``verbose=False``: a single line when everything is ok."""
    if not verbose and all(f.level == "ok" for f in findings):
        return f"avepipe preflight, run {run!r}: " + ", ".join(f"{f.check} ok" for f in findings)
    mark = {"ok": "ok     ", "warning": "WARNING", "error": "ERROR  "}
    lines = [f"avepipe preflight, run {run!r}:"]
    for f in findings:
        first, *rest = f.message.splitlines()
        lines.append(f"  {mark[f.level]} {f.check}: {first}")
        lines += [f"          {x}" for x in rest]
    return "\n".join(lines)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]
