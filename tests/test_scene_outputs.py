"""The generator's compaction steps and scene files as splats.* configures them (tiny preset)."""

from __future__ import annotations

import json

import pytest
import torch

from vist3a.config import build_config
from vist3a.splats.compact import CompactSettings, compact
from vist3a.splats.spz import read_spz

FAST = ["sampling.steps=2", "splats.preview_views=1", "splats.preview_size=32"]


@pytest.fixture(scope="module")
def generators():
    from vist3a.generator import SceneGenerator

    plain = SceneGenerator(build_config({}, FAST))
    small = SceneGenerator(build_config({}, FAST + ["splats.voxel_size=0.05", "splats.min_opacity=0.3",
                                                    "splats.max_gaussians=40", "splats.formats=[ply, spz]"]))
    return plain, small


def test_compaction_runs_configured_steps_and_is_recorded(generators, tmp_path):
    from vist3a.generator import generate_scene

    plain, small = generators
    full = plain.generate(["a red barn"], [3])[0]
    assert full.compaction == {"decoded": full.num_gaussians, "steps": []}  # tiny's defaults: nothing dropped
    scene = generate_scene("a red barn", out=str(tmp_path), seed=3, generator=small)
    meta = json.loads((tmp_path / "meta.json").read_text())
    steps = meta["compaction"]["steps"]
    assert meta["compaction"]["decoded"] == full.num_gaussians
    assert [s["step"] for s in steps] == ["voxel_merge", "opacity_prune", "cap"]
    assert steps[0]["weights"] == "confidence" and steps[0]["before"] == full.num_gaussians
    assert [s["before"] for s in steps[1:]] == [s["after"] for s in steps[:-1]]
    assert steps[-1]["after"] == meta["num_gaussians"] == scene.num_gaussians <= 40
    # the same steps run by hand on the uncompacted scene give the written one (same weights: the head's confidence)
    decoded = small.decoder(small.video.sample([small.model_prompt("a red barn")], [3], steps=2, guidance=small.cfg.sampling.guidance,
                                                shift=small.cfg.sampling.shift, frames=small.cfg.sampling.frames,
                                                height=small.cfg.sampling.height, width=small.cfg.sampling.width,
                                                negative_prompt=[""]))
    conf = decoded.recon.gaussian_params[0, ..., -1].reshape(-1)
    expect, _ = compact(decoded.gaussians[0].detach(), CompactSettings(0.05, 0.3, 40), conf, decoded.cameras[0])
    torch.testing.assert_close(scene.gaussians.means, expect.means)
    # both files: the .spz reads back as the scene within its quantisation
    assert {p.name for p in tmp_path.iterdir()} == {"scene.ply", "scene.spz", "preview.png", "cameras.json", "meta.json"}
    back = read_spz(tmp_path / "scene.spz")
    assert back.num == scene.num_gaussians
    assert (back.means - scene.gaussians.means).abs().max() <= 0.5 / 4096 + 1e-6
    assert (back.opacities - scene.gaussians.opacities).abs().max() <= 0.5 / 255 + 1e-6


def test_scene_files_follow_formats(generators):
    from vist3a.generator import scene_files

    plain, _ = generators
    scene = plain.generate(["a lighthouse"], [1])[0]
    meta = plain.meta(scene)
    assert set(scene_files(scene, meta, 0, ["spz"])) == {"scene.spz", "preview.png", "cameras.json", "meta.json"}
    assert set(scene_files(scene, meta)) == {"scene.ply", "preview.png", "cameras.json", "meta.json"}
    with pytest.raises(ValueError, match="scene formats"):
        scene_files(scene, meta, 0, ["obj"])


def test_presets_write_spz_for_real_models_and_ply_for_tiny():
    from vist3a.presets import PRESETS

    assert build_config({}).splats.formats == ["ply"]
    for name in PRESETS:
        if name.startswith("vist3a-") or name.endswith("+anysplat"):
            assert PRESETS[name]["splats"]["formats"] == ["spz"], name


def test_bulk_write_stage_records_every_file_uri_and_bytes(generators, tmp_path):
    """pipelines.generate.write_scenes (called directly, no Ray): both formats, each file's URI and size."""
    import os
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.generate import write_scenes
    from vist3a.dataset import MANIFEST_SCHEMA, STAGE_SCHEMA

    _, small = generators
    scene = small.generate(["a windmill"], [2])[0]
    batch = pa.Table.from_pylist([{"id": "s1", "prompt": "a windmill", "negative_prompt": "", "seed": 2, "source": "t",
                                   "error": None, "scene": pickle.dumps(scene), "meta": json.dumps(small.meta(scene))}],
                                 schema=STAGE_SCHEMA)
    out = str(tmp_path / "ds")
    write_scenes(batch, out, {}, 0, ["ply", "spz"])
    (part,) = (tmp_path / "ds" / "commits").iterdir()
    row = pq.read_table(part, schema=MANIFEST_SCHEMA).to_pylist()[0]
    assert row["status"] == "done" and row["scene_uri"] == row["ply_uri"] and row["spz_uri"].endswith("/s1.spz")
    for prefix in ("ply", "spz", "preview", "cameras", "meta"):
        assert row[f"{prefix}_bytes"] == os.path.getsize(row[f"{prefix}_uri"]) > 0, prefix
    assert read_spz(row["spz_uri"]).num == row["num_gaussians"] == scene.num_gaussians
    write_scenes(batch, str(tmp_path / "spz_only"), {}, 0, ["spz"])
    (part,) = (tmp_path / "spz_only" / "commits").iterdir()
    row = pq.read_table(part, schema=MANIFEST_SCHEMA).to_pylist()[0]
    assert row["ply_uri"] is None and row["ply_bytes"] is None and row["scene_uri"] == row["spz_uri"]


def test_serve_run_batch_writes_and_lists_scene_spz(generators, tmp_path):
    """Serve's batch step (no Ray) with splats.formats [spz]: scene.spz is stored, listed and readable."""
    from pipelines.serve import run_batch
    from vist3a.io.scene_store import SceneStore, new_scene_id

    _, small = generators
    store = SceneStore(str(tmp_path))
    job = {"id": new_scene_id(), "prompt": "a canal boat", "seed": 4, "steps": 2, "guidance": 5.0}
    store.put_status(job["id"], "queued")
    (out,) = run_batch(small, store, [job], ply_sh_degree=0, formats=["spz"])
    assert out["status"] == "done", out
    assert "scene.spz" in out["result"]["files"] and "scene.ply" not in out["result"]["files"]
    assert read_spz(store.read_file(job["id"], "scene.spz")).num == out["result"]["num_gaussians"]
    assert store.read_file(job["id"], "scene.ply") is None
