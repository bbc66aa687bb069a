"""The throughput levers (runtime.* keys, vist3a.video.levers) on the CPU, tiny preset: each keeps a scene what
it was (within the stated tolerance) or, for the opt-in step cache, changes it only when asked. Batching never
changes a scene: a batch gives what its prompts give one by one, for the same seeds. The speed of each lever is
measured on a GPU by benchmarks/gpu_throughput.py."""

import copy
import logging
import os
import shutil

import pytest
import torch

from vist3a.config import ConfigError, build_config
from vist3a.generator import SceneGenerator
from vist3a.models import build_video
from vist3a.video.components import _cast_like_from_pretrained, module_on
from vist3a.video.levers import (
    attention_in_use,
    compile_blocks,
    compiled_blocks,
    disable_step_cache,
    enable_step_cache,
    set_attention,
    step_cache_on,
    uncompile_blocks,
)

FAST = ["sampling.steps=3", "splats.preview_views=1", "splats.preview_size=32"]
SAMPLE = dict(steps=3, guidance=5.0, shift=5.0, frames=5, height=64, width=64)
PROMPTS, SEEDS = ["a red chair", "a blue sofa in a room", "a lamp"], [1, 2, 3]
CPU = torch.device("cpu")
#: float32 on the CPU: a batch and its items run the same kernels on differently shaped inputs, so they agree
#: to rounding (measured: latents <= 2e-6, Gaussians <= 1e-5 in these tests)
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def gen(one_torch_thread):
    return SceneGenerator(build_config({}, FAST))


@pytest.fixture(scope="module")
def video(one_torch_thread):
    return build_video(build_config({}), CPU, torch.float32)


def _recording(gen, monkeypatch):
    """gen.video.sample, wrapped to keep the latents each call returns."""
    calls, sample = [], gen.video.sample

    def wrapped(*args, **kwargs):
        calls.append(sample(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(gen.video, "sample", wrapped)
    return calls


def _gaussians_close(a, b, atol):
    assert a.num == b.num
    for name in ("means", "quats", "scales", "opacities", "sh"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=1e-4, msg=name)


def test_batched_generation_equals_per_prompt(gen, monkeypatch):
    latents = _recording(gen, monkeypatch)
    batch = gen.generate(PROMPTS, SEEDS)
    single = [gen.generate([p], [s])[0] for p, s in zip(PROMPTS, SEEDS)]
    together, alone = latents[0], torch.cat(latents[1:])
    torch.testing.assert_close(together, alone, atol=BATCH_ATOL, rtol=0)
    for b, s in zip(batch, single):
        assert (b.prompt, b.seed) == (s.prompt, s.seed)
        _gaussians_close(b.gaussians, s.gaussians, BATCH_ATOL)
        torch.testing.assert_close(b.cameras.viewmats, s.cameras.viewmats, atol=BATCH_ATOL, rtol=1e-4)


def test_cfg_in_two_calls_equals_one_batch(gen, monkeypatch):
    latents = _recording(gen, monkeypatch)
    one = gen.generate(PROMPTS[:2], SEEDS[:2])
    gen.video.cfg_batch = False
    try:
        two = gen.generate(PROMPTS[:2], SEEDS[:2])
    finally:
        gen.video.cfg_batch = True
    torch.testing.assert_close(latents[0], latents[1], atol=BATCH_ATOL, rtol=0)
    for a, b in zip(one, two):
        _gaussians_close(a.gaussians, b.gaussians, BATCH_ATOL)


def test_runtime_keys_reach_the_models(one_torch_thread):
    cfg = build_config({}, ["runtime.vae_dtype=bfloat16", "runtime.attention=math", "runtime.cfg_batch=false",
                            "runtime.text_encoder=cpu", "runtime.compile=true", "runtime.step_cache=first_block"])
    v = build_video(cfg, CPU, torch.float32, generation=True)
    assert v.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert attention_in_use(v.transformer) == "math" and v.cfg_batch is False and v.text_encoder_placement == "cpu"
    assert compiled_blocks(v.transformer) == cfg.model.video.transformer.num_layers and step_cache_on(v.transformer)
    # alignment builds the same model without the generation-only levers (it trains adapters on the blocks)
    plain = build_video(cfg, CPU, torch.float32)
    assert compiled_blocks(plain.transformer) == 0 and not step_cache_on(plain.transformer)
    defaults = build_video(build_config({}), CPU, torch.float32, generation=True)
    assert defaults.vae.decoder.conv_out.weight.dtype == torch.float32 and attention_in_use(defaults.transformer) == "sdpa"
    assert compiled_blocks(defaults.transformer) == 0 and defaults.cfg_batch and defaults.text_encoder_placement == "device"


#: bf16 VAE decode vs float32 on the same latents, frames in [0, 1]: measured on the tiny random VAE
#: max |diff| ~0.01, mean ~1e-3 (bf16 keeps 8 bits of mantissa: ~0.4% per op)
VAE_BF16_MAX, VAE_BF16_MEAN = 0.05, 0.01


def test_bf16_vae_decode_close_to_fp32(video):
    # one small item: bfloat16 3D convolutions are slow on a CPU
    z = video.sample(PROMPTS[:1], SEEDS[:1], **{**SAMPLE, "height": 32, "width": 32})
    ref = video.decode(z)
    vae16 = copy.deepcopy(video.vae)
    _cast_like_from_pretrained(vae16, torch.bfloat16)
    from vist3a.video import decode_latents

    frames = decode_latents(vae16, z)
    assert frames.dtype == torch.float32 and frames.shape == ref.shape
    diff = (frames - ref).abs()
    assert diff.max() < VAE_BF16_MAX and diff.mean() < VAE_BF16_MEAN, (diff.max(), diff.mean())
    assert diff.max() > 0  # it did run in bfloat16


def test_text_encoder_placements_give_identical_embeddings(video):
    negs = ["", "blurry"]
    ref = video.encode_prompt(PROMPTS[:2], negs)
    try:
        for placement in ("offload", "cpu", "device"):
            video.place_text_encoder(placement)
            got = video.encode_prompt(PROMPTS[:2], negs)
            assert got.device == video.transformer.device and torch.equal(got, ref), placement
    finally:
        video.place_text_encoder("device")
    with pytest.raises(ValueError, match="runtime.text_encoder 'gpu'"):
        video.place_text_encoder("gpu")


def test_module_on_copies_in_and_leaves_the_cpu_copy():
    """What offload does on a GPU, here with the meta device standing in for it."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    m[1].weight = torch.nn.Parameter(m[0].weight.T)  # two modules, one tensor
    m[0].weight = m[1].weight
    params = list(m.parameters())
    before = [p.detach().clone() for p in params]
    with module_on(m, "meta") as inside:
        assert all(p.device.type == "meta" for p in (*inside.parameters(), *inside.buffers()))
        assert inside[0].weight is inside[1].weight
    assert list(m.parameters()) == params and all(p is q for p, q in zip(m.parameters(), params))
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and m[2].running_mean.device == CPU


def test_attention_backends_agree_and_cuda_only_ones_fall_back(video, caplog):
    z_sdpa = video.sample(PROMPTS[:1], SEEDS[:1], **SAMPLE)
    try:
        assert set_attention(video.transformer, "math", CPU) == "math"
        z_math = video.sample(PROMPTS[:1], SEEDS[:1], **SAMPLE)
        with caplog.at_level(logging.WARNING, logger="vist3a.video"):
            assert set_attention(video.transformer, "flash", CPU) == "sdpa"
        assert "runtime.attention 'flash' needs CUDA" in caplog.text
        assert attention_in_use(video.transformer) == "sdpa"
    finally:
        set_attention(video.transformer, "sdpa", CPU)
    torch.testing.assert_close(z_math, z_sdpa, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="runtime.attention 'fast'"):
        set_attention(video.transformer, "fast", CPU)


def test_compiled_blocks_equal_eager(video):
    """Graph capture of every block (fullgraph, static shapes) through aot_eager: what inductor is given, without
    its C++ code generation (inductor itself: test_compiled_blocks_inductor, and on a GPU the benchmark)."""
    eager = video.sample(PROMPTS[:2], SEEDS[:2], **SAMPLE)
    n = compile_blocks(video.transformer, backend="aot_eager")
    try:
        assert n == compiled_blocks(video.transformer) == len(video.transformer.blocks)
        compiled = video.sample(PROMPTS[:2], SEEDS[:2], **SAMPLE)
    finally:
        uncompile_blocks(video.transformer)
        torch._dynamo.reset()
    assert compiled_blocks(video.transformer) == 0
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def _inductor_skip_reason() -> str | None:
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "inductor on the CPU needs a C++ compiler; none on PATH"
    if os.environ.get("VIST3A_INDUCTOR_TESTS") != "1":
        return ("inductor compiles C++ kernels (about 35 s cold on 2 cores, too slow for CI); "
                "set VIST3A_INDUCTOR_TESTS=1 to run it (on a GPU: test_gpu_compiled_blocks_inductor)")
    return None


def _inductor_equals_eager(device: torch.device) -> None:
    v = build_video(build_config({}), device, torch.float32)
    eager = v.sample(PROMPTS[:2], SEEDS[:2], **SAMPLE)
    compile_blocks(v.transformer)
    try:
        compiled = v.sample(PROMPTS[:2], SEEDS[:2], **SAMPLE)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


@pytest.mark.skipif(_inductor_skip_reason() is not None, reason=str(_inductor_skip_reason()))
def test_compiled_blocks_inductor(one_torch_thread):
    _inductor_equals_eager(CPU)


# ----------------------------------------------------------------------------- on CUDA (benchmarks/gpu_checks.sh)

#: different attention kernels in bfloat16 round differently; after 3 steps the tiny model's latents stay within
#: this relative RMS of sdpa's (bf16 noise; a wrong kernel is off by O(1))
GPU_BF16_REL_RMS = 0.05


@pytest.mark.gpu
def test_gpu_compiled_blocks_inductor():
    _inductor_equals_eager(torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_attention_kernels_agree():
    cuda = torch.device("cuda")
    v = build_video(build_config({}, ["runtime.dtype=bfloat16"]), cuda, torch.bfloat16)
    ref = v.sample(PROMPTS[:2], SEEDS[:2], **SAMPLE)
    for kernel in ("flash", "cudnn", "efficient", "math"):
        assert set_attention(v.transformer, kernel, cuda) == kernel
        z = v.sample(PROMPTS[:2], SEEDS[:2], **SAMPLE)
        rel = float((z - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        assert rel < GPU_BF16_REL_RMS, (kernel, rel)


@pytest.mark.gpu
def test_gpu_text_encoder_offload_identical():
    cuda = torch.device("cuda")
    v = build_video(build_config({}), cuda, torch.float32)
    ref = v.encode_prompt(PROMPTS[:2], ["", ""])
    v.place_text_encoder("offload")
    te = v.components.text_encoder
    assert all(p.device == CPU and p.is_pinned() for p in te.parameters())
    got = v.encode_prompt(PROMPTS[:2], ["", ""])
    assert got.device.type == "cuda" and torch.equal(got, ref)
    assert all(p.device == CPU for p in te.parameters())  # back in CPU memory between encodes


def test_step_cache_is_opt_in_and_reset_per_call(video):
    base = video.sample(PROMPTS[:1], SEEDS[:1], **{**SAMPLE, "steps": 6})
    try:
        enable_step_cache(video.transformer, 1e-6)  # never skips: the same result
        torch.testing.assert_close(video.sample(PROMPTS[:1], SEEDS[:1], **{**SAMPLE, "steps": 6}), base,
                                   atol=1e-6, rtol=0)
        enable_step_cache(video.transformer, 0.99)  # skips nearly every step after the first
        a = video.sample(PROMPTS[:1], SEEDS[:1], **{**SAMPLE, "steps": 6})
        b = video.sample(PROMPTS[:1], SEEDS[:1], **{**SAMPLE, "steps": 6})
    finally:
        disable_step_cache(video.transformer)
    assert not step_cache_on(video.transformer)
    assert (a - base).abs().max() > 1e-3  # it did skip
    assert torch.equal(a, b)  # no state carried from one call into the next


@pytest.mark.parametrize("override, key", [
    ("runtime.vae_dtype=float16", "runtime.vae_dtype"),
    ("runtime.attention=fast", "runtime.attention"),
    ("runtime.compile=maybe", "runtime.compile"),
    ("runtime.compile_mode=fastest", "runtime.compile_mode"),
    ("runtime.text_encoder=gpu", "runtime.text_encoder"),
    ("runtime.cfg_batch=sometimes", "runtime.cfg_batch"),
    ("runtime.step_cache=teacache", "runtime.step_cache"),
    ("runtime.step_cache_threshold=1.5", "runtime.step_cache_threshold"),
    ("runtime.attention=flash", "runtime.attention 'flash' needs runtime.dtype"),
])
def test_bad_lever_values_name_the_key(override, key):
    value = override.partition("=")[2]
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    assert key in str(err.value) and value in str(err.value)


def test_flash_attention_with_bf16_is_a_valid_config():
    cfg = build_config({}, ["runtime.attention=flash", "runtime.dtype=bfloat16"])
    assert cfg.runtime.attention == "flash"


# ----------------------------------------------------------------------------- random weights drawn elsewhere, the benchmark


def test_init_device_draws_in_the_dtype_and_leaves_global_state():
    from vist3a.config import VideoModelConfig
    from vist3a.video import build_wan

    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    c = build_wan(VideoModelConfig(), dtype=torch.bfloat16, init_device="cpu")
    assert torch.get_default_dtype() == torch.float32 and torch.equal(torch.rand(2), expected)
    assert c.transformer.proj_out.weight.dtype == torch.bfloat16 and c.transformer.scale_shift_table.dtype == torch.float32
    assert c.vae.decoder.conv_out.weight.dtype == torch.float32  # vae_dtype's default
    again = build_wan(VideoModelConfig(), dtype=torch.bfloat16, init_device="cpu")
    assert torch.equal(again.transformer.proj_out.weight, c.transformer.proj_out.weight)  # still seeded


@pytest.fixture(scope="module")
def benchmark(repo_root):
    """benchmarks/gpu_throughput.py as a module (it builds nothing at import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_throughput", os.path.join(repo_root, "benchmarks", "gpu_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_flop_floor_is_the_issues(benchmark):
    """13.9 TFLOP a pass and a 1.4 s floor for 1.3B at 512 px x 13 frames, 50 steps with CFG, 989 TFLOP/s."""
    cfg = benchmark.bench_config("vist3a-1.3b", False, [])
    assert benchmark.video_tokens(cfg) == 4096 and cfg.model.video.text_encoder.max_length == 512
    per_pass = benchmark.wan_pass_flops(cfg.model.video.transformer, 4096, 512)
    assert per_pass / 1e12 == pytest.approx(13.9, abs=0.05)
    assert benchmark.scene_flops(cfg) / 989e12 == pytest.approx(1.40, abs=0.01)
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert benchmark.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    # the real-size config the benchmark measures: random weights, every prompt within the byte tokenizer's limit
    gen_cfg = SceneGenerator.fetch_and_verify_weights(cfg)
    assert gen_cfg.model.video.source == gen_cfg.model.recon.source == "random"
    assert len(cfg.sampling.negative_prompt.encode()) < cfg.model.video.text_encoder.max_length


def test_benchmark_refuses_without_cuda_and_teaches(repo_root, benchmark, capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as done:
        benchmark.parse_args(["--help"])
    assert done.value.code == 0 and "FLOP floor" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--levers", "warp"])
    assert "--levers: unknown ['warp']" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    run = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py"], cwd=repo_root, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "gpu_checks.sh throughput" in run.stderr and "--smoke" in run.stderr
