"""Provenance: fingerprints follow the stage's sources; records are JSON-able."""
from __future__ import annotations

import hashlib
import json

import pytest

from avepipe import provenance as prov


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "w.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert prov.sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_fingerprint_follows_imports(tmp_path, monkeypatch):
    """A stage's code is its entry module plus the avepipe modules it imports, transitively
    (lazy imports inside functions too); other modules do not count."""
    (tmp_path / "media.py").write_text("from avepipe.util import x\n")
    (tmp_path / "util.py").write_text("x = 1\n")
    (tmp_path / "decode.py").write_text("def f():\n    from avepipe import media\n")
    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path)
    assert prov.stage_files("decode") == ["decode.py", "media.py", "util.py"]
    f1 = prov.code_fingerprint("decode")
    assert f1 == prov.code_fingerprint("decode")  # deterministic
    for name, body in (("decode.py", "b = 3\nfrom avepipe import media\n"), ("util.py", "x = 2\n")):
        (tmp_path / name).write_text(body)
        f2 = prov.code_fingerprint("decode")
        assert f2 != f1
        f1 = f2
    (tmp_path / "train.py").write_text("c = 1\n")  # a module decode does not import
    assert prov.code_fingerprint("decode") == f1


def test_fingerprint_independent_reference(tmp_path, monkeypatch):
    (tmp_path / "media.py").write_text("m = 1")
    (tmp_path / "decode.py").write_text("import avepipe.media")
    monkeypatch.setattr(prov, "PACKAGE_DIR", tmp_path)
    h = hashlib.sha256()
    for rel, body in (("decode.py", b"import avepipe.media"), ("media.py", b"m = 1")):
        h.update(rel.encode() + b"\0" + body + b"\0")
    assert prov.code_fingerprint("decode") == h.hexdigest()


def test_stages_known_and_unknown():
    for stage in ("decode", "extract:vgg19", "extract:resnet50", "extract:vggish", "extract:cnn14",
                  "finetune", "heads:cace_net", "heads:dense", "summary", "extract:vgg19_ft"):
        assert len(prov.code_fingerprint(stage)) == 64
    assert "encoders/vgg19.py" in prov.stage_files("extract:vgg19")
    assert "encoders/resnet50.py" not in prov.stage_files("extract:vgg19")
    assert "heads/ccln.py" in prov.stage_files("heads:ccln")
    assert "training/finetune.py" in prov.stage_files("extract:resnet50_ft")
    assert "heads/cace_net.py" not in prov.stage_files("heads:ccln")
    with pytest.raises(KeyError, match="unknown stage"):
        prov.code_fingerprint("extract:nope")
    with pytest.raises(KeyError):
        prov.code_fingerprint("bogus")


@pytest.mark.parametrize("head", ["cace_net", "ccln", "event_memory", "avel", "audio_only", "visual_only"])
def test_head_fingerprint_covers_every_head_module_it_loads(head):
    """Importing a head (fresh interpreter) loads only avepipe.heads modules that are in its
    fingerprint, so editing a shared one (dropout.py, baselines.py) reruns that head."""
    import subprocess
    import sys

    from avepipe.heads import HEADS

    mod = HEADS[head].target.partition(":")[0]
    code = (f"import sys, importlib; importlib.import_module({mod!r}); "
            "print(' '.join(m for m in sys.modules if m.startswith('avepipe.heads.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    files = prov.stage_files(f"heads:{head}")
    assert loaded and {f"heads/{m.split('.')[-1]}.py" for m in loaded} <= set(files), (loaded, files)
    if head in ("cace_net", "event_memory"):
        assert "heads/dropout.py" in files
    if head == "ccln":
        assert "heads/baselines.py" in files
    if head == "avel":
        assert "heads/dropout.py" not in files


def test_provenance_record_is_json():
    rec = prov.provenance("decode", {"shards": 4}, encoder="vgg19", path=prov.PACKAGE_DIR)
    assert json.loads(json.dumps(rec)) == rec
    assert rec["stage"] == "decode" and rec["config"] == {"shards": 4} and rec["encoder"] == "vgg19"
    import torch
    assert rec["versions"]["torch"] == torch.__version__.split("+")[0] or rec["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert {"python", "torch", "torchvision", "zarr", "numpy", "av", "avepipe"} <= set(rec["versions"])
    assert rec["created"].endswith("+00:00")
    assert rec["code_fingerprint"] == prov.code_fingerprint("decode")
