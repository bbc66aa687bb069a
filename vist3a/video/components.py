"""The Wan 2.1 text-to-video parts (diffusers/transformers classes), built from seeded random
weights or loaded from a diffusers-format directory, and the VAE's encode/decode of frames
(the latent convention is `vist3a.video.latents`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def _random_components(cfg: VideoModelConfig) -> WanComponents:
    tokenizer = load_tokenizer(cfg)
    if len(tokenizer) > cfg.text_encoder.vocab_size:
        raise ValueError(f"model.video.text_encoder.vocab_size {cfg.text_encoder.vocab_size} is below the "
                         f"ByT5 tokenizer's {len(tokenizer)} ids")
    # One seed per part, so that resizing one part leaves the others' weights unchanged.
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
              vae_dtype: torch.dtype | None = torch.float32) -> WanComponents:
    """Text encoder + transformer + VAE + scheduler, in eval mode on `device`.

    Random weights are drawn in float32 on the CPU and then moved, so they are the same on every
    device and across calls. The VAE stays float32 by default (as Wan's own examples run it);
    `vae_dtype=None` uses `dtype`. Text encoder and VAE are frozen; the transformer's
    requires_grad flags are left to the trainer. `cfg.lora` is not applied here.
    """
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    if cfg.source == "random":
        comps = _random_components(cfg)
        _cast_like_from_pretrained(comps.text_encoder, dtype)
        _cast_like_from_pretrained(comps.transformer, dtype)
        _cast_like_from_pretrained(comps.vae, vae_dtype)
    else:
        comps = _pretrained_components(cfg, dtype, vae_dtype)
    comps.text_encoder.to(device).eval().requires_grad_(False)
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
