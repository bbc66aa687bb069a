"""The one config schema for every vist3a job, YAML loading and command-line overrides (presets: vist3a.presets).

Every job (the `vist3a` CLI, `pipelines.generate`, `pipelines.serve`, ...) reads a `Config`.
A YAML file names a `preset` (which fills in the model sections) and overrides single keys.
Unknown keys, wrong types and bad values are refused before any work starts, with the
dotted path of the key and the offending value in the message.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from vist3a.presets import PRESETS, preset_names  # noqa: F401 - `vist3a.config` keeps offering them


class ConfigError(ValueError):
    """A config that cannot be used; the message names every bad key path and value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _four_k_plus_one(v: int, info: ValidationInfo) -> int:
    """The Wan VAE compresses time 4x: a frame count it takes is 4k+1."""
    if (v - 1) % 4:
        raise ValueError(f"{info.field_name} must be 4k+1 (e.g. 5, 9, 13, 49), got {v}")
    return v


#: a video frame count (sampling.frames, stitch_job.views)
FrameCount = Annotated[int, AfterValidator(_four_k_plus_one)]


# ----------------------------------------------------------------------------- video side


class TextEncoderConfig(Strict):
    """UMT5-style encoder (Wan uses umt5-xxl). `tokenizer: byt5` needs no vocabulary file."""

    tokenizer: Literal["byt5", "pretrained"] = "byt5"
    vocab_size: int = Field(384, gt=0)
    d_model: int = Field(32, gt=0)
    d_ff: int = Field(64, gt=0)
    d_kv: int = Field(8, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    max_length: int = Field(128, gt=0, description="prompt token limit; longer prompts are refused")


class WanTransformerConfig(Strict):
    """Arguments of diffusers' WanTransformer3DModel (names as diffusers spells them)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = Field(2, gt=0)
    attention_head_dim: int = Field(16, gt=0)
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = Field(32, gt=0)
    freq_dim: int = Field(32, gt=0)
    ffn_dim: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024


class WanVAEConfig(Strict):
    """Arguments of diffusers' AutoencoderKLWan. z_dim is 16 for every released Wan 2.1 model."""

    base_dim: int = Field(16, gt=0)
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = Field(1, gt=0)
    temperal_downsample: tuple[bool, ...] = (False, True, True)


class VideoModelConfig(Strict):
    source: Literal["random", "pretrained"] = "random"
    weights: str | None = Field(None, description="diffusers-format directory, s3:// prefix or hub id")
    seed: int = Field(0, description="seed of the random weights (source: random)")
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    transformer: WanTransformerConfig = WanTransformerConfig()
    vae: WanVAEConfig = WanVAEConfig()
    lora: str | None = Field(None, description="aligned LoRA directory (pipelines.align output lora_ema/ or lora/; "
                                               "local, s3:// or hub id) merged into the transformer; None: the base model")


# ----------------------------------------------------------------------------- reconstruction side


class ReconConfig(Strict):
    """A VGGT/AnySplat-family network: DINO-style patch encoder -> alternating-attention
    aggregator -> camera, depth, point and Gaussian heads. Full size: VGGT-1B / AnySplat."""

    source: Literal["random", "pretrained"] = "random"
    weights: str | None = None
    seed: int = 1
    img_size: int = Field(64, gt=0, description="square input size the network is run at")
    patch_size: int = Field(8, gt=0)
    embed_dim: int = Field(32, gt=0)
    encoder_depth: int = Field(4, gt=0, description="DINO blocks in the patch encoder (cut points blocks.0..N-1)")
    encoder_heads: int = Field(2, gt=0)
    num_registers: int = Field(4, ge=0)
    mlp_ratio: float = Field(4.0, gt=0)
    aggregator_depth: int = Field(2, gt=0, description="alternating frame/global attention layers")
    aggregator_heads: int = Field(2, gt=0)
    camera_iters: int = Field(2, gt=0)
    camera_trunk_depth: int = Field(1, gt=0)
    dpt_features: int = Field(16, gt=0)
    dpt_out_channels: tuple[int, int, int, int] = (8, 16, 32, 32)
    dpt_layers: tuple[int, int, int, int] | None = Field(
        None, description="aggregator layers feeding the DPT heads; default spreads them over the depth"
    )
    sh_degree: int = Field(1, ge=0, le=4)
    heads: tuple[Literal["camera", "depth", "points", "gaussians"], ...] = ("camera", "depth", "points", "gaussians")
    conventions: Literal["vggt", "anysplat"] = Field(
        "vggt", description="anysplat: focal (size/2)/(tan(fov/2)+1e-3) and depth unprojected at pixel corners, as "
                            "AnySplat's code runs its weights; vggt: plain focal, pixel centres")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the network's weights; bfloat16 as the release runs it (the heads stay float32)")

    @model_validator(mode="after")
    def _check(self) -> "ReconConfig":
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for name, dim, heads in (("encoder_heads", self.embed_dim, self.encoder_heads),
                                 ("aggregator_heads", self.embed_dim, self.aggregator_heads)):
            if dim % heads:
                raise ValueError(f"embed_dim {dim} is not divisible by {name} {heads}")
        if self.dpt_layers is not None and max(self.dpt_layers) >= self.aggregator_depth:
            raise ValueError(f"dpt_layers {self.dpt_layers} reach past aggregator_depth {self.aggregator_depth}")
        return self


class StitchConfig(Strict):
    spec: str = Field("conv3d_k3x3x3_o32_s1x1x1_p1x1x1", description="stitching layer, conv{1|2|3}d_k<K>_o<C>[_s<S>][_p<P>][_d<D>]")
    cut: str = Field("blocks.1", description="cut point of the reconstruction network")
    weights: str | None = Field(None, description="stitching layer (+ LoRA): vist3a's own checkpoint or the release's "
                                                 "anysplat_stitched.pth; random init when absent")
    seed: int = 2
    lora_rank: int | None = Field(None, ge=1, description="LoRA rank of a released .pth (checked against its shapes)")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha of a released .pth (not stored in the file)")
    readd_pos_embed: bool = Field(False, description="add the patch position embedding to the stitching layer's "
                                                     "output (the release); False: the layer predicts it (vist3a's search)")
    frames_antialias: bool = Field(True, description="antialiased resize of the VAE frames the Gaussian head sees; "
                                                     "False: plain trilinear, as the release")

    @field_validator("cut")
    @classmethod
    def _cut(cls, v: str) -> str:
        head, _, idx = v.partition(".")
        if head != "blocks" or not idx.isdigit():
            raise ValueError(f"cut must look like 'blocks.N', got {v!r}")
        return v


class ModelConfig(Strict):
    video: VideoModelConfig = VideoModelConfig()
    recon: ReconConfig = ReconConfig()
    stitch: StitchConfig = StitchConfig()


# ----------------------------------------------------------------------------- generation


class SamplingConfig(Strict):
    steps: int = Field(4, ge=1, le=1000)
    guidance: float = Field(5.0, ge=0.0, le=50.0, description="classifier-free guidance scale; <= 1 disables CFG")
    shift: float = Field(5.0, gt=0.0, description="flow-matching timestep shift")
    frames: FrameCount = Field(5, ge=1, description="video frames T; must be 4k+1 (Wan VAE 4x time compression)")
    height: int = Field(64, ge=16)
    width: int = Field(64, ge=16)
    negative_prompt: str = Field("", description="used for every prompt that brings none of its own")
    prompt_template: str = Field("{prompt}", description="what the video model is given; {prompt} is the user's prompt "
                                                         "(outputs and the manifest keep the user's prompt)")
    seed: int | None = Field(None, description="default seed when a request gives none; None derives it from the prompt")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v.count("{prompt}") != 1:
            raise ValueError(f"prompt_template must contain {{prompt}} exactly once, got {v!r}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _mult16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16 (VAE 8x and transformer patch 2x), got {v}")
        return v


SplatFormat = Literal["ply", "spz"]


class SplatOutputConfig(Strict):
    """What a scene becomes on disk: the compaction steps (vist3a.splats.compact, in this order: voxel merge,
    opacity pruning, count cap, SH truncation; each recorded in meta.json) and the files written."""

    voxel_size: float | None = Field(None, gt=0, description="merge Gaussians per voxel (world units; confidence-weighted "
                                                             "moment matching); None keeps all")
    voxel_footprints: float | None = Field(None, gt=0, description="the same merge with the voxel in pixel footprints "
                                                                   "(k x the scene's median depth/focal): any scene scale")
    min_opacity: float = Field(0.0, ge=0.0, lt=1.0, description="drop Gaussians below this opacity")
    max_gaussians: int | None = Field(None, ge=1, description="keep at most this many: the largest opacity x projected "
                                                              "area at the predicted cameras; None: no cap")
    sh_degree: int | None = Field(None, ge=0, le=4, description="truncate the scene's SH to this degree; None keeps it")
    formats: list[SplatFormat] = Field(["ply"], min_length=1, description="scene files: ply (INRIA layout, "
                                                                          "scene.ply), spz (Niantic SPZ v3, scene.spz)")
    ply_sh_degree: int = Field(3, ge=0, le=3, description="SH degree written to .ply (viewers read <= 3); 0: DC colour only")
    postprocess: Literal["vist3a", "anysplat"] = Field(
        "vist3a", description="anysplat: AnySplat's own voxelize/conf masking/opacity_conf, read from the config.json "
                              "beside model.recon.weights, inside the decoder; vist3a: none there. The compaction "
                              "steps above run after either")
    preview_views: int = Field(4, ge=0, le=64)
    preview_size: int = Field(256, ge=16, le=4096)

    @model_validator(mode="after")
    def _one_voxel_size(self) -> "SplatOutputConfig":
        if self.voxel_size is not None and self.voxel_footprints is not None:
            raise ValueError(f"splats.voxel_size ({self.voxel_size}) and splats.voxel_footprints "
                             f"({self.voxel_footprints}) both size the voxel merge: set one")
        return self

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each format at most once, got {v}")
        return v


class RuntimeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1)
    renderer: Literal["auto", "torch", "gsplat"] = "auto"
    # Throughput levers of the video model (vist3a.video.levers). The defaults are the safe choice;
    # benchmarks/gpu_throughput.py measures each on/off on a GPU and is what decides a deployment's values.
    vae_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the Wan VAE (decoding latents to the frames the Gaussian head sees); "
                               "bfloat16 halves its time and memory (benchmarks/gpu_throughput.py reports its "
                               "deviation from float32 on the same latents)")
    attention: Literal["sdpa", "flash", "cudnn", "efficient", "math"] = Field(
        "sdpa", description="attention kernel of the Wan transformer: sdpa lets PyTorch choose; flash, cudnn, "
                            "efficient, math force that scaled_dot_product_attention backend (flash, cudnn: "
                            "bfloat16/float16 only). flash/cudnn/efficient need CUDA: elsewhere sdpa is used, with "
                            "a logged note")
    compile: bool = Field(False, description="torch.compile each Wan transformer block (generation only: the bulk "
                                             "job, Serve, vist3a generate). The first call at each batch size "
                                             "compiles (tens of seconds on a GPU; the benchmark reports it)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when runtime.compile is on")
    text_encoder: Literal["device", "offload", "cpu"] = Field(
        "device", description="where the text encoder (UMT5-xxl: 11 GiB in bfloat16) lives: device (on runtime.device "
                              "throughout), offload (in pinned CPU memory, copied to the device only while encoding; "
                              "its memory then serves larger batches), cpu (encodes on the CPU)")
    cfg_batch: bool = Field(True, description="classifier-free guidance's two passes (prompt, negative prompt) in one "
                                              "transformer batch; False: two calls a step (less peak memory)")
    step_cache: Literal["off", "first_block"] = Field(
        "off", description="opt-in step caching (diffusers' First Block Cache, generation only): a step whose first "
                           "block's output barely changed reuses the other blocks' cached residual. Changes the "
                           "scenes (the benchmark reports the latent deviation) and decides per batch, so batched "
                           "and one-by-one generation may differ")
    step_cache_threshold: float = Field(0.05, gt=0.0, lt=1.0, description="First Block Cache threshold: relative "
                                                                         "change of the first block's residual under "
                                                                         "which a step is skipped")

    @model_validator(mode="after")
    def _attention_dtype(self) -> "RuntimeConfig":
        if self.attention in ("flash", "cudnn") and self.dtype == "float32":
            raise ValueError(f"runtime.attention {self.attention!r} needs runtime.dtype bfloat16 or float16, "
                             f"got runtime.dtype {self.dtype!r} (use attention sdpa or efficient for float32)")
        return self


class StorageConfig(Strict):
    """How s3:// URIs are reached. Unset fields fall back to the usual AWS variables/config."""

    s3_endpoint: str | None = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO; default AWS_ENDPOINT_URL")
    s3_region: str | None = None
    cache_dir: str = Field("~/.cache/vist3a", description="local cache for weights fetched from s3://")


class RayConfig(Strict):
    """How a pipeline reaches Ray. address None starts a local instance; 'auto' joins the cluster it runs on."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local instance only; default: all cores")
    object_store_mb: int | None = Field(None, ge=64, description="local instance only")
    progress_bars: bool = True


#: Per-scene scores by group (what `generate.scores` and `evaluate.metrics` name) and the columns each
#: group fills in meta.json's "scores", the manifest and the evaluation's per-scene table. vist3a.scores
#: computes them; README "Scene scores" says what each means and its range.
SCORE_COLUMNS: dict[str, tuple[str, ...]] = {
    "consistency": ("consistency_psnr", "consistency_ssim"),
    "splats": ("opacity_mean", "transparent_frac", "scale_median_rel", "scale_p99_rel"),
    "floaters": ("floater_frac",),
    "cameras": ("camera_ok", "camera_jump", "camera_max_turn_deg"),
    "clip": ("clip_score",),
    "aesthetic": ("aesthetic",),
}
#: groups that need a scorer model (evaluate.scorers); the others need none
MODEL_SCORES = ("clip", "aesthetic")


def known_scores(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SCORE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; known: {', '.join(SCORE_COLUMNS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"score names repeat: {names}")
    return list(names)


class GenerateJobConfig(Strict):
    """pipelines.generate: prompt set in, scenes + Parquet manifest out (resumable)."""

    input: str = Field("deploy/prompts/demo.txt", description="prompt file, glob, directory or s3:// prefix")
    output: str = Field("out/dataset", description="output directory or s3:// prefix")
    limit: int | None = Field(None, ge=1, description="only the first N rows of the prompt set (for trials)")
    actors: int = Field(1, ge=1, description="generator actors (model replicas)")
    gpus_per_actor: float = Field(0.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(2, ge=1, description="prompts per generator call")
    cpu_stage_cpus: float = Field(0.25, gt=0.0, description="CPU share of each validation / writing task")
    validators: int = Field(1, ge=1, description="prompt-validation actors (tokenizer only); as many id-ledger "
                                                 "actors hold the ids this run has seen (duplicates, conflicts)")
    read_chunk_mb: float = Field(16.0, gt=0.0, description=(
        "a .txt/.jsonl prompt file is read in parallel pieces of this many MB (CSV and Parquet files: one piece a file)"))
    block_rows: int = Field(1000, ge=1, description=(
        "rows per validation call; the rows it refuses are committed together, one manifest part per block"))
    commit_scenes: int = Field(32, ge=1, description=(
        "scenes per generator task and per manifest commit: a killed actor loses at most this many scenes' work; "
        "larger means fewer commit files (a multiple of batch_size keeps batches full)"))
    consolidate_every_s: float = Field(900.0, gt=0.0, description=(
        "fold the commit parts into the manifest's bucket files this often during a run (and always at its end)"))
    consolidate_every_parts: int = Field(1000, ge=1, description=(
        "... and whenever this run has committed this many parts since: a resume after a kill reads every part "
        "not yet folded, so this bounds its cost"))
    retry_failed: bool = Field(False, description="regenerate ids recorded as failed by an earlier run")
    progress_every_s: float = Field(10.0, gt=0.0)
    scores: list[str] = Field(default_factory=list, description=(
        "per-scene scores computed where each scene is made (bulk job, Serve, vist3a generate), written to meta.json "
        "and the manifest: any of consistency, splats, floaters, cameras, clip, aesthetic; [] (default) skips "
        "scoring; the scorers and how views are rendered: evaluate.scorers"))

    @field_validator("scores")
    @classmethod
    def _scores(cls, v: list[str]) -> list[str]:
        return known_scores(v)


class ServeJobConfig(Strict):
    """pipelines.serve: the HTTP endpoint. Serve's own deployment options live in the Serve config file."""

    store: str = Field("out/serve-store", description="where results are kept: directory or s3:// prefix")
    retention_max_scenes: int = Field(1000, ge=1, description="oldest results are deleted past this count")
    retention_hours: float | None = Field(24.0, gt=0, description="results older than this are deleted")
    max_body_bytes: int = Field(16384, ge=256, description="larger request bodies are refused (413)")
    max_steps: int = Field(100, ge=1, description="largest `steps` a request may ask for")
    max_guidance: float = Field(20.0, ge=0.0)
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key; None: no key")
    batch_max_size: int = Field(4, ge=1, description="@serve.batch: prompts per generator call")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0)
    max_queued_generations: int = Field(32, ge=1, description="accepted-but-unfinished scenes; past this POST answers 503")
    retry_after_s: int = Field(5, ge=1, description="Retry-After (seconds) sent with 503 when the queue is full")
    retention_check_s: float = Field(60.0, gt=0, description="how often (at most) an ingress replica applies the retention limits")
    lease_s: float = Field(30.0, gt=0, description="an accepted job's lease: the ingress replica holding it renews it; "
                                                   "past it, any ingress replica takes the job over and dispatches it again")
    max_attempts: int = Field(3, ge=1, description="dispatches of one job (model replica deaths, lost ingress) before it is failed")


#: Stitched fine-tuning loss terms and their default weights (the paper's, plus the rendering loss).
STITCH_LOSS_WEIGHTS = {"depth": 1.0, "depth_grad": 0.005, "depth_conf": 0.01, "points": 1.0, "pose": 1.0, "means": 1.0,
                       "scales": 10.0, "rotations": 1.0, "sh": 1.0, "opacities": 1.0, "render": 1.0}


def merged_weights(given: dict[str, float], defaults: dict[str, float], what: str) -> dict[str, float]:
    """`given` over `defaults`, refusing unknown names and negative weights (for loss/reward weight dicts)."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(defaults)}")
    if any(w < 0 for w in given.values()):
        raise ValueError(f"{what}: weights must be >= 0")
    return {**defaults, **given}


class TrainJobConfig(Strict):
    """What every Ray Train job shares: where it writes, its workers, LoRA and optimiser basics, and
    checkpoint/failure handling. Each job section adds its own fields (and its own defaults)."""

    output: str
    storage_path: str | None = Field(None, description="Ray Train checkpoints (local or s3://); default <output>/ray")
    name: str = Field(description="Ray Train run name; rerunning the same name resumes it")
    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU); gradients are averaged across them")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    seed: int = 0
    steps: int = Field(20, ge=1, description="optimisation steps in all")
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    checkpoint_every: int = Field(10, ge=1, description="steps between checkpoints (and the last step)")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0, description="worker failures a run restarts from its last checkpoint after")
    fail_at_step: int | None = Field(None, ge=0, description="failure drill: raise at this step unless resumed (tests)")


class StitchJobConfig(TrainJobConfig):
    """pipelines.stitch: layer search (one pass, ridge per layer) and stitched LoRA fine-tuning on Ray Train."""

    corpus: str = Field("out/corpus", description="Parquet clip corpus (pipelines.make_corpus): directory or s3:// prefix")
    output: str = Field("out/stitch", description="search/ (table, every layer's weights, best.pt) and stitch.pt go here")
    name: str = Field("stitch-finetune", description="Ray Train run name; rerunning the same name resumes it")
    views: FrameCount = Field(5, ge=1, description="frames per clip given to the VAE and the network; 4k+1")
    batch_size: int = Field(1, ge=1, description="clips per worker per step (search: per forward pass)")
    # layer search
    candidates: list[str] | None = Field(None, description="cut points to fit; None: every encoder block")
    ridge_lambda: float = Field(1e-4, ge=0.0, description="ridge penalty per row (scale-free in corpus size); intercept not penalised")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="clips (by id hash) kept out of the fit and scored")
    max_clips: int | None = Field(None, ge=1, description="search: stop after this many clips (trials)")
    # fine-tuning
    init: str | None = Field(None, description="stitch checkpoint to start from (e.g. <output>/search/best.pt); None: random")
    lr: float = Field(2e-4, gt=0.0)
    warmup_steps: int = Field(5, ge=0, description="linear warm-up, then cosine decay to zero at `steps`")
    lora_conv: bool = Field(True, description="LoRA also on the Conv2d layers of the heads (the paper: every Linear and Conv2d)")
    loss_weights: dict[str, float] = Field(
        default_factory=lambda: dict(STITCH_LOSS_WEIGHTS),
        description="L1 distillation terms and 'render' (renders vs frames); keys not given keep their default",
    )
    render_views: int = Field(1, ge=0, description="views per clip rendered for the rendering loss")
    render_stride: int = Field(1, ge=1, description="render every n-th pixel's Gaussian at 1/n resolution (cheap on CPU)")

    @field_validator("loss_weights")
    @classmethod
    def _loss_terms(cls, v: dict[str, float]) -> dict[str, float]:
        return merged_weights(v, STITCH_LOSS_WEIGHTS, "loss terms")


#: Reward fine-tuning terms and their default weights: CLIP-family quality of the rendered views, 3D
#: consistency (renders vs decoded frames), representation quality (depth agreement, coverage, scales),
#: and the plain flow-matching loss on a clip corpus (keeps the prior; needs align.corpus).
ALIGN_REWARD_WEIGHTS = {"quality": 1.0, "consistency": 0.05, "representation": 0.05, "diffusion": 0.0}
#: Wan attention projections that carry the video LoRA (self- and cross-attention).
ALIGN_LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


class AlignJobConfig(TrainJobConfig):
    """pipelines.align: direct reward fine-tuning of the video generator (LoRA) through the stitched decoder, on Ray Train."""

    prompts: str = Field("deploy/prompts/demo.txt", description="prompt set: file, glob, directory or s3:// prefix")
    output: str = Field("out/align", description="lora/, lora_ema/ and meta.json go here (local or s3://)")
    name: str = Field("align", description="Ray Train run name; rerunning the same name resumes it")
    batch_size: int = Field(1, ge=1, description="prompts per worker per step")
    # LoRA and optimiser
    lora_targets: list[str] = Field(default_factory=lambda: list(ALIGN_LORA_TARGETS),
                                    description="module name suffixes in the Wan transformer")
    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    ema_decay_max: float = Field(0.99, ge=0.0, lt=1.0, description="EMA decay min((1+step)/(10+step), this)")
    # rollout
    steps_min: int = Field(2, ge=1, description="denoising steps per rollout ~ U{steps_min..steps_max} (paper: 10..50)")
    steps_max: int = Field(3, ge=1)
    grad_steps: int = Field(1, ge=1, description="denoising steps that keep gradients (K)")
    grad_step_choice: Literal["last", "random"] = Field(
        "last", description="last: the last K steps; random: the last step plus K-1 drawn at random (paper, K=3)")
    guidance_min: float = Field(4.0, ge=0.0, description="CFG scale per rollout ~ U[guidance_min, guidance_max]; <= 1 disables CFG")
    guidance_max: float = Field(6.0, ge=0.0)
    shift: float = Field(3.0, gt=0.0)
    gradient_checkpointing: bool = Field(False, description="recompute transformer blocks in backward (memory for time)")
    prompt_templates: list[str] = Field(default_factory=lambda: ["{prompt}"],
                                        description="one drawn per prompt and step; {prompt} is the prompt (camera-motion wording)")
    # rewards
    reward_weights: dict[str, float] = Field(default_factory=lambda: dict(ALIGN_REWARD_WEIGHTS),
                                             description="keys not given keep their default")
    scorer: str | None = Field(None, description="CLIP-family scorer in transformers' format: directory, s3:// or hub id")
    scorer_tokenizer: str | None = Field(None, description="where its tokenizer/preprocessor are, when not beside it")
    views: int = Field(2, ge=1, description="views per scene rendered at the predicted cameras")
    quality_frames: int = Field(1, ge=0, description="decoded video frames scored beside the renders (the published code: 1)")
    render_stride: int = Field(1, ge=1, description="render every n-th pixel's Gaussian at 1/n resolution (cheap on CPU)")
    max_scale_ratio: float = Field(0.05, gt=0.0, description="Gaussians larger than this x median depth are penalised")
    corpus: str | None = Field(None, description="clip corpus for the diffusion (flow-matching) loss; captions are the prompts")

    @field_validator("reward_weights")
    @classmethod
    def _reward_terms(cls, v: dict[str, float]) -> dict[str, float]:
        return merged_weights(v, ALIGN_REWARD_WEIGHTS, "reward terms")

    @field_validator("prompt_templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        if not v or any("{prompt}" not in t for t in v):
            raise ValueError("prompt_templates must be a non-empty list of strings containing {prompt}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "AlignJobConfig":
        if self.steps_max < self.steps_min:
            raise ValueError(f"steps_max {self.steps_max} < steps_min {self.steps_min}")
        if self.grad_steps > self.steps_min:
            raise ValueError(f"grad_steps {self.grad_steps} exceeds steps_min {self.steps_min}")
        if self.guidance_max < self.guidance_min:
            raise ValueError(f"guidance_max {self.guidance_max} < guidance_min {self.guidance_min}")
        return self


class ScorersConfig(Strict):
    """The scorer models and how views are rendered for scoring (generate.scores and pipelines.evaluate)."""

    clip: str | None = Field(None, description="CLIP for clip_score in transformers' format: directory, s3:// or hub id "
                                               "(the paper: ViT-B/16, openai/clip-vit-base-patch16)")
    clip_tokenizer: str | None = Field(None, description="where the CLIP's tokenizer/preprocessor are, when not beside it")
    aesthetic_clip: str | None = Field(None, description="CLIP whose image features the aesthetic head reads "
                                                         "(LAION's head: ViT-L/14, openai/clip-vit-large-patch14)")
    aesthetic_head: str | None = Field(None, description="LAION-style aesthetic head weights (.pth or .safetensors; "
                                                         "e.g. sac+logos+ava1-l14-linearMSE.pth): local, s3:// or hub file")
    views: int = Field(8, ge=1, le=256, description="views rendered along the predicted camera path for clip/aesthetic "
                                                    "(the paper scores 8 rendered frames)")
    render_size: int | None = Field(None, ge=16, le=4096, description="side of the scoring renders; None: the cameras' size")
    floater_quantile: float = Field(0.01, gt=0.0, lt=0.5, description="robust bounding box: per-axis quantiles q, 1-q")
    floater_margin: float = Field(0.1, ge=0.0, description="the box grown by this fraction of its size on each side")
    transparent_below: float = Field(0.05, gt=0.0, lt=1.0, description="opacity under which a Gaussian counts as transparent")


class EvaluateJobConfig(Strict):
    """pipelines.evaluate: the paper's evaluation as a Ray Data job over generated datasets or prompt sets (resumable)."""

    datasets: dict[str, str] = Field(default_factory=dict, description="benchmark name -> a generated dataset "
                                                                      "(pipelines.generate output: its manifest)")
    prompts: dict[str, str] = Field(default_factory=dict, description="benchmark name -> a prompt set; generated first "
                                                                     "into <output>/generated/<name>, then scored")
    output: str = Field("out/eval", description="per-scene scenes.parquet, summary.json/.md (directory or s3:// prefix)")
    metrics: list[str] = Field(default_factory=lambda: list(SCORE_COLUMNS), description="score groups to compute")
    scorers: ScorersConfig = ScorersConfig()
    limit: int | None = Field(None, ge=1, description="only the first N scenes of each benchmark (for trials)")
    actors: int = Field(1, ge=1, description="scoring actors (each loads the scorers once)")
    cpus_per_actor: float = Field(1.0, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    batch_size: int = Field(4, ge=1, description="scenes per scoring call")
    cpu_stage_cpus: float = Field(0.25, gt=0.0, description="CPU share of each writing task")
    retry_failed: bool = Field(False, description="score again scenes an earlier run recorded as failed")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of the summary's intervals")
    progress_every_s: float = Field(10.0, gt=0.0)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        return known_scores(v)

    @model_validator(mode="after")
    def _check(self) -> "EvaluateJobConfig":
        both = sorted(set(self.datasets) & set(self.prompts))
        if both:
            raise ValueError(f"benchmark name(s) {both} appear in both datasets and prompts")
        return self


class Config(Strict):
    preset: str = "tiny"
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    splats: SplatOutputConfig = SplatOutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    generate: GenerateJobConfig = GenerateJobConfig()
    serve: ServeJobConfig = ServeJobConfig()
    stitch_job: StitchJobConfig = StitchJobConfig()
    align: AlignJobConfig = AlignJobConfig()
    evaluate: EvaluateJobConfig = EvaluateJobConfig()

    @model_validator(mode="after")
    def _check_cross(self) -> "Config":
        if self.model.video.transformer.text_dim != self.model.video.text_encoder.d_model and self.model.video.source == "random":
            raise ValueError(
                f"model.video.transformer.text_dim ({self.model.video.transformer.text_dim}) must equal "
                f"model.video.text_encoder.d_model ({self.model.video.text_encoder.d_model})"
            )
        return self


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        value = e.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {path}: {msg} (got {shown})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a","b","c"], yaml-parsed VALUE)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def build_config(data: dict | None = None, overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>") -> Config:
    """Validate `data` (a YAML mapping) on top of its preset, then apply `key.path=value` overrides."""
    data = copy.deepcopy(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({source}): top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = nxt
        node[path[-1]] = value
    preset = data.get("preset", "tiny")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(
            f"invalid config ({source}):\n  preset: unknown preset (got {preset!r}); choose one of {', '.join(preset_names())}"
        )
    merged = _deep_merge(PRESETS[preset], data)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file (None: the embedded default, the tiny preset) with overrides."""
    if path is None:
        return build_config({}, overrides, source="defaults")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {p}: {exc}") from None
    return build_config(data, overrides, source=str(p))
