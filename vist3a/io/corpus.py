"""Multi-view video clip corpus: Parquet shards, one clip per row, on local disk or S3.

Layout under a directory or s3:// prefix:

    shard-00000.parquet, shard-00001.parquet, ...   (row groups of a few clips each)
    manifest.json                                    (written last: shards, clip counts, schema version)

Row schema (`CLIP_SCHEMA`): id, frames (list of encoded images, PNG or the source's JPEG bytes kept
as they are), width/height/num_frames, optional intrinsics [T*9] (pixels at the stored size) and
extrinsics [T*16] (OpenCV world-to-camera), optional depth (list of .npy float32 maps), optional
caption, source.

Why Parquet and not WebDataset-style tar shards:
- a typed schema with nullable camera/depth/caption columns is checked on write and read, where tar
  members and JSON sidecars are only conventions;
- the footer of each shard lists its row groups and row counts, so workers split the corpus and
  finetuning samples clips at random (and resumes at an exact step) without scanning any data,
  while tar is sequential-only;
- reading streams one row group at a time (memory bounded by a few clips), columns can be skipped
  (no depth decoding when unused), and pyarrow / Ray Data read it from S3 natively;
- frames stay in their original encoded bytes, so shards are no bigger than the tar equivalent.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from vist3a.io.frames import resize_frames
from vist3a.io.uri import filesystem, is_s3, join, read_text, write_text

FORMAT = "vist3a-clips/1"
MANIFEST = "manifest.json"
CLIP_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("frames", pa.list_(pa.binary()), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("num_frames", pa.int32(), nullable=False),
    pa.field("intrinsics", pa.list_(pa.float32())),
    pa.field("extrinsics", pa.list_(pa.float32())),
    pa.field("depth", pa.list_(pa.binary())),
    pa.field("caption", pa.string()),
    pa.field("source", pa.string()),
])


# ----------------------------------------------------------------------------- one clip


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H,W,3] -> PNG bytes (lossless: procedural frames keep their exact values)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image (PNG, JPEG, ...) -> uint8 [H,W,3]; alpha is dropped."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_depth(depth: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(depth, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_depth(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class ClipRecord:
    """One clip as stored. Frames stay encoded until `frames_tensor` decodes the ones asked for."""

    id: str
    frames: list[bytes]
    width: int
    height: int
    intrinsics: np.ndarray | None = None  # [T,3,3] pixels at (width, height)
    extrinsics: np.ndarray | None = None  # [T,4,4] OpenCV world-to-camera
    depth: list[bytes] | None = None  # per frame .npy float32 [H,W] (0 = unknown)
    caption: str | None = None
    source: str = ""

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @classmethod
    def from_arrays(cls, clip_id: str, frames, intrinsics=None, extrinsics=None, depth=None, caption=None,
                    source: str = "") -> "ClipRecord":
        """frames [T,3,H,W] float in [0,1] (tensor or array) or [T,H,W,3] uint8 -> PNG-encoded record."""
        arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        if arr.shape[1] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(0, 2, 3, 1)
        _, h, w, _ = arr.shape
        as_np = lambda x: None if x is None else (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))  # noqa: E731
        depth = as_np(depth)
        return cls(id=str(clip_id), frames=[encode_png(np.ascontiguousarray(f)) for f in arr], width=w, height=h,
                   intrinsics=as_np(intrinsics), extrinsics=as_np(extrinsics),
                   depth=None if depth is None else [encode_depth(d) for d in depth], caption=caption, source=source)

    def frames_tensor(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Decoded frames [T,3,H,W] float32 in [0,1]."""
        idx = range(self.num_frames) if indices is None else indices
        arr = np.stack([decode_image(self.frames[i]) for i in idx])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0

    def depth_tensor(self, indices: Sequence[int] | None = None) -> torch.Tensor | None:
        if self.depth is None:
            return None
        idx = range(self.num_frames) if indices is None else indices
        return torch.from_numpy(np.stack([decode_depth(self.depth[i]) for i in idx]))

    def to_row(self) -> dict:
        t = self.num_frames
        for name, arr, shape in (("intrinsics", self.intrinsics, (3, 3)), ("extrinsics", self.extrinsics, (4, 4))):
            if arr is not None and tuple(np.shape(arr)) != (t, *shape):
                raise ValueError(f"clip {self.id}: {name} has shape {np.shape(arr)}, expected {(t, *shape)}")
        if self.depth is not None and len(self.depth) != t:
            raise ValueError(f"clip {self.id}: {len(self.depth)} depth maps for {t} frames")
        flat = lambda a: None if a is None else np.asarray(a, dtype=np.float32).reshape(-1).tolist()  # noqa: E731
        return {"id": self.id, "frames": self.frames, "width": self.width, "height": self.height, "num_frames": t,
                "intrinsics": flat(self.intrinsics), "extrinsics": flat(self.extrinsics), "depth": self.depth,
                "caption": self.caption, "source": self.source}

    @classmethod
    def from_row(cls, row: dict) -> "ClipRecord":
        t = row["num_frames"]
        shaped = lambda v, s: None if v is None else np.asarray(v, dtype=np.float32).reshape(t, *s)  # noqa: E731
        return cls(id=row["id"], frames=list(row["frames"]), width=row["width"], height=row["height"],
                   intrinsics=shaped(row.get("intrinsics"), (3, 3)), extrinsics=shaped(row.get("extrinsics"), (4, 4)),
                   depth=None if row.get("depth") is None else list(row["depth"]), caption=row.get("caption"),
                   source=row.get("source") or "")


# ----------------------------------------------------------------------------- the views a model sees


def select_views(num_frames: int, views: int, rng: np.random.Generator) -> list[int]:
    """The paper's sampling: a random window of up to 4*views frames, its first frame plus views-1 others, sorted."""
    if num_frames < views:
        raise ValueError(f"clip has {num_frames} frames, fewer than the {views} views asked for")
    window = min(num_frames, 4 * views)
    start = int(rng.integers(0, num_frames - window + 1))
    rest = rng.choice(np.arange(start + 1, start + window), size=views - 1, replace=False)
    return [start] + sorted(int(i) for i in rest)


def clip_views(clip: ClipRecord, views: int, size: int, seed: int = 0, step: int = 0) -> torch.Tensor:
    """A corpus clip's `views` frames (select_views, seeded by the clip id, `seed` and `step`), decoded
    and centre-cropped/resized to size x size: [views, 3, size, size] in [0, 1]."""
    rng = np.random.default_rng([seed, zlib.crc32(str(clip.id).encode()), step])
    idx = select_views(clip.num_frames, views, rng)
    return resize_frames(clip.frames_tensor(idx)[None], size)[0]


# ----------------------------------------------------------------------------- writing


class CorpusWriter:
    """Writes clips into shards of `clips_per_shard` (row groups of `clips_per_row_group`), then the manifest.

    Each shard is written to a local temporary file and then renamed (local) or uploaded in one
    object PUT (S3), so readers never see a partial shard; memory holds one row group at a time."""

    def __init__(self, uri: str, clips_per_shard: int = 64, clips_per_row_group: int = 4, storage=None):
        if clips_per_shard < 1 or clips_per_row_group < 1:
            raise ValueError("clips_per_shard and clips_per_row_group must be >= 1")
        self.uri, self.storage = str(uri), storage
        self.clips_per_shard, self.clips_per_row_group = clips_per_shard, clips_per_row_group
        self.shards: list[dict] = []
        self._pending: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._tmp: str | None = None
        self._in_shard = 0
        self._ids: set[str] = set()
        self.manifest: dict | None = None

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, clip: ClipRecord) -> None:
        if clip.id in self._ids:
            raise ValueError(f"duplicate clip id {clip.id!r}")
        self._ids.add(clip.id)
        self._pending.append(clip.to_row())
        self._in_shard += 1
        if len(self._pending) >= self.clips_per_row_group:
            self._flush_row_group()
        if self._in_shard >= self.clips_per_shard:
            self._finish_shard()

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            # Locally the temporary file sits beside the shards, so the final rename is atomic.
            tmp_dir = None
            if not is_s3(self.uri):
                tmp_dir = filesystem(self.uri, self.storage)[1]
                os.makedirs(tmp_dir, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=tmp_dir)
            os.close(fd)
            self._writer = pq.ParquetWriter(self._tmp, CLIP_SCHEMA)
        self._writer.write_table(pa.Table.from_pylist(self._pending, schema=CLIP_SCHEMA))
        self._pending = []

    def _finish_shard(self) -> None:
        self._flush_row_group()
        if self._writer is None:
            return
        self._writer.close()
        name = f"shard-{len(self.shards):05d}.parquet"
        target = join(self.uri, name)
        fs, path = filesystem(target, self.storage)
        if is_s3(target):
            fs.put_file(self._tmp, path)
            os.unlink(self._tmp)
        else:
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, path)
        self.shards.append({"file": name, "clips": self._in_shard})
        self._writer, self._tmp, self._in_shard = None, None, 0

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def close(self) -> dict:
        """Finish the last shard and write manifest.json (the corpus is complete once it exists)."""
        if self.manifest is None:
            self._finish_shard()
            self.manifest = {"format": FORMAT, "shards": self.shards, "clips": sum(s["clips"] for s in self.shards)}
            write_text(join(self.uri, MANIFEST), json.dumps(self.manifest, indent=1), self.storage)
        return self.manifest


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Unit:
    """One row group: the smallest piece of the corpus that is read at once."""

    shard: str  # file name inside the corpus
    row_group: int
    clips: int
    first: int  # global index of its first clip


class Corpus:
    """Reads a corpus written by CorpusWriter (or any directory/prefix of Parquet files with CLIP_SCHEMA)."""

    def __init__(self, uri: str, storage=None, cache_units: int = 2):
        self.uri, self.storage = str(uri), storage
        self._units: list[Unit] | None = None
        self._frame_counts: list[int] | None = None
        self._cache: OrderedDict[tuple[Unit, tuple], list[ClipRecord]] = OrderedDict()
        self._cache_units = cache_units

    @property
    def shards(self) -> list[str]:
        manifest_uri = join(self.uri, MANIFEST)
        fs, root = filesystem(self.uri, self.storage)
        if fs.exists(filesystem(manifest_uri, self.storage)[1]):
            manifest = json.loads(read_text(manifest_uri, self.storage))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"{manifest_uri}: unknown corpus format {manifest.get('format')!r}")
            return [s["file"] for s in manifest["shards"]]
        if not fs.exists(root):
            raise FileNotFoundError(f"corpus not found: {self.uri}")
        names = sorted(n for n in (os.path.basename(p) for p in fs.glob(root.rstrip("/") + "/*.parquet"))
                       if not n.startswith("."))  # .tmp-* files are shards being written
        if not names:
            raise FileNotFoundError(f"no manifest.json or *.parquet shards under {self.uri}")
        return names

    def _open(self, shard: str) -> pq.ParquetFile:
        fs, path = filesystem(join(self.uri, shard), self.storage)
        return pq.ParquetFile(fs.open(path, "rb"))

    def units(self) -> list[Unit]:
        """Every row group of every shard, from the footers alone (no clip data is read)."""
        if self._units is None:
            units, first = [], 0
            for shard in self.shards:
                meta = self._open(shard).metadata
                for rg in range(meta.num_row_groups):
                    n = meta.row_group(rg).num_rows
                    units.append(Unit(shard, rg, n, first))
                    first += n
            self._units = units
        return self._units

    def __len__(self) -> int:
        return sum(u.clips for u in self.units())

    def frame_counts(self) -> list[int]:
        """Frames of every clip, by global index (reads the num_frames column alone)."""
        if self._frame_counts is None:
            self._frame_counts = [n for shard in self.shards
                                  for n in self._open(shard).read(columns=["num_frames"]).column(0).to_pylist()]
        return self._frame_counts

    def read_unit(self, unit: Unit, columns: Sequence[str] | None = None) -> list[ClipRecord]:
        key = (unit, tuple(columns or ()))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._open(unit.shard).read_row_group(unit.row_group, columns=list(columns) if columns else None)
        clips = [ClipRecord.from_row(r) for r in table.to_pylist()]
        self._cache[key] = clips
        while len(self._cache) > self._cache_units:
            self._cache.popitem(last=False)
        return clips

    def worker_units(self, rank: int, world: int) -> tuple[list[Unit], bool]:
        """(units this worker reads, whether it must also filter clips by index).

        With at least as many row groups as workers, worker r reads every world-th row group; with
        fewer, every worker reads all of them and keeps the clips whose index is r mod world."""
        units = self.units()
        if len(units) >= world:
            return units[rank::world], False
        return units, world > 1

    def worker_clip_indices(self, rank: int, world: int) -> list[int]:
        units, by_index = self.worker_units(rank, world)
        idx = [u.first + i for u in units for i in range(u.clips)]
        return [i for i in idx if i % world == rank] if by_index else idx

    def iter_clips(self, rank: int = 0, world: int = 1, columns: Sequence[str] | None = None) -> Iterator[ClipRecord]:
        """Stream this worker's clips, one row group in memory at a time."""
        units, by_index = self.worker_units(rank, world)
        for unit in units:
            table = self._open(unit.shard).read_row_group(unit.row_group, columns=list(columns) if columns else None)
            for i, row in enumerate(table.to_pylist()):
                if not by_index or (unit.first + i) % world == rank:
                    yield ClipRecord.from_row(row)

    def clip(self, index: int, columns: Sequence[str] | None = None) -> ClipRecord:
        """Random access by global index (reads, and caches, the clip's row group)."""
        for unit in self.units():
            if unit.first <= index < unit.first + unit.clips:
                return self.read_unit(unit, columns)[index - unit.first]
        raise IndexError(f"clip index {index} out of range (corpus has {len(self)} clips)")
