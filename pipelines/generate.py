"""Bulk synthetic-3D dataset generation on Ray Data: a prompt set in, scenes and a manifest out.

    python -m pipelines.generate --config deploy/generate.yaml
    ray job submit --working-dir . -- python -m pipelines.generate --config deploy/generate.cluster.yaml

The story. The driver plans read units from file listings and sizes (never reading the prompts
itself), folds an earlier run's commit log into the manifest and takes the ids it recorded; then the
whole job is one Ray Data stream:
  1. read_prompt_chunks  (CPU tasks: pieces of the prompt files -> rows with ids, seeds, bad-row reasons)
  2. ValidatePrompts     (CPU actors: the token limit, then the id ledger decides which rows are new
                          work; the rows refused here are committed right away, one part per block)
  3. GenerateScenes      (GPU actors: the model is loaded once per actor; a task is `commit_scenes` rows)
  4. write_scenes        (CPU tasks: encode and upload every file of a task's scenes, then commit them
                          in one manifest part)
The driver consumes the stream for progress, records the read units whose every row has a durable
outcome (inputs.json, as they finish), folds the commit parts into the manifest now and then and at the
end, records the prompt files it read whole and writes the dataset card. Rerunning the same command on
the same output resumes: every id is written exactly once (see vist3a.dataset), and the files a finished
run read whole, or the read units a killed run finished, are not read again while they are unchanged.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pickle
import sys
import threading
import time

import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from pipelines.ray_setup import init_ray, run_isolated, set_torch_threads
from vist3a import __version__
from vist3a.config import Config, ConfigError, StorageConfig, load_config
from vist3a.dataset import (COMMITS_DIR, INPUTS_FILE, MANIFEST_DIR, RESULT_SCHEMA, STAGE_SCHEMA, consolidate_manifest,
                            empty_manifest_row, failure_class, file_columns, now_utc, read_inputs_record, read_units_record,
                            record_read_inputs, record_read_units, recorded_id_array, shard_of, typed_table,
                            write_manifest_part, write_scene)
from vist3a.dataset_card import write_dataset_card
from vist3a.generator import SceneGenerator, scene_files
from vist3a.io import ensure_writable, join, remove_temp_files
from vist3a.io.prompts import (PromptLedger, ReadUnitTally, chunk_rows, count_newlines, invalid_id, mark_failed,
                               number_chunks, plan_chunks)
from vist3a.video import check_prompt, load_tokenizer

log = logging.getLogger("vist3a.generate")


# ----------------------------------------------------------------------------- Ray Data stages


def read_prompt_chunks(batch: pa.Table, storage: dict, block_rows: int, tally=None):
    """CPU stage: each input row is one read unit (vist3a.io.prompts.plan_chunks); yields its prompt rows,
    each with its unit and place in it, and tells the tally how many rows the unit has."""
    storage_cfg = StorageConfig.model_validate(storage)
    for chunk in batch.to_pylist():
        rows, pos = [], 0
        for row in chunk_rows(chunk, storage_cfg):
            row["unit"], row["pos"] = chunk["unit"], pos
            pos += 1
            rows.append(row)
            if len(rows) >= block_rows:
                yield typed_table(rows, STAGE_SCHEMA, "prompt row")
                rows = []
        if rows:
            yield typed_table(rows, STAGE_SCHEMA, "prompt row")
        if tally is not None:
            ray.get(tally.read.remote(chunk["unit"], pos))


def ledger_shard(scene_id: str, shards: int) -> int:
    return int(shard_of(scene_id), 16) % shards


@ray.remote(num_cpus=0, max_restarts=0)
class IdLedger:
    """One shard of the run's PromptLedger (ids by ledger_shard), plus the run's counts of refused rows.
    It is not restarted: a lost ledger would admit duplicates, so its loss fails the run (rerun resumes)."""

    def __init__(self, shard: int, shards: int, skip: pa.Array):
        self.ledger = PromptLedger(i for i in skip.to_pylist() if ledger_shard(i, shards) == shard)
        self.reasons: collections.Counter[str] = collections.Counter()
        self.parts = 0

    def admit(self, rows: list[dict]) -> list[dict | None]:
        return [self.ledger.admit(r) for r in rows]

    def recorded(self, ids: list[str]) -> list[bool]:
        return self.ledger.recorded(ids)

    def note_recorded(self, n: int) -> None:
        self.ledger.note_recorded(n)

    def add_failures(self, reasons: dict[str, int]) -> None:
        """A validator committed one part of refused rows, for these reasons."""
        self.reasons.update(reasons)
        self.parts += 1

    def counts(self) -> dict:
        return {"stats": dict(self.ledger.stats), "reasons": dict(self.reasons), "parts": self.parts}


# The run's read-unit tally. Restarted if it dies: it then forgets marks, so the units in flight are never
# recorded as finished (their rerun reads them again), which costs reading, never a row.
UnitTally = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ReadUnitTally)


def failed_manifest_row(row: dict, preset: str) -> dict:
    """The manifest row of a row refused before generation (its only record: no files)."""
    out = empty_manifest_row()
    out.update({k: row[k] for k in ("id", "prompt", "negative_prompt", "seed", "source")},
               status="failed", error=row["error"], preset=preset, vist3a_version=__version__, finished_at=now_utc())
    return out


class ValidatePrompts:
    """CPU stage: refuse prompts the text encoder cannot take (token limit) before any GPU time, let the id
    ledger drop duplicates and ids an earlier run recorded, and commit the refused rows (one part a block)."""

    def __init__(self, cfg_dict: dict, ledgers: list, tally=None):
        self.cfg = Config.model_validate(cfg_dict)
        local = SceneGenerator.fetch_and_verify_weights(self.cfg)  # hub ids / s3:// made local on this node
        self.tokenizer = load_tokenizer(local.model.video)
        self.ledgers = ledgers
        self.tally = tally

    def drop_recorded(self, rows: list[dict]) -> list[dict]:
        """Rows an earlier run recorded, dropped before tokenizing (the costly check): a valid row whose id is
        recorded, or whose source was refused at validation before (its invalid-… id; retried only with
        generate.retry_failed, which leaves failed ids out of the ledger's skip set)."""
        n = len(self.ledgers)
        keys = [(i, rid) for i, r in enumerate(rows) if r["error"] is None
                for rid in (r["id"], invalid_id(r["source"]))]
        by_shard: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
        for i, rid in keys:
            by_shard[ledger_shard(rid, n)].append((i, rid))
        calls = {k: self.ledgers[k].recorded.remote([rid for _, rid in ks]) for k, ks in by_shard.items()}
        gone = {i for k, ref in calls.items() for (i, _), hit in zip(by_shard[k], ray.get(ref)) if hit}
        if gone:
            ray.get(self.ledgers[0].note_recorded.remote(len(gone)))
        return [r for i, r in enumerate(rows) if i not in gone]

    def __call__(self, batch: pa.Table) -> pa.Table:
        limit, template = self.cfg.model.video.text_encoder.max_length, self.cfg.sampling.prompt_template
        given = batch.to_pylist()
        rows = self.drop_recorded(given)
        for i, row in enumerate(rows):
            if row["error"] is None and (reason := check_prompt(self.tokenizer, row["prompt"], limit, template)):
                rows[i] = mark_failed(row, reason)
        n = len(self.ledgers)
        by_shard: dict[int, list[int]] = collections.defaultdict(list)
        for i, row in enumerate(rows):
            by_shard[ledger_shard(row["id"], n)].append(i)
        calls = {k: self.ledgers[k].admit.remote([rows[i] for i in idx]) for k, idx in by_shard.items()}
        admitted: list[dict | None] = [None] * len(rows)
        for k, ref in calls.items():
            for i, row in zip(by_shard[k], ray.get(ref)):
                admitted[i] = row
        refused = [r for r in admitted if r is not None and r["error"] is not None]
        if refused:
            write_manifest_part(self.cfg.generate.output, [failed_manifest_row(r, self.cfg.preset) for r in refused],
                                self.cfg.storage)
            ray.get(self.ledgers[0].add_failures.remote(collections.Counter(failure_class(r["error"]) for r in refused)))
        onward = [r for r in admitted if r is not None and r["error"] is None]
        if self.tally is not None:  # every other row now has its outcome: recorded, a duplicate, or committed above
            going = {(r["unit"], r["pos"]) for r in onward}
            ray.get(self.tally.settle.remote([(r["unit"], r["pos"]) for r in given if (r["unit"], r["pos"]) not in going]))
        return typed_table(onward, STAGE_SCHEMA, "prompt row")


class GenerateScenes:
    """GPU stage: one SceneGenerator per actor, built when the first rows reach it (Ray Data starts the pool
    before any row is read, and a resume whose rows were all recorded sends it none: no model is loaded for
    nothing); a task's rows go in batches of generate.batch_size, and a failing batch is retried item by item."""

    def __init__(self, cfg_dict: dict):
        self.cfg = Config.model_validate(cfg_dict)
        set_torch_threads(self.cfg.generate.cpus_per_actor, torch.cuda.is_available(), self.cfg.runtime.torch_threads)
        self.batch_size = self.cfg.generate.batch_size
        self._gen: SceneGenerator | None = None

    @property
    def gen(self) -> SceneGenerator:
        if self._gen is None:
            self._gen = SceneGenerator(self.cfg)
        return self._gen

    def __call__(self, block: pa.Table) -> pa.Table:
        rows = block.to_pylist()
        todo = [r for r in rows if r["error"] is None]
        if not todo:
            return typed_table(rows, STAGE_SCHEMA, "prompt row")
        gen = self.gen  # built here, not inside run_isolated: a model that cannot load fails the run, not its rows

        def generate(todo: list[dict]) -> list:
            return gen.generate([r["prompt"] for r in todo], [r["seed"] for r in todo],
                                [r["negative_prompt"] or "" for r in todo])

        for start in range(0, len(todo), self.batch_size):
            done, failed = run_isolated(generate, todo[start:start + self.batch_size])
            for row, reason in failed:  # recorded as failed rows; the job goes on
                row["error"] = reason
            for row, scene in done:
                # pickled: Arrow stores bytes as they are, where a Scene object makes Ray Data try (and fail,
                # with a warning per block) to convert it to an Arrow column first
                row["scene"] = pickle.dumps(scene, protocol=pickle.HIGHEST_PROTOCOL)
                row["meta"] = json.dumps(gen.meta(scene))  # JSON text: Arrow would turn lists into arrays
        return typed_table(rows, STAGE_SCHEMA, "prompt row")


def write_scenes(batch: pa.Table, output: str, storage: dict, ply_sh_degree: int,
                 formats: tuple[str, ...] | list[str] = ("ply",)) -> pa.Table:
    """CPU stage: encode and upload each scene's files, then commit the task's rows in one manifest part."""
    storage_cfg = StorageConfig.model_validate(storage)
    rows = []
    for item in batch.to_pylist():
        row = empty_manifest_row()
        for k in ("id", "prompt", "negative_prompt", "seed", "source"):
            row[k] = item[k]
        row["unit"], row["pos"] = item.get("unit"), item.get("pos")  # for the driver's tally (not in the manifest)
        err, meta = item["error"], item["meta"]
        if err is None and meta:
            scene, meta = pickle.loads(item["scene"]), json.loads(meta)
            t0 = time.perf_counter()
            try:
                files = scene_files(scene, meta, ply_sh_degree, formats)
                uris = write_scene(output, row["id"], files, storage_cfg)
            except Exception as exc:  # noqa: BLE001 - recorded; the id is retried by --retry-failed
                err = f"write failed: {type(exc).__name__}: {exc}"[:500]
            else:
                row.update(
                    status="done", **file_columns(uris, files), num_gaussians=meta["num_gaussians"],
                    bbox_min=meta["bbox_min"], bbox_max=meta["bbox_max"], preset=meta["preset"],
                    negative_prompt=meta["negative_prompt"], prompt_template=meta["prompt_template"],
                    weights_fingerprint=meta["weights_fingerprint"], write_s=time.perf_counter() - t0,
                    licence=meta.get("licence"),
                    provenance=None if meta.get("provenance") is None else json.dumps(meta["provenance"], sort_keys=True),
                    **{k: meta["timings"].get(k) for k in ("sample_s", "decode_s", "render_s")},
                    **meta.get("scores", {}),
                )
        if err is not None or not meta:
            row.update(status="failed", error=err or "generation produced no scene")
        row["vist3a_version"] = __version__
        row["finished_at"] = now_utc()
        rows.append(row)
    write_manifest_part(output, rows, storage_cfg)
    return typed_table(rows, RESULT_SCHEMA, "manifest row")


# ----------------------------------------------------------------------------- driver


SWEEP_SCENES_UP_TO = 100_000  # scenes/ is swept for killed writers' temp files up to this many rows
LOCAL_COUNT_BYTES = 32 << 20  # prompt sets up to this size have their newlines counted on the driver (streamed)


def count_lines(chunks: list[dict], storage: StorageConfig, cpus: float) -> tuple[list[dict], dict[str, int]]:
    """Line numbers for chunks after a file's first, and ≈ the rows of each file (lines; CSV: lines - 1;
    Parquet: from its footer), both from one parallel pass of newline counting on the cluster (a chunk
    with "newlines" known, a unit an earlier run finished, is not counted again); each chunk of a line file
    comes back with its "newlines"."""
    storage_dict = storage.model_dump()

    def count(item: dict) -> dict:
        return {"i": item["i"], "n": count_newlines(item["chunk"], StorageConfig.model_validate(storage_dict))}

    known = {i: c["newlines"] for i, c in enumerate(chunks) if c.get("rows") is None and c.get("newlines") is not None}
    items = [{"i": i, "chunk": c} for i, c in enumerate(chunks) if c.get("rows") is None and i not in known]
    if sum(it["chunk"]["end"] - it["chunk"]["start"] for it in items) <= LOCAL_COUNT_BYTES:
        counted = [count(it) for it in items]  # a small set: streamed here, quicker than starting tasks
    else:
        counted = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map(count, num_cpus=cpus).take_all()
    counts = {**known, **{r["i"]: r["n"] for r in counted}}
    rows: dict[str, int] = {}
    for i, c in enumerate(chunks):
        if c.get("rows") is not None:
            rows[c["file"]] = c["rows"]
        elif i + 1 == len(chunks) or chunks[i + 1]["file"] != c["file"]:  # the file's last chunk
            first_of_file = next(j for j in range(i, -1, -1) if chunks[j]["start"] == 0)
            lines = (1 + sum(counts[j] for j in range(first_of_file, i + 1))) if c["end"] else 0
            rows[c["file"]] = lines - (1 if c["file"].lower().endswith(".csv") and lines else 0)
    return [{**c, "newlines": counts[i]} if i in counts else c for i, c in enumerate(number_chunks(chunks, counts))], rows


def files_read_before(chunks: list[dict], record: dict[str, dict]) -> dict[str, dict]:
    """The files of `chunks` a finished run read whole as they are now (inputs.json: same version)."""
    return {c["file"]: record[c["file"]] for c in chunks if record.get(c["file"], {}).get("version") == c["version"]}


def units_read_before(chunks: list[dict], record: dict[str, dict]) -> dict[int, dict]:
    """{index in `chunks`: its record} for the read units an earlier run finished, of files as they are now
    (inputs.json units: same version, same byte range, so the same rows)."""
    out = {}
    for i, c in enumerate(chunks):
        rec = record.get(c["file"])
        if rec is not None and rec["version"] == c["version"]:
            out.update({i: d for d in rec["done"] if d["start"] == c["start"] and d["end"] == c["end"]})
    return out


class Progress:
    """Counts of this run, shown as a progress bar with ETA on a terminal (tqdm, over ≈ the prompt set's rows)
    or else a periodic line; and the failures by reason for the summary."""

    def __init__(self, total: int | None, every_s: float, bar: bool | None = None):
        self.total, self.every_s = total, every_s
        self.done = self.failed = 0
        self.blocks = 0                       # generator tasks committed (one manifest part each)
        self.refused = self.refused_parts = 0  # failed at validation, and their parts (counted by the ledger)
        self.skipped = 0                      # duplicates and ids recorded by an earlier run
        self.reasons: collections.Counter[str] = collections.Counter()
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="row", desc="generate", dynamic_ncols=True, smoothing=0.05)

    def update(self, batch: pa.Table) -> None:
        self.blocks += 1
        for status, err in zip(batch.column("status").to_pylist(), batch.column("error").to_pylist()):
            if status == "done":
                self.done += 1
            else:
                self.failed += 1
                self.reasons[failure_class(err)] += 1
        self.tick()

    def ledger(self, counts: dict) -> None:
        """The ledger's view of the rows that never reach the generator: refused, duplicates, recorded."""
        self.refused, self.refused_parts = counts["refused"], counts["refused_parts"]
        self.skipped = counts["duplicates"] + counts["recorded"]
        self.ledger_reasons = counts["reasons"]
        self.tick()

    @property
    def seen(self) -> int:
        return self.done + self.failed + self.refused + self.skipped

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.n = self.seen
            self.bar.set_postfix(done=self.done, failed=self.failed + self.refused, skipped=self.skipped, refresh=False)
            self.bar.refresh()
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"[generate] {self.line()}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        of = f" of ≈{self.total}" if self.total else ""
        return (f"{self.seen}{of} rows: done {self.done}, failed {self.failed + self.refused}, skipped {self.skipped}; "
                f"{self.done / dt:.3f} scenes/s, {dt:.0f}s elapsed")


def ledger_counts(ledgers: list) -> dict:
    parts = ray.get([lg.counts.remote() for lg in ledgers])
    stats: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for p in parts:
        stats.update(p["stats"])
        reasons.update(p["reasons"])
    return {"rows": stats["rows"], "duplicates": stats["duplicates"], "conflicts": stats["conflicts"],
            "recorded": stats["recorded"], "refused": stats["invalid"], "reasons": dict(reasons),
            "refused_parts": sum(p["parts"] for p in parts)}


def task_rows(job, total: int | None) -> int:
    """Rows per generator task: commit_scenes, but small enough that a small set still gives every actor
    >= 4 tasks (one task a set would leave all actors but one idle), and >= one full batch."""
    if not total:
        return job.commit_scenes
    return max(job.batch_size, min(job.commit_scenes, -(-total // (4 * job.actors))))


def build_dataset(cfg: Config, chunks: list[dict], ledgers: list, total: int | None = None, tally=None):
    """The streaming plan: read (CPU) -> validate + ledger (CPU actors) -> generate (GPU actors) -> write (CPU).
    `chunks` carry their "unit" (index); `tally` (a UnitTally, or None) hears which rows have outcomes."""
    job = cfg.generate
    cfg_dict = cfg.model_dump(mode="json")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.execution_options.preserve_order = bool(job.limit)  # with a limit, "the first N rows" are the set's first N
    ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
    ds = ds.map_batches(read_prompt_chunks, fn_kwargs={"storage": cfg.storage.model_dump(), "block_rows": job.block_rows,
                                                       "tally": tally},
                        num_cpus=job.cpu_stage_cpus, batch_size=1, batch_format="pyarrow")
    if job.limit:
        ds = ds.limit(job.limit)
    # Every stage after reading takes and returns Arrow tables of STAGE_SCHEMA (vist3a.dataset): all-null columns stay typed.
    ds = ds.map_batches(ValidatePrompts, fn_constructor_kwargs={"cfg_dict": cfg_dict, "ledgers": ledgers, "tally": tally},
                        compute=ActorPoolStrategy(size=job.validators), num_cpus=job.cpu_stage_cpus,
                        batch_size=job.block_rows, batch_format="pyarrow")
    # A generator task is the unit of commit: <= commit_scenes rows (streaming; small blocks are combined).
    ds = ds.repartition(target_num_rows_per_block=task_rows(job, total))
    ds = ds.map_batches(GenerateScenes, fn_constructor_kwargs={"cfg_dict": cfg_dict},
                        compute=ActorPoolStrategy(size=job.actors), num_gpus=job.gpus_per_actor or None,
                        num_cpus=job.cpus_per_actor, batch_size=None, batch_format="pyarrow")
    ds = ds.map_batches(write_scenes, fn_kwargs={"output": job.output, "storage": cfg.storage.model_dump(),
                                                 "ply_sh_degree": cfg.splats.ply_sh_degree,
                                                 "formats": cfg.splats.formats},
                        num_cpus=job.cpu_stage_cpus, batch_size=None, batch_format="pyarrow")
    return ds


def record_finished_units(cfg: Config, chunks: list[dict], tally) -> None:
    """Record (inputs.json) the read units the tally found finished since it was last asked."""
    done = ray.get(tally.pop_finished.remote())
    record_read_units(cfg.generate.output, [{**chunks[u], "rows": rows} for u, rows in done], cfg.storage)


def stream(cfg: Config, chunks: list[dict], skip: pa.Array, progress: Progress) -> dict:
    """The Ray Data stream over `chunks`, consumed for progress, with the read units it finishes recorded as
    they finish (not with generate.limit, which leaves units part-read) and the commit log folded into the
    manifest now and then; returns the ledger's counts."""
    job = cfg.generate
    skip_ref = ray.put(skip)
    ledgers = [IdLedger.remote(k, job.validators, skip_ref) for k in range(job.validators)]
    tally = None if job.limit else UnitTally.remote()
    chunks = [{**c, "unit": i} for i, c in enumerate(chunks)]
    last_consolidated = last_polled = time.perf_counter()
    parts_at_last = 0  # commit parts this run wrote up to the last consolidation
    stop = threading.Event()

    def keep_recording_units():  # on a timer, not per output batch: units of refused rows alone finish with no output
        while True:  # once more after `stop`: what finished before the stream ended (or failed) is recorded too
            stopping = stop.wait(min(job.progress_every_s, 5.0))
            try:
                record_finished_units(cfg, chunks, tally)
            except Exception as exc:  # noqa: BLE001 - the record only saves reading; the run goes on
                log.warning("could not record finished read units (a rerun reads them again): %s", exc)
            if stopping:
                return

    recorder = threading.Thread(target=keep_recording_units, name="record-read-units", daemon=True)
    if tally is not None:
        recorder.start()
    try:
        for batch in build_dataset(cfg, chunks, ledgers, progress.total, tally).iter_batches(batch_size=None,
                                                                                            batch_format="pyarrow"):
            progress.update(batch)
            if tally is not None:  # these rows are committed (write_scenes hands rows back after their part)
                tally.settle.remote(list(zip(batch.column("unit").to_pylist(), batch.column("pos").to_pylist())))
            now = time.perf_counter()
            if now - last_polled >= min(job.progress_every_s, 5.0):
                progress.ledger(ledger_counts(ledgers))
                last_polled = now
            # a bounded commit log keeps a resume after a kill cheap (it reads every unfolded part)
            parts = progress.blocks + progress.refused_parts
            if now - last_consolidated >= job.consolidate_every_s or parts - parts_at_last >= job.consolidate_every_parts:
                consolidate_manifest(job.output, cfg.storage)  # parts committed meanwhile wait for the next time
                last_consolidated, parts_at_last = time.perf_counter(), parts
        counts = ledger_counts(ledgers)
        progress.ledger(counts)
    finally:
        stop.set()
        if recorder.is_alive():
            recorder.join()  # before the actors go, and before the run records the files it read whole
        progress.close()
        for actor in ledgers + ([tally] if tally is not None else []):
            ray.kill(actor)  # not left to reference counting: the plan that holds their handles may outlive this call
    return counts


def run(cfg: Config, progress_bar: bool | None = None) -> dict:
    """Run (or resume) the job described by `cfg`; returns the summary (also in the dataset card)."""
    job = cfg.generate
    t0 = time.perf_counter()
    ensure_writable(job.output, cfg.storage)
    SceneGenerator.fetch_and_verify_weights(cfg)  # missing weights fail here, before Ray or any GPU starts
    chunks = plan_chunks(job.input, cfg.storage, chunk_bytes=int(job.read_chunk_mb * (1 << 20)))
    # the ids earlier runs recorded: two columns of the buckets and of any parts a killed run left (those
    # are folded in at this run's end), read in parallel
    skip = recorded_id_array(job.output, cfg.storage, include_failed=not job.retry_failed)
    # files a finished run read whole, unchanged since: every row of them is recorded, so they are not read
    # (with retry_failed they are: their failed rows are the work)
    read_before = {} if job.retry_failed else files_read_before(chunks, read_inputs_record(job.output, cfg.storage))
    chunks = [c for c in chunks if c["file"] not in read_before]
    # read units a killed run finished (every row has its outcome): not read again either
    units_before = {} if job.retry_failed else units_read_before(chunks, read_units_record(job.output, cfg.storage))
    chunks = [{**c, "newlines": units_before[i]["newlines"]} if i in units_before else c for i, c in enumerate(chunks)]
    bookkeeping_s = time.perf_counter() - t0
    if read_before:
        print(f"[generate] {len(read_before)} prompt file(s) (≈{sum(v['rows'] for v in read_before.values())} rows) are "
              f"skipped unread: a finished run read them whole and they have not changed since "
              f"({join(job.output, INPUTS_FILE)}; delete it to read them again)", flush=True)
    counts = {"rows": 0, "duplicates": 0, "conflicts": 0, "recorded": 0, "refused": 0, "reasons": {}, "refused_parts": 0}
    progress = Progress(0, job.progress_every_s, False)
    rows_by_file: dict[str, int] = {}
    rows_in_units_before = sum(d["rows"] for d in units_before.values())
    if chunks:
        init_ray(cfg)
        chunks, rows_by_file = count_lines(chunks, cfg.storage, job.cpu_stage_cpus)
        todo = [c for i, c in enumerate(chunks) if i not in units_before]
        total = max(sum(rows_by_file.values()) - rows_in_units_before, 0)
        if units_before:
            print(f"[generate] {len(units_before)} read unit(s) (≈{rows_in_units_before} rows) are skipped unread: a "
                  f"killed run finished every row of them ({join(job.output, INPUTS_FILE)})", flush=True)
        print(f"[generate] ≈{total} rows in {len(rows_by_file)} file(s) ({len(todo)} read units); {len(skip)} ids "
              f"recorded by earlier runs are skipped when seen (read in {bookkeeping_s:.1f}s) -> {job.output}", flush=True)
        progress = Progress(min(total, job.limit) if job.limit else total, job.progress_every_s, progress_bar)
        if todo:
            counts = stream(cfg, todo, skip, progress)
    final = consolidate_manifest(job.output, cfg.storage)
    if chunks and not job.limit:  # every row of these files is now in the manifest
        record_read_inputs(job.output, {c["file"]: {"version": c["version"], "rows": rows_by_file[c["file"]]}
                                        for c in chunks}, cfg.storage)
    # every writer of this run has finished: a temp file left now is from a killed one (this run or earlier).
    # scenes/ is swept while it is small; in a large dataset a stray .tmp-* file there costs disk, not
    # correctness (no reader lists hidden files), and walking tens of millions of files costs minutes.
    sweep = [(job.output, False), (join(job.output, COMMITS_DIR), True), (join(job.output, MANIFEST_DIR), True)]
    if final["rows"] <= SWEEP_SCENES_UP_TO:
        sweep.append((join(job.output, "scenes"), True))
    if stale := sum(remove_temp_files(uri, recursive) for uri, recursive in sweep):
        print(f"[generate] removed {stale} temporary file(s) left by killed writers", flush=True)
    reasons = collections.Counter(counts["reasons"]) + progress.reasons
    this_run = {"rows_read": counts["rows"], "done": progress.done, "failed": progress.failed + progress.refused,
                "files_skipped_unread": len(read_before), "rows_in_files_skipped": sum(v["rows"] for v in read_before.values()),
                "read_units_skipped": len(units_before), "rows_in_units_skipped": rows_in_units_before,
                "failed_at_validation": progress.refused, "duplicates_collapsed": counts["duplicates"],
                "conflicting_ids": counts["conflicts"], "already_recorded": counts["recorded"],
                "seconds": round(time.perf_counter() - t0, 2), "bookkeeping_s": round(bookkeeping_s, 2),
                "scenes_per_s": round(progress.done / max(time.perf_counter() - progress.t0, 1e-9), 4),
                "failures_by_reason": dict(reasons.most_common())}
    card = write_dataset_card(job.output, cfg, this_run, cfg.storage)
    summary = {"output": job.output, "this_run": this_run, "manifest": card["counts"],
               "failures_by_reason": this_run["failures_by_reason"], "duplicates_collapsed": counts["duplicates"],
               "conflicting_ids": counts["conflicts"], "consolidation": final}
    print(f"[generate] finished: {progress.line()}", flush=True)
    print(f"[generate] this run: {counts['rows']} rows read, {counts['duplicates']} duplicates collapsed (a row whose id "
          f"an earlier row of this run already took with the same prompt and seed), {counts['conflicts']} conflicting ids, "
          f"{counts['recorded']} already recorded, {progress.done} done, {this_run['failed']} failed", flush=True)
    m = card["counts"]
    print(f"[generate] manifest: {m['rows']} rows ({m['done']} done, {m['failed']} failed) in {job.output}/manifest/ "
          f"(dataset card: {job.output}/README.md, dataset.json)", flush=True)
    if reasons:
        print("[generate] failures by reason: " + ", ".join(f"{k}: {v}" for k, v in reasons.most_common()), flush=True)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description="Turn a prompt set into a 3D Gaussian-splat dataset on Ray Data (streaming, resumable, exactly once).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
input: .txt (one prompt a line), .jsonl / .csv / .parquet (column prompt; optional id, seed,
negative_prompt), as a file, a glob, a directory or an s3:// prefix, of any size: the files are
read in parallel by Ray Data on the cluster, never loaded by this driver. Ids come from the content
when absent (equal prompts collapse to one id and one scene); seeds derive from ids when absent.

output (generate.output):  scenes/<shard>/<id>.ply|.spz|.png|.cameras.json|.meta.json,
manifest/bucket-*.parquet (one row per id: prompt, seed, status, error, files, timings, licence,
provenance, ...; read the directory with pandas / pyarrow / Ray Data), commits/ (the commit log,
folded into manifest/ at the end), inputs.json (the prompt files finished runs read whole, the read
units killed runs finished), and the dataset card README.md + dataset.json.
Rerun the same command to resume: recorded ids are skipped (failed ones too unless
--set generate.retry_failed=true), and prompt files a finished run read whole, or read units a killed
run finished, are not read again while unchanged (size and mtime, or S3 ETag; delete inputs.json to
read them all again).

examples:
  python -m pipelines.generate --config deploy/generate.yaml
  python -m pipelines.generate --config deploy/generate.yaml --set generate.input=prompts.jsonl --set generate.limit=100
  ray job submit --working-dir . -- python -m pipelines.generate --config deploy/generate.cluster.yaml
""")
    p.add_argument("--config", default="deploy/generate.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key (repeatable), e.g. --set generate.actors=4")
    p.add_argument("--no-progress-bar", action="store_true", help="print a progress line every "
                   "generate.progress_every_s instead of a bar (the default when stderr is not a terminal)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, progress_bar=False if args.no_progress_bar else None)
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
