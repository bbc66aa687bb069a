"""LoRA (peft) on the part of the reconstruction network that runs after the stitching cut.

The stitched network never runs the patch embedding or the encoder blocks up to the cut, so only
the layers after it get adapters: later encoder blocks, the aggregator, and the heads (the paper:
every Linear and Conv2d of the stitched network). peft's low-level API injects the adapters in
place, so the network keeps its class and its `forward_from`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

ENCODER_BLOCKS = "aggregator.patch_embed.blocks."


def lora_targets(recon: nn.Module, cut: str, conv: bool = True) -> list[str]:
    """Full names of the Linear (and, with conv, Conv2d) modules that run after `cut` ("blocks.N")."""
    n = int(cut.split(".")[1])
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
    """The LoraConfig arguments, as plain data that checkpoints carry."""
    return {"r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": lora_targets(recon, cut, conv)}


def add_lora(recon: nn.Module, config: dict) -> nn.Module:
    """Inject adapters (B initialised to zero, so the network is unchanged) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    recon = inject_adapter_in_model(LoraConfig(**config), recon)
    for name, p in recon.named_parameters():
        p.requires_grad_("lora_" in name)
    return recon


def lora_state(recon: nn.Module) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(recon).items()}


def load_lora_state(recon: nn.Module, state: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(recon, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"LoRA state does not fit the network: missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}")


def _lora_layers(recon: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in recon.named_modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(recon: nn.Module) -> Iterator[nn.Module]:
    """Run the base network (the frozen original, i.e. the distillation teacher) inside the block."""
    layers = [m for _, m in _lora_layers(recon)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield recon
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(recon: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and put the plain layers back (inference: no LoRA cost,
    the network's state-dict keys are the original ones again)."""
    for name, m in _lora_layers(recon):
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = recon.get_submodule(parent_name) if parent_name else recon
        setattr(parent, child, m.get_base_layer())
    return recon
