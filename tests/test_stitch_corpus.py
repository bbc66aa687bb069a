"""Clip corpus: Parquet round trip (local and S3), worker splits, nerfstudio conversion, procedural ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vist3a.io.corpus import ClipRecord, Corpus, CorpusWriter


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clip(i: int, frames: int = 3, cameras: bool = True) -> ClipRecord:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, size=(frames, 8, 12, 3), dtype=np.uint8)
    k = np.tile(np.array([[10.0, 0, 6], [0, 10, 4], [0, 0, 1]], np.float32), (frames, 1, 1))
    w2c = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
    w2c[:, :3, 3] = rng.normal(size=(frames, 3))
    return ClipRecord.from_arrays(f"c{i}", img, intrinsics=k if cameras else None, extrinsics=w2c if cameras else None,
                                  depth=rng.random((frames, 8, 12)).astype(np.float32) if cameras else None,
                                  caption=f"clip {i}" if cameras else None)


def test_round_trip_keeps_everything_locally(tmp_path):
    _round_trip(str(tmp_path / "corpus"))


def test_round_trip_keeps_everything_on_s3(s3_bucket):
    _round_trip(f"s3://{s3_bucket}/corpus")


def _round_trip(uri: str) -> None:
    clips = [_clip(i, cameras=i % 2 == 0) for i in range(5)]
    with CorpusWriter(uri, clips_per_shard=2, clips_per_row_group=1) as w:
        for c in clips:
            w.write(c)
    corpus = Corpus(uri)
    assert corpus.shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert len(corpus) == 5 and len(corpus.units()) == 5
    assert corpus.frame_counts() == [3] * 5
    for original, back in zip(clips, corpus.iter_clips()):
        assert back.id == original.id and back.caption == original.caption
        assert torch.equal(back.frames_tensor(), original.frames_tensor())
        for name in ("intrinsics", "extrinsics"):
            a, b = getattr(original, name), getattr(back, name)
            assert (a is None and b is None) or np.array_equal(a, b)
        da, db = original.depth_tensor(), back.depth_tensor()
        assert (da is None and db is None) or torch.equal(da, db)
    assert corpus.clip(3).id == "c3"


def test_refuses_bad_clips(tmp_path):
    bad = _clip(0)
    bad.extrinsics = bad.extrinsics[:2]
    with pytest.raises(ValueError, match="extrinsics"), CorpusWriter(str(tmp_path)) as w:
        w.write(bad)
    with pytest.raises(ValueError, match="duplicate"), CorpusWriter(str(tmp_path / "b")) as w:
        w.write(_clip(1))
        w.write(_clip(1))
    with pytest.raises(FileNotFoundError):
        Corpus(str(tmp_path / "nothing")).shards


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_workers_split_the_clips_exactly_once(tmp_path, world):
    with CorpusWriter(str(tmp_path), clips_per_shard=3, clips_per_row_group=2) as w:
        for i in range(8):
            w.write(_clip(i, frames=1, cameras=False))
    corpus = Corpus(str(tmp_path))
    seen = [c.id for r in range(world) for c in corpus.iter_clips(r, world, columns=["id", "frames", "width", "height", "num_frames"])]
    assert sorted(seen) == sorted(f"c{i}" for i in range(8))
    by_index = sorted(i for r in range(world) for i in corpus.worker_clip_indices(r, world))
    assert by_index == list(range(8))


def test_nerfstudio_scene_converts_to_opencv_cameras(tmp_path):
    """A scene written in the nerfstudio layout (OpenGL camera-to-world) comes back as the OpenCV
    world-to-camera matrices and intrinsics it was made from, also after --resize."""
    from PIL import Image

    from pipelines.make_corpus import main
    from vist3a.data import procedural_clip

    clip = procedural_clip(0, seed=1, frames=4, size=32)
    scene = tmp_path / "scenes" / "room1"
    (scene / "images").mkdir(parents=True)
    frames = []
    for t in range(4):
        name = f"images/frame_{t + 1:05d}.png"
        Image.fromarray((clip.frames_tensor([t])[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(scene / name)
        c2w_gl = np.linalg.inv(clip.extrinsics[t].astype(np.float64)) @ np.diag([1.0, -1, -1, 1])
        frames.append({"file_path": name, "transform_matrix": c2w_gl.tolist()})
    k = clip.intrinsics[0]
    meta = {"fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2]), "w": 32, "h": 32,
            "frames": frames[::-1]}  # unordered on purpose
    (scene / "transforms.json").write_text(json.dumps(meta))
    (scene / "caption.txt").write_text("a room\n")

    assert main(["--scenes", str(tmp_path / "scenes"), "--out", str(tmp_path / "c1")]) == 0
    back = next(Corpus(str(tmp_path / "c1")).iter_clips())
    assert back.id == "room1" and back.caption == "a room" and back.num_frames == 4
    np.testing.assert_allclose(back.extrinsics, clip.extrinsics, atol=1e-5)
    np.testing.assert_allclose(back.intrinsics, clip.intrinsics, atol=1e-5)
    assert torch.allclose(back.frames_tensor(), clip.frames_tensor(), atol=1 / 255 + 1e-6)

    assert main(["--scenes", str(tmp_path / "scenes"), "--out", str(tmp_path / "c2"), "--resize", "16",
                 "--clip-frames", "2"]) == 0
    halves = list(Corpus(str(tmp_path / "c2")).iter_clips())
    assert [c.id for c in halves] == ["room1#0000", "room1#0001"]
    assert (halves[0].width, halves[0].height) == (16, 16)
    np.testing.assert_allclose(halves[1].intrinsics[0, :2], clip.intrinsics[2, :2] / 2, atol=1e-5)
    np.testing.assert_allclose(halves[1].extrinsics, clip.extrinsics[2:], atol=1e-5)


def test_procedural_depth_and_cameras_agree_across_frames():
    """Unproject frame 0's depth with its camera, project into frame 1: the depths there match."""
    from vist3a.data import procedural_clip
    from vist3a.recon import rigid_inverse, unproject_depth

    clip = procedural_clip(2, seed=3, frames=5, size=48)
    depth = clip.depth_tensor()
    k, w2c = torch.from_numpy(clip.intrinsics), torch.from_numpy(clip.extrinsics)
    assert (depth > 0).float().mean() > 0.95  # the shell closes the scene
    pts = unproject_depth(depth[0], k[0], rigid_inverse(w2c[0]))[depth[0] > 0]
    cam = pts @ w2c[1, :3, :3].T + w2c[1, :3, 3]
    uv = cam @ k[1].T
    u, v = (uv[:, 0] / uv[:, 2]).floor().long(), (uv[:, 1] / uv[:, 2]).floor().long()
    inside = (u >= 0) & (u < 48) & (v >= 0) & (v < 48) & (cam[:, 2] > 0)
    assert inside.float().mean() > 0.5
    rel = (depth[1][v[inside], u[inside]] - cam[inside, 2]).abs() / cam[inside, 2]
    assert rel.median() < 0.03
    # a wrong camera (frame 3's) does not agree
    cam3 = pts @ w2c[3, :3, :3].T + w2c[3, :3, 3]
    assert not torch.allclose(cam3, cam, atol=0.05)
