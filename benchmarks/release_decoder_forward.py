"""The released stitched decoder at full size (vist3a-1.3b: AnySplat-size network, 448 px), random weights
in the release's file layout: load + LoRA merge, then the stitched forward at 13 and 21 views with the
release's settings (position embedding re-added, plain trilinear frames, AnySplat conventions, bf16 trunk,
AnySplat voxelize 0.002). Seconds per stage and peak GPU memory -> JSON on stdout
(save it under benchmarks/results/). Run by hand on a GPU machine:

    .venv/bin/python benchmarks/release_decoder_forward.py > benchmarks/results/<gpu>-release-decoder.json

SMOKE=1 runs tiny sizes on the CPU (tests the script itself).
"""
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the release-format writer the tests use
from release_format import write_release_file  # noqa: E402

from vist3a.config import build_config  # noqa: E402
from vist3a.recon import ReconNet  # noqa: E402
from vist3a.recon.pixel_gaussians import AnySplatPostprocess  # noqa: E402
from vist3a.stitching import StitchedDecoder, StitchingLayer  # noqa: E402
from vist3a.weights.release import load_release_stitch  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"
CUDA = torch.cuda.is_available()
dev = torch.device("cuda" if CUDA else "cpu")
R = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__, "smoke": SMOKE}


def stage(name, fn):
    try:
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        R[name] = {"s": round(time.perf_counter() - t0, 4),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None}
        print(name, R[name], file=sys.stderr, flush=True)
        return out
    except Exception as exc:  # noqa: BLE001 - a failed stage is a result too
        R[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        traceback.print_exc()
        return None


overrides = (["model.recon.heads=[camera,depth,gaussians]", "model.recon.conventions=anysplat"] if SMOKE
             else ["preset=vist3a-1.3b"])
cfg = build_config({}, overrides)
rc, sc = cfg.model.recon, cfg.model.stitch
rank = 4 if SMOKE else sc.lora_rank
alpha = 2.0 if SMOKE else sc.lora_alpha


def build():
    with dev:
        net = ReconNet(rc).eval()
    return StitchedDecoder(StitchingLayer(sc.spec, in_channels=16).to(dev), net, sc.cut, torch.zeros(16), torch.ones(16),
                           readd_pos_embed=True, frames_antialias=False,
                           anysplat=AnySplatPostprocess(voxelize=True, voxel_size=0.002, sh_degree=rc.sh_degree)).to(dev)


dec = stage("build_random_fp32", build)
R["params"] = sum(p.numel() for p in dec.parameters())
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "anysplat_stitched.pth"
    # the writer reads only the network's layer names and shapes; it draws its tensors on the CPU
    stage("write_release_file", lambda: write_release_file(path, dec, rank=rank, cut_blocks=dec.recon.cut_index(sc.cut) + 1))
    R["file_gib"] = round(path.stat().st_size / 2**30, 3)
    report = stage("load_and_merge", lambda: load_release_stitch(dec, path, rank, alpha))
    R["merged"] = report.adapted.get("LoRA") if report is not None else None
dec.recon.cast_trunk(torch.bfloat16)
grid = 8 if SMOKE else 64
size = rc.img_size
with torch.no_grad():
    for views, latent_frames in ((13, 4), (21, 6)) if not SMOKE else ((5, 2),):
        g = torch.Generator().manual_seed(0)
        lat = torch.randn(1, 16, latent_frames, grid, grid, generator=g).to(dev)
        frames = torch.rand(1, views, 3, grid * 8, grid * 8, generator=g).to(dev)
        stage(f"warmup_{views}views", lambda: dec(lat, frames=frames))
        out = stage(f"decode_{views}views_{size}px", lambda: dec(lat, frames=frames))
        if out is not None:
            R[f"gaussians_{views}views"] = len(out.gaussians[0])
            R[f"finite_{views}views"] = bool(torch.isfinite(out.depth.float()).all())
        stage(f"tokens_only_{views}views", lambda: dec.tokens(lat))
print(json.dumps(R, indent=1))
