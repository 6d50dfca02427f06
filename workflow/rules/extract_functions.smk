# Input/param functions of the rules in extract.smk (shared decoding: the `frames`,
# `frames_reader` and `frames_done` rules; see the head of extract.smk). Kept apart from the
# rules, as `snakemake --lint` asks; included by extract.smk.
import json


def frames_readers(run):
    """The visual stores of `run` that read a shared frames store: its base visual encoders
    (`_ft` stores too with `decode.share_frames: all`), when there are two or more; else none
    (a single visual store decodes in its own job). `_ft` stores are left out by default:
    they run after fine-tuning, and the frames of every shard would wait on disk until then."""
    cfg = RUNS[run]
    mode = cfg["decode"].get("share_frames", "base")
    if mode == "none":
        return []
    visual = [e for e in apcfg.feature_encoders(cfg) if apcfg.modality(e.removesuffix("_ft")) == "visual"]
    readers = [e for e in visual if mode == "all" or not e.endswith("_ft")]
    return readers if len(readers) >= 2 else []


def frames_store(w):
    return f"results/{w.run}/frames/shard-{w.shard}.zarr"


def reader_file(run, enc):
    return f"results/{run}/frames/readers/{enc}.json"


def extract_data_flags(w):
    """--frames (when shared) and --stats: the data-path timings beside Snakemake's benchmark file."""
    stats = f"results/{w.run}/benchmarks/extract/{w.enc}/shard-{w.shard}.json"
    frames = f"--frames={shlex.quote(frames_store(w))} " if w.enc in frames_readers(w.run) else ""
    return f"{frames}--stats={shlex.quote(stats)}"


def extract_frames(w):
    """Rule `extract` of a reader: the shard's frames store (`ancient`) and its reader file."""
    if w.enc not in frames_readers(w.run):
        return []
    return [ancient(frames_store(w)), reader_file(w.run, w.enc)]


def reader_settings(w):
    """Rule `frames_reader`: everything the reader's extract jobs are run with (their flags,
    weights, code fingerprint), plus what the frames job needs (recipe options, grid)."""
    cfg, base = C(w), w.enc.removesuffix("_ft")
    win = cfg.get("windows") or {}
    return json.dumps({
        "encoder": base,
        "frames_per_segment": apcfg.encoder_settings(cfg, w.enc)["frames_per_segment"],
        "options": apcfg.encoder_options(cfg, w.enc),
        "window": win.get("window"), "hop": win.get("hop"),
        "extract_flags": extract_flags(w),
        "extract_code": fingerprint(f"extract:{base}"),
    }, sort_keys=True)


def frames_reader_files(w):
    """Rule `frames`: every reader's file, `ancient` (a changed reader does not rewrite the frames)."""
    return [ancient(reader_file(w.run, e)) for e in frames_readers(w.run)]


def extract_rule_priority(w):
    """The fine-tuning path first (extract_priority); a reader of a frames store before the
    next frames job, so frame data do not pile up on disk."""
    return extract_priority(w) + (1 if w.enc in frames_readers(w.run) else 0)


def frames_threads(w):
    return max([apcfg.encoder_settings(C(w), e)["threads"] for e in frames_readers(w.run)] + [1])


def frames_done_input(w):
    """Rule `frames_done`: the frames store and every store that reads it."""
    return [frames_store(w)] + [f"results/{w.run}/features/{e}/shard-{w.shard}.zarr" for e in frames_readers(w.run)]


def summary_frames_done(w):
    """Rule `store_summary` of a reader: every shard's `frames_done` marker (`ancient`, an
    ordering only), so that the frames stores are emptied in every complete run."""
    if w.enc not in frames_readers(w.run):
        return []
    return [ancient(f"results/{w.run}/frames/shard-{s}.done") for s in shards(w.run)]
