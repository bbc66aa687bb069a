"""DINOv2-style patch encoder (ViT with registers), split so that it can be entered at any block.

Token layout per image: [cls, register x R, patches]. The cls token carries pos_embed[0], patches
carry pos_embed[1:], registers carry none. Blocks see the whole sequence; the encoder's output is
the final-normed patch tokens. The stitching cut "blocks.N" is the pre-norm output of block N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vist3a.recon.layers import Block, init_linear_


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, (H/p)*(W/p), C], row-major patches."""
        return self.proj(images).flatten(2).transpose(1, 2)


class PatchEncoder(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 num_registers: int, mlp_ratio: float):
        super().__init__()
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, eps=1e-6, ls_init=1.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_special = 1 + num_registers

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        init_linear_(self)

    def patch_pos_embed(self, h: int, w: int) -> Tensor:
        """Patch position embedding for an h x w grid (bicubic, antialiased resize of the stored grid)."""
        pos = self.pos_embed[:, 1:]
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", antialias=True).to(pos.dtype)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def special_tokens(self, n: int) -> Tensor:
        """The learned [cls + its position embedding, registers] that enter block 0: [n, 1+R, C]."""
        cls = self.cls_token + self.pos_embed[:, :1]
        return torch.cat([cls, self.register_tokens], dim=1).expand(n, -1, -1)

    def embed(self, images: Tensor) -> Tensor:
        """Normalised images [N, 3, H, W] -> block-0 input [N, 1+R+P, C]."""
        n, _, height, width = images.shape
        p = self.patch_embed.proj.kernel_size[0]
        patches = self.patch_embed(images) + self.patch_pos_embed(height // p, width // p)
        return torch.cat([self.special_tokens(n), patches], dim=1)

    def run_blocks(self, x: Tensor, start: int, stop: int) -> Tensor:
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def finish(self, x: Tensor) -> Tensor:
        """Last block's output [N, 1+R+P, C] -> normed patch tokens [N, P, C]."""
        return self.norm(x)[:, self.num_special:]
