"""INRIA .ply writing/reading, checked against the independent `plyfile` reader and writer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from vist3a.splats import Gaussians, ply_bytes, read_ply, write_ply

INRIA_DEG3 = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    + [f"f_rest_{i}" for i in range(45)]
    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)


def random_gaussians(n: int, sh_degree: int, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(n, 3, generator=gen) * 2,
        quats=torch.randn(n, 4, generator=gen),
        scales=torch.rand(n, 3, generator=gen) * 0.5 + 1e-3,
        opacities=torch.rand(n, generator=gen) * 0.98 + 0.01,
        sh=torch.randn(n, (sh_degree + 1) ** 2, 3, generator=gen),
    )


def normalised(q: torch.Tensor) -> torch.Tensor:
    return q / q.norm(dim=1, keepdim=True)


def test_round_trip_restores_every_field(tmp_path):
    g = random_gaussians(200, 3)
    path = tmp_path / "scene.ply"
    write_ply(path, g)
    back = read_ply(path)
    assert back.num == 200 and back.sh_degree == 3
    torch.testing.assert_close(back.means, g.means)
    torch.testing.assert_close(back.scales, g.scales, rtol=1e-5, atol=1e-7)  # through log/exp
    torch.testing.assert_close(back.opacities, g.opacities, rtol=1e-5, atol=1e-6)  # through logit/sigmoid
    torch.testing.assert_close(back.quats, normalised(g.quats))
    torch.testing.assert_close(back.sh, g.sh)
    from_bytes = read_ply(path.read_bytes())
    assert torch.equal(from_bytes.sh, back.sh) and torch.equal(from_bytes.means, back.means)


def test_file_layout_read_by_plyfile():
    g = random_gaussians(50, 3, seed=1)
    data = ply_bytes(g)
    assert data.startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 50\n")
    ply = PlyData.read(io.BytesIO(data))
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == INRIA_DEG3
    assert all(p.val_dtype in ("f4", "float32") for p in vertex.properties)
    v = vertex.data
    sh = g.sh.numpy()
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), g.means.numpy())
    assert np.all(v["nx"] == 0) and np.all(v["ny"] == 0) and np.all(v["nz"] == 0)
    np.testing.assert_array_equal(np.stack([v[f"f_dc_{c}"] for c in range(3)], 1), sh[:, 0])
    # channel-major: f_rest_0..14 are red coefficients 1..15, 15..29 green, 30..44 blue
    for c in range(3):
        for k in range(1, 16):
            np.testing.assert_array_equal(v[f"f_rest_{c * 15 + k - 1}"], sh[:, k, c])
    p = g.opacities.double().numpy()
    np.testing.assert_allclose(v["opacity"], np.log(p / (1 - p)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([v[f"scale_{i}"] for i in range(3)], 1), np.log(g.scales.double().numpy()),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack([v[f"rot_{i}"] for i in range(4)], 1), normalised(g.quats).numpy(),
                               rtol=1e-6, atol=1e-7)


def test_degree_4_is_truncated_and_degree_1_padded():
    g4 = random_gaussians(10, 4, seed=2)
    v = PlyData.read(io.BytesIO(ply_bytes(g4, sh_degree=3)))["vertex"]
    assert [p.name for p in v.properties] == INRIA_DEG3
    back = read_ply(ply_bytes(g4, sh_degree=3))
    assert back.sh_degree == 3
    torch.testing.assert_close(back.sh, g4.sh[:, :16])

    g1 = random_gaussians(10, 1, seed=3)
    back = read_ply(ply_bytes(g1, sh_degree=3))
    torch.testing.assert_close(back.sh[:, :4], g1.sh)
    assert torch.all(back.sh[:, 4:] == 0)

    names = [p.name for p in PlyData.read(io.BytesIO(ply_bytes(g1, sh_degree=0)))["vertex"].properties]
    assert not any(n.startswith("f_rest") for n in names) and len(names) == 17


def test_extreme_opacities_and_scales_stay_finite():
    g = random_gaussians(3, 0)
    g = Gaussians(g.means, g.quats, torch.tensor([[1e-12, 1.0, 2.0]] * 3), torch.tensor([0.0, 1.0, 0.5]), g.sh)
    v = PlyData.read(io.BytesIO(ply_bytes(g)))["vertex"].data
    assert np.isfinite(v["opacity"]).all() and np.isfinite(v["scale_0"]).all()
    limit = np.log((1 - 1e-6) / 1e-6)
    np.testing.assert_allclose(v["opacity"], [-limit, limit, 0.0], rtol=1e-4, atol=1e-6)
    back = read_ply(ply_bytes(g))
    torch.testing.assert_close(back.opacities, torch.tensor([1e-6, 1 - 1e-6, 0.5]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("byte_order,text", [("<", False), (">", False), ("=", True)])
def test_reads_files_from_other_tools(tmp_path, byte_order, text):
    """Shuffled properties, no normals, doubles, an extra property, SH degree 1, another element first."""
    n = 7
    rng = np.random.default_rng(0)
    cols = {
        "scale_1": rng.normal(size=n), "opacity": rng.normal(size=n), "f_rest_3": rng.normal(size=n),
        "x": rng.normal(size=n), "rot_2": rng.normal(size=n), "f_dc_0": rng.normal(size=n),
        "f_rest_0": rng.normal(size=n), "f_rest_8": rng.normal(size=n), "z": rng.normal(size=n),
        "scale_0": rng.normal(size=n), "f_dc_2": rng.normal(size=n), "rot_0": rng.normal(size=n),
        "f_rest_1": rng.normal(size=n), "f_rest_2": rng.normal(size=n), "f_rest_4": rng.normal(size=n),
        "f_rest_5": rng.normal(size=n), "f_rest_6": rng.normal(size=n), "f_rest_7": rng.normal(size=n),
        "y": rng.normal(size=n), "f_dc_1": rng.normal(size=n), "scale_2": rng.normal(size=n),
        "rot_1": rng.normal(size=n), "rot_3": rng.normal(size=n), "confidence": rng.normal(size=n),
    }
    dtype = [(k, "f8" if k in ("x", "opacity", "f_rest_3") else "f4") for k in cols]
    arr = np.empty(n, dtype=dtype)
    for k, val in cols.items():
        arr[k] = val
    elements = [PlyElement.describe(arr, "vertex")]
    if not text:  # a scalar element before the vertices must be skipped over
        meta = np.zeros(2, dtype=[("a", "i4"), ("b", "u1")])
        elements.insert(0, PlyElement.describe(meta, "meta"))
    path = tmp_path / "other.ply"
    PlyData(elements, text=text, byte_order=byte_order).write(str(path))

    g = read_ply(path)
    assert g.num == n and g.sh_degree == 1
    f = lambda k: torch.tensor(arr[k].astype(np.float32))  # noqa: E731
    torch.testing.assert_close(g.means, torch.stack([f("x"), f("y"), f("z")], 1))
    torch.testing.assert_close(g.sh[:, 0], torch.stack([f("f_dc_0"), f("f_dc_1"), f("f_dc_2")], 1))
    # channel-major f_rest: coefficient k (1..3) of channel c is f_rest_{3c + k - 1}
    for c in range(3):
        for k in range(1, 4):
            torch.testing.assert_close(g.sh[:, k, c], f(f"f_rest_{3 * c + k - 1}"))
    torch.testing.assert_close(g.opacities, torch.sigmoid(f("opacity")))
    torch.testing.assert_close(g.scales, torch.exp(torch.stack([f(f"scale_{i}") for i in range(3)], 1)))
    torch.testing.assert_close(g.quats, torch.stack([f(f"rot_{i}") for i in range(4)], 1))


def test_empty_scene_and_bad_files():
    empty = read_ply(ply_bytes(random_gaussians(0, 2), sh_degree=2))
    assert empty.num == 0 and empty.sh_degree == 2
    with pytest.raises(ValueError, match="not a .ply"):
        read_ply(b"hello")
    arr = np.zeros(2, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    buf = io.BytesIO()
    PlyData([PlyElement.describe(arr, "vertex")]).write(buf)
    with pytest.raises(ValueError, match="f_dc_0"):
        read_ply(buf.getvalue())
