"""Writes the released stitched decoder's file format (anysplat_stitched.pth) from the format facts, for
tests: renumbered DINO blocks, loralib Linear and Conv2d layouts, lora_only biases, tokens, stitching layer."""

from __future__ import annotations

import torch
from torch import nn

RANK = 4


def adapted_layers(recon: nn.Module, first_block: int) -> dict[str, nn.Module]:
    """Every nn.Linear / nn.Conv2d the stitched network still runs (what the release puts LoRA on)."""
    out = {}
    for name, m in recon.named_modules():
        if type(m) not in (nn.Linear, nn.Conv2d):
            continue
        if name.startswith("aggregator.patch_embed."):
            parts = name.split(".")
            if parts[2] != "blocks" or int(parts[3]) < first_block:
                continue  # the patch conv and the blocks up to the cut were deleted upstream
        out[name] = m
    return out


def release_name(name: str, first_block: int) -> str:
    parts = name.split(".")
    if name.startswith("aggregator.patch_embed.blocks."):
        parts[3] = str(int(parts[3]) - first_block)  # ModuleList deletion renumbers
    return "encoder." + ".".join(parts)


def write_release_file(path, decoder, rank: int = RANK, seed: int = 0, cut_blocks: int = 2,
                       stitch_shape=None) -> dict:
    """The release's dict: 'lora' (A, B, bias per adapted layer), 'stitching_layer', three tokens."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, m in adapted_layers(decoder.recon, cut_blocks).items():
        key = release_name(name, cut_blocks)
        if isinstance(m, nn.Linear):
            a, b = (rank, m.in_features), (m.out_features, rank)
        else:
            k = m.kernel_size[0]
            a, b = (rank * k, m.in_channels * k), (m.out_channels // m.groups * k, rank * k)
        lora[key + ".lora_A"] = torch.randn(a, generator=g) * 0.2
        lora[key + ".lora_B"] = torch.randn(b, generator=g) * 0.2
        if m.bias is not None:
            bias = torch.randn(m.bias.shape, generator=g) * 0.1
            lora[key + ".bias"] = bias if "head" in name else bias.to(torch.bfloat16)  # as released: non-head bf16
    c = decoder.recon.cfg.embed_dim
    lora["encoder.distill_aggregator.frame_blocks.0.attn.qkv.lora_A"] = torch.zeros(rank, c)  # teacher copy
    w = stitch_shape or tuple(decoder.stitch.conv.weight.shape)
    payload = {
        "lora": lora,
        "stitching_layer": {"weight": torch.randn(w, generator=g) * 0.05, "bias": torch.randn(w[0], generator=g)},
        "mask_token": torch.randn(1, c, generator=g),
        "cls_token": torch.randn(1, 1, c, generator=g),
        "register_tokens": torch.randn(1, decoder.recon.cfg.num_registers, c, generator=g),
    }
    torch.save(payload, path)
    return payload
