"""Layout and manifest of a generated 3D dataset, and the bookkeeping that makes resume exactly-once.

Layout under one output URI:
    scenes/<shard>/<id>.ply|.spz       splats (INRIA 3DGS .ply, SPZ v3 .spz: splats.formats)
    scenes/<shard>/<id>.png            preview grid
    scenes/<shard>/<id>.cameras.json   predicted cameras
    scenes/<shard>/<id>.meta.json      prompt, seed, settings, provenance, licence, versions, timings
    commits/<hash>.parquet             the commit log: one part per committed unit of work (a GPU task's
                                       scenes, a validation block's refused rows), named by its ids
    manifest/bucket-<h>.parquet        the consolidated manifest: one row per id, ids split over 16
                                       disjoint buckets by the first hex digit of sha256(id)
    dataset.json, README.md            the dataset card of the last run
    inputs.json                        the prompt files finished runs read whole (each with its size and
                                       modification stamp), and the read units a killed run finished:
                                       a rerun skips them without reading them

An id counts as complete once a row naming it is in a commit part or a bucket. A part is written
(atomically) after every file of its rows, so a run killed at any moment leaves ids that are either
complete or absent everywhere, and the next run regenerates the absent ones under the same names and
seeds (identical files). `consolidate_manifest` folds parts into the buckets: it rewrites each bucket
file whole (one atomic replace) and deletes the folded parts only afterwards, so a kill at any moment
loses no row, and since buckets hold disjoint ids and each holds one row per id, `manifest/` never
holds an id twice. Readers (`read_manifest`) take buckets and parts together and keep one row per id:
a 'done' row over a 'failed' one, then the latest `finished_at`. Older layouts (manifest/parts/*,
manifest.parquet) are read too and folded in by the next consolidation.

`inputs.json` only saves reading. Its files are written after a run's final consolidation, so every row
of them is in the manifest; a file that changed since (size or stamp) is read again. Its units (byte
ranges of a file as it was) are written during a run, each once every row of it has a durable outcome
(committed, or dropped as a duplicate of an id or as recorded), so a killed run's rerun skips the units it
finished and reads the others, skipping their recorded ids one by one.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq

from vist3a.config import SCORE_COLUMNS
from vist3a.ids import check_id
from vist3a.io.uri import filesystem, is_s3, join, write_bytes

SHARD_CHARS = 2  # 256 shards: keeps directories and S3 prefixes small

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),     # the one used: the row's, else sampling.negative_prompt
    ("seed", pa.int64()),
    ("source", pa.string()),
    ("status", pa.string()),              # done | failed
    ("error", pa.string()),
    ("scene_uri", pa.string()),           # the .ply when one is written, else the .spz
    ("preview_uri", pa.string()),
    ("cameras_uri", pa.string()),
    # every file's URI and size (splats.formats decides which scene files exist); older parts read with nulls
    ("ply_uri", pa.string()),
    ("spz_uri", pa.string()),
    ("meta_uri", pa.string()),
    ("ply_bytes", pa.int64()),
    ("spz_bytes", pa.int64()),
    ("preview_bytes", pa.int64()),
    ("cameras_bytes", pa.int64()),
    ("meta_bytes", pa.int64()),
    ("num_gaussians", pa.int64()),
    ("bbox_min", pa.list_(pa.float32(), 3)),
    ("bbox_max", pa.list_(pa.float32(), 3)),
    ("sample_s", pa.float64()),
    ("decode_s", pa.float64()),
    ("render_s", pa.float64()),
    ("write_s", pa.float64()),
    ("preset", pa.string()),
    ("prompt_template", pa.string()),     # sampling.prompt_template the video model saw the prompt in
    ("weights_fingerprint", pa.string()),
    ("licence", pa.string()),             # the terms the weights impose on this scene (meta.json: licence)
    ("provenance", pa.string()),          # JSON: weights files and their fingerprints, LoRA, sampling, versions
    ("vist3a_version", pa.string()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    # per-scene scores (generate.scores; vist3a.scores): null where not computed; older parts read with nulls
    *[(c, pa.float64()) for cols in SCORE_COLUMNS.values() for c in cols],
])

#: The one schema of the rows flowing through the bulk job's stages (validate -> generate -> write):
#: the prompt set's columns, then what generation adds. Every stage takes and returns Arrow tables of
#: exactly this schema, so a column whose values are all null stays a typed null column (a numpy batch
#: would turn it into float NaN) and nothing downstream has to guess a type.
STAGE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("source", pa.string()),
    ("error", pa.string()),               # null: the row can still be generated
    ("scene", pa.binary()),               # the pickled Scene, once generated
    ("meta", pa.string()),                # its meta.json text, once generated
    ("unit", pa.int32()),                 # the run's read unit the row came from, and its place in it:
    ("pos", pa.int32()),                  # what tells the run a unit is finished (null outside the job)
])

#: What the write stage hands back to the driver (progress, finished read units), one row per committed row.
RESULT_SCHEMA = pa.schema([("id", pa.string()), ("status", pa.string()), ("error", pa.string()),
                           ("unit", pa.int32()), ("pos", pa.int32())])


def typed_table(rows: list[dict], schema: pa.Schema, what: str = "row") -> pa.Table:
    """`rows` as a table of exactly `schema` (missing keys are null). A value that does not fit its column
    is a ValueError naming the row's id, the field and the value, not an Arrow error from deep inside."""
    try:
        return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        for r in rows:
            for f in schema:
                try:
                    pa.array([r.get(f.name)], f.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    raise ValueError(f"{what} {r.get('id')!r}: field {f.name!r} = {r.get(f.name)!r:.200} "
                                     f"({type(r.get(f.name)).__name__}) does not fit {f.type}") from exc
        raise


SCENE_FILES = {"scene.ply": ".ply", "scene.spz": ".spz", "preview.png": ".png", "cameras.json": ".cameras.json",
               "meta.json": ".meta.json"}
#: manifest column prefix of each scene file (<prefix>_uri, <prefix>_bytes)
FILE_COLUMNS = {"scene.ply": "ply", "scene.spz": "spz", "preview.png": "preview", "cameras.json": "cameras",
                "meta.json": "meta"}


def file_columns(uris: dict[str, str], files: dict[str, bytes]) -> dict:
    """Manifest columns of a written scene: each file's URI and bytes, and scene_uri (.ply, else .spz)."""
    cols = {}
    for name, prefix in FILE_COLUMNS.items():
        cols[f"{prefix}_uri"] = uris.get(name)
        cols[f"{prefix}_bytes"] = len(files[name]) if name in files else None
    cols["scene_uri"] = uris.get("scene.ply") or uris.get("scene.spz")
    return cols


def failure_class(error: object) -> str:
    """A failure reason's class, for counting: the text before its first colon, quoted values and
    numbers blanked ("prompt too long: 317 tokens..." and "...: 316 tokens..." are one class)."""
    head = str(error).split(":")[0]
    return re.sub(r"(?<![\w-])\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", head)).strip()


def shard_of(scene_id: str) -> str:
    h = hashlib.sha256(scene_id.encode("utf-8")).hexdigest()
    return h[:SHARD_CHARS]


def scene_uri(output: str, scene_id: str, name: str = "scene.ply") -> str:
    """Where file `name` (a key of SCENE_FILES) of scene `scene_id` lives. An id outside vist3a.ids.ID_RULE
    is refused (ValueError): no path is ever built from one."""
    check_id(scene_id)
    return join(output, "scenes", shard_of(scene_id), scene_id + SCENE_FILES[name])


def empty_manifest_row() -> dict:
    return {f.name: None for f in MANIFEST_SCHEMA}


def write_scene(output: str, scene_id: str, files: dict[str, bytes], storage=None) -> dict[str, str]:
    """Write one scene's files (each atomically); returns name -> URI."""
    uris = {}
    for name, data in files.items():
        uri = scene_uri(output, scene_id, name)
        write_bytes(uri, data, storage)
        uris[name] = uri
    return uris


COMMITS_DIR = "commits"
MANIFEST_DIR = "manifest"
BUCKETS = "0123456789abcdef"
LEGACY_PARTS_DIR = "manifest/parts"   # the commit log of earlier versions (one part per batch)
LEGACY_MANIFEST = "manifest.parquet"  # the compacted manifest of earlier versions
#: where `read_manifest` looks, for messages that say so
MANIFEST_PLACES = f"{MANIFEST_DIR}/, {COMMITS_DIR}/ and the older {LEGACY_MANIFEST}, {LEGACY_PARTS_DIR}/"


def bucket_of(scene_id: str) -> str:
    """The manifest bucket of an id: the first hex digit of its shard (16 disjoint buckets)."""
    return shard_of(scene_id)[0]


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_manifest_part(output: str, rows: list[dict], storage=None) -> str | None:
    """Commit rows whose files are all written: one Parquet part in commits/, named by its ids (a retried
    unit rewrites the same part). No rows: nothing to commit (None)."""
    if not rows:
        return None
    ids = sorted(r["id"] for r in rows)
    name = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:24] + ".parquet"
    uri = join(output, COMMITS_DIR, name)
    write_bytes(uri, _parquet_bytes(typed_table(rows, MANIFEST_SCHEMA, "manifest row")), storage)
    return uri


def manifest_files(output: str, storage=None) -> dict[str, list[str]]:
    """The Parquet files that hold committed rows, by kind (paths on the output's filesystem): buckets,
    commit parts, and the older layouts' parts and compacted file."""
    fs, root = filesystem(output, storage)
    root = root.rstrip("/")

    def listed(sub: str) -> list[str]:
        d = f"{root}/{sub}"
        try:
            return sorted(p for p in fs.ls(d, detail=False) if p.endswith(".parquet")
                          and not p.rsplit("/", 1)[-1].startswith((".", "_")))
        except FileNotFoundError:
            return []

    legacy = [p for p in [f"{root}/{LEGACY_MANIFEST}"] if fs.exists(p)]
    return {"buckets": [p for p in listed(MANIFEST_DIR) if p.rsplit("/", 1)[-1].startswith("bucket-")],
            "commits": listed(COMMITS_DIR), "legacy": listed(LEGACY_PARTS_DIR) + legacy}


READ_FILES = 256  # Parquet files read per round: a dataset scan holds ~100 KB of reader state a file to its end
COMBINE_BYTES = 256 << 20


def _read_tables(output: str, paths: list[str], storage=None, columns: list[str] | None = None) -> pa.Table:
    """Rows of many Parquet files read in parallel (pyarrow datasets, threads), in MANIFEST_SCHEMA: columns a
    file lacks (older versions) read as null. Read READ_FILES at a time: one scan of 31,250 commit parts held
    4.1 GB of reader state for 10^6 rows of three columns."""
    import pyarrow.dataset as pads
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    if not paths:
        return schema.empty_table()
    fs, _ = filesystem(output, storage)
    arrow_fs = PyFileSystem(FSSpecHandler(fs)) if is_s3(output) else LocalFileSystem()
    tables = []
    for i in range(0, len(paths), READ_FILES):
        t = pads.dataset(paths[i:i + READ_FILES], schema=schema, format="parquet", filesystem=arrow_fs).to_table(
            use_threads=True)
        # a chunk a file makes later sorts slow (one_row_per_id); merged while small (string offsets are 32-bit)
        tables.append(t.combine_chunks() if t.nbytes < COMBINE_BYTES else t)
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def one_row_per_id(table: pa.Table) -> pa.Table:
    """The row that counts for each id, sorted by id: a 'done' row over a 'failed' one, then the latest
    finished_at (a retried or regenerated scene's newest record)."""
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    keyed = table.append_column("_done", pc.equal(table["status"], "done"))
    order = pc.sort_indices(keyed, sort_keys=[("id", "ascending"), ("_done", "descending"),
                                              ("finished_at", "descending")])  # nulls last (the default)
    table = table.take(order)
    ids = table["id"]
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), pc.fill_null(first, True).combine_chunks()])
    return table.filter(keep)


def read_manifest(output: str, storage=None, columns: list[str] | None = None) -> pa.Table:
    """Every committed row, one per id (see `one_row_per_id`), from the buckets, the commit parts not yet
    folded into them and the older layouts; `columns` reads only those (plus what choosing a row needs)."""
    files = manifest_files(output, storage)
    need = None if columns is None else list(dict.fromkeys(["id", "status", "finished_at", *columns]))
    table = one_row_per_id(_read_tables(output, files["buckets"] + files["commits"] + files["legacy"], storage, need))
    return table if columns is None else table.select(columns)


def recorded_id_array(output: str, storage=None, include_failed: bool = True) -> pa.Array:
    """Ids a rerun should skip, as one Arrow string array: complete ones and (unless retrying) failed ones."""
    import pyarrow.compute as pc

    table = read_manifest(output, storage, columns=["id", "status"])
    keep = pc.is_in(table["status"], pa.array(["done", "failed"] if include_failed else ["done"]))
    return table.filter(keep)["id"].combine_chunks()


def recorded_ids(output: str, storage=None, include_failed: bool = True) -> set[str]:
    """`recorded_id_array` as a Python set."""
    return set(recorded_id_array(output, storage, include_failed).to_pylist())


FOLD_BYTES = 8 << 20   # Parquet bytes of commit parts folded per round: bounds a consolidation's memory
FOLD_PARTS = 4000      # ... and parts per round


def _rounds(output: str, paths: list[str], storage=None, max_bytes: int = FOLD_BYTES) -> list[list[str]]:
    """`paths` in consecutive rounds of at most `max_bytes` (file sizes from one listing) and FOLD_PARTS files."""
    fs, _ = filesystem(output, storage)
    sizes = {}
    for d in {p.rsplit("/", 1)[0] for p in paths}:
        sizes.update({e["name"].rstrip("/"): e.get("size") or 0 for e in fs.ls(d, detail=True)})
    rounds, cur, size = [], [], 0
    for p in paths:
        s = sizes.get(p, sizes.get(p.lstrip("/"), 0))
        if cur and (size + s > max_bytes or len(cur) >= FOLD_PARTS):
            rounds.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += s
    return rounds + ([cur] if cur else [])


def consolidate_manifest(output: str, storage=None, max_bytes: int = FOLD_BYTES) -> dict:
    """Fold the commit parts (and older layouts) into the 16 bucket files, safely at any kill: in rounds of
    at most `max_bytes` of parts, each bucket that gains rows is rewritten whole (old rows + new, one row
    per id) in one atomic write, and a round's parts are deleted only once every bucket is written. Parts
    committed meanwhile (a run still writing) are left for the next time. Returns counts: parts folded,
    rows in, bucket writes, rows in the buckets."""
    files = manifest_files(output, storage)
    folded = files["commits"] + files["legacy"]
    stats = {"parts_folded": len(folded), "rows_in": 0, "buckets_written": 0, "rows": 0}
    buckets = set(files["buckets"])
    for parts in _rounds(output, folded, storage, max_bytes):
        rows_in, writes = _fold(output, parts, buckets, storage)
        stats["rows_in"] += rows_in
        stats["buckets_written"] += writes
        buckets = set(manifest_files(output, storage)["buckets"])
    stats["rows"] = _count_rows(output, sorted(buckets), storage)
    return stats


def _fold(output: str, parts: list[str], buckets: set[str], storage=None) -> tuple[int, int]:
    """One round of consolidate_manifest: `parts`' rows into the buckets, then the parts deleted.
    -> (rows read, bucket files written)."""
    import pyarrow.compute as pc

    new = _read_tables(output, parts, storage)
    bucket = pa.array([bucket_of(i) for i in new["id"].to_pylist()], pa.string())
    fs, root = filesystem(output, storage)
    root = root.rstrip("/")
    writes = 0
    for b in BUCKETS:
        mine = new.filter(pc.equal(bucket, b))
        path = f"{root}/{MANIFEST_DIR}/bucket-{b}.parquet"
        if mine.num_rows == 0:
            continue
        old = _read_tables(output, [path], storage) if path in buckets else MANIFEST_SCHEMA.empty_table()
        merged = one_row_per_id(pa.concat_tables([old, mine]))
        write_bytes(join(output, MANIFEST_DIR, f"bucket-{b}.parquet"), _parquet_bytes(merged), storage)
        writes += 1
    for p in parts:  # every row of these is now in a bucket
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
    return new.num_rows, writes


def _count_rows(output: str, paths: list[str], storage=None) -> int:
    fs, _ = filesystem(output, storage)
    n = 0
    for p in paths:
        with fs.open(p, "rb") as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n


INPUTS_FILE = "inputs.json"
INPUTS_FORMAT = "vist3a-read-inputs/1"


def _inputs_doc(output: str, storage=None) -> dict:
    from vist3a.io.uri import exists, read_text

    uri = join(output, INPUTS_FILE)
    if not exists(uri, storage):
        return {"format": INPUTS_FORMAT, "files": {}, "units": {}}
    doc = json.loads(read_text(uri, storage))
    if doc.get("format") != INPUTS_FORMAT:
        raise ValueError(f"{uri}: format {doc.get('format')!r} is not {INPUTS_FORMAT!r}; delete the file and the next "
                         "run reads every prompt file (recorded ids are still skipped)")
    return {"format": INPUTS_FORMAT, "files": doc.get("files", {}), "units": doc.get("units", {})}


def _write_inputs_doc(output: str, doc: dict, storage=None) -> None:
    doc = {"format": INPUTS_FORMAT, "files": dict(sorted(doc["files"].items())), "units": dict(sorted(doc["units"].items()))}
    write_bytes(join(output, INPUTS_FILE), json.dumps(doc, indent=1).encode("utf-8"), storage)


def read_inputs_record(output: str, storage=None) -> dict[str, dict]:
    """The prompt files finished runs read whole: {uri: {"version", "rows", "read_at"}} (empty if none).
    `version` is vist3a.io.prompts.file_version: the file as it was then."""
    return _inputs_doc(output, storage)["files"]


def record_read_inputs(output: str, files: dict[str, dict], storage=None) -> None:
    """Add `files` ({uri: {"version", "rows"}}) to inputs.json, atomically (their finished units go: the file
    covers them): call it only once every row of them is in the manifest (after the run's final consolidation)."""
    doc = _inputs_doc(output, storage)
    stamp = now_utc().isoformat(timespec="seconds")
    doc["files"].update({f: {**v, "read_at": stamp} for f, v in files.items()})
    for f in files:
        doc["units"].pop(f, None)
    _write_inputs_doc(output, doc, storage)


def read_units_record(output: str, storage=None) -> dict[str, dict]:
    """The read units runs finished in files they did not finish whole: {uri: {"version", "done": [{"start",
    "end", "rows", "newlines"}]}} (empty if none)."""
    return _inputs_doc(output, storage)["units"]


def record_read_units(output: str, units: list[dict], storage=None) -> None:
    """Add finished read units (chunk dicts of vist3a.io.prompts.plan_chunks plus "rows" and "newlines") to
    inputs.json, atomically: call it only once every row of each has a durable outcome. A unit of a file
    whose version changed replaces that file's older units."""
    if not units:
        return
    doc = _inputs_doc(output, storage)
    for u in units:
        rec = doc["units"].get(u["file"])
        if rec is None or rec["version"] != u["version"]:
            rec = doc["units"][u["file"]] = {"version": u["version"], "done": []}
        if not any(d["start"] == u["start"] and d["end"] == u["end"] for d in rec["done"]):
            rec["done"].append({k: u.get(k) for k in ("start", "end", "rows", "newlines")})
        rec["done"].sort(key=lambda d: d["start"])
    _write_inputs_doc(output, doc, storage)


def now_utc():
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc)


def meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, indent=1).encode("utf-8")


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
