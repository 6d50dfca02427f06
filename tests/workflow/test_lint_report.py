"""`snakemake --lint` is clean; the HTML report of a run holds every stage's results with
captions; the `avepipe` command of the rules works with the host interpreter and with
`--software-deployment-method conda` (the env's `python`, this checkout on PYTHONPATH)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .smk import REPO, SNAKEMAKE
from .test_reruns import snakemake, tiny_run

RULES_CALLING_AVEPIPE = {"synth", "index", "decode", "decode_report", "frames", "extract", "store_summary",
                         "finetune", "finetune_both", "train", "summary"}


def test_lint_is_clean(tmp_path):
    r = subprocess.run([*SNAKEMAKE, "--lint"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Lints for" not in out and "Congratulations" in out, out[-6000:]


def _report_data(html: str, var: str) -> dict:
    m = re.search(rf"^\s*var {var} = (\{{.*\}});\s*$", html, re.M)
    assert m, f"no `var {var}` in the report"
    return json.loads(m.group(1))


@pytest.mark.slow
def test_report_has_every_stage_with_captions(request, tmp_path):
    tiny = tiny_run(request)
    run, res = tiny["run"], tiny["results"]
    out = res / "report.html"
    rc, log = snakemake("--report", str(out.relative_to(tiny["dir"])), tiny=tiny)
    assert rc == 0, log[-4000:]
    html = out.read_text()
    results, categories = _report_data(html, "results"), _report_data(html, "categories")

    assert sorted(categories) == ["1. Decode", "2. Features", "3. Fine-tuning", "4. Heads"]
    assert sorted(categories["2. Features"]) == ["resnet50", "resnet50_ft", "vggish"]
    r = f"results/{run}"
    want = [f"{r}/decode_report.md", f"{r}/decode_report.json", f"{r}/decode_report.png",
            *(f"{r}/features/{e}/summary.json" for e in ("resnet50", "resnet50_ft", "vggish")),
            f"{r}/finetune/resnet50/loss.png", f"{r}/finetune/resnet50/provenance.json",
            f"{r}/summary.md", f"{r}/plots/learning_curves.png",
            f"{r}/plots/per_class_avel_resnet50_ft-vggish_full_seed0.png",
            f"{r}/plots/learning_curve_avel_resnet50_ft-vggish_full_seed0.png",
            f"{r}/heads/avel/resnet50_ft+vggish/full/seed0/metrics.json"]
    missing = [p for p in want if p not in results]
    assert not missing, (missing, sorted(results))
    for path, item in results.items():
        assert len(re.sub("<[^>]+>", "", item["caption"]).strip()) > 40, f"{path}: no caption"
    # captions are rendered per item (wildcards filled in)
    assert "resnet50_ft" in results[f"{r}/features/resnet50_ft/summary.json"]["caption"]
    assert "InfoNCE" in results[f"{r}/finetune/resnet50/loss.png"]["caption"]
    assert "tIoU" in results[f"{r}/heads/avel/resnet50_ft+vggish/full/seed0/metrics.json"]["caption"]
    # the heads' table itself is in the report (embedded as data URI)
    assert results[f"{r}/summary.md"]["mime_type"] in ("text/markdown", "text/plain"), results[f"{r}/summary.md"]


_PREFIX = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DeploymentMethod, DeploymentSettings, OutputSettings,
                                      ResourceSettings)
from snakemake.shell import shell

methods = frozenset([DeploymentMethod[m.upper()] for m in sys.argv[2:]])
with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(snakefile=Path(sys.argv[1]), resource_settings=ResourceSettings(cores=1),
                      config_settings=ConfigSettings(),
                      deployment_settings=DeploymentSettings(deployment_method=methods))
    w = wf._workflow  # parses the Snakefile
    envs = {r.name: r.conda_env for r in w.rules if r.shellcmd and "avepipe " in r.shellcmd}
    basedirs = {r.name: str(Path(r.snakefile).parent) for r in w.rules}
    print("@@" + json.dumps({"prefix": shell._process_prefix, "envs": envs, "basedirs": basedirs}))
"""


def _parsed(tmp_path: Path, *methods: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _PREFIX, str(REPO / "Snakefile"), *methods], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(r.stdout.split("@@", 1)[1])


def _run_prefix(prefix: str, tmp_path: Path, path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # Snakemake drops it for conda jobs
    env["PATH"] = path
    return subprocess.run(["bash", "-c", prefix + " avepipe --help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_rules_run_avepipe_from_the_host_interpreter(tmp_path):
    p = _parsed(tmp_path)
    assert sys.executable in p["prefix"] and "PYTHONPATH" not in p["prefix"]
    assert set(p["envs"]) == RULES_CALLING_AVEPIPE  # every rule calls `avepipe`, none the interpreter
    r = _run_prefix(p["prefix"], tmp_path, "/usr/bin:/bin")  # no venv on PATH: still found
    assert r.returncode == 0 and "usage: avepipe" in r.stdout, r.stdout + r.stderr


def test_conda_deployment_runs_avepipe_from_the_env_python(tmp_path):
    p = _parsed(tmp_path, "conda")
    assert sys.executable not in p["prefix"]
    assert f"PYTHONPATH={REPO}" in p["prefix"] and "python -m avepipe" in p["prefix"]
    # every rule has an env file that exists: GPU rules the CUDA env, the others the CPU env
    for rule, env in p["envs"].items():
        env_file = (Path(p["basedirs"][rule]) / env).resolve()
        assert env_file.is_file(), (rule, env)
        gpu = rule in {"extract", "finetune", "finetune_both", "train"}
        assert env_file == REPO / "envs" / ("cuda.yaml" if gpu else "cpu.yaml"), (rule, env_file)
    # the env's `python` (here a stand-in first on PATH) runs this checkout
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    r = _run_prefix(p["prefix"], tmp_path, f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert r.returncode == 0 and "usage: avepipe" in r.stdout, r.stdout + r.stderr
