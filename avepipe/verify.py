"""Store integrity: find damaged feature and decoded shards, and refuse to read them.

Every array avepipe writes (feature shards, ``avepipe.store``; decoded shards,
``avepipe.decode``) ends its codec chain with zarr's ``crc32c`` codec (the last 4 bytes
of each chunk file are the CRC-32C of the bytes before them) and has every chunk
written, zeros included (``write_empty_chunks``), so a missing chunk file is damage,
never "fill value". Two levels of checking:

* cheap, at open (``check_present``, used by ``open_features`` and ``open_checked``): one
  ``os.stat`` per chunk file: missing files, and for uncompressed arrays (the feature
  default) files of the wrong size (truncated);
* full (``verify_store``, the ``avepipe verify`` command): every chunk of every array is
  read, its checksum compared and decoded to its chunk shape; metadata, array shapes
  and dtypes are checked against the layouts of docs/contracts.md.

Readers verify the checksum of every chunk they read (the codec, or ``avepipe.store``'s
direct reader), so flipped bytes fail the read. Each problem is one line naming store,
array, chunk and file; ``StoreDamagedError`` carries exactly those lines, so training,
fine-tuning and export refuse a damaged store with the message ``avepipe verify`` prints.

Why one long module: every check of every kind of store (feature, decoded) and the
readers that refuse damage share the same chunk and codec arithmetic.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import google_crc32c
import numpy as np
import zarr
from numcodecs import VLenUTF8
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec
from zarr.core.metadata.v3 import ArrayV3Metadata

FEATURE_ARRAYS = ("features", "video_id", "status", "reason", "lengths", "timestamps")
DECODED_ARRAYS = ("video_id", "status", "reason", "warnings", "n_segments", "frames")


@dataclass(frozen=True)
class Problem:
    """One integrity problem: ``store`` (path), ``array`` / ``chunk`` (None for store-level
    problems), ``kind`` (missing | truncated | checksum | undecodable | shape | dtype |
    metadata | no-checksum), ``detail`` and the ``file`` concerned."""

    store: str
    array: str | None
    chunk: tuple[int, ...] | None
    kind: str
    detail: str
    file: str | None = None

    def __str__(self) -> str:
        where = f"damaged store {self.store}"
        if self.array is not None:
            where += f": array {self.array}"
        if self.chunk is not None:
            where += f" chunk ({', '.join(map(str, self.chunk))})"
        return f"{where}: {self.kind}: {self.detail}" + (f" ({self.file})" if self.file else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chunk"] = None if self.chunk is None else list(self.chunk)
        d["message"] = str(self)
        return d


class StoreDamagedError(Exception):
    """A store failed an integrity check; the message is one ``Problem`` line per problem."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- metadata
class ArrayInfo:
    """One array's metadata parsed from JSON without zarr's I/O event loop (whose thread
    hand-offs cost more than a small store's whole open); offers the parts of
    ``zarr.Array`` the checks and readers use, and the real array via ``zarr()``."""

    def __init__(self, store: Path, name: str, meta: dict) -> None:
        self.path = store / name
        self.metadata = ArrayV3Metadata.from_dict(dict(meta))
        self.shape, self.chunks, self.shards = self.metadata.shape, self.metadata.chunks, self.metadata.shards
        self.ndim = len(self.shape)
        self.dtype = self.metadata.dtype.to_native_dtype()
        self._zarr: Arr | None = None

    def zarr(self) -> zarr.Array:
        if self._zarr is None:
            self._zarr = zarr.open_array(store=str(self.path), mode="r", zarr_format=3)
        return self._zarr

    def __getitem__(self, selection):
        return self.zarr()[selection]

    def get_block_selection(self, coords):
        return self.zarr().get_block_selection(coords)


Arr = "zarr.Array | ArrayInfo"  # what the functions below accept as an array


def read_metadata(store: str | Path) -> tuple[dict, dict[str, ArrayInfo]]:
    """(group attributes, {array name: ArrayInfo}) of a store, from its consolidated
    metadata when present (one file), else from each array's zarr.json; unreadable
    metadata raises StoreDamagedError."""
    store = Path(store)
    meta_file = store / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
            raise ValueError("not a zarr v3 group")
    except FileNotFoundError:
        raise StoreDamagedError([Problem(str(store), None, None, "metadata", "no zarr.json: not a zarr store",
                                         str(meta_file))]) from None
    except (OSError, ValueError) as exc:
        raise StoreDamagedError([Problem(str(store), None, None, "metadata", f"unreadable: {exc}",
                                         str(meta_file))]) from exc
    consolidated = (meta.get("consolidated_metadata") or {}).get("metadata")
    if consolidated is None:
        consolidated = {}
        for child in sorted(p for p in store.iterdir() if (p / "zarr.json").is_file()):
            try:
                consolidated[child.name] = json.loads((child / "zarr.json").read_text())
            except (OSError, ValueError) as exc:
                raise StoreDamagedError([Problem(str(store), child.name, None, "metadata", f"unreadable: {exc}",
                                                 str(child / "zarr.json"))]) from exc
    arrays = {}
    for name, m in consolidated.items():
        if m.get("node_type") != "array" or "/" in name:
            continue
        try:
            arrays[name] = ArrayInfo(store, name, m)
        except Exception as exc:  # noqa: BLE001
            raise StoreDamagedError([Problem(str(store), name, None, "metadata", f"unreadable: {exc}",
                                             str(store / name / "zarr.json"))]) from exc
    return meta.get("attributes") or {}, arrays


# --------------------------------------------------------------------------- chunk level
def has_checksum(arr: Arr) -> bool:
    return bool(arr.metadata.codecs) and isinstance(arr.metadata.codecs[-1], Crc32cCodec)


def raw_chunk_nbytes(arr: Arr) -> int | None:
    """Bytes of one decoded chunk when a chunk file is exactly those bytes (C order, little
    endian) followed by the 4-byte crc32c, else None (compressed or other codecs)."""
    codecs = arr.metadata.codecs
    if arr.shards or len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not has_checksum(arr):
        return None
    if arr.dtype.kind not in "biuf" or (arr.dtype.itemsize > 1 and codecs[0].endian is None):
        return None
    if arr.dtype.itemsize > 1 and codecs[0].endian.value != "little":
        return None
    return math.prod(arr.chunks) * arr.dtype.itemsize


def chunk_grid(arr: Arr) -> tuple[int, ...]:
    """Number of chunk files along each dimension (codec shards count as one file)."""
    unit = arr.shards or arr.chunks
    return tuple(math.ceil(s / c) if c else 0 for s, c in zip(arr.shape, unit))


def chunk_files(store: Path, name: str, arr: Arr) -> Iterator[tuple[tuple[int, ...], Path]]:
    """(chunk coordinates, file) of every chunk of array ``name`` of the store at ``store``."""
    for coords in itertools.product(*(range(n) for n in chunk_grid(arr))):
        yield coords, store / name / arr.metadata.encode_chunk_key(coords)


def file_problem(store: Path, name: str, coords: tuple[int, ...], path: Path, size: int | None,
                 expected: int | None) -> Problem | None:
    """The missing/truncated problem of a chunk file of ``size`` bytes (None: absent)."""
    if size is None:
        return Problem(str(store), name, coords, "missing", "chunk file missing", str(path))
    if expected is not None and size != expected:
        what = "truncated" if size < expected else "wrong size"
        return Problem(str(store), name, coords, what, f"{size} of {expected} bytes", str(path))
    if size < 4:
        return Problem(str(store), name, coords, "truncated", f"{size} bytes, not even a checksum", str(path))
    return None


def checksum_problem(store: Path, name: str, coords: tuple[int, ...], path: Path, stored: bytes,
                     computed: int) -> Problem | None:
    want = int.from_bytes(stored, "little")
    if want == computed:
        return None
    return Problem(str(store), name, coords, "checksum",
                   f"crc32c mismatch (stored {want:08x}, computed {computed:08x})", str(path))


def check_present(store: str | Path, group: zarr.Group | Mapping[str, Arr],
                  names: Sequence[str] | None = None) -> list[Problem]:
    """Cheap check (one stat per chunk file): every chunk of ``names`` (default: all arrays)
    of ``group`` (a zarr group or a {name: array} dict) exists and, for uncompressed arrays,
    has exactly the expected size. Arrays without the crc32c codec predate "every chunk
    written" (a missing chunk may mean fill value there) and are skipped; ``verify_store``
    reports them."""
    store = Path(store)
    problems = []
    if names is None:
        names = sorted(group) if isinstance(group, Mapping) else sorted(k for k, _ in group.arrays())
    for name in names:
        arr = group[name]
        if not has_checksum(arr):
            continue
        raw = raw_chunk_nbytes(arr)
        expected = None if raw is None else raw + 4
        for coords, path in chunk_files(store, name, arr):
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = None
            p = file_problem(store, name, coords, path, size, expected)
            if p:
                problems.append(p)
    return problems


def check_chunk(store: Path, name: str, arr: Arr, coords: tuple[int, ...], path: Path) -> Problem | None:
    """Full check of one chunk: present, right size, checksum, decodes to its chunk shape."""
    raw = raw_chunk_nbytes(arr)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return file_problem(store, name, coords, path, None, None)
    p = file_problem(store, name, coords, path, len(data), None if raw is None else raw + 4)
    if p:
        return p
    if has_checksum(arr):
        p = checksum_problem(store, name, coords, path, data[-4:], google_crc32c.value(data[:-4]))
        if p:
            return p
    if raw is None:  # compressed / strings: decode it as a reader would
        try:
            block = np.asarray(arr.get_block_selection(coords) if not arr.shards else arr.blocks[coords])
        except Exception as exc:  # noqa: BLE001 - any decoder error is damage here
            return Problem(str(store), name, coords, "undecodable", f"{type(exc).__name__}: {exc}", str(path))
        unit = arr.shards or arr.chunks
        want = tuple(min(c, s - i * c) for s, c, i in zip(arr.shape, unit, coords))
        if block.shape != want:
            return Problem(str(store), name, coords, "shape", f"chunk decodes to {block.shape}, expected {want}",
                           str(path))
    return None


def translate(store: str | Path, arr: Arr, name: str, exc: BaseException) -> StoreDamagedError:
    """The StoreDamagedError for a failed zarr read of array ``name``: the damaged chunks when
    a full check finds them, else the reader's error as an 'undecodable' problem."""
    store = Path(store)
    problems = [p for coords, path in chunk_files(store, name, arr)
                if (p := check_chunk(store, name, arr, coords, path))]
    return StoreDamagedError(problems or [Problem(str(store), name, None, "undecodable",
                                                  f"{type(exc).__name__}: {exc}")])


def read_checked(store: str | Path, group: zarr.Group, name: str, selection=...) -> np.ndarray:
    """``group[name][selection]`` through zarr (the codec verifies checksums); a failure is
    raised as StoreDamagedError naming the chunk(s) at fault."""
    return read_array(store, name, group[name], selection)


def read_array(store: str | Path, name: str, arr: Arr, selection=...) -> np.ndarray:
    """``arr[selection]`` of array ``name`` of ``store``, failures as StoreDamagedError.

    A whole one-chunk array stored as plain bytes or vlen-utf8 plus crc32c (the small
    arrays of every avepipe store) is read and checked here directly: one file read
    instead of zarr's async machinery, which costs more than the read for such arrays."""
    if selection is ... and _single_chunk(arr):
        return _read_single_chunk(Path(store), name, arr)
    try:
        return np.asarray(arr[selection])
    except (StoreDamagedError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - checksum and codec errors carry no path
        raise translate(store, arr, name, exc) from exc


def _single_chunk(arr: Arr) -> bool:
    codecs = arr.metadata.codecs
    if arr.shards or len(codecs) != 2 or not has_checksum(arr) or 0 in arr.shape:
        return False
    if any(math.ceil(s / c) != 1 for s, c in zip(arr.shape, arr.chunks)):
        return False
    return isinstance(codecs[0], VLenUTF8Codec) or raw_chunk_nbytes(arr) is not None


def _read_single_chunk(store: Path, name: str, arr: Arr) -> np.ndarray:
    coords = (0,) * arr.ndim
    path = store / name / arr.metadata.encode_chunk_key(coords)
    raw = raw_chunk_nbytes(arr)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    problem = file_problem(store, name, coords, path, None if data is None else len(data),
                           None if raw is None else raw + 4)
    if problem is None:
        problem = checksum_problem(store, name, coords, path, data[-4:], google_crc32c.value(data[:-4]))
    if problem is not None:
        raise StoreDamagedError([problem])
    body = memoryview(data)[:-4]
    if raw is not None:
        block = np.frombuffer(body, dtype=arr.dtype.newbyteorder("<")).reshape(arr.chunks)
    else:
        try:
            block = VLenUTF8().decode(body).reshape(arr.chunks)
        except Exception as exc:  # noqa: BLE001
            raise StoreDamagedError([Problem(str(store), name, coords, "undecodable",
                                             f"{type(exc).__name__}: {exc}", str(path))]) from exc
    return np.array(block[tuple(slice(0, s) for s in arr.shape)])


def open_group(path: str | Path) -> zarr.Group:
    """``zarr.open_group(path, mode="r")``, unreadable metadata raised as StoreDamagedError."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise StoreDamagedError([Problem(str(p), None, None, "metadata", "no zarr.json: not a zarr store",
                                         str(p / "zarr.json"))])
    try:
        return zarr.open_group(str(p), mode="r")
    except Exception as exc:  # noqa: BLE001
        raise StoreDamagedError([Problem(str(p), None, None, "metadata", f"unreadable: {exc}",
                                         str(p / "zarr.json"))]) from exc


def open_checked(path: str | Path, arrays: Sequence[str] | None = None) -> zarr.Group:
    """Open a store for reading after the cheap check of ``arrays`` (default: all):
    StoreDamagedError when metadata is unreadable or a chunk file is missing/truncated.
    Checksums are then verified by the crc32c codec on every read."""
    g = open_group(path)
    try:
        problems = check_present(path, g, arrays)
    except KeyError as exc:
        raise StoreDamagedError([Problem(str(path), str(exc).strip("'\""), None, "missing",
                                         "array missing")]) from exc
    if problems:
        raise StoreDamagedError(problems)
    return g


# --------------------------------------------------------------------------- store level
def _stores(path: Path) -> list[Path]:
    """The stores at ``path``: itself (it has zarr.json) or its ``*.zarr`` children."""
    if (path / "zarr.json").exists() or path.suffix == ".zarr":
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_dir() and p.name.endswith(".zarr"))
    return []


def _array_names(store: Path, meta: dict) -> list[str]:
    names = {p.name for p in store.iterdir() if p.is_dir() and (p / "zarr.json").exists()}
    consolidated = (meta.get("consolidated_metadata") or {}).get("metadata") or {}
    names |= {k for k, v in consolidated.items() if v.get("node_type") == "array" and "/" not in k}
    return sorted(names)


def layout_problems(store: Path, arrays: Mapping[str, Arr]) -> list[Problem]:
    """Shapes and dtypes against docs/contracts.md (feature shard / decoded shard)."""
    s = str(store)
    problems = []

    def need(names) -> bool:
        missing = [n for n in names if n not in arrays]
        problems.extend(Problem(s, n, None, "missing", "array missing") for n in missing)
        return not missing

    def dtype(name, ok, want):
        if name in arrays and not ok(arrays[name].dtype):
            problems.append(Problem(s, name, None, "dtype", f"{arrays[name].dtype}, expected {want}"))

    def shape(name, want):
        if name in arrays and tuple(arrays[name].shape) != tuple(want):
            problems.append(Problem(s, name, None, "shape", f"{tuple(arrays[name].shape)}, expected {tuple(want)}"))

    text = lambda d: d.kind in "TUO"  # noqa: E731
    if "features" in arrays:
        need(FEATURE_ARRAYS)
        f = arrays["features"]
        if f.ndim < 3:
            problems.append(Problem(s, "features", None, "shape", f"{f.shape}: expected (n, T, ...)"))
            return problems
        n, T = f.shape[:2]
        dtype("features", lambda d: d.kind == "f", "a float dtype")
        for name in ("video_id", "status", "reason"):
            dtype(name, text, "string")
            shape(name, (n,))
        dtype("lengths", lambda d: d == np.int32, "int32")
        shape("lengths", (n,))
        dtype("timestamps", lambda d: d == np.float64, "float64")
        shape("timestamps", (n, T))
    elif "n_segments" in arrays:
        need(DECODED_ARRAYS)
        n = arrays["n_segments"].shape[0] if arrays["n_segments"].ndim == 1 else -1
        dtype("n_segments", lambda d: d == np.int32, "int32")
        for name in ("video_id", "status", "reason", "warnings"):
            dtype(name, text, "string")
            shape(name, (n,))
        fr = arrays.get("frames")
        if fr is not None:
            dtype("frames", lambda d: d == np.uint8, "uint8")
            if fr.ndim != 6 or fr.shape[0] != n or fr.shape[-1] != 3:
                problems.append(Problem(s, "frames", None, "shape", f"{fr.shape}, expected (n={n}, S, K, H, W, 3)"))
        seconds = fr.shape[1] if fr is not None and fr.ndim == 6 else None
        for name in sorted(a for a in arrays if a.startswith("audio_")):
            dtype(name, lambda d: d == np.float32, "float32")
            rate = name.removeprefix("audio_")
            if rate.isdigit() and seconds is not None:
                shape(name, (n, seconds * int(rate)))
    else:
        problems.append(Problem(s, None, None, "metadata",
                                "neither a feature shard ('features') nor a decoded shard ('n_segments')"))
    return problems


def verify_one(store: Path) -> tuple[list[Problem], int]:
    """(problems, number of chunks read) of one store."""
    s = str(store)
    meta_file = store / "zarr.json"
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
            return [Problem(s, None, None, "metadata", "not a zarr v3 group", str(meta_file))], 0
    except FileNotFoundError:
        return [Problem(s, None, None, "metadata", "zarr.json missing", str(meta_file))], 0
    except (OSError, ValueError) as exc:
        return [Problem(s, None, None, "metadata", f"unreadable: {exc}", str(meta_file))], 0
    problems: list[Problem] = []
    arrays: dict[str, zarr.Array] = {}
    for name in _array_names(store, meta):
        try:  # the array's own zarr.json (not the consolidated copy)
            arrays[name] = zarr.open_array(store=str(store / name), mode="r", zarr_format=3)
        except FileNotFoundError:
            problems.append(Problem(s, name, None, "missing", "array missing", str(store / name / "zarr.json")))
        except Exception as exc:  # noqa: BLE001
            problems.append(Problem(s, name, None, "metadata", f"unreadable: {exc}",
                                    str(store / name / "zarr.json")))
    bad_meta = {p.array for p in problems}
    problems += [p for p in layout_problems(store, arrays) if p.array not in bad_meta]
    n_chunks = 0
    for name, arr in arrays.items():
        if not has_checksum(arr):
            problems.append(Problem(s, name, None, "no-checksum",
                                    "written without the crc32c codec: cannot be verified (re-create the store)"))
        for coords, path in chunk_files(store, name, arr):
            n_chunks += 1
            p = check_chunk(store, name, arr, coords, path)
            if p:
                problems.append(p)
    return problems, n_chunks


def verify_store(path: str | Path) -> list[Problem]:
    """Every problem of a feature shard, a decoded shard or a directory of shards.

    Reads every chunk of every array: missing chunk files, truncated files, checksum
    mismatches, chunks that do not decode, wrong shapes/dtypes, unreadable metadata.
    An empty list means the store is intact.
    """
    return _verify(Path(path))[0]


def _verify(path: Path) -> tuple[list[Problem], int, int]:
    stores = _stores(path)
    if not stores:
        what = "no such file or directory" if not path.exists() else "no zarr store here (no zarr.json, no *.zarr)"
        return [Problem(str(path), None, None, "missing", what)], 0, 0
    problems, chunks = [], 0
    for s in stores:
        p, n = verify_one(s)
        problems += p
        chunks += n
    return problems, len(stores), chunks


def run(paths: Sequence[str], as_json: bool = False) -> int:
    """``avepipe verify STORE...``: one line per problem (or one JSON document), exit code
    1 when any store is damaged, 0 when all are intact."""
    report, failed = [], False
    for path in paths:
        problems, n_stores, n_chunks = _verify(Path(path))
        failed |= bool(problems)
        report.append({"path": str(path), "ok": not problems, "stores": n_stores, "chunks": n_chunks,
                       "problems": [p.to_dict() for p in problems]})
        if not as_json:
            for p in problems:
                print(p)
            if not problems:
                print(f"ok {path}: {n_chunks} chunks in {n_stores} store(s) verified")
    if as_json:
        json.dump({"ok": not failed, "stores": report}, sys.stdout, indent=2)
        print()
    return 1 if failed else 0
