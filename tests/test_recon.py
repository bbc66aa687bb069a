"""ReconNet (tiny, CPU): shapes, cut-point semantics, released-layout names and sizes, Gaussians, geometry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vist3a.config import ReconConfig
from vist3a.recon import (
    ReconNet,
    ReconOutput,
    default_dpt_layers,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    rigid_inverse,
    to_gaussians,
    unproject_depth,
    voxel_merge,
)
from vist3a.recon.heads import ResidualConvUnit, uv_embedding
from vist3a.recon.layers import RoPE2D

B, S = 2, 3
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
VGGT_1B = dict(img_size=518, patch_size=14, embed_dim=1024, encoder_depth=24, encoder_heads=16,
               aggregator_depth=24, aggregator_heads=16, camera_iters=4, camera_trunk_depth=4,
               dpt_features=256, dpt_out_channels=(256, 512, 1024, 1024), dpt_layers=(4, 11, 17, 23), sh_degree=4)
FIELDS = ("extrinsics", "intrinsics", "pose_enc", "depth", "depth_conf", "points", "points_conf", "gaussian_params")


@pytest.fixture(scope="module")
def net() -> ReconNet:
    return ReconNet(ReconConfig()).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(B, S, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def out(net, images) -> ReconOutput:
    with torch.no_grad():
        return net(images)


def _assert_same(a: ReconOutput, b: ReconOutput, atol: float = 0.0) -> None:
    for name in FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=atol, msg=name)


def _max_diff(a: ReconOutput, b: ReconOutput) -> float:
    return max((getattr(a, n) - getattr(b, n)).abs().max().item() for n in FIELDS)


def test_output_shapes(net, out):
    h = w = 64
    cg = 1 + 3 + 4 + 3 * 4 + 1  # sh_degree 1
    assert out.extrinsics.shape == (B, S, 4, 4) and out.intrinsics.shape == (B, S, 3, 3)
    assert out.pose_enc.shape == (B, S, 9) and len(out.pose_enc_list) == net.cfg.camera_iters
    assert out.depth.shape == out.depth_conf.shape == out.points_conf.shape == (B, S, h, w)
    assert out.points.shape == (B, S, h, w, 3) and out.gaussian_params.shape == (B, S, h, w, cg)
    assert (out.depth > 0).all() and (out.depth_conf > 1).all() and (out.points_conf > 1).all()
    assert torch.isfinite(out.intrinsics).all()
    # intrinsics: principal point at the centre, fx from fov_w
    torch.testing.assert_close(out.intrinsics[..., 0, 2], torch.full((B, S), 32.0))
    torch.testing.assert_close(out.intrinsics[..., 0, 0], 32.0 / torch.tan(out.pose_enc[..., 8] / 2))
    assert net.token_grid == (8, 8) and net.cut_points() == [f"blocks.{i}" for i in range(4)]


def test_forward_from_with_cut_specials_reproduces_forward(net, images, out):
    with torch.no_grad():
        for cut in net.cut_points():
            acts, specials = net.activations(cut, images, return_specials=True)
            assert acts.shape == (B, S, 64, net.cfg.embed_dim)
            _assert_same(net.forward_from(cut, acts, images, specials=specials), out)


def test_forward_from_reenters_learned_special_tokens(net, images, out):
    enc = net.aggregator.patch_embed
    learned = torch.cat([enc.cls_token + enc.pos_embed[:, :1], enc.register_tokens], dim=1)
    learned = learned.expand(B * S, -1, -1).reshape(B, S, 1 + net.cfg.num_registers, -1)
    with torch.no_grad():
        for cut in net.cut_points():
            acts = net.activations(cut, images)
            default = net.forward_from(cut, acts, images)
            _assert_same(default, net.forward_from(cut, acts, images, specials=learned))
        # after the last block the special tokens are dropped, so forward_from is forward exactly
        _assert_same(default, out)
        # before it, the learned tokens differ from the image's processed ones (the stitching approximation)
        assert _max_diff(net.forward_from("blocks.0", net.activations("blocks.0", images), images), out) > 0


def test_forward_from_ignores_everything_before_the_cut(images):
    net = ReconNet(ReconConfig()).eval()
    cut, n = "blocks.1", 1
    with torch.no_grad():
        acts = net.activations(cut, images)
        before = net.forward_from(cut, acts, images)
        enc = net.aggregator.patch_embed
        for p in [*enc.blocks[: n + 1].parameters(), enc.patch_embed.proj.weight]:
            p.add_(torch.randn_like(p))
        enc.pos_embed[:, 1:].add_(1.0)  # patch position embedding: already inside acts, not re-added
        _assert_same(net.forward_from(cut, acts, images), before)
        enc.blocks[n + 1].mlp.fc1.weight.add_(torch.randn_like(enc.blocks[n + 1].mlp.fc1.weight))  # this one matters
        assert _max_diff(net.forward_from(cut, acts, images), before) > 1e-4


def test_forward_from_without_images_skips_only_the_gaussian_head(net, images, out):
    with torch.no_grad():
        o = net.forward_from("blocks.3", net.activations("blocks.3", images))
    assert o.gaussian_params is None
    torch.testing.assert_close(o.depth, out.depth, rtol=0, atol=0)


def test_bad_cut_and_token_count_are_refused(net):
    with pytest.raises(ValueError, match="unknown cut"):
        net.forward_from("blocks.9", torch.zeros(1, 1, 64, 32))
    with pytest.raises(ValueError, match="token grid"):
        net.forward_from("blocks.0", torch.zeros(1, 1, 60, 32))


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (ReconNet(ReconConfig(seed=s)).state_dict() for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["depth_head.projects.0.weight"], c["depth_head.projects.0.weight"])


def test_parameter_names_mirror_released_layout(net):
    sd = net.state_dict()
    c, r = net.cfg.embed_dim, net.cfg.num_registers
    expected = {
        "aggregator.patch_embed.patch_embed.proj.weight": (c, 3, 8, 8),
        "aggregator.patch_embed.cls_token": (1, 1, c),
        "aggregator.patch_embed.register_tokens": (1, r, c),
        "aggregator.patch_embed.pos_embed": (1, 65, c),
        "aggregator.patch_embed.blocks.0.attn.qkv.weight": (3 * c, c),
        "aggregator.patch_embed.blocks.3.ls2.gamma": (c,),
        "aggregator.patch_embed.norm.weight": (c,),
        "aggregator.camera_token": (1, 2, 1, c),
        "aggregator.register_token": (1, 2, r, c),
        "aggregator.frame_blocks.0.attn.q_norm.weight": (c // 2,),
        "aggregator.global_blocks.1.attn.k_norm.bias": (c // 2,),
        "aggregator.global_blocks.1.mlp.fc2.weight": (c, 4 * c),
        "camera_head.trunk.0.attn.qkv.weight": (6 * c, 2 * c),
        "camera_head.empty_pose_tokens": (1, 1, 9),
        "camera_head.embed_pose.weight": (2 * c, 9),
        "camera_head.poseLN_modulation.1.weight": (6 * c, 2 * c),
        "camera_head.pose_branch.fc2.weight": (9, c),
        "camera_head.token_norm.weight": (2 * c,),
        "camera_head.trunk_norm.weight": (2 * c,),
        "depth_head.norm.weight": (2 * c,),
        "depth_head.resize_layers.0.weight": (8, 8, 4, 4),
        "depth_head.resize_layers.3.weight": (32, 32, 3, 3),
        "depth_head.scratch.layer4_rn.weight": (16, 32, 3, 3),
        "depth_head.scratch.refinenet1.resConfUnit1.conv1.weight": (16, 16, 3, 3),
        "depth_head.scratch.refinenet4.resConfUnit2.conv2.bias": (16,),
        "depth_head.scratch.refinenet2.out_conv.weight": (16, 16, 1, 1),
        "depth_head.scratch.output_conv1.weight": (8, 16, 3, 3),
        "depth_head.scratch.output_conv2.2.weight": (2, 32, 1, 1),
        "point_head.scratch.output_conv2.2.weight": (4, 32, 1, 1),
        "gaussian_param_head.input_merger.0.weight": (8, 3, 7, 7),
        "gaussian_param_head.scratch.output_conv2.2.weight": (21, 8, 1, 1),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("refinenet4.resConfUnit1" in k or "layer4_rn.bias" in k for k in sd)
    depth_only = ReconNet(ReconConfig(heads=("depth",))).state_dict()
    assert {k.split(".")[0] for k in depth_only} == {"aggregator", "depth_head"}
    assert not any("q_norm" in k for k in sd if ".patch_embed." in k or k.startswith("camera_head"))


def test_vggt_1b_size_on_meta_device():
    with torch.device("meta"):
        net = ReconNet(ReconConfig(**VGGT_1B))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net.aggregator.patch_embed) == 304_371_712  # DINOv2 ViT-L/14 + 4 registers, less mask_token
    assert count(net.aggregator) == 909_111_296
    assert count(net.camera_head) == 216_174_610
    assert count(net.depth_head) == 32_654_562 and count(net.point_head) == 32_654_628
    assert count(net.gaussian_param_head) == 32_794_964
    sd = net.state_dict()
    assert sd["aggregator.patch_embed.pos_embed"].shape == (1, 1370, 1024)
    assert sd["aggregator.patch_embed.patch_embed.proj.weight"].shape == (1024, 3, 14, 14)
    assert sd["aggregator.frame_blocks.23.attn.q_norm.weight"].shape == (64,)
    assert sd["camera_head.poseLN_modulation.1.weight"].shape == (6144, 2048)
    assert sd["camera_head.trunk.3.mlp.fc1.weight"].shape == (8192, 2048)
    assert sd["camera_head.pose_branch.fc1.weight"].shape == (1024, 2048)
    assert sd["depth_head.projects.0.weight"].shape == (256, 2048, 1, 1)
    assert sd["depth_head.projects.3.weight"].shape == (1024, 2048, 1, 1)
    assert sd["depth_head.scratch.output_conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["gaussian_param_head.input_merger.0.weight"].shape == (128, 3, 7, 7)
    assert sd["gaussian_param_head.scratch.output_conv2.0.weight"].shape == (128, 128, 3, 3)
    assert sd["gaussian_param_head.scratch.output_conv2.2.weight"].shape == (84, 128, 1, 1)


def test_default_dpt_layers():
    assert default_dpt_layers(24) == (5, 11, 17, 23)
    assert default_dpt_layers(4) == (0, 1, 2, 3)
    assert default_dpt_layers(2) == (0, 0, 1, 1)
    assert default_dpt_layers(1) == (0, 0, 0, 0)


# ----------------------------------------------------------------------------- Gaussians


def test_gaussians_flow_gradients_to_blocks_after_the_cut(images):
    net = ReconNet(ReconConfig())
    cut = "blocks.1"
    acts = net.activations(cut, images).detach().requires_grad_(True)
    scene = to_gaussians(net.forward_from(cut, acts, images), images)[0]
    loss = scene.means.sum() + scene.scales.sum() + scene.opacities.sum() + scene.sh.sum() + scene.quats.sum()
    loss.backward()
    enc = net.aggregator.patch_embed
    assert acts.grad is not None and acts.grad.abs().sum() > 0
    assert enc.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.blocks[3].mlp.fc2.weight.grad.abs().sum() > 0
    assert enc.blocks[0].attn.qkv.weight.grad is None and enc.blocks[1].attn.qkv.weight.grad is None


def test_to_gaussians_is_pixel_aligned(out, images):
    scenes = to_gaussians(out, images)
    assert len(scenes) == B and all(g.num == S * 64 * 64 for g in scenes)
    g = scenes[1]
    raw = out.gaussian_params[1].reshape(-1, out.gaussian_params.shape[-1])
    centres = unproject_depth(out.depth[1], out.intrinsics[1], torch.linalg.inv(out.extrinsics[1]))
    torch.testing.assert_close(g.means, centres.reshape(-1, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.opacities, torch.sigmoid(raw[:, 0]))
    assert g.sh_degree == 1 and (g.scales > 0).all() and (g.scales <= 0.3).all()
    pruned = to_gaussians(out, images, min_opacity=0.5)[1]
    assert pruned.num == int((torch.sigmoid(raw[:, 0]) >= 0.5).sum()) and (pruned.opacities >= 0.5).all()
    merged = to_gaussians(out, images, voxel_size=0.05)
    assert all(m.num < S * 64 * 64 for m in merged)


def _hand_output(points: torch.Tensor, raw: torch.Tensor) -> ReconOutput:
    """One scene, one view, a 1 x N image whose Gaussian centres come from the point head."""
    n = points.shape[0]
    return ReconOutput(points=points.reshape(1, 1, 1, n, 3), gaussian_params=raw.reshape(1, 1, 1, n, -1))


def test_gaussian_activations_by_hand():
    k = 4  # sh degree 1
    raw = torch.zeros(2, 8 + 3 * k + 1)
    raw[:, 0] = torch.tensor([0.0, 2.0])
    raw[:, 1:4] = torch.tensor([[0.0, 1.0, 1000.0], [-3.0, 0.5, 2.0]])
    raw[:, 4:8] = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 4.0]])  # x,y,z,w
    raw[:, 8:20] = torch.arange(24.0).reshape(2, 12)
    g = to_gaussians(_hand_output(torch.zeros(2, 3), raw))[0]
    torch.testing.assert_close(g.opacities, torch.tensor([0.5, 1 / (1 + math.exp(-2.0))]))
    softplus = torch.log1p(torch.exp(raw[:, 1:4].clamp_max(20))) + (raw[:, 1:4] - 20).clamp_min(0)
    torch.testing.assert_close(g.scales, torch.minimum(0.001 * softplus, torch.tensor(0.3)))
    torch.testing.assert_close(g.quats, torch.tensor([[1.0, 0, 0, 0], [0.8, 0, 0.6, 0]]))  # w,x,y,z
    for n in range(2):
        for c in range(3):
            for j in range(k):
                factor = 1.0 if j == 0 else 0.1 * 0.25
                assert g.sh[n, j, c].item() == pytest.approx(raw[n, 8 + c * k + j].item() * factor)


def test_voxel_merge_softmax_weighted_mean_by_hand():
    points = torch.tensor([[0.01, 0.0, 0.0], [0.02, 0.0, 0.0], [1.0, 0.0, 0.0]])
    raw = torch.zeros(3, 8 + 3 + 1)  # sh degree 0
    raw[:, 0] = torch.tensor([1.0, 5.0, -2.0])
    raw[:, -1] = torch.tensor([0.0, math.log(3.0), 7.0])  # confidence: weights 1/4, 3/4 in the shared voxel
    g = to_gaussians(_hand_output(points, raw), voxel_size=0.1)[0]
    assert g.num == 2
    order = g.means[:, 0].argsort()
    torch.testing.assert_close(g.means[order], torch.tensor([[0.25 * 0.01 + 0.75 * 0.02, 0, 0], [1.0, 0, 0]]))
    logit = 0.25 * 1.0 + 0.75 * 5.0
    torch.testing.assert_close(g.opacities[order], torch.sigmoid(torch.tensor([logit, -2.0])))
    # the merge itself: a point alone keeps its features; weights sum to one
    pts, feats = voxel_merge(points, torch.ones(3, 2), raw[:, -1], voxel_size=0.1)
    torch.testing.assert_close(feats, torch.ones(2, 2))


# ----------------------------------------------------------------------------- layers


def test_rope_is_relative_and_splits_rows_and_columns():
    rope = RoPE2D(100.0)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 16, generator=gen), torch.randn(1, 2, 5, 16, generator=gen)
    pos = torch.randint(0, 9, (1, 5, 2), generator=gen)
    shifted = pos + torch.tensor([3, 7])
    scores = rope(q, pos) @ rope(k, pos).transpose(-1, -2)
    torch.testing.assert_close(rope(q, shifted) @ rope(k, shifted).transpose(-1, -2), scores, rtol=1e-4, atol=1e-4)
    rows_only = torch.stack([pos[..., 0], torch.zeros_like(pos[..., 0])], -1)
    torch.testing.assert_close(rope(q, rows_only)[..., 8:], q[..., 8:])  # columns untouched at col 0
    # channel 0 pairs with channel 4 (rotate-half of the row half) at frequency 1
    angle = pos[0, :, 0].float()
    expected = q[0, :, :, 0] * angle.cos() - q[0, :, :, 4] * angle.sin()
    torch.testing.assert_close(rope(q, pos)[0, :, :, 0], expected)


def test_residual_conv_unit_skip_carries_relu():
    unit = ResidualConvUnit(4)
    for conv in (unit.conv1, unit.conv2):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(unit(x), F.relu(x))


def test_uv_embedding_values():
    h, w = 2, 3
    emb = uv_embedding(4, h, w, aspect=1.5, like=torch.zeros(1))
    diag = math.sqrt(1.5**2 + 1)
    u = torch.linspace(-1.5 / diag * 2 / 3, 1.5 / diag * 2 / 3, 3)
    v = torch.linspace(-1 / diag / 2, 1 / diag / 2, 2)
    assert emb.shape == (4, h, w)
    torch.testing.assert_close(emb[0], u.sin().expand(h, w))
    torch.testing.assert_close(emb[1], u.cos().expand(h, w))
    torch.testing.assert_close(emb[2], v.sin()[:, None].expand(h, w))
    torch.testing.assert_close(emb[3], v.cos()[:, None].expand(h, w))


# ----------------------------------------------------------------------------- geometry


def _axis_angle(axis, angle) -> torch.Tensor:
    """Rodrigues' formula, independent of the quaternion code."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    kx = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def test_quaternions_match_rodrigues_and_round_trip():
    cases = [((1, 0, 0), 0.3), ((0, 1, 0), -1.2), ((1, 2, 3), 2.5), ((0, 0, 1), math.pi), ((1, 1, 0), math.pi)]
    for axis, angle in cases:
        half = angle / 2
        a = torch.tensor(axis, dtype=torch.float64) / torch.tensor(axis, dtype=torch.float64).norm()
        quat = torch.cat([a * math.sin(half), torch.tensor([math.cos(half)], dtype=torch.float64)])
        rot = _axis_angle(axis, angle)
        torch.testing.assert_close(quat_to_mat(quat), rot)
        torch.testing.assert_close(quat_to_mat(3.0 * quat), rot)  # any norm
        back = mat_to_quat(rot)
        assert back[3] >= 0
        torch.testing.assert_close(quat_to_mat(back), rot)
        torch.testing.assert_close(back, quat if quat[3] >= 0 else -quat, atol=1e-9, rtol=0)
    q = F.normalize(torch.randn(500, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=-1)
    torch.testing.assert_close(mat_to_quat(quat_to_mat(q)), q * torch.sign(q[:, 3:]))


def test_pose_encoding_round_trip_and_intrinsics():
    pose = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 1.0, 1.0, 1.2],
                         [1.0, 2.0, -1.0, 0.2, -0.4, 0.1, 0.8, 0.6, 0.9]], dtype=torch.float64)
    pose[:, 3:7] = F.normalize(pose[:, 3:7], dim=-1)
    extr, intr = pose_encoding_to_extri_intri(pose, (48, 64))
    assert extr.shape == (2, 4, 4) and intr.shape == (2, 3, 3)
    torch.testing.assert_close(extr[0, :3, :3], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(extr[:, :3, 3], pose[:, :3])
    expected_k = torch.tensor([[32 / math.tan(0.6), 0, 32], [0, 24 / math.tan(0.5), 24], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(intr[0], expected_k)
    torch.testing.assert_close(extri_intri_to_pose_encoding(extr, intr, (48, 64)), pose)
    torch.testing.assert_close(extri_intri_to_pose_encoding(extr[:, :3], intr, (48, 64)), pose)
    torch.testing.assert_close(rigid_inverse(extr), torch.linalg.inv(extr))


def test_unproject_depth_plane_and_reprojection():
    h, w, d = 4, 6, 2.5
    K = torch.tensor([[5.0, 0, 3.0], [0, 4.0, 2.0], [0, 0, 1]], dtype=torch.float64)
    plane = unproject_depth(torch.full((h, w), d, dtype=torch.float64), K, torch.eye(4, dtype=torch.float64))
    for i, j in [(0, 0), (3, 5), (1, 2)]:
        torch.testing.assert_close(plane[i, j], torch.tensor([(j + 0.5 - 3) * d / 5, (i + 0.5 - 2) * d / 4, d],
                                                             dtype=torch.float64))
    # a moved camera: world points project back to the pixel centres at the given depth
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = _axis_angle((1, 2, 0.5), 0.7)
    w2c[:3, 3] = torch.tensor([0.3, -1.0, 2.0])
    depth = torch.rand(h, w, dtype=torch.float64) + 1
    world = unproject_depth(depth, K, torch.linalg.inv(w2c))
    cam = world @ w2c[:3, :3].T + w2c[:3, 3]
    pix = cam @ K.T
    torch.testing.assert_close(cam[..., 2], depth)
    centres_u = (torch.arange(w, dtype=torch.float64) + 0.5).expand(h, w)
    centres_v = (torch.arange(h, dtype=torch.float64) + 0.5)[:, None].expand(h, w)
    torch.testing.assert_close(pix[..., 0] / pix[..., 2], centres_u)
    torch.testing.assert_close(pix[..., 1] / pix[..., 2], centres_v)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu(net, images, out):
    cuda_net = copy.deepcopy(net).cuda()
    with torch.no_grad():
        o = cuda_net(images.cuda())
    for name in FIELDS:
        torch.testing.assert_close(getattr(o, name).cpu(), getattr(out, name), rtol=5e-3, atol=5e-3, msg=name)


@pytest.mark.gpu
@needs_cuda
def test_full_size_bfloat16_on_cuda():
    """VGGT-1B/AnySplat widths at 224 px: finite outputs, and the cut reproduces forward in bfloat16."""
    with torch.device("cuda"):
        net = ReconNet(ReconConfig(**{**VGGT_1B, "img_size": 224})).to(torch.bfloat16).eval()
    frames = torch.rand(1, 4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        out = net(frames)
        acts, specials = net.activations("blocks.2", frames, return_specials=True)
        again = net.forward_from("blocks.2", acts, frames, specials=specials)
    assert out.gaussian_params.shape == (1, 4, 224, 224, 84)
    for name in FIELDS:
        assert torch.isfinite(getattr(out, name).float()).all(), name
        torch.testing.assert_close(getattr(again, name), getattr(out, name), rtol=1e-2, atol=1e-2, msg=name)
    scenes = to_gaussians(out, frames, voxel_size=0.01)
    assert scenes[0].num <= 4 * 224 * 224 and scenes[0].sh_degree == 4
