"""Throughput levers of the Wan transformer, each set by a `runtime.*` key (vist3a.config.RuntimeConfig) and
applied by `vist3a.models.build_video`; benchmarks/gpu_throughput.py measures each on and off on a GPU.

- `set_attention`: which scaled_dot_product_attention kernel the transformer's attention runs (through
  diffusers' per-model attention backend: `sdpa` is PyTorch's own choice, `flash`/`cudnn`/`efficient`/`math`
  force one). The CUDA-only kernels fall back to `sdpa` elsewhere, with a logged note.
- `compile_blocks`: torch.compile of each transformer block (diffusers' regional compilation: the blocks share
  one compiled graph, so compiling costs one block, not thirty).
- `enable_step_cache`: diffusers' First Block Cache, an opt-in that changes outputs (see RuntimeConfig.step_cache).

Text-encoder placement and batched classifier-free guidance live in `WanVideo` (vist3a.video.pipeline); the
VAE's dtype is chosen when the components are built (`build_wan(vae_dtype=...)`).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("vist3a.video")

#: runtime.attention -> diffusers' attention backend name (None: the default, torch's SDPA choosing its kernel)
ATTENTION_BACKENDS: dict[str, str | None] = {
    "sdpa": None, "flash": "_native_flash", "cudnn": "_native_cudnn", "efficient": "_native_efficient",
    "math": "_native_math",
}
CUDA_ONLY_ATTENTION = ("flash", "cudnn", "efficient")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def set_attention(transformer: torch.nn.Module, attention: str, device: torch.device | str) -> str:
    """Make `transformer`'s attention run the `attention` kernel; -> the one it will run (`sdpa` where a
    CUDA-only kernel was asked for on another device)."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"runtime.attention {attention!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    device = torch.device(device)
    if attention in CUDA_ONLY_ATTENTION and device.type != "cuda":
        log.warning("runtime.attention %r needs CUDA; the transformer is on %s, so it uses 'sdpa' (PyTorch's choice)",
                    attention, device)
        attention = "sdpa"
    backend = ATTENTION_BACKENDS[attention]
    if backend is None:
        if any(getattr(getattr(m, "processor", None), "_attention_backend", None) is not None
               for m in transformer.modules()):
            transformer.reset_attention_backend()
    else:
        transformer.set_attention_backend(backend)
    return attention


def attention_in_use(transformer: torch.nn.Module) -> str:
    """The runtime.attention value `transformer` runs now (`sdpa` when none was forced)."""
    names = {getattr(getattr(m, "processor", None), "_attention_backend", None) for m in transformer.modules()
             if hasattr(getattr(m, "processor", None), "_attention_backend")}
    names = {getattr(n, "value", n) for n in names}
    by_backend = {v: k for k, v in ATTENTION_BACKENDS.items()}
    used = {by_backend.get(n, str(n)) for n in names} or {"sdpa"}
    return used.pop() if len(used) == 1 else "mixed:" + ",".join(sorted(used))


def compile_blocks(transformer: torch.nn.Module, mode: str = "default", *, fullgraph: bool = True,
                   backend: str = "inductor") -> int:
    """torch.compile every transformer block in place (static shapes: each batch size compiles once, on its
    first call); -> the number of blocks compiled. `backend` other than inductor is for tests
    (aot_eager: the same graph capture without code generation)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"runtime.compile_mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    kwargs = {"fullgraph": fullgraph, "dynamic": False, "backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode
    blocks = [m for m in transformer.modules() if type(m).__name__ in getattr(transformer, "_repeated_blocks", ())]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} names no repeated blocks to compile")
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    """Undo `compile_blocks` (the modules run eagerly again; benchmarks measure on/off on one model)."""
    for m in transformer.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


def compiled_blocks(transformer: torch.nn.Module) -> int:
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def enable_step_cache(transformer: torch.nn.Module, threshold: float) -> None:
    """diffusers' First Block Cache on `transformer` (WanVideo.sample resets its state per call)."""
    from diffusers.hooks import FirstBlockCacheConfig

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"runtime.step_cache_threshold must be in (0, 1), got {threshold}")
    if getattr(transformer, "_cache_config", None) is not None:
        transformer.disable_cache()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def disable_step_cache(transformer: torch.nn.Module) -> None:
    if getattr(transformer, "_cache_config", None) is not None:
        transformer.disable_cache()


def step_cache_on(transformer: torch.nn.Module) -> bool:
    return getattr(transformer, "_cache_config", None) is not None
