"""`avepipe status`: done/total per stage from Snakemake's own summary, failed jobs named by
their log, videos that failed to decode, and an ETA from finished jobs' benchmark files."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_status_of_a_partial_run(tmp_path):
    cfg = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())
    cfg.update(run="st", also=[])
    cfg["data"].update(root="results/st/data", synthetic={"videos": 3, "classes": 2, "seed": 0})
    cfg["decode"]["shards"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                        "results/st/index.parquet", "--cores", "1", "--configfile", str(path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # one decode shard "failed" (its log ends in a traceback), the other has a benchmark of 120 s
    logs = tmp_path / "results/st/logs/decode"
    logs.mkdir(parents=True)
    (logs / "shard-001.log").write_text("Traceback (most recent call last):\n  ...\nMediaError: boom\n")
    bench = tmp_path / "results/st/benchmarks/decode"
    bench.mkdir(parents=True)
    (bench / "shard-000.tsv").write_text("s\th:m:s\tmax_rss\n120.0\t0:02:00\t100\n")

    r = subprocess.run([sys.executable, "-m", "avepipe", "status", "--configfile", str(path), "--cores", "2",
                        "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(r.stdout)["st"]
    assert st["rules"]["synth"] == {"done": 1, "total": 1, "failed": []}
    assert st["rules"]["index"]["done"] == 1
    assert st["rules"]["decode"]["done"] == 0 and st["rules"]["decode"]["total"] == 2
    assert st["rules"]["decode"]["failed"] == ["results/st/logs/decode/shard-001.log"]
    # ETA: 2 decode jobs left x 120 s / 2 cores = 120 s from the timed rule (others: no timing yet)
    assert abs(st["eta_s"] - 120.0) < 1e-6, st["eta_basis"]
    assert any("no timing yet" in b for b in st["eta_basis"])
    text = subprocess.run([sys.executable, "-m", "avepipe", "status", "results/st", "--configfile", str(path),
                           "--cores", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600).stdout
    assert "decode" in text and "0/2" in text and "FAILED: results/st/logs/decode/shard-001.log" in text, text
