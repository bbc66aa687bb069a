"""ReconNet: our VGGT/AnySplat-family reconstruction network, enterable at any encoder block.

State-dict keys mirror the released checkpoints: `aggregator.patch_embed.*` (DINO encoder),
`aggregator.{camera_token,register_token,frame_blocks,global_blocks}`, `camera_head.*`,
`depth_head.*`, `point_head.*` (VGGT-1B) and `gaussian_param_head.*` (AnySplat `encoder.*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from vist3a.ids import seeded
from vist3a.recon.aggregator import Aggregator
from vist3a.recon.geometry import pose_encoding_to_extri_intri
from vist3a.recon.heads import CameraHead, DPTHead, split_activate
from vist3a.recon.pixel_gaussians import to_gaussians


def gaussian_param_channels(sh_degree: int) -> int:
    """AnySplat head channels: opacity, scale (3), rotation xyzw (4), SH (3 x (d+1)^2), confidence."""
    return 1 + 3 + 4 + 3 * (sh_degree + 1) ** 2 + 1


def default_dpt_layers(depth: int) -> tuple[int, int, int, int]:
    """Four aggregator layers ending at the last, evenly spread (repeats when depth < 4)."""
    return tuple(math.ceil((k + 1) * depth / 4) - 1 for k in range(4))


@dataclass
class ReconOutput:
    """Predictions for B scenes of S views at the network's image size (None: head not built)."""

    extrinsics: Tensor | None = None  # [B,S,4,4] world-to-camera, OpenCV (world = camera 0 by training)
    intrinsics: Tensor | None = None  # [B,S,3,3] pixels
    pose_enc: Tensor | None = None  # [B,S,9] last refinement iteration
    pose_enc_list: list[Tensor] = field(default_factory=list)
    depth: Tensor | None = None  # [B,S,H,W]
    depth_conf: Tensor | None = None  # [B,S,H,W]
    points: Tensor | None = None  # [B,S,H,W,3] world
    points_conf: Tensor | None = None  # [B,S,H,W]
    gaussian_params: Tensor | None = None  # [B,S,H,W,Cg] raw head output

    def to_gaussians(self, images: Tensor | None = None, voxel_size: float | None = None, min_opacity: float = 0.0):
        """Shorthand for pixel_gaussians.to_gaussians(self, ...)."""
        return to_gaussians(self, images, voxel_size=voxel_size, min_opacity=min_opacity)


class ReconNet(nn.Module):
    """Images [B,S,3,H,W] in [0,1] -> ReconOutput. Also runnable from the patch tokens after
    any encoder block ("blocks.N"), which is where the stitching layer feeds it."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.frames_chunk: int | None = 8  # DPT heads decode this many views at a time
        with seeded(cfg.seed):  # the same random weights for a seed on every machine
            self._build(cfg)

    def _build(self, cfg) -> None:
        dim2 = 2 * cfg.embed_dim
        self.aggregator = Aggregator(cfg)
        layers = tuple(cfg.dpt_layers) if cfg.dpt_layers is not None else default_dpt_layers(cfg.aggregator_depth)
        dpt = dict(dim_in=dim2, patch_size=cfg.patch_size, features=cfg.dpt_features,
                   out_channels=tuple(cfg.dpt_out_channels), layers=layers)
        heads = set(cfg.heads)
        self.camera_head = CameraHead(dim2, cfg.aggregator_heads, cfg.mlp_ratio, cfg.camera_trunk_depth,
                                      cfg.camera_iters) if "camera" in heads else None
        self.depth_head = DPTHead(out_dim=2, **dpt) if "depth" in heads else None
        self.point_head = DPTHead(out_dim=4, **dpt) if "points" in heads else None
        self.gaussian_param_head = (DPTHead(out_dim=gaussian_param_channels(cfg.sh_degree), rgb_merger=True, **dpt)
                                    if "gaussians" in heads else None)
        self.keep_layers = set(layers) | {cfg.aggregator_depth - 1}
        self.aggregator.reset_parameters()
        if self.camera_head is not None:
            self.camera_head.reset_parameters()

    @property
    def token_grid(self) -> tuple[int, int]:
        g = self.cfg.img_size // self.cfg.patch_size
        return g, g

    def cut_points(self) -> list[str]:
        return [f"blocks.{i}" for i in range(self.cfg.encoder_depth)]

    def cut_index(self, cut: str) -> int:
        """"blocks.N" -> N, refusing names that are not cut points of this network."""
        if cut not in self.cut_points():
            raise ValueError(f"unknown cut point {cut!r}; choose from blocks.0..blocks.{self.cfg.encoder_depth - 1}")
        return int(cut.split(".")[1])

    def _grid(self, images: Tensor) -> tuple[int, int]:
        p = self.cfg.patch_size
        height, width = images.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {p}")
        return height // p, width // p

    def cast_trunk(self, dtype: torch.dtype) -> "ReconNet":
        """Encoder and aggregator in `dtype`, the heads kept in float32: how the release runs AnySplat in
        bfloat16 (its heads' final steps in float32). The heads get the trunk's tokens upcast."""
        self.aggregator.to(dtype)
        return self

    def _head_dtype(self) -> torch.dtype:
        head = next((h for h in (self.camera_head, self.depth_head, self.point_head, self.gaussian_param_head)
                     if h is not None), None)
        return next(head.parameters()).dtype if head is not None else self.aggregator.camera_token.dtype

    def _like_weights(self, x: Tensor | None) -> Tensor | None:
        """Inputs follow the network's parameter dtype (e.g. float32 frames into a bfloat16 network)."""
        return None if x is None else x.to(self.aggregator.camera_token.dtype)

    def forward(self, images: Tensor) -> ReconOutput:
        images = self._like_weights(images)
        encoder = self.aggregator.patch_embed
        x = encoder.run_blocks(encoder.embed(self.aggregator.normalize(images)), 0, len(encoder.blocks))
        b, s = images.shape[:2]
        return self._decode(encoder.finish(x).unflatten(0, (b, s)), self._grid(images), images)

    def activations(self, cut: str, images: Tensor, return_specials: bool = False):
        """Patch tokens [B,S,P,C] after encoder block N (before the final norm).

        return_specials=True also returns that block's [B,S,1+R,C] cls/register tokens, with
        which forward_from reproduces forward exactly."""
        x = self._encoder_tokens([cut], images)[cut]
        special = self.aggregator.patch_embed.num_special
        acts = x[:, :, special:]
        return (acts, x[:, :, :special]) if return_specials else acts

    def activations_at(self, cuts: Sequence[str], images: Tensor) -> dict[str, Tensor]:
        """{cut: patch tokens [B,S,P,C]} after each of several encoder blocks, from one pass that stops
        at the deepest (what the layer search fits, each value equal to `activations(cut, images)`)."""
        special = self.aggregator.patch_embed.num_special
        return {cut: x[:, :, special:] for cut, x in self._encoder_tokens(cuts, images).items()}

    def _encoder_tokens(self, cuts: Sequence[str], images: Tensor) -> dict[str, Tensor]:
        """{cut: every token [B,S,1+R+P,C] after that block}, running the encoder once up to the deepest."""
        stops = {cut: self.cut_index(cut) + 1 for cut in cuts}
        images = self._like_weights(images)
        encoder = self.aggregator.patch_embed
        x = encoder.embed(self.aggregator.normalize(images))
        out, done = {}, 0
        for cut in sorted(stops, key=stops.get):
            x = encoder.run_blocks(x, done, stops[cut])
            done = stops[cut]
            out[cut] = x.unflatten(0, images.shape[:2])
        return {cut: out[cut] for cut in cuts}

    def forward_from(self, cut: str, acts: Tensor, images: Tensor | None = None,
                     specials: Tensor | None = None, add_pos_embed: bool = False) -> ReconOutput:
        """Run the network from the patch tokens after block N.

        The cls/register tokens are re-entered as their learned block-0 values (cls plus its position
        embedding) unless `specials` (from activations(..., return_specials=True)) are given. The patch
        position embedding is not re-added (`acts` already carry it) unless `add_pos_embed`: the
        release's stitched decoder adds it to the stitching layer's output. Only the Gaussian head
        needs `images`; without them gaussian_params is None.
        """
        n = self.cut_index(cut)
        acts, images, specials = (self._like_weights(t) for t in (acts, images, specials))
        encoder = self.aggregator.patch_embed
        b, s, p, c = acts.shape
        grid = self._grid(images) if images is not None else self.token_grid
        if grid[0] * grid[1] != p:
            raise ValueError(f"{p} tokens per view do not fill the {grid[0]}x{grid[1]} token grid")
        if specials is None:
            specials = encoder.special_tokens(b * s)
        acts = acts.reshape(b * s, p, c)
        if add_pos_embed:
            acts = acts + encoder.patch_pos_embed(*grid)
        x = torch.cat([specials.reshape(b * s, -1, c), acts], dim=1)
        x = encoder.run_blocks(x, n + 1, len(encoder.blocks))
        return self._decode(encoder.finish(x).reshape(b, s, p, c), grid, images)

    def _decode(self, patch_tokens: Tensor, grid: tuple[int, int], images: Tensor | None) -> ReconOutput:
        layers = self.aggregator(patch_tokens, grid, self.keep_layers)
        head_dtype = self._head_dtype()
        layers = {i: t.to(head_dtype) for i, t in layers.items()}
        images = None if images is None else images.to(head_dtype)
        image_hw = (grid[0] * self.cfg.patch_size, grid[1] * self.cfg.patch_size)
        out = ReconOutput()
        dense = dict(layer_outputs=layers, patch_start=self.aggregator.patch_start_idx, grid=grid,
                     frames_chunk=self.frames_chunk)
        if self.camera_head is not None:
            out.pose_enc_list = self.camera_head(layers[self.cfg.aggregator_depth - 1][:, :, 0])
            out.pose_enc = out.pose_enc_list[-1]
            out.extrinsics, out.intrinsics = pose_encoding_to_extri_intri(
                out.pose_enc, image_hw, focal_eps=1e-3 if self.cfg.conventions == "anysplat" else 0.0)
        if self.depth_head is not None:
            depth, out.depth_conf = split_activate(self.depth_head(**dense), "depth")
            out.depth = depth[..., 0]
        if self.point_head is not None:
            out.points, out.points_conf = split_activate(self.point_head(**dense), "points")
        if self.gaussian_param_head is not None and images is not None:
            out.gaussian_params = self.gaussian_param_head(images=images, **dense)
        return out
