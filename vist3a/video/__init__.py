"""The Wan text-to-video side: components, prompt encoding, our sampling loop, VAE decode."""

from vist3a.video.components import (
    WanComponents,
    build_wan,
    decode_latents,
    denormalize_latents,
    encode_frames,
    load_tokenizer,
    normalize_latents,
    save_wan,
)
from vist3a.video.sampler import VideoSampler, initial_noise, latent_shape, make_scheduler
from vist3a.video.text import check_prompt, clean_prompt, count_tokens, encode_prompts

__all__ = [
    "WanComponents", "build_wan", "save_wan", "normalize_latents", "denormalize_latents", "decode_latents",
    "encode_frames", "load_tokenizer", "VideoSampler", "initial_noise", "latent_shape", "make_scheduler", "check_prompt",
    "clean_prompt", "count_tokens", "encode_prompts",
]
