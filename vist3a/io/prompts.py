"""Prompt sets: .txt (one a line), .jsonl, .csv, .parquet from a path, a glob or an s3:// prefix.

Every input row becomes a row of one table (`PROMPT_SCHEMA`); a row that cannot be used keeps
its place with `error` set, so a job records it as failed instead of crashing. Ids are stable
(from content unless given), duplicate prompts collapse to one id, and seeds derive from ids.
A given id must follow vist3a.ids.ID_RULE (it names files): other ids are refused, not mapped.
Duplicates are resolved after validation: a valid row wins its id over bad rows, and a second row
giving the same id for a different prompt is recorded as failed, saying so.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from vist3a.ids import id_problem, prompt_id, seed_from
from vist3a.io.uri import filesystem, is_s3

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
MAX_SEED = 2**63 - 1

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


def _decode_lines(data: bytes):
    """Yield (line_number, text or None) — None for a line that is not valid UTF-8."""
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None


def _raw_rows(uri: str, data: bytes):
    """Yield dicts with prompt/id/seed/negative_prompt (raw, unvalidated), source and error."""
    name = os.path.basename(uri)
    ext = os.path.splitext(uri)[1].lower()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if ext == ".txt":
        for n, text in _decode_lines(data):
            if text is None:
                yield {"source": f"{name}:{n}", "error": "undecodable bytes (not UTF-8)"}
            elif text.strip():
                yield {"prompt": text, "source": f"{name}:{n}"}
    elif ext == ".jsonl":
        for n, text in _decode_lines(data):
            if text is None:
                yield {"source": f"{name}:{n}", "error": "undecodable bytes (not UTF-8)"}
                continue
            if not text.strip():
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
    elif ext == ".csv":
        text = data.decode("utf-8", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise ValueError(f"{uri}: CSV needs a header with a 'prompt' column (found {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                yield {"source": f"{name}:{n}", "error": "undecodable bytes (not UTF-8)"}
                continue
            yield {**{k: (v if v != "" or k == "prompt" else None) for k, v in row.items() if k}, "source": f"{name}:{n}"}
    elif ext == ".parquet":
        table = pq.read_table(io.BytesIO(data))
        if "prompt" not in table.column_names:
            raise ValueError(f"{uri}: Parquet needs a 'prompt' column (found {table.column_names})")
        for n, row in enumerate(table.to_pylist(), start=1):
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


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


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
    """The id a row that cannot keep its own gets: stable, from where the row came from."""
    return "invalid-" + prompt_id(str(source))


def normalise_row(raw: dict) -> dict:
    """One raw input row -> a PROMPT_SCHEMA row (error set when unusable; the job records it as failed)."""
    row = {"id": None, "prompt": None, "negative_prompt": "", "seed": None, "source": raw.get("source"), "error": raw.get("error")}
    if row["error"]:
        row["id"] = invalid_id(raw.get("source"))
        row["seed"] = seed_from(row["id"])
        return row
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
    if given_id is not None and given_id != "" and (problem := id_problem(given_id)):
        row["error"] = problem  # refused, not mapped: the row is recorded failed under an id of its own
        row["id"] = invalid_id(raw.get("source"))
    elif given_id is not None and given_id != "":
        row["id"] = given_id
    elif row["error"] is None:
        row["id"] = prompt_id(row["prompt"], row["negative_prompt"])
    else:
        row["id"] = invalid_id(raw.get("source"))
    seed, seed_error = _parse_seed(raw.get("seed"))
    if seed_error and row["error"] is None:
        row["error"] = seed_error
    row["seed"] = seed if seed is not None else seed_from(row["id"])
    return row


def read_prompts(uri: str, storage=None) -> tuple[pa.Table, dict]:
    """Read every prompt file under `uri` into one PROMPT_SCHEMA table, one row per id.

    Rows are validated first, then deduplicated (`deduplicate`). Returns the table and stats: files,
    rows read, duplicates collapsed, conflicting ids, invalid rows."""
    rows = []
    stats = {"files": 0, "rows": 0}
    for f in list_inputs(uri, storage):
        fs, path = filesystem(f, storage)
        stats["files"] += 1
        for raw in _raw_rows(f, fs.cat_file(path)):
            stats["rows"] += 1
            rows.append(normalise_row(raw))
    rows, dedup = deduplicate(rows)
    stats.update(dedup, invalid=sum(r["error"] is not None for r in rows))
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), stats


def deduplicate(rows: list[dict]) -> tuple[list[dict], dict]:
    """One row per id, in input order, after validation:

    - a valid row wins its id: the first valid row with an id keeps it, whatever bad rows came before;
    - a later valid row with the same id and the same prompt, negative prompt and seed is a duplicate
      (collapsed); with a different one it is a conflict, kept as a failed row that says so;
    - a bad row whose id is taken (by a valid row, or an earlier bad one) keeps its error under an id of
      its own (from its source), so no bad row hides a good one and every bad row is reported."""
    winner: dict[str, dict] = {}
    for row in rows:
        if row["error"] is None:
            winner.setdefault(row["id"], row)
    out, taken = [], set()
    stats = {"duplicates": 0, "conflicts": 0}
    for row in rows:
        rid = row["id"]
        if row["error"] is None:
            first = winner[rid]
            if first is row:
                out.append(row)
                taken.add(rid)
                continue
            differ = [k for k in ("prompt", "negative_prompt", "seed") if row[k] != first[k]]
            if not differ:
                stats["duplicates"] += 1
                continue
            stats["conflicts"] += 1
            row = {**row, "id": invalid_id(row["source"]),
                   "error": f"duplicate id {rid!r} with a different {' and '.join(differ)} than {first['source']} "
                            f"(which keeps the id)"}
        elif rid in taken or rid in winner:
            row = {**row, "id": invalid_id(row["source"])}
        if row["id"] in taken:  # the same bad source twice (equal file names in two directories)
            stats["duplicates"] += 1
            continue
        taken.add(row["id"])
        out.append(row)
    return out, stats
