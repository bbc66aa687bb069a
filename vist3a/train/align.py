"""Direct reward fine-tuning of the video generator: a LoRA on the Wan transformer, trained so that
its latents decode, through the frozen stitched decoder, to 3D scenes that score well.

One step (`AlignTrainer.train_step`):
  prompts -> our sampler, with gradients kept only at K denoising steps (the transformer's input
  detached there) -> normalised latents -> differentiable, checkpointed VAE decode (the frames the
  Gaussian head sees, and the consistency target) -> stitched decoder -> Gaussians + cameras + depth
  -> `views` views rendered at the predicted cameras -> rewards (vist3a.rewards) -> loss = -sum w*r,
  plus optionally the plain flow-matching loss on captioned clips -> AdamW on the LoRA only
  (gradients averaged across data-parallel ranks first; non-finite steps skipped) -> EMA of the LoRA.

All randomness of a step (denoising steps, CFG scale, grad steps, noise seeds, templates, views,
flow-matching noise) is drawn from (seed, step, rank), so a run restarted from a checkpoint takes
exactly the steps the lost one would have. Checkpoint directories hold lora/, lora_ema/ (adapter
directories, `vist3a.lora`, that the generator loads with model.video.lora), optimizer.pt and meta.json.

Pure PyTorch: `pipelines.align` runs it under Ray Train.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vist3a.config import AlignJobConfig, Config
from vist3a.io import join, write_text
from vist3a.lora import (add_video_lora, load_lora_state, lora_state, read_lora_dir, same_lora_config, save_lora_dir,
                         video_lora_config)
from vist3a.splats.gaussians import Cameras, Gaussians
from vist3a.splats.render import render
from vist3a.splats.stride import nth_pixel_gaussians, strided_cameras

if TYPE_CHECKING:  # vist3a.video imports diffusers
    from vist3a.video import WanVideo


# ----------------------------------------------------------------------------- one rollout's randomness


@dataclass
class Rollout:
    """What a step draws from (seed, step, rank): everything random about it."""

    steps: int
    guidance: float
    grad_steps: list[int]
    seeds: list[int]
    texts: list[str]        # prompts wrapped in the drawn templates (what the generator sees)
    views: list[list[int]]  # rendered views per scene
    noise_seed: int         # flow-matching noise


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank])


def plan_rollout(job: AlignJobConfig, step: int, rank: int, prompts: list[str], num_views: int) -> Rollout:
    rng = step_rng(job.seed, step, rank)
    steps = int(rng.integers(job.steps_min, job.steps_max + 1))
    guidance = float(rng.uniform(job.guidance_min, job.guidance_max))
    k = job.grad_steps
    if job.grad_step_choice == "last":
        grad = list(range(steps - k, steps))
    else:
        grad = sorted(int(i) for i in rng.choice(steps - 1, size=k - 1, replace=False)) + [steps - 1]
    seeds = [int(s) for s in rng.integers(0, 2**31, size=len(prompts))]
    texts = [job.prompt_templates[int(rng.integers(len(job.prompt_templates)))].format(prompt=p) for p in prompts]
    v = min(job.views, num_views)
    views = [sorted(int(i) for i in rng.choice(num_views, size=v, replace=False)) for _ in prompts]
    return Rollout(steps, guidance, grad, seeds, texts, views, int(rng.integers(2**62)))


# ----------------------------------------------------------------------------- rendering at the predicted cameras


def render_views(gaussians: Gaussians, cameras: Cameras, views: list[int], frames: int, stride: int = 1):
    """Render the pixel-aligned Gaussians of one scene (S*H*W of them, pixel order) at its predicted
    cameras `views` -> (colors [V,3,h,w], alphas [V,h,w], depths [V,h,w]), h = H/stride.

    stride n keeps the Gaussians of every n-th pixel and renders at 1/n resolution (n^3 less work on CPU)."""
    size = cameras.height
    if gaussians.num != frames * size * cameras.width:
        raise ValueError(f"{gaussians.num} Gaussians are not pixel-aligned to {frames} views of {size}x{cameras.width}")
    g = nth_pixel_gaussians(gaussians, frames, size, cameras.width, stride)
    out = render(g, strided_cameras(cameras.select(views), stride), render_depth=True)
    return out.colors.permute(0, 3, 1, 2), out.alphas[..., 0], out.depths[..., 0]


def _pool(x: Tensor, stride: int) -> Tensor:
    """Average n x n pixel blocks of [..., H, W] (the targets of a 1/n render)."""
    if stride == 1:
        return x
    pooled = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), stride, ceil_mode=True)
    return pooled.reshape(*x.shape[:-2], *pooled.shape[-2:])


# ----------------------------------------------------------------------------- the trainer


class AlignTrainer:
    """Owns the LoRA on the transformer, its optimiser, its EMA and the step counter.

    `video` is a WanVideo, `decoder` a StitchedDecoder (frozen), `scorer` a ClipScorer (needed when
    the quality weight is > 0). `train_step(prompts)` is one optimisation step; `save(dir)`/`load(dir)`
    the checkpoint; `export(uri)` writes the lora/ and lora_ema/ directories the generator loads."""

    def __init__(self, cfg: Config, video: WanVideo, decoder: nn.Module, scorer: nn.Module | None = None,
                 device: torch.device | str = "cpu"):
        job = cfg.align
        self.cfg, self.job, self.video, self.decoder, self.scorer = cfg, job, video, decoder, scorer
        self.device = torch.device(device)
        self.weights = dict(job.reward_weights)
        if self.weights["quality"] > 0 and scorer is None:
            raise ValueError("reward_weights.quality > 0 needs a scorer (align.scorer)")
        comps = video.components
        comps.text_encoder.requires_grad_(False)
        comps.vae.requires_grad_(False)
        decoder.eval().requires_grad_(False)
        if scorer is not None:
            scorer.eval().requires_grad_(False)
        self.transformer = comps.transformer
        self.lora_config = video_lora_config(job)
        add_video_lora(self.transformer, self.lora_config, job.seed)
        self.transformer.to(self.device).eval()  # Wan has no dropout; eval keeps every rank deterministic
        if job.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.params = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=job.lr, betas=tuple(job.betas),
                                           weight_decay=job.weight_decay)
        self.ema = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.step = 0

    # -- the step

    def rollout(self, prompts: list[str], plan: Rollout) -> Tensor:
        """Normalised latents [B,16,T',h,w], with gradients through the plan's grad steps."""
        s = self.cfg.sampling
        return self.video.sample(plan.texts, plan.seeds, steps=plan.steps, guidance=plan.guidance, shift=self.job.shift,
                                   frames=s.frames, height=s.height, width=s.width, negative_prompt=s.negative_prompt,
                                   grad_steps=plan.grad_steps)

    def rewards(self, latents: Tensor, prompts: list[str], views: list[list[int]]) -> dict[str, Tensor]:
        """Every reward term the weights switch on (plus its parts), [B] each, differentiable in `latents`."""
        job, w = self.job, self.weights
        frames = self.video.decode(latents, checkpointed=True)
        scenes = self.decoder(latents, frames=frames)
        stride, b = job.render_stride, latents.shape[0]
        num_frames = scenes.depth.shape[1]
        colors, alphas, depths = [], [], []
        for i in range(b):
            c, a, d = render_views(scenes.gaussians[i], scenes.cameras[i], views[i], num_frames, stride)
            colors.append(c), alphas.append(a), depths.append(d)
        renders, alpha, depth = torch.stack(colors), torch.stack(alphas), torch.stack(depths)
        pick = torch.tensor(views, device=renders.device)
        rows = torch.arange(b, device=renders.device)[:, None]
        out: dict[str, Tensor] = {}
        if w["quality"] > 0:
            v = renders.shape[1]
            texts = [p for p in prompts for _ in range(v)]
            out["quality"] = self.scorer(renders.flatten(0, 1), texts).view(b, v).mean(1)
            nf = min(job.quality_frames, v)
            if nf:  # decoded video frames of the first views too, as the published code scores one
                fq = self.scorer(frames[rows, pick[:, :nf]].flatten(0, 1), [p for p in prompts for _ in range(nf)])
                out["quality"] = (out["quality"] * v + fq.view(b, nf).sum(1)) / (v + nf)
        if w["consistency"] > 0:
            from vist3a.rewards import consistency_reward

            out["consistency"] = consistency_reward(renders, _pool(scenes.frames[rows, pick], stride))
        if w["representation"] > 0:
            from vist3a.rewards import representation_reward

            out.update(representation_reward(depth, alpha, _pool(scenes.depth[rows, pick], stride), scenes.gaussians,
                                             job.max_scale_ratio))
        return out

    @torch.no_grad()
    def evaluate(self, prompts: list[str], seeds: list[int], steps: int | None = None, guidance: float | None = None,
                 ema: bool = False) -> dict[str, float]:
        """Mean reward terms of fixed prompts and noise seeds (no templates, views 0..V-1): comparable across steps."""
        job = self.job
        v = min(job.views, self.cfg.sampling.frames)
        plan = Rollout(steps or job.steps_max, job.guidance_min if guidance is None else guidance, [], list(seeds),
                       list(prompts), [list(range(v))] * len(prompts), 0)
        with self.ema_weights() if ema else nullcontext():
            terms = self.rewards(self.rollout(prompts, plan), prompts, plan.views)
        return {k: float(t.mean()) for k, t in terms.items()}

    def diffusion_loss(self, frames: Tensor, captions: list[str], noise_seed: int) -> Tensor:
        """Plain flow-matching loss on clips [B,T,3,H,W] in [0,1]: sigma ~ U(0,1), z = (1-sigma) z0 + sigma eps,
        the transformer predicts eps - z0 (MSE). Keeps the video prior while the rewards pull on it."""
        from vist3a.video import encode_frames

        comps = self.video.components
        gen = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            z0 = encode_frames(comps.vae, frames.to(self.device, torch.float32))
            context = self.video.encode_prompt(captions)
        sigma = torch.rand(z0.shape[0], generator=gen).to(self.device)
        eps = torch.randn(z0.shape, generator=gen).to(self.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        z = (1 - s) * z0 + s * eps
        timesteps = sigma * comps.scheduler.config.get("num_train_timesteps", 1000)
        pred = self.transformer(hidden_states=z.to(self.transformer.dtype), timestep=timesteps,
                                encoder_hidden_states=context, return_dict=False)[0].float()
        return F.mse_loss(pred, eps - z0)

    def train_step(self, prompts: list[str], rank: int = 0, world: int = 1,
                   clips: tuple[Tensor, list[str]] | None = None) -> dict[str, float]:
        """One optimisation step on this rank's prompts (and, for the diffusion loss, (frames, captions))."""
        w = self.weights
        t0 = time.perf_counter()
        plan = plan_rollout(self.job, self.step, rank, prompts, self.cfg.sampling.frames)
        latents = self.rollout(prompts, plan)
        t1 = time.perf_counter()
        terms = self.rewards(latents, prompts, plan.views) if any(w[k] > 0 for k in ("quality", "consistency",
                                                                                       "representation")) else {}
        loss = latents.new_zeros(())
        for name in ("quality", "consistency", "representation"):
            if name in terms:
                loss = loss - w[name] * terms[name].mean()
        if w["diffusion"] > 0:
            if clips is None:
                raise ValueError("reward_weights.diffusion > 0 needs clips (align.corpus)")
            terms["diffusion"] = self.diffusion_loss(clips[0], clips[1], plan.noise_seed).reshape(1)
            loss = loss + w["diffusion"] * terms["diffusion"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        params = list(self.params.values())
        average_gradients(params, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.job.grad_clip or float("inf")))
        skipped = not math.isfinite(grad_norm)
        if skipped:  # the same decision on every rank: the gradients were averaged first
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.update_ema()
        self.step += 1
        metrics = {"step": self.step, "loss": float(loss.detach()), "grad_norm": grad_norm, "skipped": int(skipped),
                   "rollout_steps": plan.steps, "guidance": plan.guidance, "rollout_s": t1 - t0,
                   "backward_s": t2 - t1, "step_s": time.perf_counter() - t0}
        metrics.update({f"reward_{k}" if k != "diffusion" else "loss_diffusion": float(v.detach().mean())
                        for k, v in terms.items()})
        return metrics

    # -- EMA

    def ema_decay(self) -> float:
        return min((1 + self.step) / (10 + self.step), self.job.ema_decay_max)

    @torch.no_grad()
    def update_ema(self) -> None:
        d = self.ema_decay()
        for n, p in self.params.items():
            self.ema[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The LoRA holds the EMA weights inside the block (evaluation, export)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    # -- checkpoints

    def lora_states(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(current, EMA) adapter weights with peft's state-dict keys."""
        current = {k: v.clone() for k, v in lora_state(self.transformer).items()}  # on CPU .cpu() aliases the params
        with self.ema_weights():
            ema = {k: v.clone() for k, v in lora_state(self.transformer).items()}
        return current, ema

    def meta(self) -> dict:
        return {"step": self.step, "seed": self.job.seed, "ema_decay_max": self.job.ema_decay_max,
                "reward_weights": self.weights, "preset": self.cfg.preset}

    def save(self, directory: str) -> None:
        """A checkpoint directory: lora/, lora_ema/, optimizer.pt, meta.json."""
        current, ema = self.lora_states()
        meta = self.meta()
        save_lora_dir(os.path.join(directory, "lora"), self.lora_config, current, meta=meta)
        save_lora_dir(os.path.join(directory, "lora_ema"), self.lora_config, ema, meta=meta)
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    def load(self, directory: str) -> None:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        config, current, _ = read_lora_dir(os.path.join(directory, "lora"))
        if not same_lora_config(config, self.lora_config):
            raise ValueError(f"checkpoint {directory} has LoRA {config}, the job asks for {self.lora_config}")
        _, ema, _ = read_lora_dir(os.path.join(directory, "lora_ema"))
        load_lora_state(self.transformer, ema)
        with torch.no_grad():
            for n, p in self.params.items():
                self.ema[n] = p.detach().float().clone()
        load_lora_state(self.transformer, current)
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device,
                                                  weights_only=True))
        self.step = int(meta["step"])

    def export(self, uri: str, storage=None, meta: dict | None = None) -> dict:
        """The result: <uri>/lora, <uri>/lora_ema (load either with model.video.lora) and <uri>/meta.json."""
        current, ema = self.lora_states()
        meta = {**self.meta(), **(meta or {})}
        save_lora_dir(join(uri, "lora"), self.lora_config, current, storage, meta)
        save_lora_dir(join(uri, "lora_ema"), self.lora_config, ema, storage, meta)
        write_text(join(uri, "meta.json"), json.dumps(meta, indent=1, default=str), storage)
        return {"lora": join(uri, "lora"), "lora_ema": join(uri, "lora_ema")}


def average_gradients(params: list[Tensor], world: int) -> None:
    """Mean of the gradients over the data-parallel ranks, in one all-reduce (gloo on CPU, nccl on GPU).

    Done by hand rather than by a DDP wrapper: a rollout calls the transformer at several denoising
    steps with gradients (and the diffusion loss once more) before the one backward, which DDP's
    reducer, built around one forward per backward, does not support."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def average_metrics(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Rewards and losses averaged over the data-parallel ranks (Ray Train keeps rank 0's report only)."""
    import torch.distributed as dist

    keys = sorted(k for k in metrics if k.startswith(("reward_", "loss")))
    if world <= 1 or not keys or not (dist.is_available() and dist.is_initialized()):
        return metrics
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {**metrics, **{k: float(v) / world for k, v in zip(keys, values)}}


def check_replicas_in_sync(params: list[Tensor], world: int) -> None:
    """Raise when data-parallel ranks hold different LoRA weights (they must, after identical updates):
    a cheap guard, run at checkpoints, against a rank that skipped or doubled a step."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    local = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    values = [float(g) for g in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, max(abs(v) for v in values)):
        raise RuntimeError(f"LoRA replicas out of sync across ranks: parameter sums {values}")


def draw_prompts(prompts: list[str], job: AlignJobConfig, step: int, rank: int) -> list[str]:
    """The `batch_size` prompts rank `rank` trains on at `step`, drawn from its share by (seed, step, rank)."""
    rng = np.random.default_rng([job.seed, step, rank, 0])
    picks = rng.choice(len(prompts), size=job.batch_size, replace=len(prompts) < job.batch_size)
    return [prompts[int(i)] for i in picks]


def prompt_share(ids: list[str], rank: int, world: int) -> list[int]:
    """Indices of the prompts rank `rank` of `world` trains on: every world-th id in sorted order, so the
    split does not depend on the order Ray Data delivers rows in (a resumed run sees the same prompts)."""
    order = sorted(range(len(ids)), key=lambda i: str(ids[i]))
    return sorted(order[rank::world])
