"""The authors' released stitched decoder (`anysplat_stitched.pth` of hub repo HJGO/VIST3A) -> our
StitchedDecoder, strictly.

The file is a `torch.save` dict of tensors (read with `weights_only=True`):
- "lora": loralib adapters of every Linear and Conv2d of the stitched AnySplat, named by AnySplat
  module path (`encoder.aggregator.frame_blocks.3.attn.qkv.lora_A`), plus each adapted layer's
  bias ("lora_only" export: trained biases that replace the base ones). Linear: A [r, in], B [out, r];
  Conv2d with kernel k and g groups: A [r*k, in*k], B [out/g*k, r*k]; delta = (B @ A).view(W) * alpha/r.
  The DINOv2 blocks up to the cut were deleted from a ModuleList upstream, which renumbers the rest:
  the file's `patch_embed.blocks.0` is block N+1 of the network cut after block N.
- "stitching_layer": the Conv3d's weight and bias.
- "cls_token", "register_tokens" (trained), "mask_token" (trained too, but used by nothing at inference).

alpha is not stored (only the rank shows in the shapes): it comes from the config (the release: r 64,
alpha 32). Planning needs key names and shapes only, so the start-up check runs it against a network
built on the meta device; loading then merges every adapter into the base weights, which leaves a
plain network exactly as fast as the original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vist3a.weights.convert import DECODER_REASON, CheckpointMismatchError, ConversionReport, ignore_reason
from vist3a.weights.locate import WeightsError

FORMAT_NAME = "VIST3A release (anysplat_stitched.pth)"
RELEASE_KEYS = ("lora", "stitching_layer", "cls_token", "register_tokens", "mask_token")
ENCODER_BLOCK = re.compile(r"^aggregator\.patch_embed\.blocks\.(\d+)\.(.+)$")
TOKENS = {"cls_token": "aggregator.patch_embed.cls_token", "register_tokens": "aggregator.patch_embed.register_tokens"}
MASK_TOKEN_REASON = "DINOv2's masked-image-modelling token: the stitched forward never uses it"


def is_release_checkpoint(payload: object) -> bool:
    """True for a dict shaped like the release's file (our own stitch checkpoints carry a 'format' key)."""
    return isinstance(payload, dict) and "lora" in payload and "stitching_layer" in payload and "format" not in payload


def read_checkpoint_file(path: str | Path, what: str = "model.stitch.weights") -> dict:
    """torch.load(weights_only=True) with errors that name the file: missing, truncated, not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        if len(candidates) != 1:
            raise WeightsError(f"{what} {path} is a directory; name the .pth file in it "
                               f"(found: {', '.join(p.name for p in candidates) or 'no .pth/.pt files'})")
        path = candidates[0]
    if not path.is_file():
        raise WeightsError(f"{what}: {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - every way a file fails to load is reported naming it
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        if "Weights only load failed" in str(exc):
            raise WeightsError(f"{what}: {path} holds more than tensors and plain data, refused by "
                               f"torch.load(weights_only=True): {detail}") from None
        raise WeightsError(f"{what}: {path} ({path.stat().st_size} bytes) cannot be read as a torch checkpoint "
                           f"(truncated or not a .pth file?): {detail}") from None
    if not isinstance(payload, dict):
        raise WeightsError(f"{what}: {path} holds a {type(payload).__name__}, not a dict of tensors")
    return payload


@dataclass
class LayerAdapter:
    """One adapted layer of the file, mapped onto our module `name`."""

    name: str
    kind: str                       # "linear" | "conv2d"
    lora_a: str                     # the file's keys
    lora_b: str
    bias: str | None
    rank: int


@dataclass
class ReleasePlan:
    layers: list[LayerAdapter] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)       # our key -> file key
    report: ConversionReport | None = None


def _file_blocks(names: list[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := ENCODER_BLOCK.match(n))}


def plan_release(payload: dict, recon: nn.Module, cut: str, stitch: nn.Module, rank: int, alpha: float,
                 source: str = "<checkpoint>") -> ReleasePlan:
    """Match the file against `recon` (a ReconNet, possibly on the meta device) cut at `cut` and the
    stitching layer `stitch`; every entry is mapped, or ignored with a reason, or reported."""
    depth = recon.cfg.encoder_depth
    report = ConversionReport(source=source, target=f"StitchedDecoder(cut {cut}, LoRA r {rank} alpha {alpha:g})",
                              layout=FORMAT_NAME)
    plan = ReleasePlan(report=report)
    missing_top = [k for k in RELEASE_KEYS if k not in payload]
    if missing_top:
        report.problems.append(f"missing top-level entries {missing_top} (found {sorted(payload)}); expected the "
                               f"release's {', '.join(RELEASE_KEYS)}")
        return plan
    for key in sorted(set(payload) - set(RELEASE_KEYS)):
        report.unexpected[key] = ()
    lora = payload["lora"]
    if not isinstance(lora, dict) or not all(isinstance(v, torch.Tensor) for v in lora.values()):
        report.problems.append("'lora' is not a dict of tensors")
        return plan
    shapes = {k: tuple(v.shape) for k, v in lora.items()}
    for v in lora.values():
        report.source_dtypes[v.dtype] += 1

    # The stitching layer and the tokens.
    conv = stitch.conv
    for part in ("weight", "bias"):
        have = payload["stitching_layer"].get(part) if isinstance(payload["stitching_layer"], dict) else None
        want = tuple(getattr(conv, part).shape)
        if have is None:
            report.missing[f"stitch.conv.{part}"] = want
        elif tuple(have.shape) != want:
            report.misshaped[f"stitch.conv.{part}"] = (tuple(have.shape), want)
            report.problems.append(f"the stitching layer is {list(have.shape)}, model.stitch.spec builds {list(want)}: "
                                   "a .pth made for another stitching spec")
        else:
            report.loaded.append(f"stitch.conv.{part}")
    own = dict(recon.named_parameters())
    for file_key, ours in TOKENS.items():
        have, want = tuple(payload[file_key].shape), tuple(own[ours].shape)
        if have != want:
            report.misshaped[ours] = (have, want)
        else:
            plan.tokens[ours] = file_key
            report.loaded.append(ours)
    report.ignored["mask_token"] = MASK_TOKEN_REASON

    # Which cut was the file made at? The renumbered DINO blocks after it tell.
    k = recon.cut_index(cut) + 1
    names = {key: key.removeprefix("encoder.") for key in lora if key.startswith("encoder.")}
    blocks = _file_blocks(list(names.values()))
    if blocks:
        file_cut = depth - 2 - max(blocks)
        if file_cut != k - 1:
            report.problems.append(
                f"the file adapts {max(blocks) + 1} DINO blocks after its cut, i.e. it was made at cut blocks.{file_cut} "
                f"(upstream enc_blocks_{file_cut + 1}); the decoder is cut at {cut}: set model.stitch.cut=blocks.{file_cut}")
            return plan

    modules = {n: m for n, m in recon.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    layers: dict[str, dict[str, str]] = {}
    for key in lora:
        if key not in names:
            if key.startswith("decoder."):
                report.ignored[key] = DECODER_REASON
            else:
                report.unexpected[key] = shapes[key]
            continue
        name = names[key]
        reason = ignore_reason(name, tuple(recon.cfg.heads))
        if reason is not None:
            report.ignored[key] = reason
            continue
        layer, _, part = name.rpartition(".")
        if part not in ("lora_A", "lora_B", "bias"):
            report.unexpected[key] = shapes[key]
            continue
        m = ENCODER_BLOCK.match(layer + ".")
        if m:  # renumbered: the file's block j is our block j + k
            layer = f"aggregator.patch_embed.blocks.{int(m.group(1)) + k}.{m.group(2)}".rstrip(".")
        layers.setdefault(layer, {})[part] = key

    for layer, parts in sorted(layers.items()):
        module = modules.get(layer)
        if module is None or "lora_A" not in parts or "lora_B" not in parts:
            for key in parts.values():
                report.unexpected[key] = shapes[key]
            if module is None:
                report.problems.append(f"{parts.get('lora_A', next(iter(parts.values())))}: our network has no "
                                       f"Linear/Conv2d {layer}")
            continue
        a, b = shapes[parts["lora_A"]], shapes[parts["lora_B"]]
        w = tuple(module.weight.shape)
        if isinstance(module, nn.Linear):
            r = a[0]
            want_a, want_b = (r, w[1]), (w[0], r)
            kind = "linear"
        else:
            ks = module.kernel_size[0]
            r = a[0] // ks if a[0] % ks == 0 else -1
            want_a, want_b = (r * ks, module.in_channels * ks), (module.out_channels // module.groups * ks, r * ks)
            kind = "conv2d"
        if (a, b) != (want_a, want_b) or r <= 0:
            report.misshaped[layer] = ((a, b), (want_a, want_b))
            continue
        if r != rank:
            report.misshaped[layer + " (LoRA rank)"] = ((r,), (rank,))
            continue
        bias = parts.get("bias")
        if bias is not None:
            if module.bias is None:
                report.unexpected[bias] = shapes[bias]
                continue
            if shapes[bias] != tuple(module.bias.shape):
                report.misshaped[layer + ".bias"] = (shapes[bias], tuple(module.bias.shape))
                continue
        plan.layers.append(LayerAdapter(layer, kind, parts["lora_A"], parts["lora_B"], bias, r))
        report.loaded += [layer + ".weight"] + ([layer + ".bias"] if bias else [])

    if any(k.endswith("(LoRA rank)") for k in report.misshaped):
        report.problems.append(f"LoRA rank in the file differs from model.stitch.lora_rank {rank}")
    if plan.layers:
        n_conv = sum(lay.kind == "conv2d" for lay in plan.layers)
        report.adapted["LoRA"] = (f"{len(plan.layers)} layers ({len(plan.layers) - n_conv} Linear, {n_conv} Conv2d) "
                                  f"merged: W + (B @ A) * {alpha:g}/{rank}; "
                                  f"{sum(lay.bias is not None for lay in plan.layers)} biases replaced")
    adapted = {lay.name for lay in plan.layers}
    after_cut = [n for n in modules if not n.startswith("aggregator.patch_embed.") or
                 ((m := ENCODER_BLOCK.match(n)) and int(m.group(1)) >= k)]
    bare = [n for n in after_cut if n not in adapted]
    if bare:
        report.notes.append(f"{len(bare)} Linear/Conv2d layers after the cut have no adapter in the file "
                            f"(kept as released): {', '.join(bare[:4])}{', ...' if len(bare) > 4 else ''}")
    return plan


def lora_delta(a: torch.Tensor, b: torch.Tensor, weight_shape: torch.Size, scale: float) -> torch.Tensor:
    """loralib's weight update for Linear and Conv2d alike: (B @ A) viewed as the weight, times alpha/r."""
    return (b.float() @ a.float()).view(weight_shape) * scale


@torch.no_grad()
def load_release_stitch(decoder: nn.Module, path: str | Path, rank: int, alpha: float,
                        payload: dict | None = None) -> ConversionReport:
    """Load the release's stitched-decoder file into `decoder` (a StitchedDecoder built from the same
    config): stitching layer, cls/register tokens, and every LoRA merged (its bias applied).
    `payload` is the file's content when the caller has read it already. Raises
    CheckpointMismatchError with the full report when anything does not fit."""
    payload = read_checkpoint_file(path) if payload is None else payload
    plan = plan_release(payload, decoder.recon, decoder.cut, decoder.stitch, rank, alpha, source=str(path))
    if not plan.report.ok:
        raise CheckpointMismatchError(str(plan.report))
    conv = decoder.stitch.conv
    conv.weight.copy_(payload["stitching_layer"]["weight"].to(conv.weight.dtype))
    conv.bias.copy_(payload["stitching_layer"]["bias"].to(conv.bias.dtype))
    params = dict(decoder.recon.named_parameters())
    for ours, file_key in plan.tokens.items():
        params[ours].copy_(payload[file_key].to(params[ours].dtype))
    lora = payload["lora"]
    scale = alpha / rank
    for lay in plan.layers:
        module = decoder.recon.get_submodule(lay.name)
        w = module.weight
        w.copy_((w.float() + lora_delta(lora[lay.lora_a], lora[lay.lora_b], w.shape, scale)).to(w.dtype))
        if lay.bias is not None:
            module.bias.copy_(lora[lay.bias].to(module.bias.dtype))
    return plan.report
