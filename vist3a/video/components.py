"""The Wan 2.1 text-to-video parts (diffusers/transformers classes), built from seeded random
weights or loaded from a diffusers-format directory, and the VAE's encode/decode of frames
(the latent convention is `vist3a.video.latents`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from vist3a.config import VideoModelConfig
from vist3a.ids import seeded
from vist3a.video.latents import denormalize_latents, normalize_latents
from vist3a.video.text import load_tokenizer, video_weights_root

SUBFOLDERS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
#: Wan 2.1's released scheduler: UniPC on flow sigmas; the sampler overrides flow_shift per call.
DEFAULT_FLOW_SHIFT = 3.0


@dataclass
class WanComponents:
    tokenizer: PreTrainedTokenizerBase
    text_encoder: UMT5EncoderModel
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    scheduler: SchedulerMixin  # a template holding the config; samplers build a fresh copy per call
    max_length: int = 128  # prompt token limit (tokens incl. the end-of-sequence token)

    @property
    def device(self) -> torch.device:
        return self.transformer.device


def _random_text_encoder(cfg: VideoModelConfig) -> UMT5EncoderModel:
    te = cfg.text_encoder
    conf = UMT5Config(
        vocab_size=te.vocab_size, d_model=te.d_model, d_kv=te.d_kv, d_ff=te.d_ff, num_layers=te.num_layers,
        num_heads=te.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(conf)


@contextmanager
def _drawn_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are created on `device` with floating tensors in `dtype`; the device's RNG
    (which `seeded`'s torch.manual_seed also seeds) is given back as it was."""
    old = torch.get_default_dtype()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _random_components(cfg: VideoModelConfig, init_device: torch.device | None = None,
                       init_dtype: torch.dtype = torch.float32) -> WanComponents:
    tokenizer = load_tokenizer(cfg)
    if len(tokenizer) > cfg.text_encoder.vocab_size:
        raise ValueError(f"model.video.text_encoder.vocab_size {cfg.text_encoder.vocab_size} is below the "
                         f"ByT5 tokenizer's {len(tokenizer)} ids")
    # One seed per part, so that resizing one part leaves the others' weights unchanged.
    with _drawn_on(init_device, init_dtype) if init_device is not None else nullcontext():
        with seeded(cfg.seed):
            text_encoder = _random_text_encoder(cfg)
        with seeded(cfg.seed + 1):
            transformer = WanTransformer3DModel(**cfg.transformer.model_dump())
        with seeded(cfg.seed + 2):
            v = cfg.vae
            vae = AutoencoderKLWan(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult),
                                   num_res_blocks=v.num_res_blocks, temperal_downsample=list(v.temperal_downsample))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=DEFAULT_FLOW_SHIFT)
    return WanComponents(tokenizer, text_encoder, transformer, vae, scheduler, cfg.text_encoder.max_length)


def _pretrained_components(cfg: VideoModelConfig, dtype: torch.dtype, vae_dtype: torch.dtype) -> WanComponents:
    root = video_weights_root(cfg)
    for sub in SUBFOLDERS:
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"video weights at {root}: missing subfolder {sub!r} (looked for {root / sub})")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=vae_dtype)
    scheduler_config = UniPCMultistepScheduler.load_config(root / "scheduler")
    cls_name = scheduler_config.get("_class_name", "UniPCMultistepScheduler")
    scheduler = getattr(diffusers, cls_name).from_config(scheduler_config)
    return WanComponents(tokenizer, text_encoder, transformer, vae, scheduler, cfg.text_encoder.max_length)


def build_wan(cfg: VideoModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype | None = torch.float32, *, text_encoder_device: str | torch.device | None = None,
              init_device: str | torch.device | None = None) -> WanComponents:
    """Text encoder + transformer + VAE + scheduler, in eval mode on `device`.

    Random weights are drawn in float32 on the CPU and then moved, so they are the same on every
    device and across calls. `init_device` (random weights only) draws them there instead, directly in
    `dtype`: fast at the real size (benchmarks), not the same numbers as the CPU draw. The VAE stays
    float32 by default (as Wan's own examples run it); `vae_dtype=None` uses `dtype`. The text encoder
    goes to `text_encoder_device` (default `device`; `cpu` for runtime.text_encoder offload/cpu). Text encoder and
    VAE are frozen; the transformer's requires_grad flags are left to the trainer. `cfg.lora` is not
    applied here.
    """
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    if cfg.source == "random":
        comps = _random_components(cfg, None if init_device is None else torch.device(init_device), dtype)
        _cast_like_from_pretrained(comps.text_encoder, dtype)
        _cast_like_from_pretrained(comps.transformer, dtype)
        _cast_like_from_pretrained(comps.vae, vae_dtype)
    else:
        comps = _pretrained_components(cfg, dtype, vae_dtype)
    comps.text_encoder.to(device if text_encoder_device is None else text_encoder_device).eval().requires_grad_(False)
    comps.transformer.to(device).eval()
    comps.vae.to(device).eval().requires_grad_(False)
    return comps


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating tensors to `dtype` except those of the model's `_keep_in_fp32_modules`
    (Wan keeps its time embedding, RoPE and norms in float32), as `from_pretrained` does."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)


def save_wan(components: WanComponents, directory: str | Path) -> Path:
    """Write the diffusers layout (model_index.json + one subfolder per part): loadable by
    `build_wan(source=pretrained)` and by `diffusers.WanPipeline.from_pretrained`."""
    directory = Path(directory)
    pipe = WanPipeline(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
                       scheduler=components.scheduler, transformer=components.transformer)
    pipe.save_pretrained(directory)
    return directory


@contextmanager
def module_on(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """A frozen module that lives in CPU memory, on `device` inside the block: each tensor is copied there
    (asynchronously from pinned memory) in place of the module's own, which is put back on exit; nothing
    is copied back (runtime.text_encoder: offload). Tied tensors stay tied."""
    device = torch.device(device)
    first = next(iter((*module.parameters(), *module.buffers())), None)
    if first is None or first.device == device:
        yield module
        return
    copies: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in copies:
                        moved = t.detach().to(device, non_blocking=True)
                        copies[id(t)] = (torch.nn.Parameter(moved, requires_grad=t.requires_grad)
                                         if isinstance(t, torch.nn.Parameter) else moved)
                    swapped.append((table, name, t))
                    table[name] = copies[id(t)]
        yield module
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t


def pin_module(module: torch.nn.Module) -> torch.nn.Module:
    """Its CPU tensors in page-locked memory (fast, asynchronous copies to CUDA); a no-op without CUDA."""
    if torch.cuda.is_available():
        for t in (*module.parameters(), *module.buffers()):
            if t.device.type == "cpu" and not t.is_pinned():
                t.data = t.data.pin_memory()
    return module


# ----------------------------------------------------------------------------- latents


def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """Normalised latents [B,16,T',h,w] -> frames [B,T,3,8h,8w] float32 in [0,1], T = 4(T'-1)+1.

    Differentiable when grad is enabled. `checkpointed` keeps only the input for backward and
    re-runs the decoder there (the VAE has no per-block checkpointing of its own): the memory of
    the decode is then free for whatever consumes the frames (the reward path)."""

    def run(z: torch.Tensor) -> torch.Tensor:
        z = denormalize_latents(vae, z.to(vae.dtype))
        return vae.decode(z, return_dict=False)[0]

    if checkpointed and torch.is_grad_enabled():
        video = checkpoint(run, latents, use_reentrant=False)
    else:
        video = run(latents)
    # decode clamps to [-1, 1]; the clamp below only guards rounding.
    return ((video.float() + 1.0) * 0.5).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4)


def encode_frames(vae: AutoencoderKLWan, frames: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = False) -> torch.Tensor:
    """Frames [B,T,3,H,W] in [0,1] (T = 4k+1) -> normalised latents [B,16,T',H/8,W/8].

    The posterior mode by default; `sample=True` draws from it (with `generator`)."""
    video = (frames.permute(0, 2, 1, 3, 4) * 2.0 - 1.0).to(vae.dtype)
    dist = vae.encode(video).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return normalize_latents(vae, z.float())
