"""The latent convention, in one place (as diffusers' WanPipeline): the transformer works on *normalised*
latents z_norm = (z - latents_mean) / latents_std, where z is the VAE posterior latent; the VAE decodes
z = z_norm * latents_std + latents_mean (the pipeline writes this as `z / (1/std) + mean`). The stitched
decoder and the layer search de-normalise the same way.

Only torch here: the stitched decoder uses it without importing diffusers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def latent_stats(vae, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The VAE's (latents_mean, latents_std), shaped [1, C, 1, 1, 1], on `like`'s device and dtype
    (float32 on the CPU without it)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {"dtype": torch.float32}
    return (torch.tensor(vae.config.latents_mean, **kw).view(shape),
            torch.tensor(vae.config.latents_std, **kw).view(shape))


def denormalize(z_norm: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalised latent -> VAE latent, given the VAE's statistics."""
    return z_norm * std + mean


def normalize_latents(vae, z: Tensor) -> Tensor:
    """VAE latent [B,C,T,H,W] -> the normalised latent the transformer sees."""
    mean, std = latent_stats(vae, z)
    return (z - mean) / std


def denormalize_latents(vae, z_norm: Tensor) -> Tensor:
    """Normalised latent -> VAE latent (what `vae.decode` takes)."""
    return denormalize(z_norm, *latent_stats(vae, z_norm))
