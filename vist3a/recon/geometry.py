"""Camera geometry for the reconstruction network (OpenCV axes: x right, y down, z forward).

Pose encoding (VGGT): [t (3), rotation quaternion x,y,z,w (4), fov_h, fov_w] of the
world-to-camera transform; intrinsics have the principal point at the image centre.
Pixel (row i, col j) covers [j, j+1) x [i, i+1); its centre (j+0.5, i+0.5) is the ray we
unproject, the same convention as gsplat's rasteriser. AnySplat's code differs in two places that
change its outputs, so its weights are run with them (`ReconConfig.conventions = "anysplat"`):
focal = (size/2) / (tan(fov/2) + 1e-3), and depth unprojected at integer pixel coordinates (corners).
"""

from __future__ import annotations

import torch
from torch import Tensor


def quat_to_mat(quat: Tensor) -> Tensor:
    """Quaternion x,y,z,w [..., 4] (any norm) -> rotation matrix [..., 3, 3]."""
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    m = torch.stack([
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ], dim=-1)
    return m.reshape(*quat.shape[:-1], 3, 3)


def mat_to_quat(mat: Tensor) -> Tensor:
    """Rotation matrix [..., 3, 3] -> unit quaternion x,y,z,w [..., 4] with w >= 0.

    Each of the four standard formulas divides by one component; we use, per matrix, the one
    whose divisor is largest, which keeps the result accurate for every rotation.
    """
    m = mat.unbind(-2)  # rows
    m00, m01, m02 = m[0].unbind(-1)
    m10, m11, m12 = m[1].unbind(-1)
    m20, m21, m22 = m[2].unbind(-1)
    four_sq = torch.stack([1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22, 1 + m00 + m11 + m22], -1)
    root = four_sq.clamp_min(1e-12).sqrt()  # 2|x|, 2|y|, 2|z|, 2|w| of the respective case
    rx, ry, rz, rw = root.unbind(-1)
    candidates = torch.stack([
        torch.stack([rx * rx, m01 + m10, m02 + m20, m21 - m12], -1) / (2 * rx[..., None]),
        torch.stack([m01 + m10, ry * ry, m12 + m21, m02 - m20], -1) / (2 * ry[..., None]),
        torch.stack([m02 + m20, m12 + m21, rz * rz, m10 - m01], -1) / (2 * rz[..., None]),
        torch.stack([m21 - m12, m02 - m20, m10 - m01, rw * rw], -1) / (2 * rw[..., None]),
    ], dim=-2)  # [..., case, xyzw]
    best = four_sq.argmax(-1)[..., None, None].expand(*four_sq.shape[:-1], 1, 4)
    quat = candidates.gather(-2, best).squeeze(-2)
    quat = torch.where(quat[..., 3:] < 0, -quat, quat)
    return quat / quat.norm(dim=-1, keepdim=True)


def rigid_inverse(transform: Tensor) -> Tensor:
    """Inverse of rigid 4x4 transforms [..., 4, 4] (R^T, -R^T t)."""
    rot_t = transform[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(transform)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ transform[..., :3, 3:]).squeeze(-1)
    out[..., 3, 3] = 1
    return out


def pose_encoding_to_extri_intri(pose_enc: Tensor, image_hw: tuple[int, int], focal_eps: float = 0.0
                                ) -> tuple[Tensor, Tensor]:
    """Pose encoding [..., 9] -> (world-to-camera [..., 4, 4], pixel intrinsics [..., 3, 3]) at image_hw.

    fov is clamped at 1e-4 rad so a degenerate prediction gives a huge focal length, not inf;
    `focal_eps` is added to tan(fov/2) (AnySplat: 1e-3).
    """
    height, width = image_hw
    extrinsics = torch.zeros(*pose_enc.shape[:-1], 4, 4, dtype=pose_enc.dtype, device=pose_enc.device)
    extrinsics[..., :3, :3] = quat_to_mat(pose_enc[..., 3:7])
    extrinsics[..., :3, 3] = pose_enc[..., :3]
    extrinsics[..., 3, 3] = 1
    fov = pose_enc[..., 7:9].clamp_min(1e-4)
    intrinsics = torch.zeros(*pose_enc.shape[:-1], 3, 3, dtype=pose_enc.dtype, device=pose_enc.device)
    intrinsics[..., 0, 0] = (width / 2) / (torch.tan(fov[..., 1] / 2) + focal_eps)
    intrinsics[..., 1, 1] = (height / 2) / (torch.tan(fov[..., 0] / 2) + focal_eps)
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """World-to-camera [..., 3 or 4, 4] and pixel intrinsics [..., 3, 3] -> pose encoding [..., 9]."""
    height, width = image_hw
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1)


def unproject_depth(depth: Tensor, intrinsics: Tensor, cam_to_world: Tensor, pixel_offset: float = 0.5) -> Tensor:
    """Depth maps [..., H, W] (z along the optical axis) -> world points [..., H, W, 3] at pixel centres
    (`pixel_offset` 0.5; AnySplat: 0, the pixel corners)."""
    height, width = depth.shape[-2:]
    v, u = torch.meshgrid(torch.arange(height, dtype=depth.dtype, device=depth.device) + pixel_offset,
                          torch.arange(width, dtype=depth.dtype, device=depth.device) + pixel_offset, indexing="ij")
    k = intrinsics[..., None, None, :, :]
    x = (u - k[..., 0, 2]) / k[..., 0, 0] * depth
    y = (v - k[..., 1, 2]) / k[..., 1, 1] * depth
    cam = torch.stack([x, y, depth], dim=-1)
    rot, trans = cam_to_world[..., None, None, :3, :3], cam_to_world[..., None, None, :3, 3]
    return (rot @ cam[..., None]).squeeze(-1) + trans
