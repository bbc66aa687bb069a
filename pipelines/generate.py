"""Bulk synthetic-3D dataset generation on Ray Data: a prompt set in, scenes and a manifest out.

    python -m pipelines.generate --config deploy/generate.yaml
    ray job submit --working-dir . -- python -m pipelines.generate --config deploy/generate.cluster.yaml

The story: read and normalise the prompt set on the driver (ids, seeds, duplicates, bad rows),
drop ids an earlier run already recorded, then stream the rest through three Ray Data stages:
  1. ValidatePrompts  (CPU actors: the text encoder's token limit, before any GPU time)
  2. GenerateScenes   (GPU actors: the model is loaded once per actor; one batch per call)
  3. write_scenes     (CPU tasks: encode .ply/.png, upload, commit a manifest part)
The driver consumes the stream for progress, then compacts the manifest. Rerunning the same
command on the same output resumes: every id is written exactly once (see vist3a.dataset).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pickle
import re
import sys
import time

import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from pipelines.ray_setup import init_ray, run_isolated, set_torch_threads
from vist3a import __version__
from vist3a.config import Config, ConfigError, StorageConfig, load_config
from vist3a.dataset import (RESULT_SCHEMA, STAGE_SCHEMA, compact_manifest, empty_manifest_row, file_columns, now_utc,
                            recorded_ids, typed_table, write_manifest_part, write_scene)
from vist3a.generator import SceneGenerator, scene_files
from vist3a.io import ensure_writable, remove_temp_files
from vist3a.io.prompts import read_prompts
from vist3a.video import check_prompt, load_tokenizer

log = logging.getLogger("vist3a.generate")


# ----------------------------------------------------------------------------- Ray Data stages


class ValidatePrompts:
    """CPU stage: refuse prompts the text encoder cannot take (token limit) before any GPU time."""

    def __init__(self, cfg_dict: dict):
        self.cfg = Config.model_validate(cfg_dict)
        local = SceneGenerator.fetch_and_verify_weights(self.cfg)  # hub ids / s3:// made local on this node
        self.tokenizer = load_tokenizer(local.model.video)

    def __call__(self, batch: pa.Table) -> pa.Table:
        limit, template = self.cfg.model.video.text_encoder.max_length, self.cfg.sampling.prompt_template
        rows = batch.to_pylist()
        for row in rows:
            if row["error"] is None:
                row["error"] = check_prompt(self.tokenizer, row["prompt"], limit, template)
        return typed_table(rows, STAGE_SCHEMA, "prompt row")


class GenerateScenes:
    """GPU stage: one SceneGenerator per actor; a failing batch is retried item by item."""

    def __init__(self, cfg_dict: dict):
        cfg = Config.model_validate(cfg_dict)
        set_torch_threads(cfg.generate.cpus_per_actor, torch.cuda.is_available(), cfg.runtime.torch_threads)
        self.gen = SceneGenerator(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()

        def generate(todo: list[dict]) -> list:
            return self.gen.generate([r["prompt"] for r in todo], [r["seed"] for r in todo],
                                     [r["negative_prompt"] or "" for r in todo])

        done, failed = run_isolated(generate, [r for r in rows if r["error"] is None])
        for row, reason in failed:  # recorded as failed rows; the job goes on
            row["error"] = reason
        for row, scene in done:
            # pickled: Arrow stores bytes as they are, where a Scene object makes Ray Data try (and fail,
            # with a warning per block) to convert it to an Arrow column first
            row["scene"] = pickle.dumps(scene, protocol=pickle.HIGHEST_PROTOCOL)
            row["meta"] = json.dumps(self.gen.meta(scene))  # JSON text: Arrow would turn lists into arrays
        return typed_table(rows, STAGE_SCHEMA, "prompt row")


def write_scenes(batch: pa.Table, output: str, storage: dict, ply_sh_degree: int,
                 formats: tuple[str, ...] | list[str] = ("ply",)) -> pa.Table:
    """CPU stage: encode and upload each scene, then commit the batch's manifest part."""
    storage_cfg = StorageConfig.model_validate(storage)
    rows = []
    for item in batch.to_pylist():
        row = empty_manifest_row()
        for k in ("id", "prompt", "negative_prompt", "seed", "source"):
            row[k] = item[k]
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


def failure_class(error: object) -> str:
    """A failure reason's class, for counting: the text before its first colon, quoted values and
    numbers blanked ("prompt too long: 317 tokens..." and "...: 316 tokens..." are one class)."""
    head = str(error).split(":")[0]
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", head)).strip()


class Progress:
    """A periodic line (done, failed, remaining, scenes/s) and the end-of-run summary."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.done = self.failed = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.t0 = self.last = time.perf_counter()

    def update(self, batch: pa.Table) -> None:
        for status, err in zip(batch.column("status").to_pylist(), batch.column("error").to_pylist()):
            if status == "done":
                self.done += 1
            else:
                self.failed += 1
                self.reasons[failure_class(err)] += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"[generate] {self.line()}", flush=True)

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        remaining = self.total - self.done - self.failed
        return (f"done {self.done}, failed {self.failed}, remaining {remaining}, "
                f"{self.done / dt:.3f} scenes/s, {dt:.0f}s elapsed")


def build_dataset(cfg: Config, todo: pa.Table):
    """The streaming plan: validate (CPU) -> generate (GPU actors) -> write (CPU)."""
    job = cfg.generate
    cfg_dict = cfg.model_dump(mode="json")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    # Blocks are the unit of work an actor takes: >= 16 per actor keeps every actor busy to the end,
    # <= 1024 rows each keeps a straggler short at dataset scale, >= one batch each keeps batches full.
    per_block = min(max(-(-todo.num_rows // (16 * job.actors)), job.batch_size), 1024)
    blocks = max(1, -(-todo.num_rows // per_block))
    # Every stage takes and returns Arrow tables of STAGE_SCHEMA (vist3a.dataset): all-null columns stay typed.
    for field in STAGE_SCHEMA:  # the prompt table plus typed, empty columns for what generation adds
        if field.name not in todo.column_names:
            todo = todo.append_column(field, pa.nulls(todo.num_rows, field.type))
    ds = ray.data.from_arrow(todo.select(STAGE_SCHEMA.names).cast(STAGE_SCHEMA)).repartition(blocks)
    ds = ds.map_batches(ValidatePrompts, fn_constructor_kwargs={"cfg_dict": cfg_dict},
                        compute=ActorPoolStrategy(size=job.validators), num_cpus=job.cpu_stage_cpus,
                        batch_size=None, batch_format="pyarrow")  # a block at a time: never merges blocks
    ds = ds.map_batches(GenerateScenes, fn_constructor_kwargs={"cfg_dict": cfg_dict},
                        compute=ActorPoolStrategy(size=job.actors), num_gpus=job.gpus_per_actor or None,
                        num_cpus=job.cpus_per_actor, batch_size=job.batch_size, batch_format="pyarrow")
    ds = ds.map_batches(write_scenes, fn_kwargs={"output": job.output, "storage": cfg.storage.model_dump(),
                                                 "ply_sh_degree": cfg.splats.ply_sh_degree,
                                                 "formats": cfg.splats.formats},
                        num_cpus=job.cpu_stage_cpus, batch_size=job.batch_size, batch_format="pyarrow")
    return ds


def run(cfg: Config) -> dict:
    """Run (or resume) the job described by `cfg`; returns the summary."""
    job = cfg.generate
    t0 = time.perf_counter()
    ensure_writable(job.output, cfg.storage)
    SceneGenerator.fetch_and_verify_weights(cfg)  # missing weights fail here, before Ray or any GPU starts
    table, stats = read_prompts(job.input, cfg.storage)
    if job.limit:
        table = table.slice(0, job.limit)
    skip = recorded_ids(job.output, cfg.storage, include_failed=not job.retry_failed)
    mask = pa.array([i not in skip for i in table.column("id").to_pylist()], pa.bool_())
    todo = table.filter(mask)
    print(f"[generate] {stats['rows']} rows in {stats['files']} file(s): {table.num_rows} unique "
          f"({stats['duplicates']} duplicates collapsed, {stats['conflicts']} conflicting ids), {table.num_rows - todo.num_rows} already recorded, "
          f"{todo.num_rows} to do -> {job.output}", flush=True)
    progress = Progress(todo.num_rows, job.progress_every_s)
    if todo.num_rows:
        init_ray(cfg)
        for batch in build_dataset(cfg, todo).iter_batches(batch_size=None, batch_format="pyarrow"):
            progress.update(batch)
    # every writer of this run has finished: a temp file left now is from a killed one (this run or earlier)
    if stale := remove_temp_files(job.output):
        print(f"[generate] removed {stale} temporary file(s) left by killed writers", flush=True)
    manifest = compact_manifest(job.output, cfg.storage)
    status = manifest.column("status").to_pylist()
    summary = {
        "output": job.output,
        "this_run": {"done": progress.done, "failed": progress.failed, "seconds": round(time.perf_counter() - t0, 2),
                     "scenes_per_s": round(progress.done / max(time.perf_counter() - progress.t0, 1e-9), 4)},
        "manifest": {"rows": manifest.num_rows, "done": status.count("done"), "failed": status.count("failed")},
        "failures_by_reason": dict(progress.reasons),
        "duplicates_collapsed": stats["duplicates"],
        "conflicting_ids": stats["conflicts"],
    }
    print(f"[generate] finished: {progress.line()}", flush=True)
    print(f"[generate] manifest: {summary['manifest']['rows']} rows ({summary['manifest']['done']} done, "
          f"{summary['manifest']['failed']} failed) at {job.output}/manifest.parquet", flush=True)
    if progress.reasons:
        print("[generate] failures by reason: " + ", ".join(f"{k}: {v}" for k, v in progress.reasons.most_common()), flush=True)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description="Turn a prompt set into a 3D Gaussian-splat dataset on Ray Data (resumable, exactly once).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
input: .txt (one prompt a line), .jsonl / .csv / .parquet (column prompt; optional id, seed,
negative_prompt), as a file, a glob, a directory or an s3:// prefix. Ids come from the content
when absent (equal prompts collapse to one id); seeds derive from ids when absent.

output (generate.output):  scenes/<shard>/<id>.ply|.png|.cameras.json|.meta.json and
manifest.parquet (id, prompt, seed, status, error, scene_uri, num_gaussians, bbox, timings, ...).
Rerun the same command to resume: completed ids are skipped; failed ones too unless
--set generate.retry_failed=true.

examples:
  python -m pipelines.generate --config deploy/generate.yaml
  python -m pipelines.generate --config deploy/generate.yaml --set generate.input=prompts.jsonl --set generate.limit=100
  ray job submit --working-dir . -- python -m pipelines.generate --config deploy/generate.cluster.yaml
""")
    p.add_argument("--config", default="deploy/generate.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key (repeatable), e.g. --set generate.actors=4")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg)
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
