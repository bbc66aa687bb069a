"""Rewards on the 3D scene itself: do the Gaussians reproduce the video (consistency), and is the
representation sane (rendered depth agrees with the predicted depth, the views are covered, no
Gaussian larger than the scene)? Each returns one value per scene, higher is better."""

from __future__ import annotations

import torch
from torch import Tensor

from vist3a.splats.gaussians import Gaussians


def consistency_reward(renders: Tensor, frames: Tensor) -> Tensor:
    """Negative mean L1 between renders at the predicted cameras and the VAE-decoded frames of the same
    views: [B,V,3,H,W] each -> [B]. The frames are the target, so no gradient flows into them here."""
    if renders.shape != frames.shape:
        raise ValueError(f"renders {tuple(renders.shape)} and frames {tuple(frames.shape)} differ")
    return -(renders - frames.detach()).abs().flatten(1).mean(1)


def depth_agreement(rendered: Tensor, alpha: Tensor, predicted: Tensor, eps: float = 1e-6) -> Tensor:
    """Negative alpha-weighted |rendered - predicted| depth, relative to the mean predicted depth (scale-free):
    [B,V,H,W] each -> [B]. Pixels the splats leave empty carry no depth, hence the weights."""
    w = alpha.detach()
    err = (w * (rendered - predicted.detach()).abs()).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(eps)
    return -err / predicted.detach().flatten(1).mean(1).abs().clamp_min(eps)


def coverage(alpha: Tensor) -> Tensor:
    """Negative mean transparency of the renders [B,V,H,W] -> [B]: holes in the views cost reward."""
    return -(1.0 - alpha).flatten(1).mean(1)


def oversized_scales(gaussians: list[Gaussians], extent: Tensor, max_ratio: float = 0.05) -> Tensor:
    """Negative mean excess of each Gaussian's largest scale over `max_ratio` x the scene's extent
    (e.g. its median predicted depth) -> [B]. Huge, blurry splats can fake a good render from the
    predicted views and fall apart from any other; small ones cost nothing."""
    out = []
    for g, e in zip(gaussians, extent):
        ratio = g.scales.amax(-1) / e.detach().clamp_min(1e-6)
        out.append(torch.relu(ratio - max_ratio).mean())
    return -torch.stack(out)


def representation_reward(rendered_depth: Tensor, alpha: Tensor, predicted_depth: Tensor,
                          gaussians: list[Gaussians], max_scale_ratio: float = 0.05) -> dict[str, Tensor]:
    """The parts ({depth, coverage, scale}: [B] each) and their sum ("representation")."""
    extent = predicted_depth.detach().flatten(1).median(1).values
    parts = {"depth": depth_agreement(rendered_depth, alpha, predicted_depth),
             "coverage": coverage(alpha),
             "scale": oversized_scales(gaussians, extent, max_scale_ratio)}
    parts["representation"] = parts["depth"] + parts["coverage"] + parts["scale"]
    return parts
