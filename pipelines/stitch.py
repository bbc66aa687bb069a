"""Model stitching on Ray Train: one-pass layer search, then stitched LoRA fine-tuning.

    python -m pipelines.stitch search   --config deploy/stitch.yaml
    python -m pipelines.stitch finetune --config deploy/stitch.yaml --set stitch_job.init=out/stitch/search/best.pt
    ray job submit --working-dir . -- python -m pipelines.stitch search --config deploy/stitch.cluster.yaml

search: every worker streams its share of the corpus (row groups of the Parquet shards) through the
  video VAE encoder and the reconstruction network (every candidate layer's tokens from one pass), and adds
  the rows to float64 normal equations (vist3a.stitching.search). The sums are all-reduced
  (gloo on CPU, nccl on GPU); rank 0 solves the ridge problem of every layer and writes
  <output>/search/table.json, layers/<layer>.pt (every layer's fitted stitching layer) and best.pt.
finetune: TorchTrainer (DDP) over StitchFinetuner steps; metrics reported every step; a checkpoint
  (stitching layer, LoRA, optimizer, scheduler, step, config) every `checkpoint_every` steps to
  storage_path (local or s3://). A worker failure restarts from the last checkpoint (FailureConfig);
  rerunning the same command resumes the run of the same name. The result is <output>/stitch.pt,
  which the generator loads with model.stitch.weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from pipelines.ray_setup import (checkpointed_run, failure_drill, fit, init_ray, report_step, restored_checkpoint,
                                 scaling, worker_setup)
from vist3a.config import Config, ConfigError, load_config
from vist3a.io import join, read_text, write_text
from vist3a.io.corpus import Corpus, clip_views
from vist3a.models import build_recon, build_stitched_decoder
from vist3a.stitching import StitchingLayer, read_stitch_checkpoint, save_stitch_checkpoint
from vist3a.stitching.checkpoint import check_compatible, stitch_checkpoint
from vist3a.stitching.finetune import StitchFinetuner
from vist3a.stitching.search import LayerFit, LayerSearch, best_layer, format_table, is_heldout
from vist3a.stitching.spec import StitchSpec
from vist3a.video import build_wan

# ----------------------------------------------------------------------------- shared


def vae_size(cfg: Config) -> int:
    """Frames enter the VAE at the generator's resolution, so the fit sees the latents generation makes."""
    if cfg.sampling.height != cfg.sampling.width:
        raise ValueError(f"stitching needs square frames: sampling.height {cfg.sampling.height} != width {cfg.sampling.width}")
    return cfg.sampling.height


def check_setup(cfg: Config) -> Corpus:
    """Fail before Ray starts: shapes that cannot stitch, a missing or empty corpus."""
    job, rc = cfg.stitch_job, cfg.model.recon
    spec = StitchSpec.parse(cfg.model.stitch.spec)
    latent = vae_size(cfg) // 2 ** (len(cfg.model.video.vae.dim_mult) - 1)
    out = spec.output_size(job.views, latent, latent)
    grid = rc.img_size // rc.patch_size
    if out != (job.views, grid, grid):
        raise ValueError(f"model.stitch.spec maps {job.views} frames of {latent}x{latent} latents (VAE input "
                         f"{vae_size(cfg)}px) to {out}, the network needs ({job.views}, {grid}, {grid})")
    if spec.out_channels != rc.embed_dim:
        raise ValueError(f"model.stitch.spec has {spec.out_channels} output channels, model.recon.embed_dim is {rc.embed_dim}")
    corpus = Corpus(job.corpus, cfg.storage)
    counts = corpus.frame_counts()
    usable = sum(n >= job.views for n in counts)
    if usable == 0:
        raise ValueError(f"corpus {job.corpus} has no clip of at least stitch_job.views={job.views} frames "
                         f"({len(counts)} clips)")
    if usable < len(counts):
        print(f"[stitch] {len(counts) - usable} of {len(counts)} clips have fewer than {job.views} frames and are skipped",
              flush=True)
    return corpus


def load_vae(cfg: Config, device: torch.device) -> torch.nn.Module:
    return build_wan(cfg.model.video, device=device).vae


# ----------------------------------------------------------------------------- search


def search_loop(config: dict) -> None:
    """Ray Train worker: accumulate this worker's clips, all-reduce, rank 0 solves and writes."""
    cfg = Config.model_validate(config["cfg"])
    job = cfg.stitch_job
    rank, world, device = worker_setup(cfg.stitch_job)
    search = LayerSearch.for_models(load_vae(cfg, device), build_recon(cfg, device), cfg.model.stitch.spec,
                                    job.candidates, vae_size(cfg), device)
    size = max(search.vae_size, search.image_size)
    limit = math.ceil(job.max_clips / world) if job.max_clips else None
    batch, flags, seen, t0 = [], [], 0, time.perf_counter()
    for clip in Corpus(job.corpus, cfg.storage).iter_clips(rank, world, columns=["id", "frames", "width", "height", "num_frames"]):
        if limit is not None and seen >= limit:
            break
        if clip.num_frames < job.views:
            continue  # counted by check_setup
        seen += 1
        batch.append(clip_views(clip, job.views, size, job.seed))
        flags.append(is_heldout(clip.id, job.heldout_fraction))
        if len(batch) == job.batch_size:
            search.add(torch.stack(batch), flags)
            batch, flags = [], []
    if batch:
        search.add(torch.stack(batch), flags)
    totals = torch.tensor([search.clips["fit"], search.clips["heldout"], search.seconds["forward"],
                           search.seconds["accumulate"], time.perf_counter() - t0], dtype=torch.float64, device=device)
    if world > 1:
        for key in sorted(search.eq.state):
            dist.all_reduce(search.eq.state[key])
        dist.all_reduce(totals)
    metrics = {"clips_fit": int(totals[0]), "clips_heldout": int(totals[1]), "forward_s": float(totals[2]),
               "accumulate_s": float(totals[3]), "worker_s": float(totals[4])}
    if rank == 0:
        t1 = time.perf_counter()
        fits = search.solve(job.ridge_lambda)
        metrics["solve_s"] = time.perf_counter() - t1
        summary = write_search_outputs(cfg, search, fits, metrics, world)
        metrics.update(best=summary["best"], **{f"r2_heldout/{f.name}": f.r2_heldout for f in fits})
    ray.train.report(metrics)


def write_search_outputs(cfg: Config, search: LayerSearch, fits: list[LayerFit], metrics: dict, world: int) -> dict:
    """table.json, layers/<layer>.pt for every layer, best.pt; returns the table."""
    job = cfg.stitch_job
    root = join(job.output, "search")
    best = best_layer(fits)
    rows = []
    for f in fits:
        layer = StitchingLayer(search.spec, search.in_channels)
        layer.conv.weight.data.copy_(f.weight)
        layer.conv.bias.data.copy_(f.bias)
        meta = {"source": "ridge", **f.row(), "ridge_lambda": job.ridge_lambda, "corpus": job.corpus}
        payload = stitch_checkpoint(layer, f.name, meta=meta)
        uri = join(root, "layers", f"{f.name}.pt")
        save_stitch_checkpoint(uri, payload, cfg.storage)
        if f.name == best.name:
            save_stitch_checkpoint(join(root, "best.pt"), payload, cfg.storage)
        rows.append({**f.row(), "weights": uri})
    table = {"best": best.name, "best_weights": join(root, "best.pt"), "layers": rows, "spec": cfg.model.stitch.spec,
             "ridge_lambda": job.ridge_lambda, "heldout_fraction": job.heldout_fraction, "views": job.views,
             "corpus": job.corpus, "workers": world, "rows_fit": search.eq.rows("fit"),
             "rows_heldout": search.eq.rows("heldout"), **metrics}
    write_text(join(root, "table.json"), json.dumps(table, indent=1, default=float), cfg.storage)
    return table


def run_search(cfg: Config) -> dict:
    job = cfg.stitch_job
    corpus = check_setup(cfg)
    print(f"[stitch search] {len(corpus)} clips in {len(corpus.units())} row groups at {job.corpus}; "
          f"{job.workers} worker(s); candidates {job.candidates or 'all'}", flush=True)
    init_ray(cfg)
    # a fresh run name each time: a search has no checkpoint, a failed worker restarts the pass
    run_config, _ = checkpointed_run(job, cfg, name=f"{job.name}-search-{uuid.uuid4().hex[:8]}")
    fit(TorchTrainer(search_loop, train_loop_config={"cfg": cfg.model_dump(mode="json")}, scaling_config=scaling(job),
                     run_config=run_config))
    table = json.loads(read_text(join(job.output, "search", "table.json"), cfg.storage))
    print(format_table(table["layers"], table["best"]), flush=True)
    print(f"[stitch search] {table['clips_fit']} fit + {table['clips_heldout']} held-out clips; forward "
          f"{table['forward_s']:.1f}s, accumulate {table['accumulate_s']:.1f}s, solve {table['solve_s']:.2f}s "
          f"(summed over workers)", flush=True)
    print(f"[stitch search] best layer {table['best']} -> {table['best_weights']}\n"
          f"  next: python -m pipelines.stitch finetune --set model.stitch.cut={table['best']} "
          f"--set stitch_job.init={table['best_weights']}", flush=True)
    return table


# ----------------------------------------------------------------------------- finetune


class ClipSampler:
    """The clips of step s on worker r: drawn from the worker's share with an RNG seeded by (seed, s, r),
    so a restarted run sees exactly the batches the lost one would have."""

    def __init__(self, corpus: Corpus, rank: int, world: int, views: int, batch_size: int, size: int, seed: int):
        self.corpus, self.rank, self.views, self.batch_size, self.size, self.seed = corpus, rank, views, batch_size, size, seed
        counts = corpus.frame_counts()
        self.indices = [i for i in corpus.worker_clip_indices(rank, world) if counts[i] >= views]
        if not self.indices:
            raise ValueError(f"worker {rank} of {world} has no clip of {views}+ frames: the corpus has {len(corpus)} clips")

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, self.rank])
        picks = rng.choice(self.indices, size=self.batch_size, replace=len(self.indices) < self.batch_size)
        cols = ["id", "frames", "width", "height", "num_frames"]
        return torch.stack([clip_views(self.corpus.clip(int(i), cols), self.views, self.size, self.seed, step)
                            for i in picks])


def finetune_loop(config: dict) -> None:
    """Ray Train worker: resume or initialise, then step, report every step, checkpoint periodically."""
    cfg = Config.model_validate(config["cfg"])
    job = cfg.stitch_job
    rank, world, device = worker_setup(cfg.stitch_job)
    vae = load_vae(cfg, device)
    ft = StitchFinetuner(build_stitched_decoder(cfg, vae, device, load_weights=False), vae, job, vae_size(cfg), device)
    with restored_checkpoint() as d:
        resumed = d is not None
        if resumed:
            ft.load_state_dict(torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True))
            print(f"[stitch finetune] rank {rank}: resumed at step {ft.step}", flush=True)
    if not resumed and job.init:
        ft.init_stitch(read_stitch_checkpoint(job.init, cfg.storage), source=job.init)
    model = ray.train.torch.prepare_model(ft.student)
    sampler = ClipSampler(Corpus(job.corpus, cfg.storage), rank, world, job.views, job.batch_size,
                          max(ft.vae_size, ft.image_size), job.seed)
    start = ft.step
    while ft.step < job.steps:
        failure_drill(job, "stitch_job", ft.step, resumed, rank)
        metrics = ft.train_step(sampler.batch(ft.step), model, rank)
        metrics.update(resumed_from=start if resumed else -1)
        report_step(metrics, job, ft.step, rank, lambda d: torch.save(ft.state_dict(), os.path.join(d, "state.pt")),
                    config["cfg"])
    if rank == 0:
        meta = {"source": "finetune", "steps": job.steps, "corpus": job.corpus, "run": job.name,
                "init": job.init, "final_loss": metrics["loss"] if ft.step > start else None}
        save_stitch_checkpoint(join(job.output, "stitch.pt"), ft.export(meta), cfg.storage)


def run_finetune(cfg: Config) -> dict:
    job = cfg.stitch_job
    corpus = check_setup(cfg)
    if job.init:  # the check StitchFinetuner.init_stitch makes, now rather than in every worker
        with torch.device("meta"):
            layer = StitchingLayer(cfg.model.stitch.spec, in_channels=cfg.model.video.vae.z_dim)
        check_compatible(read_stitch_checkpoint(job.init, cfg.storage), layer, cfg.model.stitch.cut,
                         source=f"stitch_job.init {job.init}")
    run_config, where = checkpointed_run(job, cfg)
    print(f"[stitch finetune] {len(corpus)} clips; {job.workers} worker(s) x batch {job.batch_size}; {job.steps} steps; "
          f"cut {cfg.model.stitch.cut}; init {job.init or 'random'}; checkpoints -> {where}", flush=True)
    init_ray(cfg)
    summary = {"output": join(job.output, "stitch.pt"),
               **fit(TorchTrainer(finetune_loop, train_loop_config={"cfg": cfg.model_dump(mode="json")},
                                  scaling_config=scaling(job), run_config=run_config))}
    metrics = summary["metrics"]
    print(f"[stitch finetune] done: step {metrics.get('step', job.steps)}, loss {metrics.get('loss', float('nan')):.4g}; "
          f"stitch checkpoint {summary['output']} (load with model.stitch.weights)", flush=True)
    return summary


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipelines.stitch", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
examples:
  python -m pipelines.make_corpus --procedural 64 --out out/corpus
  python -m pipelines.stitch search --config deploy/stitch.yaml
  python -m pipelines.stitch finetune --config deploy/stitch.yaml --set stitch_job.init=out/stitch/search/best.pt
  ray job submit --working-dir . -- python -m pipelines.stitch finetune --config deploy/stitch.cluster.yaml
Rerun finetune with the same stitch_job.name (and storage) to resume it.""")
    p.add_argument("command", choices=("search", "finetune"))
    p.add_argument("--config", default="deploy/stitch.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key (repeatable), e.g. --set stitch_job.workers=4")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        (run_search if args.command == "search" else run_finetune)(cfg)
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"stitch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
