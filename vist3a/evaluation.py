"""The evaluation's records and statistics: per-scene rows, resumable parts, the summary table (mean ± CI
per benchmark and metric) and the comparison of two runs. `pipelines.evaluate` runs it on Ray Data;
everything here is plain Python and pyarrow, testable in one process.

Layout under `evaluate.output`:
    parts/<hash>.parquet      one part per scored batch (the commit record; a rerun skips committed scenes)
    scenes.parquet            every part compacted, one row per (benchmark, id)
    summary.json, summary.md  mean, CI half-width and n per benchmark and metric
    generated/<benchmark>/    scenes generated from a prompt set (a pipelines.generate dataset)
"""

from __future__ import annotations

import hashlib
import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from vist3a.config import SCORE_COLUMNS
from vist3a.io.uri import exists, filesystem, join, read_bytes, read_text, write_bytes, write_text
from vist3a.scores import SceneScorer
from vist3a.splats.gaussians import Cameras
from vist3a.splats.ply import read_ply
from vist3a.splats.spz import read_spz

ALL_SCORES = [c for cols in SCORE_COLUMNS.values() for c in cols]
#: columns carried over from the dataset's manifest (consistency needs the frames, kept only at generation)
FROM_MANIFEST = SCORE_COLUMNS["consistency"]

EVAL_SCHEMA = pa.schema([
    ("key", pa.string()),            # <benchmark>/<id>
    ("benchmark", pa.string()),
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("scene_uri", pa.string()),
    ("cameras_uri", pa.string()),
    ("status", pa.string()),         # done | failed
    ("error", pa.string()),
    *[(c, pa.float64()) for c in ALL_SCORES],
    ("eval_s", pa.float64()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
])


def empty_eval_row() -> dict:
    return {f.name: None for f in EVAL_SCHEMA}


# ----------------------------------------------------------------------------- scoring a saved scene


def score_saved_scene(scorer: SceneScorer, row: dict, storage=None) -> dict[str, float]:
    """Scores of a scene on disk (its .ply or .spz and cameras.json, from a manifest row). Consistency comes from
    the row (computed where the scene was made, against the frames); NaN when the dataset has none."""
    uri = row["scene_uri"]
    gaussians = (read_spz if uri.endswith(".spz") else read_ply)(read_bytes(uri, storage))  # scene_uri: .ply, else .spz
    cameras = Cameras.from_json(json.loads(read_text(row["cameras_uri"], storage)))
    scores = scorer.score(gaussians, cameras, row["prompt"])
    for c in FROM_MANIFEST:
        if c in scores:
            v = row.get(c)
            scores[c] = math.nan if v is None else float(v)
    return scores


# ----------------------------------------------------------------------------- parts and resume


def _parts_dir(output: str) -> str:
    return join(output, "parts")


def write_eval_part(output: str, rows: list[dict], storage=None) -> str:
    """Commit a batch of rows as one Parquet part named by its keys (a retried batch rewrites the same part)."""
    keys = sorted(r["key"] for r in rows)
    name = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24] + ".parquet"
    table = pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = join(_parts_dir(output), name)
    write_bytes(uri, buf.getvalue(), storage)
    return uri


def read_eval(output: str, storage=None) -> pa.Table:
    """Every committed row, one per key: a 'done' row wins over a 'failed' one, later parts over earlier."""
    fs, root = filesystem(output, storage)
    parts = root.rstrip("/") + "/parts"
    paths = sorted(fs.glob(parts + "/*.parquet")) if fs.exists(parts) else []
    best: dict[str, dict] = {}
    for p in paths:
        with fs.open(p, "rb") as f:
            for row in pq.read_table(f, schema=EVAL_SCHEMA).to_pylist():
                prev = best.get(row["key"])
                if prev is None or row["status"] == "done" or prev["status"] != "done":
                    best[row["key"]] = row
    return pa.Table.from_pylist(sorted(best.values(), key=lambda r: r["key"]), schema=EVAL_SCHEMA)


def recorded_keys(output: str, storage=None, include_failed: bool = True) -> set[str]:
    t = read_eval(output, storage)
    return {k for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist())
            if s == "done" or (include_failed and s == "failed")}


def compact_eval(output: str, storage=None) -> pa.Table:
    table = read_eval(output, storage)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(join(output, "scenes.parquet"), buf.getvalue(), storage)
    return table


def read_scenes_table(run: str, storage=None) -> pa.Table:
    """A finished run's scenes.parquet (else its parts)."""
    uri = join(run, "scenes.parquet")
    if exists(uri, storage):
        return pq.read_table(io.BytesIO(read_bytes(uri, storage)))
    table = read_eval(run, storage)
    if not table.num_rows:
        raise FileNotFoundError(f"no evaluation at {run} (looked for {uri} and {_parts_dir(run)}/*.parquet)")
    return table


# ----------------------------------------------------------------------------- statistics


def _t_cdf(x: float, df: float) -> float:
    """Student-t CDF for x >= 0 by Simpson integration of the density (accurate to ~1e-10 here)."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000
    h = x / n
    pdf = lambda t: math.exp(logc - (df + 1) / 2 * math.log1p(t * t / df))  # noqa: E731
    s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection on its CDF."""
    if df > 1e4:
        df = 1e4
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], confidence: float = 0.95) -> dict:
    """{mean, ci (half-width of the t interval), n} over the finite values; ci is NaN for n < 2."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "ci": math.nan, "n": 0}
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "ci": math.nan, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return {"mean": mean, "ci": t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), "n": n}


def summarize(table: pa.Table, metrics: list[str] | None = None, confidence: float = 0.95) -> dict:
    """{benchmark: {metric: {mean, ci, n}, "scenes": done, "failed": failed}} over the 'done' rows."""
    metrics = metrics or ALL_SCORES
    rows = table.to_pylist()
    out: dict[str, dict] = {}
    for bench in sorted({r["benchmark"] for r in rows}):
        mine = [r for r in rows if r["benchmark"] == bench]
        done = [r for r in mine if r["status"] == "done"]
        out[bench] = {"scenes": len(done), "failed": len(mine) - len(done),
                      **{m: mean_ci([r[m] for r in done], confidence) for m in metrics}}
    return out


def _cell(s: dict, digits: int = 3) -> str:
    if s["n"] == 0:
        return "–"
    if not math.isfinite(s["ci"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['ci']:.{digits}f}"


def summary_markdown(summary: dict, metrics: list[str], confidence: float = 0.95, title: str = "") -> str:
    """One row per benchmark, one column per metric: mean ± CI half-width (the paper's tables' layout)."""
    lines = [title] if title else []
    lines.append(f"mean ± {confidence:.0%} CI half-width (t interval) over scenes; n = scenes scored")
    lines.append("")
    lines.append("| benchmark | n | failed | " + " | ".join(metrics) + " |")
    lines.append("|---|---|---|" + "---|" * len(metrics))
    for bench, s in summary.items():
        lines.append(f"| {bench} | {s['scenes']} | {s['failed']} | " + " | ".join(_cell(s[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def write_summary(output: str, table: pa.Table, metrics: list[str], confidence: float, storage=None) -> dict:
    summary = summarize(table, metrics, confidence)
    write_text(join(output, "summary.json"), json.dumps({"confidence": confidence, "benchmarks": summary}, indent=1,
                                                        allow_nan=True), storage)
    write_text(join(output, "summary.md"), summary_markdown(summary, metrics, confidence), storage)
    return summary


def compare(a: pa.Table, b: pa.Table, metrics: list[str] | None = None, confidence: float = 0.95) -> dict:
    """b - a per benchmark and metric, with its CI: paired over the scenes both runs scored (same benchmark
    and id, e.g. the same prompts with and without the aligned LoRA), else Welch's interval."""
    metrics = metrics or ALL_SCORES
    ra = {r["key"]: r for r in a.to_pylist() if r["status"] == "done"}
    rb = {r["key"]: r for r in b.to_pylist() if r["status"] == "done"}
    out: dict[str, dict] = {}
    for bench in sorted({r["benchmark"] for r in ra.values()} & {r["benchmark"] for r in rb.values()}):
        ka = {k for k, r in ra.items() if r["benchmark"] == bench}
        kb = {k for k, r in rb.items() if r["benchmark"] == bench}
        shared = sorted(ka & kb)
        res = {}
        for m in metrics:
            if shared:
                pairs = [(ra[k][m], rb[k][m]) for k in shared]
                diffs = [y - x for x, y in pairs if x is not None and y is not None
                         and math.isfinite(x) and math.isfinite(y)]
                s = mean_ci(diffs, confidence)
                res[m] = {"diff": s["mean"], "ci": s["ci"], "n": s["n"], "paired": True}
            else:
                sa, sb = (mean_ci([ra[k][m] for k in ka], confidence), mean_ci([rb[k][m] for k in kb], confidence))
                res[m] = {"diff": sb["mean"] - sa["mean"], "ci": _welch_ci([ra[k][m] for k in ka],
                                                                          [rb[k][m] for k in kb], confidence),
                          "n": min(sa["n"], sb["n"]), "paired": False}
        out[bench] = res
    return out


def _welch_ci(x: list, y: list, confidence: float) -> float:
    x = [float(v) for v in x if v is not None and math.isfinite(v)]
    y = [float(v) for v in y if v is not None and math.isfinite(v)]
    if len(x) < 2 or len(y) < 2:
        return math.nan
    var = lambda v: sum((t - sum(v) / len(v)) ** 2 for t in v) / (len(v) - 1)  # noqa: E731
    va, vb = var(x) / len(x), var(y) / len(y)
    se2 = va + vb
    if se2 == 0:
        return 0.0
    df = se2 ** 2 / ((va ** 2 / (len(x) - 1)) + (vb ** 2 / (len(y) - 1)))
    return t_quantile(0.5 + confidence / 2, df) * math.sqrt(se2)


def comparison_markdown(result: dict, metrics: list[str], confidence: float = 0.95) -> str:
    lines = [f"difference (B - A), mean ± {confidence:.0%} CI half-width; paired over shared scenes where marked (p)", "",
             "| benchmark | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for bench, res in result.items():
        cells = []
        for m in metrics:
            r = res[m]
            if r["n"] == 0 or not math.isfinite(r["diff"]):
                cells.append("–")
                continue
            ci = f" ± {r['ci']:.3f}" if math.isfinite(r["ci"]) else ""
            cells.append(f"{r['diff']:+.3f}{ci}{' (p)' if r['paired'] else ''}")
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- filtering


def filter_scores(table: pa.Table, minimum: dict[str, float] | None = None, maximum: dict[str, float] | None = None
                  ) -> tuple[pa.Table, dict[str, int]]:
    """The 'done' rows whose score columns are >= `minimum` and <= `maximum` (a null or NaN score fails its
    test: a score that was not computed cannot vouch for a scene) -> (rows kept, rows each test dropped)."""
    import pyarrow.compute as pc

    minimum, maximum = minimum or {}, maximum or {}
    for col in [*minimum, *maximum]:
        if col not in table.column_names:
            raise ValueError(f"no column {col!r} to filter on; score columns: "
                             f"{[c for c in ALL_SCORES if c in table.column_names]}")
    keep = pc.equal(table.column("status"), "done")
    dropped = {"status != done": table.num_rows - pc.sum(keep.cast(pa.int64())).as_py()}
    tests = [(c, ">=", v, pc.greater_equal) for c, v in minimum.items()] + \
            [(c, "<=", v, pc.less_equal) for c, v in maximum.items()]
    for col, op, value, fn in tests:
        column = table.column(col).cast(pa.float64())
        ok = pc.fill_null(pc.and_(fn(column, value), pc.invert(pc.is_nan(column))), False)
        dropped[f"{col} {op} {value}"] = pc.sum(pc.and_(keep, pc.invert(ok)).cast(pa.int64())).as_py()
        keep = pc.and_(keep, ok)
    return table.filter(keep), dropped
