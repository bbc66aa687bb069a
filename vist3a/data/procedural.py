"""Procedural multi-view clips: random Gaussian scenes filmed along smooth camera paths.

A scene is a textured ground plane, a few coloured blobs standing on it and a distant shell (so every
pixel sees something and has a depth). The camera orbits the scene's centre over a random arc with a
gently varying height and radius, always looking at a point near the centre. Frames and depth come
from our own renderer (`vist3a.splats.render`), so the ground truth is exact: OpenCV world-to-camera
extrinsics, pixel intrinsics and z-depth per frame. Seeded per clip: clip i of seed s is the same
on every machine, whatever else was generated before it.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from vist3a.io.corpus import ClipRecord
from vist3a.splats.gaussians import Cameras, Gaussians, intrinsics_from_fov, look_at, rgb_to_sh0
from vist3a.splats.render import render


def _rand(g: torch.Generator, *shape) -> Tensor:
    return torch.rand(*shape, generator=g)


def random_scene(g: torch.Generator, blobs: int = 6, per_blob: int = 48, ground: int = 400, shell: int = 500) -> Gaussians:
    """A random scene of about ground + blobs*per_blob + shell Gaussians around the origin (y points down)."""
    means, scales, colors = [], [], []
    # ground plane at y = 1 with a two-tone noise texture
    side = int(math.sqrt(ground))
    u, v = torch.meshgrid(torch.linspace(-3, 3, side), torch.linspace(-3, 3, side), indexing="ij")
    xz = torch.stack([u.flatten(), v.flatten()], -1) + 0.05 * torch.randn(side * side, 2, generator=g)
    means.append(torch.stack([xz[:, 0], torch.ones(len(xz)), xz[:, 1]], -1))
    scales.append(torch.tensor([6.0 / side, 0.01, 6.0 / side]).expand(len(xz), 3) * 0.8)
    base = _rand(g, 2, 3) * 0.6 + 0.2
    cell = 0.4 + 0.6 * _rand(g, 1)
    pick = ((xz[:, 0] / cell).floor() + (xz[:, 1] / cell).floor()).long() % 2  # checkerboard: texture to track
    colors.append(base[pick] + 0.05 * torch.randn(len(xz), 3, generator=g))
    # blobs: ellipsoidal clusters standing on the ground
    for _ in range(blobs):
        center = torch.cat([(_rand(g, 1) - 0.5) * 2.4, 1.0 - 0.2 - _rand(g, 1) * 0.6, (_rand(g, 1) - 0.5) * 2.4])
        extent = torch.cat([0.15 + _rand(g, 1) * 0.3, 0.15 + _rand(g, 1) * 0.4, 0.15 + _rand(g, 1) * 0.3])
        pts = torch.randn(per_blob, 3, generator=g)
        pts = pts / pts.norm(dim=-1, keepdim=True).clamp_min(1e-6) * _rand(g, per_blob, 1) ** (1 / 3)
        means.append(center + pts * extent)
        scales.append((0.06 + 0.06 * _rand(g, per_blob, 3)) * extent.mean() / 0.3)
        colors.append((_rand(g, 1, 3) * 0.8 + 0.1) + 0.05 * torch.randn(per_blob, 3, generator=g))
    # distant shell: a vertical gradient "sky/walls" around everything
    d = torch.randn(shell, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    means.append(d * 7.0)
    scales.append(torch.full((shell, 3), 0.9))
    top, bottom = _rand(g, 3) * 0.5 + 0.3, _rand(g, 3) * 0.5 + 0.2
    t = (d[:, 1:2] + 1) / 2
    colors.append(top * (1 - t) + bottom * t)
    means, scales, colors = torch.cat(means), torch.cat(scales), torch.cat(colors).clamp(0, 1)
    n = len(means)
    quats = torch.randn(n, 4, generator=g)
    quats[:len(xz)] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # ground Gaussians stay flat
    return Gaussians(means=means, quats=quats / quats.norm(dim=-1, keepdim=True), scales=scales,
                     opacities=torch.full((n,), 0.95), sh=rgb_to_sh0(colors)[:, None, :])


def smoothstep(x: Tensor) -> Tensor:
    return x * x * (3 - 2 * x)


def orbit_path(g: torch.Generator, frames: int) -> Tensor:
    """World-to-camera matrices [T,4,4] along a smooth random arc around the origin."""
    t = smoothstep(torch.linspace(0, 1, frames))
    start = _rand(g, 1) * 2 * math.pi
    span = (math.pi / 6 + _rand(g, 1) * math.pi / 3) * (1 if float(_rand(g, 1)) < 0.5 else -1)
    angle = start + span * t
    radius = 2.6 + 0.6 * _rand(g, 1) + 0.3 * torch.sin(math.pi * t + _rand(g, 1) * 6)
    height = -0.2 - 0.5 * _rand(g, 1) + 0.15 * torch.sin(2 * math.pi * t * _rand(g, 1))
    eye = torch.stack([radius * torch.cos(angle), height.expand(frames), radius * torch.sin(angle)], -1)
    target = (_rand(g, 3) - 0.5) * torch.tensor([0.6, 0.2, 0.6]) + torch.tensor([0.0, 0.5, 0.0])
    return look_at(eye, target.expand(frames, 3))


@torch.no_grad()
def render_clip(scene: Gaussians, viewmats: Tensor, size: int, fov_deg: float = 60.0) -> tuple[Tensor, Tensor, Tensor]:
    """(frames [T,3,H,W] in [0,1], z-depth [T,H,W] (0 where alpha < 0.5), intrinsics [T,3,3])."""
    k = intrinsics_from_fov(fov_deg, size, size).expand(len(viewmats), 3, 3).contiguous()
    out = render(scene, Cameras(viewmats=viewmats, Ks=k, width=size, height=size), backend="auto", render_depth=True)
    frames = out.colors.clamp(0, 1).permute(0, 3, 1, 2).contiguous()
    depth = torch.where(out.alphas[..., 0] > 0.5, out.depths[..., 0], torch.zeros(()))
    return frames, depth, k


def procedural_clip(index: int, seed: int = 0, frames: int = 9, size: int = 64, fov_deg: float = 60.0,
                    **scene_kwargs) -> ClipRecord:
    """Clip `index` of the procedural corpus `seed`: PNG frames, GT cameras and depth, a caption."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    scene = random_scene(g, **scene_kwargs)
    viewmats = orbit_path(g, frames)
    rgb, depth, k = render_clip(scene, viewmats, size, fov_deg)
    return ClipRecord.from_arrays(f"proc-{seed}-{index:06d}", rgb, intrinsics=k, extrinsics=viewmats, depth=depth,
                                  caption="a procedural scene of coloured blobs on a textured ground",
                                  source="procedural")


def procedural_clips(n: int, seed: int = 0, frames: int = 9, size: int = 64, start: int = 0,
                     **kwargs) -> Iterator[ClipRecord]:
    for i in range(start, start + n):
        yield procedural_clip(i, seed, frames, size, **kwargs)
