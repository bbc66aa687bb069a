"""Transformer building blocks shared by the patch encoder, the aggregator and the camera head.

Sub-module names (norm1, attn.qkv, attn.q_norm, ls1.gamma, mlp.fc1, ...) follow the DINOv2 /
VGGT layout so that released checkpoints map onto them by key prefix alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RoPE2D:
    """2D rotary position embedding (VGGT flavour, no parameters).

    The first half of each head's channels is rotated by the token's row, the second half
    by its column; each half uses the rotate-half form with frequencies 1/base^(2i/half).
    """

    def __init__(self, base: float = 100.0):
        self.base = base

    def __call__(self, x: Tensor, pos: Tensor) -> Tensor:
        """x [N, heads, T, D], pos [N, T, 2] integer (row, col) -> x rotated, same shape."""
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat([self._rotate(rows, pos[..., 0]), self._rotate(cols, pos[..., 1])], dim=-1)

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        dim = x.shape[-1]
        inv_freq = 1.0 / self.base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
        angles = pos.to(torch.float32)[:, None, :, None] * inv_freq  # [N, 1, T, dim/2]
        angles = torch.cat([angles, angles], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        rotated_half = torch.cat([-x2, x1], dim=-1)
        return x * angles.cos().to(x.dtype) + rotated_half * angles.sin().to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False, rope: RoPE2D | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float = 1e-5, ls_init: float = 0.01,
                 qk_norm: bool = False, rope: RoPE2D | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, ls_init)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, ls_init)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


def init_linear_(module: nn.Module) -> None:
    """ViT initialisation for random weights: linear weights N(0, 0.02) truncated, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
