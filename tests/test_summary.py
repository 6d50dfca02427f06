"""The heads' summary: tables per setting with the published reference numbers, variants as
their own rows, and every plot the HTML report shows (per-class bars from AVE's list layout)."""
import json
from pathlib import Path

from avepipe.summary import PUBLISHED, load_records, summarize


def _run(root: Path, head: str, feats: str, setting: str, seed: int, acc: float, **extra) -> Path:
    d = root / "heads" / head / feats / setting / f"seed{seed}"
    d.mkdir(parents=True)
    m = {"head": head.partition("@")[0], "setting": setting, "seed": seed, "accuracy": acc, "select_on": "val",
         "n_test": 40, "per_class_accuracy": [0.5] * 28 + [0.9], "confusion_matrix": [[1, 0], [0, 1]], **extra}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0 / e, "val_acc": 0.1 * e}) + "\n"
                                         for e in (1, 2, 3)))
    return d / "metrics.json"


def test_summary_tables_variants_published_and_plots(tmp_path):
    paths = [_run(tmp_path, "ccln", "vgg19+vggish", "full", s, a) for s, a in ((0, 0.8), (1, 0.9))]
    paths.append(_run(tmp_path, "ccln@lam1", "vgg19+vggish", "full", 0, 0.7))
    dense = tmp_path / "heads" / "dense" / "resnet50+vggish" / "full" / "seed0"
    dense.mkdir(parents=True)
    (dense / "metrics.json").write_text(json.dumps({"average_mAP": 0.5, **{f"mAP@{t / 10:.1f}": 0.5 for t in
                                                                           range(1, 10)},
                                                    "per_class_ap": {"dog": 0.4, "cat": 0.6}}))
    for png in ("ap.png", "pr_curve.png"):
        (dense / png).write_bytes(b"\x89PNG fake")
    paths.append(dense / "metrics.json")
    recs = summarize("r", paths, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    # mean ± std over the two seeds, by hand: 85.00 ± 7.07
    assert "| ccln | vgg19+vggish | 2 | 85.00 ± 7.07 | 79.9 (CCLN Tab. I) |" in md, md
    # the variant is its own row, without the paper's number (another recipe)
    assert "| ccln@lam1 | vgg19+vggish | 1 | 70.00 | – |" in md, md
    assert f"{PUBLISHED[('dense', 'resnet50+vggish', 'full')][0]:.1f}" in md
    assert {r["variant"] for r in recs} == {None, "lam1"}
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert "per_class_ccln_vgg19-vggish_full_seed0.png" in plots          # AVE: a list of 29 values
    assert "per_class_ccln-lam1_vgg19-vggish_full_seed0.png" in plots
    assert "per_class_dense_resnet50-vggish_full_seed0.png" in plots       # UnAV: a dict of classes
    assert {"ap_dense_resnet50-vggish_full_seed0.png", "pr_curve_dense_resnet50-vggish_full_seed0.png",
            "learning_curves.png", "confusion_ccln_vgg19-vggish_full_seed0.png"} <= plots
    assert len(load_records(paths)) == 4


def test_section_header_names_how_the_epoch_was_chosen(tmp_path):
    # A fixed-epoch run (the demo's `select_on: last`) was headed "model selected on val".
    for select_on, label in (("last", "last epoch, no model selection"), ("val", "model selected on val"),
                             ("test", "published protocol: model selected on TEST")):
        root = tmp_path / select_on
        summarize("r", [_run(root, "avel", "vgg19+vggish", "full", 0, 0.8, select_on=select_on)], root)
        md = (root / "summary.md").read_text()
        assert f"## AVE, setting `full` ({label})" in md, md
