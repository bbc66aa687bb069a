"""Provenance in every scene's meta.json: the model (preset, a quick fingerprint of each weights file, the
LoRA), the sampling settings, the software versions and the licence terms the weights put on the output
(tiny preset with random weights; release-format weights files written locally)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from vist3a.config import ALIGN_LORA_TARGETS, build_config, load_config
from vist3a.models import build_stitched_decoder
from vist3a.recon import ReconNet
from vist3a.video import build_wan
from vist3a.weights import check_weights, quick_file_fingerprint, weights_provenance
from vist3a.weights.check import RANDOM_LICENCE, RELEASES

from release_format import RANK, write_release_file  # noqa: E402 - tests/ helper

FAST = ["sampling.steps=2", "splats.preview_views=1", "splats.preview_size=32"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _save_recon(directory, seed: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rc = load_config(None, ["model.recon.heads=[camera,depth,gaussians]", f"model.recon.seed={seed}"]).model.recon
    save_file({k: v.contiguous() for k, v in ReconNet(rc).state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"encoder_cfg": {"gaussian_adapter": {"sh_degree": 1}}}))


def _overrides(root, recon_dir=None, stitch=None, lora=True) -> list[str]:
    """The tiny preset shaped like the release: a pretrained AnySplat-style recon, the release's stitch file,
    a peft video LoRA (all written under `root`)."""
    out = ["model.recon.heads=[camera,depth,gaussians]", "model.recon.source=pretrained",
           f"model.recon.weights={recon_dir or root / 'anysplat'}",
           f"model.stitch.weights={stitch or root / 'anysplat_stitched.pth'}",
           f"model.stitch.lora_rank={RANK}", "model.stitch.lora_alpha=2.0", *FAST]
    return out + ([f"model.video.lora={root / 'lora_ema'}"] if lora else [])


@pytest.fixture(scope="module")
def release_root(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("provenance-release")
    _save_recon(root / "anysplat")
    cfg = load_config(None, _overrides(root, lora=False))
    comps = build_wan(cfg.model.video)
    decoder = build_stitched_decoder(cfg, comps.vae, "cpu", load_weights=False)
    write_release_file(root / "anysplat_stitched.pth", decoder)
    write_release_file(root / "other_stitched.pth", decoder, seed=1)  # same layout, other tensors
    peft_model = get_peft_model(copy.deepcopy(comps.transformer),
                                LoraConfig(r=4, lora_alpha=8, target_modules=list(ALIGN_LORA_TARGETS)))
    peft_model.save_pretrained(root / "lora_ema")
    return root


def test_tiny_meta_carries_licence_and_model_provenance(one_torch_thread, tmp_path):
    from vist3a.generator import SceneGenerator, generate_scene

    gen = SceneGenerator(build_config({}, FAST))
    generate_scene("a red barn", out=str(tmp_path), seed=3, generator=gen)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["licence"] == RANDOM_LICENCE
    prov = meta["provenance"]
    model = prov["model"]
    assert model["preset"] == "tiny" and model["config_fingerprint"] == meta["weights_fingerprint"]
    assert model["lora"] is None and model["licence"] == RANDOM_LICENCE
    assert set(model["components"]) == {"video", "recon", "stitch"}  # no LoRA configured: none listed
    for name, seed in (("video", 0), ("recon", 1), ("stitch", 2)):
        comp = model["components"][name]
        assert comp["source"] == "random" and comp["seed"] == seed and comp["files"] == {}
        assert len(comp["fingerprint"]) == 16 and comp["licence"] == RANDOM_LICENCE
    assert prov["sampling"] == {"prompt_template": "{prompt}", "negative_prompt": "", "steps": 2, "guidance": 5.0,
                                "shift": 5.0, "frames": 5, "height": 64, "width": 64, "seed": 3}
    assert prov["versions"] == meta["versions"] and "torch" in prov["versions"]
    # computed once per generator; a caller editing one meta does not change the next
    again = gen.meta(gen.generate(["a lighthouse"], [1], steps=3, guidance=2.0)[0])
    again["provenance"]["model"]["components"].clear()
    assert gen.meta(gen.generate(["a lighthouse"], [1])[0])["provenance"]["model"] == model
    assert (again["provenance"]["sampling"]["steps"], again["provenance"]["sampling"]["guidance"]) == (3, 2.0)


def test_random_weights_are_fingerprinted_by_their_seeded_config():
    base = weights_provenance(build_config({}))
    reseeded = weights_provenance(build_config({}, ["model.recon.seed=5"]))
    assert base == weights_provenance(build_config({}))
    assert reseeded["components"]["recon"]["fingerprint"] != base["components"]["recon"]["fingerprint"]
    assert reseeded["components"]["video"] == base["components"]["video"]
    assert reseeded["fingerprint"] != base["fingerprint"]


def test_quick_fingerprint_follows_bytes_not_copies(tmp_path):
    big = tmp_path / "big.bin"
    data = bytearray(torch.randint(0, 256, (3 << 20,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    big.write_bytes(data)
    fp = quick_file_fingerprint(big)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(big, copy_dir / "elsewhere.bin")
    assert quick_file_fingerprint(copy_dir / "elsewhere.bin") == fp and len(fp) == 16
    for at in (10, len(data) - 1):  # a byte in the first and in the last MiB
        changed = bytearray(data)
        changed[at] ^= 1
        (tmp_path / "changed.bin").write_bytes(changed)
        assert quick_file_fingerprint(tmp_path / "changed.bin") != fp
    (tmp_path / "longer.bin").write_bytes(data + b"\0")
    assert quick_file_fingerprint(tmp_path / "longer.bin") != fp
    small = tmp_path / "small.json"
    small.write_text('{"a": 1}')
    assert quick_file_fingerprint(small) != quick_file_fingerprint(big)


def test_release_layout_names_each_file_and_non_commercial_terms(release_root, tmp_path):
    cfg = load_config(None, _overrides(release_root))
    prov = weights_provenance(cfg)
    json.dumps(prov)
    comps = prov["components"]
    assert set(comps) == {"video", "recon", "stitch", "lora"} and prov["lora"] == str(release_root / "lora_ema")
    assert comps["video"]["source"] == "random"
    assert set(comps["recon"]["files"]) == {"model.safetensors", "config.json"}
    assert comps["recon"]["release"] == RELEASES["anysplat"].repo
    assert comps["recon"]["files"]["model.safetensors"] == quick_file_fingerprint(release_root / "anysplat" / "model.safetensors")
    assert set(comps["stitch"]["files"]) == {"anysplat_stitched.pth"}
    assert comps["stitch"]["release"] == "HJGO/VIST3A" and comps["stitch"]["licence"] == RELEASES["vist3a"].licence
    assert set(comps["lora"]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert comps["lora"]["licence"].startswith("own adapter")  # the tiny preset names no released adapter
    assert prov["licence"].startswith("non-commercial use only")
    assert "recon (lhjiang/anysplat): code MIT; weights derived from VGGT-1B, non-commercial" in prov["licence"]
    assert "stitch (HJGO/VIST3A): no licence file in the release" in prov["licence"]

    # a copy of the same files elsewhere: the same fingerprints, only the source differs
    shutil.copytree(release_root / "anysplat", tmp_path / "copied")
    copied = weights_provenance(load_config(None, _overrides(release_root, recon_dir=tmp_path / "copied")))
    assert copied["components"]["recon"]["source"] == str(tmp_path / "copied")
    assert copied["components"]["recon"]["files"] == comps["recon"]["files"]
    assert copied["fingerprint"] == prov["fingerprint"]
    # other bytes in a weights file: its fingerprint, the component's and the whole model's change
    _save_recon(tmp_path / "copied", seed=9)
    changed = weights_provenance(load_config(None, _overrides(release_root, recon_dir=tmp_path / "copied")))
    assert changed["components"]["recon"]["files"]["model.safetensors"] != comps["recon"]["files"]["model.safetensors"]
    assert changed["components"]["recon"]["files"]["config.json"] == comps["recon"]["files"]["config.json"]
    assert changed["fingerprint"] != prov["fingerprint"]
    other = weights_provenance(load_config(None, _overrides(release_root, stitch=release_root / "other_stitched.pth")))
    assert other["components"]["stitch"]["fingerprint"] != comps["stitch"]["fingerprint"]


def test_hub_snapshot_records_its_revision(release_root, tmp_path):
    repo_dir = tmp_path / "hub" / "models--HJGO--VIST3A"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    shutil.copy(release_root / "anysplat_stitched.pth", snapshot / "anysplat_stitched.pth")
    cfg = load_config(None, _overrides(release_root, stitch="hf://HJGO/VIST3A/anysplat_stitched.pth", lora=False))
    check = check_weights(cfg, deep=False, hub_cache_dir=str(tmp_path / "hub"))
    assert check.ok, str(check)
    stitch = weights_provenance(cfg, check)["components"]["stitch"]
    assert stitch["source"] == "hf://HJGO/VIST3A/anysplat_stitched.pth" and stitch["revision"] == COMMIT
    assert stitch["release"] == "HJGO/VIST3A"
    assert stitch["files"] == weights_provenance(load_config(None, _overrides(release_root)))["components"]["stitch"]["files"]


def test_generated_scene_from_release_weights_states_non_commercial_terms(release_root, tmp_path):
    from vist3a.generator import SceneGenerator, scene_files

    gen = SceneGenerator(load_config(None, _overrides(release_root)))
    scene = gen.generate(["a red barn"], [7])[0]
    meta = json.loads(scene_files(scene, gen.meta(scene))["meta.json"])
    assert meta["licence"].startswith("non-commercial use only") and meta["licence"] == meta["provenance"]["model"]["licence"]
    files = {name: set(c["files"]) for name, c in meta["provenance"]["model"]["components"].items()}
    assert files == {"video": set(), "recon": {"model.safetensors", "config.json"}, "stitch": {"anysplat_stitched.pth"},
                     "lora": {"adapter_config.json", "adapter_model.safetensors"}}
