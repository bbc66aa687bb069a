"""Frames at the size a model takes them: what the corpus, the VAE encoder and the stitched decoder share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_frames(frames: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, 3, size, size): centre crop to a square, then bilinear resize, antialiased
    when shrinking unless `antialias=False` (the release's plain trilinear resize, frame count kept)."""
    b, t, c, h, w = frames.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = frames[..., top:top + s, left:left + s].reshape(b * t, c, s, s)
    if s != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias and s > size)
    return x.reshape(b, t, c, size, size).clamp(0, 1)
