"""GPU throughput of scene generation against the FLOP floor (issue 13): seconds a scene, end to end and per
stage, at batch sizes 1, 2, 4, 8, for the vist3a-1.3b preset at the real size (512 px x 13 frames, 50 UniPC
steps, CFG 7.5, the orbit template and negative prompt, the stitched AnySplat decoder in bfloat16 with
AnySplat's voxelize 0.002, SPZ files), with each throughput lever (runtime.* keys) measured on and off, and a
14B run that says whether it fits one GPU. Device only: on a machine without CUDA it exits with a message
(--smoke runs the same code at tiny sizes on the CPU, to test the script; its numbers mean nothing).

One command on a GPU machine (the device tool runs it within its 10-minute limit; ~5-8 min on an H200):

    bash benchmarks/gpu_checks.sh throughput          # results in $OUT (default out/gpu)
    .venv/bin/python benchmarks/gpu_throughput.py     # the same, results in benchmarks/results/

Writes benchmarks/results/gpu-throughput-<gpu>.json (rewritten after every section, so a run that is cut short
keeps what it measured) and prints a summary table.

Models. Random weights drawn on the GPU, in the modules that loading the release builds: Wan 2.1 T2V 1.3B
(diffusers' WanTransformer3DModel, the UMT5-xxl encoder, the Wan VAE) and the AnySplat-size network with the
release's stitching layer (its LoRA merged, as loading anysplat_stitched.pth leaves it: no adapter cost at run
time). Throughput does not depend on the values of the weights, except for the opt-in step cache (which skips
steps when consecutive steps agree: random weights say nothing about how often real ones do). Prompts are
encoded with the byte-level tokenizer (the real one needs its vocabulary file); every prompt is padded to 512
tokens either way, so the encoder's cost is the same. The negative prompt is cut to fit 512 bytes.

How each number is measured (torch.cuda.synchronize around every timed call; warm-up calls first):
- denoising: one step = (T(sample, hi steps) - T(sample, lo steps)) / (hi - lo), --timing-steps lo,hi
  (default 1,3): the encoder, the noise and the scheduler set-up cancel. 50 steps = 50 x one step:
  the 50-step figures are extrapolated from these few steps, not run (the output says so).
- text encode: WanVideo.encode_prompt (prompts + the negative prompt).
- VAE decode: WanVideo.decode of the batch's latents (frames for the Gaussian head).
- stitched decode: the StitchedDecoder on the latents with those frames given (stitching layer, network,
  Gaussian head, AnySplat voxelize).
- post-processing: what SceneGenerator.generate does after the decoder (compaction, preview renders).
- file encoding: scene_files (SPZ, cameras, meta, preview PNG), on the CPU: in the bulk job a separate Ray
  Data CPU stage, so it overlaps the next batch's GPU work (the `overlap` lever measures it in-process).
- end to end: SceneGenerator.generate at lo steps + (50 - lo) x one step; s/scene = that / batch size (the
  GPU's critical path; files separately). scenes/GPU-hour = 3600 / s/scene. Peak memory: torch's
  max_memory_allocated over the end-to-end call.

FLOP floor. One transformer pass on one sequence of N video tokens and L text tokens, width d = heads x
head_dim, FFN width f, K blocks, counting a multiply-add as 2 FLOPs:
    K x [ 8 N d^2           self-attention q, k, v, out projections
        + 4 N^2 d           self-attention scores and weighted values
        + 4 N d^2 + 4 L d^2 cross-attention q, out (video) and k, v (text)
        + 4 N L d           cross-attention scores and values
        + 4 N d f ]         feed-forward (two matmuls)
    + 2 L (text_dim d + d^2) + 2 N d (c p + c p)   text embedding; patch embedding and head (c = 16, p = 1x2x2)
N = T' x (H/8/2) x (W/8/2) = 4 x 32 x 32 = 4,096 and L = 512 at the recipe: 13.9 TFLOP a pass for 1.3B
(116 TFLOP for 14B). A scene is 2 passes a step (CFG) x 50 steps; the floor is that count at the GPU's dense
bf16 peak (989 TFLOP/s for H100/H200 SXM; --peak-tflops otherwise): 1.41 s for 1.3B. The ratio to the floor
is the measured s/scene over it. The formula is checked against torch's FlopCounterMode on one pass
(flop_check in the JSON). Achieved TFLOP/s counts the denoising only.

Levers (--levers, at batch --lever-batch; each on/off on the same models, deviation vs the default on the
same seeds): cfg_batch (CFG in one transformer batch vs two calls), attention (sdpa, flash, cudnn, efficient,
math), compile (torch.compile of the blocks per --compile-modes, compile time = first call - steady call),
vae_dtype (bf16 vs fp32 decode on the same latents: time, memory, frame deviation/PSNR), text_encoder (device,
offload, cpu: encode time and the memory the encoder holds while denoising), overlap (file encoding of batch k
in a thread while batch k+1 generates, vs one after the other, at --overlap-steps), step_cache (diffusers'
First Block Cache, opt-in, at --cache-steps: time and latent deviation).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

RECIPE_STEPS = 50
H100_PEAK_TFLOPS = 989.0
#: dense bf16 tensor-core peak, TFLOP/s, by GPU name (first match wins; --peak-tflops overrides)
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100 nvl", 835.0), ("gh200", 989.0), ("h200", 989.0), ("h100", 989.0),
               ("h800", 989.0), ("h20", 148.0), ("b200", 2250.0), ("gb200", 2500.0), ("a100", 312.0),
               ("a800", 312.0), ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("a10", 125.0))
PROMPTS = ["a red barn in a snowy field", "a cosy reading nook with a green armchair", "a stone bridge over a river",
           "a futuristic kitchen with white cabinets", "a wooden sailboat on a calm lake", "a desert canyon at sunset",
           "a bonsai tree on a marble table", "a narrow street in an old european town"]
LEVERS = ("cfg_batch", "attention", "compile", "vae_dtype", "text_encoder", "overlap", "step_cache")
ATTENTIONS = ("sdpa", "flash", "cudnn", "efficient", "math")
GOAL_S_PER_SCENE = 2.5

CUDA = torch.cuda.is_available()


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def timed(fn, repeat: int = 1):
    """-> (last result, seconds a call, peak GiB allocated during the calls)."""
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = None
    for _ in range(repeat):
        out = fn()
    sync()
    seconds = (time.perf_counter() - t0) / repeat
    return out, seconds, gib(torch.cuda.max_memory_allocated()) if CUDA else None


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def rnd(x, n: int = 4):
    return None if x is None else round(float(x), n)


def deviation(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far `a` is from the reference `b`: max |a-b|, and the RMS of a-b relative to b's."""
    a, b = a.float(), b.float()
    d = a - b
    return {"max_abs": float(d.abs().max()), "rel_rms": float(d.pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))}


# ----------------------------------------------------------------------------- FLOPs


def wan_pass_flops(t, tokens: int, text_tokens: int) -> float:
    """FLOPs of one Wan transformer pass on one sequence (the formula in the module docstring). `t` is a
    WanTransformerConfig (vist3a.config)."""
    d, f, n, L = t.num_attention_heads * t.attention_head_dim, t.ffn_dim, tokens, text_tokens
    block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * L * d * d + 4 * n * L * d + 4 * n * d * f
    patch = math.prod(t.patch_size)
    edges = 2 * L * (t.text_dim * d + d * d) + 2 * n * d * (t.in_channels * patch + t.out_channels * patch)
    return t.num_layers * block + edges


def video_tokens(cfg) -> int:
    s, t = cfg.sampling, cfg.model.video.transformer
    latent_frames = (s.frames - 1) // 4 + 1
    return (latent_frames // t.patch_size[0]) * (s.height // 8 // t.patch_size[1]) * (s.width // 8 // t.patch_size[2])


def scene_flops(cfg, steps: int = RECIPE_STEPS) -> float:
    """The denoising FLOPs of one scene: passes a step (2 with CFG) x steps."""
    passes = 2 if cfg.sampling.guidance > 1.0 else 1
    return wan_pass_flops(cfg.model.video.transformer, video_tokens(cfg), cfg.model.video.text_encoder.max_length) * passes * steps


def peak_tflops(name: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-tflops"
    low = name.lower()
    for key, value in PEAK_TFLOPS:
        if key in low:
            return value, f"table ({key})"
    return H100_PEAK_TFLOPS, "unknown GPU: the H100 figure the issue's goal is stated against"


def counted_pass_flops(video, cfg, dev) -> float | None:
    """One transformer pass (batch 1, the recipe's shapes) under torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from vist3a.video import latent_shape

    s = cfg.sampling
    shape = latent_shape(video.components, s.frames, s.height, s.width)
    x = torch.randn(1, *shape, device=dev, dtype=video.transformer.dtype)
    ctx = torch.zeros(1, cfg.model.video.text_encoder.max_length, cfg.model.video.transformer.text_dim, device=dev,
                      dtype=video.transformer.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        video.transformer(hidden_states=x, timestep=torch.full((1,), 500.0, device=dev), encoder_hidden_states=ctx,
                          return_dict=False)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- config and models


def bench_config(preset: str, smoke: bool, overrides: list[str]):
    """The preset at the real size with random weights (or the tiny preset with --smoke)."""
    from vist3a.config import build_config
    from vist3a.presets import VIST3A_NEGATIVE_PROMPT

    if smoke:
        base = ["model.recon.heads=[camera,depth,gaussians]", "model.recon.conventions=anysplat", "runtime.device=cpu",
                "splats.preview_views=1", "splats.preview_size=32", "splats.formats=[spz]", "sampling.guidance=7.5",
                "sampling.negative_prompt=blurry"]
    else:
        base = [f"preset={preset}", "model.video.source=random", "model.video.weights=null", "model.video.lora=null",
                "model.video.text_encoder.tokenizer=byt5", "model.recon.source=random", "model.recon.weights=null",
                "model.stitch.weights=null", "splats.postprocess=vist3a", "runtime.device=cuda"]
    cfg = build_config({}, base + list(overrides), source="gpu_throughput")
    if not smoke:  # the byte-level tokenizer counts bytes: the release's negative prompt is cut to fit
        limit = cfg.model.video.text_encoder.max_length - 8
        cfg.sampling.negative_prompt = VIST3A_NEGATIVE_PROMPT[:limit]
    return cfg


def build_generator(cfg, dev, smoke: bool):
    """SceneGenerator on models built here: weights drawn on the GPU (fast at the real size), the runtime levers
    of cfg applied (vist3a.models), and AnySplat's voxelize 0.002 in the decoder as the release's config sets it."""
    from vist3a.generator import SceneGenerator
    from vist3a.models import build_stitched_decoder, build_video
    from vist3a.recon.pixel_gaussians import AnySplatPostprocess

    init = None if smoke else dev
    video = build_video(cfg, dev, getattr(torch, cfg.runtime.dtype), generation=True, init_device=init)
    decoder = build_stitched_decoder(cfg, video.vae, dev, decode_frames=video.decode, init_device=init)
    decoder.anysplat = AnySplatPostprocess(voxelize=True, voxel_size=0.002, sh_degree=cfg.model.recon.sh_degree)
    return SceneGenerator(cfg, video=video, decoder=decoder)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------- the stages


class Bench:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device("cuda" if CUDA else "cpu")
        self.gpu = torch.cuda.get_device_name() if CUDA else "cpu"
        self.lo, self.hi = args.timing_steps
        self.steps = args.steps
        self.R: dict = {}
        out_dir = Path(args.out_dir or (REPO / ("out/gpu-throughput-smoke" if args.smoke else "benchmarks/results")))
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-") + ("-smoke" if args.smoke else "")
        self.path = out_dir / f"gpu-throughput-{slug}.json"

    # -- bookkeeping
    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.R, indent=1, default=str))
        os.replace(tmp, self.path)

    def section(self, name: str, fn):
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            self.R[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a failed section is a result too; the others still run
            traceback.print_exc()
            self.R[name] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        if isinstance(self.R[name], dict):
            self.R[name]["section_s"] = round(time.perf_counter() - t0, 1)
        free()
        self.save()
        return self.R[name]

    # -- sampling helpers
    def kw(self, cfg) -> dict:
        s = cfg.sampling
        return dict(guidance=s.guidance, shift=s.shift, frames=s.frames, height=s.height, width=s.width,
                    negative_prompt=s.negative_prompt)

    def batch(self, gen, b: int) -> tuple[list[str], list[str], list[int]]:
        users = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        return users, [gen.model_prompt(p) for p in users], list(range(b))

    def per_step(self, gen, b: int, warm: bool = True) -> dict:
        """Seconds of one denoising step at batch b: (T(hi) - T(lo)) / (hi - lo), after a warm-up call."""
        video, kw = gen.video, self.kw(gen.cfg)
        _, prompts, seeds = self.batch(gen, b)
        warm_s = None
        if warm:
            _, warm_s, _ = timed(lambda: video.sample(prompts, seeds, steps=self.lo, **kw))
        reps = self.args.repeats
        _, t_lo, _ = timed(lambda: video.sample(prompts, seeds, steps=self.lo, **kw), reps)
        z, t_hi, peak = timed(lambda: video.sample(prompts, seeds, steps=self.hi, **kw), reps)
        step = max((t_hi - t_lo) / (self.hi - self.lo), 1e-9)
        return {"step_s": step, "latents": z, "peak_gib": peak, "first_call_s": warm_s, "lo_s": t_lo}

    def postprocess(self, gen, decoded):
        """What SceneGenerator.generate does after the decoder: compaction per scene, then preview renders."""
        from vist3a.splats.compact import CompactSettings, compact
        from vist3a.splats.preview import render_previews

        o = gen.cfg.splats
        settings = CompactSettings(voxel_size=o.voxel_size, voxel_footprints=o.voxel_footprints,
                                   min_opacity=o.min_opacity, max_gaussians=o.max_gaussians, sh_degree=o.sh_degree)
        params_ = decoded.recon.gaussian_params if decoded.recon is not None else None
        kept = []
        for i, g in enumerate(decoded.gaussians):
            conf = (params_[i, ..., -1].reshape(-1).float() if params_ is not None and params_[i, ..., -1].numel() == g.num
                    else None)
            small, _ = compact(g.detach(), settings, confidence=conf, cameras=decoded.cameras[i])
            if o.preview_views:
                render_previews(small, o.preview_views, o.preview_size, backend=gen.cfg.runtime.renderer)
            kept.append(small.num)
        return kept

    def files(self, gen, scenes) -> float:
        from vist3a.generator import scene_files

        o = gen.cfg.splats
        t0 = time.perf_counter()
        for scene in scenes:
            scene_files(scene, gen.meta(scene), o.ply_sh_degree, o.formats)
        return time.perf_counter() - t0

    # -- sections
    def environment(self, cfg) -> dict:
        import diffusers
        import transformers

        peak, source = peak_tflops(self.gpu, self.args.peak_tflops)
        self.peak = peak
        per_scene = scene_flops(cfg, self.steps)
        out = {"gpu": self.gpu, "smoke": self.args.smoke, "torch": torch.__version__, "cuda": torch.version.cuda,
               "diffusers": diffusers.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "preset": self.args.preset,
               "gpu_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory) if CUDA else None,
               "recipe": {"steps": self.steps, "guidance": cfg.sampling.guidance, "frames": cfg.sampling.frames,
                          "height": cfg.sampling.height, "width": cfg.sampling.width,
                          "video_tokens": video_tokens(cfg), "text_tokens": cfg.model.video.text_encoder.max_length},
               "runtime": cfg.runtime.model_dump(),
               "timing": f"one denoising step = (T({self.hi} steps) - T({self.lo} steps)) / {self.hi - self.lo}; "
                         f"{self.steps}-step figures are extrapolated from it, not run",
               "peak_tflops": peak, "peak_source": source,
               "floor": {"tflop_per_pass": rnd(per_scene / self.steps / (2 if cfg.sampling.guidance > 1 else 1) / 1e12, 2),
                         "tflop_per_scene": rnd(per_scene / 1e12, 1),
                         "floor_s_per_scene": rnd(per_scene / (peak * 1e12), 3),
                         "floor_s_per_scene_h100": rnd(per_scene / (H100_PEAK_TFLOPS * 1e12), 3)}}
        self.floor_s = per_scene / (peak * 1e12)
        return out

    def build(self, cfg) -> dict:
        (gen, t_build, peak) = timed(lambda: build_generator(cfg, self.dev, self.args.smoke))
        self.gen = gen
        v = gen.video
        return {"build_s": round(t_build, 2), "peak_gib": peak,
                "resident_gib": gib(torch.cuda.memory_allocated()) if CUDA else None,
                "params": {"transformer": params(v.transformer), "text_encoder": params(v.components.text_encoder),
                           "vae": params(v.vae), "stitched_decoder": params(gen.decoder)},
                "weights_gib": {"transformer": gib(weight_bytes(v.transformer)),
                                "text_encoder": gib(weight_bytes(v.components.text_encoder)),
                                "vae": gib(weight_bytes(v.vae)), "stitched_decoder": gib(weight_bytes(gen.decoder))}}

    def flop_check(self, cfg) -> dict:
        formula = wan_pass_flops(cfg.model.video.transformer, video_tokens(cfg), cfg.model.video.text_encoder.max_length)
        counted = counted_pass_flops(self.gen.video, cfg, self.dev)
        return {"formula_flop": formula, "counted_flop": counted,
                "formula_tflop": rnd(formula / 1e12, 3), "counted_tflop": rnd(counted / 1e12, 3),
                "counted_over_formula": rnd(counted / formula, 4) if counted else None,
                "note": "counted: torch.utils.flop_counter on one pass (matmuls, convolutions and, on CUDA, the "
                        "attention kernels; on the CPU its attention is not counted)"}

    def one_batch(self, b: int) -> dict:
        gen, cfg = self.gen, self.gen.cfg
        video, decoder = gen.video, gen.decoder
        users, prompts, seeds = self.batch(gen, b)
        negs = [cfg.sampling.negative_prompt] * b
        r: dict = {"batch": b}
        video.encode_prompt(prompts, negs)
        _, r["text_encode_s"], _ = timed(lambda: video.encode_prompt(prompts, negs))
        st = self.per_step(gen, b)
        z = st.pop("latents")
        r["denoise_step_s"] = st["step_s"]
        r["denoise_first_call_s"] = st["first_call_s"]
        r["denoise_peak_gib"] = st["peak_gib"]
        r["denoise_s"] = st["step_s"] * self.steps
        video.decode(z)
        frames, r["vae_decode_s"], r["vae_decode_peak_gib"] = timed(lambda: video.decode(z))
        decoder(z, frames=frames)
        decoded, r["stitched_decode_s"], r["stitched_decode_peak_gib"] = timed(lambda: decoder(z, frames=frames))
        r["gaussians_decoded"] = [g.num for g in decoded.gaussians]
        self.postprocess(gen, decoded)
        kept, r["postprocess_s"], _ = timed(lambda: self.postprocess(gen, decoded))
        r["gaussians_kept"] = kept
        decoded = frames = None  # (not del: the timed lambdas above name them)
        free()
        scenes, e2e_lo, r["peak_gib"] = timed(lambda: gen.generate(users, seeds, steps=self.lo))
        r["end_to_end_lo_steps_s"] = e2e_lo
        e2e = e2e_lo + (self.steps - self.lo) * st["step_s"]
        r["end_to_end_s"] = e2e
        r["file_encode_s"] = self.files(gen, scenes)
        flops_step = scene_flops(cfg, 1) * b
        r["s_per_scene"] = e2e / b
        r["s_per_scene_files_in_line"] = (e2e + r["file_encode_s"]) / b
        r["scenes_per_gpu_hour"] = 3600 / r["s_per_scene"]
        r["achieved_tflops_denoise"] = flops_step / st["step_s"] / 1e12
        r["ratio_to_floor"] = r["s_per_scene"] / self.floor_s
        r["denoise_ratio_to_floor"] = (r["denoise_s"] / b) / self.floor_s
        per_scene = {k[:-2] + "_s_per_scene": r[k] / b for k in
                     ("text_encode_s", "denoise_s", "vae_decode_s", "stitched_decode_s", "postprocess_s", "file_encode_s")}
        r.update(per_scene)
        r = {k: (rnd(v) if isinstance(v, float) else v) for k, v in r.items()}
        log(f"batch {b}: {r['s_per_scene']} s/scene, {r['denoise_step_s']} s/step, {r['achieved_tflops_denoise']} TFLOP/s, "
            f"x{r['ratio_to_floor']} the floor, peak {r['peak_gib']} GiB")
        return r

    def batches(self) -> dict:
        out = {}
        for b in self.args.batch_sizes:
            try:
                out[str(b)] = self.one_batch(b)
            except torch.cuda.OutOfMemoryError as exc:
                out[str(b)] = {"error": f"out of memory at batch {b}: {exc}"[:400]}
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                out[str(b)] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            free()
            self.R["batches"] = out
            self.save()
        ok = {b: r for b, r in out.items() if "s_per_scene" in r}
        if ok:
            best = min(ok, key=lambda b: ok[b]["s_per_scene"])
            out["best"] = {"batch": int(best), "s_per_scene": ok[best]["s_per_scene"],
                           "ratio_to_floor": ok[best]["ratio_to_floor"],
                           "meets_goal": ok[best]["s_per_scene"] <= GOAL_S_PER_SCENE}
        return out

    # -- levers
    def lever_cfg_batch(self) -> dict:
        gen, b = self.gen, self.args.lever_batch
        out, raw = {}, {}
        ref = None
        keep = gen.video.cfg_batch
        try:
            for on in (True, False):
                gen.video.cfg_batch = on
                st = self.per_step(gen, b)
                z = st.pop("latents")
                ref = z if on else ref
                raw[on] = st["step_s"]
                out["on" if on else "off"] = {"step_s": rnd(st["step_s"], 6), "peak_gib": st["peak_gib"],
                                              **({} if on else {"deviation": deviation(z, ref)})}
        finally:
            gen.video.cfg_batch = keep
        out["speedup_on"] = rnd(raw[False] / raw[True], 3)
        return out

    def lever_attention(self) -> dict:
        from vist3a.video.levers import attention_in_use, set_attention

        gen, b = self.gen, self.args.lever_batch
        keep = attention_in_use(gen.video.transformer)
        out, ref = {}, None
        try:
            for a in ATTENTIONS:
                try:
                    used = set_attention(gen.video.transformer, a, self.dev)
                    st = self.per_step(gen, b)
                    z = st.pop("latents")
                    ref = z if a == "sdpa" else ref
                    out[a] = {"used": used, "step_s": rnd(st["step_s"], 6), "peak_gib": st["peak_gib"],
                              **({"deviation": deviation(z, ref)} if ref is not None and a != "sdpa" else {})}
                except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is a result
                    out[a] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                free()
        finally:
            set_attention(gen.video.transformer, keep if keep in ATTENTIONS else "sdpa", self.dev)
        timed_ok = {a: r["step_s"] for a, r in out.items() if "step_s" in r}
        if timed_ok:
            out["fastest"] = min(timed_ok, key=timed_ok.get)
        return out

    def lever_compile(self) -> dict:
        from vist3a.video.levers import compile_blocks, compiled_blocks, uncompile_blocks

        gen, b = self.gen, self.args.lever_batch
        t = gen.video.transformer
        was = compiled_blocks(t) > 0
        uncompile_blocks(t)
        torch._dynamo.reset()
        eager = self.per_step(gen, b)
        ref = eager.pop("latents")
        out = {"off": {"step_s": rnd(eager["step_s"], 6), "peak_gib": eager["peak_gib"]}}
        for mode in self.args.compile_modes:
            try:
                compile_blocks(t, mode, fullgraph=not getattr(t, "_cache_config", None), backend=self.args.compile_backend)
                st = self.per_step(gen, b)
                z = st.pop("latents")
                compile_s = st["first_call_s"] - st["lo_s"]
                out[mode] = {"step_s": rnd(st["step_s"], 6), "peak_gib": st["peak_gib"], "compile_s": rnd(compile_s, 1),
                             "speedup": rnd(eager["step_s"] / st["step_s"], 3), "deviation": deviation(z, ref)}
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                out[mode] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            finally:
                uncompile_blocks(t)
                torch._dynamo.reset()
            free()
        if was:
            c = gen.cfg.runtime
            compile_blocks(t, c.compile_mode, fullgraph=c.step_cache == "off")
        out["note"] = ("compile_s: first call minus a steady call at this batch size; each new batch size compiles "
                       "once more (static shapes)")
        return out

    def lever_vae_dtype(self) -> dict:
        from vist3a.video import decode_latents
        from vist3a.video.components import _cast_like_from_pretrained

        gen, b = self.gen, self.args.lever_batch
        _, prompts, seeds = self.batch(gen, b)
        z = gen.video.sample(prompts, seeds, steps=self.lo, **self.kw(gen.cfg))
        out, frames = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            vae = copy.deepcopy(gen.video.vae)
            _cast_like_from_pretrained(vae, dtype)
            decode_latents(vae, z)
            frames[dtype], s, peak = timed(lambda: decode_latents(vae, z))
            out[str(dtype).replace("torch.", "")] = {"decode_s": rnd(s), "peak_gib": peak}
            vae = None
            free()
        a, ref = frames[torch.bfloat16], frames[torch.float32]
        mse = float((a - ref).pow(2).mean())
        out["bf16_vs_fp32_frames"] = {"max_abs": float((a - ref).abs().max()), "mean_abs": float((a - ref).abs().mean()),
                                      "psnr_db": rnd(10 * math.log10(1.0 / max(mse, 1e-20)), 2)}
        # the Gaussian head sees these frames: its colours move with them
        da, dr = gen.decoder(z, frames=a), gen.decoder(z, frames=ref)
        same = all(x.num == y.num for x, y in zip(da.gaussians, dr.gaussians))
        out["bf16_vs_fp32_gaussians"] = ({"sh_dc": deviation(torch.cat([g.sh[:, 0] for g in da.gaussians]),
                                                             torch.cat([g.sh[:, 0] for g in dr.gaussians]))}
                                         if same else {"counts_differ": [[x.num, y.num] for x, y in zip(da.gaussians, dr.gaussians)]})
        out["speedup_bf16"] = rnd(out["float32"]["decode_s"] / max(out["bfloat16"]["decode_s"], 1e-4), 3)
        return out

    def lever_text_encoder(self) -> dict:
        gen = self.gen
        video = gen.video
        keep = video.text_encoder_placement
        out = {}
        placements = ("device", "offload", "cpu")
        try:
            for p in placements:
                # on the CPU one prompt, no negative prompt and no warm-up: UMT5-xxl there takes seconds a prompt
                cpu = p == "cpu"
                b = 1 if cpu else self.args.lever_batch
                _, prompts, _ = self.batch(gen, b)
                negs = None if cpu else [gen.cfg.sampling.negative_prompt] * b
                try:
                    _, move_s, _ = timed(lambda: video.place_text_encoder(p))
                    if not cpu:
                        video.encode_prompt(prompts, negs)
                    _, s, peak = timed(lambda: video.encode_prompt(prompts, negs))
                    free()
                    out[p] = {"prompts": b, "negative_prompt": not cpu, "encode_s": rnd(s), "place_s": rnd(move_s),
                              "encode_peak_gib": peak,
                              "resident_gib_while_denoising": gib(torch.cuda.memory_allocated()) if CUDA else None}
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    out[p] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            video.place_text_encoder(keep)
        if "resident_gib_while_denoising" in out.get("offload", {}) and CUDA:
            out["memory_freed_gib"] = rnd(out["device"]["resident_gib_while_denoising"]
                                          - out["offload"]["resident_gib_while_denoising"], 2)
        return out

    def lever_overlap(self) -> dict:
        """File encoding of batch k in a thread while batch k+1 generates, vs one after the other."""
        gen, b, n, steps = self.gen, self.args.lever_batch, self.args.overlap_batches, self.args.overlap_steps
        batches = [self.batch(gen, b) for _ in range(n)]
        gen.generate(batches[0][0], batches[0][2], steps=steps)  # warm

        def sequential():
            for users, _, seeds in batches:
                self.files(gen, gen.generate(users, seeds, steps=steps))

        def overlapped():
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = None
                for users, _, seeds in batches:
                    scenes = gen.generate(users, seeds, steps=steps)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(self.files, gen, scenes)
                pending.result()

        _, seq_s, _ = timed(sequential)
        _, ovl_s, _ = timed(overlapped)
        scenes = n * b
        return {"batch": b, "batches": n, "steps": steps, "sequential_s_per_scene": rnd(seq_s / scenes),
                "overlapped_s_per_scene": rnd(ovl_s / scenes), "speedup": rnd(seq_s / ovl_s, 3),
                "note": "threads in one process (the GIL is shared); the bulk job encodes files in a separate Ray Data "
                        "CPU stage (other processes), which overlaps by construction"}

    def lever_step_cache(self) -> dict:
        from vist3a.video.levers import disable_step_cache, enable_step_cache, step_cache_on

        gen, steps = self.gen, self.args.cache_steps
        video, kw = gen.video, self.kw(gen.cfg)
        _, prompts, seeds = self.batch(gen, 1)
        t = video.transformer
        if step_cache_on(t):
            disable_step_cache(t)
        video.sample(prompts, seeds, steps=self.lo, **kw)
        ref, base_s, _ = timed(lambda: video.sample(prompts, seeds, steps=steps, **kw))
        out = {"batch": 1, "steps": steps, "off_s": rnd(base_s)}
        try:
            for th in self.args.cache_thresholds:
                enable_step_cache(t, th)
                z, s, _ = timed(lambda: video.sample(prompts, seeds, steps=steps, **kw))
                out[f"threshold_{th}"] = {"s": rnd(s), "speedup": rnd(base_s / s, 3), "latent_deviation": deviation(z, ref)}
                disable_step_cache(t)
        finally:
            disable_step_cache(t)
            if gen.cfg.runtime.step_cache == "first_block":
                enable_step_cache(t, gen.cfg.runtime.step_cache_threshold)
        out["note"] = ("random weights: how often real weights let a step be skipped is not measured here; "
                       "opt-in only (runtime.step_cache), it changes scenes")
        return out

    def levers(self) -> dict:
        out = {"batch": self.args.lever_batch}
        for name in self.args.levers:
            log(f"-- lever {name}")
            try:
                out[name] = getattr(self, f"lever_{name}")()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            free()
            self.R["levers"] = out
            self.save()
        return out

    # -- 14B
    def model_14b(self) -> dict:
        from diffusers import WanTransformer3DModel

        cfg14 = bench_config("vist3a-14b" if not self.args.smoke else self.args.preset, self.args.smoke,
                             self.args.overrides)
        with torch.device("meta"):
            dit = WanTransformer3DModel(**cfg14.model.video.transformer.model_dump())
        n14 = params(dit)
        del dit
        v = self.gen.video
        bytes_of = {"transformer": n14 * torch.finfo(getattr(torch, cfg14.runtime.dtype)).bits // 8,
                    "text_encoder": weight_bytes(v.components.text_encoder), "vae": weight_bytes(v.vae),
                    "stitched_decoder": weight_bytes(self.gen.decoder)}
        weights = sum(bytes_of.values())
        b1 = self.R.get("batches", {}).get("1", {})
        small = weight_bytes(v.transformer) + bytes_of["text_encoder"] + bytes_of["vae"] + bytes_of["stitched_decoder"]
        width = cfg14.model.video.transformer.num_attention_heads / v.transformer.config.num_attention_heads
        # activations: the 1.3B run's peak over its weights, scaled by the width for the transformer's share
        act = (max(b1["peak_gib"] * 2**30 - small, 0) * max(width, 1.0) if b1.get("peak_gib") else 8 * 2**30)
        est = weights + act
        total = torch.cuda.get_device_properties(0).total_memory if CUDA else None
        out = {"transformer_params": n14, "weights_gib": {k: gib(x) for k, x in bytes_of.items()},
               "estimated_peak_gib": gib(est), "estimate": "weights + the 1.3B batch-1 peak's activations x width ratio",
               "fits_80gib_estimate": est < 0.95 * 80 * 2**30,
               "fits_this_gpu_estimate": bool(total and est < 0.95 * total)}
        floor14 = scene_flops(cfg14, self.steps) / (self.peak * 1e12)
        out["floor_s_per_scene"] = rnd(floor14, 3)
        if self.args.smoke or self.args.skip_14b_run or not out["fits_this_gpu_estimate"]:
            out["run"] = "skipped: " + ("smoke" if self.args.smoke else "--skip-14b-run" if self.args.skip_14b_run
                                        else "the estimate does not fit this GPU")
            return out
        # free the 1.3B video model, keep the decoder (the same for 14B)
        decoder = self.gen.decoder
        decoder.decode_frames = None
        self.gen = None
        del v
        torch._dynamo.reset()  # compiled graphs hold the 1.3B blocks
        free()
        from vist3a.generator import SceneGenerator
        from vist3a.models import build_video

        video14, build_s, _ = timed(lambda: build_video(cfg14, self.dev, getattr(torch, cfg14.runtime.dtype),
                                                        generation=True, init_device=self.dev))
        decoder.decode_frames = video14.decode
        gen14 = SceneGenerator(cfg14, video=video14, decoder=decoder)
        out["build_s"] = rnd(build_s, 1)
        out["resident_gib"] = gib(torch.cuda.memory_allocated())
        st = self.per_step(gen14, 1)
        st.pop("latents")
        users, _, seeds = self.batch(gen14, 1)
        _, e2e_lo, peak = timed(lambda: gen14.generate(users, seeds, steps=self.lo))
        e2e = e2e_lo + (self.steps - self.lo) * st["step_s"]
        out.update({"denoise_step_s": rnd(st["step_s"]), "s_per_scene": rnd(e2e), "peak_gib": peak,
                    "fits_80gib_measured": peak is not None and peak < 0.95 * 80,
                    "scenes_per_gpu_hour": rnd(3600 / e2e, 1), "ratio_to_floor": rnd(e2e / floor14, 3),
                    "achieved_tflops_denoise": rnd(scene_flops(cfg14, 1) / st["step_s"] / 1e12, 1)})
        self.gen = gen14
        return out

    def projection(self) -> dict:
        """The best batch's s/scene with the levers that measured faster applied (a projection, not a run):
        denoising scaled by the best transformer speedup (compile or an attention kernel: the larger one, as
        they need not compound), the VAE decode by the bf16 speedup."""
        best = self.R.get("batches", {}).get("best")
        if not best:
            return {"error": "no batch size finished"}
        r, lv = self.R["batches"][str(best["batch"])], self.R.get("levers", {})
        speedups = {"none": 1.0}
        for mode, m in (lv.get("compile") or {}).items():
            if isinstance(m, dict) and m.get("speedup"):
                speedups[f"compile {mode}"] = m["speedup"]
        att = lv.get("attention") or {}
        if att.get("sdpa", {}).get("step_s") and att.get("fastest") and att[att["fastest"]].get("step_s"):
            speedups[f"attention {att['fastest']}"] = att["sdpa"]["step_s"] / att[att["fastest"]]["step_s"]
        lever = max(speedups, key=speedups.get)
        vae_speedup = max((lv.get("vae_dtype") or {}).get("speedup_bf16") or 1.0, 1.0)
        projected = (r["s_per_scene"] - r["denoise_s_per_scene"] * (1 - 1 / speedups[lever])
                     - r["vae_decode_s_per_scene"] * (1 - 1 / vae_speedup))
        return {"batch": best["batch"], "measured_s_per_scene": r["s_per_scene"], "transformer_lever": lever,
                "transformer_speedup": rnd(speedups[lever], 3), "vae_bf16_speedup": rnd(vae_speedup, 3),
                "projected_s_per_scene": rnd(projected), "projected_ratio_to_floor": rnd(projected / self.floor_s, 3),
                "meets_goal_projected": projected <= GOAL_S_PER_SCENE,
                "assumes": f"lever speedups measured at batch {self.args.lever_batch} hold at batch {best['batch']}, and "
                           "the bf16 VAE's deviation (levers.vae_dtype) is accepted; measure the chosen settings with "
                           "--set runtime.KEY=VALUE to confirm"}

    # -- the run
    def run(self) -> int:
        cfg = bench_config(self.args.preset, self.args.smoke, self.args.overrides)
        self.section("environment", lambda: self.environment(cfg))
        if "error" in self.section("build", lambda: self.build(cfg)):
            log(f"could not build the models; see {self.path}")
            return 1
        self.section("flop_check", lambda: self.flop_check(cfg))
        self.section("batches", self.batches)
        if self.args.levers:
            self.section("levers", self.levers)
            self.section("projection", self.projection)
        if not self.args.skip_14b:
            self.section("model_14b", self.model_14b)
        self.R["total_s"] = round(time.perf_counter() - T0, 1)
        self.save()
        print(summary(self.R, self.path))
        return 0


def summary(R: dict, path: Path) -> str:
    env = R.get("environment", {})
    lines = [f"GPU throughput, {env.get('preset')} on {env.get('gpu')} ({path})",
             f"  floor: {env.get('floor', {}).get('floor_s_per_scene')} s/scene at {env.get('peak_tflops')} TFLOP/s "
             f"({env.get('floor', {}).get('tflop_per_scene')} TFLOP a scene); {env.get('timing')}",
             "  batch  s/scene  scenes/h  x floor  TFLOP/s  step s  encode  denoise  vae  stitched  post  files  peak GiB"]
    for b, r in R.get("batches", {}).items():
        if b == "best" or not isinstance(r, dict):
            continue
        if "error" in r:
            lines.append(f"  {b:>5}  {r['error'][:90]}")
            continue
        lines.append(f"  {b:>5}  {r['s_per_scene']:>7}  {round(r['scenes_per_gpu_hour']):>8}  {r['ratio_to_floor']:>7}  "
                     f"{r['achieved_tflops_denoise']:>7}  {r['denoise_step_s']:>6}  {r['text_encode_s_per_scene']:>6}  "
                     f"{r['denoise_s_per_scene']:>7}  {r['vae_decode_s_per_scene']:>5}  {r['stitched_decode_s_per_scene']:>8}  "
                     f"{r['postprocess_s_per_scene']:>5}  {r['file_encode_s_per_scene']:>5}  {r['peak_gib']}")
    best = R.get("batches", {}).get("best")
    if best:
        lines.append(f"  best: batch {best['batch']}, {best['s_per_scene']} s/scene (x{best['ratio_to_floor']} the floor); "
                     f"goal <= {GOAL_S_PER_SCENE} s: {'met' if best['meets_goal'] else 'not met'}")
    for name, r in R.get("levers", {}).items():
        if isinstance(r, dict):
            brief = {k: v for k, v in r.items() if k != "note"}
            lines.append(f"  lever {name}: {json.dumps(brief, default=str)[:300]}")
    pr = R.get("projection")
    if pr and "projected_s_per_scene" in pr:
        lines.append(f"  projected with the faster levers ({pr['transformer_lever']}, VAE bf16 x{pr['vae_bf16_speedup']}): "
                     f"{pr['projected_s_per_scene']} s/scene (x{pr['projected_ratio_to_floor']} the floor) at batch "
                     f"{pr['batch']}; a projection: {pr['assumes']}")
    m = R.get("model_14b")
    if m:
        lines.append(f"  14B: {json.dumps({k: v for k, v in m.items() if k not in ('weights_gib',)}, default=str)[:400]}")
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vist3a-1.3b", help="the preset measured at the real size (default: vist3a-1.3b)")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="comma list (default: 1,2,4,8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps a scene is extrapolated to (default: 50)")
    p.add_argument("--timing-steps", type=int_list, default=[1, 3],
                   help="lo,hi: one step = (T(hi) - T(lo)) / (hi - lo) (default: 1,3)")
    p.add_argument("--repeats", type=int, default=1, help="calls averaged per timing (default: 1)")
    p.add_argument("--levers", default=",".join(LEVERS),
                   help=f"comma list of levers measured on/off, or 'none' (default: all: {','.join(LEVERS)})")
    p.add_argument("--lever-batch", type=int, default=None, help="batch size the levers are measured at (default: 2)")
    p.add_argument("--compile-modes", default="default",
                   help="torch.compile modes measured (comma list of default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs; default: default: max-autotune takes minutes)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; --smoke: aot_eager, the graph capture without "
                        "inductor's slow CPU code generation)")
    p.add_argument("--overlap-batches", type=int, default=None, help="batches the overlap lever runs (default: 3)")
    p.add_argument("--overlap-steps", type=int, default=None, help="steps a scene in the overlap lever (default: 10)")
    p.add_argument("--cache-steps", type=int, default=None, help="steps of the step-cache comparison (default: 20)")
    p.add_argument("--cache-thresholds", default="0.05,0.1", help="First Block Cache thresholds (default: 0.05,0.1)")
    p.add_argument("--skip-14b", action="store_true", help="no 14B section at all")
    p.add_argument("--skip-14b-run", action="store_true", help="14B: the memory estimate only, no run")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, TFLOP/s (default: from a table of known GPUs; 989 for H100/H200)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the measured baseline, e.g. --set runtime.attention=flash (repeatable)")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default: benchmarks/results/)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny preset on the CPU: tests this script; its numbers mean nothing (defaults then: "
                        "batch sizes 1,2, 4 steps, levers at batch 1, compile backend aot_eager)")
    args = p.parse_args(argv)
    defaults = (dict(batch_sizes=[1, 2], steps=4, lever_batch=1, compile_backend="aot_eager", overlap_batches=2,
                     overlap_steps=2, cache_steps=6) if args.smoke else
                dict(batch_sizes=[1, 2, 4, 8], steps=RECIPE_STEPS, lever_batch=2, compile_backend="inductor",
                     overlap_batches=3, overlap_steps=10, cache_steps=20))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.levers = [] if args.levers in ("none", "") else [x.strip() for x in args.levers.split(",") if x.strip()]
    unknown = [x for x in args.levers if x not in LEVERS]
    if unknown:
        p.error(f"--levers: unknown {unknown}; choose from {', '.join(LEVERS)} or none")
    args.compile_modes = [x.strip() for x in args.compile_modes.split(",") if x.strip()]
    args.cache_thresholds = [float(x) for x in args.cache_thresholds.split(",") if x.strip()]
    if len(args.timing_steps) != 2 or not 0 < args.timing_steps[0] < args.timing_steps[1]:
        p.error(f"--timing-steps must be lo,hi with 0 < lo < hi, got {args.timing_steps}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    return args


T0 = time.perf_counter()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not CUDA and not args.smoke:
        print("gpu_throughput.py measures a CUDA GPU, and this machine has none (torch.cuda.is_available() is False).\n"
              "Run it on a GPU machine:  bash benchmarks/gpu_checks.sh throughput\n"
              "To test the script itself on the CPU at tiny sizes:  python benchmarks/gpu_throughput.py --smoke",
              file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with torch.no_grad():  # inference throughout (the decoder's own parameters keep requires_grad)
        return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
