"""The stitching layer: a linear Conv3d from video latents to a reconstruction network's tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vist3a.stitching.spec import StitchSpec


def frames_from_latent_frames(latent_frames: int) -> int:
    """Wan VAE: T' latent frames decode to T = 4(T'-1)+1 video frames."""
    return 4 * (latent_frames - 1) + 1


def upsample_time(latents: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """(B, C, T', h, w) -> (B, C, T, h, w), linear in time with aligned ends (T = 4(T'-1)+1 by default)."""
    b, c, t, h, w = latents.shape
    frames = frames or frames_from_latent_frames(t)
    if frames == t:
        return latents
    if t == 1:
        return latents.expand(b, c, frames, h, w).contiguous()
    return F.interpolate(latents, size=(frames, h, w), mode="trilinear", align_corners=True)


class StitchingLayer(nn.Module):
    """Conv3d with replicate padding (the same padding the ridge fit assumes)."""

    def __init__(self, spec: StitchSpec | str, in_channels: int = 16):
        super().__init__()
        self.spec = StitchSpec.parse(spec) if isinstance(spec, str) else spec
        self.in_channels = in_channels
        self.conv = nn.Conv3d(
            in_channels, self.spec.out_channels, self.spec.kernel,
            stride=self.spec.stride, padding=0, dilation=self.spec.dilation,
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.spec.padding
        if pt or ph or pw:
            x = F.pad(x, (pw, pw, ph, ph, pt, pt), mode="replicate")
        return x

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, h, w) -> (B, C_out, T_out, h_out, w_out)."""
        return self.conv(self.pad(latents))

    @staticmethod
    def to_tokens(features: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, T, h*w, C): one token grid per view, as the recon network's cut expects."""
        b, c, t, h, w = features.shape
        return features.permute(0, 2, 3, 4, 1).reshape(b, t, h * w, c)
