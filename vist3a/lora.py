"""LoRA in one place: which layers get adapters, adding, exporting, merging, saving and reading them.

Two networks carry LoRA, both through peft's low-level API (adapters injected in place, so each
network keeps its class and its own forward):
- the reconstruction network after the stitching cut (stitched fine-tuning, `vist3a.stitching`):
  the stitched network never runs the patch embedding or the encoder blocks up to the cut, so only
  the layers after it get adapters (the paper: every Linear and Conv2d of the stitched network);
  stitch checkpoints carry them (`vist3a.stitching.checkpoint`);
- the Wan transformer (reward fine-tuning, `vist3a.train.align`): adapters on its attention
  projections, saved as adapter directories that generation loads with `model.video.lora`.

A LoRA config is plain data (the LoraConfig arguments), so checkpoints and directories carry it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from torch import Tensor, nn

from vist3a.ids import seeded
from vist3a.io import join, read_bytes, read_text, write_bytes, write_text

if TYPE_CHECKING:
    from vist3a.config import AlignJobConfig, StorageConfig

#: the config keys an adapter directory or stitch checkpoint carries
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "bias", "target_modules")


def lora_config(rank: int, alpha: float, targets: list[str]) -> dict:
    """The LoraConfig arguments, as plain data that checkpoints carry."""
    return {"r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(targets)}


# ----------------------------------------------------------------------------- adding, exporting, merging


def add_lora(model: nn.Module, config: dict, seed: int | None = None) -> nn.Module:
    """Inject adapters (B initialised to zero, so the model is unchanged) and freeze everything else.
    With `seed`, A is drawn from it: every worker of a run starts from the same adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    if seed is None:
        model = inject_adapter_in_model(LoraConfig(**config), model)
    else:
        with seeded(seed):
            model = inject_adapter_in_model(LoraConfig(**config), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights (peft's state-dict keys), detached, on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put adapter weights into the adapters `add_lora` injected; refuses weights that do not fit."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"LoRA state does not fit the network: missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")


def _lora_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (the frozen original, i.e. the distillation teacher) inside the block."""
    layers = [m for _, m in _lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and put the plain layers back (inference: no LoRA cost,
    the model's state-dict keys are the original ones again)."""
    for name, m in _lora_layers(model):
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    return model


def apply_lora(model: nn.Module, config: dict, state: dict[str, Tensor], merge: bool = True) -> nn.Module:
    """Add adapters of `config`, load `state` into them and, with `merge`, fold them into the weights; a
    merged model gets its parameters' requires_grad flags back (the adapters' freezing is undone)."""
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    add_lora(model, config)
    load_lora_state(model, state)
    if merge:
        merge_lora(model)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, False))
    return model


# ----------------------------------------------------------------------------- the reconstruction network

ENCODER_BLOCKS = "aggregator.patch_embed.blocks."


def lora_targets(recon: nn.Module, cut: str, conv: bool = True) -> list[str]:
    """Full names of the Linear (and, with conv, Conv2d) modules of a ReconNet that run after `cut`."""
    n = recon.cut_index(cut)
    kinds = (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)
    names = []
    for name, module in recon.named_modules():
        if type(module) not in kinds:  # exact types: ConvTranspose2d etc. have no LoRA layer
            continue
        if name.startswith("aggregator.patch_embed."):
            if not name.startswith(ENCODER_BLOCKS) or int(name[len(ENCODER_BLOCKS):].split(".")[0]) <= n:
                continue  # the patch embedding and the blocks up to the cut are replaced by the stitching layer
        names.append(name)
    return names


def lora_config_dict(recon: nn.Module, cut: str, rank: int, alpha: float, conv: bool = True) -> dict:
    """The LoraConfig of stitched fine-tuning: every layer after the cut."""
    return lora_config(rank, alpha, lora_targets(recon, cut, conv))


# ----------------------------------------------------------------------------- the video transformer

LORA_FORMAT = "vist3a-video-lora/1"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def video_lora_config(job: AlignJobConfig) -> dict:
    """The LoraConfig of reward fine-tuning (align.lora_rank, lora_alpha, lora_targets)."""
    return lora_config(job.lora_rank, job.lora_alpha, job.lora_targets)


def add_video_lora(transformer: nn.Module, config: dict, seed: int) -> nn.Module:
    """Inject the adapters (A seeded, B zero) and freeze every other transformer weight. The adapters are
    kept in float32 even on a bf16/fp16 transformer (peft casts their inputs): AdamW updates of 1e-4
    vanish in bf16."""
    add_lora(transformer, config, seed)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return transformer


def save_lora_dir(uri: str, config: dict, state: dict[str, Tensor], storage: StorageConfig | None = None,
                  meta: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's file names) at a directory or s3:// prefix;
    the weights are written first, so a reader that finds the config finds complete weights."""
    from safetensors.torch import save

    write_bytes(join(uri, ADAPTER_WEIGHTS), save({k: v.detach().cpu().contiguous() for k, v in state.items()}), storage)
    payload = {**{k: config[k] for k in LORA_KEYS}, "peft_type": "LORA", "format": LORA_FORMAT, "vist3a": meta or {}}
    write_text(join(uri, ADAPTER_CONFIG), json.dumps(payload, indent=1), storage)


def read_lora_dir(uri: str, storage: StorageConfig | None = None) -> tuple[dict, dict[str, Tensor], dict]:
    """-> (LoraConfig arguments, adapter weights, meta) of a directory written by `save_lora_dir`."""
    from safetensors.torch import load

    try:
        payload = json.loads(read_text(join(uri, ADAPTER_CONFIG), storage))
    except FileNotFoundError:
        raise FileNotFoundError(f"no video LoRA at {uri} (missing {ADAPTER_CONFIG}); point model.video.lora at the "
                                f"lora_ema/ or lora/ directory that pipelines.align wrote") from None
    if payload.get("format") != LORA_FORMAT:
        raise ValueError(f"{uri}: not a vist3a video LoRA ({LORA_FORMAT}), format {payload.get('format')!r}")
    return ({k: payload[k] for k in LORA_KEYS}, load(read_bytes(join(uri, ADAPTER_WEIGHTS), storage)),
            payload.get("vist3a", {}))


def load_video_lora(transformer: nn.Module, spec: str, storage: StorageConfig | None = None,
                    merge: bool = True) -> dict:
    """Put an aligned LoRA (local directory, s3:// prefix or hub id) into the Wan transformer; with `merge`
    fold it into the base weights (inference: no adapter cost, plain layers again). Returns its meta."""
    from vist3a.weights.locate import require

    path = require(spec, storage, what="model.video.lora")
    config, state, meta = read_lora_dir(str(path))
    apply_lora(transformer, config, state, merge)
    return meta

