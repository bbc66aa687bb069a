"""What the Ray jobs share: starting Ray, where Ray Train keeps checkpoints, a Train run's set-up, an
actor's torch threads, and running a batch so that one bad item fails alone.

One place for the parts of pipelines.generate (Ray Data), pipelines.serve (Ray Serve),
pipelines.stitch and pipelines.align (Ray Train) that are about running jobs rather than about
any one job.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlparse

import pyarrow.fs
import ray
import torch

from vist3a.config import Config, StorageConfig, TrainJobConfig
from vist3a.io import is_s3, join
from vist3a.io.uri import s3_endpoint_and_region

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------- any job


def run_isolated(run: Callable[[list[T]], Sequence[R]], items: list[T], what: str = "generation"
                 ) -> tuple[list[tuple[T, R]], list[tuple[T, str]]]:
    """Run the batch; when it raises, run each item alone, so a single bad item fails alone.

    -> ((item, result) pairs, (item, "<what> failed: Type: message") pairs). Never raises for an item:
    the bulk job records failures as manifest rows and Serve as failed scenes, and both go on."""
    if not items:
        return [], []
    try:
        return list(zip(items, run(items), strict=True)), []
    except Exception:  # noqa: BLE001 - find the failing item(s)
        done, failed = [], []
        for item in items:
            try:
                done.append((item, run([item])[0]))
            except Exception as exc:  # noqa: BLE001 - recorded; the job goes on
                failed.append((item, f"{what} failed: {type(exc).__name__}: {exc}"[:500]))
        return done, failed


def set_torch_threads(cpus: float, on_gpu: bool, configured: int | None = None) -> None:
    """A CPU actor's torch threads follow the (whole) CPUs Ray gave it: torch's default, every core of the
    node, makes the processes sharing a node spin against each other. GPU actors and a set
    runtime.torch_threads (`configured`, which SceneGenerator applies) are left alone."""
    if on_gpu or configured is not None:
        return
    torch.set_num_threads(max(1, int(cpus)))


def init_ray(cfg: Config) -> None:
    """Join the cluster at ray.address, else start a local Ray sized by the `ray` section (once)."""
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 object_store_memory=cfg.ray.object_store_mb * 1024**2 if cfg.ray.object_store_mb else None)


def ray_storage(uri: str, storage: StorageConfig) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig: s3:// goes through a
    pyarrow S3FileSystem on the configured endpoint (MinIO, a test server, AWS)."""
    if not is_s3(uri):
        return os.path.abspath(os.path.expanduser(uri)), None
    endpoint, region = s3_endpoint_and_region(storage)
    kwargs = {"region": region or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return uri[len("s3://"):], pyarrow.fs.S3FileSystem(**kwargs)


# ----------------------------------------------------------------------------- Ray Train
# Ray Train is imported inside these functions: generate and serve share this module and never need it
# (it costs every Data actor and Serve replica a second and its memory at start-up).


def scaling(job: TrainJobConfig) -> ray.train.ScalingConfig:
    """ScalingConfig of a Train job section (stitch_job or align): workers, one GPU each or CPUs only."""
    from ray.train import ScalingConfig

    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    return ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu, resources_per_worker=resources)


def checkpointed_run(job: TrainJobConfig, cfg: Config, name: str | None = None) -> tuple[ray.train.RunConfig, str]:
    """RunConfig that keeps `keep_checkpoints` checkpoints under job.storage_path (default <output>/ray)
    and restarts a failed run from the last one up to `max_failures` times; returns (RunConfig, where)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_path, fs = ray_storage(job.storage_path or join(job.output, "ray"), cfg.storage)
    run = RunConfig(name=name or job.name, storage_path=storage_path, storage_filesystem=fs,
                    failure_config=FailureConfig(max_failures=job.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints))
    return run, f"{storage_path}/{name or job.name}"


def fit(trainer) -> dict:
    """Run a TorchTrainer to the end; the workers' error is raised here. Returns the last reported
    metrics (empty when a finished run was resubmitted), the last checkpoint's path and the seconds."""
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    return {"metrics": result.metrics or {}, "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def worker_setup(job: TrainJobConfig) -> tuple[int, int, torch.device]:
    """(rank, world, device) inside a Ray Train worker; torch threads follow the worker's CPU share.
    `job` is the job's config section (use_gpu, cpus_per_worker): stitch_job or align."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    set_torch_threads(job.cpus_per_worker, job.use_gpu)
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


@contextmanager
def restored_checkpoint() -> Iterator[str | None]:
    """This Train worker's checkpoint to resume from, as a local directory (None on a fresh start).

    Each worker downloads a remote checkpoint into a directory of its own: Checkpoint.as_directory()
    shares one download between the workers of a node, and a worker that finishes reading first can
    delete it while another still reads (seen as a corrupt state.pt on a 2-worker restart)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
    elif isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
    else:
        with tempfile.TemporaryDirectory(prefix="vist3a-resume-") as d:
            yield checkpoint.to_directory(d)


def failure_drill(job: TrainJobConfig, section: str, step: int, resumed: bool, rank: int) -> None:
    """`<section>.fail_at_step`: rank 0 raises at that step of a run that has not been restarted yet
    (how the tests make Ray Train restart a run from its checkpoint)."""
    if job.fail_at_step is not None and step == job.fail_at_step and not resumed and rank == 0:
        raise RuntimeError(f"failure drill: {section}.fail_at_step={job.fail_at_step}")


def checkpoint_due(job: TrainJobConfig, step: int) -> bool:
    """Whether `step` (just completed) gets a checkpoint: every `checkpoint_every` steps and the last one."""
    return step % job.checkpoint_every == 0 or step == job.steps


def report_step(metrics: dict, job: TrainJobConfig, step: int, rank: int, save: Callable[[str], None],
                cfg_json: dict) -> None:
    """Report this step's metrics to Ray Train. Every `checkpoint_every` steps and at the last one, with a
    checkpoint: rank 0 fills a directory with `save(dir)` and the run's config.json (all ranks report)."""
    import ray.train
    from ray.train import Checkpoint

    if not checkpoint_due(job, step):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save(d)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg_json, f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
