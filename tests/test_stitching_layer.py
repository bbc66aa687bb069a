import pytest
import torch
import torch.nn.functional as F

from vist3a.stitching import StitchingLayer, StitchSpec, upsample_time


def test_spec_parse_paper_default():
    s = StitchSpec.parse("conv3d_k5x3x3_o1024_s1x2x2_p2x1x1")
    assert s.kernel == (5, 3, 3) and s.out_channels == 1024 and s.stride == (1, 2, 2) and s.padding == (2, 1, 1)
    assert s.output_size(13, 64, 64) == (13, 32, 32)


def test_spec_2d_and_1d_map_to_3d():
    assert StitchSpec.parse("conv2d_k3_o8_p1").kernel == (1, 3, 3)
    assert StitchSpec.parse("conv2d_k3_o8_p1").padding == (0, 1, 1)
    assert StitchSpec.parse("conv1d_k5_o8_p2").kernel == (5, 1, 1)


@pytest.mark.parametrize("bad", ["conv4d_k3_o8", "conv3d_o8", "conv3d_k3", "conv3d_k3x3_o8", "conv3d_k3_o8_q1", "conv3d_k0_o8"])
def test_spec_errors_name_the_spec(bad):
    with pytest.raises(ValueError, match="stitch spec"):
        StitchSpec.parse(bad)


@pytest.mark.parametrize("spec,latent,expect", [
    ("conv3d_k5x3x3_o24_s1x2x2_p2x1x1", (2, 16, 4, 16, 16), (2, 24, 13, 8, 8)),
    ("conv3d_k3x3x3_o32_s1x1x1_p1x1x1", (1, 16, 2, 8, 8), (1, 32, 5, 8, 8)),
    ("conv3d_k5x7x7_o12_s1x3x3_p2x0x0", (1, 16, 3, 24, 24), (1, 12, 9, 6, 6)),
    ("conv2d_k2_o8_s2", (1, 16, 1, 8, 8), (1, 8, 1, 4, 4)),
])
def test_stitching_layer_output_shapes(spec, latent, expect):
    layer = StitchingLayer(spec, in_channels=16)
    z = upsample_time(torch.randn(latent))
    out = layer(z)
    assert tuple(out.shape) == expect
    assert tuple(StitchingLayer.to_tokens(out).shape) == (expect[0], expect[2], expect[3] * expect[4], expect[1])


def test_replicate_padding_equals_explicit_edge_copy():
    layer = StitchingLayer("conv3d_k3x3x3_o4_p1x1x1", in_channels=2)
    z = torch.randn(1, 2, 3, 5, 5)
    padded = z
    # replicate by hand: repeat the edge slice on each side of each axis
    for dim in (2, 3, 4):
        first = padded.narrow(dim, 0, 1)
        last = padded.narrow(dim, padded.shape[dim] - 1, 1)
        padded = torch.cat([first, padded, last], dim=dim)
    expected = F.conv3d(padded, layer.conv.weight, layer.conv.bias)
    assert torch.allclose(layer(z), expected, atol=1e-6)


def test_upsample_time_keeps_ends_and_interpolates():
    z = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(1, 2, 3, 2, 2)
    up = upsample_time(z)
    assert up.shape[2] == 9  # 4 * (3 - 1) + 1
    assert torch.allclose(up[0, 0, :, 0, 0], torch.linspace(0, 2, 9))
    one = upsample_time(torch.randn(1, 2, 1, 2, 2))
    assert one.shape[2] == 1
