"""Scenes/s of pipelines.generate (Ray Data) vs. a plain single-process loop, same prompts and model.

Run by hand (not a test):  .venv/bin/python benchmarks/generate_throughput.py --prompts 24
Both sides include model loading, generation, encoding and writing every file; the pipeline side
also includes prompt validation and its manifest. Ray's own start-up is excluded (done once).
Target from the issue: >= 0.95x the plain loop per actor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def plain_loop(cfg, prompts, out):
    import torch

    from vist3a.dataset import write_scene
    from vist3a.generator import SceneGenerator, scene_files
    from vist3a.ids import prompt_id, seed_from

    torch.set_num_threads(int(cfg.generate.cpus_per_actor))
    t0 = time.perf_counter()
    gen = SceneGenerator(cfg)
    bs = cfg.generate.batch_size
    for i in range(0, len(prompts), bs):
        chunk = prompts[i:i + bs]
        ids = [prompt_id(p) for p in chunk]
        for sid, scene in zip(ids, gen.generate(chunk, [seed_from(s) for s in ids])):
            write_scene(out, sid, scene_files(scene, gen.meta(scene), cfg.splats.ply_sh_degree))
    return time.perf_counter() - t0


def pipeline(cfg, out):
    from pipelines.generate import run

    t0 = time.perf_counter()
    summary = run(cfg)
    assert summary["manifest"]["done"] == summary["this_run"]["done"], summary
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()

    import ray

    from vist3a.config import build_config

    tmp = tempfile.mkdtemp(prefix="vist3a-bench-")
    prompts = [f"benchmark scene {i}: a house by a lake" for i in range(args.prompts)]
    with open(os.path.join(tmp, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")

    def cfg(actors, out):
        return build_config({
            "sampling": {"steps": args.steps},
            "splats": {"preview_views": 2, "preview_size": 64},
            "generate": {"input": os.path.join(tmp, "prompts.txt"), "output": out, "actors": actors,
                         "cpus_per_actor": 1, "batch_size": args.batch_size, "progress_every_s": 1e9},
            "ray": {"progress_bars": False},
        })

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2)
    results = {}
    results["plain loop"] = plain_loop(cfg(1, ""), prompts, os.path.join(tmp, "plain"))
    for actors in (1, 2):
        results[f"pipeline, {actors} actor(s)"] = pipeline(cfg(actors, os.path.join(tmp, f"ray{actors}")), None)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    n = args.prompts
    base = n / results["plain loop"]
    print(f"\n{n} prompts, {args.steps} steps, batch {args.batch_size}, {os.cpu_count()} cores")
    for name, secs in results.items():
        rate = n / secs
        print(f"  {name:24s} {secs:7.1f} s  {rate:6.3f} scenes/s  {rate / base:5.2f}x plain loop")
    r1 = n / results["pipeline, 1 actor(s)"] / base
    r2 = n / results["pipeline, 2 actor(s)"] / base
    print(f"per actor: 1 actor {r1:.2f}x, 2 actors {r2 / 2:.2f}x of the plain loop (target >= 0.95)")


if __name__ == "__main__":
    main()
