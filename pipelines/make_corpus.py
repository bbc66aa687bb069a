"""Build a clip corpus (Parquet shards, vist3a.io.corpus) for stitching.

    python -m pipelines.make_corpus --scenes /data/DL3DV-10K --out s3://bucket/corpora/dl3dv
    python -m pipelines.make_corpus --procedural 64 --frames 9 --size 64 --out out/corpus

--scenes: a directory of scenes in the nerfstudio / DL3DV layout: every directory holding a
  transforms.json (frames[].file_path relative to it, frames[].transform_matrix camera-to-world in
  the OpenGL convention, fl_x/fl_y/cx/cy/w/h globally or per frame) becomes one clip per
  --clip-frames frames (default: the whole scene), frames in file-name order. Cameras are stored as
  OpenCV world-to-camera extrinsics and pixel intrinsics at the stored image size. Images keep their
  original bytes unless --resize asks for a smaller size. A caption.txt beside transforms.json (or a
  "caption" key in it) becomes the clip caption.
--procedural N: N random Gaussian scenes filmed along smooth camera paths (vist3a.data.procedural),
  with exact cameras and depth: for tests, demos and the method check.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from vist3a.io.corpus import ClipRecord, CorpusWriter

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # flips camera y and z: OpenGL/Blender -> OpenCV axes


def natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_scenes(root: Path) -> list[Path]:
    """Directories under `root` (itself included) holding a transforms.json, sorted."""
    if (root / "transforms.json").is_file():
        return [root]
    return sorted((p.parent for p in root.rglob("transforms.json")), key=lambda p: natural_key(str(p)))


def intrinsics_of(frame: dict, meta: dict) -> tuple[np.ndarray, int, int]:
    """Pixel K [3,3] and the (w, h) it refers to; per-frame values override the global ones."""
    get = lambda k: frame.get(k, meta.get(k))  # noqa: E731
    w, h = get("w"), get("h")
    fx = get("fl_x")
    fy = get("fl_y") or fx
    if fx is None or w is None or h is None:
        raise ValueError("transforms.json lacks fl_x / w / h")
    cx, cy = get("cx"), get("cy")
    cx = w / 2 if cx is None else cx
    cy = h / 2 if cy is None else cy
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64), int(w), int(h)


def load_image_bytes(path: Path, resize: int | None) -> tuple[bytes, int, int]:
    """(encoded bytes, width, height): the file as it is, or re-encoded with its shorter side = resize."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if not resize or min(w, h) <= resize:
            return data, w, h
        scale = resize / min(w, h)
        size = (round(w * scale), round(h * scale))
        out = io.BytesIO()
        fmt = "JPEG" if (im.format or "").upper() == "JPEG" else "PNG"
        small = im.convert("RGB").resize(size, Image.LANCZOS)
        small.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return out.getvalue(), size[0], size[1]


def scene_clips(scene: Path, root: Path, clip_frames: int = 0, stride: int = 1, resize: int | None = None) -> Iterator[ClipRecord]:
    """The clips of one nerfstudio scene."""
    meta = json.loads((scene / "transforms.json").read_text())
    frames = sorted(meta.get("frames", []), key=lambda f: natural_key(f["file_path"]))[::stride]
    if not frames:
        raise ValueError(f"{scene}/transforms.json has no frames")
    caption = meta.get("caption")
    if (scene / "caption.txt").is_file():
        caption = (scene / "caption.txt").read_text().strip()
    rel = scene.relative_to(root).as_posix() if scene != root else scene.name
    size = clip_frames or len(frames)
    for start in range(0, len(frames), size):
        chunk = frames[start:start + size]
        if clip_frames and len(chunk) < clip_frames:
            break  # a short tail would not give a full clip
        images, ks, w2cs = [], [], []
        width = height = None
        for f in chunk:
            data, w, h = load_image_bytes(scene / f["file_path"], resize)
            if width is None:
                width, height = w, h
            elif (w, h) != (width, height):
                raise ValueError(f"{scene}: frames of different sizes ({width}x{height} and {w}x{h})")
            k, kw, kh = intrinsics_of(f, meta)
            k[0] *= w / kw  # intrinsics follow the stored image size
            k[1] *= h / kh
            c2w = np.asarray(f["transform_matrix"], dtype=np.float64).reshape(4, 4) @ GL_TO_CV
            images.append(data)
            ks.append(k)
            w2cs.append(np.linalg.inv(c2w))
        clip_id = rel if not clip_frames else f"{rel}#{start // size:04d}"
        yield ClipRecord(id=clip_id, frames=images, width=width, height=height, intrinsics=np.stack(ks).astype(np.float32),
                         extrinsics=np.stack(w2cs).astype(np.float32), caption=caption, source=str(scene))


def _procedural(args: tuple) -> ClipRecord:
    import torch

    from vist3a.data import procedural_clip

    torch.set_num_threads(1)
    index, seed, frames, size = args
    return procedural_clip(index, seed, frames, size)


def procedural_records(n: int, seed: int, frames: int, size: int, jobs: int) -> Iterator[ClipRecord]:
    work = [(i, seed, frames, size) for i in range(n)]
    if jobs <= 1:
        yield from map(_procedural, work)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(_procedural, work, chunksize=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipelines.make_corpus", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scenes", help="directory of nerfstudio/DL3DV scenes (each with transforms.json)")
    src.add_argument("--procedural", type=int, metavar="N", help="write N procedural clips")
    p.add_argument("--out", required=True, help="corpus directory or s3:// prefix")
    p.add_argument("--clips-per-shard", type=int, default=64)
    p.add_argument("--row-group", type=int, default=4, help="clips per Parquet row group (the unit read at once)")
    p.add_argument("--clip-frames", type=int, default=0, help="--scenes: split scenes into clips of this many frames (0: whole scene)")
    p.add_argument("--stride", type=int, default=1, help="--scenes: keep every n-th frame")
    p.add_argument("--resize", type=int, default=None, help="--scenes: downscale so the shorter side is this many pixels")
    p.add_argument("--frames", type=int, default=9, help="--procedural: frames per clip")
    p.add_argument("--size", type=int, default=64, help="--procedural: square frame size")
    p.add_argument("--seed", type=int, default=0, help="--procedural: corpus seed")
    p.add_argument("--jobs", type=int, default=1, help="--procedural: rendering processes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.scenes:
            root = Path(args.scenes).expanduser()
            scenes = find_scenes(root)
            if not scenes:
                raise FileNotFoundError(f"no transforms.json under {root}")
            records = (c for s in scenes for c in scene_clips(s, root, args.clip_frames, args.stride, args.resize))
        else:
            records = procedural_records(args.procedural, args.seed, args.frames, args.size, args.jobs)
        with CorpusWriter(args.out, args.clips_per_shard, args.row_group) as writer:
            for i, clip in enumerate(records, 1):
                writer.write(clip)
                if i % 16 == 0:
                    print(f"[make_corpus] {i} clips ({time.perf_counter() - t0:.0f}s)", flush=True)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"make_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(f"[make_corpus] wrote {writer.manifest['clips']} clips in {len(writer.shards)} shard(s) to {args.out} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
