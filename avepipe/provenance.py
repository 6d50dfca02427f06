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

# The entry modules of each stage (package-relative). A stage's code is its entry modules
# plus every avepipe module they import, transitively (read statically from the source, lazy
# imports inside functions included), so editing a shared module such as store.py reruns
# exactly the stages that use it, and no hand-kept file list can go stale.
STAGE_ENTRIES: dict[str, list[str]] = {
    "synth": ["datasets/synthetic.py"],
    "index": ["datasets/index.py"],
    "decode": ["decode.py"],
    "decode_report": ["decode.py", "decode_report.py"],
    "frames": ["frames.py"],
    "store": ["store.py"],
    "finetune": ["training/finetune.py"],
    "import_h5": ["interop.py"],
    "export_h5": ["interop.py"],
    "summary": ["summary.py"],
}


def _imports(rel: str) -> list[str]:
    """Package-relative files of the avepipe modules that ``rel`` imports (any depth in the file)."""
    import ast

    path = PACKAGE_DIR / rel
    if not path.is_file():
        return []
    pkg = rel.rsplit("/", 1)[0] if "/" in rel else ""
    mods: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names if a.name.startswith("avepipe.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package
                parts = pkg.split("/") if pkg else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(["avepipe", *parts, *([node.module] if node.module else [])])
            elif (node.module or "").split(".")[0] == "avepipe":
                base = node.module
            else:
                continue
            mods.append(base)
            mods += [f"{base}.{a.name}" for a in node.names]  # `from avepipe.x import submodule`
    out = []
    for m in mods:
        stem = m.removeprefix("avepipe").lstrip(".").replace(".", "/")
        for cand in (f"{stem}.py", f"{stem}/__init__.py" if stem else "__init__.py"):
            if (PACKAGE_DIR / cand).is_file():
                out.append(cand)
                break
    return out


def _closure(entries: list[str]) -> list[str]:
    seen: list[str] = []
    todo = list(entries)
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.append(cur)
        todo += _imports(cur)
    return sorted(seen)


def stage_files(stage: str) -> list[str]:
    """Package-relative source files of ``stage``; raises ``KeyError`` for unknown stages.

    Stages: the keys of STAGE_ENTRIES, ``extract:<encoder>`` (``_ft``: the fine-tuned
    encoder, plus the fine-tuning code) and ``heads:<head>`` (its module and its trainer).
    """
    kind, _, name = stage.partition(":")
    if stage in STAGE_ENTRIES:
        entries = list(STAGE_ENTRIES[stage])
    elif kind == "extract" and name:
        base = name.removesuffix("_ft")
        if not (PACKAGE_DIR / "encoders" / f"{base}.py").is_file():
            raise KeyError(f"unknown stage {stage!r}: no avepipe/encoders/{base}.py")
        entries = ["extract.py", f"encoders/{base}.py"] + (STAGE_ENTRIES["finetune"] if name.endswith("_ft") else [])
    elif kind == "heads" and name:
        import importlib

        heads = importlib.import_module("avepipe.heads")  # dynamic: the registry is not decode's code
        try:
            entries = [heads.module_file(name), f"training/{heads.entry(name).trainer}.py"]
        except KeyError as e:
            raise KeyError(f"unknown stage {stage!r}: {e.args[0]}") from None
    else:
        known = ", ".join(sorted(STAGE_ENTRIES)) + ", extract:<encoder>, heads:<head>"
        raise KeyError(f"unknown stage {stage!r}; known: {known}")
    return _closure(entries)


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


_VERSION_PACKAGES = ("torch", "torchvision", "torchaudio", "av", "zarr", "numpy")


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
