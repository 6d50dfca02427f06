"""Running Snakemake from tests: always in a temporary working directory (`cwd`), with the
checkout's Snakefile, so no test reads or writes the checkout's `results/` or `.snakemake/`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "workflow" / "config" / "demo.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> tuple[int, str]:
    """Snakemake in ``cwd`` (one stream: the job-stats table and its heading go to different ones)."""
    r = subprocess.run([*SNAKEMAKE, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return r.returncode, r.stdout


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Like ``run``, not waited for (several dry runs side by side: each is mostly start-up)."""
    return subprocess.Popen([*SNAKEMAKE, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def dry_run(*args: str, cwd: Path) -> tuple[int, str]:
    return run("-n", "--cores", "2", "--quiet", "rules", *args, cwd=cwd, timeout=300)


def job_counts(text: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's job-stats table (empty when nothing is to be done)."""
    table = text.split("Job stats:", 1)[1] if "Job stats:" in text else text
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
            if m.group(1) != "total"}


def commands(out: str, sub: str) -> list[str]:
    """The `avepipe <sub>` shell commands of a `-n -p` plan (one per job)."""
    return sorted(set(re.findall(rf"^\s*(?:Shell command: )?(avepipe {sub} .*)$", out, re.M)))


def args_of(cmd: str) -> dict[str, object]:
    """Flags of one `avepipe ...` command as the shell would pass them: `--k=v` -> v,
    `--k a b` -> [a, b], a bare `--k` -> True; the redirection at the end is dropped."""
    import shlex

    words = shlex.split(cmd.split(" > ")[0])
    out: dict[str, object] = {}
    key = None
    for w in words[2:]:
        if w.startswith("--"):
            k, eq, v = w[2:].partition("=")
            key = None if eq else k
            out[k] = v if eq else True
        elif key is not None:
            out[key] = [*(out[key] if isinstance(out[key], list) else []), w]
    return out
