"""Provenance records: which code, packages and config produced a stage's output.

Every stage writes ``provenance(stage, config)`` into its outputs' attrs so that a
store can be traced back to the exact source files (``code_fingerprint``) and
package versions that made it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent

_ENCODER_FILES = ["encoders/__init__.py", "encoders/weights.py"]
_EXTRACT_FILES = ["extract.py", "store.py", "media.py", "provenance.py", "devices.py", *_ENCODER_FILES]

# Source files (relative to the package) each stage's output depends on. Editing any of
# them changes the fingerprint, so stale outputs are recognisable.
STAGE_MODULES: dict[str, list[str]] = {
    "decode": ["media.py", "decode.py"],
    "extract:vgg19": [*_EXTRACT_FILES, "encoders/vgg19.py"],
    "extract:resnet50": [*_EXTRACT_FILES, "encoders/resnet50.py"],
    "extract:vggish": [*_EXTRACT_FILES, "encoders/vggish.py"],
    "extract:cnn14": [*_EXTRACT_FILES, "encoders/cnn14.py"],
    "import_h5": ["interop.py", "store.py", "provenance.py"],
    "export_h5": ["interop.py", "store.py", "datasets/labels.py"],
    "finetune": ["finetune.py", "finetune_data.py", "extract.py", "store.py", "devices.py", *_ENCODER_FILES],
    "train": ["train.py", "store.py", "devices.py", "datasets/labels.py"],
    "evaluate": ["metrics.py", "train.py"],
    "unav": ["datasets/unav100.py", "heads/dense.py", "metrics.py", "train.py"],
    # workflow-level stages (the Snakemake rules' code params)
    "synth": ["datasets/synthetic.py", "datasets/writer.py", "datasets/ave.py", "datasets/unav100.py"],
    "index": ["datasets/index.py", "datasets/ave.py", "datasets/unav100.py", "datasets/labels.py"],
    "decode_report": ["decode.py", "report.py"],
    "store": ["store.py"],
    "report": ["summary.py"],
}
# heads that share one module file
_HEAD_FILES = {"avel": "baselines", "audio_only": "baselines", "visual_only": "baselines"}
# heads:<name> -> the head's own module plus the shared training loop.
_HEAD_COMMON = ["heads/__init__.py", "train.py", "store.py", "devices.py"]

_VERSION_PACKAGES = ("torch", "torchvision", "torchaudio", "av", "zarr", "numpy")


def _head_modules(rel: str) -> list[str]:
    """``rel`` and the sibling head modules it imports, transitively (``from . import x``,
    ``from .x import``, ``from avepipe.heads.x import``): editing a shared piece such as
    ``heads/dropout.py`` reruns exactly the heads that use it."""
    import ast

    out, todo = [], [rel]
    while todo:
        cur = todo.pop()
        if cur in out or not (PACKAGE_DIR / cur).is_file():
            continue
        out.append(cur)
        for node in ast.walk(ast.parse((PACKAGE_DIR / cur).read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = node.module or ""
            if node.level == 1 or mod.startswith("avepipe.heads"):
                base = mod.removeprefix("avepipe.heads").lstrip(".")
                names = [base] if base else [a.name for a in node.names]
                todo += [f"heads/{n.split('.')[0]}.py" for n in names]
    return out


def stage_files(stage: str) -> list[str]:
    """Package-relative source files of ``stage``; raises ``KeyError`` for unknown stages."""
    if stage in STAGE_MODULES:
        return list(STAGE_MODULES[stage])
    if stage.startswith("heads:") and stage[len("heads:"):]:
        name = stage[len("heads:"):]
        if name == "dense":
            return [*_HEAD_COMMON, "heads/dense.py", "dense_train.py", "metrics.py"]
        return [*_HEAD_COMMON, *_head_modules(f"heads/{_HEAD_FILES.get(name, name)}.py")]
    if stage.startswith("extract:") and stage.endswith("_ft"):
        # A fine-tuned encoder runs the same code as its base plus finetune.py.
        return [*stage_files(stage[: -len("_ft")]), "finetune.py"]
    if stage.startswith("extract:") and (PACKAGE_DIR / "encoders" / f"{stage[8:]}.py").is_file():
        # an encoder added later as one file in avepipe/encoders/ needs no edit here
        return [*_EXTRACT_FILES, f"encoders/{stage[8:]}.py"]
    known = ", ".join(sorted(STAGE_MODULES)) + ", heads:<name>"
    raise KeyError(f"unknown stage {stage!r}; known: {known}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights files can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


SALT_ENV = "AVEPIPE_FINGERPRINT_SALT"


def fingerprint_salts(value: str | None = None) -> dict[str, str]:
    """Parse ``AVEPIPE_FINGERPRINT_SALT`` (``"stage=salt[,stage=salt...]"``, e.g. ``"heads:avel=1"``).

    A salt stands in for an edit of that stage's code: the workflow tests use it to check
    that a code change reruns exactly that stage and its descendants, without editing
    (or copying) the package. Unset or empty: no salts.
    """
    value = os.environ.get(SALT_ENV, "") if value is None else value
    salts: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        stage, sep, salt = item.partition("=")
        if not sep or not stage.strip():
            raise ValueError(f"{SALT_ENV}: {item!r} is not stage=salt (e.g. heads:avel=1)")
        salts[stage.strip()] = salt.strip()
    return salts


def code_fingerprint(stage: str) -> str:
    """sha256 over (relative path, content) of the stage's source files.

    A file that does not exist (yet) contributes its name and a marker, so the
    fingerprint is defined but changes once the file appears. A salt for ``stage`` in
    ``AVEPIPE_FINGERPRINT_SALT`` (see ``fingerprint_salts``) is hashed in too.
    """
    h = hashlib.sha256()
    for rel in sorted(set(stage_files(stage))):
        p = PACKAGE_DIR / rel
        h.update(rel.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
        h.update(b"\0")
    salt = fingerprint_salts().get(stage)
    if salt is not None:
        h.update(b"salt\0" + salt.encode())
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of python, the numeric/media packages and avepipe (None if absent)."""
    from avepipe import __version__

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        out[name] = _version(name)
    out["avepipe"] = __version__
    return out


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON (stringifying Paths, numpy scalars...) so attrs never fail."""
    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def provenance(stage: str, config: dict | None = None, **extra: Any) -> dict:
    """JSON-able record: stage, config, versions, code fingerprint, host, created (UTC ISO).

    ``extra`` keys (encoder, weights, ...) are added at the top level.
    """
    rec = {
        "stage": stage,
        "config": config or {},
        "versions": versions(),
        "code_fingerprint": code_fingerprint(stage),
        "host": socket.gethostname(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rec.update(extra)
    return _jsonable(rec)
