"""Layer search: streaming ridge regression against numpy, conv rows against StitchingLayer, a planted
layer found with R^2 = 1, and the Ray Train search with 2 workers against one in-process pass."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vist3a.config import load_config
from vist3a.io.corpus import clip_views
from vist3a.stitching import StitchingLayer, StitchSpec, read_stitch_checkpoint, upsample_time
from vist3a.stitching.search import (
    LayerSearch,
    NormalEquations,
    best_layer,
    conv_patches,
    is_heldout,
    residual_stats,
    ridge_solve,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(n: int, d: int, c: int, seed: int, noise: float = 0.1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    w = rng.normal(size=(d, c))
    y = x @ w + rng.normal(size=c) + noise * rng.normal(size=(n, c))
    return x, y


def _accumulate(x, y, chunks: int = 3, split: str = "fit", eq=None) -> NormalEquations:
    eq = eq or NormalEquations(x.shape[1], {"layer": y.shape[1]})
    for xs, ys in zip(np.array_split(x, chunks), np.array_split(y, chunks)):
        eq.add(torch.from_numpy(xs).float(), {"layer": torch.from_numpy(ys).float()}, split)
    return eq


@pytest.mark.parametrize("bias", [True, False])
def test_ridge_without_penalty_equals_lstsq(bias):
    x, y = _problem(200, 7, 3, seed=1)
    x, y = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)  # what add() sees
    eq = _accumulate(x, y)
    solution = ridge_solve(*eq.system("layer")[:2], n=eq.rows(), lam=0.0, bias=bias).numpy()
    design = np.hstack([x, np.ones((len(x), 1))]) if bias else x
    expected = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(solution, expected, rtol=1e-7, atol=1e-9)

    # closed-form error on other rows equals the error computed from the rows themselves
    xh, yh = _problem(90, 7, 3, seed=2)
    xh, yh = xh.astype(np.float32).astype(np.float64), yh.astype(np.float32).astype(np.float64)
    _accumulate(xh, yh, split="heldout", eq=eq)
    xtx, xty, yy, n = eq.system("layer", "heldout")
    mse, r2 = residual_stats(torch.from_numpy(solution), xtx, xty, yy, n, bias)
    pred = (np.hstack([xh, np.ones((len(xh), 1))]) if bias else xh) @ solution
    sse = ((pred - yh) ** 2).sum()
    assert mse == pytest.approx(sse / yh.size, rel=1e-7)
    assert r2 == pytest.approx(1 - sse / ((yh - yh.mean(0)) ** 2).sum(), rel=1e-7)


def test_ridge_penalty_leaves_intercept_free():
    x, y = _problem(60, 5, 2, seed=3, noise=1.0)
    x, y = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    lam = 0.3
    eq = _accumulate(x, y)
    solution = ridge_solve(*eq.system("layer")[:2], n=eq.rows(), lam=lam).numpy()
    # ridge as least squares on extra rows sqrt(lam n) I for the weights and 0 for the intercept
    design = np.vstack([np.hstack([x, np.ones((60, 1))]), np.hstack([math.sqrt(lam * 60) * np.eye(5), np.zeros((5, 1))])])
    expected = np.linalg.lstsq(design, np.vstack([y, np.zeros((5, 2))]), rcond=None)[0]
    np.testing.assert_allclose(solution, expected, rtol=1e-7, atol=1e-9)


def test_merged_halves_equal_one_pass():
    x, y = _problem(101, 4, 3, seed=4)
    whole = _accumulate(x, y, chunks=1)
    a, b = _accumulate(x[:40], y[:40], chunks=2), _accumulate(x[40:], y[40:], chunks=2)
    merged = a.merge(b)
    for key, value in whole.state.items():
        torch.testing.assert_close(merged.state[key], value, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("spec", ["conv3d_k3x3x3_o7_p1x1x1", "conv3d_k5x3x3_o6_s1x2x2_p2x1x1", "conv2d_k3_o5_d2_p2",
                                  "conv3d_k2x3x1_o3_s2x1x2_d1x2x1"])
def test_conv_rows_reproduce_the_stitching_layer(spec):
    torch.manual_seed(0)
    layer = StitchingLayer(spec, in_channels=4)
    z = torch.randn(2, 4, 5, 8, 9)
    rows = conv_patches(z, layer.spec)
    expected = StitchingLayer.to_tokens(layer(z)).reshape(-1, layer.spec.out_channels)
    got = rows @ layer.conv.weight.reshape(layer.spec.out_channels, -1).T + layer.conv.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_features_at_several_cuts_in_one_pass_equal_activations():
    from vist3a.recon import ReconNet

    cfg = load_config()
    net = ReconNet(cfg.model.recon).eval()
    images = torch.rand(1, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cuts = ["blocks.0", "blocks.2"]
    with torch.no_grad():
        feats = net.activations_at(cuts, images)
        for cut in cuts:
            torch.testing.assert_close(feats[cut], net.activations(cut, images), rtol=0, atol=0)


def test_heldout_split_is_stable_and_near_the_fraction():
    ids = [f"clip-{i}" for i in range(2000)]
    flags = [is_heldout(i, 0.2) for i in ids]
    assert flags == [is_heldout(i, 0.2) for i in ids]
    assert 0.17 < sum(flags) / len(flags) < 0.23
    assert not any(is_heldout(i, 0.0) for i in ids)


def test_planted_layer_is_found_with_r2_one():
    """Layer blocks.1 of a fake network is an exact Conv3d of the time-upsampled raw latents; the
    others are not linear in them. The search must pick blocks.1 with R^2 ~ 1 on held-out clips and
    recover a stitching layer that reproduces it."""
    from vist3a.video import build_wan, denormalize_latents, encode_frames

    cfg = load_config()
    vae = build_wan(cfg.model.video).vae
    spec = StitchSpec.parse("conv3d_k3x3x3_o8_p1x1x1")
    torch.manual_seed(3)
    planted = StitchingLayer(spec, in_channels=16)
    mix = torch.randn(3 * 8 * 8, 8) / 8

    def encode(frames):
        return denormalize_latents(vae, encode_frames(vae, frames))

    def features(images):
        b, t = images.shape[:2]
        exact = StitchingLayer.to_tokens(planted(upsample_time(encode(images), t)))
        pixels = images.unfold(3, 8, 8).unfold(4, 8, 8).permute(0, 1, 3, 4, 2, 5, 6).reshape(b, t, 64, -1)
        return {"blocks.0": torch.tanh(4 * pixels @ mix), "blocks.1": exact, "blocks.2": torch.tanh(3 * exact) ** 2}

    search = LayerSearch(encode=encode, features=features, channels={f"blocks.{i}": 8 for i in range(3)}, spec=spec,
                         in_channels=16, vae_size=64, image_size=64)
    gen = torch.Generator().manual_seed(5)
    smooth = lambda x: torch.nn.functional.avg_pool2d(x.flatten(0, 1), 5, 1, 2).unflatten(0, x.shape[:2])  # noqa: E731
    for heldout in ([False, False], [False, False], [False, True], [True, False]):
        search.add(smooth(torch.rand(2, 5, 3, 64, 64, generator=gen)), heldout)
    fits = {f.name: f for f in search.solve(lam=1e-9)}
    assert best_layer(list(fits.values())).name == "blocks.1"
    assert fits["blocks.1"].r2_heldout > 0.9999
    assert fits["blocks.0"].r2_heldout < 0.95 and fits["blocks.2"].r2_heldout < 0.95

    # the fitted weights, in a StitchingLayer, reproduce the planted layer on new clips
    fitted = StitchingLayer(spec, in_channels=16)
    fitted.conv.weight.data.copy_(fits["blocks.1"].weight)
    fitted.conv.bias.data.copy_(fits["blocks.1"].bias)
    with torch.no_grad():
        z = upsample_time(encode(smooth(torch.rand(1, 5, 3, 64, 64, generator=gen))), 5)
        expected, got = planted(z), fitted(z)
    assert ((got - expected).pow(2).mean() / expected.var()).item() < 1e-4


def test_search_on_ray_two_workers_equals_one_pass(ray_local, s3_server, s3_bucket, stitch_corpus, tmp_path):
    """2 Ray Train workers (corpus and outputs on the S3 server) give the solution of one in-process pass."""
    import s3fs

    from pipelines.stitch import run_search
    from vist3a.io.corpus import Corpus
    from vist3a.models import build_recon
    from vist3a.video import build_wan

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    s3.put(stitch_corpus + "/", f"{s3_bucket}/corpus/", recursive=True)
    cfg = load_config(None, [f"stitch_job.corpus=s3://{s3_bucket}/corpus", f"stitch_job.output=s3://{s3_bucket}/out",
                             "stitch_job.workers=2", "stitch_job.cpus_per_worker=0.5", "stitch_job.heldout_fraction=0.34",
                             "stitch_job.batch_size=2", "stitch_job.ridge_lambda=0.001"])
    table = run_search(cfg)

    # the same pass in this process, one clip at a time, over the local copy
    job = cfg.stitch_job
    local = LayerSearch.for_models(build_wan(cfg.model.video).vae, build_recon(cfg, "cpu"), cfg.model.stitch.spec,
                                   None, vae_size=64)
    for clip in Corpus(stitch_corpus).iter_clips():
        local.add(clip_views(clip, job.views, 64, job.seed)[None], [is_heldout(clip.id, job.heldout_fraction)])
    fits = local.solve(job.ridge_lambda)

    assert table["workers"] == 2
    assert table["clips_fit"] + table["clips_heldout"] == 6
    assert (table["clips_fit"], table["clips_heldout"]) == (local.clips["fit"], local.clips["heldout"])
    assert table["best"] == best_layer(fits).name
    stored = json.loads(s3.cat_file(f"{s3_bucket}/out/search/table.json"))
    assert stored["best"] == table["best"]
    for f, row in zip(fits, table["layers"]):
        assert row["layer"] == f.name
        assert row["r2_heldout"] == pytest.approx(f.r2_heldout, rel=1e-6, abs=1e-9)
        payload = read_stitch_checkpoint(row["weights"])
        assert payload["cut"] == f.name
        # float32 forward passes on 1 thread (workers) vs 2 (here) round differently; the fit amplifies that a little
        scale = float(f.weight.abs().max())
        torch.testing.assert_close(payload["stitch"]["conv.weight"], f.weight, rtol=1e-3, atol=1e-4 * scale)
        torch.testing.assert_close(payload["stitch"]["conv.bias"], f.bias, rtol=1e-3, atol=1e-4 * scale)
    assert read_stitch_checkpoint(table["best_weights"])["cut"] == table["best"]
