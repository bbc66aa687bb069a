"""Direct reward fine-tuning of the video generator (a LoRA on the Wan transformer) on Ray Train.

    python -m pipelines.align tiny-scorer out/tiny-clip          # a small random CLIP scorer, for the tiny preset
    python -m pipelines.align train --config deploy/align.yaml
    ray job submit --working-dir . -- python -m pipelines.align train --config deploy/align.cluster.yaml

The driver reads the prompt set (vist3a.io.prompts: .txt/.jsonl/.csv/.parquet, local or s3://), drops
rows that cannot be generated (bad rows, prompts over the token limit once wrapped in a template), and
hands it to a TorchTrainer as a Ray Dataset. Every worker reads the whole (small) prompt table and
keeps every world-th prompt by id, so its share does not depend on the order rows arrive in; each
step it draws `batch_size` of them, and everything else random about the step, from (seed, step, rank)
(vist3a.train.align). Gradients of the LoRA are averaged across workers (gloo on CPU, nccl on GPU)
before each AdamW step. Metrics are reported every step; a checkpoint (lora/, lora_ema/,
optimizer.pt, meta.json) every `checkpoint_every` steps to storage_path (local or s3://). A worker
failure restarts from the last checkpoint (FailureConfig); rerunning the same command resumes the
run of the same name, with the same weights an uninterrupted run would reach. The result is
<output>/lora_ema (and lora/), which generate and serve load with model.video.lora.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow as pa
import ray.data
import ray.train
import torch
from ray.train import DataConfig
from ray.train.torch import TorchTrainer

from pipelines.ray_setup import (checkpoint_due, checkpointed_run, failure_drill, fit, init_ray, report_step,
                                 restored_checkpoint, scaling, worker_setup)
from vist3a.config import Config, ConfigError, load_config
from vist3a.io import ensure_writable, join
from vist3a.io.corpus import Corpus, clip_views
from vist3a.io.prompts import read_prompts
from vist3a.models import build_stitched_decoder, build_video
from vist3a.rewards import ClipScorer, write_tiny_clip
from vist3a.train.align import AlignTrainer, average_metrics, check_replicas_in_sync, draw_prompts, prompt_share
from vist3a.video import check_prompt, load_tokenizer
from vist3a.weights import prepare_weights

# ----------------------------------------------------------------------------- driver side


def read_prompt_table(cfg: Config) -> tuple[pa.Table, dict]:
    """The prompt set as an Arrow table (id, prompt) of the rows the generator can take with every
    template; -> (table, stats). Fails before Ray starts when nothing is left."""
    job = cfg.align
    table, stats = read_prompts(job.prompts, cfg.storage)
    tokenizer = load_tokenizer(cfg.model.video)
    limit = cfg.model.video.text_encoder.max_length
    ids, prompts, refused = [], [], []
    for row in table.to_pylist():
        reason = row["error"] or next((r for t in job.prompt_templates
                                       if (r := check_prompt(tokenizer, t.format(prompt=row["prompt"]), limit))), None)
        if reason:
            refused.append((row["source"], reason))
            continue
        ids.append(row["id"])
        prompts.append(row["prompt"])
    stats["refused"] = len(refused)
    if refused:
        print(f"[align] {len(refused)} prompt(s) skipped, e.g. {refused[0][0]}: {refused[0][1]}", flush=True)
    if len(ids) < job.workers:
        raise ValueError(f"{job.prompts}: {len(ids)} usable prompt(s) for {job.workers} worker(s); each worker needs one")
    return pa.table({"id": ids, "prompt": prompts}), stats


def check_setup(cfg: Config) -> None:
    """Refuse, before Ray starts, what a worker would only find out after loading every model."""
    job = cfg.align
    w = job.reward_weights
    if not any(w[k] > 0 for k in w):
        raise ValueError("every align.reward_weights term is 0: nothing to train")
    if w["quality"] > 0 and not job.scorer:
        raise ValueError("align.reward_weights.quality > 0 needs align.scorer (a CLIP directory, s3:// prefix or hub id; "
                         "`python -m pipelines.align tiny-scorer DIR` writes a small random one)")
    if w["diffusion"] > 0:
        if not job.corpus:
            raise ValueError("align.reward_weights.diffusion > 0 needs align.corpus (a clip corpus with captions)")
        if cfg.sampling.height != cfg.sampling.width:
            raise ValueError("the diffusion loss crops corpus clips to squares: set sampling.height = sampling.width")


# ----------------------------------------------------------------------------- worker side


def build_trainer(cfg: Config, device: torch.device) -> AlignTrainer:
    """Video model, frozen stitched decoder, scorer and the AlignTrainer around them (models loaded here,
    in the worker, from paths: nothing large travels through Ray)."""
    local_cfg, _ = prepare_weights(cfg)
    dtype = getattr(torch, cfg.runtime.dtype)
    video = build_video(local_cfg, device, dtype)
    decoder = build_stitched_decoder(local_cfg, video.vae, device, decode_frames=video.decode)
    job = cfg.align
    scorer = (ClipScorer.load(job.scorer, cfg.storage, job.scorer_tokenizer, device)
              if job.reward_weights["quality"] > 0 else None)
    return AlignTrainer(local_cfg, video, decoder, scorer, device)


class ClipDraws:
    """Captioned corpus clips for the diffusion loss: the clips of step s on rank r come from an RNG seeded
    by (seed, s, r), as everything else in a step, so restarts replay them."""

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank = cfg, rank
        self.corpus = Corpus(cfg.align.corpus, cfg.storage)
        self.indices = self.corpus.worker_clip_indices(rank, world)
        if not self.indices:
            raise ValueError(f"worker {rank} of {world} has no clips: {cfg.align.corpus} has {len(self.corpus)}")

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        job, s = self.cfg.align, self.cfg.sampling
        rng = np.random.default_rng([job.seed, step, self.rank, 1])
        picks = rng.choice(self.indices, size=job.batch_size, replace=len(self.indices) < job.batch_size)
        clips = [self.corpus.clip(int(i), ["id", "frames", "width", "height", "num_frames", "caption"]) for i in picks]
        frames = torch.stack([clip_views(c, s.frames, s.height, job.seed, step) for c in clips])
        return frames, [c.caption or "" for c in clips]


def train_loop(config: dict) -> None:
    """Ray Train worker: resume or start, then step, report every step, checkpoint periodically."""
    cfg = Config.model_validate(config["cfg"])
    job = cfg.align
    rank, world, device = worker_setup(cfg.align)
    ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
    rows = list(ray.train.get_dataset_shard("prompts").iter_rows())
    ids = [r["id"] for r in rows]
    mine = [rows[i]["prompt"] for i in prompt_share(ids, rank, world)]
    trainer = build_trainer(cfg, device)
    clips = ClipDraws(cfg, rank, world) if job.reward_weights["diffusion"] > 0 else None
    with restored_checkpoint() as d:
        resumed = d is not None
        if resumed:
            trainer.load(d)
            print(f"[align] rank {rank}: resumed at step {trainer.step}", flush=True)
    start = trainer.step
    metrics: dict = {}
    while trainer.step < job.steps:
        failure_drill(job, "align", trainer.step, resumed, rank)
        batch = draw_prompts(mine, job, trainer.step, rank)
        metrics = average_metrics(trainer.train_step(batch, rank, world, clips.batch(trainer.step) if clips else None), world)
        metrics.update(resumed_from=start if resumed else -1, world=world)
        if checkpoint_due(job, trainer.step):
            check_replicas_in_sync(list(trainer.params.values()), world)  # a collective: every rank, before saving
        report_step(metrics, job, trainer.step, rank, trainer.save, config["cfg"])
    if rank == 0:
        trainer.export(job.output, cfg.storage, {"run": job.name, "prompts": job.prompts, "workers": world,
                                                 "final": {k: v for k, v in metrics.items() if k.startswith("reward_")}})


def run_align(cfg: Config) -> dict:
    """Train (or resume) and write <output>/lora, <output>/lora_ema, <output>/meta.json; returns a summary."""
    job = cfg.align
    check_setup(cfg)
    table, stats = read_prompt_table(cfg)
    ensure_writable(job.output, cfg.storage)
    run_config, where = checkpointed_run(job, cfg)
    print(f"[align] {table.num_rows} prompts ({stats['rows']} rows read, {stats['duplicates']} duplicates, "
          f"{stats['invalid'] + stats['refused']} unusable); {job.workers} worker(s) x batch {job.batch_size}; "
          f"{job.steps} steps; rewards {job.reward_weights}; checkpoints -> {where}", flush=True)
    init_ray(cfg)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg.model_dump(mode="json")}, scaling_config=scaling(job),
        datasets={"prompts": ray.data.from_arrow(table)},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker sees every prompt and keeps its share by id
        run_config=run_config)
    summary = {"output": job.output, "lora": join(job.output, "lora"), "lora_ema": join(job.output, "lora_ema"),
               **fit(trainer)}
    metrics = summary["metrics"]
    rewards = ", ".join(f"{k[7:]} {v:.4g}" for k, v in metrics.items() if k.startswith("reward_"))
    print(f"[align] done: step {metrics.get('step', job.steps)}; {rewards or 'no new steps'}\n"
          f"  use it: --set model.video.lora={summary['lora_ema']}", flush=True)
    return summary


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipelines.align", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
examples:
  python -m pipelines.align tiny-scorer out/tiny-clip
  python -m pipelines.align train --config deploy/align.yaml --set align.steps=40
  ray job submit --working-dir . -- python -m pipelines.align train --config deploy/align.cluster.yaml
  python -m vist3a generate "a stone bridge" --out out/bridge --config deploy/align.yaml --set model.video.lora=out/align/lora_ema
Rerun train with the same align.name (and storage) to resume it.""")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="reward fine-tuning on Ray Train")
    t.add_argument("--config", default="deploy/align.yaml", help="YAML config (default: %(default)s)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key (repeatable), e.g. --set align.workers=4")
    s = sub.add_parser("tiny-scorer", help="write a small random CLIP scorer (transformers format) to DIR")
    s.add_argument("directory")
    s.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "tiny-scorer":
            print(f"[align] tiny CLIP scorer written to {write_tiny_clip(args.directory, seed=args.seed)}")
            return 0
        run_align(load_config(args.config, args.overrides))
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"align {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
