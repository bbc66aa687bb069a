"""Method check of model stitching on procedural scenes (CPU, about ten minutes).

1. Procedural corpus: random Gaussian scenes filmed along smooth paths (exact cameras and depth);
   training clips and held-out test clips from different seeds.
2. Pretrain a small reconstruction network (our VGGT/AnySplat-family ReconNet, 32 px) on the
   training clips: L1 to GT depth and GT pose encodings (camera 0 = world) and a rendering loss of
   its Gaussians at GT cameras of context and in-between views.
3. Layer search (vist3a.stitching.search) over the training clips: VAE latents (the tiny seeded Wan
   VAE at 64 px) against every encoder block; held-out R^2 per layer; timed as forward passes vs
   accumulation vs solve; resident memory at two corpus sizes, each in a fresh process.
4. Stitch at the best layer with the ridge weights, then stitched fine-tuning (StitchFinetuner:
   LoRA + stitching layer, distillation + rendering loss).
5. Novel-view PSNR on held-out scenes: 5 context frames in, the 4 frames between them rendered at
   their GT cameras; original network (RGB in) vs stitched (latents in; the Gaussian head's RGB
   branch gets the GT frames, as in stitching training) before and after fine-tuning.

    python benchmarks/stitch_method_check.py        # ~10 min on 2 cores (pretraining ~6 of them)
    python benchmarks/stitch_method_check.py --train-clips 8 --test-clips 2 --pretrain-steps 20 --finetune-steps 5  # smoke

A zero stitching layer (no information from the latents) is the control: with too little pretraining
the network ignores its input and every row scores alike; 96 clips x 1000 steps is where the
original network clearly beats the control here.

The video VAE here has seeded random weights (no released weights on this machine), so its latents
keep less of the image than Wan's trained VAE does: the stitching gap measured here is an upper bound
of what the method costs with a real VAE, not an estimate of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vist3a.config import ReconConfig, load_config  # noqa: E402

VIEWS = 5  # context frames (4k+1 for the VAE): frames 0, 2, 4, 6, 8 of a 9-frame clip
CONTEXT = [0, 2, 4, 6, 8]
TARGETS = [1, 3, 5, 7]
VAE_SIZE, IMG = 64, 32
RECON = dict(img_size=IMG, patch_size=4, embed_dim=32, encoder_depth=4, encoder_heads=2, aggregator_depth=2,
             aggregator_heads=2, camera_iters=2, dpt_features=16, sh_degree=1, seed=11,
             heads=("camera", "depth", "gaussians"))  # no point head: Gaussians sit on depth + cameras


def log(msg: str) -> None:
    print(f"[method-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def make_corpus(uri: str, n: int, seed: int, jobs: int) -> None:
    from pipelines.make_corpus import procedural_records
    from vist3a.io.corpus import CorpusWriter

    with CorpusWriter(uri, clips_per_shard=16, clips_per_row_group=4) as w:
        for clip in procedural_records(n, seed, 9, VAE_SIZE, jobs):
            w.write(clip)


def load_clips(uri: str) -> list[dict]:
    """Every clip as tensors: frames at VAE and network size, GT depth, cameras relative to frame 0."""
    from vist3a.io.corpus import Corpus
    from vist3a.recon import rigid_inverse
    from vist3a.io.frames import resize_frames

    clips = []
    for c in Corpus(uri).iter_clips():
        frames = c.frames_tensor()
        w2c = torch.from_numpy(c.extrinsics).float()
        rel = w2c @ rigid_inverse(w2c[0])  # world = camera 0, as the network predicts
        k = torch.from_numpy(c.intrinsics).float().clone()
        k[:, :2] *= IMG / c.width
        depth = c.depth_tensor()[:, ::VAE_SIZE // IMG, ::VAE_SIZE // IMG]
        clips.append({"id": c.id, "vae": frames, "img": resize_frames(frames[None], IMG)[0], "depth": depth,
                      "w2c": rel, "K": k})
    return clips


# ----------------------------------------------------------------------------- pretraining


def render_at(gaussians, w2c, k):
    from vist3a.splats.gaussians import Cameras
    from vist3a.splats.render import render

    return render(gaussians, Cameras(viewmats=w2c, Ks=k, width=IMG, height=IMG)).colors.permute(0, 3, 1, 2)


def pretrain(net, clips, steps: int, lr: float, seed: int, render_stride: int) -> list[float]:
    """Supervised training on GT depth, GT poses and renders at GT cameras (2 random views a step)."""
    from vist3a.recon import extri_intri_to_pose_encoding, to_gaussians
    from vist3a.splats.stride import every_nth_pixel
    from vist3a.stitching.finetune import render_l1

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    losses = []
    net.train()
    for step in range(steps):
        c = clips[int(rng.integers(len(clips)))]
        images = c["img"][CONTEXT][None]
        out = net(images)
        pose_gt = extri_intri_to_pose_encoding(c["w2c"][CONTEXT], c["K"][CONTEXT], (IMG, IMG))
        valid = c["depth"][CONTEXT] > 0
        # log depth: the distant shell would otherwise dominate and a constant map would do
        loss_depth = (out.depth[0].clamp_min(1e-3).log() - c["depth"][CONTEXT].clamp_min(1e-3).log()).abs()[valid].mean()
        loss_pose = torch.stack([(p[0] - pose_gt).abs().mean() for p in out.pose_enc_list]).mean()
        views = rng.choice(9, size=2, replace=False)
        gaussians = to_gaussians(out, images)[0].select(every_nth_pixel(VIEWS, IMG, IMG, render_stride))
        loss_render = render_l1(gaussians, c["w2c"][views], c["K"][views], c["img"][views], render_stride)
        loss = loss_depth + loss_pose + 2.0 * loss_render
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"pretrain step {step + 1}/{steps}: loss {np.mean(losses[-20:]):.4f} (depth {loss_depth.item():.3f}, "
                f"pose {loss_pose.item():.3f}, render {loss_render.item():.3f})")
    net.eval()
    return losses


# ----------------------------------------------------------------------------- evaluation


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(F.mse_loss(a.clamp(0, 1), b)))


@torch.no_grad()
def novel_view_psnr(predict, clips) -> dict:
    """predict(clip) -> ReconOutput for the context views; Gaussians rendered at the GT target cameras."""
    from vist3a.recon import to_gaussians

    scores, depth_err = [], []
    for c in clips:
        out = predict(c)
        g = to_gaussians(out, c["img"][CONTEXT][None])[0]
        scores.append(psnr(render_at(g, c["w2c"][TARGETS], c["K"][TARGETS]), c["img"][TARGETS]))
        valid = c["depth"][CONTEXT] > 0
        depth_err.append(float(((out.depth[0] - c["depth"][CONTEXT]).abs() / c["depth"][CONTEXT].clamp_min(1e-3))[valid].mean()))
    return {"psnr": float(np.mean(scores)), "psnr_std": float(np.std(scores)), "depth_rel_err": float(np.mean(depth_err))}


# ----------------------------------------------------------------------------- search


def run_search(vae, net, clips, cut_candidates, lam: float):
    """Every 5th clip is held out (by position: the memory runs repeat clips to reach their size)."""
    from vist3a.stitching.search import LayerSearch

    search = LayerSearch.for_models(vae, net, f"conv3d_k3x3x3_o{net.cfg.embed_dim}_p1x1x1", cut_candidates, VAE_SIZE)
    t0 = time.perf_counter()
    for i, c in enumerate(clips):
        search.add(c["vae"][CONTEXT][None], [i % 5 == 4])
    t1 = time.perf_counter()
    fits = search.solve(lam)
    return search, fits, {"pass_s": t1 - t0, "forward_s": search.seconds["forward"],
                          "accumulate_s": search.seconds["accumulate"], "solve_s": time.perf_counter() - t1}


@torch.no_grad()
def forward_only_seconds(vae, net, clips) -> float:
    """The same forward passes (VAE encode + network up to the deepest block) with nothing kept."""
    from vist3a.video import denormalize_latents, encode_frames

    cuts = net.cut_points()
    t0 = time.perf_counter()
    for c in clips:
        denormalize_latents(vae, encode_frames(vae, c["vae"][CONTEXT][None]))
        net.activations_at(cuts, c["img"][CONTEXT][None])
    return time.perf_counter() - t0


class RssSampler:
    """Largest resident set size seen while active (ru_maxrss would also count model loading)."""

    def __init__(self, every_s: float = 0.005):
        import threading

        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current_mb())


def child_search(args) -> None:
    """A fresh process: the search streaming N clips from the corpus (cycling it when N is larger);
    prints the resident memory before and at most during the search as JSON."""
    import itertools

    from vist3a.io.corpus import Corpus
    from vist3a.recon import ReconNet
    from vist3a.stitching.search import LayerSearch
    from vist3a.video import build_wan

    torch.set_num_threads(1)
    vae = build_wan(load_config().model.video).vae
    net = ReconNet(ReconConfig(**RECON))
    net.load_state_dict(torch.load(os.path.join(args.workdir, "recon.pt"), weights_only=True))
    net.eval()
    corpus = Corpus(os.path.join(args.workdir, "train"))
    stream = itertools.islice(itertools.chain.from_iterable(corpus.iter_clips() for _ in itertools.count()), args.child_search)
    search = LayerSearch.for_models(vae, net, f"conv3d_k3x3x3_o{net.cfg.embed_dim}_p1x1x1", None, VAE_SIZE)
    before = RssSampler.current_mb()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        for i, clip in enumerate(stream):
            search.add(clip.frames_tensor(CONTEXT)[None], [i % 5 == 4])
        search.solve(1e-4)
    print(json.dumps({"clips": args.child_search, "rss_before_mb": before, "peak_rss_during_mb": rss.peak,
                      "seconds": time.perf_counter() - t0}))


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-clips", type=int, default=96)
    p.add_argument("--test-clips", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--lambda", dest="lam", type=float, default=1e-4)
    p.add_argument("--render-stride", type=int, default=2, help="training renders at 1/n resolution (CPU time)")
    p.add_argument("--memory-sizes", default="8,32", help="corpus sizes (clips) for the peak-memory runs")
    p.add_argument("--jobs", type=int, default=2, help="processes rendering the procedural corpus")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--reuse-pretrained", action="store_true", help="load <workdir>/recon.pt instead of pretraining")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child-search", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_search:
        child_search(args)
        return 0

    from vist3a.recon import ReconNet
    from vist3a.stitching import StitchedDecoder, StitchingLayer
    from vist3a.stitching.finetune import StitchFinetuner
    from vist3a.stitching.search import best_layer, format_table
    from vist3a.video import build_wan, encode_frames

    torch.set_num_threads(args.threads)  # 1: on a shared 2-core machine more threads spin against each other
    torch.manual_seed(0)
    work = args.workdir or tempfile.mkdtemp(prefix="stitch-method-check-")
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "child_search"}, "seconds": {}}
    t = time.perf_counter()

    # 1. corpus
    for split, n, seed in (("train", args.train_clips, 100), ("test", args.test_clips, 200)):
        if not os.path.exists(os.path.join(work, split, "manifest.json")):
            make_corpus(os.path.join(work, split), n, seed, args.jobs)
    train, test = load_clips(os.path.join(work, "train")), load_clips(os.path.join(work, "test"))
    results["seconds"]["corpus"] = time.perf_counter() - t
    log(f"corpus: {len(train)} training + {len(test)} held-out clips of 9 frames at {VAE_SIZE}px in {work} "
        f"({results['seconds']['corpus']:.0f}s)")

    # 2. pretrain the reconstruction network
    t = time.perf_counter()
    net = ReconNet(ReconConfig(**RECON))
    saved = os.path.join(work, "recon.pt")
    if args.reuse_pretrained and os.path.exists(saved):
        net.load_state_dict(torch.load(saved, weights_only=True))
        net.eval()
        log(f"reusing the pretrained network {saved}")
    else:
        losses = pretrain(net, train, args.pretrain_steps, args.pretrain_lr, seed=1, render_stride=args.render_stride)
        torch.save(net.state_dict(), saved)
        results["pretrain_final_loss"] = float(np.mean(losses[-20:]))
    results["seconds"]["pretrain"] = time.perf_counter() - t
    original = novel_view_psnr(lambda c: net(c["img"][CONTEXT][None]), test)
    log(f"original network: novel-view PSNR {original['psnr']:.2f} dB, depth rel. err {original['depth_rel_err']:.3f} "
        f"({results['seconds']['pretrain']:.0f}s pretraining)")

    # 3. layer search
    vae = build_wan(load_config().model.video).vae
    search, fits, seconds = run_search(vae, net, train, None, args.lam)
    seconds["forward_only_s"] = forward_only_seconds(vae, net, train)
    best = best_layer(fits)
    rows = [f.row() for f in fits]
    print(format_table(rows, best.name), flush=True)
    results["search"] = {"layers": rows, "best": best.name, **seconds, "clips": dict(search.clips),
                         "accumulator_mb": sum(v.numel() * v.element_size() for v in search.eq.state.values()) / 2**20}
    log(f"search over {len(train)} clips: {seconds['pass_s']:.2f}s pass (forward {seconds['forward_s']:.2f}s + "
        f"accumulate {seconds['accumulate_s']:.2f}s) + solve {seconds['solve_s']:.2f}s; the forward passes alone: "
        f"{seconds['forward_only_s']:.2f}s")
    memory = []
    for n in [int(v) for v in args.memory_sizes.split(",") if v]:
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-search", str(n), "--workdir", work],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"memory run over {n} clips failed:\n{run.stderr[-3000:]}")
        memory.append(json.loads(run.stdout.strip().splitlines()[-1]))
        m = memory[-1]
        log(f"search streaming {n} clips in a fresh process: resident memory {m['rss_before_mb']:.0f} MB before, "
            f"at most {m['peak_rss_during_mb']:.0f} MB during (+{m['peak_rss_during_mb'] - m['rss_before_mb']:.1f} MB); "
            f"{m['seconds']:.1f}s")
    results["search"]["memory"] = memory

    # 4. stitch: ridge init at the best layer, then fine-tuning
    def stitched_decoder(recon):
        stitch = StitchingLayer(f"conv3d_k3x3x3_o{net.cfg.embed_dim}_p1x1x1", 16)
        stitch.conv.weight.data.copy_(best.weight)
        stitch.conv.bias.data.copy_(best.bias)
        return StitchedDecoder(stitch, recon, best.name, torch.tensor(vae.config.latents_mean),
                               torch.tensor(vae.config.latents_std))

    def stitched_predict(decoder):
        def predict(c):
            latents = encode_frames(vae, c["vae"][CONTEXT][None])
            return decoder.recon.forward_from(decoder.cut, decoder.tokens(latents), c["img"][CONTEXT][None])
        return predict

    floor_decoder = stitched_decoder(net)
    floor_decoder.stitch.conv.weight.data.zero_()
    floor_decoder.stitch.conv.bias.data.zero_()
    floor = novel_view_psnr(stitched_predict(floor_decoder), test)
    log(f"control, a zero stitching layer (no information from the latents): novel-view PSNR {floor['psnr']:.2f} dB, "
        f"depth rel. err {floor['depth_rel_err']:.3f}")
    ridge = novel_view_psnr(stitched_predict(stitched_decoder(net)), test)
    log(f"stitched at {best.name} (ridge only): novel-view PSNR {ridge['psnr']:.2f} dB, depth rel. err {ridge['depth_rel_err']:.3f}")

    t = time.perf_counter()
    job = load_config(None, [f"stitch_job.steps={args.finetune_steps}", f"stitch_job.lr={args.finetune_lr}",
                             "stitch_job.warmup_steps=10", "stitch_job.lora_rank=8", "stitch_job.lora_alpha=16",
                             "stitch_job.render_views=2", f"stitch_job.views={VIEWS}",
                             f"stitch_job.render_stride={args.render_stride}"]).stitch_job
    ft = StitchFinetuner(stitched_decoder(copy.deepcopy(net)), vae, job, vae_size=VAE_SIZE)
    rng = np.random.default_rng(2)
    history = []
    while ft.step < job.steps:
        c = train[int(rng.integers(len(train)))]
        history.append(ft.train_step(c["vae"][CONTEXT][None]))
        if ft.step % max(1, job.steps // 5) == 0:
            log(f"finetune step {ft.step}/{job.steps}: loss {np.mean([h['loss'] for h in history[-10:]]):.4f}")
    results["seconds"]["finetune"] = time.perf_counter() - t
    tuned = novel_view_psnr(stitched_predict(ft.decoder), test)
    log(f"stitched at {best.name} + fine-tuning: novel-view PSNR {tuned['psnr']:.2f} dB, depth rel. err "
        f"{tuned['depth_rel_err']:.3f} ({results['seconds']['finetune']:.0f}s)")

    results["novel_view"] = {"original": original, "control_zero_stitch": floor, "stitched_ridge": ridge,
                             "stitched_finetuned": tuned}
    print("\n=== method check: novel-view PSNR on held-out procedural scenes "
          f"({len(test)} scenes, 4 in-between views each, {IMG}px) ===")
    print(f"{'model':<34} {'PSNR dB':>8} {'depth rel. err':>15}")
    for name, key in (("original (RGB in)", "original"), ("control: zero stitching layer", "control_zero_stitch"),
                      (f"stitched @ {best.name}, ridge only", "stitched_ridge"),
                      (f"stitched @ {best.name}, fine-tuned", "stitched_finetuned")):
        r = results["novel_view"][key]
        print(f"{name:<34} {r['psnr']:>8.2f} {r['depth_rel_err']:>15.3f}")
    print("paper (RE10K, AnySplat): original 20.57, stitched 20.94")
    s = results["search"]
    print(f"layer search over {len(train)} clips: {s['pass_s']:.2f}s (forward {s['forward_s']:.2f}s, accumulate "
          f"{s['accumulate_s']:.2f}s) + solve {s['solve_s']:.2f}s vs forward passes alone {s['forward_only_s']:.2f}s; "
          f"accumulators {s['accumulator_mb']:.1f} MB")
    for m in memory:
        print(f"resident memory, search streaming {m['clips']:>3} clips: {m['rss_before_mb']:.0f} MB before, at most "
              f"{m['peak_rss_during_mb']:.0f} MB during (+{m['peak_rss_during_mb'] - m['rss_before_mb']:.1f} MB)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
