"""Builds the models a Config names: the video generator and the stitched 3D decoder.

One place maps config sections to modules, so the CLI, the pipelines and the tests build
exactly the same thing from the same YAML.
"""

from __future__ import annotations

import torch

from vist3a.config import Config


class VideoModel:
    """The Wan components with our sampler, prompt checks and VAE decoding."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype):
        from vist3a.video import VideoSampler, build_wan

        self.cfg = cfg
        self.components = build_wan(cfg.model.video, device=device, dtype=dtype)
        if cfg.model.video.lora:  # an aligned LoRA (pipelines.align), merged: generation runs at base cost
            from vist3a.train.align import load_video_lora

            load_video_lora(self.components.transformer, cfg.model.video.lora, cfg.storage)
        self.sampler = VideoSampler(self.components)

    def check_prompt(self, prompt) -> str | None:
        from vist3a.video import check_prompt

        return check_prompt(self.components.tokenizer, prompt, self.cfg.model.video.text_encoder.max_length)

    def sample(self, prompts, seeds, *, steps, guidance, shift, frames, height, width, negative_prompts, grad_steps=None):
        return self.sampler.sample(prompts, seeds, steps=steps, guidance=guidance, shift=shift, frames=frames,
                                   height=height, width=width, negative_prompt=negative_prompts, grad_steps=grad_steps)

    def decode(self, latents):
        return self.sampler.decode(latents)

    @property
    def latents_mean(self):
        return torch.tensor(self.components.vae.config.latents_mean)

    @property
    def latents_std(self):
        return torch.tensor(self.components.vae.config.latents_std)


def build_video(cfg: Config, device: torch.device, dtype: torch.dtype) -> VideoModel:
    return VideoModel(cfg, device, dtype)


def build_recon(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32):
    """The reconstruction network: seeded random weights, or (source: pretrained) a released
    VGGT-1B / AnySplat checkpoint converted strictly onto our module (a mismatch raises
    CheckpointMismatchError carrying the full key report)."""
    from vist3a.recon import ReconNet

    rc = cfg.model.recon
    if rc.source == "pretrained":
        from vist3a.weights import load_pretrained_recon
        from vist3a.weights.check import RECON_PATTERNS
        from vist3a.weights.locate import require

        path = require(rc.weights, cfg.storage, what="model.recon.weights", allow_patterns=RECON_PATTERNS)
        net, _ = load_pretrained_recon(rc, path, device=device, dtype=dtype)
        return net
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rc.seed)
        net = ReconNet(rc)
    return net.to(device).eval()


def build_stitched_decoder(cfg: Config, video: VideoModel, device: torch.device):
    from vist3a.stitching import StitchedDecoder, StitchingLayer

    sc = cfg.model.stitch
    recon = build_recon(cfg, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sc.seed)
        stitch = StitchingLayer(sc.spec, in_channels=cfg.model.video.vae.z_dim)
    decoder = StitchedDecoder(stitch, recon, sc.cut, video.latents_mean, video.latents_std, decode_frames=video.decode)
    if sc.weights:
        from vist3a.stitching.checkpoint import load_stitch_checkpoint

        load_stitch_checkpoint(decoder, sc.weights, cfg.storage)
    return decoder.to(device).eval()
