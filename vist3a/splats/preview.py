"""Preview images of a scene: an orbit of cameras around it, rendered and tiled into one PNG.

The orbit is centred on the median of the Gaussian centres and sized from their spread
(robust to the stray far-away Gaussians that reconstructions produce at depth edges and sky).
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import torch
from PIL import Image

from vist3a.splats.gaussians import Cameras, Gaussians, intrinsics_from_fov, look_at
from vist3a.splats.render import Backend, render

WHITE = (1.0, 1.0, 1.0)
SPREAD_QUANTILE = 0.9  # fraction of Gaussians the view is sized to hold
FRAME_MARGIN = 1.25  # the view holds a sphere this much larger, so splats at the rim fit too
MAX_QUANTILE_SAMPLES = 1 << 20  # torch.quantile refuses very large inputs; subsample above this


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def scene_center_radius(gaussians: Gaussians) -> tuple[torch.Tensor, float]:
    """Median centre and the radius around it that holds SPREAD_QUANTILE of the centres."""
    means = gaussians.means.detach().float().cpu()
    if means.shape[0] > MAX_QUANTILE_SAMPLES:
        step = math.ceil(means.shape[0] / MAX_QUANTILE_SAMPLES)
        means = means[::step]
    center = means.median(dim=0).values
    dist = (means - center).norm(dim=1)
    radius = float(torch.quantile(dist, SPREAD_QUANTILE)) if dist.numel() > 1 else 0.0
    return center, max(radius, 1e-3)


def orbit_cameras(
    gaussians: Gaussians,
    n_views: int,
    size: int | tuple[int, int],
    fov_deg: float = 50.0,
    elevation_deg: float = 20.0,
    up: Sequence[float] = (0.0, -1.0, 0.0),
) -> Cameras:
    """`n_views` cameras evenly spaced in azimuth around the scene, looking at its centre.

    View 0 sits on the -z side of the centre (where the first input camera of a VGGT-style
    reconstruction looks from); `size` is an int or (width, height); fov is horizontal.
    """
    if gaussians.num == 0:
        raise ValueError("cannot place preview cameras around an empty scene")
    width, height = _size(size)
    center, radius = scene_center_radius(gaussians)
    up_t = torch.nn.functional.normalize(torch.tensor(up, dtype=torch.float32), dim=0)
    back = torch.tensor([0.0, 0.0, -1.0])
    back = back - (back @ up_t) * up_t
    if back.norm() < 1e-6:  # up is along z: start from -x instead
        back = torch.tensor([-1.0, 0.0, 0.0]) - up_t[0] * up_t
    back = back / back.norm()
    side = torch.linalg.cross(up_t, back)
    # a sphere of FRAME_MARGIN * radius fits the narrower field of view at this distance
    half_fov = math.atan(math.tan(math.radians(fov_deg) / 2) * min(1.0, height / width))
    distance = FRAME_MARGIN * radius / math.sin(half_fov)
    elev = math.radians(elevation_deg)
    az = torch.arange(n_views, dtype=torch.float32) * (2 * math.pi / max(n_views, 1))
    dirs = (math.cos(elev) * (torch.cos(az)[:, None] * back + torch.sin(az)[:, None] * side)
            + math.sin(elev) * up_t)
    eyes = center + distance * dirs
    viewmats = look_at(eyes, center.expand_as(eyes), up_t.expand_as(eyes))
    Ks = intrinsics_from_fov(fov_deg, width, height).expand(n_views, 3, 3).clone()
    return Cameras(viewmats, Ks, width, height)


def to_pil(image: torch.Tensor) -> Image.Image:
    """PIL RGB image of an [H,W,3] tensor in [0,1]."""
    arr = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def render_previews(
    gaussians: Gaussians,
    n_views: int,
    size: int | tuple[int, int],
    background: Sequence[float] | torch.Tensor = WHITE,
    backend: Backend = "auto",
    fov_deg: float = 50.0,
    elevation_deg: float = 20.0,
) -> list[Image.Image]:
    """Orbit renders of the scene as PIL images (no gradients)."""
    if n_views == 0:
        return []
    cams = orbit_cameras(gaussians, n_views, size, fov_deg=fov_deg, elevation_deg=elevation_deg)
    bg = torch.as_tensor(background, dtype=torch.float32)
    out = render(gaussians.detach(), cams, background=bg, backend=backend)
    return [to_pil(img) for img in out.colors]


def save_preview_grid(images: Sequence[Image.Image], path: str | os.PathLike | None = None,
                      columns: int | None = None) -> Image.Image:
    """Tile images (row-major, near-square grid, white where a row is short) into one image; save as PNG if `path`."""
    if not images:
        raise ValueError("no images to tile")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    if path is not None:
        grid.save(os.fspath(path), format="PNG")
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["orbit_cameras", "render_previews", "save_preview_grid", "png_bytes", "to_pil", "scene_center_radius"]
