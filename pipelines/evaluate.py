"""The paper's evaluation as a Ray Data job: generated datasets (or prompt sets) in, per-scene scores and a
summary table (mean ± 95% CI per benchmark and metric) out; resumable.

    python -m pipelines.evaluate --config deploy/evaluate.yaml
    python -m pipelines.evaluate compare out/eval-base out/eval-aligned     # B - A with its CI
    python -m pipelines.evaluate tiny-scorers out/tiny-scorers              # random scorers for the tiny preset

The story: check that every scorer the metrics need is where the config says (before any work); generate
the prompt sets (`evaluate.prompts`) with pipelines.generate into <output>/generated/<name>, the
consistency score computed there against the frames; read every benchmark's manifest and drop scenes an
earlier run committed; then stream the rest through two Ray Data stages:
  1. ScoreScenes  (actors: scorers loaded once; each scene's .ply rendered at `evaluate.scorers.views`
                   views along its predicted cameras, then scored; a failing scene is a failed row)
  2. write_rows   (CPU tasks: commit the batch as a Parquet part)
and finally compact the parts into scenes.parquet and write summary.json / summary.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from pipelines import generate as generate_job
from pipelines.ray_setup import init_ray, set_torch_threads
from vist3a.config import Config, ConfigError, StorageConfig, load_config
from vist3a.dataset import MANIFEST_PLACES, now_utc, read_manifest
from vist3a.evaluation import (ALL_SCORES, EVAL_SCHEMA, FROM_MANIFEST, compact_eval, compare, comparison_markdown,
                               empty_eval_row, read_scenes_table, recorded_keys, score_saved_scene, summary_markdown,
                               write_eval_part, write_summary)
from vist3a.generator import resolve_device
from vist3a.io import ensure_writable, join
from vist3a.scores import SceneScorer, check_scorers, score_columns

# ----------------------------------------------------------------------------- Ray Data stages


class ScoreScenes:
    """Scoring actors: the scorer models are loaded once; every scene is scored alone, so one bad file fails alone."""

    def __init__(self, cfg_dict: dict):
        self.cfg = Config.model_validate(cfg_dict)
        job = self.cfg.evaluate
        set_torch_threads(job.cpus_per_actor, torch.cuda.is_available(), self.cfg.runtime.torch_threads)
        self.scorer = SceneScorer(job.metrics, job.scorers, self.cfg.storage, resolve_device(self.cfg.runtime.device),
                                  self.cfg.runtime.renderer)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        cols = {c: np.full(n, np.nan) for c in self.scorer.columns}
        errors, seconds = [""] * n, np.zeros(n)
        for i in range(n):
            row = {k: batch[k][i] for k in batch}
            t0 = time.perf_counter()
            try:
                for c, v in score_saved_scene(self.scorer, row, self.cfg.storage).items():
                    cols[c][i] = v
            except Exception as exc:  # noqa: BLE001 - recorded as a failed row; the job goes on
                errors[i] = f"scoring failed: {type(exc).__name__}: {exc}"[:500]
            seconds[i] = time.perf_counter() - t0
        batch.update(cols)
        batch["error"] = np.asarray(errors, dtype=object)
        batch["eval_s"] = seconds
        return batch


def write_rows(batch: dict, output: str, storage: dict, columns: list[str]) -> dict:
    """CPU stage: commit the batch's rows as one Parquet part."""
    rows = []
    for i in range(len(batch["key"])):
        row = empty_eval_row()
        for k in ("key", "benchmark", "id", "prompt", "scene_uri", "cameras_uri"):
            row[k] = batch[k][i]
        row["seed"] = None if batch["seed"][i] is None or batch["seed"][i] != batch["seed"][i] else int(batch["seed"][i])
        err = batch["error"][i]
        row.update(status="failed" if err else "done", error=err or None, eval_s=float(batch["eval_s"][i]),
                   finished_at=now_utc())
        if not err:
            row.update({c: (None if math.isnan(float(batch[c][i])) else float(batch[c][i])) for c in columns})
        rows.append(row)
    write_eval_part(output, rows, StorageConfig.model_validate(storage))
    return {"key": np.asarray([r["key"] for r in rows], dtype=object),
            "status": np.asarray([r["status"] for r in rows], dtype=object)}


# ----------------------------------------------------------------------------- driver


def generate_prompt_sets(cfg: Config) -> dict[str, str]:
    """Run pipelines.generate on each prompt set (resumable, like any bulk job); -> benchmark -> dataset URI."""
    job = cfg.evaluate
    out = {}
    at_generation = ["consistency"] if "consistency" in job.metrics else []  # needs the frames: only there
    for name, prompts in job.prompts.items():
        dataset = join(job.output, "generated", name)
        gen_cfg = cfg.model_copy(deep=True)
        gen_cfg.generate.input, gen_cfg.generate.output = prompts, dataset
        gen_cfg.generate.limit, gen_cfg.generate.scores = job.limit, at_generation
        print(f"[evaluate] generating benchmark {name!r} from {prompts} -> {dataset}", flush=True)
        generate_job.run(gen_cfg)
        out[name] = dataset
    return out


def scenes_to_score(cfg: Config, datasets: dict[str, str]) -> pa.Table:
    """The 'done' scenes of every benchmark's manifest (first `limit` by id), less those already committed."""
    job = cfg.evaluate
    skip = recorded_keys(job.output, cfg.storage, include_failed=not job.retry_failed)
    rows = []
    for name, uri in datasets.items():
        manifest = read_manifest(uri, cfg.storage)
        if not manifest.num_rows:
            raise FileNotFoundError(f"evaluate: benchmark {name!r}: no manifest at {uri} (looked for {MANIFEST_PLACES})")
        done = [r for r in manifest.to_pylist() if r["status"] == "done"]
        for r in done[: job.limit] if job.limit else done:
            key = f"{name}/{r['id']}"
            if key in skip:
                continue
            rows.append({"key": key, "benchmark": name, "id": r["id"], "prompt": r["prompt"], "seed": r["seed"],
                         "scene_uri": r["scene_uri"], "cameras_uri": r["cameras_uri"],
                         **{c: r.get(c) for c in FROM_MANIFEST}})
    schema = pa.schema([EVAL_SCHEMA.field(n) for n in ("key", "benchmark", "id", "prompt", "seed", "scene_uri",
                                                       "cameras_uri", *FROM_MANIFEST)])
    return pa.Table.from_pylist(rows, schema=schema)


def build_dataset(cfg: Config, todo: pa.Table):
    job = cfg.evaluate
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    blocks = max(1, min(-(-todo.num_rows // job.batch_size), 16 * job.actors))
    ds = ray.data.from_arrow(todo).repartition(blocks)
    ds = ds.map_batches(ScoreScenes, fn_constructor_kwargs={"cfg_dict": cfg.model_dump(mode="json")},
                        compute=ActorPoolStrategy(size=job.actors), num_gpus=job.gpus_per_actor or None,
                        num_cpus=job.cpus_per_actor, batch_size=job.batch_size, batch_format="numpy")
    return ds.map_batches(write_rows, fn_kwargs={"output": job.output, "storage": cfg.storage.model_dump(),
                                                 "columns": score_columns(job.metrics)},
                          num_cpus=job.cpu_stage_cpus, batch_size=job.batch_size, batch_format="numpy")


def run(cfg: Config) -> dict:
    """Run (or resume) the evaluation described by `cfg.evaluate`; returns the summary."""
    job = cfg.evaluate
    t0 = time.perf_counter()
    if not job.datasets and not job.prompts:
        raise ValueError("evaluate.datasets and evaluate.prompts are both empty: name at least one benchmark")
    ensure_writable(job.output, cfg.storage)
    check_scorers(job.metrics, job.scorers, cfg.storage, key="evaluate.metrics")  # before any generation or Ray
    datasets = {**job.datasets, **generate_prompt_sets(cfg)}
    todo = scenes_to_score(cfg, datasets)
    print(f"[evaluate] {len(datasets)} benchmark(s), {todo.num_rows} scene(s) to score -> {job.output}", flush=True)
    done = failed = 0
    t_score = time.perf_counter()
    if todo.num_rows:
        init_ray(cfg)
        last = time.perf_counter()
        for batch in build_dataset(cfg, todo).iter_batches(batch_size=None, batch_format="numpy"):
            statuses = list(batch["status"])
            done, failed = done + statuses.count("done"), failed + statuses.count("failed")
            if time.perf_counter() - last >= job.progress_every_s:
                last = time.perf_counter()
                print(f"[evaluate] scored {done}, failed {failed}, remaining {todo.num_rows - done - failed}", flush=True)
    score_s = time.perf_counter() - t_score
    table = compact_eval(job.output, cfg.storage)
    columns = [c for c in score_columns(job.metrics) if c in ALL_SCORES]
    summary = write_summary(job.output, table, columns, job.confidence, cfg.storage)
    print(summary_markdown(summary, columns, job.confidence), flush=True)
    print(f"[evaluate] this run: {done} scored, {failed} failed in {score_s:.1f}s of scoring "
          f"({time.perf_counter() - t0:.1f}s in all); {table.num_rows} rows at {join(job.output, 'scenes.parquet')}",
          flush=True)
    return {"summary": summary, "this_run": {"done": done, "failed": failed, "score_s": round(score_s, 2),
                                             "seconds": round(time.perf_counter() - t0, 2)}}


def run_compare(a: str, b: str, cfg: Config) -> dict:
    ta, tb = read_scenes_table(a, cfg.storage), read_scenes_table(b, cfg.storage)
    columns = [c for c in ALL_SCORES if c in score_columns(cfg.evaluate.metrics)]
    result = compare(ta, tb, columns, cfg.evaluate.confidence)
    print(f"A = {a}\nB = {b}\n" + comparison_markdown(result, columns, cfg.evaluate.confidence), flush=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate",
        description="Score generated 3D scenes (the paper's evaluation) on Ray Data: per-scene Parquet + summary.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
commands:
  run (default)        score evaluate.datasets (generated datasets) and evaluate.prompts (generated first)
  compare A B          print B - A per benchmark and metric with its CI (paired over shared scenes)
  tiny-scorers DIR     write a random CLIP and aesthetic head for the tiny preset (numbers mean nothing)

output (evaluate.output): scenes.parquet (key, benchmark, id, prompt, status, error, one column per
score, eval_s), summary.json and summary.md (mean ± CI half-width per benchmark and metric), parts/ (the
commit log: rerun the same command to resume), generated/<benchmark>/ for prompt sets.

examples:
  python -m pipelines.evaluate --config deploy/evaluate.yaml
  python -m pipelines.evaluate --config deploy/evaluate.yaml --set evaluate.limit=20
  python -m pipelines.evaluate compare out/eval-base out/eval-aligned --config deploy/evaluate.yaml
""")
    p.add_argument("command", nargs="?", default="run", choices=["run", "compare", "tiny-scorers"])
    p.add_argument("paths", nargs="*", help="compare: run A and run B; tiny-scorers: the directory")
    p.add_argument("--config", default="deploy/evaluate.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key (repeatable), e.g. --set evaluate.limit=20")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "tiny-scorers":
            if len(args.paths) != 1:
                raise ValueError("tiny-scorers takes one directory")
            from vist3a.scores import write_tiny_scorers

            print(f"[evaluate] tiny scorers written: {write_tiny_scorers(args.paths[0])}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "compare":
            if len(args.paths) != 2:
                raise ValueError("compare takes two evaluation outputs: A B")
            run_compare(*args.paths, cfg)
        else:
            run(cfg)
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
