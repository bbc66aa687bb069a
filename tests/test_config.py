import pytest

from vist3a.config import ConfigError, build_config, load_config


def test_defaults_are_tiny():
    cfg = load_config()
    assert cfg.preset == "tiny"
    assert cfg.sampling.frames == 5


def test_deploy_local_yaml_is_valid():
    cfg = load_config("deploy/local.yaml")
    assert cfg.model.recon.img_size % cfg.model.recon.patch_size == 0


@pytest.mark.parametrize("name", ["generate.yaml", "generate.cluster.yaml", "stitch.yaml", "stitch.cluster.yaml",
                                  "align.yaml", "align.cluster.yaml", "vist3a.yaml"])
def test_every_job_config_in_deploy_is_valid(name):
    cfg = load_config(f"deploy/{name}")
    if name.endswith(".cluster.yaml"):
        # on a cluster: the released models, on GPUs, everything on S3, joining the running Ray
        # (generation: the release as published; stitching and alignment train their own pieces)
        want = "vist3a-1.3b" if name.startswith("generate") else "wan2.1-1.3b+anysplat"
        assert cfg.preset == want and cfg.ray.address == "auto"
        assert cfg.model.video.weights.startswith("s3://") and cfg.model.recon.weights.startswith("s3://")
        if want == "vist3a-1.3b":
            assert cfg.model.video.lora.startswith("s3://") and cfg.model.stitch.weights.startswith("s3://")
        job = {"generate": cfg.generate, "stitch": cfg.stitch_job, "align": cfg.align}[name.split(".")[0]]
        assert getattr(job, "use_gpu", None) is not False and getattr(job, "gpus_per_actor", 1) >= 1
        assert job.output.startswith("s3://")
    # the stitching layer maps the VAE's latent grid (1/8 of the video) onto the network's token grid
    from vist3a.stitching.spec import StitchSpec

    grid = StitchSpec.parse(cfg.model.stitch.spec).output_size(cfg.sampling.frames, cfg.sampling.height // 8,
                                                               cfg.sampling.width // 8)[1:]
    assert grid == (cfg.model.recon.img_size // cfg.model.recon.patch_size,) * 2


def test_unknown_key_names_path():
    with pytest.raises(ConfigError) as e:
        build_config({"sampling": {"stpes": 4}})
    assert "sampling.stpes" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_names_path_and_value():
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"recon": {"embed_dim": "wide"}}})
    msg = str(e.value)
    assert "model.recon.embed_dim" in msg and "'wide'" in msg


@pytest.mark.parametrize("data,path,value", [
    ({"sampling": {"frames": 6}}, "sampling.frames", "6"),
    ({"sampling": {"steps": 0}}, "sampling.steps", "0"),
    ({"sampling": {"height": 70}}, "sampling.height", "70"),
    ({"model": {"stitch": {"cut": "layer3"}}}, "model.stitch.cut", "'layer3'"),
    ({"runtime": {"device": "tpu"}}, "runtime.device", "'tpu'"),
])
def test_bad_value_names_path_and_value(data, path, value):
    with pytest.raises(ConfigError) as e:
        build_config(data)
    assert path in str(e.value) and value in str(e.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError) as e:
        build_config({"preset": "huge"})
    assert "preset" in str(e.value) and "'huge'" in str(e.value) and "tiny" in str(e.value)


def test_overrides_apply_and_are_validated():
    cfg = build_config({}, ["sampling.steps=7", "sampling.guidance=2.5", "splats.voxel_size=0.01"])
    assert cfg.sampling.steps == 7 and cfg.sampling.guidance == 2.5 and cfg.splats.voxel_size == 0.01
    with pytest.raises(ConfigError) as e:
        build_config({}, ["sampling.nope=1"])
    assert "sampling.nope" in str(e.value)
    with pytest.raises(ConfigError):
        build_config({}, ["sampling.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_voxel_size_and_voxel_footprints_are_exclusive():
    with pytest.raises(ConfigError, match=r"splats: Value error, splats.voxel_size \(0.01\) and splats.voxel_footprints \(2.5\)"):
        load_config(None, ["splats.voxel_size=0.01", "splats.voxel_footprints=2.5"])
    assert load_config(None, ["preset=vist3a-1.3b"]).splats.voxel_footprints == 2.5
