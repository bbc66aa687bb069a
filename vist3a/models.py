"""Builds the models a Config names: the video generator and the stitched 3D decoder.

One place maps config sections to modules, so the CLI, the pipelines (generation, stitching,
alignment) and the tests build exactly the same thing from the same YAML.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from vist3a.config import Config
from vist3a.ids import seeded
from vist3a.recon import ReconNet
from vist3a.recon.pixel_gaussians import AnySplatPostprocess
from vist3a.stitching.decoder import StitchedDecoder
from vist3a.stitching.layer import StitchingLayer

if TYPE_CHECKING:  # vist3a.video imports diffusers: only when a video model is built
    from vist3a.video import WanVideo


def build_video(cfg: Config, device: torch.device, dtype: torch.dtype, *, generation: bool = False,
                init_device: torch.device | str | None = None) -> WanVideo:
    """The Wan components with, when model.video.lora names one, the aligned LoRA (pipelines.align)
    merged in: generation runs at base cost. The runtime levers (vist3a.video.levers) are applied:
    runtime.vae_dtype, attention, text_encoder and cfg_batch always; runtime.compile and step_cache only
    with `generation` (the generator; not alignment, which trains adapters on the transformer).
    `init_device`: random weights drawn there (build_wan; benchmarks at the real size)."""
    from vist3a.lora import load_video_lora
    from vist3a.video import WanVideo, build_wan
    from vist3a.video.levers import compile_blocks, enable_step_cache, set_attention

    rt = cfg.runtime
    components = build_wan(cfg.model.video, device=device, dtype=dtype, vae_dtype=getattr(torch, rt.vae_dtype),
                           text_encoder_device=device if rt.text_encoder == "device" else "cpu", init_device=init_device)
    if cfg.model.video.lora:
        load_video_lora(components.transformer, cfg.model.video.lora, cfg.storage)
    set_attention(components.transformer, rt.attention, device)
    if generation and rt.step_cache == "first_block":
        enable_step_cache(components.transformer, rt.step_cache_threshold)
    if generation and rt.compile:  # the cache's hooks break the graph: no fullgraph with them
        compile_blocks(components.transformer, rt.compile_mode, fullgraph=rt.step_cache == "off")
    return WanVideo(components, cfg_batch=rt.cfg_batch, text_encoder=rt.text_encoder)


def build_recon(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32, *,
                init_device: torch.device | str | None = None) -> ReconNet:
    """The reconstruction network: seeded random weights (ReconNet draws them from model.recon.seed; on
    `init_device` when given, e.g. the GPU for a benchmark at the real size), or (source: pretrained) a
    released VGGT-1B / AnySplat checkpoint converted strictly onto our module (a mismatch raises
    CheckpointMismatchError carrying the full key report)."""
    rc = cfg.model.recon
    if rc.source == "pretrained":
        from vist3a.weights import load_pretrained_recon
        from vist3a.weights.check import RECON_PATTERNS
        from vist3a.weights.locate import require

        path = require(rc.weights, cfg.storage, what="model.recon.weights", allow_patterns=RECON_PATTERNS)
        net, _ = load_pretrained_recon(rc, path, device=device, dtype=dtype)
    else:
        with torch.device(init_device) if init_device is not None else nullcontext():
            net = ReconNet(rc)
        net = net.to(device).eval()
    return net.cast_trunk(torch.bfloat16) if rc.dtype == "bfloat16" else net


def anysplat_postprocess(cfg: Config) -> AnySplatPostprocess | None:
    """splats.postprocess 'anysplat': AnySplat's post-processing as the config.json beside
    model.recon.weights sets it (refused when there is none, or when its SH degree is not the network's)."""
    if cfg.splats.postprocess != "anysplat":
        return None
    from vist3a.weights.locate import require

    rc = cfg.model.recon
    if rc.source != "pretrained":
        raise ValueError("splats.postprocess 'anysplat' reads AnySplat's config.json beside model.recon.weights; "
                         "model.recon.source is 'random' (use splats.postprocess=vist3a)")
    path = require(rc.weights, cfg.storage, what="model.recon.weights")
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"splats.postprocess 'anysplat' needs AnySplat's config.json beside the weights; "
                                f"looked for {config} (download it with the weights: hf download lhjiang/anysplat "
                                "model.safetensors config.json)")
    post = AnySplatPostprocess.from_config_json(config)
    if post.sh_degree != rc.sh_degree:
        raise ValueError(f"{config}: gaussian_adapter.sh_degree {post.sh_degree}, but model.recon.sh_degree is "
                         f"{rc.sh_degree}")
    return post


def build_stitched_decoder(cfg: Config, vae: nn.Module, device: torch.device | str, *,
                           decode_frames: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           recon: nn.Module | None = None, load_weights: bool = True,
                           init_device: torch.device | str | None = None) -> StitchedDecoder:
    """The stitched decoder for generation, stitching and alignment alike: the network of model.recon
    (or `recon`, e.g. one trained in-process), the stitching layer drawn from model.stitch.seed and,
    with `load_weights`, model.stitch.weights loaded into it. Stitched fine-tuning passes
    load_weights=False: it starts from the random layer or its own stitch_job.init.

    `vae` gives the latent statistics; `decode_frames` (normalised latents -> RGB frames, e.g.
    `WanVideo.decode`) feeds the Gaussian head when no frames are given. `init_device`: see build_recon."""
    from vist3a.video.latents import latent_stats

    sc = cfg.model.stitch
    recon = build_recon(cfg, device, init_device=init_device) if recon is None else recon.to(device)
    with seeded(sc.seed):
        stitch = StitchingLayer(sc.spec, in_channels=cfg.model.video.vae.z_dim)
    mean, std = latent_stats(vae)
    decoder = StitchedDecoder(stitch, recon, sc.cut, mean, std, decode_frames=decode_frames,
                              readd_pos_embed=sc.readd_pos_embed, frames_antialias=sc.frames_antialias,
                              anysplat=anysplat_postprocess(cfg))
    if load_weights and sc.weights:
        load_stitch_weights(decoder, cfg)
    return decoder.to(device).eval()


def load_stitch_weights(decoder: StitchedDecoder, cfg: Config) -> None:
    """model.stitch.weights into `decoder`: the release's anysplat_stitched.pth (LoRA alpha and rank from
    model.stitch) or vist3a's own stitch checkpoint, told apart by their contents."""
    from vist3a.stitching.checkpoint import load_stitch_checkpoint
    from vist3a.weights.locate import require
    from vist3a.weights.release import is_release_checkpoint, load_release_stitch, read_checkpoint_file

    sc = cfg.model.stitch
    path = require(sc.weights, cfg.storage, what="model.stitch.weights")
    payload = read_checkpoint_file(path)
    if not is_release_checkpoint(payload):
        load_stitch_checkpoint(decoder, str(path), cfg.storage)
        return
    if sc.lora_rank is None or sc.lora_alpha is None:
        raise ValueError(f"model.stitch.weights {path} is the release's stitched decoder: set model.stitch.lora_rank "
                         "and model.stitch.lora_alpha (HJGO/VIST3A: 64 and 32; the vist3a presets do)")
    load_release_stitch(decoder, path, sc.lora_rank, sc.lora_alpha, payload=payload)
