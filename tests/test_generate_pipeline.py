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
    final = pq.read_table(out / "manifest")  # the directory, as the dataset card tells users to read it
    assert final.schema.equals(MANIFEST_SCHEMA) and final.num_rows == len(rows)
    assert not list(out.glob("commits/*.parquet"))  # every commit part folded into the manifest's buckets
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
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == summary["manifest"] == {"rows": len(rows), "done": 4, "failed": len(rows) - 4}
    assert card["failures_by_reason"]["prompt too long"] == 1 and card["licences"] == {"random weights (no licence terms)": 4}
    assert card["bytes"]["ply"] == sum(r["ply_bytes"] for r in rows.values() if r["status"] == "done") > 0
    assert card["timings_s"]["sample_s"]["n"] == 4 and card["last_run"]["duplicates_collapsed"] == 2
    readme = (out / "README.md").read_text()
    assert "4 scenes done" in readme and 'pd.read_parquet("manifest/")' in readme and "random weights" in readme
    done_rows = [r for r in rows.values() if r["status"] == "done"]
    assert {r["licence"] for r in done_rows} == {"random weights (no licence terms)"}
    prov = json.loads(done_rows[0]["provenance"])
    assert prov["model"]["preset"] == "tiny" and prov["sampling"]["steps"] == 2 and "torch" in prov["versions"]
    # the same command again: nothing to do, nothing rewritten, and no prompt file even read (a finished
    # run read all four whole, inputs.json says, and none has changed)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("scenes/*/*.ply")}
    record = json.loads((out / "inputs.json").read_text())["files"]
    assert sorted(os.path.basename(f) for f in record) == ["a.txt", "b.jsonl", "c.csv", "d.parquet"]
    assert record[str(tmp_path / "in" / "c.csv")]["rows"] == 1 and record[str(tmp_path / "in" / "a.txt")]["rows"] == 5
    again = run(_cfg(tmp_path / "in", out))
    assert again["this_run"] == {**again["this_run"], "done": 0, "failed": 0, "rows_read": 0, "files_skipped_unread": 4,
                                 "rows_in_files_skipped": 5 + 4 + 1 + 2}
    assert {p: p.stat().st_mtime_ns for p in out.glob("scenes/*/*.ply")} == mtimes
    # a file that changed is read again, its recorded rows skipped one by one; a limited run reads a part
    # of it only, so it does not count as read whole
    with open(tmp_path / "in" / "c.csv", "a") as f:
        f.write("a quiet pond,\n")
    limited = run(_cfg(tmp_path / "in", out, limit=1))["this_run"]
    assert (limited["files_skipped_unread"], limited["rows_read"], limited["already_recorded"], limited["done"]) == (3, 1, 1, 0)
    changed = run(_cfg(tmp_path / "in", out))["this_run"]
    assert (changed["files_skipped_unread"], changed["rows_read"], changed["already_recorded"], changed["done"]) == (3, 2, 1, 1)
    assert {p: p.stat().st_mtime_ns for p in out.glob("scenes/*/*.ply")}.items() > mtimes.items()
    assert json.loads((out / "inputs.json").read_text())["files"][str(tmp_path / "in" / "c.csv")]["rows"] == 2


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
    # a row that cannot be generated is recorded under an id of its own, never the one it gave
    assert rows["bad.parquet:row1"]["error"] == "missing prompt" and rows["bad.parquet:row1"]["id"].startswith("invalid-")
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
    assert exists(f"{out}/dataset.json") and exists(f"{out}/README.md")
    fs, root = filesystem(out)
    assert fs.glob(f"{root}/manifest/bucket-*.parquet") and not fs.glob(f"{root}/commits/*.parquet")


def _committed_rows(parts) -> int:
    """Distinct ids in the commit parts. Not dot-files: a writer killed between its temp file and the
    rename leaves a whole `.tmp-*.parquet` that the manifest (rightly) ignores, and a retried task rewrites
    the same part, so counting rows of every `*.parquet` can count one scene twice."""
    ids = set()
    for p in parts.glob("*.parquet"):
        if p.name.startswith("."):
            continue
        try:
            ids.update(pq.read_table(p, columns=["id"]).column("id").to_pylist())
        except (OSError, pa.ArrowInvalid):  # a part being renamed into place
            pass
    return len(ids)


def _wait_rows(parts, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and _committed_rows(parts) < n:
        assert proc.poll() is None, "the run ended before the kill"
        time.sleep(0.2)
    assert _committed_rows(parts) >= n


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


def _kill_tree(proc):
    """SIGKILL the driver and every process under it at once (a crash of the whole local Ray); wait them out."""
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline:
        alive = []
        for pid in tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes {alive} outlived SIGKILL")


def test_sigkill_worker_then_driver_then_resume_exactly_once(tmp_path, repo_root):
    prompts = [f"scene number {i} with a tree" for i in range(8)]
    bad = b"bad \xff bytes\n" + b"word " * 200 + b"\n"  # two bad rows: blocks of bad rows alone (batch_size 1)
    (tmp_path / "p.txt").write_bytes(("\n".join(prompts) + "\n").encode() + bad)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipelines.generate", "--config", "deploy/generate.yaml",
            "--set", f"generate.input={tmp_path / 'p.txt'}", "--set", f"generate.output={out}",
            # generation (many steps) is the slow stage, so the generator actor is busy when killed
            "--set", "sampling.steps=24", "--set", "generate.batch_size=1", "--set", "generate.commit_scenes=1",
            "--set", "splats.preview_size=32",
            "--set", "splats.preview_views=1",
            "--set", "ray.progress_bars=false"]
    env = {**os.environ, "PYTHONPATH": repo_root}
    proc = subprocess.Popen(args, cwd=repo_root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "commits"
    try:
        # 1) workers die mid-work: SIGKILL the generator actor while it runs a batch, then a
        #    writer task's process; Ray restarts the actor / retries the task and the run goes on.
        _kill_worker(proc, "MapBatches(GenerateScenes)", busy=True)
        _kill_worker(proc, "MapBatches(write_scenes)")
        # 2) then the driver crashes with its whole local Ray (SIGKILL to every process at once).
        _wait_rows(parts, 3, proc)  # the two bad rows (committed at validation) and at least one scene
        _kill_tree(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = read_manifest(str(out)).to_pylist()
    committed_before, failed_before = len(before), sum(r["status"] == "failed" for r in before)
    assert 3 <= committed_before < len(prompts) + 2, "the kill should land mid-way"
    done = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _check_consistent(str(out))
    assert sorted(r["prompt"] for r in rows if r["status"] == "done") == sorted(prompts)
    assert sorted(r["source"] for r in rows if r["status"] == "failed") == ["p.txt:10", "p.txt:9"]
    # exactly once: every committed row of both runs is folded into manifest/, where each id appears once
    assert not list(parts.glob("*.parquet"))
    all_rows = pa.concat_tables([pq.read_table(p) for p in (out / "manifest").glob("bucket-*.parquet")])
    ids = all_rows.column("id").to_pylist()
    total = len(prompts) + 2
    assert len(ids) == len(set(ids)) == total
    assert (f"{committed_before} already recorded, {len(prompts) - (committed_before - failed_before)} done, "
            f"{2 - failed_before} failed") in done.stdout
    assert not list(out.rglob(".tmp-*"))  # no half-written file left behind


def test_a_killed_runs_finished_read_units_are_not_read_again(tmp_path, repo_root):
    """Read units whose every row has an outcome are recorded in inputs.json while the run goes on; after a
    SIGKILL of the driver and its Ray, the rerun skips them unread and reads only the rest, exactly once."""
    prompts = [f"scene number {i} with a tree" for i in range(12)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")  # 64-byte units: lines 1-3 start in the first
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipelines.generate", "--config", "deploy/generate.yaml", "--no-progress-bar",
            "--set", f"generate.input={tmp_path / 'p.txt'}", "--set", f"generate.output={out}",
            "--set", f"generate.read_chunk_mb={64 / 2**20}", "--set", "generate.progress_every_s=0.5",
            "--set", "sampling.steps=24", "--set", "generate.batch_size=1", "--set", "generate.commit_scenes=1",
            "--set", "splats.preview_size=32", "--set", "splats.preview_views=1", "--set", "ray.progress_bars=false"]
    env = {**os.environ, "PYTHONPATH": repo_root}
    proc = subprocess.Popen(args, cwd=repo_root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = out / "inputs.json"

    def first_unit_done() -> bool:
        try:
            units = json.loads(record.read_text())["units"]
        except (OSError, ValueError, KeyError):
            return False
        return any(d["start"] == 0 for u in units.values() for d in u["done"])

    try:
        deadline = time.time() + 300
        while not first_unit_done():
            assert proc.poll() is None, "the run ended before its first read unit was recorded"
            assert time.time() < deadline, "no finished read unit was recorded"
            time.sleep(0.1)
        _kill_tree(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (units,) = json.loads(record.read_text())["units"].values()
    skipped_rows = sum(d["rows"] for d in units["done"])
    # newlines before the unit's last byte: what numbers the next unit's lines (vist3a.io.prompts.count_newlines)
    text = (tmp_path / "p.txt").read_text()
    assert units["done"][0] == {"start": 0, "end": 64, "rows": 3, "newlines": text[:63].count("\n")}
    before = {r["id"]: r for r in read_manifest(str(out)).to_pylist()}
    assert skipped_rows <= len(before) < len(prompts), "the kill should land mid-way"
    done = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (f"{len(units['done'])} read unit(s) (≈{skipped_rows} rows) are skipped unread" in done.stdout)
    assert f"this run: {len(prompts) - skipped_rows} rows read" in done.stdout
    assert f"{len(before) - skipped_rows} already recorded, {len(prompts) - len(before)} done" in done.stdout
    rows = _check_consistent(str(out))
    assert sorted(r["prompt"] for r in rows if r["status"] == "done") == sorted(prompts)
    assert all(before[r["id"]] == r for r in rows if r["id"] in before)  # what the killed run committed stays
    ids = pa.concat_tables([pq.read_table(p) for p in (out / "manifest").glob("bucket-*.parquet")]).column("id")
    assert len(ids) == len(set(ids.to_pylist())) == len(prompts)
    finished = json.loads(record.read_text())
    assert finished["units"] == {} and list(finished["files"]) == [str(tmp_path / "p.txt")]


def test_prompt_set_over_many_files_and_read_units_on_s3(tmp_path, s3_bucket, ray_local):
    """A prompt set split over many S3 files, each line file cut into many read units, read by two
    validators sharing a two-shard id ledger: every row once, line numbers right, duplicates across files
    collapsed to one scene, a conflicting id recorded as such; a rerun does nothing."""
    from pipelines.generate import run
    from vist3a.io import write_text

    prompts = [f"a scene of kind {k}" for k in range(6)]
    for f in range(5):  # the same six prompts spread over five files, most of them twice
        lines = [json.dumps({"prompt": prompts[(f + k) % 6], "pad": "x" * 40}) for k in range(3)]
        write_text(f"s3://{s3_bucket}/many/part-{f}.jsonl", "\n".join(lines) + "\n")
    write_text(f"s3://{s3_bucket}/many/ids.jsonl", json.dumps({"id": "fixed", "prompt": "a castle"}) + "\n"
               + json.dumps({"id": "fixed", "prompt": "a different castle"}) + "\n" + '{"prompt": ""}\n')
    out = f"s3://{s3_bucket}/many-out"
    summary = run(_cfg(f"s3://{s3_bucket}/many/", out, validators=2, read_chunk_mb=64 / 2**20, block_rows=2,
                       commit_scenes=2))
    rows = _check_consistent(out)
    done = sorted(r["prompt"] for r in rows if r["status"] == "done")
    assert done == sorted(prompts + ["a castle"]) or done == sorted(prompts + ["a different castle"])
    failed = {r["source"]: r["error"] for r in rows if r["status"] == "failed"}
    assert failed.pop("ids.jsonl:3") == "empty prompt"
    ((src, err),) = failed.items()  # whichever of the two "fixed" rows a validator admitted second
    assert src in ("ids.jsonl:1", "ids.jsonl:2") and err.startswith("duplicate id 'fixed' with a different prompt")
    r = summary["this_run"]
    assert (r["rows_read"], r["done"], r["duplicates_collapsed"], r["conflicting_ids"]) == (18, 7, 15 - 6, 1)
    assert summary["manifest"] == {"rows": 9, "done": 7, "failed": 2}
    again = run(_cfg(f"s3://{s3_bucket}/many/", out, validators=2, read_chunk_mb=64 / 2**20))["this_run"]
    assert (again["files_skipped_unread"], again["rows_read"], again["done"], again["failed"]) == (6, 0, 0, 0)
    # a changed object (new ETag) is read again: its recorded rows are skipped before any claim, so the
    # conflict stays as it was, and only the new row is generated
    write_text(f"s3://{s3_bucket}/many/ids.jsonl", json.dumps({"id": "fixed", "prompt": "a castle"}) + "\n"
               + json.dumps({"id": "fixed", "prompt": "a different castle"}) + "\n" + '{"prompt": ""}\n'
               + json.dumps({"prompt": "a lighthouse"}) + "\n")
    changed = run(_cfg(f"s3://{s3_bucket}/many/", out, validators=2, read_chunk_mb=64 / 2**20))["this_run"]
    assert (changed["files_skipped_unread"], changed["rows_read"], changed["already_recorded"], changed["done"],
            changed["failed"]) == (5, 4, 3, 1, 0)
    after = _check_consistent(out)
    assert [r for r in after if r["prompt"] != "a lighthouse"] == rows and len(after) == len(rows) + 1
