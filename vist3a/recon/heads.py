"""Prediction heads on the aggregator's layer outputs (2C channels, [camera, registers, patches]).

CameraHead: iterative pose refinement from the camera token of the last layer (VGGT).
DPTHead: dense per-pixel prediction from four aggregator layers (depth, points, and, with an
RGB input merger, AnySplat's pixel-aligned Gaussian parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vist3a.recon.layers import Block, Mlp, init_linear_

POSE_DIM = 9  # t (3), quaternion xyzw (4), fov_h, fov_w


class CameraHead(nn.Module):
    """Pose encoding from camera tokens [B, S, 2C]: `iters` adaLN-modulated trunk passes, each
    adding a delta to the running estimate (which is detached between passes, as in VGGT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, trunk_depth: int, iters: int):
        super().__init__()
        self.iters = iters
        self.token_norm = nn.LayerNorm(dim)
        self.trunk = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(trunk_depth)))
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.pose_branch = Mlp(dim, dim // 2, POSE_DIM)

    def reset_parameters(self) -> None:
        """Random weights that already give a sane camera: identity rotation, ~60 degree fov."""
        init_linear_(self)
        bias = torch.zeros(POSE_DIM, device=self.pose_branch.fc2.bias.device)
        bias[6] = 1.0
        bias[7:] = torch.pi / 3
        with torch.no_grad():
            self.pose_branch.fc2.bias.copy_(bias / self.iters)

    def forward(self, camera_tokens: Tensor) -> list[Tensor]:
        """[B, S, 2C] -> pose encodings [B, S, 9], one per iteration (fov through ReLU)."""
        tokens = self.token_norm(camera_tokens)
        b, s, _ = tokens.shape
        estimate = None
        encodings = []
        for _ in range(self.iters):
            if estimate is None:
                condition = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1))
            else:
                condition = self.embed_pose(estimate.detach())
            shift, scale, gate = self.poseLN_modulation(condition).chunk(3, dim=-1)
            x = tokens + gate * (self.adaln_norm(tokens) * (1 + scale) + shift)
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            estimate = delta if estimate is None else estimate.detach() + delta
            encodings.append(torch.cat([estimate[..., :7], F.relu(estimate[..., 7:])], dim=-1))
        return encodings


def uv_embedding(channels: int, h: int, w: int, aspect: float, like: Tensor) -> Tensor:
    """Parameter-free sin/cos embedding [channels, h, w] of a centred UV grid (omega0 100).

    The grid spans (-a, a) x (-1, 1)/sqrt(a^2+1) at cell centres (a = image aspect W/H); the first
    half of the channels encodes u, the second v, each as [sin, cos] of pos * 100^(-i/(n/2)).
    """
    diag = (aspect**2 + 1) ** 0.5
    su, sv = aspect / diag, 1 / diag
    u = torch.linspace(-su * (w - 1) / w, su * (w - 1) / w, w, dtype=torch.float64, device=like.device)
    v = torch.linspace(-sv * (h - 1) / h, sv * (h - 1) / h, h, dtype=torch.float64, device=like.device)
    half = channels // 2
    omega = 1.0 / 100.0 ** (torch.arange(half // 2, dtype=torch.float64, device=like.device) / (half / 2))

    def embed(coord: Tensor) -> Tensor:  # [n] -> [n, half]
        angles = coord[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    emb = torch.cat([embed(u)[None].expand(h, -1, -1), embed(v)[:, None].expand(-1, w, -1)], dim=-1)
    return emb.permute(2, 0, 1).to(like.dtype)


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))): the released weights were trained with an in-place
    ReLU, so the skip connection carries relu(x), not x."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FusionBlock(nn.Module):
    """Adds the lateral feature map (if any), refines, upsamples bilinearly, projects 1x1."""

    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, lateral: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.resConfUnit1 is not None:
            x = x + self.resConfUnit1(lateral)
        x = self.resConfUnit2(x)
        size = size or (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class DPTHead(nn.Module):
    """DPT decoder over aggregator layers `layers` -> [B, S, H, W, out_dim] (raw, no activation).

    rgb_merger=True adds AnySplat's 7x7 conv on the RGB frames before the last convolutions.
    """

    def __init__(self, dim_in: int, patch_size: int, out_dim: int, features: int,
                 out_channels: tuple[int, int, int, int], layers: tuple[int, int, int, int],
                 rgb_merger: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.layers = tuple(layers)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, oc, 1) for oc in out_channels)
        oc = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FusionBlock(features, has_residual=i != 4))
        half = features // 2
        hidden = half if rgb_merger else 32
        self.scratch.output_conv1 = nn.Conv2d(features, half, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(nn.Conv2d(half, hidden, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(hidden, out_dim, 1))
        self.input_merger = nn.Sequential(nn.Conv2d(3, half, 7, padding=3), nn.ReLU()) if rgb_merger else None

    def forward(self, layer_outputs: dict[int, Tensor], patch_start: int, grid: tuple[int, int],
                images: Tensor | None = None, frames_chunk: int | None = 8) -> Tensor:
        """Frames are independent here, so they are decoded `frames_chunk` at a time to bound memory."""
        s = next(iter(layer_outputs.values())).shape[1]
        step = frames_chunk or s
        chunks = [self._decode({i: t[:, a:a + step] for i, t in layer_outputs.items()}, patch_start, grid,
                               None if images is None else images[:, a:a + step])
                  for a in range(0, s, step)]
        return torch.cat(chunks, dim=1)

    def _decode(self, layer_outputs: dict[int, Tensor], patch_start: int, grid: tuple[int, int],
                images: Tensor | None) -> Tensor:
        h, w = grid
        height, width = h * self.patch_size, w * self.patch_size
        b, s = next(iter(layer_outputs.values())).shape[:2]
        feats = []
        for k, layer in enumerate(self.layers):
            x = self.norm(layer_outputs[layer][:, :, patch_start:].flatten(0, 1))
            x = self.projects[k](x.transpose(1, 2).reshape(b * s, -1, h, w))
            x = x + 0.1 * uv_embedding(x.shape[1], h, w, width / height, x)
            feats.append(self.resize_layers[k](x))
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(f) for i, f in enumerate(feats, start=1))
        x = sc.refinenet4(l4, size=l3.shape[-2:])
        x = sc.refinenet3(x, l3, size=l2.shape[-2:])
        x = sc.refinenet2(x, l2, size=l1.shape[-2:])
        x = sc.refinenet1(x, l1)
        x = F.interpolate(sc.output_conv1(x), size=(height, width), mode="bilinear", align_corners=True)
        if self.input_merger is not None:
            if images is None:
                raise ValueError("the Gaussian head needs the RGB frames")
            x = x + self.input_merger(images.flatten(0, 1))
        x = x + 0.1 * uv_embedding(x.shape[1], height, width, width / height, x)
        x = sc.output_conv2(x)
        return x.reshape(b, s, *x.shape[1:]).permute(0, 1, 3, 4, 2)


def split_activate(raw: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Raw DPT output [..., D+1] -> (prediction [..., D], confidence 1 + exp(c) [...]).

    kind "depth": exp (positive); "points": sign(x) * expm1(|x|) (inverse log, any sign)."""
    x, conf = raw[..., :-1], raw[..., -1]
    pred = x.exp() if kind == "depth" else torch.sign(x) * torch.expm1(x.abs())
    return pred, 1 + conf.exp()
