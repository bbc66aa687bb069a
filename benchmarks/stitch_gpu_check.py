"""Stitching on CUDA, by hand on a GPU machine (seconds): the layer search and fine-tuning steps run
on the GPU and agree with the CPU, and the full-size normal-equation accumulation is timed.

    python3 benchmarks/stitch_gpu_check.py > out/stitch_gpu.json

1. search: the same 4 procedural clips through the tiny models on CPU and on CUDA -> per-layer R^2
   and fitted weights compared;
2. fine-tuning: 3 StitchFinetuner steps on CUDA (renders on the torch backend, so no gsplat build
   is needed; gsplat vs. torch is checked by tests/test_gpu_render.py), the first step's loss
   against the CPU's, then export -> load_stitch_checkpoint into a CUDA decoder -> same outputs;
3. full size: NormalEquations.add for one clip of the paper's problem (13 x 32 x 32 rows,
   16 x 5 x 3 x 3 + 1 columns, 24 layers of 1024 channels) in float64, timed.
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


def main() -> int:
    import vist3a.splats.render as render_mod
    from vist3a.config import load_config
    from vist3a.data import procedural_clip
    from vist3a.models import build_recon
    from vist3a.stitching import StitchedDecoder, StitchingLayer, load_stitch_checkpoint, save_stitch_checkpoint
    from vist3a.models import build_stitched_decoder
    from vist3a.stitching.finetune import StitchFinetuner
    from vist3a.stitching.search import LayerSearch, NormalEquations
    from vist3a.video import build_wan, encode_frames

    render_mod._gsplat_importable = lambda: False  # the torch renderer on CUDA: no gsplat build in the budget
    assert torch.cuda.is_available(), "needs CUDA"
    cuda = torch.device("cuda")
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cfg = load_config(None, ["stitch_job.render_stride=2", "stitch_job.steps=3", "stitch_job.warmup_steps=1"])
    clips = torch.stack([procedural_clip(i, seed=3, frames=5, size=64).frames_tensor() for i in range(4)])

    # 1. search on CPU and CUDA
    fits = {}
    for dev in ("cpu", "cuda"):
        vae = build_wan(cfg.model.video, device=dev).vae
        search = LayerSearch.for_models(vae, build_recon(cfg, torch.device(dev)), cfg.model.stitch.spec, None, 64, dev)
        t0 = time.perf_counter()
        for i in range(4):
            search.add(clips[i:i + 1], [i == 3])
        fits[dev] = search.solve(1e-4)
        res[f"search_{dev}_s"] = time.perf_counter() - t0
    res["search_r2_heldout"] = {f.name: [f.r2_heldout, g.r2_heldout] for f, g in zip(fits["cpu"], fits["cuda"])}
    res["search_max_rel_weight_diff"] = max(float((f.weight - g.weight).abs().max() / f.weight.abs().max())
                                            for f, g in zip(fits["cpu"], fits["cuda"]))

    # 2. fine-tuning steps on CUDA, the first against the CPU
    losses = {}
    for dev in ("cpu", "cuda"):
        vae = build_wan(cfg.model.video, device=dev).vae
        ft = StitchFinetuner(build_stitched_decoder(cfg, vae, dev, load_weights=False), vae, cfg.stitch_job, 64, torch.device(dev))
        m = ft.train_step(clips[:1])
        losses[dev] = m["loss"]
        if dev == "cuda":
            t0 = time.perf_counter()
            for _ in range(2):
                m = ft.train_step(clips[1:2])
            torch.cuda.synchronize()
            res["finetune_step_cuda_s"] = (time.perf_counter() - t0) / 2
            res["finetune_last_metrics"] = m
            with tempfile.TemporaryDirectory() as d:
                uri = os.path.join(d, "stitch.pt")
                save_stitch_checkpoint(uri, ft.export())
                stitch = StitchingLayer(cfg.model.stitch.spec, 16)
                decoder = StitchedDecoder(stitch, build_recon(cfg, cuda), cfg.model.stitch.cut,
                                          torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)).to(cuda)
                load_stitch_checkpoint(decoder, uri)
            with torch.no_grad():
                frames = clips[2:3].to(cuda)
                z = encode_frames(vae, frames)
                a = ft.student(z, frames)
                b = decoder.recon.forward_from(decoder.cut, decoder.tokens(z), frames)
            res["loaded_vs_student_max_depth_diff"] = float((a.depth - b.depth).abs().max())
    res["first_step_loss"] = losses

    # 3. full-size accumulation for one clip
    d, rows, channels = 16 * 5 * 3 * 3, 13 * 32 * 32, 1024
    eq = NormalEquations(d, {f"blocks.{i}": channels for i in range(24)}, cuda)
    x = torch.randn(rows, d, device=cuda)
    ys = {f"blocks.{i}": torch.randn(rows, channels, device=cuda) for i in range(24)}
    eq.add(x, ys)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        eq.add(x, ys)
    torch.cuda.synchronize()
    res["full_size_accumulate_per_clip_s"] = (time.perf_counter() - t0) / 3
    res["full_size_accumulator_gib"] = sum(v.numel() * v.element_size() for v in eq.state.values()) / 2**30
    res["peak_cuda_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
