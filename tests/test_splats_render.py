"""The pure-torch renderer against closed-form pixel values, plus cameras, SH and previews."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vist3a.splats.render as render_mod
from vist3a.splats import (
    SH_C0,
    Cameras,
    Gaussians,
    intrinsics_from_fov,
    look_at,
    orbit_cameras,
    png_bytes,
    render_previews,
    rgb_to_sh0,
    save_preview_grid,
)
from vist3a.splats.render import render, sh_basis

C1 = math.sqrt(3 / (4 * math.pi))


def pinhole(f: float, cx: float, cy: float, width: int, height: int, viewmat=None) -> Cameras:
    K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    vm = torch.eye(4) if viewmat is None else viewmat
    return Cameras(vm[None].float(), K[None], width, height)


def scene(means, scales, opacities, rgbs, quats=None) -> Gaussians:
    means = torch.tensor(means, dtype=torch.float32).reshape(-1, 3)
    n = means.shape[0]
    sc = torch.tensor(scales, dtype=torch.float32).reshape(n, -1).expand(n, 3).clone()
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1) if quats is None else torch.tensor(quats).float()
    sh = rgb_to_sh0(torch.tensor(rgbs, dtype=torch.float32).reshape(n, 3))[:, None, :]
    return Gaussians(means, q, sc, torch.tensor(opacities, dtype=torch.float32).reshape(n), sh)


def gaussian_image(width, height, mx, my, var_x, var_y, opacity, rgb, bg):
    """Closed-form image of one axis-aligned 2D Gaussian splat (numpy, float64)."""
    px = np.arange(width) + 0.5
    py = np.arange(height) + 0.5
    dx, dy = np.meshgrid(px - mx, py - my)
    alpha = np.minimum(0.999, opacity * np.exp(-0.5 * (dx**2 / var_x + dy**2 / var_y)))
    alpha = np.where(alpha >= 1 / 255, alpha, 0.0)
    color = alpha[..., None] * np.asarray(rgb) + (1 - alpha[..., None]) * np.asarray(bg)
    return color, alpha[..., None]


# ----------------------------------------------------------------------------- single Gaussian


def test_single_gaussian_on_axis_matches_closed_form():
    f, z, s, o = 40.0, 4.0, 0.2, 0.8
    rgb, bg = (0.9, 0.2, 0.4), (0.1, 0.3, 0.5)
    g = scene([0.0, 0.0, z], [s], [o], [rgb])
    out = render(g, pinhole(f, 16.0, 16.0, 32, 32), background=torch.tensor(bg), backend="torch", render_depth=True)
    var = (f * s / z) ** 2 + 0.3  # J Sigma J^T = (f/z)^2 s^2 I on the axis, plus the 0.3 blur
    color, alpha = gaussian_image(32, 32, 16.0, 16.0, var, var, o, rgb, bg)
    np.testing.assert_allclose(out.colors[0].numpy(), color, atol=1e-5)
    np.testing.assert_allclose(out.alphas[0].numpy(), alpha, atol=1e-6)
    # a corner is pure background with zero alpha; the centre is mostly the splat
    assert out.alphas[0, 0, 0, 0] == 0 and torch.allclose(out.colors[0, 0, 0], torch.tensor(bg))
    assert out.alphas[0, 16, 16, 0] > 0.75
    covered = out.alphas[0, ..., 0] > 0
    assert torch.allclose(out.depths[0, ..., 0][covered], torch.tensor(z))


def test_off_axis_gaussian_uses_the_full_jacobian():
    f, x0, z, s, o = 40.0, 1.0, 4.0, 0.3, 0.7
    rgb, bg = (0.2, 0.8, 0.3), (0.0, 0.0, 0.0)
    g = scene([x0, 0.0, z], [s], [o], [rgb])
    out = render(g, pinhole(f, 16.0, 16.0, 32, 32), backend="torch")
    var_x = s**2 * (f**2 / z**2 + f**2 * x0**2 / z**4) + 0.3
    var_y = s**2 * f**2 / z**2 + 0.3
    color, alpha = gaussian_image(32, 32, f * x0 / z + 16.0, 16.0, var_x, var_y, o, rgb, bg)
    np.testing.assert_allclose(out.colors[0].numpy(), color, atol=1e-5)
    np.testing.assert_allclose(out.alphas[0].numpy(), alpha, atol=1e-6)


def test_jacobian_is_clamped_outside_the_widened_frustum():
    # x/z = 1 lies beyond lim = (W - cx)/f + 0.3 * (W/2)/f = 0.52: the Jacobian uses x/z = 0.52
    f, z, s, o = 40.0, 4.0, 1.0, 0.9
    g = scene([z * 1.0, 0.0, z], [s], [o], [(1.0, 1.0, 1.0)])
    out = render(g, pinhole(f, 16.0, 16.0, 32, 32), backend="torch")
    lim = 16.0 / f + 0.3 * 16.0 / f
    var_x = s**2 * (f**2 / z**2 + f**2 * lim**2 / z**2) + 0.3
    var_y = s**2 * f**2 / z**2 + 0.3
    color, alpha = gaussian_image(32, 32, f * 1.0 + 16.0, 16.0, var_x, var_y, o, (1, 1, 1), (0, 0, 0))
    assert alpha.max() > 0.05  # the tail is visible inside the image
    np.testing.assert_allclose(out.alphas[0].numpy(), alpha, atol=1e-6)
    np.testing.assert_allclose(out.colors[0].numpy(), color, atol=1e-5)


def test_rotated_anisotropic_gaussian_matches_closed_form():
    # 90 degrees about z swaps the x and y scales of an on-axis Gaussian
    f, z, o = 40.0, 4.0, 0.6
    q = [[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]]
    g = scene([0.0, 0.0, z], [[0.4, 0.1, 0.2]], [o], [(0.5, 0.5, 0.5)], quats=q)
    out = render(g, pinhole(f, 16.0, 16.0, 32, 32), backend="torch")
    var_x = (f * 0.1 / z) ** 2 + 0.3
    var_y = (f * 0.4 / z) ** 2 + 0.3
    _, alpha = gaussian_image(32, 32, 16.0, 16.0, var_x, var_y, o, (0.5,) * 3, (0,) * 3)
    np.testing.assert_allclose(out.alphas[0].numpy(), alpha, atol=1e-6)


@pytest.mark.parametrize("z", [0.005, -2.0, 2e10])
def test_gaussians_outside_near_far_are_culled(z):
    g = scene([0.0, 0.0, z], [0.5], [0.9], [(1.0, 0.0, 0.0)])
    out = render(g, pinhole(40.0, 16.0, 16.0, 32, 32), background=torch.tensor([0.2, 0.4, 0.6]), backend="torch")
    assert torch.all(out.alphas == 0)
    assert torch.allclose(out.colors, torch.tensor([0.2, 0.4, 0.6]).expand(1, 32, 32, 3))


def test_opacity_one_is_capped_at_0999():
    g = scene([0.0, 0.0, 3.0], [0.3], [1.0], [(1.0, 1.0, 1.0)])
    out = render(g, pinhole(40.0, 15.5, 15.5, 32, 32), backend="torch")
    assert out.alphas[0, 15, 15, 0].item() == pytest.approx(0.999, abs=1e-6)


# ----------------------------------------------------------------------------- compositing


def two_on_axis(o_front, o_back, swap=False):
    means = [[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]]
    scales = [[0.2], [0.4]]
    opac = [o_front, o_back]
    rgbs = [(0.9, 0.1, 0.2), (0.1, 0.3, 0.8)]
    if swap:
        means, scales, opac, rgbs = means[::-1], scales[::-1], opac[::-1], rgbs[::-1]
    return scene(means, scales, opac, rgbs)


def test_two_gaussians_composite_front_to_back_and_sort_by_depth():
    a_f, a_b = 0.6, 0.5
    c_f, c_b, bg = np.array([0.9, 0.1, 0.2]), np.array([0.1, 0.3, 0.8]), np.array([0.3, 0.3, 0.3])
    cams = pinhole(40.0, 15.5, 15.5, 32, 32)  # pixel (15, 15) is centred on both means
    kwargs = dict(background=torch.tensor(bg, dtype=torch.float32), backend="torch", render_depth=True)
    out = render(two_on_axis(a_f, a_b), cams, **kwargs)
    expected = c_f * a_f + c_b * a_b * (1 - a_f) + bg * (1 - a_f) * (1 - a_b)
    np.testing.assert_allclose(out.colors[0, 15, 15].numpy(), expected, atol=1e-6)
    assert out.alphas[0, 15, 15, 0].item() == pytest.approx(1 - (1 - a_f) * (1 - a_b), abs=1e-6)
    w_f, w_b = a_f, a_b * (1 - a_f)
    assert out.depths[0, 15, 15, 0].item() == pytest.approx((w_f * 2.0 + w_b * 4.0) / (w_f + w_b), abs=1e-5)

    swapped = render(two_on_axis(a_f, a_b, swap=True), cams, **kwargs)
    assert torch.allclose(swapped.colors, out.colors, atol=1e-7)
    assert torch.allclose(swapped.alphas, out.alphas, atol=1e-7)


def test_pixel_stops_before_the_gaussian_that_would_take_transmittance_below_1e4():
    # after the front splat T = 0.001; the back one would take it to 1e-6 <= 1e-4: it is left out
    bg = np.array([0.0, 1.0, 0.0])
    out = render(two_on_axis(0.999, 0.999), pinhole(40.0, 15.5, 15.5, 32, 32),
                 background=torch.tensor(bg, dtype=torch.float32), backend="torch")
    expected = np.array([0.9, 0.1, 0.2]) * 0.999 + bg * 0.001
    np.testing.assert_allclose(out.colors[0, 15, 15].numpy(), expected, atol=1e-6)
    assert out.alphas[0, 15, 15, 0].item() == pytest.approx(0.999, abs=1e-6)


def test_per_camera_background_and_auto_backend_on_cpu():
    g = two_on_axis(0.5, 0.5)
    base = pinhole(40.0, 15.5, 15.5, 32, 32)
    cams = Cameras(base.viewmats.repeat(2, 1, 1), base.Ks.repeat(2, 1, 1), 32, 32)
    bgs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = render(g, cams, background=bgs, backend="auto")
    ref = render(g, cams, background=bgs, backend="torch")
    assert torch.equal(out.colors, ref.colors)
    assert torch.allclose(out.colors[:, 0, 0], bgs)
    assert torch.allclose(out.colors[0] - out.colors[1], (1 - out.alphas[0]) * (bgs[0] - bgs[1]), atol=1e-6)


# ----------------------------------------------------------------------------- gradients


def random_scene(n: int, sh_degree: int, seed: int, dtype=torch.float32) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=gen, dtype=dtype) * 0.4 + torch.tensor([0.0, 0.0, 3.0], dtype=dtype)
    quats = torch.randn(n, 4, generator=gen, dtype=dtype)
    scales = torch.rand(n, 3, generator=gen, dtype=dtype) * 0.15 + 0.03
    opac = torch.rand(n, generator=gen, dtype=dtype) * 0.8 + 0.1
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=gen, dtype=dtype) * 0.4
    return Gaussians(means, quats, scales, opac, sh)


def _grads(g: Gaussians, cams: Cameras) -> dict[str, torch.Tensor]:
    params = {k: getattr(g, k).clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "sh")}
    out = render(Gaussians(**params), cams, background=torch.tensor([0.2, 0.5, 0.7]), backend="torch", render_depth=True)
    weights = torch.linspace(0.5, 1.5, out.colors.numel()).reshape(out.colors.shape)
    loss = (out.colors * weights).sum() + out.alphas.sum() + 0.1 * out.depths.sum()
    loss.backward()
    return {k: v.grad for k, v in params.items()}


def test_gradients_are_finite_and_nonzero():
    g = random_scene(60, 1, seed=0)
    grads = _grads(g, pinhole(30.0, 12.0, 12.0, 24, 24))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_checkpointed_tiles_give_the_same_gradients(monkeypatch):
    g = random_scene(60, 1, seed=1)
    cams = pinhole(30.0, 12.0, 12.0, 24, 24)
    plain = _grads(g, cams)
    monkeypatch.setattr(render_mod, "CHECKPOINT_MIN_PAIRS", 0)
    monkeypatch.setattr(render_mod, "DEPTH_CHUNK", 16)  # several chunks per tile, carried state
    chunked = _grads(g, cams)
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-4, atol=1e-6)


def test_gradients_match_finite_differences():
    g = random_scene(4, 1, seed=3, dtype=torch.float64)
    cams = pinhole(12.0, 4.0, 4.0, 8, 8)
    cams = Cameras(cams.viewmats.double(), cams.Ks.double(), 8, 8)

    def fn(means, scales, opacities, sh):
        out = render(Gaussians(means, g.quats, scales, opacities, sh), cams, backend="torch")
        return out.colors, out.alphas

    inputs = tuple(t.clone().requires_grad_(True) for t in (g.means, g.scales, g.opacities, g.sh))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- spherical harmonics


def _legendre(l: int, m: int, x: float) -> float:
    """Associated Legendre P_l^m(x) with the Condon-Shortley phase (standard recurrences)."""
    pmm = 1.0
    for i in range(1, m + 1):
        pmm *= -(2 * i - 1) * math.sqrt(1 - x * x)
    if l == m:
        return pmm
    pm1 = x * (2 * m + 1) * pmm
    for ll in range(m + 2, l + 1):
        pmm, pm1 = pm1, ((2 * ll - 1) * x * pm1 - (ll + m - 1) * pmm) / (ll - m)
    return pm1


def _real_sh(l: int, m: int, d: np.ndarray) -> float:
    theta, phi = math.acos(d[2]), math.atan2(d[1], d[0])
    am = abs(m)
    k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
    p = _legendre(l, am, math.cos(theta))
    if m == 0:
        return k * p
    return math.sqrt(2) * k * p * (math.cos(am * phi) if m > 0 else math.sin(am * phi))


def test_sh_basis_matches_legendre_definition_up_to_degree_4():
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(20, 3, generator=gen, dtype=torch.float64), dim=-1)
    got = sh_basis(4, dirs).numpy()
    for i, d in enumerate(dirs.numpy()):
        expected = [_real_sh(l, m, d) for l in range(5) for m in range(-l, l + 1)]
        np.testing.assert_allclose(got[i], expected, atol=1e-10)
    assert sh_basis(2, dirs).shape == (20, 9)


def test_sh_degree_1_colour_follows_the_view_direction():
    dc = torch.tensor([0.3, -0.2, 0.1])
    s1 = torch.tensor([[0.0, 0.2, 0.0], [0.4, 0.0, -0.3], [-0.5, 0.1, 0.6]])  # coefficients of -y, z, -x
    g = Gaussians(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1),
                  torch.tensor([0.9]), torch.cat([dc[None], s1], 0)[None])
    eyes = torch.tensor([[0.0, 0.0, -3.0], [3.0, 0.0, 0.0], [0.0, -3.0, -0.5]])
    K = torch.tensor([[30.0, 0, 15.5], [0, 30.0, 15.5], [0, 0, 1]])
    cams = Cameras(look_at(eyes, torch.zeros(3)), K.expand(3, 3, 3), 32, 32)
    bg = torch.tensor([0.5, 0.5, 0.5])
    out = render(g, cams, background=bg, backend="torch")
    for ci, eye in enumerate(eyes):
        x, y, z = (-eye / eye.norm()).tolist()  # direction from the camera to the Gaussian
        raw = SH_C0 * dc + C1 * (-y * s1[0] + z * s1[1] - x * s1[2])
        color = (raw + 0.5).clamp_min(0.0)
        expected = color * 0.9 + bg * 0.1
        torch.testing.assert_close(out.colors[ci, 15, 15], expected, atol=1e-5, rtol=0)
    assert (out.colors[0, 15, 15] - out.colors[1, 15, 15]).abs().max() > 0.1


# ----------------------------------------------------------------------------- cameras and containers


def test_look_at_is_an_opencv_world_to_camera_matrix():
    eye, target = torch.tensor([1.0, -2.0, -3.0]), torch.tensor([0.5, 0.0, 1.0])
    vm = look_at(eye, target)
    rot = vm[:3, :3]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.det(rot).item() == pytest.approx(1.0, abs=1e-6)
    to_cam = lambda p: (vm @ torch.cat([p, torch.ones(1)]))[:3]  # noqa: E731
    torch.testing.assert_close(to_cam(eye), torch.zeros(3), atol=1e-6, rtol=0)
    t = to_cam(target)
    torch.testing.assert_close(t[:2], torch.zeros(2), atol=1e-6, rtol=0)
    assert t[2].item() == pytest.approx((target - eye).norm().item(), abs=1e-5)
    # world up (-y) appears as image up (-y in camera coordinates)
    assert (rot @ torch.tensor([0.0, -1.0, 0.0]))[1] < 0


def test_intrinsics_and_camera_json_round_trip():
    K = intrinsics_from_fov(90.0, 64, 48)
    assert K[0, 0].item() == pytest.approx(32.0) and K[1, 1].item() == pytest.approx(32.0)
    assert (K[0, 2].item(), K[1, 2].item()) == (32.0, 24.0)
    cams = Cameras(look_at(torch.tensor([[0.0, 0, -2], [2.0, 0, 0]]), torch.zeros(3)), K.expand(2, 3, 3), 64, 48)
    back = Cameras.from_json(json.loads(json.dumps(cams.to_json())))
    assert (back.width, back.height) == (64, 48)
    torch.testing.assert_close(back.viewmats, cams.viewmats)
    torch.testing.assert_close(back.Ks, cams.Ks)
    torch.testing.assert_close(cams.centers, torch.tensor([[0.0, 0, -2], [2.0, 0, 0]]), atol=1e-6, rtol=0)


def test_gaussians_select_cat_and_sh_degree():
    g = random_scene(10, 2, seed=0)
    assert (g.num, len(g), g.sh_degree) == (10, 10, 2)
    sub = g.select(g.opacities > 0.5)
    assert sub.num == int((g.opacities > 0.5).sum())
    assert g.select([0, 2]).means.tolist() == g.means[[0, 2]].tolist()
    low = random_scene(3, 0, seed=1)
    both = Gaussians.cat([low, g])
    assert both.num == 13 and both.sh_degree == 2
    assert torch.all(both.sh[:3, 1:] == 0) and torch.equal(both.sh[3:], g.sh)
    assert torch.equal(g.with_sh_degree(1).sh, g.sh[:, :4])
    lo, hi = g.bbox()
    assert torch.equal(lo, g.means.min(0).values) and torch.equal(hi, g.means.max(0).values)
    with pytest.raises(ValueError):
        Gaussians(g.means, g.quats, g.scales, g.opacities, g.sh[:, :5])


def test_empty_scene_renders_background():
    g = random_scene(0, 1, seed=0)
    out = render(g, pinhole(20.0, 8.0, 8.0, 16, 16), background=torch.tensor([0.1, 0.2, 0.3]), backend="torch",
                 render_depth=True)
    assert torch.allclose(out.colors, torch.tensor([0.1, 0.2, 0.3]).expand(1, 16, 16, 3))
    assert torch.all(out.alphas == 0) and torch.all(out.depths == 0)


# ----------------------------------------------------------------------------- previews


def ball_scene(n=400, center=(1.0, -0.5, 4.0), radius=0.5, seed=0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    means = torch.tensor(center) + dirs * radius * torch.rand(n, 1, generator=gen) ** (1 / 3)
    rgb = torch.rand(n, 3, generator=gen) * 0.5
    return Gaussians(means, torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1), torch.full((n, 3), 0.03),
                     torch.full((n,), 0.9), rgb_to_sh0(rgb)[:, None])


def test_orbit_cameras_look_at_the_median_from_equal_distances():
    g = ball_scene()
    cams = orbit_cameras(g, 6, 48, fov_deg=50, elevation_deg=20)
    assert cams.num == 6 and (cams.width, cams.height) == (48, 48)
    center = g.means.median(dim=0).values
    cam_pts = (cams.viewmats[:, :3, :3] @ center + cams.viewmats[:, :3, 3])
    pix = (cams.Ks @ cam_pts[..., None])[..., 0]
    torch.testing.assert_close(pix[:, :2] / pix[:, 2:], torch.full((6, 2), 24.0), atol=1e-3, rtol=0)
    dists = (cams.centers - center).norm(dim=1)
    torch.testing.assert_close(dists, dists[:1].expand(6), atol=1e-4, rtol=0)
    # the sphere holding 90% of the centres fits the view with a margin: distance > radius / sin(fov/2)
    radius = torch.quantile((g.means - center).norm(dim=1), 0.9)
    assert dists[0] >= 1.2 * radius / math.sin(math.radians(25))
    # elevated above the scene: every camera is on the -y (up) side of the centre
    assert torch.all(cams.centers[:, 1] < center[1])


def test_render_previews_and_grid(tmp_path):
    images = render_previews(ball_scene(), 5, 32, backend="torch")
    assert len(images) == 5 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    for im in images:
        arr = np.asarray(im)
        assert arr[16, 16].max() < 200  # the dark ball is in the middle
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        assert border.min() >= 245  # the ball fits: only faint splat tails reach the border
    path = tmp_path / "grid.png"
    grid = save_preview_grid(images, path)
    assert grid.size == (96, 64)  # 3 columns x 2 rows
    reread = Image.open(path)
    assert reread.format == "PNG" and reread.size == (96, 64)
    assert np.array_equal(np.asarray(reread.convert("RGB")), np.asarray(grid))
    assert np.array_equal(np.asarray(grid)[32:, 64:], np.full((32, 32, 3), 255))  # empty sixth cell
    data = png_bytes(grid)
    assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).size == (96, 64)
