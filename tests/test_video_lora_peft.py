"""The video LoRA in peft's standard format, both ways, against peft itself on a tiny Wan transformer:
an adapter peft's save_pretrained wrote loads (merged) into vist3a and equals PeftModel's unmerged forward;
what vist3a writes, PeftModel.from_pretrained reads. Adapters for another model are refused naming the file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig, PeftModel, get_peft_model

from vist3a.config import ALIGN_LORA_TARGETS, WanTransformerConfig
from vist3a.lora import add_video_lora, load_video_lora, lora_state, read_lora_dir, save_lora_dir


def _transformer(**over) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**{**WanTransformerConfig().model_dump(), **over}).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g), return_dict=False)


def _randomise_lora(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_adapter(tmp_path, targets=ALIGN_LORA_TARGETS, **over):
    base = _transformer(**over)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    _randomise_lora(peft_model)
    out = tmp_path / "peft_adapter"
    peft_model.save_pretrained(out)
    return base, peft_model, out


def test_an_adapter_peft_wrote_loads_merged_and_matches_peftmodel(tmp_path):
    base, peft_model, out = _peft_adapter(tmp_path)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with torch.no_grad():
        want = peft_model(**_inputs())[0]
        plain = base(**_inputs())[0]
    ours = copy.deepcopy(base)
    load_video_lora(ours, str(out))
    assert not any("lora_" in n for n, _ in ours.named_parameters())  # merged: the plain transformer again
    with torch.no_grad():
        got = ours(**_inputs())[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter does change the model


def test_what_vist3a_writes_peft_reads(tmp_path):
    config = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "bias": "none", "target_modules": list(ALIGN_LORA_TARGETS)}
    trained = add_video_lora(_transformer(), config, seed=0)
    _randomise_lora(trained, seed=7)
    out = tmp_path / "vist3a_lora"
    save_lora_dir(str(out), config, lora_state(trained), meta={"step": 3})
    keys = json.loads((out / "adapter_config.json").read_text())
    assert keys["r"] == 4 and keys["lora_alpha"] == 8.0 and sorted(keys["target_modules"]) == sorted(ALIGN_LORA_TARGETS)
    peft_model = PeftModel.from_pretrained(_transformer(), str(out)).eval()
    with torch.no_grad():
        want = trained(**_inputs())[0]
        got = peft_model(**_inputs())[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    _, state, meta = read_lora_dir(str(out))
    assert meta == {"step": 3} and set(state) == set(lora_state(trained))


def test_an_adapter_for_another_model_size_is_refused_naming_the_file(tmp_path):
    _, _, out = _peft_adapter(tmp_path, num_attention_heads=4)  # 64-wide attention: "the 14B adapter"
    with pytest.raises(ValueError, match=r"peft_adapter: .* do not fit the configured transformer .*lora_A \[4, 64\]"):
        load_video_lora(_transformer(), str(out))


def test_an_adapter_for_other_target_modules_is_refused(tmp_path):
    _, _, out = _peft_adapter(tmp_path, targets=["ffn.net.0.proj"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    weights = out / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    renamed = {k.replace("ffn.net.0.proj", "mlp.q_proj"): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    cfg["target_modules"] = ["mlp.q_proj"]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"modules the Wan transformer does not have .*mlp.q_proj"):
        load_video_lora(_transformer(), str(out))


def test_a_directory_without_an_adapter_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no peft adapter at .* \(missing adapter_config.json\)"):
        read_lora_dir(str(tmp_path))
