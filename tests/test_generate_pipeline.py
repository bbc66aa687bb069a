"""pipelines.generate end to end: every input format, bad rows, duplicates, S3, and a SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from plyfile import PlyData

from vist3a.config import build_config
from vist3a.dataset import MANIFEST_SCHEMA, read_manifest, scene_uri
from vist3a.io import exists, filesystem, read_bytes

pytestmark = pytest.mark.ray

FAST = {"sampling": {"steps": 2}, "splats": {"preview_views": 2, "preview_size": 32},
        "generate": {"batch_size": 2, "progress_every_s": 1}, "ray": {"progress_bars": False}}


def _cfg(inp, out, **extra):
    data = json.loads(json.dumps(FAST))
    data["generate"].update(input=str(inp), output=str(out), **extra)
    return build_config(data)


def _write_inputs(d):
    d.mkdir()
    (d / "a.txt").write_bytes(b"a red barn\na red  barn\n   \nbad \xff bytes\n" + b"x" * 300 + b"\n")
    (d / "b.jsonl").write_text("\n".join([
        json.dumps({"prompt": "a blue lake", "seed": 3, "id": "lake"}),
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "a tower", "seed": "nope"}),
        "{broken",
    ]) + "\n")
    (d / "c.csv").write_text("prompt,negative_prompt\na green hill,blurry\n")
    pq.write_table(pa.table({"prompt": ["a stone bridge", "a red barn"]}), d / "d.parquet")


def _check_consistent(out, storage=None):
    """The manifest agrees with the files: every done row's files exist and parse; no orphan scenes."""
    table = read_manifest(out, storage)
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    fs, root = filesystem(out, storage)
    plys = {os.path.basename(p)[:-4] for p in fs.glob(root.rstrip("/") + "/scenes/*/*.ply")}
    done = {r["id"] for r in rows if r["status"] == "done"}
    assert plys == done
    for r in rows:
        if r["status"] == "done":
            assert r["scene_uri"] == scene_uri(out, r["id"])
            ply = PlyData.read(__import__("io").BytesIO(read_bytes(r["scene_uri"], storage)))
            assert ply["vertex"].count == r["num_gaussians"] > 0
            assert exists(r["preview_uri"], storage) and exists(r["cameras_uri"], storage)
        else:
            assert r["error"]
    return rows


def test_formats_bad_rows_duplicates_and_rerun(tmp_path, ray_local):
    from pipelines.generate import run

    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    summary = run(_cfg(tmp_path / "in", out))
    rows = {r["source"]: r for r in _check_consistent(str(out))}
    final = pq.read_table(out / "manifest.parquet")
    assert final.schema.equals(MANIFEST_SCHEMA)
    done = {r["prompt"] for r in rows.values() if r["status"] == "done"}
    assert done == {"a red barn", "a blue lake", "a green hill", "a stone bridge"}
    assert rows["b.jsonl:1"]["id"] == "lake" and rows["b.jsonl:1"]["seed"] == 3
    assert rows["c.csv:2"]["negative_prompt"] == "blurry"
    reasons = {k: v["error"] for k, v in rows.items() if v["status"] == "failed"}
    assert reasons["a.txt:4"] == "undecodable bytes (not UTF-8)"
    assert "tokens, over the limit" in reasons["a.txt:5"]
    assert reasons["b.jsonl:2"] == "empty prompt"
    assert "bad seed 'nope'" in reasons["b.jsonl:3"]
    assert reasons["b.jsonl:4"].startswith("invalid JSON")
    assert summary["duplicates_collapsed"] == 2  # "a red  barn" (txt) and "a red barn" (parquet)
    # the same command again: nothing to do, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("scenes/*/*.ply")}
    again = run(_cfg(tmp_path / "in", out))
    assert again["this_run"] == {**again["this_run"], "done": 0, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in out.glob("scenes/*/*.ply")} == mtimes


def _write_bad_rows_only(d):
    """Prompt files of every format whose every row is bad: each block the stages see is all-bad rows, so
    each text column is all null (Ray Data's numpy batches made those float NaN)."""
    d.mkdir()
    (d / "bad.jsonl").write_text("\n".join([json.dumps({"prompt": ""}), json.dumps({"prompt": "a tower", "seed": "nope"}),
                                            "{broken", json.dumps({"prompt": 42})]) + "\n")
    (d / "bad.csv").write_text("prompt,seed\n,\n   ,4\n")
    (d / "bad.txt").write_bytes(b"bad \xff bytes\n" + b"word " * 200 + b"\n")
    pq.write_table(pa.table({"prompt": [None, "  "], "id": ["p1", "../escape"]}), d / "bad.parquet")


def test_prompt_sets_of_bad_rows_alone_finish_in_every_format(tmp_path, ray_local):
    from pipelines.generate import run

    _write_bad_rows_only(tmp_path / "in")
    out = tmp_path / "out"
    summary = run(_cfg(tmp_path / "in", out, batch_size=1))
    rows = {r["source"]: r for r in _check_consistent(str(out))}
    assert summary["manifest"] == {"rows": 10, "done": 0, "failed": 10}
    assert {k.split(":")[0] for k in rows} == {"bad.jsonl", "bad.csv", "bad.txt", "bad.parquet"}
    assert all(r["status"] == "failed" and r["error"] for r in rows.values())
    assert rows["bad.jsonl:1"]["error"] == "empty prompt" and rows["bad.csv:3"]["error"] == "empty prompt"
    assert "tokens, over the limit" in rows["bad.txt:2"]["error"]
    assert rows["bad.parquet:row1"]["error"] == "missing prompt" and rows["bad.parquet:row1"]["id"] == "p1"
    assert rows["bad.parquet:row2"]["error"].startswith("bad id '../escape'")
    assert not (tmp_path / "escape").exists() and not list(out.glob("scenes/**/*.ply"))
    # the rerun that once crashed every time: nothing left to do, and failed rows retried on request
    assert run(_cfg(tmp_path / "in", out))["this_run"]["failed"] == 0
    assert run(_cfg(tmp_path / "in", out, retry_failed=True))["this_run"]["failed"] == 10


def test_s3_round_trip(tmp_path, s3_bucket, ray_local):
    from pipelines.generate import run
    from vist3a.io import write_text

    write_text(f"s3://{s3_bucket}/prompts/p.txt", "a windmill\na harbour at night\n")
    out = f"s3://{s3_bucket}/ds"
    cfg = _cfg(f"s3://{s3_bucket}/prompts/", out)
    # a template and a default negative prompt, as the vist3a presets have: rows (txt: none of their own)
    # get the default; users see their own prompt, the manifest and meta.json what the model was given
    cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(
        update={"prompt_template": "an orbit around `{prompt}`", "negative_prompt": "blurry"})})
    run(cfg)
    rows = _check_consistent(out)
    assert sorted(r["prompt"] for r in rows) == ["a harbour at night", "a windmill"]
    assert {(r["negative_prompt"], r["prompt_template"]) for r in rows} == {("blurry", "an orbit around `{prompt}`")}
    meta = json.loads(read_bytes(rows[0]["scene_uri"][:-4] + ".meta.json"))
    assert meta["prompt"] == rows[0]["prompt"] and meta["prompt_template"] == "an orbit around `{prompt}`"
    assert exists(f"{out}/manifest.parquet")


def _wait_parts(parts, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < n:
        assert proc.poll() is None, "the run ended before the kill"
        time.sleep(0.2)
    assert len(list(parts.glob("*.parquet"))) >= n


def _kill_worker(proc, title, busy=False, timeout=300):
    """SIGKILL the first descendant process of `proc` whose title holds `title` (busy: in a call)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before the kill"
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                name = " ".join(c.cmdline())
            except psutil.Error:
                continue
            if title in name and not (busy and name.rstrip().endswith("__init__")):
                c.kill()
                return
        time.sleep(0.05)
    raise AssertionError(f"no process {title!r} appeared")


def test_sigkill_worker_then_driver_then_resume_exactly_once(tmp_path, repo_root):
    prompts = [f"scene number {i} with a tree" for i in range(8)]
    bad = b"bad \xff bytes\n" + b"word " * 200 + b"\n"  # two bad rows: blocks of bad rows alone (batch_size 1)
    (tmp_path / "p.txt").write_bytes(("\n".join(prompts) + "\n").encode() + bad)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipelines.generate", "--config", "deploy/generate.yaml",
            "--set", f"generate.input={tmp_path / 'p.txt'}", "--set", f"generate.output={out}",
            # generation (many steps) is the slow stage, so the generator actor is busy when killed
            "--set", "sampling.steps=24", "--set", "generate.batch_size=1", "--set", "splats.preview_size=32",
            "--set", "splats.preview_views=1",
            "--set", "ray.progress_bars=false"]
    env = {**os.environ, "PYTHONPATH": repo_root}
    proc = subprocess.Popen(args, cwd=repo_root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "manifest" / "parts"
    try:
        # 1) workers die mid-work: SIGKILL the generator actor while it runs a batch, then a
        #    writer task's process; Ray restarts the actor / retries the task and the run goes on.
        _kill_worker(proc, "MapBatches(GenerateScenes)", busy=True)
        _kill_worker(proc, "MapBatches(write_scenes)")
        # 2) then the driver crashes with its whole local Ray (SIGKILL to every process at once).
        _wait_parts(parts, 3, proc)
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    def alive():
        out = []
        for p in tree:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.time() + 15  # a SIGKILLed process on a loaded 2-core machine can take a moment to go
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive()
    before = read_manifest(str(out)).to_pylist()
    committed_before, failed_before = len(before), sum(r["status"] == "failed" for r in before)
    assert 3 <= committed_before < len(prompts) + 2, "the kill should land mid-way"
    done = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _check_consistent(str(out))
    assert sorted(r["prompt"] for r in rows if r["status"] == "done") == sorted(prompts)
    assert sorted(r["source"] for r in rows if r["status"] == "failed") == ["p.txt:10", "p.txt:9"]
    # exactly once: across every committed part of both runs, each id appears once
    all_parts = pa.concat_tables([pq.read_table(p) for p in parts.glob("*.parquet")])
    ids = all_parts.column("id").to_pylist()
    total = len(prompts) + 2
    assert len(ids) == len(set(ids)) == total
    assert f"{committed_before} already recorded, {total - committed_before} to do" in done.stdout
    assert f"done {len(prompts) - committed_before + failed_before}, failed {2 - failed_before}" in done.stdout
    assert not list(out.rglob(".tmp-*"))  # no half-written file left behind
