"""Released weights -> our modules (no real files here): converters on reduced-width state dicts in
the released layouts, full-size parameter counts on the meta device, readable mismatch reports,
weight locations (local, s3:// with manifest verification, hub ids offline), the start-up check
and `vist3a weights check`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from vist3a.cli import main
from vist3a.config import ReconConfig, StorageConfig, VideoModelConfig, build_config
from vist3a.recon import ReconNet
from vist3a.weights import (
    Checkpoint,
    CheckpointMismatchError,
    ManifestMismatchError,
    WeightsError,
    check_weights,
    load_pretrained_recon,
    load_recon_state,
    plan_recon,
    resolve,
    write_manifest,
)
from vist3a.weights.locate import COMPLETE_NAME, MANIFEST_NAME, classify

# Released layout at reduced width: patch 14 as released, 4x4 tokens, 2 heads of 16 channels.
SMALL = dict(img_size=56, patch_size=14, embed_dim=32, encoder_depth=3, encoder_heads=2, aggregator_depth=4,
             aggregator_heads=2, camera_iters=2, camera_trunk_depth=1, dpt_features=16,
             dpt_out_channels=(8, 16, 32, 32), dpt_layers=(0, 1, 2, 3))
VGGT_HEADS = ("camera", "depth", "points")
ANYSPLAT_HEADS = ("camera", "depth", "gaussians")
FIELDS = ("extrinsics", "intrinsics", "depth", "depth_conf", "points", "points_conf", "gaussian_params")


def small(**kw) -> ReconConfig:
    return ReconConfig(**{**SMALL, **kw})


def released_vggt(net: ReconNet) -> dict[str, torch.Tensor]:
    """Our state dict + the VGGT-1B keys we do not build (DINOv2 mask token, a track head)."""
    c = net.cfg.embed_dim
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["aggregator.patch_embed.mask_token"] = torch.zeros(1, c)
    sd["track_head.feature_extractor.norm.weight"] = torch.ones(2 * c)
    sd["track_head.tracker.corr_mlp.fc1.weight"] = torch.randn(c, 2 * c)
    return sd


def released_anysplat(net: ReconNet) -> dict[str, torch.Tensor]:
    """AnySplat: the VGGT names under `encoder.`, plus its training-time teacher copy."""
    sd = {f"encoder.{k}": v for k, v in released_vggt(net).items() if not k.startswith("track_head.")}
    sd["encoder.distill_aggregator.camera_token"] = sd["encoder.aggregator.camera_token"].clone()
    sd["encoder.distill_depth_head.norm.weight"] = sd["encoder.depth_head.norm.weight"].clone()
    return sd


def images(size=56, views=3) -> torch.Tensor:
    return torch.rand(1, views, 3, size, size, generator=torch.Generator().manual_seed(0))


def assert_same_outputs(a, b, atol=0.0) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


# ----------------------------------------------------------------------------- converters


def test_vggt_layout_loads_strictly_and_reproduces_the_source_network():
    src = ReconNet(small(heads=VGGT_HEADS, seed=11)).eval()
    dst = ReconNet(small(heads=VGGT_HEADS, seed=12)).eval()
    report = load_recon_state(dst, released_vggt(src))
    assert report.ok and report.layout == "VGGT"
    assert set(report.ignored) == {"aggregator.patch_embed.mask_token", "track_head.feature_extractor.norm.weight",
                                   "track_head.tracker.corr_mlp.fc1.weight"}
    assert "point-tracking" in report.ignored["track_head.tracker.corr_mlp.fc1.weight"]
    assert len(report.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with torch.no_grad():
        assert_same_outputs(dst(images()), src(images()))
    text = str(report)
    assert "track_head.* (2 keys)" in text and "OK, loads strictly" in text


def test_position_grid_resized_once_equals_resizing_on_every_forward():
    """A 5x5 position grid (cf. VGGT's 37x37 at 518 px) loaded into a network built for 4x4 tokens
    (cf. AnySplat at 448 px) must give what the source network computes when it interpolates its
    grid on the fly for 56 px inputs."""
    src = ReconNet(small(img_size=70, heads=VGGT_HEADS, seed=11)).eval()
    assert src.state_dict()["aggregator.patch_embed.pos_embed"].shape == (1, 26, 32)
    dst = ReconNet(small(heads=VGGT_HEADS, seed=12)).eval()
    report = load_recon_state(dst, released_vggt(src))
    assert report.ok and "5x5 -> 4x4" in report.adapted["aggregator.patch_embed.pos_embed"]
    assert dst.state_dict()["aggregator.patch_embed.pos_embed"].shape == (1, 17, 32)
    with torch.no_grad():
        assert_same_outputs(dst(images(56)), src(images(56)), atol=1e-5)


def test_anysplat_layout_from_safetensors_directory_matches_source(tmp_path):
    cfg = small(heads=ANYSPLAT_HEADS, sh_degree=4, seed=11)
    src = ReconNet(cfg).eval()
    sd = released_anysplat(src)
    assert sd["encoder.gaussian_param_head.scratch.output_conv2.2.weight"].shape[0] == 84  # AnySplat's 84 channels
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    net, report = load_pretrained_recon(cfg, tmp_path)
    assert report.ok and report.layout == "AnySplat" and not net.training
    assert {r for r in report.ignored.values()} == {
        "DINOv2's masked-image-modelling token: used only in DINOv2 pre-training",
        "AnySplat's frozen VGGT teacher copy: used only by its distillation training"}
    with torch.no_grad():
        a, b = net(images()), src(images())
    assert a.gaussian_params.shape == (1, 3, 56, 56, 84)
    assert_same_outputs(a, b)


def test_dtype_control_and_training_checkpoint_wrapping(tmp_path):
    """A .pt training checkpoint ({'state_dict': {'model.encoder.*': ...}}) loads, in bfloat16."""
    cfg = small(heads=ANYSPLAT_HEADS, sh_degree=4, seed=11)
    src = ReconNet(cfg).eval()
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in released_anysplat(src).items()}},
               tmp_path / "model.pt")
    net, report = load_pretrained_recon(cfg, tmp_path / "model.pt", dtype=torch.bfloat16)
    assert report.ok and report.layout.startswith("AnySplat")
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    # non-persistent buffers are restored, not left as uninitialised memory
    mean = net.aggregator.image_mean.flatten().float()
    torch.testing.assert_close(mean, torch.tensor([0.485, 0.456, 0.406]), atol=2e-3, rtol=0)
    torch.testing.assert_close(net.state_dict()["camera_head.embed_pose.weight"].float(),
                               src.state_dict()["camera_head.embed_pose.weight"].bfloat16().float())
    with torch.no_grad():
        out, ref = net(images()), src(images())
    assert torch.isfinite(out.depth.float()).all()
    assert (out.depth.float() - ref.depth).abs().max() < 0.1 * ref.depth.abs().max()


def test_mismatched_checkpoint_gives_a_readable_report(tmp_path):
    net = ReconNet(small(heads=VGGT_HEADS, seed=11))
    sd = released_vggt(net)
    del sd["camera_head.pose_branch.fc2.bias"]
    sd["depth_head.projects.0.weight"] = torch.zeros(9, 64, 1, 1)
    sd["aggregator.extra_thing"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_recon_state(ReconNet(small(heads=VGGT_HEADS)), sd)
    text = str(err.value)
    assert "MISSING (the network has them, the checkpoint does not): 1" in text
    assert "camera_head.pose_branch.fc2.bias [9]" in text
    assert "depth_head.projects.0.weight: [9, 64, 1, 1] vs [8, 64, 1, 1]" in text
    assert "UNEXPECTED" in text and "aggregator.extra_thing [3]" in text
    assert "does NOT fit" in text
    # the same finding through `vist3a weights check`, from the file header alone
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    cfg = build_config({"model": {"recon": {**SMALL, "heads": list(VGGT_HEADS), "source": "pretrained",
                                            "weights": str(tmp_path)}}})
    result = check_weights(cfg)
    assert not result.ok
    shown = str(result)
    assert "[INVALID] recon" in shown and "camera_head.pose_branch.fc2.bias [9]" in shown


def test_wrong_release_for_the_config_is_reported():
    """VGGT weights for an AnySplat config: the Gaussian head is missing; VGGT's point head is not built."""
    src = ReconNet(small(heads=VGGT_HEADS, sh_degree=4))
    dst_shapes = {k: tuple(v.shape) for k, v in ReconNet(small(heads=ANYSPLAT_HEADS, sh_degree=4)).state_dict().items()}
    sd = released_vggt(src)
    plan = plan_recon({k: tuple(v.shape) for k, v in sd.items()}, None, dst_shapes, ANYSPLAT_HEADS)
    assert not plan.report.ok
    assert plan.report.missing and all(k.startswith("gaussian_param_head.") for k in plan.report.missing)
    assert plan.report.ignored["point_head.norm.weight"].startswith("head not built by this config")
    garbage = plan_recon({"foo.weight": (3,)}, None, dst_shapes, ANYSPLAT_HEADS)
    assert not garbage.report.ok and "unrecognised checkpoint layout" in str(garbage.report)


def test_plan_from_safetensors_header_reads_no_tensor_data(tmp_path):
    net = ReconNet(small(heads=VGGT_HEADS))
    save_file({k: v.contiguous() for k, v in released_vggt(net).items()}, str(tmp_path / "m.safetensors"))
    ckpt = Checkpoint(tmp_path / "m.safetensors")
    assert ckpt.shapes["aggregator.patch_embed.pos_embed"] == (1, 17, 32)
    assert ckpt.dtypes["aggregator.camera_token"] == torch.float32


# ----------------------------------------------------------------------------- full size on the meta device


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_recon_presets_match_published_sizes():
    """VGGT-1B is published as ~1.26B parameters with its track head; we build aggregator + camera +
    depth + point heads: 1,190,595,096 (measured from the released layout). AnySplat swaps the point
    head for the Gaussian head and runs at 448 px (a 32x32 instead of 37x37 position grid)."""
    vggt_cfg = build_config({"preset": "wan2.1-1.3b+vggt"}).model.recon
    any_cfg = build_config({"preset": "wan2.1-1.3b+anysplat"}).model.recon
    with torch.device("meta"):
        vggt, anysplat = ReconNet(vggt_cfg), ReconNet(any_cfg)
    assert _count(vggt) == 1_190_595_096
    assert vggt.state_dict()["aggregator.patch_embed.pos_embed"].shape == (1, 1 + 37 * 37, 1024)
    assert vggt.token_grid == (37, 37) and anysplat.token_grid == (32, 32)
    pos_diff = (37 * 37 - 32 * 32) * 1024
    assert _count(anysplat) == 1_190_595_096 - pos_diff - 32_654_628 + 32_794_964
    sd = anysplat.state_dict()
    assert sd["gaussian_param_head.scratch.output_conv2.2.weight"].shape == (84, 128, 1, 1)
    assert "point_head.norm.weight" not in sd and anysplat.gaussian_param_head.layers == (4, 11, 17, 23)


def test_full_size_wan_presets_match_published_sizes():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    small_video = build_config({"preset": "wan2.1-1.3b+anysplat"}).model.video
    big_video = build_config({"preset": "wan2.1-14b+anysplat"}).model.video
    v, te = small_video.vae, small_video.text_encoder
    with torch.device("meta"):
        dit_1_3b = WanTransformer3DModel(**small_video.transformer.model_dump())
        dit_14b = WanTransformer3DModel(**big_video.transformer.model_dump())
        vae = AutoencoderKLWan(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult),
                               num_res_blocks=v.num_res_blocks, temperal_downsample=list(v.temperal_downsample))
        umt5 = UMT5EncoderModel(UMT5Config(vocab_size=te.vocab_size, d_model=te.d_model, d_kv=te.d_kv, d_ff=te.d_ff,
                                           num_layers=te.num_layers, num_heads=te.num_heads,
                                           feed_forward_proj="gated-gelu"))
    assert _count(dit_1_3b) == 1_418_996_800  # "1.3B" (1.42B with embeddings and head)
    assert _count(dit_14b) == 14_288_491_584  # "14B"
    assert _count(vae) == 126_892_531  # Wan-VAE: 127M as published
    assert 5.6e9 < _count(umt5) < 5.8e9  # umt5-xxl encoder
    assert small_video.text_encoder.max_length == 512 and big_video.vae == small_video.vae


# ----------------------------------------------------------------------------- locations


def test_classify_locations(tmp_path):
    assert classify("s3://bucket/prefix") == "s3"
    assert classify("hf://facebook/VGGT-1B@main") == "hub"
    assert classify("facebook/VGGT-1B") == "hub"
    assert classify(str(tmp_path)) == "local" and classify("./weights/x") == "local"
    (tmp_path / "owner").mkdir()
    assert classify(str(tmp_path / "owner")) == "local"
    with pytest.raises(WeightsError, match="unsupported weights location"):
        classify("gs://bucket/x")


def test_hub_id_without_network_reports_where_it_looked(tmp_path):
    loc = resolve("hf://facebook/VGGT-1B", fetch=False, hub_cache_dir=str(tmp_path))
    assert not loc.found and str(tmp_path) in loc.looked[0] and "hub not contacted" in loc.notes[-1]
    loc = resolve("facebook/VGGT-1B", fetch=True, allow_patterns=["config.json"], hub_cache_dir=str(tmp_path))
    assert not loc.found and "https://huggingface.co/facebook/VGGT-1B" in loc.looked
    assert loc.notes[0].startswith("hub download failed") and loc.notes[1].startswith("not in the cache")


def test_hub_id_found_in_the_cache_offline(tmp_path):
    """A cached snapshot (the Hugging Face cache layout) is used without contacting the hub."""
    net = ReconNet(small(heads=ANYSPLAT_HEADS, sh_degree=4))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--lhjiang--anysplat"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in released_anysplat(net).items()}, str(snapshot / "model.safetensors"))
    cfg = build_config({"model": {"recon": {**SMALL, "heads": list(ANYSPLAT_HEADS), "sh_degree": 4,
                                            "source": "pretrained", "weights": "lhjiang/anysplat"}}})
    result = check_weights(cfg, hub_cache_dir=str(tmp_path / "hub"))
    assert result.ok, str(result)
    assert result.local_config(cfg).model.recon.weights == str(snapshot)


def _upload(directory, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(directory).as_posix()}")


def test_s3_prefix_downloaded_once_and_verified(tmp_path, s3_bucket):
    import boto3

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(torch.randn(1000).numpy().tobytes())
    (src / "sub" / "config.json").write_text('{"a": 1}')
    write_manifest(src)
    _upload(src, s3_bucket, "w/anysplat")
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/w/anysplat"

    missing = resolve(uri, storage, fetch=False)
    assert not missing.found and "not fetched" in missing.notes[-1]
    loc = resolve(uri, storage, fetch=True)
    assert loc.found and loc.local == tmp_path / "cache" / "s3" / s3_bucket / "w" / "anysplat"
    assert "size + sha256 against the manifest" in loc.notes[-1]
    assert (loc.local / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert json.loads((loc.local / COMPLETE_NAME).read_text())["verified"] == "sha256"
    # downloaded once: the cache answers even when the bucket no longer has the files
    s3 = boto3.client("s3")
    for key in ("model.safetensors", "sub/config.json", MANIFEST_NAME):
        s3.delete_object(Bucket=s3_bucket, Key=f"w/anysplat/{key}")
    again = resolve(uri, storage, fetch=True)
    assert again.found and again.notes == []


def test_s3_damaged_file_is_refused_and_nothing_is_kept(tmp_path, s3_bucket):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x" * 100)
    write_manifest(src)
    (src / "model.safetensors").write_bytes(b"y" * 100)  # same size, other bytes: only SHA-256 can tell
    _upload(src, s3_bucket, "bad")
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ManifestMismatchError, match="sha256"):
        resolve(f"s3://{s3_bucket}/bad", storage, fetch=True)
    target = tmp_path / "cache" / "s3" / s3_bucket / "bad"
    assert not (target / COMPLETE_NAME).exists() and not list(target.rglob("*.partial"))
    assert not (target / "model.safetensors").exists()


def test_s3_single_object_without_manifest_and_check_makes_config_local(tmp_path, s3_bucket):
    net = ReconNet(small(heads=ANYSPLAT_HEADS, sh_degree=4))
    local = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in released_anysplat(net).items()}, str(local))
    import boto3

    boto3.client("s3").upload_file(str(local), s3_bucket, "ckpt/model.safetensors")
    uri = f"s3://{s3_bucket}/ckpt/model.safetensors"
    cfg = build_config({"storage": {"cache_dir": str(tmp_path / "cache")},
                        "model": {"recon": {**SMALL, "heads": list(ANYSPLAT_HEADS), "sh_degree": 4,
                                            "source": "pretrained", "weights": uri}}})
    result = check_weights(cfg, fetch=True)
    assert result.ok, str(result)
    recon = next(c for c in result.components if c.name == "recon")
    assert "sizes only" in recon.location.notes[-1] and recon.reports[0].ok
    local_cfg = result.local_config(cfg)
    assert local_cfg.model.recon.weights == str(tmp_path / "cache" / "s3" / s3_bucket / "ckpt" / "model.safetensors")
    assert cfg.model.recon.weights == uri  # the original is left alone


# ----------------------------------------------------------------------------- Wan directories


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from vist3a.video import build_wan, save_wan

    return save_wan(build_wan(VideoModelConfig()), tmp_path_factory.mktemp("wan"))


def _video_cfg(weights, **video):
    return build_config({"model": {"video": {"source": "pretrained", "weights": str(weights), **video}}})


def test_diffusers_directory_check_matches_files_and_config(wan_dir, tmp_path):
    result = check_weights(_video_cfg(wan_dir))
    video = result.components[0]
    assert result.ok and video.status == "ok", str(result)
    assert [r.target for r in video.reports] == ["WanTransformer3DModel", "AutoencoderKLWan", "UMT5EncoderModel"]
    assert all(r.ok for r in video.reports)
    # the directory holds another model than the config describes
    other = check_weights(_video_cfg(wan_dir, transformer={"num_layers": 3}))
    assert not other.ok and "transformer/config.json describes another model: num_layers 2 (config expects 3)" in str(other)
    # an incomplete copy
    broken = tmp_path / "broken"
    shutil.copytree(wan_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    shown = str(check_weights(_video_cfg(broken)))
    assert "[INVALID] video" in shown and "missing scheduler/scheduler_config.json" in shown
    assert "vae: no diffusion_pytorch_model.safetensors" in shown


def test_pretrained_path_reproduces_the_random_path(wan_dir, tmp_path):
    """The tiny models, saved and loaded back through the released-weights path, give the same scene."""
    from vist3a.generator import SceneGenerator

    fast = ["sampling.steps=2", "splats.preview_views=0"]
    save_file({k: v.contiguous() for k, v in ReconNet(ReconConfig()).state_dict().items()},
              str(tmp_path / "model.safetensors"))
    loaded = SceneGenerator(build_config({"model": {"video": {"source": "pretrained", "weights": str(wan_dir)},
                                                    "recon": {"source": "pretrained", "weights": str(tmp_path)}}}, fast))
    seeded = SceneGenerator(build_config({}, fast))
    a = loaded.generate(["a red barn"], [4])[0].gaussians
    b = seeded.generate(["a red barn"], [4])[0].gaussians
    assert torch.equal(a.means, b.means) and torch.equal(a.sh, b.sh) and torch.equal(a.opacities, b.opacities)


# ----------------------------------------------------------------------------- start-up and CLI


def test_generator_start_up_refuses_missing_weights_with_where_it_looked(tmp_path):
    from vist3a.generator import SceneGenerator

    cfg = build_config({"preset": "wan2.1-1.3b+anysplat"},
                       [f"model.video.weights={tmp_path}/wan", f"model.recon.weights={tmp_path}/anysplat"])
    with pytest.raises(WeightsError) as err:
        SceneGenerator(cfg)
    text = str(err.value)
    assert text.startswith("cannot start: weights for preset 'wan2.1-1.3b+anysplat': weights missing")
    assert f"{tmp_path}/wan (local path)" in text and f"{tmp_path}/anysplat (local path)" in text
    assert "hf download lhjiang/anysplat model.safetensors config.json" in text
    with pytest.raises(ValueError, match="builds no Gaussian head"):
        SceneGenerator(build_config({"preset": "wan2.1-1.3b+vggt"}))


def test_cli_weights_check_for_a_missing_directory(tmp_path, capsys):
    rc = main(["weights", "check", "wan2.1-14b+anysplat", "--set", f"model.video.weights={tmp_path}/wan14b",
               "--set", f"model.recon.weights={tmp_path}/anysplat"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.splitlines()[0] == "weights for preset 'wan2.1-14b+anysplat': weights missing or unusable"
    assert f"[MISSING] video: model.video.weights = '{tmp_path}/wan14b'" in out
    assert f"looked: {tmp_path}/wan14b (local path)" in out
    assert "hf download Wan-AI/Wan2.1-T2V-14B-Diffusers --local-dir weights/wan2.1-t2v-14b" in out
    assert "licence: Apache-2.0" in out and "non-commercial" in out
    assert "[note] stitch: model.stitch.weights not set" in out


def test_cli_generate_with_missing_weights_is_one_clear_error(tmp_path, capsys):
    rc = main(["generate", "a barn", "--out", str(tmp_path / "out"), "--preset", "wan2.1-1.3b+anysplat",
               "--set", f"model.video.weights={tmp_path}/wan", "--set", f"model.recon.weights={tmp_path}/as"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "vist3a: error: cannot start" in err and f"{tmp_path}/as (local path)" in err


def test_cli_weights_manifest(tmp_path, capsys):
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert main(["weights", "manifest", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    import hashlib

    assert manifest["files"] == {"a.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}


def test_hub_reference_to_a_file_inside_a_repo(tmp_path):
    """hf://owner/name/path names one file (or folder) of a repo: only it is fetched, and it is what loads."""
    from vist3a.weights.locate import hub_download_command, hub_parts

    assert hub_parts("hf://HJGO/VIST3A/anysplat_stitched.pth") == ("HJGO/VIST3A", None, "anysplat_stitched.pth")
    assert hub_parts("hf://HJGO/VIST3A@v1/vist3a_1.3b_lora_ema") == ("HJGO/VIST3A", "v1", "vist3a_1.3b_lora_ema")
    assert hub_parts("hf://facebook/VGGT-1B@main") == ("facebook/VGGT-1B", "main", None)
    assert classify("weights/vist3a/anysplat_stitched.pth") == "local"  # a bare three-part path is a path
    assert hub_download_command("hf://HJGO/VIST3A/anysplat_stitched.pth", "weights/vist3a") == \
        "hf download HJGO/VIST3A anysplat_stitched.pth --local-dir weights/vist3a"
    assert hub_download_command("hf://HJGO/VIST3A/vist3a_1.3b_lora_ema", "weights/vist3a") == \
        'hf download HJGO/VIST3A --include "vist3a_1.3b_lora_ema/*" --local-dir weights/vist3a'
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "models--HJGO--VIST3A"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    missing = resolve("hf://HJGO/VIST3A/anysplat_stitched.pth", fetch=False, hub_cache_dir=str(tmp_path))
    assert not missing.found and "has no anysplat_stitched.pth" in missing.notes[-1]
    (snapshot / "anysplat_stitched.pth").write_bytes(b"x")
    loc = resolve("hf://HJGO/VIST3A/anysplat_stitched.pth", fetch=False, hub_cache_dir=str(tmp_path))
    assert loc.found and loc.local == snapshot / "anysplat_stitched.pth"
