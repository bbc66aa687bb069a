"""Strided rendering of pixel-aligned Gaussians: the Gaussians of every n-th pixel, rendered at 1/n
resolution, cost n^3 less than the full render. The training losses (stitched fine-tuning, reward
fine-tuning) use it to render on a CPU; n = 1 is the plain render."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vist3a.splats.gaussians import Cameras, Gaussians


def every_nth_pixel(views: int, height: int, width: int, stride: int) -> Tensor:
    """Indices of the pixel-aligned Gaussians (ordered view, row, column) of every stride-th row and column."""
    rows, cols = torch.arange(0, height, stride), torch.arange(0, width, stride)
    return ((torch.arange(views)[:, None, None] * height + rows[None, :, None]) * width + cols[None, None, :]).flatten()


def nth_pixel_gaussians(gaussians: Gaussians, views: int, height: int, width: int, stride: int) -> Gaussians:
    """The Gaussians of every stride-th pixel of `views` views of height x width (all of them for stride 1)."""
    if stride == 1:
        return gaussians
    return gaussians.select(every_nth_pixel(views, height, width, stride).to(gaussians.device))


def strided_cameras(cameras: Cameras, stride: int, width: int | None = None, height: int | None = None) -> Cameras:
    """The cameras of a 1/stride render: pixel intrinsics scaled by 1/n (continuous pixel coordinates scale
    so), image size ceil(W/n) x ceil(H/n) unless `width`/`height` say otherwise."""
    ks = cameras.Ks.clone()
    ks[:, :2, :] = ks[:, :2, :] / stride
    return Cameras(cameras.viewmats, ks, width or math.ceil(cameras.width / stride),
                   height or math.ceil(cameras.height / stride))
