"""StitchedDecoder: video latents -> stitching layer -> reconstruction network after the cut -> Gaussians.

This is the "3D VAE decoder" of VIST3A. The Gaussian head also looks at RGB frames; at inference
they come from the video VAE's own decoder (`decode_frames`), resized to the network's input size.
`vist3a.models.build_stitched_decoder` builds it from a Config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vist3a.io.frames import resize_frames
from vist3a.recon.pixel_gaussians import AnySplatPostprocess
from vist3a.splats.gaussians import Cameras, Gaussians
from vist3a.stitching.layer import StitchingLayer, frames_from_latent_frames, upsample_time
from vist3a.video.latents import denormalize


@dataclass
class DecodedScenes:
    gaussians: list[Gaussians]
    cameras: list[Cameras]          # predicted cameras, one set per scene, at the network's input size
    depth: torch.Tensor             # [B, S, H, W]
    frames: torch.Tensor | None     # RGB frames given to the Gaussian head, [B, S, 3, H, W]
    recon: object                   # the full ReconOutput


class StitchedDecoder(nn.Module):
    def __init__(
        self,
        stitch: StitchingLayer,
        recon: nn.Module,
        cut: str,
        latents_mean: torch.Tensor,
        latents_std: torch.Tensor,
        decode_frames: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        readd_pos_embed: bool = False,
        frames_antialias: bool = True,
        anysplat: AnySplatPostprocess | None = None,
    ):
        """The options are where the release's stitched forward differs from vist3a's own: it adds the
        patch position embedding to the stitching output (`readd_pos_embed`), resizes the VAE frames
        without antialiasing (`frames_antialias=False`) and post-processes the Gaussians as AnySplat's
        config says (`anysplat`)."""
        super().__init__()
        if cut not in recon.cut_points():
            raise ValueError(f"cut {cut!r} is not a cut point of the reconstruction network (choose from {recon.cut_points()})")
        self.stitch = stitch
        self.recon = recon
        self.cut = cut
        self.register_buffer("latents_mean", torch.as_tensor(latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.as_tensor(latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
        self.decode_frames = decode_frames
        self.readd_pos_embed = readd_pos_embed
        self.frames_antialias = frames_antialias
        self.anysplat = anysplat

    @property
    def needs_rgb(self) -> bool:
        return "gaussians" in tuple(self.recon.cfg.heads)

    def check_latent_shape(self, latent_shape: tuple[int, ...]) -> None:
        """Refuse, with both grids in the message, latents whose stitched grid is not the network's token grid."""
        _, c, t, h, w = latent_shape
        if c != self.stitch.in_channels:
            raise ValueError(f"latents have {c} channels; the stitching layer expects {self.stitch.in_channels}")
        frames = frames_from_latent_frames(t)
        t_out, h_out, w_out = self.stitch.spec.output_size(frames, h, w)
        gh, gw = self.recon.token_grid
        if (h_out, w_out) != (gh, gw):
            raise ValueError(
                f"latent grid {h}x{w} stitches to a {h_out}x{w_out} token grid, but the reconstruction network "
                f"expects {gh}x{gw} (img_size {self.recon.cfg.img_size} / patch {self.recon.cfg.patch_size}); "
                f"change sampling.height/width or model.stitch.spec"
            )
        if t_out != frames:
            raise ValueError(f"stitching spec maps {frames} frames to {t_out} views; it must keep the frame count")

    def tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised video latents (B, 16, T', h, w) -> the network's tokens at the cut, (B, T, P, C)."""
        raw = denormalize(latents.float(), self.latents_mean, self.latents_std)
        return StitchingLayer.to_tokens(self.stitch(upsample_time(raw)))

    def forward(self, latents: torch.Tensor, frames: torch.Tensor | None = None, voxel_size: float | None = None,
                min_opacity: float = 0.0) -> DecodedScenes:
        """Decode normalised latents. `frames` (B, T, 3, H, W) in [0, 1] overrides the VAE-decoded RGB."""
        from vist3a.recon import to_gaussians

        self.check_latent_shape(tuple(latents.shape))
        tokens = self.tokens(latents)
        if self.needs_rgb and frames is None:
            if self.decode_frames is None:
                raise ValueError("the Gaussian head needs RGB frames: give `frames` or a `decode_frames` function")
            frames = self.decode_frames(latents)
        if frames is not None:
            frames = resize_frames(frames.float(), self.recon.cfg.img_size, antialias=self.frames_antialias)
        out = self.recon.forward_from(self.cut, tokens, frames, add_pos_embed=self.readd_pos_embed)
        pixel_offset = 0.0 if self.recon.cfg.conventions == "anysplat" else 0.5
        gaussians = (to_gaussians(out, frames, voxel_size=voxel_size, min_opacity=min_opacity, anysplat=self.anysplat,
                                  pixel_offset=pixel_offset) if self.needs_rgb else [])
        size = self.recon.cfg.img_size
        cameras = [Cameras(viewmats=out.extrinsics[i], Ks=out.intrinsics[i], width=size, height=size)
                   for i in range(out.extrinsics.shape[0])]
        return DecodedScenes(gaussians=gaussians, cameras=cameras, depth=out.depth, frames=frames, recon=out)
