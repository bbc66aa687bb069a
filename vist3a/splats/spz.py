"""SPZ files (Niantic's compressed splat format, version 3 as Spark and SuperSplat read it).

A version 2/3 file is one gzip stream holding a 16-byte little-endian header

    magic u32 0x5053474e ("NGSP"), version u32, number of points u32,
    SH degree u8 (0..3), fractional bits u8, flags u8 (1: antialiased), reserved u8 (0)

followed by the attributes, each for all points before the next:

- positions: 3 x 24-bit signed fixed point a point, value = int / 2^fractional_bits;
- alphas: u8, opacity * 255;
- colours: 3 x u8, the DC SH coefficient * (0.15 * 255) + 127.5;
- scales: 3 x u8, (log scale + 10) * 16;
- rotations: version 3: 4 bytes, "smallest three": the index of the largest of x,y,z,w in the two top
  bits of a little-endian u32, then for each other component in x,y,z,w order (first in the highest
  bits) a sign bit and 9 bits of |c| / sqrt(1/2) * 511; the largest one is made positive and
  recovered from the unit norm. Version 2: 3 u8, x,y,z of the quaternion with w >= 0, c * 127.5 + 127.5;
- SH of degree >= 1: per point, per coefficient, r g b as u8 = c * 128 + 128, rounded to buckets
  of 8 (degree 1) or 16 (degrees 2, 3).

Coordinates are stored in a right-up-back frame; the INRIA .ply (and `Gaussians`) are
right-down-forward, so y and z flip on the way in and out: positions, the quaternion's y and z, and
each SH coefficient by its basis function's parity under (x, y, z) -> (x, -y, -z).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from vist3a.splats.gaussians import Gaussians, num_sh_coeffs, sh_degree_of

MAGIC = 0x5053474E
VERSION = 3
READABLE_VERSIONS = (2, 3)
HEADER = struct.Struct("<IIIBBBB")
FRACTIONAL_BITS = 12
COLOR_SCALE = 0.15
FLAG_ANTIALIASED = 0x1
MAX_SH_DEGREE = 3
SQRT1_2 = 0.7071067811865476
SH_BUCKET_BITS = {1: 5, 2: 4, 3: 4}  # bits kept per SH coefficient, by degree

#: (+1/-1) per SH coefficient 0..15 of flipping y and z (index l^2 + l + m, the real-SH basis:
#: degree 1 is y, z, x; degree 2 xy, yz, 3z^2-1, xz, x^2-y^2; degree 3 y(3x^2-y^2), xyz, y(5z^2-1),
#: z(5z^2-3), x(5z^2-1), z(x^2-y^2), x(x^2-3y^2)).
FLIP_YZ_SH_SIGNS = np.array([1, -1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1], dtype=np.float32)


class SpzError(ValueError):
    """A file that is not a readable SPZ (the message says what is wrong)."""


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _others(largest: np.ndarray) -> np.ndarray:
    """[N,3]: the indices 0..3 other than `largest`, in increasing order."""
    idx = np.arange(4)[None, :]
    return np.sort(np.where(idx != largest[:, None], idx, 9), axis=1)[:, :3]


def _pack_smallest_three(q: np.ndarray) -> np.ndarray:
    """Unit quaternions [N,4] x,y,z,w -> [N,4] bytes."""
    n = len(q)
    largest = np.abs(q).argmax(axis=1)
    sign = np.where(q[np.arange(n), largest] < 0, -1.0, 1.0)
    q = q * sign[:, None]  # -q is the same rotation: make the largest component positive
    comp = largest.astype(np.uint32)
    others = _others(largest)
    for j in range(3):
        c = q[np.arange(n), others[:, j]]
        mag = np.clip(np.floor(np.abs(c) / SQRT1_2 * 511 + 0.5), 0, 511).astype(np.uint32)
        comp = (comp << np.uint32(10)) | ((c < 0).astype(np.uint32) << np.uint32(9)) | mag
    return comp.astype("<u4").view(np.uint8).reshape(n, 4)


def _unpack_smallest_three(b: np.ndarray) -> np.ndarray:
    """[N,4] bytes -> unit quaternions [N,4] x,y,z,w."""
    n = len(b)
    comp = np.ascontiguousarray(b).view("<u4").reshape(n).astype(np.uint32)
    largest = (comp >> np.uint32(30)).astype(np.int64)
    others = _others(largest)
    q = np.zeros((n, 4), dtype=np.float64)
    for j in (2, 1, 0):  # the last component sits in the lowest bits
        mag = (comp & np.uint32(511)).astype(np.float64)
        neg = ((comp >> np.uint32(9)) & np.uint32(1)).astype(bool)
        comp = comp >> np.uint32(10)
        q[np.arange(n), others[:, j]] = np.where(neg, -1.0, 1.0) * mag / 511 * SQRT1_2
    q[np.arange(n), largest] = np.sqrt(np.clip(1.0 - (q * q).sum(axis=1), 0.0, None))
    return q


def _sh_quantise(x: np.ndarray, bits: int) -> np.ndarray:
    bucket = 1 << (8 - bits)
    q = np.rint(x * 128.0) + 128.0
    q = np.floor((q + bucket // 2) / bucket) * bucket
    return np.clip(q, 0, 255).astype(np.uint8)


def spz_bytes(g: Gaussians, sh_degree: int | None = None, fractional_bits: int = FRACTIONAL_BITS,
              antialiased: bool = False, compresslevel: int = 6) -> bytes:
    """The whole .spz file (version 3, gzip). SH is truncated to `sh_degree` (default: the scene's,
    at most 3); positions must fit 24-bit fixed point (|x| < 2^(23 - fractional_bits))."""
    degree = min(g.sh_degree, MAX_SH_DEGREE) if sh_degree is None else sh_degree
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SPZ holds SH degree 0..{MAX_SH_DEGREE}, got {degree}")
    if not 0 <= fractional_bits <= 23:
        raise ValueError(f"fractional_bits must be in 0..23, got {fractional_bits}")
    g = g.detach().to("cpu", torch.float32).with_sh_degree(degree)
    n = g.num
    flip = np.array([1.0, -1.0, -1.0])
    pos = g.means.double().numpy() * flip
    fixed = np.rint(pos * (1 << fractional_bits))
    limit = 1 << 23
    if n and not np.all(np.abs(fixed) < limit):
        worst = float(np.abs(pos).max())
        raise ValueError(f"a position of magnitude {worst:.6g} does not fit 24-bit fixed point with {fractional_bits} "
                         f"fractional bits (|x| < {limit / (1 << fractional_bits):g}): use fewer fractional bits")
    positions = (fixed.astype(np.int64) & 0xFFFFFF).astype("<u4").view(np.uint8).reshape(n, 3, 4)[:, :, :3]
    alphas = _u8(g.opacities.double().numpy() * 255.0)
    colors = _u8(g.sh[:, 0].double().numpy() * (COLOR_SCALE * 255.0) + 127.5)
    scales = _u8((np.log(np.maximum(g.scales.double().numpy(), 1e-30)) + 10.0) * 16.0)
    wxyz = g.quats.double().numpy()
    norm = np.linalg.norm(wxyz, axis=1, keepdims=True)
    wxyz = np.where(norm > 0, wxyz / np.maximum(norm, 1e-30), np.array([1.0, 0.0, 0.0, 0.0]))
    xyzw = np.stack([wxyz[:, 1], -wxyz[:, 2], -wxyz[:, 3], wxyz[:, 0]], axis=1)  # RDF -> RUB
    rotations = _pack_smallest_three(xyzw)
    parts = [HEADER.pack(MAGIC, VERSION, n, degree, fractional_bits, FLAG_ANTIALIASED if antialiased else 0, 0),
             positions.tobytes(), alphas.tobytes(), colors.tobytes(), scales.tobytes(), rotations.tobytes()]
    k = num_sh_coeffs(degree)
    if k > 1:
        rest = g.sh[:, 1:].double().numpy() * FLIP_YZ_SH_SIGNS[1:k, None]  # [N, K-1, 3], coefficient-major
        sh = np.empty(rest.shape, dtype=np.uint8)
        for l in range(1, degree + 1):
            sl = slice(l * l - 1, (l + 1) ** 2 - 1)
            sh[:, sl] = _sh_quantise(rest[:, sl], SH_BUCKET_BITS[l])
        parts.append(sh.tobytes())
    return gzip.compress(b"".join(parts), compresslevel=compresslevel, mtime=0)


def write_spz(path: str | os.PathLike, g: Gaussians, sh_degree: int | None = None) -> None:
    Path(path).write_bytes(spz_bytes(g, sh_degree))


def _decompress(data: bytes) -> bytes:
    if data[:4] == struct.pack("<I", MAGIC):
        version = struct.unpack("<I", data[4:8])[0] if len(data) >= 8 else None
        raise SpzError(f"SPZ version {version} stores uncompressed headers with ZSTD streams; this reader takes the "
                       f"gzip versions {READABLE_VERSIONS} (convert with splat-transform --spz-version 3)")
    if data[:2] != b"\x1f\x8b":
        raise SpzError(f"not an SPZ file: it starts with {data[:4]!r}, not a gzip stream (SPZ versions "
                       f"{READABLE_VERSIONS} are gzip-compressed)")
    try:
        return gzip.decompress(data)
    except EOFError:
        raise SpzError("truncated SPZ file: the gzip stream ends early") from None
    except (OSError, zlib.error) as exc:
        raise SpzError(f"corrupt SPZ file: {exc}") from None


def read_spz(path_or_bytes: str | os.PathLike | bytes) -> Gaussians:
    """Gaussians (CPU, float32, right-down-forward like the .ply) from an SPZ file of version 2 or 3."""
    data = bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray, memoryview)) else Path(path_or_bytes).read_bytes()
    raw = _decompress(data)
    if len(raw) < HEADER.size:
        raise SpzError(f"truncated SPZ file: {len(raw)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, n, degree, frac, _flags, _reserved = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise SpzError(f"not an SPZ file: magic 0x{magic:08x}, expected 0x{MAGIC:08x} ('NGSP')")
    if version not in READABLE_VERSIONS:
        raise SpzError(f"unsupported SPZ version {version}: this reader takes versions {READABLE_VERSIONS}")
    if degree > MAX_SH_DEGREE:
        raise SpzError(f"SPZ header says SH degree {degree}; versions {READABLE_VERSIONS} hold 0..{MAX_SH_DEGREE}")
    k = num_sh_coeffs(degree)
    rot_bytes = 4 if version >= 3 else 3
    sizes = [9 * n, n, 3 * n, 3 * n, rot_bytes * n, 3 * (k - 1) * n]
    expected = HEADER.size + sum(sizes)
    if len(raw) < expected:
        raise SpzError(f"truncated SPZ file: {n} points of SH degree {degree} need {expected} bytes, "
                       f"the stream holds {len(raw)}")
    if len(raw) > expected:
        raise SpzError(f"SPZ stream holds {len(raw) - expected} bytes after the {n} points it declares")
    offsets = np.cumsum([HEADER.size] + sizes)
    buf = np.frombuffer(raw, dtype=np.uint8)
    block = lambda i: buf[offsets[i]:offsets[i + 1]]  # noqa: E731

    p = block(0).reshape(n, 3, 3).astype(np.int32)
    fixed = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)  # sign extension
    flip = np.array([1.0, -1.0, -1.0])
    means = fixed.astype(np.float64) / (1 << frac) * flip
    opacities = block(1).astype(np.float64) / 255.0
    dc = (block(2).reshape(n, 3).astype(np.float64) / 255.0 - 0.5) / COLOR_SCALE
    scales = np.exp(block(3).reshape(n, 3).astype(np.float64) / 16.0 - 10.0)
    rb = block(4).reshape(n, rot_bytes)
    if version >= 3:
        xyzw = _unpack_smallest_three(rb)
    else:
        xyz = rb.astype(np.float64) / 127.5 - 1.0
        xyzw = np.concatenate([xyz, np.sqrt(np.clip(1.0 - (xyz * xyz).sum(1, keepdims=True), 0.0, None))], axis=1)
    wxyz = np.stack([xyzw[:, 3], xyzw[:, 0], -xyzw[:, 1], -xyzw[:, 2]], axis=1)  # RUB -> RDF
    sh = np.zeros((n, k, 3), dtype=np.float64)
    sh[:, 0] = dc
    if k > 1:
        rest = (block(5).reshape(n, k - 1, 3).astype(np.float64) - 128.0) / 128.0
        sh[:, 1:] = rest * FLIP_YZ_SH_SIGNS[1:k, None]
    sh_degree_of(k)
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return Gaussians(means=f(means), quats=f(wxyz), scales=f(scales), opacities=f(opacities), sh=f(sh))
