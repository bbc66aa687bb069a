"""The stitching-layer spec grammar: `conv{1|2|3}d_k<K>_o<C>[_s<S>][_p<P>][_d<D>]`.

Each of K, S, P, D is an int (same on every axis) or `TxHxW`. conv1d convolves time only,
conv2d each frame only, conv3d both; all are realised as one Conv3d so that one code path
fits, initialises from ridge regression and loads checkpoints. Example (VIST3A + AnySplat):
`conv3d_k5x3x3_o1024_s1x2x2_p2x1x1` maps Wan latents (16, 13, 64, 64) to (1024, 13, 32, 32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIELD = re.compile(r"^([kospd])(\d+(?:x\d+){0,2})$")


@dataclass(frozen=True)
class StitchSpec:
    kernel: tuple[int, int, int]
    out_channels: int
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (0, 0, 0)
    dilation: tuple[int, int, int] = (1, 1, 1)

    @classmethod
    def parse(cls, text: str) -> "StitchSpec":
        parts = str(text).strip().split("_")
        m = re.fullmatch(r"conv([123])d", parts[0]) if parts else None
        if not m:
            raise ValueError(f"stitch spec {text!r}: must start with conv1d, conv2d or conv3d")
        dims = int(m.group(1))
        fields: dict[str, tuple[int, ...]] = {}
        for p in parts[1:]:
            fm = _FIELD.match(p)
            if not fm:
                raise ValueError(f"stitch spec {text!r}: cannot read field {p!r} (expected k<K>, o<C>, s<S>, p<P> or d<D>)")
            key = fm.group(1)
            if key in fields:
                raise ValueError(f"stitch spec {text!r}: field {key!r} given twice")
            fields[key] = tuple(int(v) for v in fm.group(2).split("x"))
        if "k" not in fields or "o" not in fields:
            raise ValueError(f"stitch spec {text!r}: needs a kernel k<K> and out channels o<C>")
        if len(fields["o"]) != 1 or fields["o"][0] <= 0:
            raise ValueError(f"stitch spec {text!r}: out channels must be one positive int")

        def axes(key: str, default: int, neutral: int) -> tuple[int, int, int]:
            v = fields.get(key, (default,))
            if len(v) == 1:
                v = v * dims
            if len(v) != dims:
                raise ValueError(f"stitch spec {text!r}: field {key!r} has {len(v)} values for a conv{dims}d")
            if dims == 3:
                return tuple(v)  # type: ignore[return-value]
            if dims == 2:
                return (neutral, v[0], v[1])
            return (v[0], neutral, neutral)

        spec = cls(
            kernel=axes("k", 1, 1),
            out_channels=fields["o"][0],
            stride=axes("s", 1, 1),
            padding=axes("p", 0, 0),
            dilation=axes("d", 1, 1),
        )
        if min(spec.kernel) < 1 or min(spec.stride) < 1 or min(spec.dilation) < 1:
            raise ValueError(f"stitch spec {text!r}: kernel, stride and dilation must be >= 1")
        return spec

    def output_size(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Output (T, H, W) for an input of (t, h, w), as Conv3d computes it."""
        out = []
        for n, k, s, p, d in zip((t, h, w), self.kernel, self.stride, self.padding, self.dilation):
            out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)  # type: ignore[return-value]
