"""The Wan text-to-video side: components, prompt encoding, our sampling loop, VAE decode.

Imports are lazy: prompt checks (`load_tokenizer`, `check_prompt`) need only transformers, and
validation stages should not pay for importing diffusers.
"""

_EXPORTS = {
    "vist3a.video.components": ["WanComponents", "build_wan", "save_wan", "normalize_latents", "denormalize_latents",
                                "decode_latents", "encode_frames"],
    "vist3a.video.sampler": ["VideoSampler", "initial_noise", "latent_shape", "make_scheduler"],
    "vist3a.video.text": ["check_prompt", "clean_prompt", "count_tokens", "encode_prompts", "load_tokenizer"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'vist3a.video' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
