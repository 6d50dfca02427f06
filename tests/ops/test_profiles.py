"""The execution profiles, checked on Snakemake's own dry run of the demo DAG (no scheduler).

`snakemake -n --forceall` prints every job with the resources Snakemake resolved for it
(rule defaults, then the profile's default-resources/set-resources). GPU rules must ask for
one GPU with their memory/runtime; CPU rules must not ask for a GPU. The SLURM profile is
dry-run with the `dryrun` executor, so the SLURM plugin need not be installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "workflow" / "profiles"
GPU_RULES = {"extract", "finetune", "train"}
CPU_RULES = {"synth", "index", "decode", "decode_report", "store_summary", "summary"}
CORES = 64  # above every set-threads value, so the dry run shows each rule's threads uncapped


def parse_dry_run(text: str) -> list[tuple[str, dict[str, str], int]]:
    """(rule, resources, threads) per job of `snakemake -n` output."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", "\n" + text):
        m = re.match(r"(?:local)?rule (\w+):\n", block)
        if not m:
            continue
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        thr = re.search(r"^\s+threads: (\d+)$", block, re.M)
        pairs = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
        jobs.append((m.group(1), pairs, int(thr.group(1)) if thr else 1))
    return jobs


def _start_dry_run(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "--forceall",
         "--cores", str(CORES), *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, list[tuple[str, dict[str, str], int]]]:
    """Both profiles' dry runs, started together (each is mostly start-up time), each in its
    own working directory (never the checkout's results/)."""
    procs = {
        "slurm": _start_dry_run(tmp_path_factory.mktemp("slurm"), "--profile", str(PROFILES / "slurm"),
                                "--executor", "dryrun"),
        "local": _start_dry_run(tmp_path_factory.mktemp("local"), "--profile", str(PROFILES / "local")),
    }
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"dry run with the {name} profile failed:\n{text[-4000:]}"
        out[name] = parse_dry_run(text)
        assert out[name], f"no jobs parsed from the {name} dry run"
    return out


@pytest.fixture(scope="module")
def slurm_jobs(dry_runs):
    return dry_runs["slurm"]


@pytest.fixture(scope="module")
def local_jobs(dry_runs):
    return dry_runs["local"]


def test_parse_dry_run_reads_resources_and_threads():
    text = (
        "[Mon]\nrule extract:\n    jobid: 3\n    threads: 8\n"
        "    resources: tmpdir=/tmp, mem_mb=16000, gpu=1\nShell command: x\n\n"
        "[Mon]\nlocalrule all:\n    jobid: 0\n"
    )
    assert parse_dry_run(text) == [
        ("extract", {"tmpdir": "/tmp", "mem_mb": "16000", "gpu": "1"}, 8),
        ("all", {}, 1),
    ]


def test_slurm_profile_resources_per_rule(slurm_jobs):
    prof = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    default, per_rule = prof["default-resources"], prof["set-resources"]
    assert GPU_RULES <= set(per_rule), "every GPU rule needs its own SLURM resources"
    seen = {r for r, _, _ in slurm_jobs}
    assert GPU_RULES | CPU_RULES <= seen, f"demo DAG lacks rules: {(GPU_RULES | CPU_RULES) - seen}"
    for rule, res, threads in slurm_jobs:
        if rule == "all":
            continue
        want = {**default, **per_rule.get(rule, {})}
        for key in ("mem_mb", "runtime", "cpus_per_task", "slurm_partition", "slurm_account"):
            assert res.get(key) == str(want[key]), (rule, key, res.get(key), want[key])
        if rule in GPU_RULES:
            assert res.get("gpu") == "1", (rule, res)
            # the job may use every CPU it asks SLURM for, and no more
            assert threads == int(want["cpus_per_task"]), (rule, threads)
        else:
            assert "gpu" not in res and "gres" not in res, (rule, res)
        # the plugin builds --gpus itself; hand-written --gres/--gpus would clash (docs/reference.md §10)
        assert not re.search(r"--(gres|gpus|mem|time)", res.get("slurm_extra", "")), rule


def test_slurm_profile_keeps_cluster_placeholders():
    """The shipped profile names no real cluster: users must set partition/account."""
    prof = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert prof["executor"] == "slurm"
    assert prof["default-resources"]["slurm_partition"].startswith("CHANGE_ME")
    assert prof["default-resources"]["slurm_account"].startswith("CHANGE_ME")
    for rule in GPU_RULES:
        assert prof["set-resources"][rule]["slurm_partition"].startswith("CHANGE_ME")


def test_local_profile_gpu_rules(local_jobs):
    prof = yaml.safe_load((PROFILES / "local" / "config.yaml").read_text())
    # the local cap: one GPU, so GPU jobs run one at a time
    assert "gpu=1" in prof["resources"]
    for rule, res, _ in local_jobs:
        if rule in GPU_RULES:
            assert res.get("gpu") == "1", (rule, res)
            assert int(res["mem_mb"]) >= 1000 and int(res["runtime"]) >= 1, (rule, res)
        elif rule != "all":
            assert "gpu" not in res, (rule, res)
    decode = [res for rule, res, _ in local_jobs if rule == "decode"]
    assert decode and all("mem_mb" in r and "runtime" in r for r in decode)


def test_profiles_agree_on_gpu_rules(slurm_jobs, local_jobs):
    def gpu_rules(jobs):
        return {rule for rule, res, _ in jobs if res.get("gpu")}

    assert gpu_rules(slurm_jobs) == gpu_rules(local_jobs) == GPU_RULES
