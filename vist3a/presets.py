"""Model presets: what a config's `preset` fills in before its own keys (vist3a.config validates the result).

`tiny` builds every component from small configs with seeded random weights (the whole path on a CPU
in seconds: tests, CI, the quick-start); the others describe released architectures, loaded from
weights a user fetches. Plain data only: the schema (vist3a.config) imports this module.
"""

from __future__ import annotations

from typing import Any

# Released architectures (shapes as the releases' config.json files give them). Weights:
# `vist3a weights check PRESET` says where to get them.
_WAN_TEXT_ENCODER = {"tokenizer": "pretrained", "vocab_size": 256384, "d_model": 4096, "d_ff": 10240, "d_kv": 64,
                     "num_layers": 24, "num_heads": 64, "max_length": 512}  # umt5-xxl encoder
_WAN_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "temperal_downsample": [False, True, True]}
_WAN_DIT = {"patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
            "text_dim": 4096, "freq_dim": 256}


def _wan(repo: str, heads: int, ffn: int, layers: int) -> dict[str, Any]:
    return {"source": "pretrained", "weights": repo, "text_encoder": _WAN_TEXT_ENCODER, "vae": _WAN_VAE,
            "transformer": {**_WAN_DIT, "num_attention_heads": heads, "ffn_dim": ffn, "num_layers": layers}}


_WAN_1_3B = _wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", heads=12, ffn=8960, layers=30)
_WAN_14B = _wan("Wan-AI/Wan2.1-T2V-14B-Diffusers", heads=40, ffn=13824, layers=40)
_VGGT_1B_ARCH = {"source": "pretrained", "patch_size": 14, "embed_dim": 1024, "encoder_depth": 24, "encoder_heads": 16,
                 "num_registers": 4, "mlp_ratio": 4.0, "aggregator_depth": 24, "aggregator_heads": 16,
                 "camera_iters": 4, "camera_trunk_depth": 4, "dpt_features": 256,
                 "dpt_out_channels": [256, 512, 1024, 1024], "dpt_layers": [4, 11, 17, 23]}
# AnySplat as stitched in VIST3A: 512 px video (64x64 latents) -> stride-2 conv -> 32x32 tokens = 448 px.
# Its weights are run with AnySplat's own camera conventions (focal tan+1e-3, pixel-corner unprojection).
_ANYSPLAT = {**_VGGT_1B_ARCH, "weights": "lhjiang/anysplat", "img_size": 448, "sh_degree": 4,
             "heads": ["camera", "depth", "gaussians"], "conventions": "anysplat"}
# VGGT at its native 518 px (37x37 tokens): 592 px video -> 74x74 latents -> stride-2 conv -> 37x37.
_VGGT = {**_VGGT_1B_ARCH, "weights": "facebook/VGGT-1B", "img_size": 518, "heads": ["camera", "depth", "points"]}
# VIST3A's stitching layer (cut after the 2nd DINO block) and inference settings (50 steps, CFG 7.5, shift 5).
_STITCH = {"spec": "conv3d_k5x3x3_o1024_s1x2x2_p2x1x1", "cut": "blocks.1"}
_SAMPLING = {"steps": 50, "guidance": 7.5, "shift": 5.0, "frames": 13, "height": 512, "width": 512}

# The authors' release (hub repo HJGO/VIST3A): the stitched AnySplat decoder (loralib LoRA r 64, alpha 32 --
# alpha is not in the file), the reward-aligned Wan LoRAs (peft), and its inference recipe: the orbit
# prompt template, its negative prompt, the network in bfloat16, DC-colour-only .ply.
VIST3A_REPO = "HJGO/VIST3A"
ORBIT_TEMPLATE = ("The camera rotates around the scene, maintaining constant distance: `{prompt}`. "
                  "The orbiting trajectory captures 3D structure and consistency.")
VIST3A_NEGATIVE_PROMPT = (
    "Background blur, Blurred background, Blurred scene, Artifacts, not aesthetic, not realistic, rendered noise, "
    "low quality movement, low quality video, low quality image, deformed, disfigured, distorted, extra limbs, "
    "cloned face, skinny, glitchy, double torso, extra arms, extra hands, mangled fingers, missing lips, ugly face, "
    "distorted legs, fused fingers, too many fingers, long neck")
_VIST3A_STITCH = {**_STITCH, "weights": f"hf://{VIST3A_REPO}/anysplat_stitched.pth", "lora_rank": 64,
                  "lora_alpha": 32.0, "readd_pos_embed": True, "frames_antialias": False}
_VIST3A_RECON = {**_ANYSPLAT, "dtype": "bfloat16"}
_VIST3A_SAMPLING = {**_SAMPLING, "prompt_template": ORBIT_TEMPLATE, "negative_prompt": VIST3A_NEGATIVE_PROMPT}
# Compact scene files for the real models (benchmarks/compact_scenes.py measures bytes against re-render PSNR):
# SPZ with the DC colour only; `splats.formats=[ply, spz]` adds the .ply.
_COMPACT_SPLATS = {"formats": ["spz"], "sh_degree": 0, "voxel_footprints": 2.5}  # benchmarks/compact_scenes.py
_VIST3A_SPLATS = {**_COMPACT_SPLATS, "ply_sh_degree": 0, "postprocess": "anysplat"}


def _vist3a(wan: dict[str, Any], lora: str) -> dict[str, Any]:
    return {"model": {"video": {**wan, "lora": f"hf://{VIST3A_REPO}/{lora}"}, "recon": _VIST3A_RECON,
                      "stitch": _VIST3A_STITCH},
            "sampling": _VIST3A_SAMPLING, "splats": _VIST3A_SPLATS, "runtime": {"dtype": "bfloat16"}}


PRESETS: dict[str, dict[str, Any]] = {
    # Small configs with seeded random weights: the whole path on a CPU in seconds.
    "tiny": {},
    "wan2.1-1.3b+anysplat": {"model": {"video": _WAN_1_3B, "recon": _ANYSPLAT, "stitch": _STITCH},
                             "sampling": _SAMPLING, "splats": _COMPACT_SPLATS, "runtime": {"dtype": "bfloat16"}},
    "wan2.1-1.3b+vggt": {"model": {"video": _WAN_1_3B, "recon": _VGGT, "stitch": _STITCH},
                         "sampling": {**_SAMPLING, "height": 592, "width": 592}, "runtime": {"dtype": "bfloat16"}},
    "wan2.1-14b+anysplat": {"model": {"video": _WAN_14B, "recon": _ANYSPLAT, "stitch": _STITCH},
                            "sampling": _SAMPLING, "splats": _COMPACT_SPLATS, "runtime": {"dtype": "bfloat16"}},
    "vist3a-1.3b": _vist3a(_WAN_1_3B, "vist3a_1.3b_lora_ema"),
    "vist3a-14b": _vist3a(_WAN_14B, "vist3a_14b_lora_ema"),
}

#: One line per preset for `vist3a presets`.
DESCRIPTIONS = {
    "tiny": "small seeded random models: the whole path on a CPU in seconds (tests, CI, quick start)",
    "vist3a-1.3b": "the released VIST3A model: Wan 2.1 T2V 1.3B + reward-aligned LoRA + stitched AnySplat (HJGO/VIST3A)",
    "vist3a-14b": "the released VIST3A model with Wan 2.1 T2V 14B + its aligned LoRA, same stitched AnySplat decoder",
    "wan2.1-1.3b+anysplat": "Wan 2.1 1.3B + AnySplat with a stitching layer you fit (pipelines.stitch)",
    "wan2.1-14b+anysplat": "Wan 2.1 14B + AnySplat with a stitching layer you fit (pipelines.stitch)",
    "wan2.1-1.3b+vggt": "Wan 2.1 1.3B + VGGT-1B (cameras, depth, points; no Gaussians): stitching research",
}


def preset_names() -> list[str]:
    return sorted(PRESETS)
