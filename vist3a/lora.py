"""LoRA in one place: which layers get adapters, adding, exporting, merging, saving and reading them.

Two networks carry LoRA, both through peft's low-level API (adapters injected in place, so each
network keeps its class and its own forward):
- the reconstruction network after the stitching cut (stitched fine-tuning, `vist3a.stitching`):
  the stitched network never runs the patch embedding or the encoder blocks up to the cut, so only
  the layers after it get adapters (the paper: every Linear and Conv2d of the stitched network);
  stitch checkpoints carry them (`vist3a.stitching.checkpoint`);
- the Wan transformer (reward fine-tuning, `vist3a.train.align`): adapters on its attention
  projections, saved as standard peft adapter directories (what `PeftModel.save_pretrained` writes
  and `PeftModel.from_pretrained` reads), which generation loads with `model.video.lora` — the
  release's `vist3a_1.3b_lora_ema/` among them.
The release's stitched decoder carries loralib-style adapters instead: `vist3a.weights.release`.

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

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "vist3a_meta.json"
#: PeftModel.save_pretrained prefixes every key with the wrapper's path to the base model
PEFT_PREFIX = "base_model.model."


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


def same_lora_config(a: dict, b: dict) -> bool:
    """Whether two LoraConfig argument dicts describe the same adapters (target order aside)."""
    def key(c: dict) -> tuple:
        return (int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout", 0.0)), c.get("bias", "none"),
                frozenset(c["target_modules"]))

    return key(a) == key(b)


def _peft_config_dict(config: dict) -> dict:
    """Our LoraConfig arguments -> the adapter_config.json peft writes (every field, sets as lists)."""
    from peft import LoraConfig

    out = LoraConfig(**config).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}


def save_lora_dir(uri: str, config: dict, state: dict[str, Tensor], storage: StorageConfig | None = None,
                  meta: dict | None = None) -> None:
    """A standard peft adapter directory (what `PeftModel.save_pretrained` writes: adapter_config.json,
    adapter_model.safetensors with `base_model.model.<module>.lora_A.weight` keys) at a directory or
    s3:// prefix, plus vist3a_meta.json. Weights first, config last: a reader that finds the config
    finds complete weights."""
    from safetensors.torch import save

    weights = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_bytes(join(uri, ADAPTER_WEIGHTS), save(weights), storage)
    write_text(join(uri, ADAPTER_META), json.dumps(meta or {}, indent=1), storage)
    write_text(join(uri, ADAPTER_CONFIG), json.dumps(_peft_config_dict(config), indent=1), storage)


def read_lora_dir(uri: str, storage: StorageConfig | None = None) -> tuple[dict, dict[str, Tensor], dict]:
    """-> (LoraConfig arguments, adapter weights keyed as peft's in-place state dict, meta) of a peft
    adapter directory: one peft's `save_pretrained` wrote (e.g. the release's vist3a_1.3b_lora_ema/) or
    `save_lora_dir`."""
    from dataclasses import fields

    from peft import LoraConfig
    from safetensors.torch import load

    where = join(uri, ADAPTER_CONFIG)
    try:
        payload = json.loads(read_text(where, storage))
    except FileNotFoundError:
        raise FileNotFoundError(f"model.video.lora: no peft adapter at {uri} (missing {ADAPTER_CONFIG}); point it at "
                                "a directory peft's save_pretrained wrote, e.g. the release's vist3a_1.3b_lora_ema/ "
                                "or pipelines.align's lora_ema/") from None
    except ValueError as exc:
        raise ValueError(f"model.video.lora: {where} is not JSON: {exc}") from None
    if payload.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"model.video.lora: {where} is a {payload['peft_type']} adapter; only LoRA is supported")
    if payload.get("use_dora"):
        raise ValueError(f"model.video.lora: {where} is a DoRA adapter, which cannot be merged like LoRA")
    known = {f.name for f in fields(LoraConfig)}
    config = {k: v for k, v in payload.items() if k in known and k not in ("peft_type", "inference_mode")}
    config.pop("format", None)
    try:
        data = read_bytes(join(uri, ADAPTER_WEIGHTS), storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.video.lora: {uri} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}") from None
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load(data).items()}
    try:
        meta = json.loads(read_text(join(uri, ADAPTER_META), storage))
    except FileNotFoundError:
        meta = payload.get("vist3a", {})
    return config, state, meta


def check_video_lora(transformer: nn.Module, config: dict, state: dict[str, Tensor], source: str) -> list[str]:
    """Why an adapter does not fit `transformer` (which may live on the meta device): its target modules
    absent, or its A/B shapes those of another model (e.g. a 14B adapter on the 1.3B transformer)."""
    modules = dict(transformer.named_modules())
    problems, wrong = [], []
    layers: dict[str, dict[str, tuple]] = {}
    for key, t in state.items():
        layer, _, part = key.rpartition(".lora_")
        if not part or part.split(".")[0] not in ("A", "B"):
            problems.append(f"{source}: unexpected tensor {key} (not lora_A/lora_B)")
            continue
        layers.setdefault(layer, {})[part.split(".")[0]] = tuple(t.shape)
    absent = sorted(layer for layer in layers if layer not in modules)
    if absent:
        problems.append(f"{source}: adapts {len(absent)} modules the Wan transformer does not have "
                        f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}); its target_modules are "
                        f"{config.get('target_modules')}: an adapter for another model")
    for layer, shapes in sorted(layers.items()):
        m = modules.get(layer)
        if m is None or not hasattr(m, "in_features"):
            continue
        r = shapes.get("A", (0,))[0]
        want = {"A": (r, m.in_features), "B": (m.out_features, r)}
        if any(shapes.get(p) != want[p] for p in ("A", "B")):
            wrong.append(f"{layer}: lora_A {list(shapes.get('A', ()))}, lora_B {list(shapes.get('B', ()))}; the "
                         f"transformer's layer is {m.in_features} -> {m.out_features} (expects lora_A {list(want['A'])})")
    if wrong:
        problems.append(f"{source}: {len(wrong)} adapters do not fit the configured transformer (an adapter for "
                        f"another model size?): " + "; ".join(wrong[:2]) + ("; ..." if len(wrong) > 2 else ""))
    if not layers:
        problems.append(f"{source}: holds no LoRA weights")
    return problems


def load_video_lora(transformer: nn.Module, spec: str, storage: StorageConfig | None = None,
                    merge: bool = True) -> dict:
    """Put a peft LoRA adapter (local directory, s3:// prefix or hub reference) into the Wan transformer;
    with `merge` fold it into the base weights (inference: no adapter cost, plain layers again).
    Returns its meta."""
    from vist3a.weights.locate import require

    path = require(spec, storage, what="model.video.lora")
    config, state, meta = read_lora_dir(str(path))
    problems = check_video_lora(transformer, config, state, str(path))
    if problems:
        raise ValueError("model.video.lora does not fit: " + "\n".join(problems))
    apply_lora(transformer, config, state, merge)
    return meta
