"""The released stitched decoder file (anysplat_stitched.pth): written here in the release's exact format
from the format facts (renumbered DINO blocks, loralib Linear and Conv2d layouts, lora_only biases,
tokens, stitching layer), loaded, and checked against an unmerged LoRA forward built from PyPI's loralib."""

from __future__ import annotations

import copy

import loralib
import pytest
import torch
from torch import nn

from vist3a.config import ReconConfig
from vist3a.recon import ReconNet
from vist3a.stitching import StitchedDecoder, StitchingLayer
from vist3a.weights import CheckpointMismatchError, WeightsError
from vist3a.weights.release import load_release_stitch, plan_release, read_checkpoint_file

from release_format import adapted_layers, release_name, write_release_file  # noqa: E402 - tests/ helper

SPEC = "conv3d_k3x3x3_o32_s1x1x1_p1x1x1"
CUT = "blocks.1"  # upstream enc_blocks_2: blocks 0 and 1 deleted, the rest renumbered from 0
RANK, ALPHA = 4, 2.0


def _decoder(cut: str = CUT, spec: str = SPEC) -> StitchedDecoder:
    recon = ReconNet(ReconConfig()).eval()
    torch.manual_seed(5)
    stitch = StitchingLayer(spec, in_channels=16)
    return StitchedDecoder(stitch, recon, cut, torch.zeros(16), torch.ones(16)).eval()


def _reference(decoder: StitchedDecoder, payload: dict, cut_blocks: int = 2) -> StitchedDecoder:
    """The same network with the adapters *unmerged*: every adapted layer swapped for loralib's layer
    (merge_weights=False keeps W and B @ A apart in the forward pass)."""
    ref = copy.deepcopy(decoder)
    lora = payload["lora"]
    with torch.no_grad():
        ref.stitch.conv.weight.copy_(payload["stitching_layer"]["weight"])
        ref.stitch.conv.bias.copy_(payload["stitching_layer"]["bias"])
        ref.recon.aggregator.patch_embed.cls_token.copy_(payload["cls_token"])
        ref.recon.aggregator.patch_embed.register_tokens.copy_(payload["register_tokens"])
        for name, m in adapted_layers(ref.recon, cut_blocks).items():
            key = release_name(name, cut_blocks)
            if isinstance(m, nn.Linear):
                new = loralib.Linear(m.in_features, m.out_features, r=RANK, lora_alpha=ALPHA, merge_weights=False,
                                     bias=m.bias is not None)
                target = new
            else:
                new = loralib.Conv2d(m.in_channels, m.out_channels, m.kernel_size[0], r=RANK, lora_alpha=ALPHA,
                                     merge_weights=False, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                     groups=m.groups, bias=m.bias is not None)
                target = new.conv
            target.weight.copy_(m.weight)
            if m.bias is not None:
                target.bias.copy_(lora[key + ".bias"].float())
            new.lora_A.copy_(lora[key + ".lora_A"])
            new.lora_B.copy_(lora[key + ".lora_B"])
            parent, _, child = name.rpartition(".")
            new.eval()  # (loralib's train() returns None, so not chained)
            setattr(ref.recon.get_submodule(parent), child, new)
    return ref


def _run(decoder: StitchedDecoder, latents, frames):
    with torch.no_grad():
        out = decoder(latents, frames=frames)
    return out.recon


def test_release_file_loads_and_matches_the_unmerged_lora_forward(tmp_path):
    path = tmp_path / "anysplat_stitched.pth"
    decoder = _decoder()
    payload = write_release_file(path, decoder)
    ref = _reference(decoder, payload)
    report = load_release_stitch(decoder, path, rank=RANK, alpha=ALPHA)
    assert report.ok, report.format()
    n_layers = len(adapted_layers(decoder.recon, 2))
    assert f"{n_layers} layers" in report.adapted["LoRA"]
    assert "Conv2d" in report.adapted["LoRA"] and n_layers > 40
    assert "mask_token" in report.ignored and "encoder.distill_aggregator.frame_blocks.0.attn.qkv.lora_A" in report.ignored
    # merged: plain nn.Linear / nn.Conv2d again, no adapter cost at inference
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in adapted_layers(decoder.recon, 2).values())
    torch.testing.assert_close(decoder.stitch.conv.weight, payload["stitching_layer"]["weight"])
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g)
    frames = torch.rand(1, 5, 3, 64, 64, generator=g)
    got, want = _run(decoder, latents, frames), _run(ref, latents, frames)
    for field in ("depth", "depth_conf", "pose_enc", "gaussian_params"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-4, msg=field)
    # and the LoRA changed the network: the base one differs by far more than the tolerance
    base = _run(_decoder(), latents, frames)
    assert (base.gaussian_params - got.gaussian_params).abs().max() > 1e-2


def test_renumbered_blocks_land_on_the_blocks_after_the_cut(tmp_path):
    path = tmp_path / "r.pth"
    decoder = _decoder()
    payload = write_release_file(path, decoder)
    before = decoder.recon.aggregator.patch_embed.blocks[2].attn.qkv.weight.clone()
    untouched = decoder.recon.aggregator.patch_embed.blocks[1].attn.qkv.weight.clone()
    load_release_stitch(decoder, path, rank=RANK, alpha=ALPHA)
    lora = payload["lora"]
    a, b = lora["encoder.aggregator.patch_embed.blocks.0.attn.qkv.lora_A"], lora["encoder.aggregator.patch_embed.blocks.0.attn.qkv.lora_B"]
    torch.testing.assert_close(decoder.recon.aggregator.patch_embed.blocks[2].attn.qkv.weight,
                               before + (b @ a) * (ALPHA / RANK))
    torch.testing.assert_close(decoder.recon.aggregator.patch_embed.blocks[1].attn.qkv.weight, untouched)
    torch.testing.assert_close(decoder.recon.aggregator.patch_embed.blocks[2].attn.qkv.bias,
                               lora["encoder.aggregator.patch_embed.blocks.0.attn.qkv.bias"].float())


def test_a_file_from_another_cut_names_the_cut_to_set(tmp_path):
    path = tmp_path / "other-cut.pth"
    write_release_file(path, _decoder(cut="blocks.0"), cut_blocks=1)  # made at enc_blocks_1
    with pytest.raises(CheckpointMismatchError, match=r"set model.stitch.cut=blocks.0"):
        load_release_stitch(_decoder(), path, rank=RANK, alpha=ALPHA)


def test_another_stitching_spec_is_refused_with_both_shapes(tmp_path):
    path = tmp_path / "spec.pth"
    write_release_file(path, _decoder(), stitch_shape=(32, 16, 5, 3, 3))
    with pytest.raises(CheckpointMismatchError, match=r"another stitching spec") as err:
        load_release_stitch(_decoder(), path, rank=RANK, alpha=ALPHA)
    assert "[32, 16, 5, 3, 3]" in str(err.value) and "[32, 16, 3, 3, 3]" in str(err.value)


def test_a_rank_other_than_the_configured_one_is_refused(tmp_path):
    path = tmp_path / "rank.pth"
    write_release_file(path, _decoder(), rank=2)
    with pytest.raises(CheckpointMismatchError, match=r"LoRA rank in the file differs from model.stitch.lora_rank 4"):
        load_release_stitch(_decoder(), path, rank=RANK, alpha=ALPHA)


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "anysplat_stitched.pth"
    write_release_file(path, _decoder())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"anysplat_stitched.pth .*cannot be read as a torch checkpoint.*truncated"):
        read_checkpoint_file(path)
    other = tmp_path / "state.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    plan = plan_release(read_checkpoint_file(other), _decoder().recon, CUT, _decoder().stitch, RANK, ALPHA, str(other))
    assert not plan.report.ok
    assert "missing top-level entries" in plan.report.format() and "cls_token" in plan.report.format()


def test_an_adapter_for_a_layer_we_do_not_have_is_reported(tmp_path):
    path = tmp_path / "x.pth"
    decoder = _decoder()
    payload = write_release_file(path, decoder)
    payload["lora"]["encoder.aggregator.frame_blocks.9.attn.qkv.lora_A"] = torch.zeros(RANK, 32)
    payload["lora"]["encoder.aggregator.frame_blocks.9.attn.qkv.lora_B"] = torch.zeros(96, RANK)
    torch.save(payload, path)
    with pytest.raises(CheckpointMismatchError, match=r"no Linear/Conv2d aggregator.frame_blocks.9.attn.qkv"):
        load_release_stitch(decoder, path, rank=RANK, alpha=ALPHA)
