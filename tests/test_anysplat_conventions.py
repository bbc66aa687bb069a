"""AnySplat's conventions, each against a computation written out here: focal = (W/2)/(tan(fov/2)+1e-3),
depth unprojected at pixel corners, and its post-processing (conf masking, opacity_conf, voxelize with
the 1e-6 guard) driven by its config.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vist3a.recon import ReconOutput, pose_encoding_to_extri_intri, rigid_inverse, to_gaussians, unproject_depth
from vist3a.recon.pixel_gaussians import AnySplatPostprocess


def test_focal_with_anysplat_eps():
    pose = torch.zeros(1, 9)
    pose[0, 6] = 1.0  # identity rotation (x,y,z,w)
    pose[0, 7:9] = torch.tensor([0.9, 1.2])  # fov_h, fov_w
    _, k = pose_encoding_to_extri_intri(pose, (32, 48), focal_eps=1e-3)
    assert k[0, 0, 0].item() == pytest.approx(24 / (math.tan(0.6) + 1e-3), rel=1e-6)
    assert k[0, 1, 1].item() == pytest.approx(16 / (math.tan(0.45) + 1e-3), rel=1e-6)
    _, k0 = pose_encoding_to_extri_intri(pose, (32, 48))
    assert k0[0, 0, 0].item() == pytest.approx(24 / math.tan(0.6), rel=1e-6)


def test_unprojection_at_pixel_corners():
    depth = torch.full((1, 2, 3), 2.0)
    k = torch.tensor([[[4.0, 0, 1.5], [0, 4.0, 1.0], [0, 0, 1]]])
    eye = torch.eye(4)[None]
    corners = unproject_depth(depth, k, eye, pixel_offset=0.0)
    centres = unproject_depth(depth, k, eye)
    # pixel (row 1, col 2): corner u=2, v=1; centre u=2.5, v=1.5
    torch.testing.assert_close(corners[0, 1, 2], torch.tensor([(2 - 1.5) / 4 * 2, (1 - 1.0) / 4 * 2, 2.0]))
    torch.testing.assert_close(centres[0, 1, 2], torch.tensor([(2.5 - 1.5) / 4 * 2, (1.5 - 1.0) / 4 * 2, 2.0]))


def _output(points, raw, depth_conf) -> ReconOutput:
    n = points.shape[0]
    return ReconOutput(points=points.reshape(1, 1, 1, n, 3), gaussian_params=raw.reshape(1, 1, 1, n, -1),
                       depth_conf=depth_conf.reshape(1, 1, 1, n))


def _scene(n: int = 10):
    g = torch.Generator().manual_seed(0)
    points = torch.rand(n, 3, generator=g)
    raw = torch.randn(n, 8 + 3 + 1, generator=g)  # SH degree 0
    depth_conf = 1 + torch.rand(n, generator=g) * 4
    return points, raw, depth_conf


def test_render_conf_keeps_pixels_above_the_quantile_and_opacity_conf_scales():
    points, raw, conf = _scene()
    pp = AnySplatPostprocess(render_conf=True, opacity_conf=True, conf_threshold=0.3)
    g = to_gaussians(_output(points, raw, conf), anysplat=pp)[0]
    threshold = torch.quantile(conf, 0.3)
    keep = conf > threshold
    assert g.num == int(keep.sum()) < 10
    torch.testing.assert_close(g.means, points[keep])
    torch.testing.assert_close(g.opacities, torch.sigmoid(raw[keep, 0]) * torch.sigmoid(conf[keep] - threshold))


def test_voxelize_uses_every_pixel_and_guards_the_normaliser():
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0004, 0.0, 0.0], [1.0, 0.0, 0.0]])
    raw = torch.zeros(3, 12)
    raw[:, 0] = torch.tensor([1.0, 3.0, 0.0])
    raw[:, -1] = torch.tensor([0.0, math.log(3.0), 0.0])
    pp = AnySplatPostprocess(voxelize=True, voxel_size=0.001, render_conf=True, conf_threshold=0.5)
    g = to_gaussians(_output(points, raw, torch.tensor([1.0, 1.0, 9.0])), anysplat=pp)[0]
    assert g.num == 2  # render_conf does not drop pixels when voxelizing (as upstream)
    w = torch.tensor([1.0, 3.0]) / (4.0 + 1e-6)
    order = g.means[:, 0].argsort()
    torch.testing.assert_close(g.means[order][0], torch.tensor([w[1] * 0.0004, 0.0, 0.0]))
    torch.testing.assert_close(g.opacities[order][0], torch.sigmoid(w[0] * 1.0 + w[1] * 3.0))


def test_config_json_drives_the_postprocess(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"encoder_cfg": {"voxelize": True, "voxel_size": 0.002, "render_conf": False,
                                                "conf_threshold": 0.2, "gaussian_adapter": {"sh_degree": 4}},
                                "decoder_cfg": {"background_color": [1, 1, 1]}}))
    pp = AnySplatPostprocess.from_config_json(path)
    assert (pp.voxelize, pp.voxel_size, pp.render_conf, pp.conf_threshold, pp.opacity_conf, pp.sh_degree) == \
        (True, 0.002, False, 0.2, False, 4)
    path.write_text(json.dumps({"encoder_cfg": {"voxelize": True, "opacity_conf": True, "voxel_size": 0.002}}))
    with pytest.raises(ValueError, match=r"config.json: voxelize and opacity_conf together are not supported"):
        AnySplatPostprocess.from_config_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read AnySplat config .*config.json"):
        AnySplatPostprocess.from_config_json(path)


def test_voxel_size_and_anysplat_postprocess_are_exclusive():
    points, raw, conf = _scene()
    with pytest.raises(ValueError, match="give one of them"):
        to_gaussians(_output(points, raw, conf), voxel_size=0.1, anysplat=AnySplatPostprocess())


def test_pixel_offset_reaches_the_gaussian_centres():
    depth = torch.full((1, 1, 2, 2), 3.0)
    pose = torch.zeros(1, 1, 9)
    pose[..., 6] = 1.0
    pose[..., 7:9] = 1.0
    ext, k = pose_encoding_to_extri_intri(pose, (2, 2))
    out = ReconOutput(depth=depth, extrinsics=ext, intrinsics=k, gaussian_params=torch.zeros(1, 1, 2, 2, 12))
    g = to_gaussians(out, pixel_offset=0.0)[0]
    torch.testing.assert_close(g.means, unproject_depth(depth, k, rigid_inverse(ext), 0.0).reshape(-1, 3))
