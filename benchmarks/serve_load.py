"""Load benchmark of the HTTP endpoint on loopback: N concurrent clients, each posting a prompt and
polling until its scene is done, then the next. Three kinds of run on the same machine and preset,
interleaved over --rounds (two applications side by side, one model replica each):

  batched     serve.batch_max_size = --batch (default 4): @serve.batch gathers concurrent prompts
  unbatched   serve.batch_max_size = 1: one generator call per prompt
  mixed       batched, with --malformed (default 20%) of the requests malformed (answered 422)

Reported per run: end-to-end latency (POST -> done) p50/p99, POST latency p50/p99, scenes/s, the
batch sizes the model replica saw, and the 503s met; then the batched/unbatched throughput ratio.

    python benchmarks/serve_load.py                       # starts a local Ray + Serve (tiny preset, CPU)
    python benchmarks/serve_load.py --clients 16 --requests 64 --set sampling.steps=8
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --runs mixed   # a running endpoint (serve run ...)

Traffic goes to 127.0.0.1 only, and every run is bounded by --requests and --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

MALFORMED = [
    {},                                   # missing prompt
    {"prompt": ""},                       # empty
    {"prompt": "a", "steps": 0},          # out of range
    {"prompt": "a", "steps": "many"},     # wrong type
    {"prompt": "a", "guidance": -3},
    {"prompt": "a", "extra": True},       # unknown field
    {"prompt": "word " * 300},            # over the token limit
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


async def client_loop(client: httpx.AsyncClient, jobs: asyncio.Queue, malformed: float, steps: int, out: dict,
                      deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            k = jobs.get_nowait()
        except asyncio.QueueEmpty:
            return
        bad = int((k + 1) * malformed) > int(k * malformed)  # exactly round(requests * malformed) of them
        body = MALFORMED[k % len(MALFORMED)] if bad else {"prompt": f"a scene number {k}", "seed": k, "steps": steps}
        t0 = time.perf_counter()
        while True:
            r = await client.post("/v1/scenes", json=body)
            if r.status_code != 503:
                break
            out["503"] += 1  # queue full: honour Retry-After (capped, this is a benchmark)
            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 2.0))
        out["post_s"].append(time.perf_counter() - t0)
        if bad:
            out["malformed_s"].append(time.perf_counter() - t0)
            out["codes"][r.status_code] = out["codes"].get(r.status_code, 0) + 1
            continue
        if r.status_code != 202:
            out["codes"][r.status_code] = out["codes"].get(r.status_code, 0) + 1
            continue
        scene_id = r.json()["id"]
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            status = (await client.get(f"/v1/scenes/{scene_id}")).json()["status"]
            if status in ("done", "failed"):
                out["codes"][status] = out["codes"].get(status, 0) + 1
                if status == "done":
                    out["e2e_s"].append(time.perf_counter() - t0)
                break


async def drive(url: str, headers: dict, clients: int, requests: int, malformed: float, steps: int, timeout: float) -> dict:
    """One run: `requests` jobs shared by `clients` concurrent clients; raw timings."""
    jobs: asyncio.Queue = asyncio.Queue()
    for k in range(requests):
        jobs.put_nowait(k)
    out = {"e2e_s": [], "post_s": [], "malformed_s": [], "codes": {}, "503": 0, "requests": requests}
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(client_loop(client, jobs, malformed, steps, out, deadline) for _ in range(clients)))
        out["wall_s"] = time.perf_counter() - t0
    return out


def summarize(runs: list[dict], clients: int, malformed: float) -> dict:
    """Figures over one or more runs of the same kind (latencies pooled, throughput = done / wall time)."""
    pool = {k: [x for r in runs for x in r[k]] for k in ("e2e_s", "post_s", "malformed_s")}
    codes: dict = {}
    for r in runs:
        for k, v in r["codes"].items():
            codes[str(k)] = codes.get(str(k), 0) + v
    wall = sum(r["wall_s"] for r in runs)
    done = len(pool["e2e_s"])
    return {
        "runs": len(runs), "requests": sum(r["requests"] for r in runs), "clients": clients, "malformed_share": malformed,
        "wall_s": round(wall, 2), "scenes_done": done, "scenes_per_s": round(done / wall, 4) if wall else None,
        "scenes_per_s_each_run": [round(len(r["e2e_s"]) / r["wall_s"], 4) for r in runs],
        "e2e_p50_s": pct(pool["e2e_s"], 50), "e2e_p99_s": pct(pool["e2e_s"], 99),
        "post_p50_ms": pct([1000 * x for x in pool["post_s"]], 50), "post_p99_ms": pct([1000 * x for x in pool["post_s"]], 99),
        "malformed_p50_ms": pct([1000 * x for x in pool["malformed_s"]], 50),
        "outcomes": codes, "answered_503": sum(r["503"] for r in runs),
    }


def deploy(args, batch_max_size: int, store: str, port: int, name: str) -> float:
    """Deploy one application (its own model replica) under /<name>; seconds until ready."""
    from pipelines.serve import run_local
    from vist3a.config import load_config

    cfg = load_config(args.config, [
        f"serve.store={store}", f"serve.batch_max_size={batch_max_size}", f"serve.batch_wait_timeout_s={args.batch_wait}",
        f"serve.max_queued_generations={max(args.clients * 2, 4)}", "serve.retention_max_scenes=100000",
        "serve.api_key_env=null", "splats.preview_views=1", "splats.preview_size=64", *args.overrides])
    t0 = time.perf_counter()
    run_local(cfg, port=port, name=name, route_prefix=f"/{name}",
              model_options={"ray_actor_options": {"num_cpus": args.model_cpus},
                             "max_ongoing_requests": max(2 * batch_max_size, 2), "max_queued_requests": 4 * args.clients},
              api_options={"ray_actor_options": {"num_cpus": 0.25}})
    return time.perf_counter() - t0


def batch_counts(app: str) -> collections.Counter:
    """Generator calls per batch size that the app's model replica made so far."""
    from ray import serve

    return collections.Counter(serve.get_deployment_handle("SceneModel", app_name=app).stats.remote().result())


def show(name: str, r: dict) -> None:
    print(f"[{name:9s}] {r['scenes_done']}/{r['requests']} scenes in {r['wall_s']} s = {r['scenes_per_s']} scenes/s "
          f"(runs: {r['scenes_per_s_each_run']}) | "
          f"end-to-end p50 {r['e2e_p50_s']} s, p99 {r['e2e_p99_s']} s | POST p50 {r['post_p50_ms']} ms, "
          f"p99 {r['post_p99_ms']} ms | 503s {r['answered_503']} | outcomes {r['outcomes']}"
          + (f" | malformed answered in p50 {r['malformed_p50_ms']} ms" if r["malformed_p50_ms"] is not None else "")
          + (f" | batches: {r['model_calls']} calls, mean {r['mean_batch']}, max {r['max_batch']}" if "model_calls" in r else ""),
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default %(default)s)")
    p.add_argument("--requests", type=int, default=16, help="requests per run (default %(default)s)")
    p.add_argument("--malformed", type=float, default=0.2, help="malformed share in the mixed run (default %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="serve.batch_max_size of the batched runs (default %(default)s)")
    p.add_argument("--batch-wait", type=float, default=0.1, help="serve.batch_wait_timeout_s (default %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="sampling steps per request (default %(default)s)")
    p.add_argument("--runs", default="batched,unbatched,mixed", help="which runs, comma-separated")
    p.add_argument("--config", default=None, help="vist3a config YAML (default: the embedded tiny default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--model-cpus", type=float, default=1.0, help="CPUs of the model replica (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="upper bound per run in seconds (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each kind, interleaved (default %(default)s)")
    p.add_argument("--url", default=None, help="benchmark a running endpoint instead (loopback only; no deploys)")
    p.add_argument("--api-key-env", default=None, help="with --url: variable holding the X-API-Key to send")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - {"batched", "unbatched", "mixed"}
    if unknown:
        p.error(f"unknown runs: {', '.join(sorted(unknown))}")
    results: dict[str, dict] = {}

    if args.url:
        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error("--url must be a loopback address")
        headers = {"X-API-Key": os.environ[args.api_key_env]} if args.api_key_env else {}
        for name in runs:
            share = args.malformed if name == "mixed" else 0.0
            raw = [asyncio.run(drive(args.url, headers, args.clients, args.requests, share, args.steps, args.timeout))
                   for _ in range(args.rounds)]
            results[name] = summarize(raw, args.clients, share)
            show(name, results[name])
    else:
        import ray
        from ray import serve

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO}}, log_to_driver=False)
        store = tempfile.mkdtemp(prefix="vist3a-serve-bench-")
        port = free_port()
        # Both set-ups side by side (one model replica each, idle while the other runs), and the runs
        # interleaved round by round, so a busy machine slows both alike.
        app_of = {"batched": "batched", "mixed": "batched", "unbatched": "unbatched"}
        size_of = {"batched": args.batch, "unbatched": 1}
        raw: dict[str, list] = {name: [] for name in runs}
        sizes: dict[str, list] = {name: [] for name in runs}
        try:
            for app in sorted({app_of[n] for n in runs}):
                seconds = deploy(args, size_of[app], store, port, app)
                print(f"[deploy   ] {app}: serve.batch_max_size={size_of[app]}, ready in {seconds:.1f} s", flush=True)
                asyncio.run(drive(f"http://127.0.0.1:{port}/{app}", {}, 1, 1, 0.0, args.steps, args.timeout))  # warm-up
            for _ in range(args.rounds):
                for name in runs:
                    app = app_of[name]
                    seen = batch_counts(app)
                    raw[name].append(asyncio.run(drive(f"http://127.0.0.1:{port}/{app}", {}, args.clients, args.requests,
                                                       args.malformed if name == "mixed" else 0.0, args.steps, args.timeout)))
                    sizes[name] += list((batch_counts(app) - seen).elements())
            for name in runs:
                results[name] = summarize(raw[name], args.clients, args.malformed if name == "mixed" else 0.0)
                s = sizes[name]
                results[name].update(batch_max_size=size_of[app_of[name]], model_calls=len(s),
                                     mean_batch=round(float(np.mean(s)), 2) if s else None, max_batch=max(s) if s else None)
                show(name, results[name])
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(store, ignore_errors=True)

    if "batched" in results and "unbatched" in results and results["unbatched"]["scenes_per_s"]:
        ratio = results["batched"]["scenes_per_s"] / results["unbatched"]["scenes_per_s"]
        results["batched_over_unbatched_throughput"] = round(ratio, 3)
        print(f"[summary  ] throughput batched/unbatched = {ratio:.2f}x; "
              f"p50 end-to-end {results['batched']['e2e_p50_s']} s vs {results['unbatched']['e2e_p50_s']} s", flush=True)
    if "mixed" in results and "batched" in results and results["batched"]["scenes_per_s"]:
        ratio = results["mixed"]["scenes_per_s"] / results["batched"]["scenes_per_s"]
        results["mixed_over_batched_throughput"] = round(ratio, 3)
        print(f"[summary  ] with {args.malformed:.0%} malformed: valid scenes/s = {ratio:.2f}x the clean batched run", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
