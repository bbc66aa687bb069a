"""The Wan video model as one object, read like diffusers' `WanPipeline.__call__`: `WanVideo` owns the
components and offers check_prompt / sample / decode. Our own sampling loop: per-item seeded noise,
batched classifier-free guidance, and gradients through chosen denoising steps only (for reward
fine-tuning of the transformer)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from vist3a.video.components import WanComponents, decode_latents, module_on, pin_module
from vist3a.video.levers import step_cache_on
from vist3a.video.text import check_prompt, clean_prompt

SchedulerKind = Literal["unipc", "euler"]
TextEncoderPlacement = Literal["device", "offload", "cpu"]


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


@torch.no_grad()
def encode_prompts(components: WanComponents, prompts: list[str], max_length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (embeds [B,L,D] in the transformer's dtype, mask [B,L] bool), L = max_length.

    Wan conditions its transformer on UMT5 hidden states padded to a fixed length with zeros after
    each prompt's last token (its cross-attention takes no mask, so the fixed length also keeps each
    item independent of the rest of the batch). Empty prompts are allowed here (the usual negative
    prompt); over-long ones raise, since silently truncating would generate something other than
    what was asked."""
    max_length = max_length or components.max_length
    texts = [clean_prompt(p) for p in prompts]
    tok = components.tokenizer(texts, padding="max_length", max_length=max_length, truncation=False,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if ids.shape[1] > max_length:
        lengths = mask.sum(1).tolist()
        bad = [(i, n) for i, n in enumerate(lengths) if n > max_length]
        raise ValueError(f"prompts over the limit of {max_length} tokens (index, tokens): {bad}")
    te = components.text_encoder
    ids, mask = ids.to(te.device), mask.to(te.device)
    hidden = te(input_ids=ids, attention_mask=mask).last_hidden_state
    mask = mask.bool()
    hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    device = components.transformer.device  # the encoder may run elsewhere (runtime.text_encoder: cpu)
    return hidden.to(device=device, dtype=components.transformer.dtype), mask.to(device)


class WanVideo:
    """The Wan components (tokenizer, text encoder, transformer, VAE, scheduler template) and what
    generation and alignment do with them: refuse a prompt, sample normalised latents
    [B,16,T',H/8,W/8], decode them to frames. `vist3a.models.build_video` builds one from a Config.

    `gradient_checkpointing` switches it on in the transformer; it only acts where grad is enabled,
    i.e. at the grad steps. `cfg_batch` runs classifier-free guidance's two passes in one transformer
    batch (False: two calls a step). `text_encoder` is where the text encoder lives (runtime.text_encoder):
    `device` (the transformer's), `offload` (pinned CPU memory, on the device only while encoding) or `cpu`
    (encodes there; the embeddings are moved to the transformer)."""

    def __init__(self, components: WanComponents, scheduler: SchedulerKind = "unipc",
                 gradient_checkpointing: bool = False, *, cfg_batch: bool = True,
                 text_encoder: TextEncoderPlacement = "device"):
        self.components = components
        self.scheduler_kind = scheduler
        self.cfg_batch = cfg_batch
        self.text_encoder_placement: TextEncoderPlacement = "device"
        self.place_text_encoder(text_encoder)
        if gradient_checkpointing:
            components.transformer.enable_gradient_checkpointing()

    def place_text_encoder(self, placement: TextEncoderPlacement) -> None:
        """Move the text encoder to where `placement` keeps it (see the class)."""
        if placement not in ("device", "offload", "cpu"):
            raise ValueError(f"runtime.text_encoder {placement!r}: choose device, offload or cpu")
        te = self.components.text_encoder
        if te is not None:
            te.to(self.transformer.device if placement == "device" else "cpu")
            if placement == "offload":
                pin_module(te)
        self.text_encoder_placement = placement

    def _text_encoder_ready(self):
        """The text encoder where it encodes: the device for `offload` (copied there for the block)."""
        if self.text_encoder_placement == "offload":
            return module_on(self.components.text_encoder, self.transformer.device)
        return nullcontext(self.components.text_encoder)

    @property
    def vae(self):
        return self.components.vae

    @property
    def transformer(self):
        return self.components.transformer

    def check_prompt(self, prompt: object, template: str = "{prompt}") -> str | None:
        """Why `prompt` cannot be generated (None when it can): the token limit, before any GPU time."""
        return check_prompt(self.components.tokenizer, prompt, self.components.max_length, template)

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None = None) -> torch.Tensor:
        """The transformer's context [B,L,D]; with negative prompts (CFG) theirs follow: [2B,L,D]."""
        c = self.components
        with self._text_encoder_ready():
            context, _ = encode_prompts(c, prompts)
            if negative_prompts is None:
                return context
            if len(set(negative_prompts)) == 1:  # the usual case: one negative prompt, encoded once
                neg = encode_prompts(c, negative_prompts[:1])[0].expand(len(prompts), -1, -1)
            else:
                neg = encode_prompts(c, negative_prompts)[0]
        return torch.cat([context, neg])

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float, shift: float,
               frames: int, height: int, width: int, negative_prompt: str | list[str] = "",
               grad_steps: Iterable[int] | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """-> float32 normalised latents; `latents` replaces the seeded initial noise.

        Without `grad_steps` everything runs under no_grad. With them, the transformer runs with
        grad only at those step indices, on a detached copy of its input latents; the scheduler
        updates always keep grad, so each chosen step's gradient reaches the output through the
        solver's latent path (and not back through earlier transformer calls)."""
        c = self.components
        device, tdtype = c.transformer.device, c.transformer.dtype

        # 1. check inputs
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        shape = latent_shape(c, frames, height, width)
        grad_set = _grad_step_set(grad_steps, steps)
        if latents is not None and tuple(latents.shape) != (len(prompts), *shape):
            raise ValueError(f"latents shape {tuple(latents.shape)} != expected {(len(prompts), *shape)}")
        use_cfg = guidance > 1.0
        negs = None
        if use_cfg:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(negs)} negative prompts")

        # 2. encode prompt
        context = self.encode_prompt(prompts, negs)

        # 3. timesteps
        scheduler = make_scheduler(c.scheduler, self.scheduler_kind, shift)
        scheduler.set_timesteps(steps, device=device)

        # 4. latents
        x = (initial_noise(shape, seeds) if latents is None else latents).to(device=device, dtype=torch.float32)

        # 5. denoising loop
        cached = step_cache_on(c.transformer)
        if cached:  # First Block Cache (runtime.step_cache): its state is per sampling run
            c.transformer._reset_stateful_cache()

        def predict(inp: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, name: str) -> torch.Tensor:
            with c.transformer.cache_context(name) if cached else nullcontext():
                return c.transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]),
                                     encoder_hidden_states=ctx, return_dict=False)[0].float()

        n = len(prompts)
        try:
            with torch.set_grad_enabled(bool(grad_set)):
                for i, t in enumerate(scheduler.timesteps):
                    with torch.set_grad_enabled(i in grad_set):
                        inp = x.detach().to(tdtype)
                        if not use_cfg:
                            pred = predict(inp, t, context, "cond")
                        elif self.cfg_batch:  # prompt and negative prompt in one transformer batch
                            cond, uncond = predict(torch.cat([inp, inp]), t, context, "cfg").chunk(2)
                            pred = uncond + guidance * (cond - uncond)
                        else:
                            cond = predict(inp, t, context[:n], "cond")
                            uncond = predict(inp, t, context[n:], "uncond")
                            pred = uncond + guidance * (cond - uncond)
                    x = scheduler.step(pred, t, x, return_dict=False)[0]
        finally:
            if cached:
                c.transformer._reset_stateful_cache()
        return x

    def decode(self, latents: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """Normalised latents -> frames [B,T,3,H,W] in [0,1] (see `decode_latents`)."""
        return decode_latents(self.components.vae, latents, checkpointed=checkpointed)
