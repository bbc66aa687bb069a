"""Compact scene files: bytes a scene against re-render quality, for merging, pruning, capping and SPZ.

A corpus of pixel-aligned scenes made like the decoder's output: procedural scenes
(vist3a.data.procedural) filmed along an orbit at `--views` views of `--size`^2 pixels, each pixel
unprojected at its rendered depth into one Gaussian (isotropic, scale = `--footprint` pixel
footprints, opacity 0.9, the pixel's colour as DC SH, a confidence that favours the nearer view).
For each setting: the compaction steps (vist3a.splats.compact), the file written (.ply or .spz), the
file read back; then renders at the input cameras and at held-out cameras between them are compared
with renders of the uncompressed scene (PSNR, SSIM), with encode/decode seconds.

    .venv/bin/python benchmarks/compact_scenes.py                 # the full corpus (slow on 2 cores)
    .venv/bin/python benchmarks/compact_scenes.py --scenes 1 --size 112 --views 5 --heldout 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vist3a.data.procedural import orbit_path, random_scene, render_clip  # noqa: E402
from vist3a.splats.compact import CompactSettings, compact  # noqa: E402
from vist3a.splats.gaussians import Cameras, Gaussians, rgb_to_sh0  # noqa: E402
from vist3a.splats.ply import ply_bytes, read_ply  # noqa: E402
from vist3a.splats.render import render  # noqa: E402
from vist3a.splats.spz import read_spz, spz_bytes  # noqa: E402

GOAL_BYTES = 10_000_000
GOAL_DB = 0.5


def pixel_aligned_scene(index: int, views: int, size: int, heldout: int, footprint: float, seed: int = 0):
    """(Gaussians [views*size^2], confidence, input cameras, held-out cameras between them, the source scene)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    src = random_scene(g)
    path = orbit_path(g, 2 * views - 1)  # every other pose is an input view; the rest lie between them
    inputs, between = path[0::2], path[1::2]
    pick = torch.linspace(0, len(between) - 1, heldout).round().long() if heldout else torch.zeros(0, dtype=torch.long)
    frames, depth, k = render_clip(src, inputs, size)
    fx = float(k[0, 0, 0])
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    means, scales, colors, conf = [], [], [], []
    for v in range(views):
        z = depth[v]
        z = torch.where(z > 0, z, z[z > 0].max())  # no holes: the shell is behind everything
        rays = torch.stack([(xs - k[v, 0, 2]) / fx, (ys - k[v, 1, 2]) / fx, torch.ones_like(xs)], -1)
        cam = rays * z[..., None]
        w2c = inputs[v]
        world = (cam.reshape(-1, 3) - w2c[:3, 3]) @ w2c[:3, :3]  # R^T (p - t)
        means.append(world)
        scales.append((footprint * z / fx).reshape(-1, 1).expand(-1, 3))
        colors.append(frames[v].permute(1, 2, 0).reshape(-1, 3))
        conf.append(-z.reshape(-1) + 0.05 * torch.randn(size * size, generator=g))
    means, scales, colors, conf = torch.cat(means), torch.cat(scales), torch.cat(colors), torch.cat(conf)
    n = len(means)
    scene = Gaussians(means=means, quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4).contiguous(),
                      scales=scales.contiguous(), opacities=torch.full((n,), 0.9), sh=rgb_to_sh0(colors)[:, None, :])
    kk = k[:1].expand(views, 3, 3)
    cams_in = Cameras(inputs, kk.contiguous(), size, size)
    cams_out = Cameras(between[pick], k[:1].expand(len(pick), 3, 3).contiguous(), size, size)
    return scene, conf, cams_in, cams_out, src


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of [C,H,W,3] images in [0,1] (11x11 Gaussian window, sigma 1.5)."""
    x, y = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    r = torch.arange(11, dtype=x.dtype) - 5
    w1 = torch.exp(-r * r / (2 * 1.5 ** 2))
    w1 = w1 / w1.sum()
    win = (w1[:, None] * w1[None, :]).expand(3, 1, 11, 11)
    blur = lambda t: F.conv2d(t, win, groups=3)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def renders(g: Gaussians, cams: Cameras) -> torch.Tensor:
    return render(g, cams, background=torch.ones(3), backend="torch").colors.clamp(0, 1)


SETTINGS = {
    # name: (compaction settings, file format); voxel sizes are in pixel footprints at depth 3
    "ply (uncompressed)": (CompactSettings(), "ply"),
    "spz": (CompactSettings(), "spz"),
    "spz + cap 500k": (CompactSettings(max_gaussians=500_000), "spz"),
    "spz + voxel 1px": (CompactSettings(voxel_size=1.0), "spz"),
    "spz + voxel 2px": (CompactSettings(voxel_size=2.0), "spz"),
    "spz + voxel 2.5px": (CompactSettings(voxel_size=2.5), "spz"),
    "spz + voxel 3px": (CompactSettings(voxel_size=3.0), "spz"),
    "spz + voxel 2px + cap 800k": (CompactSettings(voxel_size=2.0, max_gaussians=800_000), "spz"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--views", type=int, default=13)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--footprint", type=float, default=1.0, help="Gaussian scale in pixel footprints")
    ap.add_argument("--cap-scale", type=float, default=None,
                    help="multiply the settings' caps (default: (size/448)^2 * views/13, so caps scale with the corpus)")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--bytes-only", action="store_true", help="no renders: bytes, counts and seconds only (full size is cheap)")
    ap.add_argument("--out", default="benchmarks/results/cpu-compact-scenes.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    cap_scale = args.cap_scale or (args.size / 448) ** 2 * args.views / 13
    cap_bytes_scale = (args.size / 448) ** 2 * args.views / 13  # bytes grow with the Gaussian count
    rows = {name: [] for name in args.settings}
    baselines = []
    for i in range(args.scenes):
        t0 = time.perf_counter()
        scene, conf, cams_in, cams_out, src = pixel_aligned_scene(i, args.views, args.size, args.heldout, args.footprint)
        if args.bytes_only:
            base_in = base_out = float("nan")
        else:
            ref_in, ref_out = renders(scene, cams_in), renders(scene, cams_out) if cams_out.num else None
            # the procedural scene itself: ground truth, so that a loss in dB is against something
            gt_in, gt_out = renders(src, cams_in), renders(src, cams_out) if cams_out.num else None
            base_in = psnr(ref_in, gt_in)
            base_out = psnr(ref_out, gt_out) if gt_out is not None else float("nan")
        fx = float(cams_in.Ks[0, 0, 0])
        print(f"scene {i}: {scene.num} Gaussians, made and rendered in {time.perf_counter() - t0:.1f} s; uncompressed "
              f"vs the procedural scene: PSNR {base_in:.2f} dB (input cameras), {base_out:.2f} dB (held-out)", flush=True)
        baselines.append({"psnr_gt_in": base_in, "psnr_gt_out": base_out})
        for name in args.settings:
            settings, fmt = SETTINGS[name]
            voxel = None if settings.voxel_size is None else settings.voxel_size * 3.0 / fx
            cap = None if settings.max_gaussians is None else max(1, int(settings.max_gaussians * cap_scale))
            s = CompactSettings(voxel_size=voxel, min_opacity=settings.min_opacity, max_gaussians=cap,
                                sh_degree=settings.sh_degree)
            t1 = time.perf_counter()
            g, report = compact(scene, s, confidence=conf, cameras=cams_in)
            data = spz_bytes(g) if fmt == "spz" else ply_bytes(g, sh_degree=0)
            t2 = time.perf_counter()
            back = read_spz(data) if fmt == "spz" else read_ply(data)
            t3 = time.perf_counter()
            row = {"bytes": len(data), "gaussians": back.num, "encode_s": t2 - t1, "decode_s": t3 - t2, "steps": report}
            rows[name].append(row)
            if args.bytes_only:
                print(f"  {name}: {row['bytes'] / 1e6:.2f} MB, {row['gaussians']} kept, encode {row['encode_s']:.2f} s, "
                      f"decode {row['decode_s']:.2f} s", flush=True)
                continue
            got_in = renders(back, cams_in)
            row.update(psnr_in=psnr(got_in, ref_in), ssim_in=ssim(got_in, ref_in), loss_db_in=base_in - psnr(got_in, gt_in))
            if ref_out is not None:
                got_out = renders(back, cams_out)
                row.update(psnr_out=psnr(got_out, ref_out), ssim_out=ssim(got_out, ref_out),
                           loss_db_out=base_out - psnr(got_out, gt_out))
            print(f"  {name}: {row['bytes'] / 1e6:.2f} MB, {row['gaussians']} kept, PSNR in {row['psnr_in']:.2f}"
                  + (f" / held-out {row['psnr_out']:.2f}" if 'psnr_out' in row else "")
                  + f", loss vs ground truth {row['loss_db_in']:+.3f} / {row.get('loss_db_out', float('nan')):+.3f} dB"
                  + f", encode {row['encode_s']:.2f} s, decode {row['decode_s']:.2f} s", flush=True)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs and k in rs[0] else float("nan")  # noqa: E731
    print(f"\n{args.scenes} scenes, {args.views} views x {args.size}^2 = {args.views * args.size ** 2} Gaussians each; "
          "PSNR/SSIM vs the uncompressed scene's renders (input cameras / held-out cameras)")
    print("loss: PSNR of the uncompressed scene minus PSNR of the compact one, both against the procedural scene's renders")
    header = ("| setting | MB a scene | Gaussians kept | PSNR in (dB) | SSIM in | PSNR held-out (dB) | SSIM held-out "
              "| loss in (dB) | loss held-out (dB) | encode s | decode s |")
    print(header)
    print("|---" * 11 + "|")
    summary = {}
    for name, rs in rows.items():
        m = {k: mean(rs, k) for k in ("bytes", "gaussians", "psnr_in", "ssim_in", "psnr_out", "ssim_out",
                                       "loss_db_in", "loss_db_out", "encode_s", "decode_s")}
        summary[name] = m
        print(f"| {name} | {m['bytes'] / 1e6:.2f} | {m['gaussians']:.0f} | {m['psnr_in']:.2f} | {m['ssim_in']:.4f} | "
              f"{m['psnr_out']:.2f} | {m['ssim_out']:.4f} | {m['loss_db_in']:+.3f} | {m['loss_db_out']:+.3f} | "
              f"{m['encode_s']:.2f} | {m['decode_s']:.2f} |")
    meets = [n for n, m in summary.items() if n != "ply (uncompressed)" and m["bytes"] / cap_bytes_scale <= GOAL_BYTES
             and max(m["loss_db_in"], m["loss_db_out"] if m["loss_db_out"] == m["loss_db_out"] else -1) <= GOAL_DB]
    print(f"meets <= {GOAL_BYTES / 1e6:g} MB (bytes scaled to 13 x 448^2 by x{1 / cap_bytes_scale:.2f}) at <= {GOAL_DB} dB: "
          + (", ".join(meets) if meets else "none"))
    out = {"args": vars(args), "cap_scale": cap_scale, "meets_goal": meets, "baselines": baselines, "machine": platform.platform(), "threads": torch.get_num_threads(),
           "summary": summary, "per_scene": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
