"""Shared fixtures: a real S3-compatible server on loopback (moto server mode) and one local Ray."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    for item in items:  # anything that starts Ray is marked `ray` (deselect with -m "not ray")
        if {"ray_local", "serve_app"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> str:
    """The repository's root directory (subprocesses run there, deploy/ files are read from it)."""
    return REPO


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a busy 2-core machine more threads spin against each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint on 127.0.0.1; the AWS variables point s3fs (and pyarrow) at it, as a user would."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, s3_server):
    """One local Ray instance for the session (4 logical CPUs so actors and CPU stages fit on 2 cores).

    Started after the S3 server so its workers inherit the AWS variables, as on a real cluster."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_app(ray_local, tmp_path_factory):
    """The HTTP endpoint (pipelines.serve, tiny preset, fast settings) on 127.0.0.1:<free port>, with an
    API key (requests send `serve_app.headers`). Small queue (4) so the 503 path is reachable; one
    cheap preview per scene to keep generation short."""
    from types import SimpleNamespace

    from ray import serve

    from pipelines.serve import run_local
    from vist3a.config import load_config

    store = tmp_path_factory.mktemp("serve-store")
    cfg = load_config(None, [
        f"serve.store={store}", "sampling.steps=2", "splats.preview_views=1", "splats.preview_size=64",
        "splats.formats=[ply,spz]",  # both, as a real preset can: the viewer page then draws the .spz
        "serve.max_queued_generations=4", "serve.batch_max_size=4", "serve.batch_wait_timeout_s=0.2",
        "serve.max_steps=8", "serve.max_guidance=10", "serve.retry_after_s=3", "serve.max_body_bytes=4096",
        "serve.api_key_env=VIST3A_TEST_API_KEY",
    ])
    key = "test-key-" + os.urandom(8).hex()
    port = free_port()
    run_local(cfg, port=port, model_options={"ray_actor_options": {"num_cpus": 0.5}},
              api_options={"ray_actor_options": {"num_cpus": 0.25,
                                                 "runtime_env": {"env_vars": {"VIST3A_TEST_API_KEY": key}}}})
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", cfg=cfg, store=str(store), api_key=key,
                          headers={"X-API-Key": key})
    serve.shutdown()


@pytest.fixture(scope="session")
def stitch_corpus(tmp_path_factory):
    """A small procedural clip corpus (6 clips of 7 frames, 64 px; 2 shards, 3 row groups) on local disk."""
    from vist3a.data import procedural_clips
    from vist3a.io.corpus import CorpusWriter

    root = tmp_path_factory.mktemp("stitch-corpus")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: more threads spin against each other
    try:
        with CorpusWriter(str(root), clips_per_shard=4, clips_per_row_group=2) as writer:
            for clip in procedural_clips(6, seed=7, frames=7, size=64):
                writer.write(clip)
    finally:
        torch.set_num_threads(threads)
    return str(root)
