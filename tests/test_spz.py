"""SPZ files: round trip within the format's quantisation, the stored bytes and axis frame, bad files,
and both directions through an independent implementation (PlayCanvas splat-transform)."""

import gzip
import math
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from vist3a.splats.gaussians import Cameras, Gaussians, intrinsics_from_fov, look_at
from vist3a.splats.ply import read_ply, write_ply
from vist3a.splats.render import render, sh_basis
from vist3a.splats.spz import FLIP_YZ_SH_SIGNS, SpzError, read_spz, spz_bytes

REPO = Path(__file__).resolve().parents[1]


def random_scene(n=400, degree=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(means=torch.randn(n, 3, generator=g) * 2,
                     quats=torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1),
                     scales=torch.exp(torch.randn(n, 3, generator=g) - 4),
                     opacities=torch.rand(n, generator=g),
                     sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g) * 0.3)


def assert_within_quantisation(got: Gaussians, ref: Gaussians, fractional_bits=12):
    """The format's bounds: half a step of each fixed-point or u8 code (plus float32 slack)."""
    assert got.num == ref.num
    assert (got.means - ref.means).abs().max() <= 0.5 / 2 ** fractional_bits + 1e-5
    assert (got.opacities - ref.opacities).abs().max() <= 0.5 / 255 + 1e-6
    dc = ref.sh[:, 0].clamp(-127.5 / (0.15 * 255), 127.5 / (0.15 * 255))
    assert (got.sh[:, 0] - dc).abs().max() <= 0.5 / (0.15 * 255) + 1e-5
    assert (got.scales.log() - ref.scales.log()).abs().max() <= 0.5 / 16 + 1e-5
    # smallest three: each of three components within half a step of 9 bits over [0, sqrt(1/2)]
    cos = (got.quats * ref.quats).sum(1).abs().clamp(max=1)
    assert (2 * torch.acos(cos)).max() <= 2 * math.sqrt(3) * 0.5 / 511 * math.sqrt(0.5) + 1e-3
    k = got.sh.shape[1]
    for l in range(1, math.isqrt(k)):
        sl = slice(l * l, (l + 1) ** 2)
        step = 8 if l == 1 else 16
        ref_sh = ref.sh[:, sl].clamp(-1, 127 / 128)
        assert (got.sh[:, sl] - ref_sh).abs().max() <= (step / 2 + 0.5) / 128 + 1e-6, l


def test_round_trip_within_quantisation():
    g = random_scene()
    assert_within_quantisation(read_spz(spz_bytes(g)), g)
    g0 = random_scene(degree=0, seed=1)
    back = read_spz(spz_bytes(g0))
    assert back.sh_degree == 0
    assert_within_quantisation(back, g0)
    assert read_spz(spz_bytes(g, sh_degree=1)).sh_degree == 1
    assert read_spz(spz_bytes(Gaussians.empty())).num == 0


def test_header_and_bytes_as_the_format_lays_them_out():
    # one Gaussian at (1, 0.5, -2) (RDF): stored RUB (1, -0.5, 2) in 12-bit fixed point
    g = Gaussians(means=torch.tensor([[1.0, 0.5, -2.0]]), quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
                  scales=torch.tensor([[math.exp(-10 + 3), math.exp(-10 + 5), math.exp(-10 + 1)]]),
                  opacities=torch.tensor([128 / 255]), sh=torch.zeros(1, 4, 3))
    g.sh[0, 1] = torch.tensor([0.5, 0.0, 0.0])  # degree-1 y coefficient: flips sign in RUB
    raw = gzip.decompress(spz_bytes(g))
    magic, version, n, degree, frac, flags, reserved = struct.unpack_from("<IIIBBBB", raw)
    assert (magic, version, n, degree, frac, flags, reserved) == (0x5053474E, 3, 1, 1, 12, 0, 0)
    assert raw[:4] == b"NGSP"
    body = raw[16:]
    fixed = [int.from_bytes(body[3 * i:3 * i + 3], "little", signed=True) for i in range(3)]
    assert fixed == [4096, -2048, 8192]
    assert body[9] == 128  # alpha
    assert list(body[10:13]) == [128, 128, 128]  # DC 0 -> 127.5 -> rounds to 128
    assert list(body[13:16]) == [48, 80, 16]  # (log s + 10) * 16
    comp = int.from_bytes(body[16:20], "little")
    assert comp >> 30 == 3 and comp & ((1 << 30) - 1) == 0  # identity: w largest, the rest 0
    assert list(body[20:29]) == [64, 128, 128, 128, 128, 128, 128, 128, 128]  # -0.5*128+128, rest 0
    assert len(body) == 29


def test_yz_flip_signs_are_the_basis_parities():
    d = torch.nn.functional.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    flipped = d * torch.tensor([1.0, -1.0, -1.0])
    ratio = sh_basis(3, flipped) / sh_basis(3, d)
    torch.testing.assert_close(ratio, torch.as_tensor(FLIP_YZ_SH_SIGNS).expand(64, 16), atol=1e-4, rtol=1e-4)


def test_scene_from_spz_renders_like_the_ply():
    g = random_scene(n=300, degree=1, seed=5)  # degree 1: 5-bit SH codes, fine enough to see a frame error
    g.means = g.means * 0.4
    g.scales = g.scales * 20
    g.opacities = g.opacities * 0.5 + 0.5
    g.sh[:, 1:] *= 2.0  # strong view dependence, so a sign error in SH shows
    eye = torch.tensor([[0.3, -0.5, -4.0], [3.5, -1.0, 1.0]])
    cams = Cameras(look_at(eye, torch.zeros(2, 3)), intrinsics_from_fov(60, 48, 48).expand(2, 3, 3), 48, 48)
    from_ply = render(read_ply(_ply_bytes(g)), cams, background=torch.ones(3), backend="torch").colors
    from_spz = render(read_spz(spz_bytes(g)), cams, background=torch.ones(3), backend="torch").colors
    assert (from_ply - from_spz).abs().mean() < 0.01
    # a frame error (y and z not flipped back) would show: the check can fail
    wrong = read_spz(spz_bytes(g))
    wrong.means = wrong.means * torch.tensor([1.0, -1.0, -1.0])
    bad = render(wrong, cams, background=torch.ones(3), backend="torch").colors
    assert (from_ply - bad).abs().mean() > 0.05
    wrong = read_spz(spz_bytes(g))
    wrong.sh[:, 1:] *= torch.as_tensor(FLIP_YZ_SH_SIGNS[1:4])[:, None]  # SH left in the stored frame
    bad = render(wrong, cams, background=torch.ones(3), backend="torch").colors
    assert (from_ply - bad).abs().mean() > 2 * (from_ply - from_spz).abs().mean()


def _ply_bytes(g):
    from vist3a.splats.ply import ply_bytes
    return ply_bytes(g, sh_degree=3)


def _gz_header(version=3, magic=0x5053474E, n=2, degree=0, body=b""):
    return gzip.compress(struct.pack("<IIIBBBB", magic, version, n, degree, 12, 0, 0) + body)


def test_bad_files_give_clear_errors(tmp_path):
    good = spz_bytes(random_scene(n=50, degree=1))
    with pytest.raises(SpzError, match="truncated SPZ file: the gzip stream ends early"):
        read_spz(good[: len(good) // 2])
    with pytest.raises(SpzError, match=r"truncated SPZ file: 50 points of SH degree 1 need \d+ bytes"):
        read_spz(gzip.compress(gzip.decompress(good)[:-7]))
    with pytest.raises(SpzError, match="bytes after the 50 points"):
        read_spz(gzip.compress(gzip.decompress(good) + b"\0"))
    with pytest.raises(SpzError, match="magic 0x12345678, expected 0x5053474e"):
        read_spz(_gz_header(magic=0x12345678))
    with pytest.raises(SpzError, match=r"unsupported SPZ version 7: this reader takes versions \(2, 3\)"):
        read_spz(_gz_header(version=7))
    with pytest.raises(SpzError, match="not a gzip stream"):
        read_spz(b"ply\nformat binary_little_endian 1.0\n")
    with pytest.raises(SpzError, match="SPZ version 4 stores uncompressed headers"):
        read_spz(struct.pack("<IIIBBBB", 0x5053474E, 4, 2, 0, 12, 0, 0))
    with pytest.raises(SpzError, match="SH degree 5"):
        read_spz(_gz_header(degree=5))
    with pytest.raises(SpzError, match="shorter than the 16-byte header"):
        read_spz(gzip.compress(b"NGSP"))
    far = random_scene(n=3)
    far.means[1, 0] = 5000.0
    with pytest.raises(ValueError, match="does not fit 24-bit fixed point"):
        spz_bytes(far)


def test_reads_version_2_rotations():
    # version 2 stores x,y,z of the (RUB) quaternion with w >= 0 as c * 127.5 + 127.5
    n = 3
    q_rub = np.array([[0.0, 0.0, 0.0, 1.0], [0.6, 0.0, 0.0, 0.8], [0.0, -0.28, 0.96, 0.0]])  # x,y,z,w
    body = bytearray()
    body += bytes(9 * n) + bytes([255] * n) + bytes([128] * 3 * n) + bytes([160] * 3 * n)
    body += bytes(np.clip(np.rint(q_rub[:, :3] * 127.5 + 127.5), 0, 255).astype(np.uint8).tobytes())
    g = read_spz(_gz_header(version=2, n=n, body=bytes(body)))
    expect_wxyz = np.stack([q_rub[:, 3], q_rub[:, 0], -q_rub[:, 1], -q_rub[:, 2]], 1)
    np.testing.assert_allclose(np.abs((g.quats.numpy() * expect_wxyz).sum(1)), 1.0, atol=1e-2)
    np.testing.assert_allclose(g.scales.numpy(), math.exp(0.0), rtol=1e-6)
    np.testing.assert_allclose(g.opacities.numpy(), 1.0)


def _splat_transform() -> str | None:
    local = REPO / "node_modules" / ".bin" / "splat-transform"
    return str(local) if local.exists() else shutil.which("splat-transform")


def test_independent_splat_transform_reads_and_writes_our_files(tmp_path):
    cli = _splat_transform()
    if cli is None:
        pytest.skip("@playcanvas/splat-transform is not installed (npm ci installs it from package.json)")
    g = random_scene(n=500, degree=3, seed=7)
    (tmp_path / "ours.spz").write_bytes(spz_bytes(g))
    write_ply(tmp_path / "ours.ply", g, sh_degree=3)
    for src, dst, extra in (("ours.spz", "theirs.ply", []), ("ours.ply", "theirs.spz", ["--spz-version", "3"])):
        proc = subprocess.run([cli, "-q", "-w", *extra, str(tmp_path / src), str(tmp_path / dst)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # their decoding of our .spz is our decoding of it (same frame, same dequantisation)
    theirs = read_ply(tmp_path / "theirs.ply")
    ours = read_spz(tmp_path / "ours.spz")
    torch.testing.assert_close(theirs.means, ours.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs.opacities, ours.opacities, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs.scales, ours.scales, rtol=1e-5, atol=0)
    torch.testing.assert_close(theirs.sh, ours.sh, atol=1e-5, rtol=0)
    torch.testing.assert_close((theirs.quats * ours.quats).sum(1).abs(), torch.ones(g.num), atol=1e-5, rtol=0)
    # and their encoding of our .ply reads back within the format's quantisation of the original
    assert_within_quantisation(read_spz(tmp_path / "theirs.spz"), g)
