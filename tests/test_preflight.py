"""Preflight: a wrong data root, missing videos, missing or wrong official weights and profile
placeholders are reported before the first job, in one summary (by `avepipe check` and by
the Snakefile)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avepipe import preflight

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "ave"


def _ave_cfg(root: Path, **data) -> dict:
    cfg = yaml.safe_load((REPO / "workflow/config/ave.yaml").read_text())
    cfg["data"].update(root=str(root), **data)
    for enc in cfg["encoders"].values():
        enc["weights"] = "random"
    from avepipe.config import validate

    return validate(cfg)


@pytest.fixture(scope="module")
def ave_root(tmp_path_factory) -> Path:
    from avepipe.datasets.synthetic import make_ave

    root = tmp_path_factory.mktemp("ave") / "AVE_Dataset"
    make_ave(root, videos=8, seed=0, classes=2)
    return root


def test_data_ok_and_missing_share(ave_root, tmp_path):
    (f,) = preflight.data_findings(_ave_cfg(ave_root))
    assert f.level == "ok" and "8 of 8 annotated videos found" in f.message
    root = tmp_path / "root"
    shutil.copytree(ave_root, root)
    vids = sorted((root / "AVE").iterdir())
    vids[0].unlink()  # 1 of 8 missing: 12.5% > 5%
    (f,) = preflight.data_findings(_ave_cfg(root))
    assert f.level == "error" and "7 of 8" in f.message and str(root / "AVE") in f.message
    (f,) = preflight.data_findings(_ave_cfg(root, max_missing=0.2))
    assert f.level == "warning" and "1 missing (12.5%" in f.message


@pytest.mark.skipif(not SHARED.exists(), reason="../shared absent")
def test_real_annotations_without_videos_name_the_folder(tmp_path):
    root = tmp_path / "AVE_Dataset"
    root.mkdir()
    for name in ("Annotations.txt", "train_order.h5", "val_order.h5", "test_order.h5"):
        shutil.copy(SHARED / name, root / name)
    (f,) = [x for x in preflight.data_findings(_ave_cfg(root)) if x.level == "error"]
    assert "0 of 4097 annotated videos found in" in f.message and str(root / "AVE") in f.message


def test_wrong_root_is_an_error(tmp_path):
    (f,) = preflight.data_findings(_ave_cfg(tmp_path / "nowhere"))
    assert f.level == "error" and "no such folder" in f.message


def test_missing_weights_listed_in_one_message(tmp_path, monkeypatch, ave_root):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("AVEPIPE_OFFLINE", "1")
    cfg = _ave_cfg(ave_root)
    for enc in cfg["encoders"].values():
        enc["weights"] = None  # the official default
    found = preflight.weights_findings(cfg)
    (err,) = [f for f in found if f.level == "error"]
    for name in ("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet50-11ad3fa6.pth", "vggish-10086976.pth", "Cnn14_mAP=0.431.pth"):
        assert name in err.message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in err.message and "https://" in err.message
    # a file under an official name that is not the official file: refused, naming expected and found
    ck = tmp_path / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "vggish-10086976.pth").write_bytes(b"not the release")
    found = preflight.weights_findings(cfg)
    assert any(f.level == "error" and "vggish-10086976.pth" in f.message and "expected" in f.message for f in found)
    # VGGish with the released PCA: its PCA file is listed too, unless a file of one's own is named
    (ck / "vggish-10086976.pth").unlink()
    cfg["encoders"]["vggish"]["pca"] = True
    (err,) = [f for f in preflight.weights_findings(cfg) if f.level == "error"]
    assert "vggish_pca_params-970ea276.pth" in err.message and "encoders.vggish" in err.message
    cfg["encoders"]["vggish"]["pca_params"] = str(tmp_path / "my_pca.pth")
    (err,) = [f for f in preflight.weights_findings(cfg) if f.level == "error"]
    assert "vggish_pca_params" not in err.message
    # dry runs are told, not stopped
    found = preflight.run_checks(cfg, dry_run=True)
    assert not preflight.errors(found) and any(f.level == "warning" and f.check == "weights" for f in found)


def test_profile_placeholders():
    prof = REPO / "workflow" / "profiles" / "slurm"
    (f,) = preflight.profile_findings(prof, dry_run=False)
    assert f.level == "error" and "CHANGE_ME" in f.message and "slurm_partition" in f.message
    (f,) = preflight.profile_findings(prof, dry_run=True)
    assert f.level == "warning"
    assert preflight.profile_findings(REPO / "workflow" / "profiles" / "local", dry_run=False)[0].level == "ok"
    assert preflight.profile_dir(["snakemake", "--profile", str(prof)]) == prof
    assert preflight.runs_no_jobs(["snakemake", "-n"]) and not preflight.runs_no_jobs(["snakemake", "--cores", "2"])


def test_check_command_and_snakemake_stop_before_any_job(tmp_path, ave_root):
    root = tmp_path / "root"
    shutil.copytree(ave_root, root)
    shutil.rmtree(root / "AVE")  # the classic mistake: data.root one level off
    cfg = _ave_cfg(root)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "avepipe", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 1 and "ERROR   data" in r.stdout and str(root / "AVE") in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
                        "--configfile", str(path), "--until", "decode"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ})
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "preflight" in out and str(root / "AVE") in out, out[-3000:]
    assert not (tmp_path / "results").exists()  # nothing ran
