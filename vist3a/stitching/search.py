"""Stitching-layer search: which layer of the reconstruction network is linear in the video latents?

One streaming pass over a corpus. Per batch of clips the time-upsampled, de-normalised VAE latents
become the rows X of the stitching Conv3d's least-squares problem (one row per output position:
the replicate-padded input window, exactly what `StitchingLayer` sees, plus a ones column for the
intercept), and every candidate layer's patch tokens become its targets Y. We keep only sums:

    X^T X   (shared by every layer),   X^T Y and sum Y^2 per layer,   row count n

in float64, separately for the fitting clips and for held-out clips (chosen by a hash of the clip
id, so every worker agrees). Sums merge across workers by adding them, memory is independent of the
corpus size, and the ridge solution and its errors follow in closed form:

    W   = (X^T X + lambda n I')^-1 X^T Y            (I' leaves the intercept unpenalised)
    SSE = sum Y^2 - 2 tr(W^T X^T Y) + tr(W^T X^T X W)
    R^2 = 1 - SSE / (sum Y^2 - |sum Y|^2 / n)        (sum Y is the ones row of X^T Y)

Layers are ranked by held-out R^2, which is comparable across layers of different scale (the
published code ranks by raw MSE on the fitting data).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vist3a.io.frames import resize_frames
from vist3a.stitching.layer import upsample_time
from vist3a.stitching.spec import StitchSpec

SPLITS = ("fit", "heldout")


# ----------------------------------------------------------------------------- rows of the Conv3d problem


def conv_patches(latents: Tensor, spec: StitchSpec) -> Tensor:
    """(B, C, T, h, w) -> (B * T_out * h_out * w_out, C * kT * kH * kW): the input window of every output
    position of the stitching Conv3d, replicate-padded as `StitchingLayer` pads.

    Rows are ordered (b, t, i, j) like `StitchingLayer.to_tokens`; columns (c, kt, kh, kw) like a Conv3d
    weight flattened, so `patches @ weight.reshape(C_out, -1).T + bias` equals the layer's output.
    """
    pt, ph, pw = spec.padding
    x = F.pad(latents, (pw, pw, ph, ph, pt, pt), mode="replicate") if pt or ph or pw else latents  # = StitchingLayer.pad
    b, c = x.shape[:2]
    for dim, k, s, d in zip((2, 3, 4), spec.kernel, spec.stride, spec.dilation):
        x = x.unfold(dim, (k - 1) * d + 1, s)  # appends a window axis
    x = x[..., ::spec.dilation[0], ::spec.dilation[1], ::spec.dilation[2]]  # (B, C, To, Ho, Wo, kT, kH, kW)
    return x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, c * math.prod(spec.kernel))


def weight_to_conv(solution: Tensor, spec: StitchSpec, in_channels: int, bias: bool = True) -> tuple[Tensor, Tensor]:
    """Ridge solution [D(+1), C_out] -> (Conv3d weight [C_out, C_in, kT, kH, kW], bias [C_out]) in float32."""
    d = in_channels * math.prod(spec.kernel)
    w = solution[:d].T.reshape(spec.out_channels, in_channels, *spec.kernel)
    b = solution[d] if bias else torch.zeros(spec.out_channels, dtype=solution.dtype, device=solution.device)
    return w.float().contiguous(), b.float().contiguous()


# ----------------------------------------------------------------------------- sufficient statistics


class NormalEquations:
    """Float64 sums of the least-squares problems of several target layers sharing one input X.

    `state` is a flat {name: tensor} dict: merging two accumulators (two workers, two corpus halves)
    is adding the tensors of equal names, which is what `merge` and an all-reduce do."""

    def __init__(self, in_dim: int, channels: Mapping[str, int], device: torch.device | str = "cpu"):
        self.in_dim = in_dim
        self.channels = dict(channels)
        f64 = dict(dtype=torch.float64, device=device)
        self.state: dict[str, Tensor] = {}
        for split in SPLITS:
            self.state[f"{split}/n"] = torch.zeros((), **f64)
            self.state[f"{split}/xtx"] = torch.zeros(in_dim + 1, in_dim + 1, **f64)
            for name, c in self.channels.items():
                self.state[f"{split}/xty/{name}"] = torch.zeros(in_dim + 1, c, **f64)
                self.state[f"{split}/yy/{name}"] = torch.zeros(c, **f64)

    def add(self, x: Tensor, targets: Mapping[str, Tensor], split: str = "fit") -> None:
        """Rows x [n, D] (without the ones column) and each layer's targets [n, C]."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if x.shape[0] == 0:
            return
        if x.shape[1] != self.in_dim:
            raise ValueError(f"rows have {x.shape[1]} columns, expected {self.in_dim}")
        if set(targets) != set(self.channels):
            raise ValueError(f"targets for {sorted(targets)}, expected {sorted(self.channels)}")
        x64 = torch.cat([x.to(torch.float64), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
        s = self.state
        s[f"{split}/n"] += x.shape[0]
        s[f"{split}/xtx"].addmm_(x64.T, x64)
        for name, y in targets.items():
            if y.shape != (x.shape[0], self.channels[name]):
                raise ValueError(f"layer {name}: targets {tuple(y.shape)}, expected ({x.shape[0]}, {self.channels[name]})")
            y64 = y.to(torch.float64)
            s[f"{split}/xty/{name}"].addmm_(x64.T, y64)
            s[f"{split}/yy/{name}"] += (y64 * y64).sum(0)

    def merge(self, other: "NormalEquations") -> "NormalEquations":
        """Add another accumulator's sums into this one (same problem shape)."""
        if other.in_dim != self.in_dim or other.channels != self.channels:
            raise ValueError("cannot merge normal equations of different problems")
        for k, v in other.state.items():
            self.state[k] += v.to(self.state[k].device)
        return self

    def to(self, device) -> "NormalEquations":
        self.state = {k: v.to(device) for k, v in self.state.items()}
        return self

    def rows(self, split: str = "fit") -> int:
        return int(self.state[f"{split}/n"].item())

    def system(self, name: str, split: str = "fit") -> tuple[Tensor, Tensor, Tensor, int]:
        """(X^T X, X^T Y, sum Y^2, n) of one layer and split; the ones column is the last."""
        s = self.state
        return s[f"{split}/xtx"], s[f"{split}/xty/{name}"], s[f"{split}/yy/{name}"], self.rows(split)


def ridge_solve(xtx: Tensor, xty: Tensor, n: int, lam: float, bias: bool = True) -> Tensor:
    """Ridge solution from augmented normal equations (ones column last).

    bias=True: [D+1, C], intercept unpenalised; bias=False: [D, C], no intercept. The penalty is
    lam * n * |W|^2, i.e. lam on the mean squared error, so it means the same for any corpus size.
    Singular systems (lam = 0 and collinear columns) get the minimum-norm least-squares solution."""
    if not bias:
        xtx, xty = xtx[:-1, :-1], xty[:-1]
    a = xtx.clone()
    penalised = a.shape[0] - 1 if bias else a.shape[0]
    idx = torch.arange(penalised, device=a.device)
    a[idx, idx] += lam * n
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(xty, chol)
    return torch.linalg.lstsq(a.cpu(), xty.cpu(), driver="gelsd").solution.to(xty.device)


def residual_stats(solution: Tensor, xtx: Tensor, xty: Tensor, yy: Tensor, n: int, bias: bool = True) -> tuple[float, float]:
    """(MSE per element, R^2) of `solution` on the problem whose sums are given, without its rows."""
    if n == 0:
        return math.nan, math.nan
    sum_y = xty[-1]
    if not bias:
        xtx, xty = xtx[:-1, :-1], xty[:-1]
    sse = yy.sum() - 2 * (solution * xty).sum() + (solution * (xtx @ solution)).sum()
    sse = float(sse.clamp_min(0))
    sst = float(yy.sum() - (sum_y * sum_y).sum() / n)
    mse = sse / (n * yy.numel())
    return mse, (1.0 - sse / sst) if sst > 0 else math.nan


@dataclass
class LayerFit:
    name: str
    weight: Tensor  # Conv3d weight [C_out, C_in, kT, kH, kW]
    bias: Tensor  # [C_out]
    mse_fit: float
    r2_fit: float
    mse_heldout: float
    r2_heldout: float
    target_var_heldout: float  # mean per-element variance of the held-out targets (what MSE compares to)

    def row(self) -> dict:
        return {"layer": self.name, "r2_heldout": self.r2_heldout, "mse_heldout": self.mse_heldout,
                "nmse_heldout": 1.0 - self.r2_heldout if not math.isnan(self.r2_heldout) else math.nan,
                "r2_fit": self.r2_fit, "mse_fit": self.mse_fit, "target_var_heldout": self.target_var_heldout}


def solve_layers(eq: NormalEquations, spec: StitchSpec, in_channels: int, lam: float, bias: bool = True) -> list[LayerFit]:
    """Fit every layer on the 'fit' sums and score it on both splits."""
    if eq.rows("fit") == 0:
        raise ValueError("no fitting rows: the corpus is empty or every clip was held out")
    fits = []
    for name in eq.channels:
        xtx, xty, yy, n = eq.system(name, "fit")
        sol = ridge_solve(xtx, xty, n, lam, bias)
        mse_fit, r2_fit = residual_stats(sol, xtx, xty, yy, n, bias)
        hx, hy, hyy, hn = eq.system(name, "heldout")
        mse_ho, r2_ho = residual_stats(sol, hx, hy, hyy, hn, bias)
        var_ho = float((hyy.sum() - (hy[-1] ** 2).sum() / hn) / (hn * hyy.numel())) if hn else math.nan
        w, b = weight_to_conv(sol, spec, in_channels, bias)
        fits.append(LayerFit(name, w.cpu(), b.cpu(), mse_fit, r2_fit, mse_ho, r2_ho, var_ho))
    return fits


def best_layer(fits: Sequence[LayerFit]) -> LayerFit:
    """Highest held-out R^2 (fit R^2 when nothing was held out)."""
    key = "r2_heldout" if any(not math.isnan(f.r2_heldout) for f in fits) else "r2_fit"
    return max(fits, key=lambda f: -math.inf if math.isnan(getattr(f, key)) else getattr(f, key))


def format_table(rows: Sequence[dict], best: str | None = None) -> str:
    """The per-layer table (rows as `LayerFit.row()` gives them) as aligned text."""
    lines = [f"{'layer':<12} {'R2 held-out':>12} {'nMSE held-out':>14} {'MSE held-out':>13} {'R2 fit':>9}"]
    for r in rows:
        mark = "  <- best" if r["layer"] == best else ""
        lines.append(f"{r['layer']:<12} {r['r2_heldout']:>12.4f} {r['nmse_heldout']:>14.4f} {r['mse_heldout']:>13.4g} "
                     f"{r['r2_fit']:>9.4f}{mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- clips -> rows and targets


def is_heldout(clip_id: str, fraction: float) -> bool:
    """A clip's split from a hash of its id: the same answer on every worker and every rerun."""
    return (zlib.crc32(str(clip_id).encode()) % 100_000) / 100_000 < fraction


@dataclass
class LayerSearch:
    """Accumulates the normal equations of every candidate layer from batches of clips.

    `encode(frames)` gives *raw* (de-normalised) VAE latents [B,16,T',h,w] from frames at `vae_size`;
    `features(images)` gives {layer: [B,S,P,C]} from frames at `image_size`. Both are plain callables so
    that tests can plant a known layer; `for_models` wires the real VAE and ReconNet (every candidate's
    tokens from one `ReconNet.activations_at` pass)."""

    encode: Callable[[Tensor], Tensor]
    features: Callable[[Tensor], dict[str, Tensor]]
    channels: dict[str, int]
    spec: StitchSpec
    in_channels: int
    vae_size: int
    image_size: int
    device: torch.device = torch.device("cpu")
    eq: NormalEquations | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "accumulate": 0.0})
    clips: dict[str, int] = field(default_factory=lambda: {"fit": 0, "heldout": 0})

    def __post_init__(self):
        if self.eq is None:
            in_dim = self.in_channels * math.prod(self.spec.kernel)
            self.eq = NormalEquations(in_dim, self.channels, self.device)

    @classmethod
    def for_models(cls, vae, recon, spec: StitchSpec | str, candidates: Sequence[str] | None, vae_size: int,
                   device: torch.device | str = "cpu") -> "LayerSearch":
        from vist3a.video import denormalize_latents, encode_frames

        spec = StitchSpec.parse(spec) if isinstance(spec, str) else spec
        names = list(candidates or recon.cut_points())
        bad = [n for n in names if n not in recon.cut_points()]
        if bad:
            raise ValueError(f"unknown candidate layers {bad}; the network has {recon.cut_points()}")
        dim = recon.cfg.embed_dim
        if spec.out_channels != dim:
            raise ValueError(f"stitch spec has {spec.out_channels} output channels; the network's tokens have {dim}")
        return cls(encode=lambda frames: denormalize_latents(vae, encode_frames(vae, frames)),
                   features=lambda images: recon.activations_at(names, images), channels={n: dim for n in names}, spec=spec,
                   in_channels=vae.config.z_dim, vae_size=vae_size, image_size=recon.cfg.img_size,
                   device=torch.device(device))

    @torch.no_grad()
    def add(self, frames: Tensor, heldout: Sequence[bool]) -> None:
        """frames [B,T,3,H,W] in [0,1] (T = 4k+1), one held-out flag per clip."""
        if len(heldout) != frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} clips but {len(heldout)} held-out flags")
        t0 = time.perf_counter()
        frames = frames.to(self.device, torch.float32)
        raw = self.encode(resize_frames(frames, self.vae_size))
        targets = self.features(resize_frames(frames, self.image_size))
        t1 = time.perf_counter()
        x = conv_patches(upsample_time(raw.float(), frames.shape[1]), self.spec)
        b = frames.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        ys = {}
        for name, y in targets.items():
            if y.shape[1] * y.shape[2] != x.shape[1]:
                raise ValueError(f"layer {name}: {y.shape[1]} views x {y.shape[2]} tokens, but the stitching spec "
                                 f"gives {x.shape[1]} positions per clip")
            ys[name] = y.reshape(b, x.shape[1], y.shape[-1])
        for split, flag in (("fit", False), ("heldout", True)):
            idx = [i for i in range(b) if bool(heldout[i]) == flag]
            if idx:
                self.eq.add(x[idx].flatten(0, 1), {n: y[idx].flatten(0, 1) for n, y in ys.items()}, split)
                self.clips[split] += len(idx)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds["forward"] += t1 - t0
        self.seconds["accumulate"] += time.perf_counter() - t1

    def solve(self, lam: float, bias: bool = True) -> list[LayerFit]:
        return solve_layers(self.eq, self.spec, self.in_channels, lam, bias)
