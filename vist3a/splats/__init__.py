"""Gaussian-splat scenes: containers, rendering (gsplat / pure torch), .ply files, previews."""

from vist3a.splats.gaussians import (
    SH_C0,
    Cameras,
    Gaussians,
    intrinsics_from_fov,
    look_at,
    rgb_to_sh0,
    sh0_to_rgb,
)
from vist3a.splats.ply import ply_bytes, read_ply, write_ply
from vist3a.splats.preview import orbit_cameras, png_bytes, render_previews, save_preview_grid
from vist3a.splats.render import RenderOutput

# `render` (the function) is imported from vist3a.splats.render: re-exporting it here would
# shadow the submodule of the same name on the package.

__all__ = [
    "SH_C0", "Cameras", "Gaussians", "intrinsics_from_fov", "look_at", "rgb_to_sh0", "sh0_to_rgb",
    "ply_bytes", "read_ply", "write_ply",
    "orbit_cameras", "png_bytes", "render_previews", "save_preview_grid",
    "RenderOutput",
]
