"""The scene and camera containers every module exchanges, plus camera-building helpers.

Conventions (the same as gsplat's and the INRIA .ply's, so no module converts twice):
quaternions are w,x,y,z; scales are linear; opacities are probabilities; colours are
spherical-harmonic coefficients with RGB = 0.5 + SH_C0 * sh[:, 0]; cameras are OpenCV
(x right, y down, z forward) world-to-camera matrices with pixel intrinsics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814  # the degree-0 real SH basis value, 1 / (2 sqrt(pi))


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """DC SH coefficient whose rendered colour (0.5 + C0 * dc) is `rgb`."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """View-independent colour of a DC SH coefficient (before gsplat's clamp at 0)."""
    return sh0 * SH_C0 + 0.5


def num_sh_coeffs(degree: int) -> int:
    return (degree + 1) ** 2


def sh_degree_of(num_coeffs: int) -> int:
    """SH degree from a coefficient count K = (d+1)^2; refuses counts that are not squares."""
    degree = math.isqrt(num_coeffs) - 1
    if degree < 0 or (degree + 1) ** 2 != num_coeffs:
        raise ValueError(f"{num_coeffs} SH coefficients is not (d+1)^2 for any degree d")
    return degree


@dataclass
class Gaussians:
    """One scene of N 3D Gaussians (see the module docstring for the conventions)."""

    means: Tensor  # [N,3] world coordinates
    quats: Tensor  # [N,4] w,x,y,z, normalised on use
    scales: Tensor  # [N,3] linear, positive
    opacities: Tensor  # [N] in [0,1]
    sh: Tensor  # [N,K,3], K = (d+1)^2, sh[:, 0] is the DC term

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Gaussians.{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.sh.dim() != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
            raise ValueError(f"Gaussians.sh has shape {tuple(self.sh.shape)}, expected ({n}, K, 3)")
        sh_degree_of(self.sh.shape[1])

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num(self) -> int:
        return self.means.shape[0]

    def __len__(self) -> int:
        return self.num

    @property
    def sh_degree(self) -> int:
        return sh_degree_of(self.sh.shape[1])

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def rgb(self) -> Tensor:
        """View-independent colour [N,3] from the DC term, clamped to [0,1]."""
        return sh0_to_rgb(self.sh[:, 0]).clamp(0.0, 1.0)

    def to(self, *args, **kwargs) -> "Gaussians":
        return Gaussians(**{k: v.to(*args, **kwargs) for k, v in self._tensors().items()})

    def detach(self) -> "Gaussians":
        return Gaussians(**{k: v.detach() for k, v in self._tensors().items()})

    def select(self, mask_or_index: Tensor | Sequence[int] | slice) -> "Gaussians":
        """Subset by boolean mask, index tensor/list or slice."""
        idx = mask_or_index
        if not isinstance(idx, (Tensor, slice)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, Tensor):
            idx = idx.to(self.device)
        return Gaussians(**{k: v[idx] for k, v in self._tensors().items()})

    def bbox(self) -> tuple[Tensor, Tensor]:
        """Axis-aligned bounds (min [3], max [3]) of the centres."""
        if self.num == 0:
            raise ValueError("bbox of an empty Gaussians")
        return self.means.amin(dim=0), self.means.amax(dim=0)

    @staticmethod
    def cat(items: Sequence["Gaussians"]) -> "Gaussians":
        """Concatenate scenes; SH is padded with zeros to the highest degree among them."""
        if not items:
            raise ValueError("Gaussians.cat needs at least one item")
        degree = max(g.sh_degree for g in items)
        items = [g.with_sh_degree(degree) for g in items]
        names = [f.name for f in fields(Gaussians)]
        return Gaussians(**{k: torch.cat([getattr(g, k) for g in items], dim=0) for k in names})

    def with_sh_degree(self, degree: int) -> "Gaussians":
        """Same scene with SH truncated to, or zero-padded up to, `degree`."""
        if degree < 0:
            raise ValueError(f"SH degree must be >= 0, got {degree}")
        k = num_sh_coeffs(degree)
        have = self.sh.shape[1]
        if k == have:
            return self
        if k < have:
            sh = self.sh[:, :k]
        else:
            pad = self.sh.new_zeros(self.num, k - have, 3)
            sh = torch.cat([self.sh, pad], dim=1)
        return Gaussians(self.means, self.quats, self.scales, self.opacities, sh)

    @staticmethod
    def empty(sh_degree: int = 0, device: torch.device | str | None = None) -> "Gaussians":
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return Gaussians(z(0, 3), z(0, 4), z(0, 3), z(0), z(0, num_sh_coeffs(sh_degree), 3))


@dataclass
class Cameras:
    """C pinhole cameras sharing one image size; OpenCV axes, world-to-camera, pixel K."""

    viewmats: Tensor  # [C,4,4]
    Ks: Tensor  # [C,3,3]
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.viewmats.dim() != 3 or tuple(self.viewmats.shape[1:]) != (4, 4):
            raise ValueError(f"Cameras.viewmats has shape {tuple(self.viewmats.shape)}, expected (C, 4, 4)")
        if tuple(self.Ks.shape) != (self.viewmats.shape[0], 3, 3):
            raise ValueError(f"Cameras.Ks has shape {tuple(self.Ks.shape)}, expected ({self.viewmats.shape[0]}, 3, 3)")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)

    @property
    def num(self) -> int:
        return self.viewmats.shape[0]

    def __len__(self) -> int:
        return self.num

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @property
    def centers(self) -> Tensor:
        """Camera centres in world coordinates [C,3] (-R^T t)."""
        rot = self.viewmats[:, :3, :3]
        t = self.viewmats[:, :3, 3]
        return -(rot.transpose(1, 2) @ t[..., None])[..., 0]

    def to(self, *args, **kwargs) -> "Cameras":
        return Cameras(self.viewmats.to(*args, **kwargs), self.Ks.to(*args, **kwargs), self.width, self.height)

    def select(self, index: Tensor | Sequence[int] | slice | int) -> "Cameras":
        if isinstance(index, int):
            index = [index]
        if not isinstance(index, (Tensor, slice)):
            index = torch.as_tensor(index, dtype=torch.long)
        return Cameras(self.viewmats[index], self.Ks[index], self.width, self.height)

    def to_json(self) -> dict:
        """Plain lists and ints, ready for json.dumps."""
        return {
            "convention": "opencv_world_to_camera",
            "width": self.width,
            "height": self.height,
            "viewmats": self.viewmats.detach().cpu().double().tolist(),
            "Ks": self.Ks.detach().cpu().double().tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Cameras":
        convention = d.get("convention", "opencv_world_to_camera")
        if convention != "opencv_world_to_camera":
            raise ValueError(f"unsupported camera convention {convention!r}")
        viewmats = torch.tensor(d["viewmats"], dtype=torch.float32).reshape(-1, 4, 4)
        Ks = torch.tensor(d["Ks"], dtype=torch.float32).reshape(-1, 3, 3)
        return cls(viewmats, Ks, int(d["width"]), int(d["height"]))


def look_at(eye: Tensor, target: Tensor, up: Tensor | Sequence[float] = (0.0, -1.0, 0.0)) -> Tensor:
    """OpenCV world-to-camera matrix [...,4,4] of a camera at `eye` looking at `target`.

    The image's y axis points against `up` (default up is -y, the world of VGGT-style
    reconstructions, whose world frame is the first camera's OpenCV frame).
    """
    eye = torch.as_tensor(eye)
    eye = eye if eye.is_floating_point() else eye.float()
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device)
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up, dim=-1)
    if bool((right.norm(dim=-1) < 1e-8).any()):
        raise ValueError("look_at: viewing direction is parallel to `up`")
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    rot = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world coordinates
    viewmat = torch.zeros(eye.shape[:-1] + (4, 4), dtype=eye.dtype, device=eye.device)
    viewmat[..., :3, :3] = rot
    viewmat[..., :3, 3] = -(rot @ eye[..., None])[..., 0]
    viewmat[..., 3, 3] = 1.0
    return viewmat


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> Tensor:
    """Pixel K [3,3] for a horizontal field of view, square pixels, centred principal point."""
    focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor(
        [[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float32
    )
