"""Reward fine-tuning of the video generator: the scorer, the reward terms, what the gradients reach,
that a short run raises the reward, that the aligned LoRA reaches generation through
model.video.lora (local and s3://), and a Ray Train run interrupted and rerun that ends with the
weights of an uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from vist3a.config import ConfigError, load_config

# 32 px frames (4x4 latents = the 32 px network's token grid), no CFG, 2 denoising steps both with
# gradients, renders at half resolution: a CPU step in about a second.
FAST = ["sampling.height=32", "sampling.width=32", "model.recon.img_size=32", "align.render_stride=2",
        "align.guidance_min=1", "align.guidance_max=1", "align.steps_min=2", "align.steps_max=2", "align.grad_steps=2"]
CPU = torch.device("cpu")
PROMPTS = ["a red barn in the snow", "a lighthouse on a rock"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These steps are many small ops: on a shared 2-core machine a second intra-op thread mostly spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    from vist3a.rewards import write_tiny_clip

    return str(write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0))


def make_trainer(cfg, scorer_dir=None):
    from vist3a.models import build_stitched_decoder, build_video
    from vist3a.rewards import ClipScorer
    from vist3a.train.align import AlignTrainer

    video = build_video(cfg, CPU, torch.float32)
    decoder = build_stitched_decoder(cfg, video.vae, CPU, decode_frames=video.decode)
    scorer = ClipScorer.load(scorer_dir) if cfg.align.reward_weights["quality"] > 0 else None
    return AlignTrainer(cfg, video, decoder, scorer)


def sample(video, seeds=(11, 12)):
    with torch.no_grad():
        return video.sample(PROMPTS, list(seeds), steps=2, guidance=1.0, shift=3.0, frames=5, height=32, width=32)


# ----------------------------------------------------------------------------- scorer and reward terms


def test_scorer_loads_from_a_local_transformers_directory_and_matches_clipmodel(scorer_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from vist3a.rewards import ClipScorer

    scorer = ClipScorer.load(scorer_dir)
    assert scorer.logit_scale == pytest.approx(100.0, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    # preprocessing in torch = transformers' own processor (which quantises to 8 bits first)
    processor = CLIPImageProcessor.from_pretrained(scorer_dir)
    for size in ((32, 40), (64, 72)):
        images = torch.rand(2, 3, *size, generator=g)
        theirs = processor(images=[i.permute(1, 2, 0).numpy() for i in images], return_tensors="pt",
                           do_rescale=False)["pixel_values"]
        ours = scorer.preprocess(images)
        assert ours.shape == theirs.shape == (2, 3, 32, 32)
        assert (ours - theirs).abs().mean() < 0.012
        if size[0] == 32:  # no resize: only the crop and the normalisation, equal up to the 8-bit step
            assert (ours - theirs).abs().max() < 1.01 / 255 / min(scorer.std.flatten().tolist())

    # the score is CLIPModel's own image-text logit divided by its scale, and differentiable in the images
    model = CLIPModel.from_pretrained(scorer_dir).eval()
    tokens = AutoTokenizer.from_pretrained(scorer_dir)(PROMPTS, padding=True, return_tensors="pt")
    images = torch.rand(2, 3, 48, 48, generator=g, requires_grad=True)
    score = scorer(images, PROMPTS)
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=scorer.preprocess(images)).logits_per_image
    torch.testing.assert_close(score.detach(), logits.diagonal() / model.logit_scale.exp(), rtol=1e-4, atol=1e-5)
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in scorer.parameters())
    with pytest.raises(FileNotFoundError, match="align.scorer"):
        ClipScorer.load(scorer_dir + "-missing")


def test_scene_rewards_equal_direct_computations():
    from vist3a.rewards import consistency_reward, coverage, depth_agreement, oversized_scales, representation_reward
    from vist3a.splats.gaussians import Gaussians

    g = torch.Generator().manual_seed(3)
    renders, frames = torch.rand(2, 3, 3, 8, 8, generator=g), torch.rand(2, 3, 3, 8, 8, generator=g)
    torch.testing.assert_close(consistency_reward(renders, frames), -(renders - frames).abs().mean(dim=(1, 2, 3, 4)))
    assert torch.equal(consistency_reward(frames, frames), torch.zeros(2))

    predicted = 1 + torch.rand(2, 3, 8, 8, generator=g)
    alpha = torch.ones(2, 3, 8, 8)
    alpha[:, :, :2] = 0  # empty pixels: their (meaningless) rendered depth must not count
    rendered = predicted * 1.1
    rendered[:, :, :2] = 100.0
    inside = predicted[:, :, 2:]
    expected = -(0.1 * inside).flatten(1).mean(1) / predicted.flatten(1).mean(1)
    torch.testing.assert_close(depth_agreement(rendered, alpha, predicted), expected)
    torch.testing.assert_close(coverage(torch.full((2, 3, 8, 8), 0.75)), torch.full((2,), -0.25))

    def splats(max_scales):
        n = len(max_scales)
        scales = torch.full((n, 3), 1e-3)
        scales[:, 1] = torch.tensor(max_scales)
        return Gaussians(torch.zeros(n, 3), torch.tensor([[1.0, 0, 0, 0]] * n), scales, torch.ones(n), torch.zeros(n, 1, 3))

    scenes = [splats([0.01, 0.25]), splats([0.02, 0.04])]
    torch.testing.assert_close(oversized_scales(scenes, torch.tensor([1.0, 1.0]), 0.05), torch.tensor([-0.1, 0.0]))
    parts = representation_reward(rendered, alpha, predicted, scenes, 0.05)
    torch.testing.assert_close(parts["representation"], parts["depth"] + parts["coverage"] + parts["scale"])


def test_config_refuses_unknown_terms_and_jobs_that_cannot_run():
    from pipelines.align import check_setup

    with pytest.raises(ConfigError, match="unknown reward terms"):
        load_config(None, ["align.reward_weights={clip: 1}"])
    with pytest.raises(ConfigError, match="grad_steps"):
        load_config(None, ["align.grad_steps=3", "align.steps_min=2"])
    with pytest.raises(ValueError, match="align.scorer"):
        check_setup(load_config())  # quality is on by default and needs a scorer
    with pytest.raises(ValueError, match="align.corpus"):
        check_setup(load_config(None, ["align.reward_weights={quality: 0, diffusion: 1}"]))
    assert load_config(None, ["align.reward_weights={consistency: 2}"]).align.reward_weights == {
        "quality": 1.0, "consistency": 2.0, "representation": 0.05, "diffusion": 0.0}


# ----------------------------------------------------------------------------- training


def test_gradients_reach_only_the_lora_and_the_ema_follows_it(scorer_dir):
    cfg = load_config(None, FAST + [f"align.scorer={scorer_dir}", "align.lr=1e-2",
                                    "align.reward_weights={quality: 1, consistency: 1, representation: 1, diffusion: 1}"])
    tr = make_trainer(cfg, scorer_dir)
    comps = tr.video.components
    modules = {"transformer": comps.transformer, "text_encoder": comps.text_encoder, "vae": comps.vae,
               "decoder": tr.decoder, "scorer": tr.scorer}
    before = {(m, n): p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()}
    clips = (torch.rand(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ["a clip caption"])
    metrics = tr.train_step(PROMPTS[:1], clips=clips)

    assert metrics["step"] == 1 and metrics["skipped"] == 0 and math.isfinite(metrics["loss"])
    assert {"reward_quality", "reward_consistency", "reward_depth", "reward_coverage", "reward_scale",
            "reward_representation", "loss_diffusion"} <= set(metrics)
    lora = {n for n, _ in comps.transformer.named_parameters() if "lora_" in n}
    assert lora and set(tr.params) == lora
    for m, mod in modules.items():
        for n, p in mod.named_parameters():
            if m == "transformer" and n in lora:  # B starts at zero, so only B has a gradient at step 0
                assert p.grad is not None and (p.grad.abs().sum() > 0) == ("lora_B" in n), n
            else:
                assert p.grad is None and not p.requires_grad, (m, n)
                assert torch.equal(p, before[(m, n)]), (m, n)
    assert all(not torch.equal(tr.params[n], before[("transformer", n)]) for n in lora if "lora_B" in n)
    # EMA decay at step 0 is min(1/10, cap): shadow = 0.1 * start + 0.9 * new
    for n in lora:
        torch.testing.assert_close(tr.ema[n], 0.1 * before[("transformer", n)] + 0.9 * tr.params[n].detach())


def test_a_short_run_raises_the_reward_beyond_seed_noise(scorer_dir):
    """3 training seeds; the quality reward of fixed prompts and noise seeds before and after 6 steps.
    The gain must be positive for every seed and large against its spread over seeds (mean > 3 std)."""
    gains = []
    for seed in range(3):
        cfg = load_config(None, FAST + [f"align.scorer={scorer_dir}", f"align.seed={seed}", "align.lr=2e-2",
                                        "align.batch_size=2", "align.reward_weights={consistency: 0, representation: 0}"])
        tr = make_trainer(cfg, scorer_dir)
        before = tr.evaluate(PROMPTS, [100, 101])["quality"]
        for _ in range(6):
            tr.train_step(PROMPTS)
        gains.append(tr.evaluate(PROMPTS, [100, 101])["quality"] - before)
    gains = torch.tensor(gains)
    assert (gains > 0).all(), gains
    assert gains.mean() > 3 * gains.std(), gains


def test_the_aligned_lora_changes_generation_only_when_loaded(scorer_dir, tmp_path, s3_bucket):
    from vist3a.generator import SceneGenerator
    from vist3a.models import build_video
    from vist3a.lora import adapters_disabled

    cfg = load_config(None, FAST + [f"align.scorer={scorer_dir}", "align.lr=1e-2"])
    tr = make_trainer(cfg, scorer_dir)
    tr.train_step(PROMPTS[:1])
    paths = tr.export(str(tmp_path / "aligned"))
    adapted = sample(tr.video)
    with adapters_disabled(tr.transformer):
        unadapted = sample(tr.video)

    base = sample(build_video(load_config(None, FAST), CPU, torch.float32))
    torch.testing.assert_close(base, unadapted, rtol=0, atol=0)  # no key: exactly the base model
    aligned_video = build_video(load_config(None, FAST + [f"model.video.lora={paths['lora']}"]), CPU, torch.float32)
    assert not any("lora_" in n for n, _ in aligned_video.components.transformer.named_parameters())  # merged
    aligned = sample(aligned_video)
    assert (aligned - base).abs().max() > 1e-4
    torch.testing.assert_close(aligned, adapted, rtol=1e-4, atol=1e-5)
    ema = sample(build_video(load_config(None, FAST + [f"model.video.lora={paths['lora_ema']}"]), CPU, torch.float32))
    assert (ema - aligned).abs().max() > 0  # EMA weights are 0.9 x the step-1 LoRA

    # through the generate/serve entry point, from s3:// (fetched into the weights cache)
    uri = f"s3://{s3_bucket}/aligned"
    tr.export(uri)
    gen = SceneGenerator(load_config(None, FAST + [f"model.video.lora={uri}/lora", f"storage.cache_dir={tmp_path / 'cache'}",
                                                   "splats.preview_views=0"]))
    torch.testing.assert_close(sample(gen.video), aligned, rtol=1e-5, atol=1e-6)
    assert gen.generate(PROMPTS[:1], [11])[0].num_gaussians > 0
    with pytest.raises(FileNotFoundError, match="model.video.lora"):
        build_video(load_config(None, FAST + [f"model.video.lora={tmp_path / 'nothing'}"]), CPU, torch.float32)


@pytest.mark.ray
def test_an_interrupted_ray_run_reruns_to_the_weights_of_an_uninterrupted_one(ray_local, s3_bucket, scorer_dir, tmp_path):
    """A 1-worker TorchTrainer run with checkpoints on S3 dies at step 3 (no retries left); rerunning the
    same command resumes from the step-2 checkpoint and ends at step 4 with the LoRA and EMA of 4
    uninterrupted steps taken in this process."""
    import s3fs

    from pipelines.align import read_prompt_table, run_align
    from vist3a.lora import read_lora_dir
    from vist3a.train.align import draw_prompts, prompt_share

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red barn in the snow\na lighthouse on a rock\na stone bridge in autumn\n")
    out = f"s3://{s3_bucket}/align"
    overrides = FAST + [f"align.scorer={scorer_dir}", f"align.prompts={prompts}", f"align.output={out}", "align.steps=4",
                        "align.checkpoint_every=2", "align.cpus_per_worker=0.5", "align.name=drill", "align.lr=1e-2",
                        "ray.progress_bars=false"]
    with pytest.raises(Exception, match="failure drill"):
        run_align(load_config(None, overrides + ["align.fail_at_step=3", "align.max_failures=0"]))
    s3 = s3fs.S3FileSystem()
    assert s3.glob(f"{s3_bucket}/align/ray/drill/checkpoint_*/lora_ema/adapter_model.safetensors")
    assert not s3.exists(f"{s3_bucket}/align/meta.json")

    summary = run_align(load_config(None, overrides))
    assert summary["metrics"]["step"] == 4 and summary["metrics"]["resumed_from"] == 2
    _, lora, meta = read_lora_dir(f"{out}/lora")
    _, lora_ema, _ = read_lora_dir(f"{out}/lora_ema")
    assert meta["step"] == 4

    cfg = load_config(None, overrides)
    table, _ = read_prompt_table(cfg)
    ids, texts = table.column("id").to_pylist(), table.column("prompt").to_pylist()
    mine = [texts[i] for i in prompt_share(ids, 0, 1)]
    ref = make_trainer(cfg, scorer_dir)
    while ref.step < 4:
        ref.train_step(draw_prompts(mine, cfg.align, ref.step, 0))
    expected, expected_ema = ref.lora_states()
    assert set(lora) == set(expected)
    for key in expected:
        torch.testing.assert_close(lora[key], expected[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora_ema[key], expected_ema[key], rtol=1e-4, atol=1e-6)
