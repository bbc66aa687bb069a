"""Prompt sets: .txt (one a line), .jsonl, .csv, .parquet from a path, a glob or an s3:// prefix.

Every input row becomes a row of one table (`PROMPT_SCHEMA`); a row that cannot be used keeps
its place with `error` set, so a job records it as failed instead of crashing. Ids are stable
(from content unless given), duplicate prompts collapse to one id, and seeds derive from ids.
A given id must follow vist3a.ids.ID_RULE (it names files): other ids are refused, not mapped.

Reading streams: `plan_chunks` cuts the set into read units (byte ranges of line files, whole CSV and
Parquet files) from listings and sizes alone, and `chunk_rows` reads one unit, so a job can read a
prompt set of any size in parallel without holding it anywhere. `PromptLedger` decides, row by row in
arrival order, which rows are new work: the first valid row of an id keeps it; a later equal row is a
duplicate (dropped, counted); a later row giving the same id for another prompt is a conflict (a
failed row that says so). A row that cannot be generated is always recorded under an id of its own,
`invalid-<hash of its source>`, so no bad row hides a scene or is hidden by one.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from vist3a.ids import id_problem, prompt_id, seed_from
from vist3a.io.uri import filesystem, is_s3

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
LINE_FORMATS = (".txt", ".jsonl")   # one row a line: these can be cut into byte ranges
MAX_SEED = 2**63 - 1
CHUNK_BYTES = 16 << 20              # a read unit of a line file (~200k prompts of 80 bytes)

PROMPT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("source", pa.string()),      # file:line (or file:row) the row came from
    ("error", pa.string()),       # why the row cannot be generated; null when it can
])


def list_inputs(uri: str, storage=None) -> list[str]:
    """Expand a file, a glob or a directory/prefix into the prompt files it names (sorted)."""
    fs, path = filesystem(uri, storage)
    prefix = "s3://" if is_s3(uri) else ""
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path)]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"prompt input not found: {uri}")
    files = sorted(prefix + p for p in found if os.path.splitext(p)[1].lower() in FORMATS)
    if not files:
        raise FileNotFoundError(f"no prompt files ({', '.join(FORMATS)}) at {uri}")
    return files


# ----------------------------------------------------------------------------- read units


def file_version(info: dict) -> str:
    """A file as it is now, from its listing entry: size plus S3's ETag or the local modification time (ns).
    Equal versions mean an unchanged file (what lets a rerun skip a file an earlier run read whole)."""
    if info.get("ETag"):
        return f"size={info['size']} etag={str(info['ETag']).strip(chr(34))}"
    mtime = info.get("mtime")
    return f"size={info['size']} mtime_ns={int(round(float(mtime) * 1e9)) if mtime is not None else 'unknown'}"


def plan_chunks(uri: str, storage=None, chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """The prompt set as read units, from listings and sizes (and a CSV header / Parquet footer, so a file
    without a 'prompt' column is refused here, by name): .txt/.jsonl cut every `chunk_bytes`; a chunk
    reads the lines that start inside it. `first_line` is None where it is not known yet (a chunk after a
    file's first): `number_chunks` fills it from `count_newlines` of the chunks before. Parquet chunks
    carry their `rows` (from the footer); every chunk its file's `version` (file_version)."""
    chunks = []
    for f in list_inputs(uri, storage):
        fs, path = filesystem(f, storage)
        ext = os.path.splitext(f)[1].lower()
        info = fs.info(path)
        size, version = info["size"], file_version(info)
        if ext in LINE_FORMATS:
            for start in range(0, max(size, 1), chunk_bytes):
                chunks.append({"file": f, "start": start, "end": min(start + chunk_bytes, size),
                               "first_line": 1 if start == 0 else None, "version": version})
            continue
        rows = _check_columns(f, fs, path, ext)
        chunks.append({"file": f, "start": 0, "end": size, "first_line": 1, "version": version,
                       **({"rows": rows} if rows is not None else {})})
    return chunks


def _check_columns(uri: str, fs, path: str, ext: str) -> int | None:
    """Refuse a CSV / Parquet file without a 'prompt' column; a Parquet file's row count (None for CSV)."""
    if ext == ".csv":
        with fs.open(path, "rb") as raw:
            header = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                      newline="")), None)
        if not header or "prompt" not in header:
            raise ValueError(f"{uri}: CSV needs a header with a 'prompt' column (found {header})")
        return None
    with fs.open(path, "rb") as raw:
        pf = pq.ParquetFile(raw)
        names, rows = pf.schema_arrow.names, pf.metadata.num_rows
    if "prompt" not in names:
        raise ValueError(f"{uri}: Parquet needs a 'prompt' column (found {names})")
    return rows


class ReadUnitTally:
    """Which read units of a run are finished: every row of the unit has a durable outcome (committed, or
    dropped as a duplicate or as recorded by an earlier run), so a rerun after a kill need not read it again.
    Rows are marked by (unit, position in the unit); marking one twice (a retried task) counts it once."""

    def __init__(self):
        self.rows: dict[int, int] = {}          # rows each fully read unit has
        self.marks: dict[int, bytearray] = {}   # per unit, 1 where the row at that position has an outcome
        self.settled: collections.Counter[int] = collections.Counter()
        self.finished: set[int] = set()

    def read(self, unit: int, rows: int) -> None:
        """The reader yielded all `rows` rows of `unit` (a retried reader says it again)."""
        if unit not in self.finished:
            self.rows[unit] = rows

    def settle(self, pairs: Iterable[tuple[int, int]]) -> None:
        """These rows' outcomes are durable."""
        for unit, pos in pairs:
            if unit is None or unit in self.finished:
                continue
            marks = self.marks.setdefault(unit, bytearray())
            if pos >= len(marks):
                marks.extend(bytes(pos + 1 - len(marks)))
            if not marks[pos]:
                marks[pos] = 1
                self.settled[unit] += 1

    def pop_finished(self) -> list[tuple[int, int]]:
        """(unit, rows) of the units finished since the last call (their marks are dropped: memory is for
        the units in flight)."""
        done = sorted((u, n) for u, n in self.rows.items() if self.settled[u] >= n)
        for u, _ in done:
            self.finished.add(u)
            del self.rows[u]
            self.marks.pop(u, None)
            self.settled.pop(u, None)
        return done


def count_newlines(chunk: dict, storage=None) -> int:
    """Newlines in [max(start - 1, 0), end - 1): summed over a file's earlier chunks, the line number a
    chunk's first line has (`number_chunks`); over all of a file's chunks, its lines - 1."""
    fs, path = filesystem(chunk["file"], storage)
    lo, hi = max(chunk["start"] - 1, 0), chunk["end"] - 1
    n = 0
    with fs.open(path, "rb") as f:
        f.seek(lo)
        left = hi - lo
        while left > 0:
            block = f.read(min(left, 8 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def number_chunks(chunks: list[dict], counts: dict[int, int]) -> list[dict]:
    """Fill first_line of later chunks: 2 + the newlines counted in the file's chunks before (the first
    line of a file is 1; a newline before the chunk's start - 1 starts a line before it)."""
    out, running = [], 0
    for i, c in enumerate(chunks):
        c = dict(c)
        if c["first_line"] is None:
            c["first_line"] = 2 + running
        else:
            running = 0
        running += counts.get(i, 0)
        out.append(c)
    return out


def _chunk_lines(chunk: dict, storage=None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of every line that starts in [start, end) of a line file."""
    fs, path = filesystem(chunk["file"], storage)
    start, end = chunk["start"], chunk["end"]
    with fs.open(path, "rb") as f:
        pos = max(start - 1, 0)
        f.seek(pos)
        buf = f.read(end - pos)
        if start > 0:  # the line that starts at `start` follows the first newline at or after start - 1
            nl = buf.find(b"\n")
            if nl < 0 or pos + nl + 1 >= end:
                return
            buf = buf[nl + 1:]
        while buf and not buf.endswith(b"\n"):  # the last line runs on past `end`: read it whole
            more = f.read(1 << 16)
            if not more:
                break
            cut = more.find(b"\n")
            buf += more if cut < 0 else more[:cut + 1]
            if cut >= 0:
                break
    if start == 0 and buf.startswith(b"\xef\xbb\xbf"):
        buf = buf[3:]
    lines = buf.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for n, raw in enumerate(lines, start=chunk["first_line"]):
        yield n, raw.rstrip(b"\r")


def _line_rows(name: str, ext: str, lines: Iterable[tuple[int, bytes]]) -> Iterator[dict]:
    for n, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield {"source": f"{name}:{n}", "error": "undecodable bytes (not UTF-8)"}
            continue
        if not text.strip():
            continue
        if ext == ".txt":
            yield {"prompt": text, "source": f"{name}:{n}"}
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield {"source": f"{name}:{n}", "error": f"invalid JSON: {exc.msg}"}
            continue
        if not isinstance(obj, dict):
            yield {"source": f"{name}:{n}", "error": "JSON line is not an object"}
            continue
        yield {**obj, "source": f"{name}:{n}"}


def _raw_rows(chunk: dict, storage=None) -> Iterator[dict]:
    """Raw, unvalidated rows (prompt/id/seed/negative_prompt, source, error) of one read unit, streamed."""
    uri = chunk["file"]
    name, ext = os.path.basename(uri), os.path.splitext(uri)[1].lower()
    if ext in LINE_FORMATS:
        yield from _line_rows(name, ext, _chunk_lines(chunk, storage))
        return
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as raw:
        if ext == ".csv":
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=""))
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise ValueError(f"{uri}: CSV needs a header with a 'prompt' column (found {reader.fieldnames})")
            for n, row in enumerate(reader, start=2):
                if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                    yield {"source": f"{name}:{n}", "error": "undecodable bytes (not UTF-8)"}
                    continue
                yield {**{k: (v if v != "" or k == "prompt" else None) for k, v in row.items() if k},
                       "source": f"{name}:{n}"}
        elif ext == ".parquet":
            pf = pq.ParquetFile(raw)
            if "prompt" not in pf.schema_arrow.names:
                raise ValueError(f"{uri}: Parquet needs a 'prompt' column (found {pf.schema_arrow.names})")
            n = 0
            for batch in pf.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    n += 1
                    p = row.get("prompt")
                    if isinstance(p, bytes):
                        try:
                            row["prompt"] = p.decode("utf-8")
                        except UnicodeDecodeError:
                            yield {"source": f"{name}:row{n}", "error": "undecodable bytes (not UTF-8)"}
                            continue
                    yield {**row, "source": f"{name}:row{n}"}
        else:
            raise ValueError(f"{uri}: unsupported prompt file type {ext!r} (use {', '.join(FORMATS)})")


def chunk_rows(chunk: dict, storage=None) -> Iterator[dict]:
    """The PROMPT_SCHEMA rows of one read unit, in input order (validated, not yet deduplicated)."""
    for raw in _raw_rows(chunk, storage):
        yield normalise_row(raw)


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


# ----------------------------------------------------------------------------- one row


def _parse_seed(value) -> tuple[int | None, str | None]:
    if value is None or value == "":
        return None, None
    if isinstance(value, bool):
        return None, f"bad seed {value!r}: not an integer"
    if isinstance(value, float):
        if not value.is_integer():
            return None, f"bad seed {value!r}: not an integer"
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None, f"bad seed {value!r}: not an integer"
    if not isinstance(value, int):
        return None, f"bad seed {value!r}: not an integer"
    if not 0 <= value <= MAX_SEED:
        return None, f"bad seed {value}: must be in [0, 2^63)"
    return value, None


def invalid_id(source) -> str:
    """The id a row that cannot be generated is recorded under: stable, from where the row came from."""
    return "invalid-" + prompt_id(str(source))


def normalise_row(raw: dict) -> dict:
    """One raw input row -> a PROMPT_SCHEMA row (error set when unusable; the job records it as failed)."""
    row = {"id": None, "prompt": None, "negative_prompt": "", "seed": None, "source": raw.get("source"), "error": raw.get("error")}
    if row["error"]:
        return mark_failed(row, row["error"])
    prompt = raw.get("prompt")
    neg = raw.get("negative_prompt")
    neg = "" if neg is None else neg
    if not isinstance(prompt, str):
        row["error"] = "missing prompt" if prompt is None else f"prompt is not text ({type(prompt).__name__})"
    elif not prompt.strip():
        row["error"] = "empty prompt"
    elif not isinstance(neg, str):
        row["error"] = f"negative_prompt is not text ({type(neg).__name__})"
    else:
        row["prompt"] = " ".join(prompt.split())
        row["negative_prompt"] = " ".join(neg.split())
    given_id = raw.get("id")
    if isinstance(given_id, int) and not isinstance(given_id, bool):
        given_id = str(given_id)  # {"id": 17} names the same scene as {"id": "17"}
    if isinstance(given_id, str):
        given_id = given_id.strip()
    if given_id is not None and given_id != "":
        if problem := id_problem(given_id):
            row["error"] = problem  # refused, not mapped: the row is recorded failed under an id of its own
        row["id"] = given_id
    elif row["error"] is None:
        row["id"] = prompt_id(row["prompt"], row["negative_prompt"])
    seed, seed_error = _parse_seed(raw.get("seed"))
    if seed_error and row["error"] is None:
        row["error"] = seed_error
    if row["error"] is not None:
        return mark_failed(row, row["error"])
    row["seed"] = seed if seed is not None else seed_from(row["id"])
    return row


def mark_failed(row: dict, error: str) -> dict:
    """`row` as a row that cannot be generated: `error` set, under its own id (from its source) and seed."""
    rid = invalid_id(row["source"])
    return {**row, "id": rid, "seed": seed_from(rid), "error": error}


# ----------------------------------------------------------------------------- which rows are new work


def _digest(text: str | None) -> bytes:
    return hashlib.blake2b((text or "").encode("utf-8"), digest_size=8).digest()


class PromptLedger:
    """Decides, for rows in arrival order, which are new work (see the module docstring), and counts why
    the others are not: `duplicates`, `conflicts`, `recorded` (in `skip`: an earlier run's), `invalid`.

    It keeps one small entry per id it has seen (digests of prompt and negative prompt, the seed, the
    source), so a job can shard it by id. Admitting the same row twice (a retried task) admits it again.
    Rows of an id in `skip` are skipped before any claim, so which of two conflicting rows an earlier run
    recorded stays as it was, whatever order this run's rows arrive in."""

    def __init__(self, skip: Iterable[str] = ()):
        self.skip = set(skip)
        self.claims: dict[str, tuple] = {}
        self.stats: collections.Counter[str] = collections.Counter()

    def recorded(self, ids: list[str]) -> list[bool]:
        """Which of `ids` an earlier run recorded (no claim, no count): lets a job drop rows before costly checks."""
        return [i in self.skip for i in ids]

    def note_recorded(self, n: int) -> None:
        """Count `n` rows a job dropped as recorded without admitting them (see `recorded`)."""
        self.stats["rows"] += n
        self.stats["recorded"] += n

    def admit(self, row: dict) -> dict | None:
        """The row to process (a conflict comes back as a failed row), or None when it adds no work."""
        self.stats["rows"] += 1
        rid, source = row["id"], row["source"]
        if row["error"] is None and rid in self.skip:  # before claiming: an earlier run's scene keeps its id
            self.stats["recorded"] += 1
            return None
        if row["error"] is None:
            mine = (_digest(row["prompt"]), _digest(row["negative_prompt"]), row["seed"], source)
            first = self.claims.setdefault(rid, mine)
            if first[3] != source:
                differ = [k for k, a, b in zip(("prompt", "negative_prompt", "seed"), first[:3], mine[:3]) if a != b]
                if not differ:
                    self.stats["duplicates"] += 1
                    return None
                self.stats["conflicts"] += 1
                row = mark_failed(row, f"duplicate id {rid!r} with a different {' and '.join(differ)} than {first[3]} "
                                       f"(which keeps the id)")
        if row["error"] is not None and self.claims.setdefault(row["id"], (None, None, None, source))[3] != source:
            self.stats["duplicates"] += 1  # the same bad source twice (equal file names in two directories)
            return None
        if row["id"] in self.skip:
            self.stats["recorded"] += 1
            return None
        if row["error"] is not None:
            self.stats["invalid"] += 1
        return row


def read_prompts(uri: str, storage=None, skip: Iterable[str] = ()) -> tuple[pa.Table, dict]:
    """Read every prompt file under `uri` into one PROMPT_SCHEMA table on this process, one row per id, without
    ids in `skip` (for small sets: a job streams big ones, see `plan_chunks`). Returns the table and stats:
    files, rows read, duplicates collapsed, conflicting ids, invalid rows, recorded (skipped)."""
    ledger = PromptLedger(skip)
    chunks = plan_chunks(uri, storage, chunk_bytes=1 << 62)  # one unit a file: line numbers need no count
    rows = [r for c in chunks for raw in chunk_rows(c, storage) if (r := ledger.admit(raw)) is not None]
    stats = {"files": len({c["file"] for c in chunks}), **{k: ledger.stats[k] for k in
                                                          ("rows", "duplicates", "conflicts", "invalid", "recorded")}}
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), stats
