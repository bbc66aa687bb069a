"""Stitched fine-tuning: LoRA placement and merging, losses, schedule, the generator loading the result,
and a Ray Train run killed mid-way that resumes from its S3 checkpoint to the uninterrupted result."""

from __future__ import annotations

import math

import pytest
import torch

from vist3a.config import load_config
from vist3a.lora import adapters_disabled, add_lora, lora_config_dict, lora_targets, merge_lora
from vist3a.models import build_stitched_decoder
from vist3a.stitching.finetune import StitchFinetuner, distillation_losses, warmup_cosine

FAST = ["stitch_job.render_stride=4", "stitch_job.lora_rank=4", "stitch_job.warmup_steps=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vae():
    from vist3a.video import build_wan

    return build_wan(load_config().model.video).vae


def test_lora_targets_are_the_layers_after_the_cut():
    from vist3a.recon import ReconNet

    net = ReconNet(load_config().model.recon)
    names = lora_targets(net, "blocks.1")
    assert "aggregator.patch_embed.blocks.2.attn.qkv" in names and "aggregator.patch_embed.blocks.3.mlp.fc2" in names
    assert not any(n.startswith(("aggregator.patch_embed.blocks.0.", "aggregator.patch_embed.blocks.1."))
                   for n in names)
    assert "aggregator.patch_embed.patch_embed.proj" not in names
    assert "aggregator.frame_blocks.0.attn.qkv" in names and "camera_head.embed_pose" in names
    assert "depth_head.scratch.output_conv1" in names  # Conv2d of the heads
    assert "depth_head.scratch.output_conv1" not in lora_targets(net, "blocks.1", conv=False)
    modules = dict(net.named_modules())
    assert {type(modules[n]) for n in names} == {torch.nn.Linear, torch.nn.Conv2d}  # no ConvTranspose2d (no LoRA layer)


def test_lora_starts_as_identity_and_merges_exactly():
    from vist3a.recon import ReconNet

    cfg = load_config()
    net = ReconNet(cfg.model.recon).eval()
    images = torch.rand(1, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(images)
    add_lora(net, lora_config_dict(net, "blocks.1", rank=4, alpha=8))
    assert all(("lora_" in n) == p.requires_grad for n, p in net.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(net(images).depth, before.depth)  # B = 0 at init
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        adapted = net(images)
        with adapters_disabled(net):
            torch.testing.assert_close(net(images).depth, before.depth)
        assert (adapted.depth - before.depth).abs().max() > 1e-4
        merge_lora(net)
        assert not any("lora_" in n for n, _ in net.named_parameters())
        merged = net(images)
    torch.testing.assert_close(merged.depth, adapted.depth, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.gaussian_params, adapted.gaussian_params, rtol=1e-4, atol=1e-5)


def test_losses_vanish_on_the_teacher_and_the_schedule_warms_up_then_decays():
    from vist3a.recon import ReconNet

    net = ReconNet(load_config().model.recon).eval()
    images = torch.rand(1, 5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(images)
        weights = load_config().stitch_job.loss_weights
        terms = distillation_losses(out, out, images, {**weights, "render": 0.0})
    assert set(terms) == set(weights) - {"render"}
    assert all(float(v) == 0.0 for v in terms.values())

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_a_step_trains_only_the_stitching_layer_and_lora_and_the_generator_loads_the_result(vae, stitch_corpus, tmp_path):
    from vist3a.io.corpus import Corpus, clip_views
    from vist3a.models import build_video
    from vist3a.stitching import save_stitch_checkpoint

    cfg = load_config(None, FAST)
    ft = StitchFinetuner(build_stitched_decoder(cfg, vae, "cpu", load_weights=False), vae, cfg.stitch_job, vae_size=64)
    base = {n: p.detach().clone() for n, p in ft.decoder.named_parameters() if "lora_" not in n}
    frames = clip_views(next(Corpus(stitch_corpus).iter_clips()), 5, 64)[None]
    m1 = ft.train_step(frames)
    m2 = ft.train_step(frames)
    assert m1["step"] == 1 and m2["step"] == 2 and all(math.isfinite(v) for v in m2.values())
    assert {"loss_depth", "loss_pose", "loss_means", "loss_render"} <= set(m2)
    changed = {n for n, p in ft.decoder.named_parameters() if n in base and not torch.equal(p, base[n])}
    assert changed == {"stitch.conv.weight", "stitch.conv.bias"}
    assert any(p.abs().sum() > 0 for n, p in ft.decoder.named_parameters() if "lora_B" in n)

    uri = str(tmp_path / "stitch.pt")
    save_stitch_checkpoint(uri, ft.export({"note": "test"}))
    gen_cfg = load_config(None, [f"model.stitch.weights={uri}"])
    video = build_video(gen_cfg, torch.device("cpu"), torch.float32)
    decoder = build_stitched_decoder(gen_cfg, video.vae, torch.device("cpu"), decode_frames=video.decode)
    torch.testing.assert_close(decoder.stitch.conv.weight, ft.decoder.stitch.conv.weight)
    from vist3a.video import encode_frames

    with torch.no_grad():
        latents = encode_frames(vae, frames)
        expected = ft.student(latents, frames)
        got = decoder.recon.forward_from(decoder.cut, decoder.tokens(latents), frames)
    torch.testing.assert_close(got.depth, expected.depth, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pose_enc, expected.pose_enc, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="model.stitch.cut=blocks.1"):
        build_stitched_decoder(load_config(None, [f"model.stitch.weights={uri}", "model.stitch.cut=blocks.2"]),
                               video.vae, torch.device("cpu"), decode_frames=video.decode)


def test_finetune_killed_midway_resumes_from_s3_and_matches_an_uninterrupted_run(ray_local, s3_bucket, stitch_corpus, vae):
    """2 workers (DDP on gloo); a worker fails at step 3 -> FailureConfig restarts the run from its step-2
    checkpoint on S3 -> step 4, with the weights of one uninterrupted process stepping on the same global
    batches; resubmitting the command with more steps goes on from step 4."""
    import s3fs

    from pipelines.stitch import ClipSampler, run_finetune
    from vist3a.io.corpus import Corpus
    from vist3a.stitching import read_stitch_checkpoint

    out = f"s3://{s3_bucket}/stitch"
    overrides = FAST + [f"stitch_job.corpus={stitch_corpus}", f"stitch_job.output={out}", "stitch_job.steps=4",
                        "stitch_job.checkpoint_every=2", "stitch_job.cpus_per_worker=0.5", "stitch_job.name=drill"]
    cfg = load_config(None, overrides + ["stitch_job.workers=2", "stitch_job.fail_at_step=3", "stitch_job.max_failures=1"])
    summary = run_finetune(cfg)
    assert summary["metrics"]["step"] == 4
    assert summary["metrics"]["resumed_from"] == 2  # the restarted attempt began at the step-2 checkpoint
    s3 = s3fs.S3FileSystem()
    assert s3.glob(f"{s3_bucket}/stitch/ray/drill/checkpoint_*/state.pt")
    final = read_stitch_checkpoint(f"{out}/stitch.pt")
    assert final["meta"]["step"] == 4 and final["lora"] and final["cut"] == "blocks.1"

    # the same 4 steps in this process, never interrupted, each on both workers' clips as one batch
    ref_cfg = load_config(None, overrides)
    ref = StitchFinetuner(build_stitched_decoder(ref_cfg, vae, "cpu", load_weights=False), vae, ref_cfg.stitch_job, vae_size=64)
    samplers = [ClipSampler(Corpus(stitch_corpus), rank, 2, 5, 1, 64, ref_cfg.stitch_job.seed) for rank in (0, 1)]
    while ref.step < 4:
        ref.train_step(torch.cat([sampler.batch(ref.step) for sampler in samplers]))
    expected = ref.export()
    # gloo's all-reduce sums in another order than one batch does: float noise, far below one step's change (~lr)
    torch.testing.assert_close(final["stitch"]["conv.weight"], expected["stitch"]["conv.weight"], rtol=1e-4, atol=1e-5)
    for key, value in expected["lora"].items():
        torch.testing.assert_close(final["lora"][key], value, rtol=1e-4, atol=1e-5)

    more = run_finetune(load_config(None, overrides + ["stitch_job.steps=5"]))
    assert more["metrics"]["step"] == 5 and more["metrics"]["resumed_from"] == 4
    assert read_stitch_checkpoint(f"{out}/stitch.pt")["meta"]["step"] == 5
