"""Merging, pruning, capping and SH truncation (vist3a.splats.compact) on inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from vist3a.splats.compact import CompactSettings, compact, covariance_to_gaussian_frame, importance, merge_voxels
from vist3a.splats.gaussians import Cameras, Gaussians, look_at
from vist3a.splats.render import covariances


def scene(means, scales=None, opacities=None, sh=None, quats=None):
    means = torch.tensor(means, dtype=torch.float32)
    n = len(means)
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    return Gaussians(means=means, quats=q if quats is None else torch.tensor(quats, dtype=torch.float32),
                     scales=torch.full((n, 3), 0.01) if scales is None else torch.tensor(scales, dtype=torch.float32),
                     opacities=torch.full((n,), 0.5) if opacities is None else torch.tensor(opacities, dtype=torch.float32),
                     sh=torch.arange(n * 3, dtype=torch.float32).reshape(n, 1, 3) if sh is None else sh)


def moments(mu, cov, w):
    """Independent numpy moment matching of one voxel: weighted mean and covariance of the mixture."""
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    m = (w[:, None] * mu).sum(0)
    c = sum(wi * (ci + np.outer(mi - m, mi - m)) for wi, mi, ci in zip(w, mu, cov))
    return m, c


def test_merge_is_confidence_softmax_weighted_moment_matching():
    # voxel 1.0: the first two share voxel (0,0,0); the third is alone in voxel (5,0,0)
    g = scene([[0.1, 0.0, 0.2], [-0.3, 0.2, 0.1], [5.0, 0.0, 0.0]],
              scales=[[0.05, 0.1, 0.2], [0.3, 0.01, 0.02], [0.2, 0.2, 0.2]], opacities=[0.2, 0.8, 0.6])
    conf = torch.tensor([1.0, 2.5, -3.0])
    out = merge_voxels(g, 1.0, conf)
    assert out.num == 2
    order = out.means[:, 0].argsort()
    out = out.select(order)
    w = np.exp([1.0, 2.5])
    w = w / w.sum()
    mu = g.means.double().numpy()
    cov = covariances(g.quats.double(), g.scales.double()).numpy()
    m, c = moments(mu[:2], cov[:2], w)
    np.testing.assert_allclose(out.means[0].numpy(), m, atol=1e-6)
    np.testing.assert_allclose(covariances(out.quats[:1].double(), out.scales[:1].double())[0].numpy(), c, atol=1e-6)
    assert out.opacities[0].item() == pytest.approx(w @ [0.2, 0.8], abs=1e-6)
    np.testing.assert_allclose(out.sh[0, 0].numpy(), w @ g.sh[:2, 0].double().numpy(), atol=1e-5)
    # the lone Gaussian is unchanged (its covariance; the frame may be re-expressed)
    np.testing.assert_allclose(out.means[1].numpy(), mu[2], atol=1e-6)
    np.testing.assert_allclose(covariances(out.quats[1:].double(), out.scales[1:].double())[0].numpy(), cov[2], atol=1e-7)
    assert out.opacities[1].item() == pytest.approx(0.6)


def test_merge_without_confidence_weights_by_opacity_and_keeps_far_covariances():
    # far from the origin with tiny scales: float32 second moments would lose the covariance entirely
    base = [1000.0, -2000.0, 500.0]
    g = scene([[base[0] + 0.001, base[1], base[2]], [base[0] - 0.002, base[1] + 0.001, base[2]]],
              scales=[[1e-3, 1e-3, 1e-3], [2e-3, 1e-3, 1e-3]], opacities=[0.25, 0.75])
    out = merge_voxels(g, 1.0)
    assert out.num == 1
    mu = g.means.double().numpy()
    cov = covariances(g.quats.double(), g.scales.double()).numpy()
    m, c = moments(mu, cov, [0.25, 0.75])
    np.testing.assert_allclose(out.means[0].double().numpy(), m, atol=1e-4)
    got = covariances(out.quats.double(), out.scales.double())[0].numpy()
    np.testing.assert_allclose(got, c, rtol=1e-3, atol=1e-10)
    assert out.opacities.item() == pytest.approx(0.25 * 0.25 + 0.75 * 0.75)
    assert all(bool(torch.isfinite(t).all()) for t in (out.means, out.quats, out.scales, out.opacities, out.sh))


def test_covariance_to_gaussian_frame_inverts_covariances():
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(50, 4, generator=g, dtype=torch.float64), dim=1)
    s = torch.rand(50, 3, generator=g, dtype=torch.float64) + 0.01
    cov = covariances(q, s)
    q2, s2 = covariance_to_gaussian_frame(cov)
    torch.testing.assert_close(covariances(q2, s2), cov, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(q2.norm(dim=1), torch.ones(50, dtype=torch.float64))


def test_prune_cap_and_sh_truncation_report_counts():
    n = 10
    sh = torch.randn(n, 16, 3, generator=torch.Generator().manual_seed(0))
    g = scene([[float(i), 0.0, 5.0] for i in range(n)], opacities=[0.05 * (i + 1) for i in range(n)], sh=sh,
              scales=[[0.01 * (i % 3 + 1)] * 3 for i in range(n)])
    out, report = compact(g, CompactSettings(min_opacity=0.2, max_gaussians=3, sh_degree=1))
    # opacities 0.05..0.5: >= 0.2 keeps i = 3..9 (7); cap by opacity * pi * s1 * s2 keeps the 3 largest
    kept = [i for i in range(n) if 0.05 * (i + 1) >= 0.2 - 1e-7]
    score = {i: 0.05 * (i + 1) * math.pi * (0.01 * (i % 3 + 1)) ** 2 for i in kept}
    top = sorted(sorted(kept, key=lambda i: -score[i])[:3])
    assert [r["step"] for r in report] == ["opacity_prune", "cap", "sh_truncate"]
    assert [(r["before"], r["after"]) for r in report] == [(10, 7), (7, 3), (3, 3)]
    assert report[2]["before_degree"] == 3 and report[2]["after_degree"] == 1
    np.testing.assert_allclose(out.means[:, 0].numpy(), top)
    assert out.sh.shape == (3, 4, 3)
    torch.testing.assert_close(out.sh, sh[top, :4])


def test_importance_uses_projected_area_at_the_cameras():
    # same world size, one twice as far from the camera: a quarter of the pixel area; behind: none
    g = scene([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0], [0.0, 0.0, -3.0]], scales=[[0.1, 0.2, 0.05]] * 3,
              opacities=[0.5, 0.5, 0.5])
    viewmat = look_at(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))[None]
    k = torch.tensor([[[100.0, 0, 32], [0, 120.0, 32], [0, 0, 1]]])
    got = importance(g, Cameras(viewmat, k, 64, 64))
    expect = [0.5 * math.pi * 0.2 * 0.1 * 100 * 120 / z ** 2 for z in (2.0, 4.0)] + [0.0]
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5)


def test_compact_merges_then_prunes_and_settings_are_checked():
    g = scene([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [3.0, 3.0, 3.0]], opacities=[0.1, 0.1, 0.9])
    out, report = compact(g, CompactSettings(voxel_size=1.0, min_opacity=0.5), confidence=torch.zeros(3))
    assert [(r["step"], r["before"], r["after"]) for r in report] == [("voxel_merge", 3, 2), ("opacity_prune", 2, 1)]
    assert report[0]["weights"] == "confidence" and report[0]["voxel_size"] == 1.0
    np.testing.assert_allclose(out.means.numpy(), [[3.0, 3.0, 3.0]])
    for bad in ({"voxel_size": 0.0}, {"min_opacity": 1.0}, {"max_gaussians": 0}, {"sh_degree": 5}):
        with pytest.raises(ValueError):
            CompactSettings(**bad)
    with pytest.raises(ValueError, match="confidence has shape"):
        merge_voxels(g, 1.0, torch.zeros(2))


def test_voxel_in_pixel_footprints_is_the_scene_median_depth_over_focal():
    """Two cameras; each Gaussian's footprint is z/f at the nearest camera in front of it (not the far one,
    not one behind); the voxel is k x the median, and the merge equals the world-unit merge at that size."""
    from vist3a.splats.compact import pixel_footprint

    near = look_at(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    far = look_at(torch.tensor([0.0, 0.0, -6.0]), torch.tensor([0.0, 0.0, 1.0]))
    k = torch.tensor([[100.0, 0, 32], [0, 140.0, 32], [0, 0, 1]])
    cams = Cameras(torch.stack([near, far]), torch.stack([k, k]), 64, 64)
    depths = [1.0, 2.0, 3.0, 4.0, 8.0]
    g = scene([[0.01 * i, 0.0, z] for i, z in enumerate(depths)])
    assert pixel_footprint(g, cams) == pytest.approx(3.0 / 120.0, rel=1e-5)  # median z 3, mean focal 120
    by_footprints, report = compact(g, CompactSettings(voxel_footprints=2.5), cameras=cams)
    assert report[0]["voxel_footprints"] == 2.5 and report[0]["voxel_size"] == pytest.approx(2.5 * 3.0 / 120.0)
    by_size, _ = compact(g, CompactSettings(voxel_size=2.5 * 3.0 / 120.0), cameras=cams)
    torch.testing.assert_close(by_footprints.means, by_size.means)
    with pytest.raises(ValueError, match="needs the scene's cameras"):
        compact(g, CompactSettings(voxel_footprints=2.5))
    with pytest.raises(ValueError, match="not both"):
        CompactSettings(voxel_size=0.1, voxel_footprints=2.5)
