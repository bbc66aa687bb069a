"""Pixel-aligned Gaussians from a ReconOutput (AnySplat's recipe).

One Gaussian per pixel and view, centred on the depth unprojected through the predicted camera.
Optionally merged per voxel (confidence-softmax weighted mean of the raw parameters), then
activated: opacity sigmoid, scale 0.001*softplus clamped at 0.3, rotation normalised (the head
predicts x,y,z,w; Gaussians store w,x,y,z), SH degree l scaled by 0.1*0.25^l (DC unscaled).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vist3a.recon.geometry import rigid_inverse, unproject_depth
from vist3a.splats.gaussians import Gaussians


@dataclass(frozen=True)
class AnySplatPostprocess:
    """AnySplat's own post-processing of the pixel-aligned Gaussians, as its encoder config sets it.

    voxelize: merge per voxel of `voxel_size` (confidence-softmax weights, a 1e-6 guard in the
    normaliser); render_conf: keep only pixels whose depth confidence is above its `conf_threshold`
    quantile (when not voxelizing); opacity_conf: opacity times sigmoid(depth_conf - that quantile).
    Upstream takes the quantiles over the whole batch; here they are per scene, which is the same at
    batch 1 (how the release generates) and keeps a scene independent of its batch."""

    voxelize: bool = False
    voxel_size: float = 0.001
    render_conf: bool = False
    conf_threshold: float = 0.1
    opacity_conf: bool = False
    sh_degree: int = 4
    source: str = "defaults"

    def __post_init__(self):
        if self.voxelize and self.opacity_conf:
            raise ValueError(f"{self.source}: voxelize and opacity_conf together are not supported (AnySplat's code "
                             "multiplies per-pixel confidences into per-voxel opacities there)")
        if not 0.0 <= self.conf_threshold < 1.0 or self.voxel_size <= 0:
            raise ValueError(f"{self.source}: conf_threshold must be in [0, 1) and voxel_size > 0, got "
                             f"{self.conf_threshold} and {self.voxel_size}")

    @classmethod
    def from_config_json(cls, path: str | Path) -> "AnySplatPostprocess":
        """Read AnySplat's hub config.json (`encoder_cfg` section, or a flat encoder config); absent keys
        take the defaults of AnySplat's encoder config class."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read AnySplat config {path}: {exc}") from None
        enc = data.get("encoder_cfg", data) if isinstance(data, dict) else None
        if not isinstance(enc, dict):
            raise ValueError(f"{path}: expected a JSON object with an 'encoder_cfg' section")
        adapter = enc.get("gaussian_adapter") or {}
        fields = {k: enc[k] for k in ("voxelize", "voxel_size", "render_conf", "conf_threshold", "opacity_conf") if k in enc}
        if "sh_degree" in adapter:
            fields["sh_degree"] = int(adapter["sh_degree"])
        return cls(**fields, source=str(path))

    def describe(self) -> dict:
        return asdict(self)


def voxel_merge(points: Tensor, feats: Tensor, conf: Tensor, voxel_size: float, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Merge the points [N,3] (and their features [N,F]) that share a voxel round(p / voxel_size)
    into one, weighted by softmax(conf) within the voxel -> ([M,3], [M,F]), M <= N.
    `eps` guards the softmax normaliser (AnySplat: 1e-6)."""
    keys = torch.round(points.detach() / voxel_size).long()
    _, voxel = torch.unique(keys, dim=0, return_inverse=True)
    m = int(voxel.max()) + 1
    # Softmax per voxel; the per-voxel max only stabilises exp, so it needs no gradient.
    vmax = torch.full((m,), -math.inf, dtype=conf.dtype, device=conf.device)
    vmax = vmax.scatter_reduce(0, voxel, conf.detach(), reduce="amax")
    e = torch.exp(conf - vmax[voxel])
    weight = e / (torch.zeros(m, dtype=e.dtype, device=e.device).index_add(0, voxel, e)[voxel] + eps)
    merged = torch.cat([points, feats], dim=-1) * weight[:, None]
    merged = torch.zeros(m, merged.shape[1], dtype=merged.dtype, device=merged.device).index_add(0, voxel, merged)
    return merged[:, :3], merged[:, 3:]


def sh_scale(sh_degree: int, device=None) -> Tensor:
    """Per-coefficient factor [(d+1)^2]: 1 for the DC term, 0.1 * 0.25^l for degree l >= 1."""
    return torch.tensor([1.0 if l == 0 else 0.1 * 0.25**l for l in range(sh_degree + 1) for _ in range(2 * l + 1)],
                        device=device)


def activate(means: Tensor, raw: Tensor) -> Gaussians:
    """Centres [N,3] and raw [N, 8 + 3K] (opacity, scale 3, rotation xyzw 4, SH channel-major) -> Gaussians."""
    k = (raw.shape[1] - 8) // 3
    degree = math.isqrt(k) - 1
    rot = F.normalize(raw[:, 4:8], dim=-1)
    sh = raw[:, 8:].reshape(-1, 3, k).transpose(1, 2) * sh_scale(degree, raw.device)[:, None].to(raw.dtype)
    return Gaussians(means=means, quats=torch.cat([rot[:, 3:], rot[:, :3]], dim=-1),
                     scales=(0.001 * F.softplus(raw[:, 1:4])).clamp_max(0.3),
                     opacities=torch.sigmoid(raw[:, 0]), sh=sh)


def to_gaussians(out, images: Tensor | None = None, voxel_size: float | None = None,
                 min_opacity: float = 0.0, anysplat: AnySplatPostprocess | None = None,
                 pixel_offset: float = 0.5) -> list[Gaussians]:
    """ReconOutput -> one Gaussians per batch item (S*H*W of them before merging/pruning).

    `images` are the frames the network saw; the Gaussian head has already used them, so here
    they only guard against pairing an output with frames of another size. `anysplat` applies
    AnySplat's own post-processing (then `voxel_size` must be None); `pixel_offset` is where in a
    pixel depth is unprojected (0.5 centre; AnySplat 0).
    """
    if anysplat is not None and voxel_size is not None:
        raise ValueError("voxel_size and AnySplat's post-processing both merge voxels: give one of them")
    params = out.gaussian_params
    if params is None:
        raise ValueError("no gaussian_params: build the network with the 'gaussians' head and pass images")
    b, s, h, w, c = params.shape
    if images is not None and (tuple(images.shape[:2]) != (b, s) or tuple(images.shape[-2:]) != (h, w)):
        raise ValueError(f"images {tuple(images.shape)} do not match gaussian_params {tuple(params.shape)}")
    if out.depth is not None and out.extrinsics is not None:
        means = unproject_depth(out.depth, out.intrinsics, rigid_inverse(out.extrinsics), pixel_offset)
    elif out.points is not None:
        means = out.points
    else:
        raise ValueError("Gaussian centres need depth + cameras or points")
    scenes = []
    for i in range(b):
        pts, raw = means[i].reshape(-1, 3), params[i].reshape(-1, c)
        feats, conf = raw[:, :-1], raw[:, -1]
        opacity_factor = None
        if anysplat is not None:
            if (anysplat.render_conf or anysplat.opacity_conf) and out.depth_conf is None:
                raise ValueError("AnySplat's render_conf/opacity_conf need the depth head's confidence")
            depth_conf = out.depth_conf[i].reshape(-1).float() if out.depth_conf is not None else None
            keep = None
            if anysplat.render_conf or anysplat.opacity_conf:
                threshold = torch.quantile(depth_conf, anysplat.conf_threshold)
            if anysplat.render_conf:
                keep = depth_conf > threshold
            if anysplat.voxelize:
                pts, feats = voxel_merge(pts, feats, conf, anysplat.voxel_size, eps=1e-6)
            elif keep is not None:
                pts, feats = pts[keep], feats[keep]
            if anysplat.opacity_conf:
                factor = torch.sigmoid(depth_conf - threshold)
                opacity_factor = factor[keep] if keep is not None else factor
        elif voxel_size is not None:
            pts, feats = voxel_merge(pts, feats, conf, voxel_size)
        g = activate(pts, feats)
        if opacity_factor is not None:
            g.opacities = g.opacities * opacity_factor.to(g.opacities.dtype)
        if min_opacity > 0:
            g = g.select(g.opacities >= min_opacity)
        scenes.append(g)
    return scenes
