"""Per-scene scores (vist3a.scores), each against an independent computation, on tiny random scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vist3a.config import ScorersConfig
from vist3a.scores import (AestheticHead, SceneScorer, camera_scores, consistency_scores, interpolate_cameras,
                           load_aesthetic_head, psnr, splat_scores, ssim, write_tiny_aesthetic_head)
from vist3a.splats.gaussians import Cameras, Gaussians, intrinsics_from_fov, look_at, rgb_to_sh0
from vist3a.splats.render import render

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    """A tiny random CLIP (transformers' format) and a LAION-layout aesthetic head for its 32-dim features."""
    from vist3a.rewards import write_tiny_clip

    root = tmp_path_factory.mktemp("scorers")
    clip = write_tiny_clip(root / "clip", seed=0)
    head = write_tiny_aesthetic_head(root / "aesthetic.pth", dim=32, seed=1)
    return ScorersConfig(clip=str(clip), aesthetic_clip=str(clip), aesthetic_head=str(head), views=3, render_size=32)


def orbit(n: int = 4, size: int = 32, radius: float = 3.0) -> Cameras:
    angles = torch.linspace(-0.4, 0.4, n)
    eyes = torch.stack([radius * torch.sin(angles), torch.zeros(n), -radius * torch.cos(angles)], -1)
    vm = look_at(eyes, torch.zeros(3))
    return Cameras(vm, intrinsics_from_fov(50, size, size).expand(n, 3, 3).clone(), size, size)


def blob_scene(n: int = 400, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=gen) - 0.5
    quats = F.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    scales = 0.02 + 0.05 * torch.rand(n, 3, generator=gen)
    opac = torch.rand(n, generator=gen)
    sh = rgb_to_sh0(torch.rand(n, 3, generator=gen))[:, None]
    return Gaussians(means, quats, scales, opac, sh)


# ----------------------------------------------------------------------------- image metrics


def numpy_ssim(a: np.ndarray, b: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """SSIM by the definition: weighted statistics of every 11x11 window, one window at a time."""
    x = np.arange(win) - (win - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - win + 1):
            for j in range(a.shape[2] - win + 1):
                pa, pb = a[ch, i:i + win, j:j + win], b[ch, i:i + win, j:j + win]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 20, 24, generator=gen)
    b = (a + 0.1 * torch.randn(2, 3, 20, 24, generator=gen)).clamp(0, 1)
    for i in range(2):
        mse = np.mean((a[i].numpy().astype(np.float64) - b[i].numpy()) ** 2)
        assert psnr(a, b)[i].item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
        assert ssim(a, b)[i].item() == pytest.approx(numpy_ssim(a[i].double().numpy(), b[i].double().numpy()), abs=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert ssim(a, b).max() < 0.99


def test_consistency_of_a_scene_against_its_own_renders_and_noisy_ones():
    g, cams = blob_scene(), orbit()
    frames = render(g, cams).colors.permute(0, 3, 1, 2).clamp(0, 1)
    same = consistency_scores(g, cams, frames, renderer="torch")
    assert same["consistency_psnr"] == pytest.approx(100.0, abs=1e-3)  # MSE 0, capped at 1e-10
    assert same["consistency_ssim"] == pytest.approx(1.0, abs=1e-6)
    noisy = (frames + 0.05 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    got = consistency_scores(g, cams, noisy, renderer="torch")
    want = np.mean([10 * math.log10(1 / np.mean((frames[v].double().numpy() - noisy[v].double().numpy()) ** 2))
                    for v in range(cams.num)])
    assert got["consistency_psnr"] == pytest.approx(want, abs=1e-3)
    assert 0 < got["consistency_ssim"] < 0.99
    assert math.isnan(consistency_scores(g, cams, None)["consistency_psnr"])
    with pytest.raises(ValueError, match="do not match"):
        consistency_scores(g, cams, frames[:2])


# ----------------------------------------------------------------------------- cameras


def test_interpolated_path_keeps_the_cameras_and_halves_the_turn():
    angle = math.radians(60)
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    vm = torch.eye(4).repeat(2, 1, 1)
    vm[1, :3, :3] = rot
    vm[1, :3, 3] = -(rot @ torch.tensor([2.0, 0, 0]))  # centre at (2, 0, 0)
    ks = intrinsics_from_fov(50, 32, 32).expand(2, 3, 3).clone()
    ks[1, 0, 0] += 10
    cams = Cameras(vm, ks, 32, 32)
    path = interpolate_cameras(cams, 3)
    assert torch.allclose(path.viewmats[0], vm[0], atol=1e-5) and torch.allclose(path.viewmats[2], vm[1], atol=1e-5)
    mid = path.viewmats[1, :3, :3].double()
    turn = math.degrees(math.acos((float(torch.trace(mid)) - 1) / 2))
    assert turn == pytest.approx(30.0, abs=1e-3)
    assert torch.allclose(path.centers[1], torch.tensor([1.0, 0, 0]), atol=1e-5)
    assert path.Ks[1, 0, 0].item() == pytest.approx(ks[0, 0, 0].item() + 5, abs=1e-4)


def test_camera_path_sanity():
    cams = orbit(6)
    s = camera_scores(cams)
    steps = (cams.centers[1:] - cams.centers[:-1]).norm(dim=-1)
    assert s["camera_ok"] == 1.0
    assert s["camera_jump"] == pytest.approx(float(steps.max() / steps.median()), rel=1e-5)
    assert s["camera_max_turn_deg"] == pytest.approx(math.degrees(0.8 / 5), abs=1e-3)
    jumped = cams.viewmats.clone()
    jumped[-1, :3, 3] -= jumped[-1, :3, :3] @ torch.tensor([5.0, 0, 0])  # the last centre moves 5 units
    assert camera_scores(Cameras(jumped, cams.Ks, 32, 32))["camera_jump"] > 10
    sheared = cams.viewmats.clone()
    sheared[2, 0, 1] += 0.1
    assert camera_scores(Cameras(sheared, cams.Ks, 32, 32))["camera_ok"] == 0.0
    flipped = cams.Ks.clone()
    flipped[0, 0, 0] *= -1
    assert camera_scores(Cameras(cams.viewmats, flipped, 32, 32))["camera_ok"] == 0.0


# ----------------------------------------------------------------------------- splat statistics


def test_splat_statistics_and_floaters_against_numpy():
    g = blob_scene(1000)
    far = torch.tensor([[30.0, 0, 0], [0, -40.0, 0], [0, 0, 50.0]]).repeat(4, 1)  # 12 floaters
    g = Gaussians.cat([g, Gaussians(far, torch.tensor([[1.0, 0, 0, 0]]).repeat(12, 1), torch.full((12, 3), 0.01),
                                    torch.full((12,), 0.01), torch.zeros(12, 1, 3))])
    s = splat_scores(g, quantile=0.01, margin=0.1, transparent_below=0.05)
    m, op, big = g.means.double().numpy(), g.opacities.double().numpy(), g.scales.double().numpy().max(1)
    lo, hi = np.quantile(m, 0.01, axis=0), np.quantile(m, 0.99, axis=0)
    box_lo, box_hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    outside = ((m < box_lo) | (m > box_hi)).any(1)
    extent = np.linalg.norm(hi - lo)
    assert s["floater_frac"] == pytest.approx(outside.mean(), abs=1e-9)
    assert outside.sum() == 12  # exactly the far points: the blob itself sits inside the grown box
    assert s["opacity_mean"] == pytest.approx(op.mean(), abs=1e-6)
    assert s["transparent_frac"] == pytest.approx((op < 0.05).mean(), abs=1e-9)
    # torch's median is the lower middle value; numpy's averages the two: compare with the lower one
    assert s["scale_median_rel"] == pytest.approx(np.sort(big)[(len(big) - 1) // 2] / extent, rel=1e-5)
    assert s["scale_p99_rel"] == pytest.approx(np.quantile(big, 0.99) / extent, rel=1e-5)


# ----------------------------------------------------------------------------- model scores


def test_clip_and_aesthetic_scores_against_the_models_directly(tiny_scorers):
    from transformers import AutoTokenizer, CLIPModel

    scorer = SceneScorer(["clip", "aesthetic", "cameras"], tiny_scorers, renderer="torch")
    g, cams, prompt = blob_scene(), orbit(), "a pile of coloured blobs"
    views = scorer.render_path(g, cams)
    assert views.shape == (3, 3, 32, 32)
    got = scorer.score(g, cams, prompt, views=views)
    assert set(got) == {"clip_score", "aesthetic", "camera_ok", "camera_jump", "camera_max_turn_deg"}

    model = CLIPModel.from_pretrained(tiny_scorers.clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_scorers.clip)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(views - mean) / std)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        ids = tok([prompt], return_tensors="pt")
        txt = model.get_text_features(**ids)
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    assert got["clip_score"] == pytest.approx(float(100 * (img @ txt.T).mean()), abs=1e-3)
    state = torch.load(tiny_scorers.aesthetic_head, weights_only=True)
    x = img
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert got["aesthetic"] == pytest.approx(float(x.mean()), abs=1e-4)


def test_laion_linear_head_and_a_wrong_file(tmp_path):
    torch.save({"weight": torch.ones(1, 4), "bias": torch.tensor([0.5])}, tmp_path / "linear.pth")
    head = load_aesthetic_head(str(tmp_path / "linear.pth"))
    assert head(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).item() == pytest.approx(10.5)
    torch.save({"fc.weight": torch.ones(1, 4)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        load_aesthetic_head(str(tmp_path / "other.pth"))
    assert isinstance(AestheticHead(8), torch.nn.Module)


def test_a_missing_scorer_fails_at_start_up_saying_where_it_looked(tmp_path, tiny_scorers):
    missing = str(tmp_path / "no-such-clip")
    with pytest.raises(FileNotFoundError, match=r"evaluate\.scorers\.clip .*no-such-clip.*looked"):
        SceneScorer(["clip"], ScorersConfig(clip=missing))
    with pytest.raises(FileNotFoundError, match=r"evaluate\.scorers\.aesthetic_head is not set"):
        SceneScorer(["aesthetic"], ScorersConfig(aesthetic_clip=tiny_scorers.clip))
    assert SceneScorer(["splats", "floaters"]).columns == ["opacity_mean", "transparent_frac", "scale_median_rel",
                                                             "scale_p99_rel", "floater_frac"]


def test_scores_are_computed_where_the_scene_is_made_and_land_in_meta(tmp_path):
    """generate.scores in the generator: consistency against the very frames the decoder saw; meta.json carries them."""
    import json

    from vist3a.config import load_config
    from vist3a.generator import SceneGenerator, scene_files

    cfg = load_config(None, ["generate.scores=[consistency,splats,cameras]", "splats.preview_views=0", "sampling.steps=2"])
    gen = SceneGenerator(cfg)
    seen = {}
    forward = gen.decoder.forward

    def capture(*args, **kwargs):
        seen["out"] = forward(*args, **kwargs)
        return seen["out"]

    gen.decoder.forward = capture
    scene = gen.generate(["a red barn"], [3])[0]
    frames = seen["out"].frames[0]
    want = consistency_scores(seen["out"].gaussians[0], seen["out"].cameras[0], frames, renderer="torch")
    assert scene.scores["consistency_psnr"] == pytest.approx(want["consistency_psnr"], abs=1e-4)
    assert scene.scores["consistency_ssim"] == pytest.approx(want["consistency_ssim"], abs=1e-5)
    assert scene.scores["camera_ok"] == 1.0 and "floater_frac" not in scene.scores
    meta = json.loads(scene_files(scene, gen.meta(scene))["meta.json"])
    assert meta["scores"] == pytest.approx(scene.scores) and "score_s" in meta["timings"]

    # Serve's result record carries them (the model side of pipelines.serve, run here without Ray)
    from pipelines.serve import run_batch
    from vist3a.io.scene_store import SceneStore, new_scene_id

    store, sid = SceneStore(str(tmp_path / "store")), new_scene_id()
    store.put_status(sid, "queued")
    gen.decoder.forward = forward
    (outcome,) = run_batch(gen, store, [{"id": sid, "prompt": "a red barn", "seed": 3}])
    assert outcome["status"] == "done", outcome
    record = store.get_status(sid)["result"]["scores"]
    assert record == pytest.approx(scene.scores)  # same prompt and seed: the same scene, the same scores
    assert not load_config().generate.scores  # off by default
