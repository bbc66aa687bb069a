"""VGGT's alternating-attention aggregator: per-frame and all-frame attention, layer after layer.

Each frame's tokens are [camera, register x R, patches]; frame 0 gets its own learned camera and
register tokens (index 0), the other frames share index 1, which is how the network knows which
camera defines the world frame. Layer i outputs concat(frame-block_i, global-block_i) -> 2C.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vist3a.recon.encoder import PatchEncoder
from vist3a.recon.layers import Block, RoPE2D, init_linear_

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_and_rest(token: Tensor, b: int, s: int) -> Tensor:
    """[1, 2, T, C] learned tokens -> [b*s, T, C]: index 0 for frame 0, index 1 for the others."""
    first = token[:, :1].expand(b, 1, -1, -1)
    rest = token[:, 1:].expand(b, s - 1, -1, -1)
    return torch.cat([first, rest], dim=1).flatten(0, 1)


def token_positions(h: int, w: int, num_special: int, device: torch.device) -> Tensor:
    """RoPE positions [num_special + h*w, 2]: patches (row+1, col+1) row-major, special tokens (0, 0)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    patch = torch.stack([rows, cols], dim=-1).reshape(-1, 2) + 1
    return torch.cat([torch.zeros(num_special, 2, dtype=patch.dtype, device=device), patch])


class Aggregator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.embed_dim
        self.patch_embed = PatchEncoder(cfg.img_size, cfg.patch_size, dim, cfg.encoder_depth, cfg.encoder_heads,
                                        cfg.num_registers, cfg.mlp_ratio)
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_registers, dim))
        self.rope = RoPE2D(100.0)
        make = lambda: Block(dim, cfg.aggregator_heads, cfg.mlp_ratio, qk_norm=True, rope=self.rope)  # noqa: E731
        self.frame_blocks = nn.ModuleList(make() for _ in range(cfg.aggregator_depth))
        self.global_blocks = nn.ModuleList(make() for _ in range(cfg.aggregator_depth))
        self.patch_start_idx = 1 + cfg.num_registers
        # Non-persistent: part of the computation, not of the checkpoint.
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def reset_parameters(self) -> None:
        init_linear_(self)
        self.patch_embed.reset_parameters()
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

    def normalize(self, images: Tensor) -> Tensor:
        """[B, S, 3, H, W] in [0, 1] -> ImageNet-normalised [B*S, 3, H, W] for the patch encoder."""
        return ((images - self.image_mean) / self.image_std).flatten(0, 1)

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int], keep: set[int]) -> dict[int, Tensor]:
        """Encoder patch tokens [B, S, P, C] -> {layer i: [B, S, 1+R+P, 2C]} for the layers in `keep`."""
        b, s, p, c = patch_tokens.shape
        x = torch.cat([_first_and_rest(self.camera_token, b, s), _first_and_rest(self.register_token, b, s),
                       patch_tokens.flatten(0, 1)], dim=1)
        t = x.shape[1]
        pos = token_positions(*grid, self.patch_start_idx, x.device)
        frame_pos = pos.expand(b * s, -1, -1)
        global_pos = pos.repeat(s, 1).expand(b, -1, -1)
        outputs = {}
        for i, (frame_block, global_block) in enumerate(zip(self.frame_blocks, self.global_blocks)):
            x = frame_block(x.reshape(b * s, t, c), frame_pos)
            frame_out = x.reshape(b, s, t, c)
            x = global_block(x.reshape(b, s * t, c), global_pos)
            if i in keep:
                outputs[i] = torch.cat([frame_out, x.reshape(b, s, t, c)], dim=-1)
        return outputs
