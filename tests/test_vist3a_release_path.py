"""The vist3a-1.3b path end to end on tiny widths: every setting of the release's recipe (stitched decoder
.pth, peft video LoRA, AnySplat config.json post-processing and conventions, bf16 trunk, orbit template,
negative prompt, DC-only .ply) through SceneGenerator, plus the published forward's pieces and the bad
inputs the start-up check must refuse before any model runs."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from plyfile import PlyData
from safetensors.torch import save_file

from vist3a.config import ALIGN_LORA_TARGETS, load_config
from vist3a.generator import SceneGenerator, scene_files
from vist3a.io.frames import resize_frames
from vist3a.models import build_stitched_decoder
from vist3a.presets import ORBIT_TEMPLATE, PRESETS, VIST3A_NEGATIVE_PROMPT
from vist3a.recon import ReconNet
from vist3a.video import build_wan
from vist3a.weights import WeightsError

from release_format import RANK, write_release_file  # noqa: E402 - tests/ helper

ANYSPLAT_CONFIG = {"encoder_cfg": {"voxelize": True, "voxel_size": 0.002, "render_conf": False, "conf_threshold": 0.1,
                                   "opacity_conf": False, "gaussian_adapter": {"sh_degree": 1}},
                   "decoder_cfg": {"name": "splatting_cuda"}}


def _base(tmp_path) -> list[str]:
    """Overrides that make the tiny preset shaped like vist3a-1.3b (same keys as the preset sets)."""
    vist3a = PRESETS["vist3a-1.3b"]
    recon_dir = tmp_path / "anysplat"
    recon_dir.mkdir(exist_ok=True)
    tiny = load_config(None, ["model.recon.heads=[camera,depth,gaussians]"]).model.recon
    save_file({k: v.contiguous() for k, v in ReconNet(tiny).state_dict().items()}, str(recon_dir / "model.safetensors"))
    (recon_dir / "config.json").write_text(json.dumps(ANYSPLAT_CONFIG))
    return [
        "model.recon.heads=[camera,depth,gaussians]", "model.recon.source=pretrained", f"model.recon.weights={recon_dir}",
        "model.recon.conventions=anysplat", "model.recon.dtype=bfloat16",
        f"model.stitch.lora_rank={RANK}", "model.stitch.lora_alpha=2.0",
        "model.stitch.readd_pos_embed=true", "model.stitch.frames_antialias=false",
        "model.video.text_encoder.max_length=640",  # ByT5 counts bytes: ~150 for the template, 385 the negative
        f"sampling.prompt_template={json.dumps(vist3a['sampling']['prompt_template'])}",
        f"sampling.negative_prompt={json.dumps(vist3a['sampling']['negative_prompt'])}",
        "splats.ply_sh_degree=0", "splats.postprocess=anysplat", "sampling.steps=2", "splats.preview_views=1",
        "splats.preview_size=32",
    ]


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, one_torch_thread):
    """A release-format stitch file and a peft adapter (written by peft itself) for the tiny models."""
    tmp = tmp_path_factory.mktemp("vist3a-release")
    cfg = load_config(None, _base(tmp))
    comps = build_wan(cfg.model.video)
    decoder = build_stitched_decoder(cfg, comps.vae, "cpu", load_weights=False)
    write_release_file(tmp / "anysplat_stitched.pth", decoder)
    peft_model = get_peft_model(copy.deepcopy(comps.transformer),
                                LoraConfig(r=4, lora_alpha=8, target_modules=list(ALIGN_LORA_TARGETS)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp / "vist3a_tiny_lora_ema")
    return tmp


def _overrides(release_dir, **extra) -> list[str]:
    base = _base(release_dir) + [f"model.stitch.weights={release_dir / 'anysplat_stitched.pth'}",
                                 f"model.video.lora={release_dir / 'vist3a_tiny_lora_ema'}"]
    return base + [f"{k}={v}" for k, v in extra.items()]


def test_the_presets_carry_the_published_recipe():
    for name, repo_lora in (("vist3a-1.3b", "vist3a_1.3b_lora_ema"), ("vist3a-14b", "vist3a_14b_lora_ema")):
        cfg = load_config(None, [f"preset={name}"])
        assert cfg.model.video.lora == f"hf://HJGO/VIST3A/{repo_lora}"
        assert cfg.model.stitch.weights == "hf://HJGO/VIST3A/anysplat_stitched.pth"
        assert (cfg.model.stitch.lora_rank, cfg.model.stitch.lora_alpha) == (64, 32.0)
        assert cfg.sampling.prompt_template == ORBIT_TEMPLATE and cfg.sampling.negative_prompt == VIST3A_NEGATIVE_PROMPT
        assert (cfg.sampling.steps, cfg.sampling.guidance, cfg.sampling.shift, cfg.sampling.frames) == (50, 7.5, 5.0, 13)
        assert (cfg.splats.ply_sh_degree, cfg.splats.postprocess, cfg.model.recon.dtype) == (0, "anysplat", "bfloat16")
    assert load_config(None, ["preset=vist3a-14b"]).model.video.transformer.num_layers == 40
    assert ORBIT_TEMPLATE.replace("{prompt}", "a barn") == (
        "The camera rotates around the scene, maintaining constant distance: `a barn`. "
        "The orbiting trajectory captures 3D structure and consistency.")


def test_generation_with_the_release_recipe(release_dir, tmp_path):
    gen = SceneGenerator(load_config(None, _overrides(release_dir)))
    # bf16 trunk, float32 heads, the LoRA merged into the transformer
    assert gen.decoder.recon.aggregator.camera_token.dtype == torch.bfloat16
    assert next(gen.decoder.recon.gaussian_param_head.parameters()).dtype == torch.float32
    assert not any("lora_" in n for n, _ in gen.video.transformer.named_parameters())
    assert gen.decoder.anysplat.voxelize and gen.decoder.anysplat.voxel_size == 0.002
    scene = gen.generate(["a red barn"], [7])[0]
    meta = gen.meta(scene)
    assert meta["prompt"] == "a red barn" and meta["prompt_template"] == ORBIT_TEMPLATE
    assert meta["negative_prompt"] == VIST3A_NEGATIVE_PROMPT  # the prompt brought none: the preset's applies
    files = scene_files(scene, meta, gen.cfg.splats.ply_sh_degree)
    ply = PlyData.read(io.BytesIO(files["scene.ply"]))
    names = [p.name for p in ply["vertex"].properties]
    assert "f_dc_0" in names and not any(n.startswith("f_rest") for n in names)  # DC colour only
    opacity = torch.tensor(ply["vertex"]["opacity"].astype("float32"))
    torch.testing.assert_close(torch.sigmoid(opacity), scene.gaussians.opacities.float(), atol=1e-5, rtol=1e-4)
    assert scene.num_gaussians < 5 * 64 * 64  # voxelized as the AnySplat config says

    # the template is applied exactly once: the user's prompt under the template equals the templated
    # prompt given with the template switched off
    plain = SceneGenerator(load_config(None, _overrides(release_dir) + ["sampling.prompt_template=\"{prompt}\""]))
    again = plain.generate([ORBIT_TEMPLATE.replace("{prompt}", "a red barn")], [7])[0]
    torch.testing.assert_close(again.gaussians.means, scene.gaussians.means)
    other = plain.generate(["a red barn"], [7])[0]
    assert other.num_gaussians != scene.num_gaussians or not torch.equal(other.gaussians.means, scene.gaussians.means)

    # token limit counts the templated prompt
    with pytest.raises(ValueError, match=r"sampling.negative_prompt: negative prompt too long: 385 tokens, over the limit of 200"):
        SceneGenerator(load_config(None, _overrides(release_dir) + ["model.video.text_encoder.max_length=200"]))
    short = load_config(None, _overrides(release_dir) + ["model.video.text_encoder.max_length=200",
                                                         "sampling.negative_prompt=blurry"])
    gen_short = SceneGenerator(short)
    assert gen_short.check_prompt("x" * 40) is None
    assert "tokens with sampling.prompt_template around it, over the limit of 200" in gen_short.check_prompt("x" * 120)
    assert gen_short.check_prompt("") == "prompt is empty"


def test_the_published_frame_resize_is_plain_trilinear():
    frames = torch.rand(1, 5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    video = frames.permute(0, 2, 1, 3, 4) * 2 - 1  # what the VAE gives: [-1, 1], channels first
    want = (F.interpolate(video, (5, 40, 40), mode="trilinear", align_corners=False) + 1) / 2
    got = resize_frames(frames, 40, antialias=False)
    torch.testing.assert_close(got, want.permute(0, 2, 1, 3, 4), atol=1e-6, rtol=0)
    assert (resize_frames(frames, 40) - got).abs().max() > 1e-3  # the antialiased resize is another one


def test_readded_position_embedding_enters_the_blocks_after_the_cut():
    net = ReconNet(load_config().model.recon).eval()
    enc = net.aggregator.patch_embed
    acts = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = enc.blocks[2].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    with torch.no_grad():
        net.forward_from("blocks.1", acts, add_pos_embed=True)
    hook.remove()
    want = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), enc.register_tokens.expand(2, -1, -1),
                      acts[0] + enc.pos_embed[:, 1:]], dim=1)
    torch.testing.assert_close(seen["x"], want)


def test_bad_release_files_fail_at_start_up_naming_the_file(release_dir, tmp_path):
    good = release_dir / "anysplat_stitched.pth"
    truncated = tmp_path / "anysplat_stitched.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"anysplat_stitched.pth.*cannot be read as a torch checkpoint"):
        SceneGenerator.fetch_and_verify_weights(load_config(None, _overrides(release_dir) + [f"model.stitch.weights={truncated}"]))
    other_spec = _overrides(release_dir, **{"model.stitch.spec": "conv3d_k1x1x1_o32"})
    with pytest.raises(WeightsError, match=r"another stitching spec"):
        SceneGenerator.fetch_and_verify_weights(load_config(None, other_spec))
    no_alpha = [o for o in _overrides(release_dir) if not o.startswith("model.stitch.lora_alpha")]
    with pytest.raises(WeightsError, match=r"needs model.stitch.lora_rank and model.stitch.lora_alpha"):
        SceneGenerator.fetch_and_verify_weights(load_config(None, no_alpha))


def test_an_adapter_for_another_wan_size_fails_at_start_up(release_dir):
    bigger = _overrides(release_dir, **{"model.video.transformer.num_attention_heads": 4,
                                        "model.video.transformer.text_dim": 32})
    with pytest.raises(WeightsError, match=r"vist3a_tiny_lora_ema: .* do not fit the configured transformer"):
        SceneGenerator.fetch_and_verify_weights(load_config(None, bigger))


def test_anysplat_postprocess_needs_its_config_json(release_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((release_dir / "anysplat" / "model.safetensors").read_bytes())
    cfg = load_config(None, _overrides(release_dir) + [f"model.recon.weights={bare}"])
    with pytest.raises(FileNotFoundError, match=r"looked for .*bare/config.json"):
        SceneGenerator(cfg)


def test_weights_check_lists_every_release_file_with_its_fetch_line_and_licence(tmp_path, repo_root):
    from vist3a.weights import check_weights

    result = check_weights(load_config(None, ["preset=vist3a-1.3b"]), deep=False, hub_cache_dir=str(tmp_path))
    text = str(result)
    assert not result.ok
    for line in ("hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir weights/wan2.1-t2v-1.3b",
                 "hf download lhjiang/anysplat model.safetensors config.json --local-dir weights/anysplat",
                 "hf download HJGO/VIST3A anysplat_stitched.pth --local-dir weights/vist3a",
                 'hf download HJGO/VIST3A --include "vist3a_1.3b_lora_ema/*" --local-dir weights/vist3a'):
        assert line in text, line
    assert "no licence file in the release" in text and "non-commercial" in text
    local = check_weights(load_config(f"{repo_root}/deploy/vist3a.yaml"), deep=False)  # local copies not there yet
    assert 'hf download HJGO/VIST3A --include "vist3a_1.3b_lora_ema/*"' in str(local)
