"""Stitch checkpoints: the stitching layer (+ the LoRA adapters of the network after the cut) in one file.

The layer search writes one per candidate layer (no LoRA); stitched fine-tuning writes the final
one. `load_stitch_checkpoint` puts either into a `StitchedDecoder` built from the same config
(`model.stitch.weights` in the generator). The file is a `torch.save` dict of tensors and plain
data, read back with `weights_only=True`.
"""

from __future__ import annotations

import io

import torch

from vist3a.io import read_bytes, write_bytes

FORMAT = "vist3a-stitch/1"


def stitch_checkpoint(stitch, cut: str, lora_config: dict | None = None, lora: dict | None = None,
                      meta: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "spec": _spec_text(stitch.spec),
        "cut": cut,
        "in_channels": int(stitch.in_channels),
        "stitch": {k: v.detach().cpu().float() for k, v in stitch.state_dict().items()},
        "lora_config": lora_config,
        "lora": lora,
        "meta": dict(meta or {}),
    }


def _spec_text(spec) -> str:
    fmt = lambda t: "x".join(str(v) for v in t)  # noqa: E731
    return (f"conv3d_k{fmt(spec.kernel)}_o{spec.out_channels}_s{fmt(spec.stride)}_p{fmt(spec.padding)}"
            f"_d{fmt(spec.dilation)}")


def save_stitch_checkpoint(uri: str, payload: dict, storage=None) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(uri, buf.getvalue(), storage)


def read_stitch_checkpoint(uri: str, storage=None) -> dict:
    try:
        data = read_bytes(uri, storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"stitch checkpoint not found: {uri}") from None
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{uri} is not a stitch checkpoint ({FORMAT})")
    return payload


def check_compatible(payload: dict, stitch, cut: str, source: str = "checkpoint") -> None:
    """Refuse, naming the config key to change, a checkpoint made for another cut or layer shape."""
    from vist3a.stitching.spec import StitchSpec

    if payload["cut"] != cut:
        raise ValueError(f"{source} was made at cut {payload['cut']!r} but the decoder is cut at {cut!r}; "
                         f"set model.stitch.cut={payload['cut']}")
    if StitchSpec.parse(payload["spec"]) != stitch.spec or payload["in_channels"] != stitch.in_channels:
        raise ValueError(f"{source} holds a stitching layer {payload['spec']} ({payload['in_channels']} input channels), "
                         f"the decoder's is {_spec_text(stitch.spec)} ({stitch.in_channels}); set model.stitch.spec")


def load_stitch_checkpoint(decoder, uri: str, storage=None, merge: bool = True) -> dict:
    """Load a stitch checkpoint into `decoder` (a StitchedDecoder); returns the checkpoint's meta.

    LoRA adapters, when present, are injected into `decoder.recon` and (merge=True) folded into its
    weights, which leaves a plain network as fast as the original."""
    from vist3a.lora import apply_lora

    payload = read_stitch_checkpoint(uri, storage)
    check_compatible(payload, decoder.stitch, decoder.cut, source=uri)
    device = next(decoder.stitch.parameters()).device
    decoder.stitch.load_state_dict({k: v.to(device) for k, v in payload["stitch"].items()})
    if payload.get("lora"):
        apply_lora(decoder.recon, payload["lora_config"], payload["lora"], merge)
    return payload.get("meta", {})
