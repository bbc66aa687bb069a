"""Released checkpoints -> our modules, with strict checking.

A conversion is planned on key names and shapes alone (a safetensors header or a memory-mapped
.pt is enough), then applied. Every released key is mapped onto one of our parameters or ignored
with a stated reason; every shape is checked; anything else is reported, never silently dropped.

Released layouts handled:
- VGGT-1B (`facebook/VGGT-1B`, model.safetensors or model.pt): our ReconNet uses the same names.
  Ignored: `track_head.*` (point tracking) and `aggregator.patch_embed.mask_token` (DINOv2 pre-training).
- AnySplat (`lhjiang/anysplat`, model.safetensors): VGGT names under `encoder.`, plus
  `encoder.gaussian_param_head.*`. Ignored: `encoder.distill_*` (its training-time teacher copy).
- Our own ReconNet state dicts (same names as VGGT).
The DINOv2 position grid is stored at 37x37 (518 px); a network built for another input size gets
it resized once here, exactly as the released code resizes it on every forward (bicubic,
antialiased, in float32).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vist3a.weights.locate import WeightsError

POS_EMBED = "aggregator.patch_embed.pos_embed"
RECON_HEADS = {"camera": "camera_head", "depth": "depth_head", "points": "point_head", "gaussians": "gaussian_param_head"}
#: (key prefix, reason) for released keys we deliberately do not load, after layout prefixes are removed.
RECON_IGNORED = (
    ("track_head.", "VGGT's point-tracking head: not used for text-to-3D, vist3a does not build it"),
    ("aggregator.patch_embed.mask_token", "DINOv2's masked-image-modelling token: used only in DINOv2 pre-training"),
    ("distill_", "AnySplat's frozen VGGT teacher copy: used only by its distillation training"),
)
CHECKPOINT_NAMES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")
DECODER_REASON = "AnySplat's rasterising decoder: vist3a renders with its own renderer"


def ignore_reason(name: str, heads: tuple[str, ...]) -> str | None:
    """Why a released key (layout prefix removed) is deliberately not loaded, or None when it should be."""
    reason = next((why for p, why in RECON_IGNORED if name.startswith(p)), None)
    if reason is None and any(name.startswith(RECON_HEADS[h] + ".") for h in RECON_HEADS if h not in heads):
        reason = f"head not built by this config (model.recon.heads = {list(heads)})"
    return reason


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the network; the message is the full ConversionReport."""


@dataclass
class ConversionReport:
    """What a conversion did and what did not fit. `ok` means strictly loadable."""

    source: str
    target: str
    layout: str = "unknown"
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # released key -> reason
    adapted: dict[str, str] = field(default_factory=dict)  # our key -> what was done to it
    missing: dict[str, tuple] = field(default_factory=dict)  # our key -> our shape
    unexpected: dict[str, tuple] = field(default_factory=dict)  # released key -> its shape
    misshaped: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # our key -> (released, ours)
    source_dtypes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # anything else (unreadable layout, ...)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a mismatch

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped or self.problems)

    def __str__(self) -> str:
        return self.format()

    def format(self, limit: int = 12) -> str:
        dtypes = ", ".join(f"{n} {str(d).replace('torch.', '')}" for d, n in self.source_dtypes.most_common())
        lines = [f"checkpoint {self.source}",
                 f"  layout {self.layout} -> {self.target}: {len(self.loaded)} tensors mapped"
                 + (f" (checkpoint dtypes: {dtypes})" if dtypes else "")]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        for key, how in self.adapted.items():
            lines.append(f"  adapted {key}: {how}")
        for reason, keys in _group_by_reason(self.ignored).items():
            lines.append(f"  ignored {_summarise_keys(keys)}: {reason}")
        lines += [f"  note: {n}" for n in self.notes]

        def section(title: str, rows: list[str]) -> None:
            if rows:
                lines.append(f"  {title}: {len(rows)}")
                lines.extend(f"    {r}" for r in rows[:limit])
                if len(rows) > limit:
                    lines.append(f"    ... and {len(rows) - limit} more")

        section("MISSING (the network has them, the checkpoint does not)",
                [f"{k} {list(s)}" for k, s in self.missing.items()])
        section("UNEXPECTED (in the checkpoint, neither mapped nor ignored)",
                [f"{k} {list(s)}" for k, s in self.unexpected.items()])
        section("MISSHAPED (checkpoint shape vs network shape)",
                [f"{k}: {list(a)} vs {list(b)}" for k, (a, b) in self.misshaped.items()])
        lines.append("  result: " + ("OK, loads strictly" if self.ok else "does NOT fit this network"))
        return "\n".join(lines)


def _group_by_reason(ignored: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key, reason in ignored.items():
        groups.setdefault(reason, []).append(key)
    return groups


def _summarise_keys(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    prefix = keys[0].split(".")[0]
    if all(k.split(".")[0] == prefix for k in keys):
        return f"{prefix}.* ({len(keys)} keys)"
    return f"{len(keys)} keys ({keys[0]}, ...)"


# ----------------------------------------------------------------------------- reading checkpoints


class Checkpoint:
    """Lazy view of a checkpoint file: key -> shape and dtype without reading data; tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            self._st = safe_open(str(self.path), framework="pt", device="cpu")
            self._tensors = None
            slices = {k: self._st.get_slice(k) for k in self._st.keys()}  # noqa: SIM118 - safe_open is no dict
            self.shapes = {k: tuple(sl.get_shape()) for k, sl in slices.items()}
            self.dtypes = {k: _st_dtype(sl.get_dtype()) for k, sl in slices.items()}
        else:
            self._st = None
            self._tensors = _unwrap(_torch_load(self.path), self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: v.dtype for k, v in self._tensors.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._tensors[key]


def _st_dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table.get(name, torch.float32)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or one nested under 'state_dict' / 'model' (training checkpoints)."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return dict(obj)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the one checkpoint file in a directory (model.safetensors preferred)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsError(f"checkpoint not found: {path}")
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for ext in ("*.safetensors", "*.pt", "*.pth") for p in path.glob(ext))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no checkpoint files"
    raise WeightsError(f"no checkpoint in {path}: expected one of {', '.join(CHECKPOINT_NAMES)} (found: {found})")


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """our key -> (released key, adapt function or None), plus the report."""

    entries: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]
    report: ConversionReport


def detect_recon_layout(keys: list[str]) -> tuple[str, str]:
    """(layout name, prefix to strip) from the key names."""
    if any(k.startswith("encoder.aggregator.") for k in keys):
        return "AnySplat", "encoder."
    if any(k.startswith("model.encoder.aggregator.") for k in keys):
        return "AnySplat (training checkpoint)", "model.encoder."
    if any(k.startswith("aggregator.") for k in keys):
        return "VGGT", ""
    if any(k.startswith("module.aggregator.") for k in keys):
        return "VGGT (DDP)", "module."
    raise CheckpointMismatchError("unrecognised checkpoint layout: no aggregator.* keys (first keys: "
                                  + ", ".join(keys[:5]) + ")")


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1+M*M, C] -> [1, 1+grid*grid, C]: the patch grid resized bicubically with antialiasing
    in float32 (as DINOv2/VGGT do at run time), the cls entry kept."""
    m = math.isqrt(pos.shape[1] - 1)
    cls, patches = pos[:, :1], pos[:, 1:]
    img = patches.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([cls.float(), img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def plan_recon(shapes: Mapping[str, tuple], dtypes: Mapping[str, torch.dtype] | None,
               target_shapes: Mapping[str, tuple], heads: tuple[str, ...], source: str = "<state dict>",
               target: str = "ReconNet") -> Plan:
    """Match released keys/shapes against our ReconNet's state-dict keys/shapes."""
    report = ConversionReport(source=source, target=target)
    keys = list(shapes)
    try:
        report.layout, prefix = detect_recon_layout(keys)
    except CheckpointMismatchError as exc:
        report.problems.append(str(exc))
        return Plan({}, report)
    entries: dict[str, tuple[str, Callable | None]] = {}
    for key in keys:
        if not key.startswith(prefix):
            rest = key.removeprefix("model.")
            if prefix.endswith("encoder.") and rest.startswith("decoder."):
                report.ignored[key] = DECODER_REASON
            else:
                report.unexpected[key] = tuple(shapes[key])
            continue
        name = key[len(prefix):]
        reason = ignore_reason(name, tuple(heads))
        if reason is not None:
            report.ignored[key] = reason
            continue
        if name not in target_shapes:
            report.unexpected[key] = tuple(shapes[key])
            continue
        have, want = tuple(shapes[key]), tuple(target_shapes[name])
        adapt = None
        if have != want and name == POS_EMBED and _square_grid(have) and _square_grid(want) and have[2] == want[2]:
            src, dst = math.isqrt(have[1] - 1), math.isqrt(want[1] - 1)
            adapt = partial(resize_pos_embed, grid=dst)
            report.adapted[name] = f"position grid {src}x{src} -> {dst}x{dst} (bicubic, antialiased, float32)"
        elif have != want:
            report.misshaped[name] = (have, want)
            continue
        entries[name] = (key, adapt)
        report.loaded.append(name)
        if dtypes is not None:
            report.source_dtypes[dtypes[key]] += 1
    for name, shape in target_shapes.items():
        if name not in entries and name not in report.misshaped:
            report.missing[name] = tuple(shape)
    return Plan(entries, report)


def _square_grid(shape: tuple) -> bool:
    return len(shape) == 3 and shape[0] == 1 and math.isqrt(shape[1] - 1) ** 2 == shape[1] - 1


def compare_state(shapes: Mapping[str, tuple], module: nn.Module, source: str, target: str,
                  layout: str = "diffusers/transformers") -> ConversionReport:
    """Identity mapping (a diffusers/transformers checkpoint for its own class): keys and shapes
    must match exactly. Tied parameters (one tensor under several names) need only one name."""
    report = ConversionReport(source=source, target=target, layout=layout)
    own = module.state_dict(keep_vars=True)
    ties: dict[int, list[str]] = {}
    for name, t in own.items():
        ties.setdefault(id(t), []).append(name)
    for key, shape in shapes.items():
        if key not in own:
            report.unexpected[key] = tuple(shape)
        elif tuple(own[key].shape) != tuple(shape):
            report.misshaped[key] = (tuple(shape), tuple(own[key].shape))
        else:
            report.loaded.append(key)
    for names in ties.values():
        if not any(n in shapes for n in names):
            for n in names:
                report.missing[n] = tuple(own[n].shape)
    return report


# ----------------------------------------------------------------------------- loading the recon network


def recon_target_shapes(cfg) -> dict[str, tuple]:
    """Our ReconNet's state-dict shapes for a ReconConfig, without allocating any weights."""
    from vist3a.recon import ReconNet

    with torch.device("meta"):
        net = ReconNet(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def plan_recon_checkpoint(cfg, checkpoint: Checkpoint) -> Plan:
    return plan_recon(checkpoint.shapes, checkpoint.dtypes, recon_target_shapes(cfg), tuple(cfg.heads),
                      source=str(checkpoint.path), target=_describe_recon(cfg))


def _describe_recon(cfg) -> str:
    return (f"ReconNet(img_size {cfg.img_size}, patch {cfg.patch_size}, width {cfg.embed_dim}, "
            f"heads {', '.join(cfg.heads)})")


def load_recon_state(net: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> ConversionReport:
    """Load a released (VGGT / AnySplat / ours) state dict held in memory into an existing ReconNet."""
    own = net.state_dict()
    plan = plan_recon({k: tuple(v.shape) for k, v in state.items()}, {k: v.dtype for k, v in state.items()},
                      {k: tuple(v.shape) for k, v in own.items()}, tuple(net.cfg.heads), target=_describe_recon(net.cfg))
    if strict and not plan.report.ok:
        raise CheckpointMismatchError(str(plan.report))
    _copy_planned(own, plan, state.__getitem__)
    return plan.report


def _copy_planned(own: Mapping[str, torch.Tensor], plan: Plan, get: Callable[[str], torch.Tensor]) -> None:
    with torch.no_grad():
        for name, (key, adapt) in plan.entries.items():
            tensor = get(key)
            own[name].copy_(adapt(tensor) if adapt is not None else tensor)


def load_pretrained_recon(cfg, path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, strict: bool = True):
    """ReconConfig + checkpoint file/directory -> (ReconNet in eval mode, ConversionReport).

    The network is built on the meta device and materialised empty on `device` in `dtype`, so no
    time goes into random initialisation of weights that are overwritten anyway; the few
    non-persistent buffers (ImageNet mean/std) come from a small CPU-built ReconNet."""
    from vist3a.recon import ReconNet

    checkpoint = Checkpoint(find_checkpoint(path))
    plan = plan_recon_checkpoint(cfg, checkpoint)
    if strict and not plan.report.ok:
        raise CheckpointMismatchError(str(plan.report))
    with torch.device("meta"):
        net = ReconNet(cfg)
    net = net.to(dtype=dtype).to_empty(device=device)
    _restore_nonpersistent_buffers(net, dtype)
    _copy_planned(net.state_dict(), plan, checkpoint.tensor)
    return net.eval(), plan.report


def _restore_nonpersistent_buffers(net: nn.Module, dtype: torch.dtype) -> None:
    """to_empty leaves buffers that are not in the state dict uninitialised; they depend on no
    config value, so a default-config ReconNet (built in milliseconds) supplies them."""
    from vist3a.config import ReconConfig
    from vist3a.recon import ReconNet

    persistent = set(net.state_dict())
    wanted = {n: b for n, b in net.named_buffers() if n not in persistent}
    if not wanted:
        return
    reference = dict(ReconNet(ReconConfig()).named_buffers())
    with torch.no_grad():
        for name, buf in wanted.items():
            ref = reference.get(name)
            if ref is None or ref.shape != buf.shape:
                raise RuntimeError(f"cannot restore non-persistent buffer {name} {tuple(buf.shape)}: "
                                   "it depends on the config; teach load_pretrained_recon about it")
            buf.copy_(ref.to(buf.dtype) if buf.is_floating_point() else ref)
