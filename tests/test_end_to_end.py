"""Text -> .ply on a CPU with the tiny preset, through the Python API and the `vist3a` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from plyfile import PlyData

from vist3a.config import build_config
from vist3a.splats import read_ply

FAST = ["sampling.steps=2", "splats.preview_views=2", "splats.preview_size=32"]


@pytest.fixture(scope="module")
def generator():
    from vist3a.generator import SceneGenerator

    return SceneGenerator(build_config({}, FAST))


def test_generate_scene_writes_all_files(generator, tmp_path):
    from vist3a.generator import generate_scene

    scene = generate_scene("a red barn in a snowy field", out=str(tmp_path), seed=3, generator=generator)
    assert {p.name for p in tmp_path.iterdir()} == {"scene.ply", "preview.png", "cameras.json", "meta.json"}
    ply = PlyData.read(str(tmp_path / "scene.ply"))
    assert ply["vertex"].count == scene.num_gaussians > 0
    back = read_ply(tmp_path / "scene.ply")
    torch.testing.assert_close(back.means, scene.gaussians.means, atol=1e-6, rtol=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["prompt"] == "a red barn in a snowy field" and meta["seed"] == 3 and meta["preset"] == "tiny"
    assert {"torch", "diffusers", "gsplat"} <= set(meta["versions"]) and meta["timings"]["total_s"] > 0
    cams = json.loads((tmp_path / "cameras.json").read_text())
    assert len(cams["viewmats"]) == build_config({}).sampling.frames  # one predicted camera per video frame


def test_same_seed_same_scene_and_seed_matters(generator):
    a = generator.generate(["a lighthouse"], [5])[0]
    b = generator.generate(["a lighthouse"], [5])[0]
    c = generator.generate(["a lighthouse"], [6])[0]
    assert torch.equal(a.gaussians.means, b.gaussians.means)
    assert not torch.allclose(a.gaussians.sh, c.gaussians.sh)


def test_bad_prompt_refused(generator):
    with pytest.raises(ValueError, match="only whitespace"):
        generator.generate(["   "], [1])
    with pytest.raises(ValueError, match="over the limit"):
        generator.generate(["x" * 1000], [1])


def test_stitched_decoder_refuses_mismatched_latent_grid(generator):
    z = torch.zeros(1, 16, 2, 4, 4)  # a 32x32 video: 4x4 latents, network expects 8x8 tokens
    with pytest.raises(ValueError, match="token grid"):
        generator.decoder(z)


@pytest.fixture
def cli(repo_root):
    """`vist3a ARGS...` in a subprocess at the repository root."""
    def run(*args, **kw):
        return subprocess.run([sys.executable, "-m", "vist3a", *args], cwd=repo_root, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": repo_root}, timeout=300, **kw)
    return run


def test_cli_generate(tmp_path, cli):
    r = cli("generate", "a small greenhouse", "--out", str(tmp_path / "o"), "--seed", "1",
             *[a for kv in FAST for a in ("--set", kv)])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["num_gaussians"] == PlyData.read(str(tmp_path / "o" / "scene.ply"))["vertex"].count


def test_cli_errors_bad_preset_and_unwritable_out(tmp_path, cli):
    r = cli("generate", "x", "--out", str(tmp_path), "--preset", "huge")
    assert r.returncode == 2 and "preset" in r.stderr and "'huge'" in r.stderr and "tiny" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = cli("generate", "x", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "not writable" in r.stderr and str(blocker / "sub") in r.stderr
    r = cli("generate", "x", "--out", str(tmp_path), "--set", "sampling.frames=6")
    assert r.returncode == 2 and "sampling.frames" in r.stderr
    r = cli("generate", "--help")
    assert r.returncode == 0 and "scene.ply" in r.stdout and "examples" in r.stdout
