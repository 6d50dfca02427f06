"""A real SLURM run of the `workflow/profiles/slurm` profile on a single-node cluster.

`tests/ops/slurm_up.sh` installs Debian's slurm-wlm + munge and starts slurmctld/slurmd on
localhost (accounting off, one fake GPU). The test runs a small target of a tiny synthetic
config twice, locally (`workflow/profiles/local`) and through SLURM (the repo's slurm profile
with the test's partition/account/capacity overrides), then checks that every job went
through SLURM with the profile's resources and that the deterministic outputs are identical.

Needs root (it installs packages and writes /etc/slurm); skips otherwise, or when apt or
the network is missing. Set AVEPIPE_SLURM_TEST=0 to skip it. Takes ~5-7 min on 2 cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLURM_UP = REPO / "tests" / "ops" / "slurm_up.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
DEMO = REPO / "workflow" / "config" / "demo.yaml"
PARTITION = "avepipe_test"
N_SHARDS = 2
ENCODER = "vggish"  # the cheapest encoder: one GPU-rule job (extract) goes through SLURM too


def _cluster_up() -> dict[str, str]:
    """Run slurm_up.sh; skip when this machine cannot host SLURM, fail when bring-up breaks."""
    if os.environ.get("AVEPIPE_SLURM_TEST", "1") == "0":
        pytest.skip("AVEPIPE_SLURM_TEST=0")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to install and start SLURM")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get and no SLURM installed")
    env = dict(os.environ, SLURM_UP_PARTITION=PARTITION, SLURM_UP_GPUS="1")
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SLURM_UP)], env=env, capture_output=True, text=True, timeout=900)
    if p.returncode == 2:
        pytest.skip(f"slurm_up.sh cannot run here: {p.stderr.strip().splitlines()[-1:]}")
    assert p.returncode == 0, f"slurm_up.sh failed ({p.returncode}):\n{p.stderr[-4000:]}"
    info = dict(kv.split("=", 1) for kv in p.stdout.strip().splitlines()[-1].split())
    info["seconds"] = f"{time.monotonic() - t0:.1f}"
    return info


def _slurm_plugin() -> None:
    """The `[slurm]` extra, installed into this interpreter when missing (fresh CI clones)."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        p = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "snakemake-executor-plugin-slurm>=1.0"],
            capture_output=True, text=True,
        )
        if p.returncode != 0:
            pytest.skip(f"cannot install snakemake-executor-plugin-slurm: {p.stderr[-500:]}")
        importlib.invalidate_caches()


def test_profile_value_caps_keep_gpu_request():
    """The test profile only lowers capacity to what the node has; it keeps every gpu request."""
    src = yaml.safe_load(PROFILE.read_text())
    out = _test_profile(src, partition="p", cpus=2, mem_mb=10000, logdir=Path("/x"))
    for rule, res in src["set-resources"].items():
        assert out["set-resources"][rule].get("gpu") == res.get("gpu")
        assert out["set-resources"][rule]["cpus_per_task"] == min(res["cpus_per_task"], 2)
        assert out["set-resources"][rule]["mem_mb"] == min(res["mem_mb"], 10000)
        assert "slurm_account" not in out["set-resources"][rule]
    assert "CHANGE_ME" not in yaml.safe_dump(out)


def _test_profile(src: dict, partition: str, cpus: int, mem_mb: int, logdir: Path) -> dict:
    """The repo's slurm profile with the test cluster's partition, no account, capacities
    capped to the node and squeue status polling (accounting is off)."""
    prof = json.loads(json.dumps(src))

    def fix(res: dict) -> None:
        if "slurm_partition" in res:
            res["slurm_partition"] = partition
        res.pop("slurm_account", None)
        if "cpus_per_task" in res:
            res["cpus_per_task"] = min(int(res["cpus_per_task"]), cpus)
        if "mem_mb" in res:
            res["mem_mb"] = min(int(res["mem_mb"]), mem_mb)

    fix(prof.setdefault("default-resources", {}))
    for res in prof.get("set-resources", {}).values():
        fix(res)
    prof["set-threads"] = {r: min(int(n), cpus) for r, n in prof.get("set-threads", {}).items()}
    prof.update({
        "slurm-no-account": True,
        "slurm-status-command": "squeue",  # sacct has no database here
        "slurm-init-seconds-before-status-checks": 5,
        "slurm-keep-successful-logs": True,
        "slurm-logdir": str(logdir),
        "retries": 0,
        "latency-wait": 10,
    })
    return prof


def _snakemake(args: list[str], log: Path, cwd: Path) -> float:
    t0 = time.monotonic()
    with open(log, "w") as fh:
        p = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args],
                           cwd=cwd, stdout=fh,
                           stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    assert p.returncode == 0, f"snakemake {' '.join(args)} failed:\n{text[-6000:]}"
    return time.monotonic() - t0


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _mb(v: str) -> int:
    """scontrol's memory (`8000M`, `16G`) in MB."""
    n, unit = re.fullmatch(r"(\d+)([MGT]?)", v).groups()
    return int(n) * {"": 1, "M": 1, "G": 1024, "T": 1024**2}[unit]


def _scontrol(jobid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True,
                         check=True).stdout
    return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", out))


def _assert_same_zarr(a: Path, b: Path) -> None:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys()), a.name
    for k in ga.array_keys():
        x, y = ga[k][...], gb[k][...]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{a}:{k}"
        if x.dtype.kind in "fiub":
            assert x.tobytes() == y.tobytes(), f"{a}:{k} differs between local and SLURM runs"
        else:
            assert x.tolist() == y.tolist(), f"{a}:{k} differs between local and SLURM runs"
    # provenance carries timestamps; everything else must match
    for key in set(ga.attrs) - {"provenance"}:
        assert ga.attrs[key] == gb.attrs[key], f"{a} attrs[{key}]"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")
def test_slurm_profile_runs_pipeline_like_local(tmp_path):
    t_start = time.monotonic()
    info = _cluster_up()
    _slurm_plugin()
    cpus = min(int(info["cpus"]), 2)  # same thread counts locally and on SLURM
    mem_mb = int(info["mem_mb"])

    run = f"opstest_{uuid.uuid4().hex[:8]}"
    cfg = yaml.safe_load(DEMO.read_text())
    cfg.pop("also", None)
    cfg["run"] = run
    cfg["data"]["root"] = f"results/{run}/data"
    cfg["data"]["synthetic"] = {"videos": 4, "classes": 2, "seed": 0, "min_duration": 10, "max_duration": 11}
    cfg["decode"]["shards"] = N_SHARDS
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # decode_report is the natural early target but its CLI is still in flux: the shards,
    # the index and one GPU-rule job (extract) exercise the same profile settings.
    shards = [f"results/{run}/decoded/shard-{i:03d}.zarr" for i in range(N_SHARDS)]
    targets = [*shards, f"results/{run}/features/{ENCODER}/shard-000.zarr"]

    logdir = tmp_path / "slurm_logs"
    prof_dir = tmp_path / "profile"
    prof_dir.mkdir()
    prof = _test_profile(yaml.safe_load(PROFILE.read_text()), PARTITION, cpus, mem_mb, logdir)
    (prof_dir / "config.yaml").write_text(yaml.safe_dump(prof))

    work = tmp_path / "work"  # the working directory of both runs (never the checkout's results/)
    work.mkdir()
    results = work / "results" / run
    local = tmp_path / "local"
    try:
        # the profile's set-threads locally too: thread counts change float reduction order
        threads = [f"{r}={n}" for r, n in prof["set-threads"].items()]
        t_local = _snakemake([*targets, "--profile", str(REPO / "workflow/profiles/local"), "--cores", str(cpus),
                              "--set-threads", *threads, "--configfile", str(cfg_path)], tmp_path / "local.log",
                             work)
        shutil.move(str(results), local)
        t_slurm = _snakemake([*targets, "--profile", str(prof_dir), "--configfile", str(cfg_path)],
                             tmp_path / "slurm.log", work)

        # --- every job went through SLURM, with the profile's resources --------------------
        text = (tmp_path / "slurm.log").read_text()
        submitted = re.findall(r"submitted with SLURM jobid (\d+)", text)
        jobs = {}  # SLURM job id -> rule, from the plugin's per-job logs
        for f in logdir.rglob("*.log"):
            jobs[f.stem] = f.relative_to(logdir).parts[0].removeprefix("rule_")
            body = f.read_text()
            assert "--executor slurm-jobstep" in body, f"{f} was not run by the jobstep executor"
        assert sorted(jobs) == sorted(submitted), (jobs, submitted)
        assert sorted(jobs.values()) == sorted(["synth", "index", *["decode"] * N_SHARDS, "extract"])

        sets = prof["set-resources"]
        for jobid, rule in jobs.items():
            sc = _scontrol(jobid)
            want = {**prof["default-resources"], **sets.get(rule, {})}
            assert sc["JobState"] == "COMPLETED", (rule, sc["JobState"])
            assert sc["Partition"] == PARTITION
            assert sc["NodeList"] == info["node"]
            assert _mb(sc["MinMemoryNode"]) == int(want["mem_mb"]), (rule, sc["MinMemoryNode"])
            h, m = divmod(int(want["runtime"]), 60)
            assert sc["TimeLimit"] == f"{h:02d}:{m:02d}:00", (rule, sc["TimeLimit"])
            assert int(sc["NumCPUs"]) == int(want["cpus_per_task"]), (rule, sc["NumCPUs"])
            tres = sc.get("TresPerJob", "")
            if want.get("gpu"):
                assert re.search(r"gpu:1$", tres), (rule, tres)
            else:
                assert "gpu" not in tres and "gpu" not in sc.get("TresPerNode", ""), (rule, tres)

        # --- the same bytes as the local run -----------------------------------------------
        for name in ("index.parquet", "index_problems.json"):
            assert _sha(local / name) == _sha(results / name), name
        data = sorted(p.relative_to(local / "data") for p in (local / "data").rglob("*") if p.is_file())
        assert data, "no synthetic data"
        for rel in data:
            assert _sha(local / "data" / rel) == _sha(results / "data" / rel), rel
        for t in targets:
            rel = Path(t).relative_to(f"results/{run}")
            _assert_same_zarr(local / rel, results / rel)
    finally:
        shutil.rmtree(results, ignore_errors=True)

    timings = {"slurm_up_s": float(info["seconds"]), "local_run_s": round(t_local, 1),
               "slurm_run_s": round(t_slurm, 1), "total_s": round(time.monotonic() - t_start, 1)}
    print("slurm test timings:", json.dumps(timings))
