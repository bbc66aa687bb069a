"""Bulk-job bookkeeping at dataset scale: resume cost, the driver's memory, and a new user's end to end.

Run by hand (not a test); it prints one side-by-side table and writes benchmarks/results/bulk-bookkeeping-cpu.json:

    .venv/bin/python benchmarks/bulk_bookkeeping.py                       # every part (~1.5 h on 2 cores)
    .venv/bin/python benchmarks/bulk_bookkeeping.py --parts a --sizes 1e4 --old-sizes 1e3 --no-s3   # smoke

Parts (--parts, comma-separated):
  a  Resume bookkeeping on a synthetic committed manifest of --sizes scenes (realistic MANIFEST_SCHEMA rows:
     the row of a real tiny-preset scene written by the job's own write stage, varied per id: ~80-char
     prompt, URIs, file sizes, timings, provenance, finished_at; every 50th row failed), each measured in a
     fresh process (seconds, and peak RSS = VmHWM of that process, imports included; the RSS after
     imports is printed beside it).
       before  the code at git commit 0aee6a3 (loaded from the git blob at run time): one part of 2 rows per
               batch in manifest/parts/ plus the manifest.parquet its last run compacted; start of a run =
               recorded_ids, end of a run = compact_manifest. Measured at --old-sizes; larger --sizes are
               extrapolated linearly in parts (said so in the table).
       after   the working tree: commit parts of --part-rows rows in commits/ (1000 = a refused-row block,
               32 = generate.commit_scenes), then (i) start of a run on a log not yet folded =
               consolidate_manifest + recorded_id_array, (ii) the same on the consolidated manifest (the
               normal resume; a run's end does the same fold).
     With --s3 (default) also against a loopback S3 server (moto, in its own process) at --s3-sizes and
     --s3-old-sizes; an S3 case of more than --s3-max-files objects is skipped.
  b  The driver's peak RSS and wall time while the real job (python -m pipelines.generate, tiny preset,
     2 steps) streams a prompt file of --prompt-rows lines (~--prompt-chars each, written to the work
     directory) with generate.limit = --limit.
  c  benchmarks/generate_throughput.py as it is (--throughput-args): the pipeline / plain-loop throughput
     (end to end, and the steady state as the marginal rate N / (T(2N) - T(N))); then the same with every
     config it builds given generate.commit_scenes=--throughput-commit-scenes (0: not run).
  d  A new user's end to end: --refused-rows prompts all refused at validation (--refused-kind long: over
     the tiny preset's token limit; empty: {"prompt": ""} JSON lines) plus --valid-rows valid ones, through
     python -m pipelines.generate on a fresh output: seconds, driver peak RSS, commit parts written, files
     under commits/ + manifest/ after it; then the same command again (nothing left to do: the prompt file
     is skipped unread, inputs.json records that the first run read it whole); then once more with
     inputs.json deleted ("reread": the file read again and every row skipped as recorded, the work a
     resume after a kill does over the rows it had already finished).
  e  A resume after a kill: (d)'s prompt file cut into read units of --kill-chunk-mb, the job SIGKILLed (driver
     and its Ray) once --kill-at of the units are recorded in inputs.json as finished; then the resume (the
     finished units skipped unread) and, on a copy of the same killed output with inputs.json deleted, the
     resume that reads every row again: seconds, rows read, driver peak RSS, side by side.

Targets (issue 15): (a) <= 10 s and <= 1 GB for 10^6 committed scenes locally, cost growing with
scenes/1000 not with batches; (d) rerun <= 30 s with the driver <= 1.5 GB, first-run commit parts ~ rows/1000.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

BEFORE_COMMIT = "0aee6a3"
FAST = {"sampling": {"steps": 2}, "splats": {"preview_views": 2, "preview_size": 32}}  # as tests/test_generate_pipeline.py
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TARGETS = {"a_s": 10.0, "a_mb": 1024.0, "d_rerun_s": 30.0, "d_rerun_mb": 1536.0}


# ----------------------------------------------------------------------------- small helpers


def peak_rss_mb() -> float:
    """This process's peak resident set size so far: VmHWM of /proc/self/status. Not ru_maxrss: across the
    vfork + exec that starts a child, Linux carries the parent's high-water mark into the child's ru_maxrss."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def size_arg(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def sci(n: int) -> str:
    e = len(str(n)) - 1
    return f"1e{e}" if n == 10**e else str(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessSampler:
    """Peak RSS of every descendant of a process (the job's local Ray: gcs, raylet, its workers by their
    ray:: names: IdLedger, MapWorker(...ValidatePrompts), MapWorker(MapBatches(GenerateScenes)), ...)."""

    def __init__(self, pid: int, every_s: float = 0.25):
        self.pid, self.every_s, self.peaks = pid, every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                kids = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for k in kids:
                try:
                    cmd = k.cmdline()
                    name = cmd[0] if cmd and cmd[0].startswith("ray::") else k.name()
                    name = re.sub(r"\.[A-Za-z_]\w*$", "", name)  # ray::X.submit / .__init__ / .admit: the actor X
                    mb = k.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.peaks[name] = round(max(self.peaks.get(name, 0.0), mb), 1)
            time.sleep(self.every_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return dict(sorted(self.peaks.items(), key=lambda kv: -kv[1]))


def child(mode: str, spec: dict, env: dict | None = None, timeout: float = 7200, log: str | None = None,
          sample: bool = False) -> dict:
    """Run this file as a fresh process in `mode`; its last JSON stdout line is its result. `log`: keep its
    output there; `sample`: add the peak RSS of its descendants (ProcessSampler) as 'descendants_peak_rss_mb'."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    sampler = ProcessSampler(proc.pid) if sample else None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        peaks = sampler.stop() if sampler else None
    if log:
        with open(log, "w") as f:
            f.write(stdout + "\n--- stderr ---\n" + stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
    for line in reversed(stdout.strip().splitlines()):  # the job may print after it: the last JSON line
        if line.startswith("{"):
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            if peaks is not None:
                res["descendants_peak_rss_mb"] = peaks
            return res
    raise RuntimeError(f"child {mode} printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")


def load_before_module():
    """vist3a/dataset.py as of BEFORE_COMMIT, from the git blob, as a throwaway module (never written to disk)."""
    import types

    src = subprocess.check_output(["git", "-C", REPO, "show", f"{BEFORE_COMMIT}:vist3a/dataset.py"])
    mod = types.ModuleType(f"vist3a_dataset_{BEFORE_COMMIT}")
    mod.__file__ = f"<git {BEFORE_COMMIT}:vist3a/dataset.py>"
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 - our own code at an earlier commit
    return mod


# ----------------------------------------------------------------------------- children (fresh processes)


def child_template(spec: dict) -> dict:
    """One real tiny-preset scene through the job's own write stage; its manifest row (the synthetic rows' model)."""
    import pickle

    import torch

    torch.set_num_threads(1)
    from pipelines.generate import write_scenes
    from vist3a.config import build_config
    from vist3a.dataset import STAGE_SCHEMA, read_manifest, typed_table
    from vist3a.generator import SceneGenerator

    out = spec["output"]
    cfg = build_config({**FAST, "generate": {"output": out}})
    gen = SceneGenerator(cfg)
    scene = gen.generate(["a red barn by a lake at dawn"], [7])[0]
    row = {"id": "template", "prompt": scene.prompt, "negative_prompt": "", "seed": 7, "source": "p.txt:1",
           "error": None, "scene": pickle.dumps(scene), "meta": json.dumps(gen.meta(scene))}
    write_scenes(typed_table([row], STAGE_SCHEMA), out, cfg.storage.model_dump(), cfg.splats.ply_sh_degree,
                 cfg.splats.formats)
    return json.loads(json.dumps(read_manifest(out).to_pylist()[0], default=str))


def child_bookkeeping(spec: dict) -> dict:
    """One bookkeeping step on `output` with the before (git blob) or after (working tree) code."""
    from vist3a.config import StorageConfig

    storage = StorageConfig.model_validate(spec["storage"]) if spec.get("storage") else None
    out, op = spec["output"], spec["op"]
    if op.startswith("before"):
        mod = load_before_module()
    else:
        from vist3a import dataset as mod
    import pyarrow.compute  # noqa: F401 - imported by both codes' first call; counted in the baseline, not the step
    import pyarrow.dataset  # noqa: F401
    base_rss, base_peak = rss_mb(), peak_rss_mb()
    res: dict = {}
    t0 = time.perf_counter()
    if op == "before_start":     # the old run's start: every part and manifest.parquet read, row by row
        res["ids"] = len(mod.recorded_ids(out, storage))
    elif op == "before_end":     # the old run's end: the same read, then manifest.parquet rewritten
        res["rows"] = mod.compact_manifest(out, storage).num_rows
    elif op == "after_start":    # the new run's start: the ids to skip (id, status of buckets + unfolded parts)
        res["ids"] = len(mod.recorded_id_array(out, storage))
    elif op == "after_end":      # the new run's end (and its periodic folds): the commit log into the buckets
        res["consolidation"] = mod.consolidate_manifest(out, storage)
    else:
        raise ValueError(op)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res.update(peak_rss_mb=round(peak_rss_mb(), 1), rss_after_imports_mb=round(base_rss, 1),
               peak_before_step_mb=round(base_peak, 1))
    return res


def child_cli(spec: dict) -> dict:
    """`python -m pipelines.generate ARGV` in this process (its main(), as the module runs it), with the
    summary `run` returns kept and this process's (the driver's) peak RSS."""
    t0 = time.perf_counter()
    import pipelines.generate as job

    captured = {}
    real_run = job.run

    def run(cfg, progress_bar=None):
        captured["summary"] = real_run(cfg, progress_bar)
        return captured["summary"]

    job.run = run  # main() looks `run` up at call time
    rc = job.main(spec["argv"])
    return {"rc": rc, "seconds_in_process": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "summary": captured.get("summary")}


def child_throughput(spec: dict) -> dict:
    """benchmarks/generate_throughput.py with every config it builds given generate.commit_scenes (the script
    itself has no flag for it); its table is on stdout before the result line."""
    import runpy

    import vist3a.config as config

    real = config.build_config

    def build_config(data=None, *a, **k):
        data = dict(data or {})
        data["generate"] = {**data.get("generate", {}), "commit_scenes": spec["commit_scenes"]}
        return real(data, *a, **k)

    config.build_config = build_config  # the script imports it inside main(), after this
    path = os.path.join(REPO, "benchmarks", "generate_throughput.py")
    sys.argv = [path, *spec["argv"]]
    runpy.run_path(path, run_name="__main__")
    return {"commit_scenes": spec["commit_scenes"]}


CHILDREN = {"template": child_template, "bookkeeping": child_bookkeeping, "cli": child_cli,
            "throughput": child_throughput}


# ----------------------------------------------------------------------------- synthetic manifests (part a)

ADJ = ["red", "weathered", "glass", "moss-covered", "tiny", "sunlit", "ancient", "floating", "abandoned", "wooden"]
NOUN = ["barn", "lighthouse", "greenhouse", "castle", "cabin", "windmill", "tower", "bridge", "chapel", "market"]
PLACE = ["by a lake at dawn", "on a cliff above a stormy sea", "in a snowy pine forest", "in a desert canyon",
         "on a rainy city street", "beside a quiet river", "in a misty valley", "on a grassy hill at dusk"]
STYLE = ["photorealistic, soft light", "golden hour, wide shot", "overcast, high detail", "cinematic, 35mm"]


def synthetic_prompt(i: int) -> str:
    return (f"a {ADJ[i % 10]} {NOUN[i // 10 % 10]} {PLACE[i // 100 % 8]}, {STYLE[i // 800 % 4]}, "
            f"variant {i}")  # ~80 characters, every one distinct


def synthetic_rows(template: dict, output: str, start: int, n: int):
    """Rows start..start+n of a synthetic manifest (the working tree's MANIFEST_SCHEMA): done rows like
    `template` (a real tiny scene's) under their own ids, paths, sizes and timings; every 50th failed."""
    import numpy as np
    import pyarrow as pa

    from vist3a.dataset import MANIFEST_SCHEMA, shard_of
    from vist3a.ids import prompt_id, seed_from

    rng = np.random.default_rng(start)
    idx = range(start, start + n)
    prompts = [synthetic_prompt(i) for i in idx]
    ids = [prompt_id(p) for p in prompts]
    seeds = [seed_from(i) for i in ids]
    failed = [i % 50 == 49 for i in idx]
    shards = [shard_of(i) for i in ids]
    SENTINEL = 987654321987654
    prov = json.loads(template["provenance"])
    prov["sampling"]["seed"] = SENTINEL
    pre, post = json.dumps(prov, sort_keys=True).split(str(SENTINEL))

    def done(values):
        return [None if f else v for v, f in zip(values, failed)]

    def uri(ext):
        return done([f"{output}/scenes/{s}/{i}{ext}" for s, i in zip(shards, ids)])

    def jitter(key, lo=0.8, hi=1.25, integer=False):
        v = template[key] * rng.uniform(lo, hi, n)
        return done(v.astype(np.int64).tolist() if integer else v.tolist())

    def bbox(sign):
        flat = pa.array((sign * rng.uniform(0.3, 0.7, 3 * n)).astype(np.float32))
        return pa.FixedSizeListArray.from_arrays(flat, 3, mask=pa.array(failed))

    base_ms = int(datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    ply = uri(".ply")
    cols = {
        "id": ids, "prompt": prompts, "negative_prompt": [""] * n, "seed": seeds,
        "source": [f"prompts-{i // 1_000_000:03d}.txt:{i % 1_000_000 + 1}" for i in idx],
        "status": ["failed" if f else "done" for f in failed],
        "error": ["generation failed: RuntimeError: CUDA error: out of memory" if f else None for f in failed],
        "scene_uri": ply, "preview_uri": uri(".png"), "cameras_uri": uri(".cameras.json"), "ply_uri": ply,
        "spz_uri": [None] * n, "meta_uri": uri(".meta.json"),
        "ply_bytes": done([template["ply_bytes"]] * n), "spz_bytes": [None] * n,
        "preview_bytes": jitter("preview_bytes", integer=True), "cameras_bytes": done([template["cameras_bytes"]] * n),
        "meta_bytes": jitter("meta_bytes", 0.98, 1.02, integer=True), "num_gaussians": done([template["num_gaussians"]] * n),
        "bbox_min": bbox(-1.0), "bbox_max": bbox(1.0),
        **{k: jitter(k) for k in ("sample_s", "decode_s", "render_s", "write_s")},
        **{k: done([template[k]] * n) for k in ("preset", "prompt_template", "weights_fingerprint", "licence")},
        "provenance": done([f"{pre}{s}{post}" for s in seeds]),
        "vist3a_version": [template["vist3a_version"]] * n,
        "finished_at": pa.array(np.arange(start, start + n, dtype=np.int64) * 40 + base_ms, pa.int64()).cast(
            pa.timestamp("ms", tz="UTC")),
    }
    arrays = [cols[f.name] if isinstance(cols.get(f.name), pa.Array) else pa.array(cols.get(f.name, [None] * n), f.type)
              for f in MANIFEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


class Store:
    """Where a synthetic manifest's files go: a local directory, or a bucket on the loopback S3 server."""

    def __init__(self, root: str, endpoint: str | None = None):
        self.root, self.endpoint = root.rstrip("/"), endpoint
        self.client = None
        if endpoint:
            import boto3

            self.client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items()
                                                                       if k != "AWS_DEFAULT_REGION"},
                                       region_name="us-east-1")
        self.pool = concurrent.futures.ThreadPoolExecutor(16 if endpoint else 3)

    def put(self, rel: str, table, compression: str):
        import pyarrow.parquet as pq

        if self.client is None:
            path = f"{self.root}/{rel}"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path, compression=compression)
            return
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression)
        bucket, _, prefix = self.root[len("s3://"):].partition("/")
        self.client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=buf.getvalue())


def part_name(ids) -> str:
    """The commit part's name both codes give a set of ids (sha256 of the sorted ids, 24 hex + .parquet)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:24] + ".parquet"


def write_synthetic(store: Store, template: dict, n: int, layout: str, part_rows: int, chunk: int = 100_000) -> int:
    """A committed manifest of n scenes in `layout` ('before': 2-row parts in manifest/parts/ with the old
    schema, snappy, plus manifest.parquet; 'after': `part_rows`-row parts in commits/, zstd). Returns files."""
    old_schema = load_before_module().MANIFEST_SCHEMA if layout == "before" else None
    folder, compression = ("manifest/parts", "snappy") if layout == "before" else ("commits", "zstd")
    files, final = 0, []
    for start in range(0, n, chunk):
        table = synthetic_rows(template, store.root, start, min(chunk, n - start))
        if old_schema is not None:
            table = table.select(old_schema.names).cast(old_schema)
            final.append(table)
        slices = [table.slice(o, part_rows) for o in range(0, table.num_rows, part_rows)]
        futures = [store.pool.submit(store.put, f"{folder}/{part_name(s['id'].to_pylist())}", s, compression)
                   for s in slices]
        for f in futures:
            f.result()
        files += len(slices)
    if old_schema is not None:  # what the old run's end left: all parts compacted into manifest.parquet
        import pyarrow as pa

        store.put("manifest.parquet", pa.concat_tables(final).combine_chunks(), "snappy")
        files += 1
    return files


class MotoServer:
    """moto's S3 server on 127.0.0.1 in a process of its own (its CPU is not the measured process's)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
        return name

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def extrapolate(points: list[tuple[int, dict]], n: int, key: str) -> float:
    """Linear in parts (= in rows) through the two largest measured sizes; from one point, proportional
    (seconds) or proportional above the RSS after imports (peak RSS)."""
    (n2, r2) = points[-1]
    if len(points) == 1:
        base = r2["rss_after_imports_mb"] if key == "peak_rss_mb" else 0.0
        return base + (r2[key] - base) * n / n2
    (n1, r1) = points[-2]
    return r2[key] + (r2[key] - r1[key]) / (n2 - n1) * (n - n2)


def part_a(args, work: str, results: dict) -> None:
    template_dir = os.path.join(work, "template")
    print("[a] a real tiny-preset scene's manifest row (the synthetic rows' model) ...", flush=True)
    template = child("template", {"output": template_dir})
    cases = results.setdefault("a", [])

    def measure(where, n, layout, part_rows, store, files, steps, storage=None, env=None):
        for op, state in steps:
            t0, load = time.perf_counter(), os.getloadavg()[0]
            r = child("bookkeeping", {"op": op, "output": store.root, "storage": storage}, env)
            case = {"where": where, "scenes": n, "layout": layout, "part_rows": part_rows, "files": files, "op": op,
                    "state": state, **r, "wall_s": round(time.perf_counter() - t0, 2),
                    "load1": round(max(load, os.getloadavg()[0]), 1)}
            print(f"[a] {where} {sci(n)} {layout} {part_rows}-row parts, {state} ({files} files) {op}: {r['seconds']} s, "
                  f"peak {r['peak_rss_mb']} MB", flush=True)
            cases.append(case)
            files = 16 if op == "after_end" else files  # a fold leaves the 16 buckets

    def one_where(where, sizes, old_sizes, part_rows_list, root_of, storage=None, env=None):
        for n in old_sizes:
            store = root_of(f"before-{n}")
            t0 = time.perf_counter()
            files = write_synthetic(store, template, n, "before", 2)
            print(f"[a] {where}: wrote {sci(n)} scenes in the before layout ({files} files, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
            measure(where, n, "before", 2, store, files, [("before_start", "parts + manifest.parquet"),
                                                          ("before_end", "parts + manifest.parquet")], storage, env)
            if args.migrate and where == "local":  # the new code's first run on that output: a one-time fold
                measure(where, n, "before->after", 2, store, files, [("after_start", "older layout"),
                                                                   ("after_end", "migration")], storage, env)
            if where == "local":
                shutil.rmtree(store.root, ignore_errors=True)
        for n in sizes:
            for rows in part_rows_list:
                files = -(-n // rows)
                if where == "s3" and files > args.s3_max_files:
                    print(f"[a] s3: {sci(n)} scenes in {rows}-row parts = {files} objects > --s3-max-files: skipped",
                          flush=True)
                    cases.append({"where": where, "scenes": n, "layout": "after", "part_rows": rows, "files": files,
                                  "op": "skipped"})
                    continue
                store = root_of(f"after-{n}-{rows}")
                t0 = time.perf_counter()
                write_synthetic(store, template, n, "after", rows)
                print(f"[a] {where}: wrote {sci(n)} scenes in {rows}-row commit parts ({files} files, "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
                measure(where, n, "after", rows, store, files, [("after_start", "unfolded"), ("after_end", "unfolded"),
                                                                ("after_start", "consolidated")], storage, env)
                # one more commit part (a GPU task's 32 new scenes) folded onto the consolidated manifest: what
                # every fold during a run (generate.consolidate_every_s) and at its end costs
                extra = synthetic_rows(template, store.root, n, 32)
                store.put(f"commits/{part_name(extra['id'].to_pylist())}", extra, "zstd")
                measure(where, n, "after", rows, store, 17, [("after_start", "plus_one_part"),
                                                             ("after_end", "plus_one_part")], storage, env)
                if where == "local":
                    shutil.rmtree(store.root, ignore_errors=True)

    one_where("local", args.sizes, args.old_sizes, args.part_rows, lambda name: Store(os.path.join(work, "a", name)))
    if args.s3:
        server = MotoServer()
        try:
            bucket = server.bucket("bulk-bookkeeping")
            env = {**S3_ENV, "AWS_ENDPOINT_URL": server.endpoint}
            storage = {"s3_endpoint": server.endpoint, "s3_region": "us-east-1"}
            one_where("s3", args.s3_sizes, args.s3_old_sizes, args.part_rows,
                      lambda name: Store(f"s3://{bucket}/{name}", server.endpoint), storage, env)
        finally:
            server.stop()
    # the before code at sizes not measured: extrapolated linearly in parts
    for where, sizes in (("local", args.sizes), ("s3", args.s3_sizes if args.s3 else [])):
        for op in ("before_start", "before_end"):
            pts = sorted((c["scenes"], c) for c in cases if c["where"] == where and c["op"] == op and "seconds" in c)
            if not pts:
                continue
            for n in sizes:
                if n in {p[0] for p in pts}:
                    continue
                cases.append({"where": where, "scenes": n, "layout": "before", "part_rows": 2, "files": n // 2 + 1,
                              "op": op, "extrapolated_from": [p[0] for p in pts[-2:]],
                              "seconds": round(extrapolate(pts, n, "seconds"), 1),
                              "peak_rss_mb": round(extrapolate(pts, n, "peak_rss_mb"), 0)})


# ----------------------------------------------------------------------------- parts b, c, d


def job_yaml(path: str, inp: str, out: str, extra: dict | None = None) -> str:
    import yaml

    cfg = {"preset": "tiny", **json.loads(json.dumps(FAST)),
           "generate": {"input": inp, "output": out, "actors": 1, "cpus_per_actor": 1, "batch_size": 2,
                        "progress_every_s": 10, **(extra or {})},
           "ray": {"num_cpus": 4, "object_store_mb": 512, "progress_bars": False}}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_cli(config: str, watch: str | None = None, log: str | None = None) -> dict:
    """The job's CLI in a fresh process (wall seconds seen from outside, the driver's peak RSS); with
    `watch`, the commit parts seen under it while it runs (polled: every part stays until the final fold)."""
    seen, stop = set(), threading.Event()

    def poll():
        while not stop.is_set():
            try:
                seen.update(n for n in os.listdir(watch) if n.endswith(".parquet") and not n.startswith((".", "_")))
            except FileNotFoundError:
                pass
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    if watch:
        poller.start()
    t0, load = time.perf_counter(), os.getloadavg()[0]
    try:
        r = child("cli", {"argv": ["--config", config, "--no-progress-bar"]}, log=log, sample=True)
    finally:
        stop.set()
    r["wall_s"] = round(time.perf_counter() - t0, 2)
    r["load1"] = round(max(load, os.getloadavg()[0]), 1)
    if log:
        with open(log) as f:
            text = f.read()
        r["plan"] = sorted({m.split("Execution plan of Dataset ", 1)[1].split(": ", 1)[1] for m in text.splitlines()
                            if "Execution plan of Dataset " in m})
        r["log"] = log
    if watch:
        poller.join()
        r["commit_parts_seen"] = len(seen)
    return r


def count_files(out: str) -> dict:
    def n(sub):
        d = os.path.join(out, sub)
        return sum(len(fs) for _, _, fs in os.walk(d)) if os.path.isdir(d) else 0

    return {"commits": n("commits"), "manifest": n("manifest")}


def part_b(args, work: str, results: dict) -> None:
    d = os.path.join(work, "b")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "prompts.txt")
    t0 = time.perf_counter()
    with open(path, "w") as f:  # distinct lines of --prompt-chars characters (the number first keeps them distinct)
        for start in range(0, args.prompt_rows, 100_000):
            f.write("".join(f"{i}: {synthetic_prompt(i)}"[:args.prompt_chars] + "\n"
                            for i in range(start, min(start + 100_000, args.prompt_rows))))
    size = os.path.getsize(path)
    print(f"[b] wrote {args.prompt_rows} prompts ({size / 2**20:.0f} MB) in {time.perf_counter() - t0:.0f} s; "
          f"the job with generate.limit={args.limit} ...", flush=True)
    r = run_cli(job_yaml(os.path.join(d, "job.yaml"), path, os.path.join(d, "out"), {"limit": args.limit}),
                log=os.path.join(d, "job.log"))
    s = (r.get("summary") or {}).get("this_run", {})
    results["b"] = {"prompt_rows": args.prompt_rows, "prompt_file_mb": round(size / 2**20, 1), "limit": args.limit,
                    **{k: r[k] for k in ("rc", "wall_s", "peak_rss_mb", "load1", "plan", "descendants_peak_rss_mb")}, "this_run": s}
    print(f"[b] rc {r['rc']}, {r['wall_s']} s, driver peak {r['peak_rss_mb']} MB; this run: {s}", flush=True)
    os.remove(path)


def throughput_table(stdout: str, res: dict) -> None:
    lines = stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"(N = \d+ and 2N = )?\d+ prompts", line)]
    end = [i for i, line in enumerate(lines) if line.startswith("per actor, 2 actor")]
    res["table"] = "\n".join(lines[heads[-1]:(end[-1] + 1 if end else None)] if heads else lines[-12:])
    for m in re.finditer(r"per actor, (\d) actor\(s\): end to end ([\d.]+)x, steady state ([\d.]+)x", stdout):
        res[f"per_actor_{m[1]}"] = {"end_to_end": float(m[2]), "steady": float(m[3])}


def part_c(args, results: dict) -> None:
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "generate_throughput.py"), *shlex.split(args.throughput_args)]
    runs = [("as it is", cmd)]
    if args.throughput_commit_scenes:
        runs.append((f"generate.commit_scenes={args.throughput_commit_scenes}",
                     [sys.executable, os.path.abspath(__file__), "--child", "throughput",
                      json.dumps({"commit_scenes": args.throughput_commit_scenes,
                                  "argv": shlex.split(args.throughput_args)})]))
    results["c"] = []
    for name, argv in runs:
        print(f"[c] generate_throughput.py {args.throughput_args} ({name}) ...", flush=True)
        t0, load = time.perf_counter(), os.getloadavg()[0]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        res = {"variant": name, "command": f"python benchmarks/generate_throughput.py {args.throughput_args}",
               "rc": done.returncode, "wall_s": round(time.perf_counter() - t0, 1),
               "load1": round(max(load, os.getloadavg()[0]), 1)}
        if done.returncode != 0:
            res["error"] = done.stderr[-3000:]
            print(f"[c] FAILED rc {done.returncode}:\n{res['error']}", flush=True)
        else:
            throughput_table(done.stdout, res)
            print(res["table"], flush=True)
        results["c"].append(res)


D_RUNS = ("first", "rerun", "reread")


def d_prompt_file(args, d: str) -> str:
    """(d)'s prompt file in directory `d`: --refused-rows refused rows with --valid-rows valid ones spread over them."""
    os.makedirs(d, exist_ok=True)
    ext = ".txt" if args.refused_kind == "long" else ".jsonl"
    path = os.path.join(d, "prompts" + ext)
    valid = [f"a valid scene number {k}: a small house by a lake" for k in range(args.valid_rows)]
    where = {round(k * args.refused_rows / max(1, args.valid_rows - 1)) for k in range(args.valid_rows)} \
        if args.valid_rows > 1 else {0}

    def bad(i):  # long: > 128 tokens of the tiny preset's byte tokenizer; empty: refused as an empty prompt
        if args.refused_kind == "long":
            return (synthetic_prompt(i) + ", ") * 2 + "in great detail"
        return json.dumps({"prompt": ""})

    def good(k):
        return valid[k] if ext == ".txt" else json.dumps({"prompt": valid[k]})

    with open(path, "w") as f:
        k = 0
        for i in range(args.refused_rows + 1):
            if i in where and k < len(valid):
                f.write(good(k) + "\n")
                k += 1
            if i < args.refused_rows:
                f.write(bad(i) + "\n")
        while k < len(valid):
            f.write(good(k) + "\n")
            k += 1
    return path


def part_d(args, work: str, results: dict) -> None:
    d = os.path.join(work, "d")
    path = d_prompt_file(args, d)
    out = os.path.join(d, "out")
    cfg = job_yaml(os.path.join(d, "job.yaml"), path, out)
    res = {"refused_rows": args.refused_rows, "refused_kind": args.refused_kind, "valid_rows": args.valid_rows,
           "prompt_file_mb": round(os.path.getsize(path) / 2**20, 1),
           "command": f"python -m pipelines.generate --config {cfg} --no-progress-bar"}
    for name in D_RUNS:
        if name == "reread":
            os.remove(os.path.join(out, "inputs.json"))
        print(f"[d] {name} run ...", flush=True)
        r = run_cli(cfg, watch=os.path.join(out, "commits"), log=os.path.join(d, f"{name}.log"))
        s = r.get("summary") or {}
        res[name] = {**{k: r[k] for k in ("rc", "wall_s", "seconds_in_process", "peak_rss_mb", "commit_parts_seen", "load1",
                                          "plan", "descendants_peak_rss_mb")},
                     "files_after": count_files(out), "this_run": s.get("this_run"), "consolidation": s.get("consolidation")}
        tr = s.get("this_run") or {}
        print(f"[d] {name}: rc {r['rc']}, {r['wall_s']} s (in the job {tr.get('seconds')} s, bookkeeping "
              f"{tr.get('bookkeeping_s')} s), driver peak {r['peak_rss_mb']} MB, commit parts seen "
              f"{r['commit_parts_seen']}, folded at the end {(s.get('consolidation') or {}).get('parts_folded')}, "
              f"files after {res[name]['files_after']}", flush=True)
    results["d"] = res


def units_recorded(out: str) -> int:
    try:
        with open(os.path.join(out, "inputs.json")) as f:
            return sum(len(u["done"]) for u in json.load(f).get("units", {}).values())
    except (OSError, ValueError):
        return 0


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (the driver with its local Ray), and wait them out."""
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def part_e(args, work: str, results: dict) -> None:
    d = os.path.join(work, "e")
    path = d_prompt_file(args, d)
    out, copy = os.path.join(d, "out"), os.path.join(d, "out-without-units")
    extra = {"read_chunk_mb": args.kill_chunk_mb, "progress_every_s": 1}
    cfg = job_yaml(os.path.join(d, "job.yaml"), path, out, extra)
    units = -(-os.path.getsize(path) // int(args.kill_chunk_mb * 2**20))
    want = max(1, int(units * args.kill_at))
    print(f"[e] a run killed once {want} of its {units} read units are recorded ...", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.generate", "--config", cfg, "--no-progress-bar"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.perf_counter()
    while units_recorded(out) < want:
        if proc.poll() is not None:
            raise RuntimeError(f"(e) the run ended (rc {proc.returncode}) before {want} read units were recorded")
        time.sleep(0.2)
    killed_after = round(time.perf_counter() - t0, 2)
    kill_tree(proc.pid)
    res = {"read_chunk_mb": args.kill_chunk_mb, "units": units, "units_recorded_at_kill": units_recorded(out),
           "killed_after_s": killed_after, "command": f"python -m pipelines.generate --config {cfg} --no-progress-bar"}
    shutil.copytree(out, copy)
    os.remove(os.path.join(copy, "inputs.json"))
    cfg_copy = job_yaml(os.path.join(d, "job-without-units.yaml"), path, copy, extra)
    for name, c in (("resume", cfg), ("resume_without_units", cfg_copy)):
        r = run_cli(c, log=os.path.join(d, f"{name}.log"))
        s = r.get("summary") or {}
        res[name] = {**{k: r[k] for k in ("rc", "wall_s", "seconds_in_process", "peak_rss_mb", "load1")},
                     "this_run": s.get("this_run"), "manifest": s.get("manifest")}
        t = s.get("this_run") or {}
        print(f"[e] {name}: rc {r['rc']}, {r['wall_s']} s, rows read {t.get('rows_read')}, read units skipped "
              f"{t.get('read_units_skipped')}, driver peak {r['peak_rss_mb']} MB", flush=True)
    results["e"] = res


# ----------------------------------------------------------------------------- report


def report(results: dict) -> list[str]:
    L = [f"{results['command']}  ({results['date']}; {results['machine']})"]
    for k, date in (results.get("parts_from_earlier_runs") or {}).items():
        L.append(f"  part ({k}) kept from the earlier run of {date}")
    if results.get("a"):
        L.append("(a) resume bookkeeping: each step in a fresh process; peak = VmHWM of that process (imports "
                 "included, 'imports' = its RSS before the step); load = the machine's 1-min load average (max of "
                 "before/after)")
        L.append(f"  {'where':5s} {'scenes':>6s}  {'layout / step':58s} {'files':>7s} {'seconds':>9s} "
                 f"{'peak MB':>8s} {'imports':>7s} {'load':>5s}")
        names = {"before_start": "start: recorded_ids", "before_end": "end: compact_manifest",
                 "after_start": "start: recorded_id_array", "after_end": "end: consolidate_manifest"}
        key = {"local": 0, "s3": 1}
        for c in sorted(results["a"], key=lambda c: (key[c["where"]], c["scenes"], c["layout"] != "before",
                                                       -c["part_rows"])):
            if c["op"] == "skipped":
                L.append(f"  {c['where']:5s} {sci(c['scenes']):>6s}  after: {c['part_rows']}-row commit parts: skipped "
                         f"({c['files']} objects > --s3-max-files)")
                continue
            if c["layout"] == "before":
                what = f"before ({BEFORE_COMMIT}): 2-row parts + manifest.parquet, {names[c['op']]}"
            elif c["layout"] == "before->after":
                what = f"after code on the before layout, {names[c['op']]}"
            else:
                state = {"unfolded": "(i) log not folded", "consolidated": "(ii) consolidated",
                         "plus_one_part": "(iii) consolidated + 1 new 32-row part"}[c["state"]]
                what = f"after: {c['part_rows']}-row parts, {state}, {names[c['op']].split(':')[0]}"
            extra = " (extrapolated from " + ", ".join(sci(n) for n in c["extrapolated_from"]) + ")" \
                if "extrapolated_from" in c else ""
            imp = (f"{c['rss_after_imports_mb']:7.0f} {c['load1']:5.1f}" if "rss_after_imports_mb" in c
                   else f"{'':7s} {'':5s}")
            L.append(f"  {c['where']:5s} {sci(c['scenes']):>6s}  {what:58s} {c['files']:7d} {c['seconds']:9.2f} "
                     f"{c['peak_rss_mb']:8.0f} {imp}{extra}")
    if results.get("b"):
        b = results["b"]
        L.append(f"(b) the job streaming {b['prompt_rows']} prompts ({b['prompt_file_mb']} MB), generate.limit={b['limit']}: "
                 f"rc {b['rc']}, {b['wall_s']} s wall, driver peak {b['peak_rss_mb']} MB; done "
                 f"{b['this_run'].get('done')}, rows read {b['this_run'].get('rows_read')}, "
                 f"bookkeeping {b['this_run'].get('bookkeeping_s')} s; load {b['load1']}")
        L.extend(ray_lines(b))
    for c in results.get("c") or []:
        L.append(f"(c) {c['command']} ({c['variant']}): rc {c['rc']}, {c['wall_s']} s, load {c['load1']}")
        L.extend("    " + line for line in (c.get("table") or c.get("error", "")).splitlines())
    if results.get("d"):
        d = results["d"]
        L.append(f"(d) {d['refused_rows']} prompts refused at validation ({d['refused_kind']}) + {d['valid_rows']} valid "
                 f"({d['prompt_file_mb']} MB), {d['command']}")
        for name in D_RUNS:
            if name not in d:  # results of an earlier version of this benchmark
                continue
            r = d[name]
            t = r["this_run"] or {}
            L.append(f"    {name:5s}: {r['wall_s']:7.1f} s wall ({t.get('seconds')} s in run, bookkeeping "
                     f"{t.get('bookkeeping_s')} s), driver peak {r['peak_rss_mb']:.0f} MB, done {t.get('done')}, "
                     f"failed {t.get('failed')}, already recorded {t.get('already_recorded')}; commit parts written "
                     f"{r['commit_parts_seen']} (folded at end {(r['consolidation'] or {}).get('parts_folded')}), "
                     f"files after: commits/ {r['files_after']['commits']} + manifest/ {r['files_after']['manifest']}; load {r['load1']}")
            L.extend(ray_lines(r))
    if results.get("e"):
        e = results["e"]
        L.append(f"(e) (d)'s prompt file in {e['units']} read units of {e['read_chunk_mb']} MB, the run SIGKILLed "
                 f"(driver and Ray) after {e['killed_after_s']} s with {e['units_recorded_at_kill']} units recorded; resumed:")
        for name, what in (("resume", "with the units it finished skipped"),
                           ("resume_without_units", "the same killed output, inputs.json deleted (every row read again)")):
            r, t = e[name], e[name]["this_run"] or {}
            L.append(f"    {what:70s}: {r['wall_s']:6.1f} s wall, rows read {t.get('rows_read')}, already recorded "
                     f"{t.get('already_recorded')}, units skipped {t.get('read_units_skipped')}, driver peak "
                     f"{r['peak_rss_mb']:.0f} MB; load {r['load1']}")
    L.extend(target_lines(results))
    return L


def ray_lines(r: dict) -> list[str]:
    """The job's Ray processes by peak RSS (the largest few) and its execution plan."""
    peaks = r.get("descendants_peak_rss_mb") or {}
    top = ", ".join(f"{k} {v:.0f}" for k, v in list(peaks.items())[:6])
    return [f"           Ray processes' peak RSS MB: {top}"] + [f"           plan: {p}" for p in r.get("plan") or []]


def target_lines(results: dict) -> list[str]:
    L = ["targets:"]
    for c in results.get("a", []):
        if c["where"] == "local" and c["scenes"] == 10**6 and c["layout"] == "after" and "seconds" in c:
            ok = c["seconds"] <= TARGETS["a_s"] and c["peak_rss_mb"] <= TARGETS["a_mb"]
            L.append(f"  (a) local 1e6, {c['part_rows']}-row parts, {c['state']}, {c['op']}: {c['seconds']:.2f} s, "
                     f"{c['peak_rss_mb']:.0f} MB (<= 10 s, <= 1024 MB): {'met' if ok else 'MISSED'}")
    if results.get("d"):
        for name in ("rerun", "reread"):
            if name not in results["d"]:
                continue
            r = results["d"][name]
            ok = r["wall_s"] <= TARGETS["d_rerun_s"] and r["peak_rss_mb"] <= TARGETS["d_rerun_mb"]
            L.append(f"  (d) {name} {r['wall_s']:.1f} s, driver {r['peak_rss_mb']:.0f} MB (<= 30 s, <= 1536 MB): "
                     f"{'met' if ok else 'MISSED'}")
        f = results["d"]["first"]
        blocks = -(-results["d"]["refused_rows"] // 1000)
        L.append(f"  (d) first run: {f['commit_parts_seen']} commit parts for {results['d']['refused_rows']} refused rows "
                 f"(rows/1000 = {blocks})")
    return L


MEASURED_FILES = ("vist3a/dataset.py", "vist3a/io/prompts.py", "pipelines/generate.py", "vist3a/config.py")


def code_fingerprints() -> dict:
    """sha256 (12 hex) of the working-tree files whose behaviour is measured (they may be edited meanwhile)."""
    import hashlib

    return {f: hashlib.sha256(open(os.path.join(REPO, f), "rb").read()).hexdigest()[:12] for f in MEASURED_FILES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c,d,e", help="which parts to run, comma-separated (default: %(default)s)")
    ap.add_argument("--sizes", default="1e5,1e6", help="(a) committed scenes, after code (default: %(default)s)")
    ap.add_argument("--old-sizes", default="1e4,1e5", help="(a) committed scenes the before code is measured at; "
                    "other --sizes are extrapolated linearly in parts (default: %(default)s)")
    ap.add_argument("--part-rows", default="1000,32", help="(a) rows per commit part, after code (default: %(default)s)")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True, help="(a) also on loopback S3 (moto)")
    ap.add_argument("--s3-sizes", default="1e5,1e6", help="(a) S3, after code (default: %(default)s)")
    ap.add_argument("--s3-old-sizes", default="1e4", help="(a) S3, before code (default: %(default)s)")
    ap.add_argument("--s3-max-files", type=int, default=5000, help="(a) skip an S3 case with more objects (default: %(default)s)")
    ap.add_argument("--migrate", action=argparse.BooleanOptionalAction, default=True,
                    help="(a) also time the after code's one-time fold of each local before-layout manifest")
    ap.add_argument("--prompt-rows", type=float, default=1e7, help="(b) lines of the prompt file (default: %(default)g)")
    ap.add_argument("--prompt-chars", type=int, default=70, help="(b) characters a line, about (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=10, help="(b) generate.limit (default: %(default)s)")
    ap.add_argument("--throughput-args", default="--prompts 32 --repeats 2",
                    help="(c) arguments of benchmarks/generate_throughput.py (default: %(default)s)")
    ap.add_argument("--throughput-commit-scenes", type=int, default=2, help="(c) also run it with every config "
                    "given generate.commit_scenes=N (2 = batch_size: a commit per batch, as before); 0: skip (default: %(default)s)")
    ap.add_argument("--refused-rows", type=float, default=1e5, help="(d) prompts refused at validation (default: %(default)g)")
    ap.add_argument("--refused-kind", choices=("long", "empty"), default="long",
                    help="(d) long: over the tiny preset's 128-token limit; empty: {\"prompt\": \"\"} (default: %(default)s)")
    ap.add_argument("--valid-rows", type=int, default=3, help="(d) valid prompts among them (default: %(default)s)")
    ap.add_argument("--kill-chunk-mb", type=float, default=1.0, help="(e) generate.read_chunk_mb of the killed run "
                    "(default: %(default)s)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="(e) kill once this share of the read units is recorded "
                    "(default: %(default)s)")
    ap.add_argument("--update", action="store_true", help="keep the parts not run now from the existing --out file "
                    "(the table then shows both; the JSON says which run measured which part)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one, removed after)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bulk-bookkeeping-cpu.json"))
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1])), default=str))
        return 0
    args.sizes, args.old_sizes = size_arg(args.sizes), size_arg(args.old_sizes)
    args.s3_sizes, args.s3_old_sizes = size_arg(args.s3_sizes), size_arg(args.s3_old_sizes)
    args.part_rows = size_arg(args.part_rows)
    args.prompt_rows, args.refused_rows = int(args.prompt_rows), int(args.refused_rows)
    parts = set(args.parts.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="vist3a-bulk-bookkeeping-")
    os.makedirs(work, exist_ok=True)
    results: dict = {"command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "machine": f"{platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}",
                     "before_commit": BEFORE_COMMIT,
                     "after": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True).stdout.strip() + " + working tree"}
    results["code_sha256_start"] = code_fingerprints()
    if args.update and os.path.exists(args.out):  # keep the parts measured earlier, each with the run that made it
        with open(args.out) as f:
            prev = json.load(f)
        results["earlier_runs"] = prev.pop("earlier_runs", []) + [
            {k: prev.get(k) for k in ("command", "date", "parts", "code_sha256_start", "code_sha256_end", "total_s")}]
        for k in "abcd":
            if k not in parts and k in prev:
                results[k] = prev[k]
                results.setdefault("parts_from_earlier_runs", {})[k] = prev.get("parts_from_earlier_runs", {}).get(
                    k, prev["date"])
    results["parts"] = sorted(parts)
    t0 = time.perf_counter()
    try:
        if "a" in parts:
            part_a(args, work, results)
        if "b" in parts:
            part_b(args, work, results)
        if "c" in parts:
            part_c(args, results)
        if "d" in parts:
            part_d(args, work, results)
        if "e" in parts:
            part_e(args, work, results)
    finally:
        results["total_s"] = round(time.perf_counter() - t0, 1)
        results["code_sha256_end"] = code_fingerprints()
        if results["code_sha256_end"] != results["code_sha256_start"]:
            print("WARNING: the measured code changed during the run (see code_sha256_start/end)", flush=True)
        lines = report(results)
        results["table"] = lines
        print("\n" + "\n".join(lines))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.out}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
