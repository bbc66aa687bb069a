import pyarrow.parquet as pq

from vist3a.dataset import (MANIFEST_SCHEMA, compact_manifest, empty_manifest_row, read_manifest, recorded_ids,
                            scene_uri, shard_of, write_manifest_part, write_scene)
from vist3a.io import read_bytes


def _row(i, status="done"):
    r = empty_manifest_row()
    r.update(id=i, prompt=f"p {i}", negative_prompt="", seed=1, status=status)
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
    compact_manifest(out)
    final = pq.read_table(tmp_path / "manifest.parquet")
    assert final.schema.equals(MANIFEST_SCHEMA) and final.num_rows == 3


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
    (tmp_path / "manifest" / "parts").mkdir(parents=True)
    (tmp_path / "manifest" / "parts" / ".tmp-k1lled-p.parquet").write_bytes(b"")
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
    assert not (tmp_path / "manifest").exists()


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
