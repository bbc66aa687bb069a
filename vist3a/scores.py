"""Per-scene quality scores: what a user filters a synthetic dataset on, and what the evaluation reports.

Model-free scores need only the scene:
- consistency: PSNR (dB) and SSIM of the Gaussians rendered at the predicted cameras against the
  VAE-decoded frames the decoder saw (only where the scene is made: the frames are not kept);
- splats: opacity and scale statistics (scales relative to the scene's robust extent, so scale-free);
- floaters: the fraction of Gaussians outside the scene's robust bounding box;
- cameras: is every predicted camera a valid pinhole camera, and is the path smooth.
Model-based scores render `views` views along the predicted camera path and ask a model:
- clip: 100 x cosine between CLIP image and text embeddings (transformers' CLIPModel), mean over views;
- aesthetic: a LAION-style MLP head on normalised CLIP image features, mean over views.

`SceneScorer(groups, scorers_cfg)` loads what the groups need once; `score(...)` gives one dict of
floats per scene with the columns of `vist3a.config.SCORE_COLUMNS`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vist3a.config import SCORE_COLUMNS, ScorersConfig
from vist3a.ids import seeded
from vist3a.splats.gaussians import Cameras, Gaussians
from vist3a.splats.render import quat_to_rotmat, render

# ----------------------------------------------------------------------------- image metrics


def psnr(images: Tensor, targets: Tensor, eps: float = 1e-10) -> Tensor:
    """Peak signal-to-noise ratio (dB, data range 1) per image: [N,3,H,W] each -> [N]."""
    if images.shape != targets.shape:
        raise ValueError(f"images {tuple(images.shape)} and targets {tuple(targets.shape)} differ")
    mse = (images.float() - targets.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(eps))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(images: Tensor, targets: Tensor, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> Tensor:
    """Structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5, data range 1) per image, the
    mean over channels and over the window positions that lie inside the image: [N,C,H,W] each -> [N]."""
    if images.shape != targets.shape:
        raise ValueError(f"images {tuple(images.shape)} and targets {tuple(targets.shape)} differ")
    n, c, h, w = images.shape
    window = min(window, h, w)
    g = _gaussian_window(window, sigma).to(images.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    x, y = images.double(), targets.double()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


# ----------------------------------------------------------------------------- camera paths


def rotmat_to_quat(rot: Tensor) -> Tensor:
    """w,x,y,z unit quaternions [...,4] of rotation matrices [...,3,3] (the inverse of quat_to_rotmat)."""
    m = rot.double()
    w = torch.sqrt((1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]).clamp_min(0)) / 2
    x = torch.sqrt((1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2]).clamp_min(0)) / 2
    y = torch.sqrt((1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2]).clamp_min(0)) / 2
    z = torch.sqrt((1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]).clamp_min(0)) / 2
    # signs from the off-diagonal terms, relative to the largest component (numerically the safest)
    x = torch.copysign(x, m[..., 2, 1] - m[..., 1, 2])
    y = torch.copysign(y, m[..., 0, 2] - m[..., 2, 0])
    z = torch.copysign(z, m[..., 1, 0] - m[..., 0, 1])
    return F.normalize(torch.stack([w, x, y, z], -1), dim=-1).to(rot.dtype)


def _slerp(q0: Tensor, q1: Tensor, t: Tensor) -> Tensor:
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)  # the short way round
    dot = dot.abs().clamp(max=1.0)
    theta = torch.acos(dot)
    small = theta < 1e-6
    sin = torch.sin(theta).clamp_min(1e-12)
    a = torch.where(small, 1 - t, torch.sin((1 - t) * theta) / sin)
    b = torch.where(small, t, torch.sin(t * theta) / sin)
    return F.normalize(a * q0 + b * q1, dim=-1)


def interpolate_cameras(cameras: Cameras, n: int) -> Cameras:
    """`n` cameras evenly spaced along the predicted path (from the first camera to the last): centres and
    intrinsics linearly, rotations by slerp between neighbours. One camera is repeated n times."""
    c = cameras.num
    if n < 1:
        raise ValueError(f"views must be >= 1, got {n}")
    vm, ks = cameras.viewmats.double(), cameras.Ks.double()
    if c == 1:
        return Cameras(vm.expand(n, 4, 4).float().clone(), ks.expand(n, 3, 3).float().clone(), cameras.width, cameras.height)
    s = torch.linspace(0, c - 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    i0 = s.floor().long().clamp(max=c - 2)
    t = (s - i0)[:, None]
    rot = vm[:, :3, :3]
    q = rotmat_to_quat(rot)
    centers = -(rot.transpose(1, 2) @ vm[:, :3, 3:])[..., 0]
    r = quat_to_rotmat(_slerp(q[i0], q[i0 + 1], t))
    centre = (1 - t) * centers[i0] + t * centers[i0 + 1]
    out = torch.zeros(n, 4, 4, dtype=torch.float64)
    out[:, :3, :3] = r
    out[:, :3, 3] = -(r @ centre[..., None])[..., 0]
    out[:, 3, 3] = 1
    k = (1 - t[..., None]) * ks[i0] + t[..., None] * ks[i0 + 1]
    return Cameras(out.float(), k.float(), cameras.width, cameras.height)


def resized_cameras(cameras: Cameras, size: int | None) -> Cameras:
    """The same cameras rendering a `size` x `size` image (pixel intrinsics scaled); None keeps them."""
    if size is None or (size == cameras.width and size == cameras.height):
        return cameras
    ks = cameras.Ks.clone()
    ks[:, 0, :] *= size / cameras.width
    ks[:, 1, :] *= size / cameras.height
    return Cameras(cameras.viewmats, ks, size, size)


def camera_scores(cameras: Cameras, tol: float = 1e-3) -> dict[str, float]:
    """camera_ok: 1.0 when every camera is finite, its rotation orthonormal with det +1 (within `tol`) and
    its focal lengths positive, else 0.0; camera_jump: the largest step between consecutive centres over
    the median step (1 for an even path; large for a jump); camera_max_turn_deg: the largest rotation
    between consecutive cameras, in degrees."""
    vm, ks = cameras.viewmats.double(), cameras.Ks.double()
    rot = vm[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64)
    finite = bool(torch.isfinite(vm).all() and torch.isfinite(ks).all())
    ok = finite and bool((rot @ rot.transpose(1, 2) - eye).abs().amax() <= tol) \
        and bool((torch.linalg.det(rot) - 1).abs().amax() <= tol) \
        and bool((ks[:, 0, 0] > 0).all() and (ks[:, 1, 1] > 0).all())
    out = {"camera_ok": float(ok), "camera_jump": 1.0, "camera_max_turn_deg": 0.0}
    if cameras.num < 2 or not finite:
        if not finite:
            out.update(camera_jump=math.nan, camera_max_turn_deg=math.nan)
        return out
    centers = -(rot.transpose(1, 2) @ vm[:, :3, 3:])[..., 0]
    steps = (centers[1:] - centers[:-1]).norm(dim=-1)
    median = float(steps.median())
    largest = float(steps.max())
    out["camera_jump"] = 1.0 if largest <= 1e-12 else (largest / median if median > 1e-12 else math.inf)
    rel = rot[1:] @ rot[:-1].transpose(1, 2)
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    out["camera_max_turn_deg"] = float(torch.rad2deg(torch.acos(cos)).max())
    return out


# ----------------------------------------------------------------------------- splat statistics


def robust_box(means: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """Per-axis q and 1-q quantiles of the centres [N,3] -> (lo [3], hi [3])."""
    x = means.double()
    if x.shape[0] > (1 << 24):  # torch.quantile's size limit: a strided subsample is as good for quantiles
        x = x[:: math.ceil(x.shape[0] / (1 << 24))]
    lo = torch.quantile(x, quantile, dim=0)
    return lo, torch.quantile(x, 1 - quantile, dim=0)


def splat_scores(g: Gaussians, quantile: float = 0.01, margin: float = 0.1,
                 transparent_below: float = 0.05) -> dict[str, float]:
    """opacity_mean; transparent_frac (opacity < transparent_below); scale_median_rel / scale_p99_rel (the
    median / 99th percentile of each Gaussian's largest scale, over the diagonal of the robust box);
    floater_frac (centres outside the robust box grown by `margin`)."""
    if g.num == 0:
        nan = math.nan
        return {"opacity_mean": nan, "transparent_frac": nan, "scale_median_rel": nan, "scale_p99_rel": nan,
                "floater_frac": nan}
    op = g.opacities.double()
    lo, hi = robust_box(g.means, quantile)
    extent = float((hi - lo).norm())
    big = g.scales.double().amax(-1)
    big = big if big.shape[0] <= (1 << 24) else big[:: math.ceil(big.shape[0] / (1 << 24))]
    scale = max(extent, 1e-12)
    box_lo, box_hi = lo - (hi - lo) * margin, hi + (hi - lo) * margin
    m = g.means.double()
    outside = ((m < box_lo) | (m > box_hi)).any(-1)
    return {
        "opacity_mean": float(op.mean()),
        "transparent_frac": float((op < transparent_below).double().mean()),
        "scale_median_rel": float(big.median()) / scale,
        "scale_p99_rel": float(torch.quantile(big, 0.99)) / scale,
        "floater_frac": float(outside.double().mean()),
    }


# ----------------------------------------------------------------------------- the aesthetic head


class AestheticHead(nn.Module):
    """LAION's improved aesthetic predictor: an MLP on L2-normalised CLIP image embeddings -> a score
    (about 1..10 for the released ViT-L/14 head). Parameter names follow the released file
    (`layers.0/2/4/6/7`), so its state dict loads as it is; a single Linear (`weight`, `bias`, LAION's
    first linear head) loads too."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = nn.Sequential(nn.Linear(dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
                                    nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1))

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], source: str = "<state dict>") -> nn.Module:
        if set(state) == {"weight", "bias"}:
            head = nn.Linear(state["weight"].shape[1], 1)
            head.load_state_dict(state)
            return _Squeeze(head)
        need = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"aesthetic head {source}: not a LAION aesthetic head (missing {missing}; has "
                             f"{sorted(state)[:8]})")
        hidden = tuple(int(state[f"layers.{i}.weight"].shape[0]) for i in (0, 2, 4, 6))
        head = cls(int(state["layers.0.weight"].shape[1]), hidden)
        head.load_state_dict({k: state[k] for k in need})
        return head


class _Squeeze(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)


def load_aesthetic_head(spec: str | None, storage=None, what: str = "evaluate.scorers.aesthetic_head") -> nn.Module:
    """The head from a .pth (state dict, read with weights_only) or .safetensors file: local, s3:// or a hub file."""
    from vist3a.weights.locate import require

    path = Path(require(spec, storage, what=what, allow_patterns=["*.pth", "*.pt", "*.safetensors", "*.bin"]))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors", ".bin"))
        if len(files) != 1:
            raise FileNotFoundError(f"{what} {spec!r}: expected one .pth/.safetensors file in {path}, found "
                                    f"{[p.name for p in files]}")
        path = files[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    return AestheticHead.from_state_dict({k: v.float() for k, v in state.items()}, str(path)).eval().requires_grad_(False)


def write_tiny_aesthetic_head(path: str | Path, dim: int, seed: int = 0) -> Path:
    """A random aesthetic head for a tiny CLIP (embedding width `dim`), in the released file's layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with seeded(seed):
        head = AestheticHead(dim, (64, 32, 16, 8))
    torch.save(head.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- scoring a scene


def score_columns(groups: list[str]) -> list[str]:
    return [c for g in groups for c in SCORE_COLUMNS[g]]


def check_scorers(groups: list[str], cfg: ScorersConfig, storage=None, key: str = "generate.scores") -> None:
    """Fail now, before any work, when a model score is asked for and its scorer is unset or missing
    (remote ones are fetched, as model weights are at start-up): the message names the config key, the
    value and where it looked."""
    from vist3a.weights.locate import require

    needs = {"clip": [("clip", cfg.clip)], "aesthetic": [("aesthetic_clip", cfg.aesthetic_clip),
                                                         ("aesthetic_head", cfg.aesthetic_head)]}
    for group in groups:
        for name, spec in needs.get(group, []):
            if not spec:
                raise FileNotFoundError(f"{key} includes {group!r} but evaluate.scorers.{name} is not set "
                                        f"(a directory, s3:// prefix or hub id; see README 'Scene scores')")
            require(spec, storage, what=f"evaluate.scorers.{name}")


class SceneScorer:
    """Loads the scorer models the groups need (once); `score` computes one scene's scores."""

    def __init__(self, groups: list[str], cfg: ScorersConfig | None = None, storage=None,
                 device: torch.device | str = "cpu", renderer: str = "auto"):
        from vist3a.rewards.clip import ClipScorer

        self.groups, self.cfg = list(groups), cfg or ScorersConfig()
        self.device, self.renderer = torch.device(device), renderer
        check_scorers(self.groups, self.cfg, storage, key="scores")
        self.clip = self.aesthetic_clip = self.aesthetic_head = None
        if "clip" in self.groups:
            self.clip = ClipScorer.load(self.cfg.clip, storage, self.cfg.clip_tokenizer, self.device,
                                        what="evaluate.scorers.clip")
        if "aesthetic" in self.groups:
            self.aesthetic_clip = ClipScorer.load(self.cfg.aesthetic_clip, storage, None, self.device,
                                                  what="evaluate.scorers.aesthetic_clip")
            self.aesthetic_head = load_aesthetic_head(self.cfg.aesthetic_head, storage).to(self.device)
            width = int(self.aesthetic_clip.model.config.projection_dim)
            first = next(self.aesthetic_head.parameters()).shape[1]
            if first != width:
                raise ValueError(f"evaluate.scorers.aesthetic_head takes {first}-dim features but "
                                 f"evaluate.scorers.aesthetic_clip gives {width}-dim ones")

    @property
    def columns(self) -> list[str]:
        return score_columns(self.groups)

    def render_path(self, gaussians: Gaussians, cameras: Cameras) -> Tensor:
        """`views` renders [V,3,s,s] along the predicted camera path (what the model scores look at)."""
        cams = resized_cameras(interpolate_cameras(cameras, self.cfg.views), self.cfg.render_size)
        out = render(gaussians.to(self.device), cams.to(self.device), backend=self.renderer)
        return out.colors.permute(0, 3, 1, 2).clamp(0, 1)

    @torch.no_grad()
    def score(self, gaussians: Gaussians, cameras: Cameras, prompt: str, frames: Tensor | None = None,
              views: Tensor | None = None) -> dict[str, float]:
        """The scores of one scene. `frames` [S,3,H,W] in [0,1] are the VAE-decoded frames at the cameras'
        size (needed for consistency; NaN without them). `views` are renders along the path, when made already."""
        out: dict[str, float] = {}
        g = gaussians.detach()
        if "consistency" in self.groups:
            out.update(consistency_scores(g, cameras, frames, self.renderer, self.device))
        if "splats" in self.groups or "floaters" in self.groups:
            s = splat_scores(g, self.cfg.floater_quantile, self.cfg.floater_margin, self.cfg.transparent_below)
            out.update({k: v for k, v in s.items() if k in self.columns})
        if "cameras" in self.groups:
            out.update(camera_scores(cameras))
        if self.clip is not None or self.aesthetic_head is not None:
            if views is None:
                views = self.render_path(g, cameras)
            views = views.to(self.device)
            if self.clip is not None:
                out["clip_score"] = float(100.0 * self.clip(views, [prompt] * views.shape[0]).mean())
            if self.aesthetic_head is not None:
                emb = self.aesthetic_clip.image_embeddings(views)
                out["aesthetic"] = float(self.aesthetic_head(emb).mean())
        return {c: out.get(c, math.nan) for c in self.columns}


def consistency_scores(gaussians: Gaussians, cameras: Cameras, frames: Tensor | None, renderer: str = "auto",
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """consistency_psnr / consistency_ssim: the Gaussians rendered at the predicted cameras against the
    frames [S,3,H,W] (the cameras' size) the decoder saw, mean over views; NaN without frames."""
    if frames is None:
        return {"consistency_psnr": math.nan, "consistency_ssim": math.nan}
    if frames.shape[0] != cameras.num or tuple(frames.shape[-2:]) != (cameras.height, cameras.width):
        raise ValueError(f"frames {tuple(frames.shape)} do not match {cameras.num} cameras of "
                         f"{cameras.width}x{cameras.height}")
    out = render(gaussians.to(device), cameras.to(device), backend=renderer)
    renders = out.colors.permute(0, 3, 1, 2).clamp(0, 1)
    target = frames.to(renders.device, renders.dtype).clamp(0, 1)
    return {"consistency_psnr": float(psnr(renders, target).mean()), "consistency_ssim": float(ssim(renders, target).mean())}


def write_tiny_scorers(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """A tiny random CLIP (`<dir>/clip`) and an aesthetic head for it (`<dir>/aesthetic-head.pth`): what the
    tiny preset's scores and the tests load with no download. Their numbers mean nothing."""
    from vist3a.rewards.clip import write_tiny_clip

    directory = Path(directory)
    clip = write_tiny_clip(directory / "clip", seed=seed)
    head = write_tiny_aesthetic_head(directory / "aesthetic-head.pth", dim=32, seed=seed + 1)
    return {"clip": str(clip), "aesthetic_clip": str(clip), "aesthetic_head": str(head)}
