"""Full-size forward at the real resolution, random weights, bf16: Wan 2.1 1.3B sampling + VAE decode
+ stitched AnySplat-size recon (448 px, 13 views). Time and peak memory per stage -> JSON on stdout."""
import json, os, sys, time, traceback
import torch

SMOKE = os.environ.get("SMOKE") == "1"  # tiny sizes on the CPU, to test this script itself
CUDA = torch.cuda.is_available()
R = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
dev = torch.device("cuda" if CUDA else "cpu")
bf16 = torch.bfloat16


def stage(name, fn, repeat=1):
    try:
        if CUDA:
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if CUDA else 0
        t0 = time.perf_counter()
        for _ in range(repeat):
            out = fn()
        if CUDA:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if CUDA else 0
        R[name] = {"s": round((time.perf_counter() - t0) / repeat, 4), "peak_gib": round(peak / 2**30, 2),
                   "extra_gib": round((peak - base) / 2**30, 2)}
        print(name, R[name], file=sys.stderr, flush=True)
        return out
    except Exception as e:
        R[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        traceback.print_exc()
        return None


from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel
from vist3a.config import build_config
from vist3a.video import WanComponents, WanVideo
from vist3a.video.components import _cast_like_from_pretrained
from vist3a.recon import ReconNet
from vist3a.io.frames import resize_frames
from vist3a.stitching import StitchedDecoder, StitchingLayer

cfg = build_config({} if SMOKE else {"preset": "wan2.1-1.3b+anysplat"})
v = cfg.model.video
torch.manual_seed(0)


def build_video():
    te = v.text_encoder
    with dev:
        enc = UMT5EncoderModel(UMT5Config(vocab_size=te.vocab_size, d_model=te.d_model, d_kv=te.d_kv, d_ff=te.d_ff,
                                          num_layers=te.num_layers, num_heads=te.num_heads, feed_forward_proj="gated-gelu",
                                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        dit = WanTransformer3DModel(**v.transformer.model_dump())
        vae = AutoencoderKLWan(base_dim=v.vae.base_dim, z_dim=16, dim_mult=list(v.vae.dim_mult), num_res_blocks=v.vae.num_res_blocks,
                               temperal_downsample=list(v.vae.temperal_downsample))
    _cast_like_from_pretrained(enc, bf16); _cast_like_from_pretrained(dit, bf16)
    for m in (enc, dit, vae):
        m.eval().requires_grad_(False)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanComponents(ByT5Tokenizer(), enc, dit, vae, sched, 512)


comps = stage("build_wan_random_bf16", build_video)
R["params"] = {"transformer": sum(p.numel() for p in comps.transformer.parameters()),
               "text_encoder": sum(p.numel() for p in comps.text_encoder.parameters()),
               "vae": sum(p.numel() for p in comps.vae.parameters())}
sampler = WanVideo(comps)
s = cfg.sampling
kw = dict(guidance=7.5, shift=5.0, frames=5 if SMOKE else 13, height=64 if SMOKE else 512, width=64 if SMOKE else 512)
size = cfg.model.recon.img_size
with torch.no_grad():
    stage("sample_warmup_1step", lambda: sampler.sample(["a red barn in a snowy field"], [1], steps=1, **kw))
    stage("sample_1step", lambda: sampler.sample(["a red barn in a snowy field"], [1], steps=1, **kw))
    lat = stage("sample_4steps", lambda: sampler.sample(["a red barn in a snowy field"], [1], steps=4, **kw))
    if lat is not None:
        R["latent_shape"] = list(lat.shape)
        R["per_step_s_cfg_batch2"] = round((R["sample_4steps"]["s"] - R["sample_1step"]["s"]) / 3, 4)
        frames = stage("vae_decode_fp32_warm", lambda: sampler.decode(lat))
        frames = stage("vae_decode_fp32", lambda: sampler.decode(lat))
        R["frames_shape"] = list(frames.shape)
    del comps.text_encoder
    comps.text_encoder = None
    if CUDA:
        torch.cuda.empty_cache()

    rc = cfg.model.recon
    def build_recon():
        with dev:
            net = ReconNet(rc)
        return net.to(bf16).eval()
    net = stage("build_recon_random", build_recon)
    R["params"]["recon"] = sum(p.numel() for p in net.parameters())
    stitch = StitchingLayer(cfg.model.stitch.spec, in_channels=16).to(dev)
    dec = StitchedDecoder(stitch, net, cfg.model.stitch.cut, comps.vae.config.latents_mean, comps.vae.config.latents_std).to(dev).eval()
    if lat is not None:
        rgb = resize_frames(frames.float(), size)
        stage("stitched_recon_bf16_warm", lambda: dec(lat, frames=frames))
        out = stage("stitched_recon_bf16_13views_448", lambda: dec(lat, frames=frames))
        if out is not None:
            R["num_gaussians"] = len(out.gaussians[0]); R["depth_shape"] = list(out.depth.shape)
            R["finite"] = bool(torch.isfinite(out.depth.float()).all())
        stage("recon_forward_only_bf16", lambda: net.forward_from(cfg.model.stitch.cut, dec.tokens(lat), rgb))
        net.float()
        stage("recon_forward_only_fp32_warm", lambda: net.forward_from(cfg.model.stitch.cut, dec.tokens(lat), rgb))
        stage("recon_forward_only_fp32", lambda: net.forward_from(cfg.model.stitch.cut, dec.tokens(lat), rgb))
print(json.dumps(R, indent=1))
