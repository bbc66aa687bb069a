"""Our VGGT/AnySplat-family reconstruction network, runnable from any encoder block (the stitching cut)."""

from vist3a.recon.geometry import (
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    rigid_inverse,
    unproject_depth,
)
from vist3a.recon.network import ReconNet, ReconOutput, default_dpt_layers, gaussian_param_channels
from vist3a.recon.pixel_gaussians import to_gaussians, voxel_merge

__all__ = [
    "ReconNet", "ReconOutput", "to_gaussians", "voxel_merge", "default_dpt_layers", "gaussian_param_channels",
    "pose_encoding_to_extri_intri", "extri_intri_to_pose_encoding", "quat_to_mat", "mat_to_quat",
    "rigid_inverse", "unproject_depth",
]
