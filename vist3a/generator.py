"""Text -> 3D scene: the whole VIST3A path behind one object that loads its models once.

`SceneGenerator(cfg).generate(prompts, seeds)` runs the sampler, the stitched decoder and the
preview renderer on a batch; `scene_files(scene)` turns a scene into the bytes of its output
files; `generate_scene(...)` does both for one prompt. Pipelines (Ray Data, Serve) call these.
"""

from __future__ import annotations

import copy
import functools
import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata

import torch
from PIL import Image

from vist3a.config import Config, load_config
from vist3a.ids import fingerprint, seed_from
from vist3a.io import join, write_bytes
from vist3a.models import build_stitched_decoder, build_video
from vist3a.scores import SceneScorer, check_scorers
from vist3a.splats.compact import CompactSettings, compact
from vist3a.splats.gaussians import Cameras, Gaussians
from vist3a.splats.ply import ply_bytes
from vist3a.splats.preview import png_bytes, render_previews, save_preview_grid
from vist3a.splats.spz import spz_bytes
from vist3a.weights import prepare_weights, weights_provenance

PACKAGES = ("vist3a", "torch", "diffusers", "transformers", "peft", "gsplat", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


@dataclass
class Scene:
    prompt: str
    seed: int
    gaussians: Gaussians
    cameras: Cameras                 # the cameras the decoder predicted for the generated views
    previews: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)
    negative_prompt: str = ""
    compaction: dict = field(default_factory=dict)  # {"decoded": count, "steps": [...]} (vist3a.splats.compact)
    scores: dict[str, float] = field(default_factory=dict)   # generate.scores (vist3a.scores), NaN where not computable
    steps: int | None = None         # the sampling steps and guidance this scene was generated with
    guidance: float | None = None

    @property
    def num_gaussians(self) -> int:
        return len(self.gaussians)

    def bbox(self) -> tuple[list[float], list[float]]:
        lo, hi = self.gaussians.bbox()
        return [float(v) for v in lo], [float(v) for v in hi]


class SceneGenerator:
    """Loads the video model, the reconstruction network and the stitching layer once; generates batches."""

    def __init__(self, cfg: Config | None = None, *, video=None, decoder=None):
        """`video` (a WanVideo) and `decoder` (a StitchedDecoder): models built elsewhere, used instead of
        building them from cfg (benchmarks at the real size, with random weights drawn on the GPU)."""
        self.cfg = cfg or load_config()
        if self.cfg.runtime.torch_threads:
            torch.set_num_threads(self.cfg.runtime.torch_threads)
        self.device = resolve_device(self.cfg.runtime.device)
        self.dtype = getattr(torch, self.cfg.runtime.dtype)
        t0 = time.perf_counter()
        local_cfg = self.fetch_and_verify_weights(self.cfg)
        # runtime.* levers (vist3a.video.levers) included: compile and step cache apply to generation only
        self.video = video if video is not None else build_video(local_cfg, self.device, self.dtype, generation=True)
        self.decoder = decoder if decoder is not None else build_stitched_decoder(
            local_cfg, self.video.vae, self.device, decode_frames=self.video.decode)
        if self.cfg.sampling.negative_prompt and (why := self.video.check_prompt(self.cfg.sampling.negative_prompt)):
            raise ValueError(f"sampling.negative_prompt: {why.replace('prompt', 'negative prompt', 1)}")
        self.scorer = (SceneScorer(self.cfg.generate.scores, self.cfg.evaluate.scorers, self.cfg.storage, self.device,
                                   self.cfg.runtime.renderer) if self.cfg.generate.scores else None)
        self.load_seconds = time.perf_counter() - t0
        self.fingerprint = fingerprint(self.cfg.model.model_dump())

    @staticmethod
    def fetch_and_verify_weights(cfg: Config) -> Config:
        """Download (s3://, hub ids) and verify every weight `cfg` loads, refusing before anything is
        loaded what cannot work: no Gaussian head, or weights that are missing or do not fit
        (WeightsError / FileNotFoundError whose message says what is missing, where it looked and how
        to fetch it). Returns the config with remote weights made local."""
        if "gaussians" not in cfg.model.recon.heads:
            raise ValueError(f"preset {cfg.preset!r} builds no Gaussian head (model.recon.heads = "
                             f"{list(cfg.model.recon.heads)}), so it cannot produce splat scenes; "
                             "use an AnySplat preset (e.g. wan2.1-1.3b+anysplat)")
        local_cfg, _ = prepare_weights(cfg)
        check_scorers(cfg.generate.scores, cfg.evaluate.scorers, cfg.storage)  # the scorers generate.scores needs
        return local_cfg

    def model_prompt(self, prompt: str) -> str:
        """What the video model is given: the user's prompt inside sampling.prompt_template."""
        return self.cfg.sampling.prompt_template.replace("{prompt}", prompt)

    def check_prompt(self, prompt) -> str | None:
        """None when the prompt can be generated, else the reason it cannot (for validation before GPU time).
        The token limit counts the templated prompt: that is what the text encoder reads."""
        return self.video.check_prompt(prompt, self.cfg.sampling.prompt_template)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int] | None = None, negative_prompts: list[str] | None = None,
                 steps: int | None = None, guidance: float | None = None) -> list[Scene]:
        s = self.cfg.sampling
        if seeds is None:
            seeds = [s.seed if s.seed is not None else seed_from(p) for p in prompts]
        if negative_prompts is None:
            negative_prompts = [s.negative_prompt] * len(prompts)
        # a prompt that brings no negative prompt of its own gets the configured one
        negative_prompts = [neg or s.negative_prompt for neg in negative_prompts]
        if not (len(prompts) == len(seeds) == len(negative_prompts)):
            raise ValueError("prompts, seeds and negative_prompts must have the same length")
        for p in prompts:
            reason = self.check_prompt(p)
            if reason:
                raise ValueError(f"prompt {p!r:.60}: {reason}")
        n = len(prompts)
        steps, guidance = steps or s.steps, s.guidance if guidance is None else guidance
        t0 = time.perf_counter()
        latents = self.video.sample(
            [self.model_prompt(p) for p in prompts], seeds, steps=steps, guidance=guidance,
            shift=s.shift, frames=s.frames, height=s.height, width=s.width, negative_prompt=negative_prompts,
        )
        t1 = time.perf_counter()
        o = self.cfg.splats
        decoded = self.decoder(latents)
        settings = CompactSettings(voxel_size=o.voxel_size, voxel_footprints=o.voxel_footprints, min_opacity=o.min_opacity,
                                   max_gaussians=o.max_gaussians, sh_degree=o.sh_degree)
        scenes = []
        compacted = []
        for i in range(n):
            g = decoded.gaussians[i].detach()
            params = decoded.recon.gaussian_params if decoded.recon is not None else None
            # the head's confidence weights the voxel merge while the Gaussians are still one per pixel
            conf = params[i, ..., -1].reshape(-1).float() if params is not None and params[i, ..., -1].numel() == g.num else None
            small, report = compact(g, settings, confidence=conf, cameras=decoded.cameras[i])
            compacted.append((small, {"decoded": g.num, "steps": report}))
        t2 = time.perf_counter()
        for i, (g, compaction) in enumerate(compacted):
            t_r = time.perf_counter()
            previews = render_previews(g, o.preview_views, o.preview_size, backend=self.cfg.runtime.renderer) if o.preview_views else []
            render_s = time.perf_counter() - t_r
            t_s = time.perf_counter()
            scores = self.scorer.score(g, decoded.cameras[i], prompts[i], frames=None if decoded.frames is None
                                       else decoded.frames[i]) if self.scorer else {}
            scenes.append(Scene(
                prompt=prompts[i], seed=int(seeds[i]), negative_prompt=negative_prompts[i],
                gaussians=g.to("cpu"), cameras=decoded.cameras[i].to("cpu"),
                previews=previews, steps=steps, guidance=guidance,
                timings={"sample_s": (t1 - t0) / n, "decode_s": (t2 - t1) / n, "render_s": render_s,
                         **({"score_s": time.perf_counter() - t_s} if self.scorer else {})},
                scores=scores, compaction=compaction,
            ))
        return scenes

    @functools.cached_property
    def model_provenance(self) -> dict:
        """The model a scene came from: preset, config fingerprint, each weights file's quick fingerprint,
        the LoRA and the licence terms (vist3a.weights.weights_provenance). Worked out once per generator,
        at the first meta: from the start-up check when one was kept (`weights_check`), else by locating
        the weights again without fetching (headers only)."""
        return {"preset": self.cfg.preset, "config_fingerprint": self.fingerprint,
                **weights_provenance(self.cfg, getattr(self, "weights_check", None))}

    def provenance(self, scene: Scene, versions: dict | None = None) -> dict:
        """Everything that decides a scene besides its prompt, in one place: the model (model_provenance),
        the settings it was sampled with (a request's steps/guidance/negative prompt over the config's)
        and the software versions."""
        s = self.cfg.sampling
        return {
            "model": copy.deepcopy(self.model_provenance),  # the cached record stays as it was
            "sampling": {"prompt_template": s.prompt_template, "negative_prompt": scene.negative_prompt,
                         "steps": scene.steps or s.steps, "guidance": s.guidance if scene.guidance is None else scene.guidance,
                         "shift": s.shift, "frames": s.frames, "height": s.height, "width": s.width, "seed": scene.seed},
            "versions": versions or package_versions(),
        }

    def meta(self, scene: Scene) -> dict:
        lo, hi = scene.bbox()
        versions = package_versions()
        return {
            "prompt": scene.prompt,
            "negative_prompt": scene.negative_prompt,
            "prompt_template": self.cfg.sampling.prompt_template,
            "seed": scene.seed,
            "preset": self.cfg.preset,
            "weights_fingerprint": self.fingerprint,
            # the settings this scene was sampled with (a request's steps/guidance over the config's)
            "sampling": {**self.cfg.sampling.model_dump(),
                         **{k: v for k, v in (("steps", scene.steps), ("guidance", scene.guidance)) if v is not None}},
            "num_gaussians": scene.num_gaussians,
            "compaction": scene.compaction,
            "bbox_min": lo,
            "bbox_max": hi,
            "timings": scene.timings,
            "scores": {k: None if v != v else v for k, v in scene.scores.items()},  # NaN -> null: strict JSON
            "device": str(self.device),
            "versions": versions,
            "licence": self.model_provenance["licence"],  # the terms the weights put on this scene
            "provenance": self.provenance(scene, versions),
        }


SCENE_FORMATS = {"ply": "scene.ply", "spz": "scene.spz"}


def scene_files(scene: Scene, meta: dict, ply_sh_degree: int = 3, formats=("ply",)) -> dict[str, bytes]:
    """The files of one scene, as bytes: scene.ply (INRIA layout) and/or scene.spz (SPZ v3) as `formats`
    (splats.formats) say, preview.png, cameras.json, meta.json."""
    unknown = [f for f in formats if f not in SCENE_FORMATS]
    if unknown or not formats:
        raise ValueError(f"scene formats {list(formats)}: each must be one of {sorted(SCENE_FORMATS)}, at least one")
    files = {}
    if "ply" in formats:
        files["scene.ply"] = ply_bytes(scene.gaussians, sh_degree=ply_sh_degree)
    if "spz" in formats:
        files["scene.spz"] = spz_bytes(scene.gaussians)
    files["cameras.json"] = json.dumps(scene.cameras.to_json(), indent=1).encode()
    files["meta.json"] = json.dumps(meta, indent=1).encode()
    if scene.previews:
        files["preview.png"] = png_bytes(save_preview_grid(scene.previews))
    return files


def generate_scene(prompt: str, out: str | None = None, config: Config | str | None = None, seed: int | None = None,
                   generator: SceneGenerator | None = None) -> Scene:
    """Generate one scene; with `out` (a directory path or s3:// prefix) also write its files there."""
    if generator is None:
        cfg = config if isinstance(config, Config) else load_config(config)
        generator = SceneGenerator(cfg)
    t0 = time.perf_counter()
    scene = generator.generate([prompt], None if seed is None else [seed])[0]
    scene.timings["total_s"] = time.perf_counter() - t0
    if out is not None:
        meta = generator.meta(scene)
        o = generator.cfg.splats
        for name, data in scene_files(scene, meta, o.ply_sh_degree, o.formats).items():
            write_bytes(join(out, name), data, generator.cfg.storage)
    return scene
