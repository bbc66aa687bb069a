"""Rendering Gaussians to images: gsplat on CUDA, a pure-PyTorch rasterizer everywhere else.

Both backends take the same inputs (OpenCV world-to-camera viewmats, pixel intrinsics) and
follow gsplat's "classic" rasterization rules, so CPU tests, CPU previews and GPU training see
the same images. The torch backend is dense per tile rather than per Gaussian-pixel pair, is
differentiable through autograd, and keeps memory bounded by compositing 16x16 pixel tiles
(recomputed in backward via activation checkpointing when gradients are needed).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vist3a.splats.gaussians import SH_C0, Cameras, Gaussians

Backend = Literal["auto", "torch", "gsplat"]

# gsplat "classic" constants
EPS2D = 0.3  # isotropic blur added to every 2D covariance (pixels^2)
ALPHA_MIN = 1.0 / 255.0  # contributions below this are skipped
ALPHA_MAX = 0.999  # per-Gaussian alpha cap
T_MIN = 1e-4  # a pixel stops once its transmittance would fall to this
FRUSTUM_MARGIN = 0.3  # Jacobian clamp widens the frustum by this fraction of tan(fov/2)
MAX_EXTEND = 3.33  # bounding-box half-size in standard deviations

TILE = 16  # pixel tile side of the torch backend
DEPTH_CHUNK = 256  # Gaussians composited per step inside a tile (early exit between steps)
CHECKPOINT_MIN_PAIRS = 1 << 20  # tiles with more pixel-Gaussian pairs recompute in backward


@dataclass
class RenderOutput:
    colors: Tensor  # [C,H,W,3], background blended in
    alphas: Tensor  # [C,H,W,1], 1 - final transmittance
    depths: Tensor | None  # [C,H,W,1] expected z-depth sum(w z) / sum(w), or None


# ----------------------------------------------------------------------------- geometry


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [...,3,3] from w,x,y,z quaternions (normalised here)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


def covariances(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariances R S S^T R^T [N,3,3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


# ----------------------------------------------------------------------------- spherical harmonics


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis [..., (degree+1)^2] at unit directions, in the 3DGS/gsplat sign convention.

    Index l^2 + l + m; the convention keeps the Condon-Shortley phase, i.e. the usual real-SH
    table times (-1)^m (degree 1 is -C1 y, C1 z, -C1 x).
    """
    if not 0 <= degree <= 4:
        raise ValueError(f"SH degree must be in 0..4, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        c1 = 0.4886025119029199  # sqrt(3 / 4pi)
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.31539156525252005 * (3 * zz - 1),
            -1.0925484305920792 * x * z,
            0.5462742152960396 * (xx - yy),
        ]
    if degree >= 3:
        out += [
            -0.5900435899266435 * y * (3 * xx - yy),
            2.890611442640554 * x * y * z,
            -0.4570457994644658 * y * (5 * zz - 1),
            0.3731763325901154 * z * (5 * zz - 3),
            -0.4570457994644658 * x * (5 * zz - 1),
            1.445305721320277 * z * (xx - yy),
            -0.5900435899266435 * x * (xx - 3 * yy),
        ]
    if degree >= 4:
        out += [
            2.5033429417967046 * x * y * (xx - yy),
            -1.7701307697799304 * y * z * (3 * xx - yy),
            0.9461746957575601 * x * y * (7 * zz - 1),
            -0.6690465435572892 * y * z * (7 * zz - 3),
            0.10578554691520431 * (35 * zz * zz - 30 * zz + 3),
            -0.6690465435572892 * x * z * (7 * zz - 3),
            0.47308734787878004 * (xx - yy) * (7 * zz - 1),
            -1.7701307697799304 * x * z * (xx - 3 * yy),
            0.6258357354491761 * (xx * (xx - 3 * yy) - yy * (3 * xx - yy)),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(sh: Tensor, dirs: Tensor) -> Tensor:
    """Raw SH value [...,3] of coefficients [...,K,3] along directions [...,3] (normalised here)."""
    degree = math.isqrt(sh.shape[-2]) - 1
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))
    return (basis[..., None] * sh).sum(dim=-2)


def sh_colors(sh: Tensor, means: Tensor, camera_center: Tensor) -> Tensor:
    """Per-Gaussian RGB [N,3] seen from one camera centre, as gsplat computes it (eval + 0.5, >= 0)."""
    if sh.shape[-2] == 1:
        return (sh[:, 0] * SH_C0 + 0.5).clamp_min(0.0)
    return (eval_sh(sh, means - camera_center) + 0.5).clamp_min(0.0)


# ----------------------------------------------------------------------------- entry point


def render(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Tensor | None = None,
    backend: Backend = "auto",
    render_depth: bool = False,
    near: float = 0.01,
    far: float = 1e10,
) -> RenderOutput:
    """Render every camera. `background` is [3] or [C,3] (black when None).

    "auto" uses gsplat when the Gaussians are on CUDA and gsplat imports, else the torch backend.
    """
    device, dtype = gaussians.device, gaussians.dtype
    cameras = cameras.to(device=device, dtype=dtype)
    num_cams = cameras.num
    if background is None:
        bg = torch.zeros(num_cams, 3, device=device, dtype=dtype)
    else:
        bg = torch.as_tensor(background, device=device, dtype=dtype)
        bg = bg.expand(num_cams, 3) if bg.dim() == 1 else bg
        if tuple(bg.shape) != (num_cams, 3):
            raise ValueError(f"background must be [3] or [{num_cams},3], got {tuple(bg.shape)}")

    if backend == "auto":
        backend = "gsplat" if device.type == "cuda" and _gsplat_importable() else "torch"
    if gaussians.num == 0:
        return _empty_render(cameras, bg, render_depth)
    if backend == "gsplat":
        return _render_gsplat(gaussians, cameras, bg, render_depth, near, far)
    if backend == "torch":
        return _render_torch(gaussians, cameras, bg, render_depth, near, far)
    raise ValueError(f"unknown render backend {backend!r} (auto, torch, gsplat)")


def _gsplat_importable() -> bool:
    try:
        import gsplat  # noqa: F401
    except Exception as exc:  # a broken install must not stop GPU rendering
        warnings.warn(f"gsplat unavailable ({exc}); using the torch renderer on CUDA")
        return False
    return True


def _empty_render(cameras: Cameras, bg: Tensor, render_depth: bool) -> RenderOutput:
    c, h, w = cameras.num, cameras.height, cameras.width
    colors = bg[:, None, None, :].expand(c, h, w, 3).clone()
    alphas = bg.new_zeros(c, h, w, 1)
    return RenderOutput(colors, alphas, bg.new_zeros(c, h, w, 1) if render_depth else None)


# ----------------------------------------------------------------------------- gsplat backend


def _render_gsplat(g: Gaussians, cams: Cameras, bg: Tensor, render_depth: bool, near: float, far: float) -> RenderOutput:
    from gsplat import rasterization  # lazy: importing gsplat is slow and it JIT-compiles CUDA

    out, alphas, _ = rasterization(
        means=g.means,
        quats=g.quats,
        scales=g.scales,
        opacities=g.opacities,
        colors=g.sh,
        viewmats=cams.viewmats,
        Ks=cams.Ks,
        width=cams.width,
        height=cams.height,
        near_plane=near,
        far_plane=far,
        sh_degree=g.sh_degree,
        packed=False,
        backgrounds=bg,
        render_mode="RGB+ED" if render_depth else "RGB",
        rasterize_mode="classic",
    )
    depths = out[..., 3:4] if render_depth else None
    return RenderOutput(out[..., :3], alphas, depths)


# ----------------------------------------------------------------------------- torch backend


@dataclass
class _Projected:
    """Visible Gaussians of one camera, sorted front to back."""

    means2d: Tensor  # [M,2] pixels
    conics: Tensor  # [M,3] inverse 2D covariance (a, b, c): sigma = 0.5(a dx^2 + c dy^2) + b dx dy
    opacities: Tensor  # [M]
    feats: Tensor  # [M,D] rgb (+ z when depth is rendered)
    half_extent: Tensor  # [M,2] bounding-box half sizes in pixels (no gradient)


def _project(g: Gaussians, viewmat: Tensor, K: Tensor, width: int, height: int,
             near: float, far: float, with_depth: bool, cov_world: Tensor) -> _Projected:
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    p = g.means @ rot.T + trans
    x, y, z = p.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    # cheap culls first so the rest only touches Gaussians that can be seen
    keep = (z >= near) & (z <= far) & (g.opacities >= ALPHA_MIN)
    idx = keep.nonzero()[:, 0]
    x, y, z, p = x[idx], y[idx], z[idx], p[idx]

    cov_cam = rot @ cov_world[idx] @ rot.T
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + FRUSTUM_MARGIN * tan_x, cx / fx + FRUSTUM_MARGIN * tan_x
    lim_y_pos, lim_y_neg = (height - cy) / fy + FRUSTUM_MARGIN * tan_y, cy / fy + FRUSTUM_MARGIN * tan_y
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], -1).reshape(-1, 2, 3)
    cov2d = jac @ cov_cam @ jac.transpose(1, 2)
    a = cov2d[:, 0, 0] + EPS2D
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + EPS2D
    det = a * c - b * b
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    opac = g.opacities[idx]

    with torch.no_grad():
        # opacity-aware box: outside it o*exp(-sigma) < 1/255 at every pixel centre
        extend = torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp(max=MAX_EXTEND)
        half = torch.stack([extend * a.clamp_min(0).sqrt(), extend * c.clamp_min(0).sqrt()], -1) + 1e-3
        inside = ((means2d[:, 0] + half[:, 0] > 0) & (means2d[:, 0] - half[:, 0] < width)
                  & (means2d[:, 1] + half[:, 1] > 0) & (means2d[:, 1] - half[:, 1] < height))
        visible = (det > 0) & inside
        order = torch.sort(z.masked_fill(~visible, math.inf), stable=True).indices[: int(visible.sum())]

    det_safe = det[order]
    conics = torch.stack([c[order] / det_safe, -b[order] / det_safe, a[order] / det_safe], -1)
    src = idx[order]
    feats = sh_colors(g.sh[src], g.means[src], -(rot.T @ trans))
    if with_depth:
        feats = torch.cat([feats, z[order, None]], -1)
    return _Projected(means2d[order], conics, opac[order], feats, half[order])


def _composite(px: Tensor, py: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor,
               feats: Tensor) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of depth-sorted Gaussians at pixel centres (px, py) [P].

    Returns accumulated features [P,D] and final transmittance [P]. The early stop (a pixel ends
    before the Gaussian that would take T to <= 1e-4) is a mask rather than a loop: transmittance
    only decreases along the sorted order, so every Gaussian after the stop is masked too.
    """
    num_pix = px.shape[0]
    acc = feats.new_zeros(num_pix, feats.shape[1])
    trans = feats.new_ones(num_pix)
    done = torch.zeros(num_pix, dtype=torch.bool, device=px.device)
    for start in range(0, means2d.shape[0], DEPTH_CHUNK):
        sl = slice(start, start + DEPTH_CHUNK)
        dx = px[:, None] - means2d[None, sl, 0]
        dy = py[:, None] - means2d[None, sl, 1]
        ca, cb, cc = conics[sl].unbind(-1)
        sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        alpha = (opacities[sl] * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
        one_minus = 1.0 - alpha
        cum = torch.cumprod(one_minus, dim=1)
        t_after = trans[:, None] * cum
        live = (t_after > T_MIN) & ~done[:, None]
        t_before = trans[:, None] * torch.cat([torch.ones_like(cum[:, :1]), cum[:, :-1]], dim=1)
        weights = torch.where(live, alpha * t_before, torch.zeros_like(alpha))
        acc = acc + weights @ feats[sl]
        trans = trans * torch.where(live, one_minus, torch.ones_like(one_minus)).prod(dim=1)
        done = done | ~live[:, -1]
        if bool(done.all()):
            break
    return acc, trans


def _render_camera(proj: _Projected, width: int, height: int, use_checkpoint: bool) -> tuple[Tensor, Tensor]:
    """Image of accumulated features [H,W,D] and transmittance [H,W] of one camera, tile by tile."""
    dev, dt = proj.feats.device, proj.feats.dtype
    d = proj.feats.shape[1]
    lo = proj.means2d.detach() - proj.half_extent
    hi = proj.means2d.detach() + proj.half_extent
    rows_acc, rows_t = [], []
    for y0 in range(0, height, TILE):
        y1 = min(y0 + TILE, height)
        in_row = ((hi[:, 1] >= y0 + 0.5) & (lo[:, 1] <= y1 - 0.5)).nonzero()[:, 0]
        tiles_acc, tiles_t = [], []
        for x0 in range(0, width, TILE):
            x1 = min(x0 + TILE, width)
            sel = in_row[(hi[in_row, 0] >= x0 + 0.5) & (lo[in_row, 0] <= x1 - 0.5)]
            if sel.numel() == 0:
                tiles_acc.append(torch.zeros(y1 - y0, x1 - x0, d, device=dev, dtype=dt))
                tiles_t.append(torch.ones(y1 - y0, x1 - x0, device=dev, dtype=dt))
                continue
            ys = torch.arange(y0, y1, device=dev, dtype=dt) + 0.5
            xs = torch.arange(x0, x1, device=dev, dtype=dt) + 0.5
            py, px = torch.meshgrid(ys, xs, indexing="ij")
            args = (px.reshape(-1), py.reshape(-1), proj.means2d[sel], proj.conics[sel],
                    proj.opacities[sel], proj.feats[sel])
            if use_checkpoint and sel.numel() * px.numel() > CHECKPOINT_MIN_PAIRS:
                acc, trans = checkpoint(_composite, *args, use_reentrant=False)
            else:
                acc, trans = _composite(*args)
            tiles_acc.append(acc.reshape(y1 - y0, x1 - x0, d))
            tiles_t.append(trans.reshape(y1 - y0, x1 - x0))
        rows_acc.append(torch.cat(tiles_acc, dim=1))
        rows_t.append(torch.cat(tiles_t, dim=1))
    return torch.cat(rows_acc, dim=0), torch.cat(rows_t, dim=0)


def _render_torch(g: Gaussians, cams: Cameras, bg: Tensor, render_depth: bool, near: float, far: float) -> RenderOutput:
    use_checkpoint = torch.is_grad_enabled() and any(
        t.requires_grad for t in (g.means, g.quats, g.scales, g.opacities, g.sh, cams.viewmats, cams.Ks, bg)
    )
    cov_world = covariances(g.quats, g.scales)
    colors, alphas, depths = [], [], []
    for ci in range(cams.num):
        proj = _project(g, cams.viewmats[ci], cams.Ks[ci], cams.width, cams.height, near, far, render_depth, cov_world)
        acc, trans = _render_camera(proj, cams.width, cams.height, use_checkpoint)
        alpha = 1.0 - trans
        colors.append(acc[..., :3] + trans[..., None] * bg[ci])
        alphas.append(alpha[..., None])
        if render_depth:
            depths.append(acc[..., 3:4] / alpha[..., None].clamp_min(1e-10))
    return RenderOutput(torch.stack(colors), torch.stack(alphas), torch.stack(depths) if render_depth else None)


__all__ = [
    "RenderOutput", "render", "quat_to_rotmat", "covariances", "sh_basis", "eval_sh", "sh_colors",
]
