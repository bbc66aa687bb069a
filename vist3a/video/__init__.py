"""The Wan text-to-video side: components, the latent convention, prompts, `WanVideo` (sample, decode) and the
throughput levers the runtime.* keys set (`levers`).

Imports are lazy: prompt checks (`load_tokenizer`, `check_prompt`) need only transformers, and
validation stages should not pay for importing diffusers.
"""

_EXPORTS = {
    "vist3a.video.components": ["WanComponents", "build_wan", "save_wan", "decode_latents", "encode_frames"],
    "vist3a.video.latents": ["denormalize", "denormalize_latents", "latent_stats", "normalize_latents"],
    "vist3a.video.levers": ["compile_blocks", "enable_step_cache", "set_attention"],
    "vist3a.video.pipeline": ["WanVideo", "encode_prompts", "initial_noise", "latent_shape", "make_scheduler"],
    "vist3a.video.text": ["check_prompt", "clean_prompt", "count_tokens", "load_tokenizer", "video_weights_root"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'vist3a.video' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
