"""INRIA 3DGS `.ply` files: the layout common splat viewers and training tools read and write.

Binary little-endian float32 vertices with properties, in this order:
x y z nx ny nz f_dc_0..2 f_rest_0..M opacity scale_0..2 rot_0..3, where f_rest is
channel-major (all red coefficients of degrees >= 1, then green, then blue), opacity is a
logit, scale a log and rot a w,x,y,z quaternion. Written with numpy structured arrays so
millions of Gaussians take one buffer copy; read with a small header parser that accepts
any property order, extra properties, other scalar types and either byte order.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from vist3a.splats.gaussians import Gaussians, num_sh_coeffs, sh_degree_of

OPACITY_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the logit


def property_names(sh_degree: int) -> list[str]:
    """Vertex property names of an INRIA .ply with SH of `sh_degree`, in file order."""
    num_rest = 3 * (num_sh_coeffs(sh_degree) - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(num_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def _header(num: int, names: list[str]) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {num}"]
    lines += [f"property float {n}" for n in names]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def ply_bytes(g: Gaussians, sh_degree: int = 3) -> bytes:
    """The whole .ply file. SH is truncated to (or zero-padded up to) `sh_degree`;
    quaternions are written normalised."""
    g = g.detach().to("cpu", torch.float32).with_sh_degree(sh_degree)
    n = g.num
    opac = g.opacities.double().clamp(OPACITY_EPS, 1.0 - OPACITY_EPS)
    norms = g.quats.norm(dim=1, keepdim=True)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4)
    table = torch.cat(
        [
            g.means,
            torch.zeros(n, 3),  # normals
            g.sh[:, 0],
            g.sh[:, 1:].transpose(1, 2).reshape(n, 3 * (g.sh.shape[1] - 1)),  # channel-major
            torch.logit(opac)[:, None].float(),
            torch.log(g.scales.clamp_min(torch.finfo(torch.float32).tiny)),
            torch.where(norms > 0, g.quats / norms.clamp_min(1e-30), identity),
        ],
        dim=1,
    )
    names = property_names(sh_degree)
    assert table.shape == (n, len(names))
    return _header(n, names) + table.numpy().astype("<f4", copy=False).tobytes()


def write_ply(path: str | os.PathLike, g: Gaussians, sh_degree: int = 3) -> None:
    Path(path).write_bytes(ply_bytes(g, sh_degree))


# ----------------------------------------------------------------------------- reading

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _parse_header(data: bytes) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], int]:
    """(format, [(element, count, [(property, numpy type)])], offset of the body)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError("not a .ply file (missing 'ply' magic or 'end_header')")
    body = data.index(b"\n", end) + 1
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for raw in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"property before any element: {raw!r}")
            if words[1] == "list":
                elements[-1][2].append((words[-1], "list"))
            else:
                if words[1] not in _PLY_TYPES:
                    raise ValueError(f"unknown .ply property type {words[1]!r}")
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise ValueError(f"unsupported .ply format {fmt!r}")
    return fmt, elements, body


def _read_vertices(data: bytes) -> np.ndarray:
    fmt, elements, offset = _parse_header(data)
    for name, count, props in elements:
        if any(t == "list" for _, t in props):
            raise ValueError(f".ply element {name!r} has list properties; only scalar elements are supported")
        if fmt == "ascii":
            if name != "vertex":
                raise ValueError("ascii .ply with elements before 'vertex' is not supported")
            text = io.StringIO(data[offset:].decode("ascii"))
            table = np.loadtxt(text, dtype=np.float64, max_rows=count, ndmin=2)
            return np.rec.fromarrays(table.T, names=[p for p, _ in props])
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(p, order + t) for p, t in props])
        if name == "vertex":
            return np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += dtype.itemsize * count
    raise ValueError(".ply file has no 'vertex' element")


def _indexed(names: list[str], prefix: str) -> list[str]:
    """Properties `prefix<i>` sorted by i (files need not list them in order)."""
    found = [n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return sorted(found, key=lambda n: int(n[len(prefix):]))


def read_ply(path_or_bytes: str | os.PathLike | bytes) -> Gaussians:
    """Gaussians (CPU, float32) from an INRIA-layout .ply written by us or another tool."""
    data = bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray, memoryview)) else Path(path_or_bytes).read_bytes()
    v = _read_vertices(data)
    names = list(v.dtype.names)
    if all(v.dtype[k] == np.dtype("<f4") for k in names) and v.dtype.itemsize == 4 * len(names):
        table = v.view("<f4").reshape(len(v), len(names))  # our own layout: a zero-copy view
    else:
        table = np.empty((len(v), len(names)), dtype=np.float32)
        for i, k in enumerate(names):
            table[:, i] = v[k]
    position = {k: i for i, k in enumerate(names)}

    def cols(keys: list[str]) -> np.ndarray:
        """Columns `keys` as a float32 [n, len(keys)] array (one row-wise gather: fast for millions)."""
        missing = [k for k in keys if k not in position]
        if missing:
            raise ValueError(f".ply vertex element lacks {missing}; has {names}")
        idx = [position[k] for k in keys]
        if idx and idx == list(range(idx[0], idx[0] + len(idx))):
            return table[:, idx[0] : idx[0] + len(idx)]
        return np.take(table, idx, axis=1)

    means = cols(["x", "y", "z"])
    dc = cols(["f_dc_0", "f_dc_1", "f_dc_2"])
    rest_names = _indexed(names, "f_rest_")
    if len(rest_names) % 3:
        raise ValueError(f"{len(rest_names)} f_rest properties is not a multiple of 3")
    per_channel = len(rest_names) // 3
    sh_degree_of(per_channel + 1)  # refuses counts that are no SH degree
    rest = cols(rest_names).reshape(len(v), 3, per_channel).transpose(0, 2, 1)
    sh = np.concatenate([dc[:, None, :], rest], axis=1)
    logits = cols(["opacity"])[:, 0].astype(np.float64)
    scales = np.exp(cols(["scale_0", "scale_1", "scale_2"]))
    quats = cols(["rot_0", "rot_1", "rot_2", "rot_3"])
    to_t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))  # noqa: E731
    opacities = torch.sigmoid(torch.from_numpy(logits)).float()
    return Gaussians(to_t(means), to_t(quats), to_t(scales), opacities, to_t(sh))
