"""Making scenes smaller: voxel merging, opacity pruning, a cap on the count, SH truncation.

A scene straight from a pixel-aligned decoder has one Gaussian per pixel and view (13 x 448^2 =
2.6M at the real size), most of them seen by several views and so written several times. Each
step here is explicit and reports its effect (counts before/after), which the generator records in
meta.json:

- `merge_voxels`: the Gaussians whose centres share a voxel round(p / voxel_size) become one,
  weighted by softmax(confidence) within the voxel as AnySplat weights its merge (without a
  confidence, by opacity). Where AnySplat averages the raw head outputs, this matches moments:
  the merged centre is the weighted mean, the merged covariance the weighted mean of
  (covariance + outer product of the offset from that centre), so a voxel larger than a pixel's
  footprint is still covered. Opacity and SH are weighted means. The weighting reuses
  `vist3a.recon.voxel_merge`.
  The voxel can also be given in pixel footprints (`voxel_footprints`): k x the scene's median
  footprint depth/focal at the nearest predicted camera, so one setting fits scenes of any scale.
- `prune_opacity`: drops Gaussians with opacity below a threshold.
- `cap_count`: keeps the `max_gaussians` most important, importance = opacity x projected area
  (pixels, averaged over the given cameras; world-space area without cameras).
- SH degree truncation (`Gaussians.with_sh_degree`, never padding up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vist3a.recon.geometry import mat_to_quat
from vist3a.recon.pixel_gaussians import voxel_merge
from vist3a.splats.gaussians import Cameras, Gaussians
from vist3a.splats.render import covariances


@dataclass(frozen=True)
class CompactSettings:
    """What `compact` does, in order; None / 0 switches a step off."""

    voxel_size: float | None = None
    min_opacity: float = 0.0
    max_gaussians: int | None = None
    sh_degree: int | None = None
    voxel_footprints: float | None = None  # the voxel in pixel footprints instead of voxel_size's world units

    def __post_init__(self):
        if self.voxel_size is not None and not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")
        if self.voxel_footprints is not None and not self.voxel_footprints > 0:
            raise ValueError(f"voxel_footprints must be > 0, got {self.voxel_footprints}")
        if self.voxel_size is not None and self.voxel_footprints is not None:
            raise ValueError("give voxel_size (world units) or voxel_footprints (pixel footprints), not both")
        if not 0.0 <= self.min_opacity < 1.0:
            raise ValueError(f"min_opacity must be in [0, 1), got {self.min_opacity}")
        if self.max_gaussians is not None and self.max_gaussians < 1:
            raise ValueError(f"max_gaussians must be >= 1, got {self.max_gaussians}")
        if self.sh_degree is not None and not 0 <= self.sh_degree <= 4:
            raise ValueError(f"sh_degree must be in 0..4, got {self.sh_degree}")


def _sym6(m: Tensor) -> Tensor:
    """[N,3,3] symmetric -> [N,6] (xx, xy, xz, yy, yz, zz)."""
    return torch.stack([m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2], m[:, 2, 2]], -1)


def _unsym6(v: Tensor) -> Tensor:
    xx, xy, xz, yy, yz, zz = v.unbind(-1)
    return torch.stack([xx, xy, xz, xy, yy, yz, xz, yz, zz], -1).reshape(-1, 3, 3)


def covariance_to_gaussian_frame(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric positive semi-definite [N,3,3] -> (w,x,y,z quaternions [N,4], scales [N,3]) with
    R diag(s^2) R^T = cov (eigenvalues floored at a tiny positive value)."""
    evals, evecs = torch.linalg.eigh(cov)
    det = torch.linalg.det(evecs)
    evecs = torch.cat([evecs[..., :2], evecs[..., 2:] * det.sign()[:, None, None]], dim=-1)  # a proper rotation
    scales = evals.clamp_min(1e-20).sqrt()
    xyzw = mat_to_quat(evecs)
    return torch.cat([xyzw[:, 3:], xyzw[:, :3]], -1), scales


def merge_voxels(g: Gaussians, voxel_size: float, confidence: Tensor | None = None) -> Gaussians:
    """One Gaussian per occupied voxel (see the module docstring). `confidence` [N] are the
    decoder's per-Gaussian confidences (softmax-weighted per voxel); None weights by opacity."""
    if g.num == 0:
        return g
    if confidence is None:
        confidence = torch.log(g.opacities.clamp_min(1e-12))
    if tuple(confidence.shape) != (g.num,):
        raise ValueError(f"confidence has shape {tuple(confidence.shape)}, expected ({g.num},)")
    dt = torch.float64  # second moments of far-away centres lose the covariance in float32
    mu = g.means.to(dt)
    cov = covariances(g.quats.to(dt), g.scales.to(dt))
    second = _sym6(cov + mu[:, :, None] * mu[:, None, :])
    k = g.sh.shape[1]
    feats = torch.cat([second, g.opacities.to(dt)[:, None], g.sh.to(dt).reshape(g.num, 3 * k)], dim=1)
    means, merged = voxel_merge(mu, feats, confidence.to(dt), voxel_size)
    cov_m = _unsym6(merged[:, :6]) - means[:, :, None] * means[:, None, :]
    quats, scales = covariance_to_gaussian_frame(cov_m)
    out_dt = g.dtype
    return Gaussians(means=means.to(out_dt), quats=quats.to(out_dt), scales=scales.to(out_dt),
                     opacities=merged[:, 6].clamp(0.0, 1.0).to(out_dt), sh=merged[:, 7:].reshape(-1, k, 3).to(out_dt))


def pixel_footprint(g: Gaussians, cameras: Cameras) -> float:
    """The scene's median pixel footprint in world units: depth / focal of each Gaussian at the nearest
    camera in front of it (for pixel-aligned Gaussians, the view it came from)."""
    cams = cameras.to(device=g.device, dtype=torch.float32)
    z = g.means.float() @ cams.viewmats[:, 2, :3].T + cams.viewmats[:, 2, 3]  # [N,C] camera depths
    focal = 0.5 * (cams.Ks[:, 0, 0] + cams.Ks[:, 1, 1])
    footprint = torch.where(z > 1e-6, z / focal, torch.full_like(z, math.inf)).amin(dim=1)
    footprint = footprint[torch.isfinite(footprint)]
    if not footprint.numel():
        raise ValueError("voxel_footprints: no Gaussian is in front of any predicted camera")
    return float(footprint.median())


def prune_opacity(g: Gaussians, min_opacity: float) -> Gaussians:
    """The Gaussians with opacity >= min_opacity."""
    return g.select(g.opacities >= min_opacity) if min_opacity > 0 else g


def importance(g: Gaussians, cameras: Cameras | None = None) -> Tensor:
    """Opacity x projected area [N]: pi s1 s2 (the two largest scales) in pixels fx fy / z^2 averaged
    over the cameras (0 behind a camera); in world units without cameras."""
    top2 = g.scales.topk(2, dim=1).values
    area = math.pi * top2[:, 0] * top2[:, 1]
    if cameras is not None and cameras.num:
        cams = cameras.to(device=g.device, dtype=g.dtype)
        z = g.means @ cams.viewmats[:, 2, :3].T + cams.viewmats[:, 2, 3]  # [N,C] camera depths
        focal2 = cams.Ks[:, 0, 0] * cams.Ks[:, 1, 1]
        per_cam = torch.where(z > 1e-6, focal2 / z.clamp_min(1e-6) ** 2, torch.zeros_like(z))
        area = area * per_cam.mean(dim=1)
    return g.opacities * area


def cap_count(g: Gaussians, max_gaussians: int, cameras: Cameras | None = None) -> Gaussians:
    """The `max_gaussians` most important Gaussians (all of them when there are fewer), in their order."""
    if g.num <= max_gaussians:
        return g
    keep = importance(g, cameras).topk(max_gaussians).indices.sort().values
    return g.select(keep)


def compact(g: Gaussians, settings: CompactSettings, confidence: Tensor | None = None,
            cameras: Cameras | None = None) -> tuple[Gaussians, list[dict]]:
    """Run the configured steps in order (merge, prune, cap, SH truncation) -> (scene, report), the
    report one entry per step that ran: {"step", its setting, "before", "after"}."""
    report = []

    def record(step: str, setting: dict, before: Gaussians, after: Gaussians) -> Gaussians:
        entry = {"step": step, **setting, "before": before.num, "after": after.num}
        if step == "sh_truncate":
            entry.update(before_degree=before.sh_degree, after_degree=after.sh_degree)
        report.append(entry)
        return after

    s = settings
    voxel_size, setting = s.voxel_size, {"voxel_size": s.voxel_size}
    if s.voxel_footprints is not None:
        if cameras is None or not cameras.num:
            raise ValueError("voxel_footprints needs the scene's cameras")
        voxel_size = s.voxel_footprints * pixel_footprint(g, cameras)
        setting = {"voxel_footprints": s.voxel_footprints, "voxel_size": voxel_size}
    if voxel_size is not None:
        g = record("voxel_merge", {**setting, "weights": "confidence" if confidence is not None else "opacity"}, g,
                   merge_voxels(g, voxel_size, confidence))
    if s.min_opacity > 0:
        g = record("opacity_prune", {"min_opacity": s.min_opacity}, g, prune_opacity(g, s.min_opacity))
    if s.max_gaussians is not None:
        g = record("cap", {"max_gaussians": s.max_gaussians}, g, cap_count(g, s.max_gaussians, cameras))
    if s.sh_degree is not None and s.sh_degree < g.sh_degree:
        g = record("sh_truncate", {"sh_degree": s.sh_degree}, g, g.with_sh_degree(s.sh_degree))
    for name in ("means", "quats", "scales", "opacities", "sh"):
        if not bool(torch.isfinite(getattr(g, name)).all()):
            raise ValueError(f"compaction produced non-finite {name}")
    return g, report
