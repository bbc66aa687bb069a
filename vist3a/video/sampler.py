"""Our own Wan sampling loop: per-item seeded noise, batched classifier-free guidance, and
gradients through chosen denoising steps only (for reward fine-tuning of the transformer)."""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from vist3a.video.components import WanComponents, decode_latents
from vist3a.video.text import encode_prompts

SchedulerKind = Literal["unipc", "euler"]


def latent_shape(components: WanComponents, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T', h, w) of the normalised latent for a `frames` x `height` x `width` video."""
    vae_cfg = components.vae.config
    t_scale, s_scale = vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial
    patch = components.transformer.config.patch_size
    if (frames - 1) % t_scale:
        raise ValueError(f"frames must be {t_scale}k+1, got {frames}")
    for name, size, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if size % (s_scale * p):
            raise ValueError(f"{name} must be a multiple of {s_scale * p}, got {size}")
    return (components.transformer.config.in_channels, (frames - 1) // t_scale + 1, height // s_scale, width // s_scale)


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One CPU generator per item: an item's noise depends on its seed only, not on the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def make_scheduler(template: SchedulerMixin, kind: SchedulerKind, shift: float) -> SchedulerMixin:
    """A fresh flow-matching scheduler (they keep per-run state), `shift` applied."""
    if kind == "unipc":
        base = template.config if isinstance(template, UniPCMultistepScheduler) else {}
        return UniPCMultistepScheduler.from_config(base, prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=shift)
    if kind == "euler":
        n = template.config.get("num_train_timesteps", 1000)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=shift)
    raise ValueError(f"unknown scheduler {kind!r}; choose unipc or euler")


def _grad_step_set(grad_steps: Iterable[int] | None, steps: int) -> set[int]:
    out = set()
    for i in grad_steps or ():
        if not -steps <= i < steps:
            raise ValueError(f"grad step {i} is outside 0..{steps - 1} (or -{steps}..-1)")
        out.add(i % steps)
    return out


class VideoSampler:
    """Samples normalised Wan latents [B,16,T',H/8,W/8] from prompts.

    `gradient_checkpointing` switches it on in the (shared) transformer; it only acts where
    grad is enabled, i.e. at the grad steps."""

    def __init__(self, components: WanComponents, scheduler: SchedulerKind = "unipc",
                 gradient_checkpointing: bool = False):
        self.components = components
        self.scheduler_kind = scheduler
        if gradient_checkpointing:
            components.transformer.enable_gradient_checkpointing()

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float, shift: float,
               frames: int, height: int, width: int, negative_prompt: str | list[str] = "",
               grad_steps: Iterable[int] | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """-> float32 normalised latents; `latents` replaces the seeded initial noise.

        Without `grad_steps` everything runs under no_grad. With them, the transformer runs with
        grad only at those step indices, on a detached copy of its input latents; the scheduler
        updates always keep grad, so each chosen step's gradient reaches the output through the
        solver's latent path (and not back through earlier transformer calls)."""
        c = self.components
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        shape = latent_shape(c, frames, height, width)
        grad_set = _grad_step_set(grad_steps, steps)
        device, tdtype = c.transformer.device, c.transformer.dtype

        if latents is None:
            latents = initial_noise(shape, seeds)
        elif tuple(latents.shape) != (len(prompts), *shape):
            raise ValueError(f"latents shape {tuple(latents.shape)} != expected {(len(prompts), *shape)}")
        x = latents.to(device=device, dtype=torch.float32)

        use_cfg = guidance > 1.0
        context, _ = encode_prompts(c, prompts)
        if use_cfg:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(negs)} negative prompts")
            if len(set(negs)) == 1:
                neg = encode_prompts(c, negs[:1])[0].expand(len(prompts), -1, -1)
            else:
                neg = encode_prompts(c, negs)[0]
            context = torch.cat([context, neg])

        scheduler = make_scheduler(c.scheduler, self.scheduler_kind, shift)
        scheduler.set_timesteps(steps, device=device)
        with torch.set_grad_enabled(bool(grad_set)):
            for i, t in enumerate(scheduler.timesteps):
                with torch.set_grad_enabled(i in grad_set):
                    inp = x.detach().to(tdtype)
                    if use_cfg:
                        inp = torch.cat([inp, inp])
                    pred = c.transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]),
                                         encoder_hidden_states=context, return_dict=False)[0].float()
                    if use_cfg:
                        cond, uncond = pred.chunk(2)
                        pred = uncond + guidance * (cond - uncond)
                x = scheduler.step(pred, t, x, return_dict=False)[0]
        return x

    def decode(self, latents: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """Normalised latents -> frames [B,T,3,H,W] in [0,1] (see `decode_latents`)."""
        return decode_latents(self.components.vae, latents, checkpointed=checkpointed)
