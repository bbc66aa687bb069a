"""Reward fine-tuning on CUDA, by hand on a GPU machine (seconds): what the CPU tests cannot reach.

    python3 benchmarks/align_gpu_check.py > out/align_gpu.json

1. the reward terms of fixed prompts/seeds on CUDA (float32) equal the CPU's;
2. 3 AlignTrainer steps on CUDA with a bfloat16 transformer, CFG, random grad steps and gradient
   checkpointing: finite losses, float32 adapters, only the LoRA changes, step time and peak memory;
3. export -> model.video.lora -> a bfloat16 WanVideo on CUDA samples what the trainer's adapted
   transformer samples, and not what the base model samples.
Renders use the torch backend (no gsplat build in the budget; gsplat vs. torch: tests/test_gpu_render.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

FAST = ["sampling.height=32", "sampling.width=32", "model.recon.img_size=32", "align.render_stride=1"]
PROMPTS = ["a red barn in the snow", "a lighthouse on a rock"]


def trainer(cfg, device, dtype, scorer_dir):
    from vist3a.models import build_stitched_decoder, build_video
    from vist3a.rewards import ClipScorer
    from vist3a.train.align import AlignTrainer

    video = build_video(cfg, device, dtype)
    decoder = build_stitched_decoder(cfg, video.vae, device, decode_frames=video.decode)
    return AlignTrainer(cfg, video, decoder, ClipScorer.load(scorer_dir, device=device), device)


def main() -> int:
    import vist3a.splats.render as render_mod
    from vist3a.config import load_config
    from vist3a.models import build_video
    from vist3a.rewards import write_tiny_clip

    render_mod._gsplat_importable = lambda: False
    cuda = torch.device(os.environ.get("ALIGN_CHECK_DEVICE", "cuda"))  # "cpu": a dry run of the script itself
    on_gpu = cuda.type == "cuda"
    out: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        scorer_dir = str(write_tiny_clip(os.path.join(tmp, "clip")))
        base = FAST + [f"align.scorer={scorer_dir}", "align.guidance_min=4", "align.guidance_max=6"]
        cfg = load_config(None, base)
        cpu_r = trainer(cfg, torch.device("cpu"), torch.float32, scorer_dir).evaluate(PROMPTS, [1, 2], steps=3)
        gpu_r = trainer(cfg, cuda, torch.float32, scorer_dir).evaluate(PROMPTS, [1, 2], steps=3)
        out["cpu_vs_cuda_fp32"] = {k: [cpu_r[k], gpu_r[k]] for k in cpu_r}
        out["cpu_vs_cuda_max_abs"] = max(abs(cpu_r[k] - gpu_r[k]) for k in cpu_r)

        cfg = load_config(None, base + ["runtime.dtype=bfloat16", "align.steps_min=4", "align.steps_max=6",
                                        "align.grad_steps=3", "align.grad_step_choice=random",
                                        "align.gradient_checkpointing=true", "align.lr=1e-2", "align.batch_size=2"])
        tr = trainer(cfg, cuda, torch.bfloat16, scorer_dir)
        frozen = {n: p.detach().clone() for n, p in tr.transformer.named_parameters() if "lora_" not in n}
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        steps = []
        for _ in range(3):
            t0 = time.perf_counter()
            m = tr.train_step(PROMPTS)
            if on_gpu:
                torch.cuda.synchronize()
            steps.append({k: m[k] for k in ("loss", "grad_norm", "skipped", "rollout_steps", "reward_quality")}
                         | {"seconds": time.perf_counter() - t0})
        out["bf16_steps"] = steps
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
        out["lora_dtypes"] = sorted({str(p.dtype) for p in tr.params.values()})
        out["frozen_unchanged"] = all(torch.equal(p, frozen[n]) for n, p in tr.transformer.named_parameters()
                                      if "lora_" not in n)
        paths = tr.export(os.path.join(tmp, "aligned"))
        kw = dict(steps=3, guidance=5.0, shift=3.0, frames=5, height=32, width=32)
        with torch.no_grad():
            adapted = tr.video.sample(PROMPTS, [5, 6], **kw)
            aligned = build_video(load_config(None, base + ["runtime.dtype=bfloat16", f"model.video.lora={paths['lora']}"]),
                                  cuda, torch.bfloat16).sample(PROMPTS, [5, 6], **kw)
            plain = build_video(load_config(None, base + ["runtime.dtype=bfloat16"]), cuda,
                                torch.bfloat16).sample(PROMPTS, [5, 6], **kw)
        out["loaded_vs_adapted_max_abs"] = float((aligned - adapted).abs().max())
        out["loaded_vs_base_max_abs"] = float((aligned - plain).abs().max())
    ok = (out["cpu_vs_cuda_max_abs"] < 1e-3 and all(s["skipped"] == 0 for s in out["bf16_steps"])
          and out["lora_dtypes"] == ["torch.float32"] and out["frozen_unchanged"]
          and out["loaded_vs_base_max_abs"] > out["loaded_vs_adapted_max_abs"])
    out["ok"] = bool(ok)
    print(json.dumps(out, indent=1, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
