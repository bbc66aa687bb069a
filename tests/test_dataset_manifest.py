import pyarrow.parquet as pq
import pytest

from vist3a.dataset import (MANIFEST_SCHEMA, consolidate_manifest, empty_manifest_row, read_manifest, recorded_ids,
                            scene_uri, shard_of, write_manifest_part, write_scene)
from vist3a.io import read_bytes


_CLOCK = iter(range(10**9))


def _row(i, status="done"):
    import datetime as dt

    r = empty_manifest_row()
    r.update(id=i, prompt=f"p {i}", negative_prompt="", seed=1, status=status,
             finished_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=next(_CLOCK)))
    return r


def test_parts_dedupe_and_prefer_done(tmp_path):
    out = str(tmp_path)
    write_manifest_part(out, [_row("a", "failed"), _row("b")])
    write_manifest_part(out, [_row("a"), _row("c", "failed")])
    write_manifest_part(out, [_row("b")])  # a retried batch: same id again
    table = read_manifest(out)
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    status = dict(zip(table.column("id").to_pylist(), table.column("status").to_pylist()))
    assert status == {"a": "done", "b": "done", "c": "failed"}
    assert recorded_ids(out) == {"a", "b", "c"}
    assert recorded_ids(out, include_failed=False) == {"a", "b"}
    stats = consolidate_manifest(out)
    assert stats == {"parts_folded": 3, "rows_in": 5, "buckets_written": len({shard_of(i)[0] for i in "abc"}), "rows": 3}
    assert not list((tmp_path / "commits").glob("*.parquet"))
    final = pq.read_table(tmp_path / "manifest")  # the directory, as pandas / pyarrow users read it
    assert final.schema.equals(MANIFEST_SCHEMA) and final.num_rows == 3
    assert read_manifest(out).to_pylist() == table.to_pylist()


def test_same_batch_rewrites_same_part(tmp_path):
    a = write_manifest_part(str(tmp_path), [_row("x"), _row("y")])
    b = write_manifest_part(str(tmp_path), [_row("y"), _row("x")])
    assert a == b


def test_scene_layout_local_and_s3(tmp_path, s3_bucket):
    for out in (str(tmp_path), f"s3://{s3_bucket}/ds"):
        uris = write_scene(out, "abc", {"scene.ply": b"ply", "meta.json": b"{}"})
        assert uris["scene.ply"] == scene_uri(out, "abc") and uris["scene.ply"].endswith(f"scenes/{shard_of('abc')}/abc.ply")
        assert read_bytes(uris["scene.ply"]) == b"ply"
        write_manifest_part(out, [_row("abc")])
        assert recorded_ids(out) == {"abc"}


def test_temp_files_of_killed_writers_are_removed_and_finished_files_kept(tmp_path):
    from vist3a.io import remove_temp_files, write_bytes

    write_bytes(str(tmp_path / "scenes" / "ab" / "x.ply"), b"complete")
    (tmp_path / "scenes" / "cd").mkdir(parents=True)
    (tmp_path / "scenes" / "cd" / ".tmp-k1lled-y.ply").write_bytes(b"half")
    (tmp_path / "commits").mkdir(parents=True)
    (tmp_path / "commits" / ".tmp-k1lled-p.parquet").write_bytes(b"")
    assert remove_temp_files(str(tmp_path)) == 2
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == ["scenes/ab/x.ply"]
    assert (tmp_path / "scenes" / "ab" / "x.ply").read_bytes() == b"complete"
    assert remove_temp_files("s3://bucket/never-has-temp-files") == 0


def test_a_value_that_does_not_fit_names_the_row_field_and_value(tmp_path):
    import pytest

    bad = _row("a")
    bad["prompt"] = float("nan")  # what an all-null column of a numpy batch used to hand over
    with pytest.raises(ValueError, match=r"manifest row 'a': field 'prompt' = nan \(float\) does not fit string"):
        write_manifest_part(str(tmp_path), [_row("b"), bad])
    assert not (tmp_path / "commits").exists()


def test_stage_rows_of_bad_rows_alone_stay_typed(tmp_path):
    """All-bad rows through the write stage as Arrow tables of STAGE_SCHEMA: null columns keep their type."""
    import pyarrow as pa

    from pipelines.generate import write_scenes
    from vist3a.dataset import RESULT_SCHEMA, STAGE_SCHEMA, typed_table

    rows = [{"id": f"invalid-{k}", "seed": k, "source": f"p.csv:{k}", "error": "empty prompt"} for k in range(3)]
    batch = typed_table(rows, STAGE_SCHEMA)
    assert batch.schema.equals(STAGE_SCHEMA) and batch.column("prompt").null_count == 3
    assert batch.column("prompt").type == pa.string()
    out = write_scenes(batch, str(tmp_path), {}, 0)
    assert out.schema.equals(RESULT_SCHEMA) and out.column("status").to_pylist() == ["failed"] * 3
    assert read_manifest(str(tmp_path)).column("error").to_pylist() == ["empty prompt"] * 3


# ----------------------------------------------------------------------------- consolidation, killed (issue 15)


def _commit_log(out, parts=12, rows=9):
    """A commit log as a run leaves it: parts of several ids each, retried ids, a failed row later done."""
    for p in range(parts):  # each id is in two parts (a retried unit), every part is a different set of ids
        write_manifest_part(out, [_row(f"s{(p * rows + k) % (parts * rows // 2):05d}", "failed" if k == 0 else "done")
                                  for k in range(rows)])
    write_manifest_part(out, [_row("s00000"), _row("late")])  # regenerated after failing: done wins


def _unique_in_manifest_dir(out):
    import pyarrow as pa

    files = sorted((__import__("pathlib").Path(out) / "manifest").glob("bucket-*.parquet"))
    ids = pa.concat_tables([pq.read_table(f) for f in files]).column("id").to_pylist() if files else []
    assert len(ids) == len(set(ids)), "manifest/ holds an id twice"
    return set(ids)


def _unique_in_buckets(out):
    """The ids in manifest/ (bucket files read one by one, local or S3): asserts none is there twice."""
    import io as _io

    from vist3a.dataset import manifest_files
    from vist3a.io import filesystem

    fs, _ = filesystem(out)
    ids = []
    for p in manifest_files(out)["buckets"]:
        with fs.open(p, "rb") as f:
            ids += pq.read_table(_io.BytesIO(f.read())).column("id").to_pylist()
    assert len(ids) == len(set(ids)), "manifest/ holds an id twice"
    return set(ids)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_consolidation_failing_at_any_step_loses_and_duplicates_nothing(tmp_path, monkeypatch, where, request):
    """Stop consolidation at each of its writes and deletes in turn (as a kill would), then finish it; on
    local disk and on S3 (moto server)."""
    import vist3a.dataset as dataset
    from vist3a.dataset import manifest_files
    from vist3a.io import filesystem

    base = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"

    small = where == "s3"  # every S3 step is a request: fewer of them

    def make_state(out):  # an earlier consolidation (buckets exist: rewrites merge old rows too), then more parts
        _commit_log(out, parts=3 if small else 6, rows=5 if small else 9)
        consolidate_manifest(out)
        _commit_log(out, parts=2 if small else 4, rows=4 if small else 7)

    fs = filesystem(base)[0]  # the (cached) instance consolidation uses; s3fs makes rm_file per instance
    real_write, real_rm = dataset.write_bytes, fs.rm_file
    steps, limit = 0, 10**9

    class Killed(Exception):
        pass

    def step():
        nonlocal steps
        steps += 1
        if steps > limit:
            raise Killed

    monkeypatch.setattr(dataset, "write_bytes", lambda *a, **k: (step(), real_write(*a, **k))[1])
    def rm(*a, **k):
        step()
        return real_rm(*a, **k)

    monkeypatch.setattr(fs, "rm_file", rm)
    assert filesystem(f"{base}/x")[0] is fs
    make_state(f"{base}/count")
    def rows(out):  # the manifest's rows, less finished_at (each make_state writes its own timestamps)
        return [{k: v for k, v in r.items() if k != "finished_at"} for r in read_manifest(out).to_pylist()]

    want = rows(f"{base}/count")
    steps = 0
    consolidate_manifest(f"{base}/count")
    total = steps
    assert total >= 7  # every step below is a real place to stop (bucket writes, then deletes)
    for stop in range(total):
        out = f"{base}/stop{stop}"
        limit = 10**9
        make_state(out)
        steps, limit = 0, stop
        with pytest.raises(Killed):
            consolidate_manifest(out)
        limit = 10**9
        assert rows(out) == want, f"stopped after {stop} steps"
        _unique_in_buckets(out)
        consolidate_manifest(out)
        assert rows(out) == want and _unique_in_buckets(out) == {r["id"] for r in want}
        assert not manifest_files(out)["commits"]


def test_consolidation_sigkilled_midway_loses_and_duplicates_nothing(tmp_path):
    """A real SIGKILL of a process consolidating a commit log: while it writes the buckets, while it deletes
    the folded parts, and after a few fixed delays; then a full consolidation."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = str(tmp_path / "ds")
    _commit_log(out, parts=400, rows=20)
    want = read_manifest(out).to_pylist()
    commits, buckets = Path(out) / "commits", Path(out) / "manifest"
    n_parts = len(list(commits.glob("*.parquet")))
    code = f"from vist3a.dataset import consolidate_manifest; print('go', flush=True); consolidate_manifest({out!r})"

    def kill_when(moment):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        deadline = time.time() + 60
        while not moment() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert read_manifest(out).to_pylist() == want
        return _unique_in_manifest_dir(out)

    # while writing buckets: some written, no part deleted yet
    kill_when(lambda: len(list(buckets.glob("bucket-*.parquet"))) >= 3)
    assert len(list(commits.glob("*.parquet"))) == n_parts
    # while deleting the folded parts: some gone, some left
    kill_when(lambda: len(list(commits.glob("*.parquet"))) < n_parts * 0.8)
    left = len(list(commits.glob("*.parquet")))
    assert 0 < left < n_parts
    for delay in (0.0, 0.3):
        _commit_log(out, parts=60, rows=20)
        want = read_manifest(out).to_pylist()
        start = time.time()
        kill_when(lambda: time.time() - start > delay)
    consolidate_manifest(out)
    assert read_manifest(out).to_pylist() == want and _unique_in_manifest_dir(out) == {r["id"] for r in want}
    assert not list(commits.glob("*.parquet"))


def test_older_layouts_are_read_and_folded_in(tmp_path):
    """Datasets written before the commit log (manifest/parts/ + manifest.parquet) resume as they are."""
    import pyarrow as pa

    from vist3a.dataset import typed_table

    (tmp_path / "manifest" / "parts").mkdir(parents=True)
    old = typed_table([_row("old1"), _row("old2", "failed")], MANIFEST_SCHEMA).drop_columns(["licence", "provenance"])
    pq.write_table(old, tmp_path / "manifest.parquet")  # an older schema: the new columns read as null
    pq.write_table(typed_table([_row("old2")], MANIFEST_SCHEMA), tmp_path / "manifest" / "parts" / "x.parquet")
    write_manifest_part(str(tmp_path), [_row("new")])
    assert recorded_ids(str(tmp_path), include_failed=False) == {"old1", "old2", "new"}
    consolidate_manifest(str(tmp_path))
    assert not (tmp_path / "manifest.parquet").exists() and not list((tmp_path / "manifest" / "parts").iterdir())
    assert _unique_in_manifest_dir(str(tmp_path)) == {"old1", "old2", "new"}
    assert pa.concat_tables([pq.read_table(f) for f in (tmp_path / "manifest").glob("bucket-*")]).schema.equals(MANIFEST_SCHEMA)


def test_the_record_of_files_read_whole_merges_and_refuses_a_foreign_format(tmp_path):
    from vist3a.dataset import INPUTS_FILE, read_inputs_record, record_read_inputs

    out = str(tmp_path / "out")
    assert read_inputs_record(out) == {}
    record_read_inputs(out, {"/in/a.txt": {"version": "size=1 mtime_ns=1", "rows": 1}})
    record_read_inputs(out, {"/in/b.txt": {"version": "size=2 mtime_ns=2", "rows": 2},
                             "/in/a.txt": {"version": "size=3 mtime_ns=3", "rows": 3}})
    got = read_inputs_record(out)
    assert {f: (v["version"], v["rows"]) for f, v in got.items()} == {"/in/a.txt": ("size=3 mtime_ns=3", 3),
                                                                     "/in/b.txt": ("size=2 mtime_ns=2", 2)}
    (tmp_path / "out" / INPUTS_FILE).write_text('{"format": "something-else/9", "files": {}}')
    with pytest.raises(ValueError, match=r"inputs\.json: format 'something-else/9' is not 'vist3a-read-inputs/1'"):
        read_inputs_record(out)


def test_the_record_of_finished_read_units_merges_replaces_a_changed_file_and_goes_with_the_file_record(tmp_path):
    from vist3a.dataset import read_inputs_record, read_units_record, record_read_inputs, record_read_units

    out = str(tmp_path / "out")
    assert read_units_record(out) == {}
    unit = {"file": "/in/a.txt", "version": "v1", "first_line": 1, "unit": 0}
    record_read_units(out, [{**unit, "start": 64, "end": 128, "rows": 2, "newlines": 2},
                            {**unit, "start": 0, "end": 64, "rows": 3, "newlines": 3}])
    record_read_units(out, [{**unit, "start": 0, "end": 64, "rows": 3, "newlines": 3},  # told twice: kept once
                            {**unit, "file": "/in/b.txt", "start": 0, "end": 10, "rows": 1, "newlines": 0}])
    got = read_units_record(out)
    assert got["/in/a.txt"] == {"version": "v1", "done": [{"start": 0, "end": 64, "rows": 3, "newlines": 3},
                                                          {"start": 64, "end": 128, "rows": 2, "newlines": 2}]}
    record_read_units(out, [{**unit, "version": "v2", "start": 0, "end": 32, "rows": 1, "newlines": 1}])
    assert read_units_record(out)["/in/a.txt"] == {"version": "v2", "done": [{"start": 0, "end": 32, "rows": 1,
                                                                               "newlines": 1}]}
    # a file read whole covers its units: they go, the other file's stay
    record_read_inputs(out, {"/in/a.txt": {"version": "v2", "rows": 9}})
    assert set(read_units_record(out)) == {"/in/b.txt"} and set(read_inputs_record(out)) == {"/in/a.txt"}
