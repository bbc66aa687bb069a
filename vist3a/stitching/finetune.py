"""Stitched fine-tuning: make the stitched network predict what the original predicts from RGB.

Student: video latents -> stitching layer -> the reconstruction network after the cut, with LoRA
adapters on every Linear/Conv2d there (`vist3a.lora`); the stitching layer is trained too.
Teacher: the same network with its adapters switched off (its frozen base weights are exactly the
original network), run on the frames the latents were encoded from. Losses (`distillation_losses`):
L1 to the teacher's depth (+ multi-scale depth gradients and confidence), points, pose encodings
(every refinement iteration), and pixel-aligned Gaussians (centres, scales, rotations, SH,
opacities), as in the published code; plus a rendering loss that the published code lacks: the
student's Gaussians rendered at the teacher's cameras against the input frames. AdamW, linear
warm-up then cosine decay, gradient clipping.

Everything here is one process and one device; `pipelines.stitch finetune` runs it under Ray Train
(DDP across workers, checkpoints, restarts).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vist3a.config import StitchJobConfig
from vist3a.io.frames import resize_frames
from vist3a.lora import adapters_disabled, add_lora, load_lora_state, lora_config_dict, lora_state
from vist3a.recon import to_gaussians
from vist3a.splats.gaussians import Cameras, Gaussians
from vist3a.splats.render import render
from vist3a.splats.stride import nth_pixel_gaussians, strided_cameras
from vist3a.stitching.checkpoint import check_compatible, stitch_checkpoint
from vist3a.stitching.decoder import StitchedDecoder


class StitchedStudent(nn.Module):
    """The trainable stitched network as one module (so DDP can wrap its forward):
    normalised latents + RGB frames at the network's size -> ReconOutput."""

    def __init__(self, decoder: StitchedDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: Tensor, images: Tensor | None):
        return self.decoder.recon.forward_from(self.decoder.cut, self.decoder.tokens(latents), images)


# ----------------------------------------------------------------------------- losses


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b.detach()).abs().mean()


def depth_gradient_l1(student: Tensor, teacher: Tensor, scales: int = 3) -> Tensor:
    """L1 between finite-difference depth gradients [.., H, W], averaged over `scales` halvings."""
    s, t = student.flatten(0, -3)[:, None], teacher.flatten(0, -3)[:, None].detach()
    total = student.new_zeros(())
    used = 0
    for k in range(scales):
        if k:
            if min(s.shape[-2:]) < 4:
                break
            s, t = F.avg_pool2d(s, 2), F.avg_pool2d(t, 2)
        for dim in (-1, -2):
            total = total + _l1(torch.diff(s, dim=dim), torch.diff(t, dim=dim))
        used += 1
    return total / max(used, 1)


def render_l1(gaussians: Gaussians, viewmats: Tensor, intrinsics: Tensor, targets: Tensor, stride: int = 1) -> Tensor:
    """L1 between renders at cameras (viewmats [V,4,4], pixel intrinsics [V,3,3] at the targets' size) and
    targets [V,3,H,W]. stride n renders at 1/n resolution against n x n averaged targets (give it the
    Gaussians of every n-th pixel, `vist3a.splats.stride`): n^3 less work, for CPU runs."""
    cams = Cameras(viewmats=viewmats, Ks=intrinsics, width=targets.shape[-1], height=targets.shape[-2])
    if stride > 1:
        targets = F.avg_pool2d(targets, stride)
    cams = strided_cameras(cams, stride, width=targets.shape[-1], height=targets.shape[-2])
    return (render(gaussians, cams).colors.permute(0, 3, 1, 2) - targets).abs().mean()


def render_loss(scenes: list[Gaussians], teacher, images: Tensor, views: int, stride: int,
                seeds: Sequence[int]) -> Tensor:
    """The student's pixel-aligned Gaussians (one entry per clip) rendered at `views` teacher cameras,
    drawn with one seed per clip, against those input frames [B,S,3,H,W]."""
    b, s, _, h, w = images.shape
    losses = []
    for i, scene in enumerate(scenes):
        pick = torch.randperm(s, generator=torch.Generator().manual_seed(int(seeds[i])))[:views].tolist()
        losses.append(render_l1(nth_pixel_gaussians(scene, s, h, w, stride), teacher.extrinsics[i, pick].detach(),
                                teacher.intrinsics[i, pick].detach(), images[i, pick], stride))
    return torch.stack(losses).mean()


def distillation_losses(student, teacher, images: Tensor, weights: Mapping[str, float], render_views: int = 1,
                        render_stride: int = 1, render_seeds: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Every weighted term that both outputs support: {term: unweighted loss}. Every term is a mean
    over equally sized clips, so a batch split across DDP workers gives the gradient of the whole batch."""
    on = lambda name: weights.get(name, 0.0) > 0  # noqa: E731
    out: dict[str, Tensor] = {}
    if student.depth is not None:
        if on("depth"):
            out["depth"] = _l1(student.depth, teacher.depth)
        if on("depth_grad"):
            out["depth_grad"] = depth_gradient_l1(student.depth, teacher.depth)
        if on("depth_conf"):
            out["depth_conf"] = _l1(student.depth_conf, teacher.depth_conf)
    if student.points is not None and on("points"):
        out["points"] = _l1(student.points, teacher.points)
    if student.pose_enc_list and on("pose"):
        out["pose"] = torch.stack([_l1(a, b) for a, b in zip(student.pose_enc_list, teacher.pose_enc_list)]).mean()
    gaussian_terms = [t for t in ("means", "scales", "rotations", "sh", "opacities") if on(t)]
    rendering = on("render") and render_views > 0
    if student.gaussian_params is None or not (gaussian_terms or rendering):
        return out
    scenes = to_gaussians(student)
    if gaussian_terms:
        gs, gt = Gaussians.cat(scenes), Gaussians.cat(to_gaussians(teacher))
        pairs = {"means": (gs.means, gt.means), "scales": (gs.scales, gt.scales),
                 "rotations": (F.normalize(gs.quats, dim=-1), F.normalize(gt.quats, dim=-1)),
                 "sh": (gs.sh, gt.sh), "opacities": (gs.opacities, gt.opacities)}
        for t in gaussian_terms:
            out[t] = _l1(*pairs[t])
    if rendering:
        out["render"] = render_loss(scenes, teacher, images, render_views, render_stride,
                                    range(len(scenes)) if render_seeds is None else render_seeds)
    return out


# ----------------------------------------------------------------------------- schedule


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps to the base lr, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class StitchFinetuner:
    """Owns the student (stitching layer + LoRA), the optimiser, the schedule and the step counter.

    `train_step(frames)` is one optimisation step on a batch of clips; `state_dict()` is everything
    a restart needs; `export()` is the stitch checkpoint the generator loads."""

    decoder: StitchedDecoder
    vae: nn.Module
    job: StitchJobConfig
    vae_size: int
    device: torch.device = torch.device("cpu")
    step: int = 0
    lora_config: dict = field(default_factory=dict)
    last_seconds: dict = field(default_factory=dict)

    def __post_init__(self):
        job = self.job
        recon = self.decoder.recon
        recon.eval()  # no dropout anywhere; eval also keeps teacher and student deterministic
        self.decoder.requires_grad_(False)
        self.lora_config = lora_config_dict(recon, self.decoder.cut, job.lora_rank, job.lora_alpha, job.lora_conv)
        add_lora(recon, self.lora_config, seed=job.seed)  # the same adapter init on every worker
        recon.to(self.device)
        self.decoder.stitch.requires_grad_(True)
        self.student = StitchedStudent(self.decoder)
        self.params = [p for p in self.decoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=job.lr, weight_decay=job.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, job.warmup_steps, job.steps)

    @property
    def image_size(self) -> int:
        return self.decoder.recon.cfg.img_size

    def init_stitch(self, payload: dict, source: str = "init") -> None:
        """Start from a searched (ridge) stitching layer, or from another run's stitch checkpoint."""
        check_compatible(payload, self.decoder.stitch, self.decoder.cut, source)
        self.decoder.stitch.load_state_dict({k: v.to(self.device) for k, v in payload["stitch"].items()})
        if payload.get("lora"):
            load_lora_state(self.decoder.recon, payload["lora"])

    def train_step(self, frames: Tensor, model: nn.Module | None = None, rank: int = 0) -> dict[str, float]:
        """frames [B,T,3,H,W] in [0,1]; `model` is the (DDP-wrapped) student, default the bare one; `rank` places
        the clips in the global batch (worker r holds clips r*B .. r*B+B-1)."""
        from vist3a.video import encode_frames

        model = model or self.student
        job = self.job
        t0 = time.perf_counter()
        frames = frames.to(self.device, torch.float32)
        images = resize_frames(frames, self.image_size)
        with torch.no_grad():
            latents = encode_frames(self.vae, resize_frames(frames, self.vae_size))
            with adapters_disabled(self.decoder.recon):
                teacher = self.decoder.recon(images)
        t1 = time.perf_counter()
        student = model(latents, images)
        # render views drawn per clip from (seed, step, the clip's index in the global batch): the same
        # whether the batch is split over workers or not
        first = rank * frames.shape[0]
        seeds = [int(np.random.default_rng([job.seed, self.step, first + i]).integers(2**62)) for i in range(frames.shape[0])]
        terms = distillation_losses(student, teacher, images, job.loss_weights, job.render_views, job.render_stride, seeds)
        total = sum(job.loss_weights[k] * v for k, v in terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, job.grad_clip if job.grad_clip else float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.last_seconds = {"teacher_s": t1 - t0, "student_s": time.perf_counter() - t1}
        metrics = {"step": self.step, "loss": float(total.detach()), "lr": lr, "grad_norm": float(grad_norm)}
        metrics.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
        metrics.update(self.last_seconds)
        return metrics

    # -- state

    def state_dict(self) -> dict:
        return {"step": self.step, "stitch": {k: v.detach().cpu() for k, v in self.decoder.stitch.state_dict().items()},
                "lora": lora_state(self.decoder.recon), "lora_config": self.lora_config,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.decoder.stitch.load_state_dict({k: v.to(self.device) for k, v in state["stitch"].items()})
        load_lora_state(self.decoder.recon, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, meta: dict | None = None) -> dict:
        """The stitch checkpoint (stitching layer + LoRA) that `load_stitch_checkpoint` reads."""
        return stitch_checkpoint(self.decoder.stitch, self.decoder.cut, self.lora_config,
                                 lora_state(self.decoder.recon), {"step": self.step, **(meta or {})})
