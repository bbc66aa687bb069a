import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vist3a.ids import prompt_id, seed_from
from vist3a.io.prompts import list_inputs, read_prompts


def _by_source(table):
    return {r["source"]: r for r in table.to_pylist()}


def test_txt_lines_ids_seeds_and_undecodable(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a red barn\n\n  a blue   lake \nbad \xff\xfe bytes\n")
    table, stats = read_prompts(str(f))
    rows = _by_source(table)
    assert rows["p.txt:1"]["prompt"] == "a red barn"
    assert rows["p.txt:1"]["id"] == prompt_id("a red barn")
    assert rows["p.txt:1"]["seed"] == seed_from(prompt_id("a red barn"))
    assert rows["p.txt:3"]["prompt"] == "a blue lake"  # whitespace normalised
    assert rows["p.txt:4"]["error"] == "undecodable bytes (not UTF-8)"
    assert stats["rows"] == 3 and stats["invalid"] == 1


def test_jsonl_fields_and_bad_rows(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "a castle", "id": "c1", "seed": 7, "negative_prompt": "blurry"}),
        json.dumps({"prompt": "   "}),
        json.dumps({"prompt": "a forest", "seed": -3}),
        json.dumps({"prompt": "a forest 2", "seed": "abc"}),
        "{not json",
        json.dumps({"text": "no prompt key"}),
        json.dumps({"prompt": 42}),
    ]
    f.write_text("\n".join(lines) + "\n")
    rows = _by_source(read_prompts(str(f))[0])
    assert (rows["p.jsonl:1"]["id"], rows["p.jsonl:1"]["seed"], rows["p.jsonl:1"]["negative_prompt"]) == ("c1", 7, "blurry")
    assert rows["p.jsonl:1"]["error"] is None
    assert rows["p.jsonl:2"]["error"] == "empty prompt"
    assert "bad seed -3" in rows["p.jsonl:3"]["error"]
    assert "bad seed 'abc'" in rows["p.jsonl:4"]["error"]
    assert rows["p.jsonl:5"]["error"].startswith("invalid JSON")
    assert rows["p.jsonl:6"]["error"] == "missing prompt"
    assert rows["p.jsonl:7"]["error"] == "prompt is not text (int)"


def test_csv_and_parquet(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,seed\n"a ship, at sea",5\nan empty seed,\n')
    pq.write_table(pa.table({"prompt": ["a tower", "a tower"], "id": ["t1", "t2"]}), tmp_path / "q.parquet")
    table, stats = read_prompts(str(tmp_path))
    rows = _by_source(table)
    assert rows["p.csv:2"]["prompt"] == "a ship, at sea" and rows["p.csv:2"]["seed"] == 5
    assert rows["p.csv:3"]["seed"] == seed_from(rows["p.csv:3"]["id"])
    assert rows["q.parquet:row1"]["id"] == "t1" and rows["q.parquet:row2"]["id"] == "t2"
    assert stats["files"] == 2


def test_duplicates_collapse_across_files(tmp_path):
    (tmp_path / "a.txt").write_text("a quiet harbour\na quiet  harbour\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "a quiet harbour"}) + "\n")
    table, stats = read_prompts(str(tmp_path / "*"))
    assert table.num_rows == 1 and stats["duplicates"] == 2


def test_missing_input_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_inputs(str(tmp_path / "nope.txt"))
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no prompt files"):
        list_inputs(str(tmp_path))
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        read_prompts(str(tmp_path / "bad.csv"))


def test_every_row_has_id_and_seed(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"ok prompt\n\xff\xfe\n")
    (tmp_path / "q.jsonl").write_text('{broken\n{"prompt": ""}\n')
    table, _ = read_prompts(str(tmp_path))
    for row in table.to_pylist():
        assert row["id"] and isinstance(row["seed"], int), row


# ----------------------------------------------------------------------------- ids from users (issue 14)

UNSAFE_IDS = ["../../../escaped-scene", "a/b", "/abs", "..", ".hidden", "nul\x00byte", "x" * 129, "sp ace", "é"]


def test_unsafe_given_ids_are_refused_naming_the_rule(tmp_path):
    from vist3a.ids import ID_RULE

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"id": i, "prompt": f"a red canyon at night {k}"}) for k, i in enumerate(UNSAFE_IDS))
                 + "\n" + json.dumps({"id": "ok-id_1.v2", "prompt": "fine"}) + "\n" + json.dumps({"id": 17, "prompt": "n"}) + "\n")
    rows = _by_source(read_prompts(str(f))[0])
    for k, given in enumerate(UNSAFE_IDS, start=1):
        r = rows[f"p.jsonl:{k}"]
        assert r["error"].startswith("bad id ") and ID_RULE in r["error"], r
        assert repr(given[:80]) in r["error"]
        assert r["id"].startswith("invalid-") and "/" not in r["id"] and "." not in r["id"]
    assert len(rows["p.jsonl:7"]["error"]) < 300  # an over-long id is shortened in the message
    assert rows[f"p.jsonl:{len(UNSAFE_IDS) + 1}"]["id"] == "ok-id_1.v2"
    assert rows[f"p.jsonl:{len(UNSAFE_IDS) + 2}"]["id"] == "17"


def test_every_path_built_from_an_id_refuses_unsafe_ones(tmp_path):
    from vist3a.dataset import scene_uri, write_scene

    for bad in UNSAFE_IDS:
        with pytest.raises(ValueError, match="bad id"):
            scene_uri(str(tmp_path), bad)
        with pytest.raises(ValueError, match="bad id"):
            write_scene(str(tmp_path), bad, {"scene.ply": b"x"})
    assert not list(tmp_path.parent.glob("escaped-scene*")) and not list(tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- dedup after validation (issue 14)


def test_a_valid_row_wins_over_a_bad_row_with_the_same_content_id(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join([
        json.dumps({"prompt": "a red barn", "seed": "nope"}),     # bad seed: the content id of "a red barn"
        json.dumps({"prompt": "a red barn"}),                      # valid, same content id
        json.dumps({"id": "x", "prompt": "a tower", "seed": -1}),  # bad row with an explicit id ...
        json.dumps({"id": "x", "prompt": "a tower"}),              # ... and the valid row with it
    ]) + "\n")
    rows = _by_source(read_prompts(str(tmp_path))[0])
    assert rows["p.jsonl:2"]["id"] == prompt_id("a red barn") and rows["p.jsonl:2"]["error"] is None
    assert rows["p.jsonl:1"]["id"].startswith("invalid-") and "bad seed 'nope'" in rows["p.jsonl:1"]["error"]
    assert rows["p.jsonl:4"]["id"] == "x" and rows["p.jsonl:4"]["error"] is None
    assert rows["p.jsonl:3"]["id"].startswith("invalid-") and "bad seed -1" in rows["p.jsonl:3"]["error"]


def test_a_duplicate_explicit_id_with_another_prompt_is_a_failed_row_that_says_so(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join([
        json.dumps({"id": "scene-1", "prompt": "a castle"}),
        json.dumps({"id": "scene-1", "prompt": "a castle"}),      # the same row again: a plain duplicate
        json.dumps({"id": "scene-1", "prompt": "a lighthouse"}),  # the same id, another prompt: a conflict
    ]) + "\n")
    table, stats = read_prompts(str(tmp_path))
    rows = _by_source(table)
    assert set(rows) == {"p.jsonl:1", "p.jsonl:3"} and stats["duplicates"] == 1 and stats["conflicts"] == 1
    assert rows["p.jsonl:1"]["id"] == "scene-1" and rows["p.jsonl:1"]["error"] is None
    err = rows["p.jsonl:3"]["error"]
    assert err == "duplicate id 'scene-1' with a different prompt than p.jsonl:1 (which keeps the id)"
    assert rows["p.jsonl:3"]["id"] != "scene-1" and len(set(table.column("id").to_pylist())) == 2


# ----------------------------------------------------------------------------- streaming read units (issue 15)


def _rows_by_chunks(uri, chunk_bytes):
    from vist3a.io.prompts import chunk_rows, count_newlines, number_chunks, plan_chunks

    chunks = plan_chunks(uri, chunk_bytes=chunk_bytes)
    chunks = number_chunks(chunks, {i: count_newlines(c) for i, c in enumerate(chunks)})
    return chunks, [r for c in chunks for r in chunk_rows(c)]


def test_line_files_cut_anywhere_read_every_row_once_with_its_line_number(tmp_path):
    """A .txt/.jsonl file cut into byte ranges of any size gives the rows, sources and ids of reading it whole:
    CRLF, blank lines, a BOM, long lines across many cuts, undecodable bytes, no final newline."""
    import random

    rng = random.Random(0)
    lines = [b"\xef\xbb\xbfa first prompt"]
    for k in range(60):
        kind = rng.random()
        lines.append(b"" if kind < 0.1 else b"bad \xff line" if kind < 0.15 else
                     (f"prompt {k} " + "long " * rng.randint(0, 40)).encode() + (b"\r" if kind > 0.9 else b""))
    (tmp_path / "p.txt").write_bytes(b"\n".join(lines))  # no final newline
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": f"j {k}", "seed": k}) + "\n" for k in range(25)))
    for name in ("p.txt", "q.jsonl"):
        whole, _ = read_prompts(str(tmp_path / name))
        want = whole.to_pylist()
        for chunk_bytes in (1, 2, 3, 7, 64, 333, 10**6):
            chunks, got = _rows_by_chunks(str(tmp_path / name), chunk_bytes)
            assert got == want, (name, chunk_bytes)
            assert len(chunks) == max(1, -(-(tmp_path / name).stat().st_size // chunk_bytes))
    assert want[-1]["source"] == "q.jsonl:25" and whole.num_rows == 25


def test_plan_refuses_files_without_a_prompt_column_by_name(tmp_path):
    from vist3a.io.prompts import plan_chunks

    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: Parquet needs a 'prompt' column \(found \['text'\]\)"):
        plan_chunks(str(tmp_path))
    (tmp_path / "t.parquet").unlink()
    pq.write_table(pa.table({"prompt": ["x", "y", "z"]}), tmp_path / "ok.parquet")
    (chunk,) = plan_chunks(str(tmp_path))
    assert chunk["rows"] == 3 and chunk["first_line"] == 1


def test_ledger_first_claim_wins_and_a_retried_row_is_admitted_again():
    from vist3a.io.prompts import PromptLedger, normalise_row

    a1 = normalise_row({"prompt": "a castle", "id": "s1", "source": "a:1"})
    a2 = normalise_row({"prompt": "a castle", "id": "s1", "source": "b:7"})       # duplicate
    c = normalise_row({"prompt": "a lighthouse", "id": "s1", "source": "b:8"})    # conflict
    done = normalise_row({"prompt": "a finished scene", "source": "b:9"})
    ledger = PromptLedger(skip=[done["id"]])
    assert ledger.admit(a1) == a1
    assert ledger.admit(a2) is None
    conflict = ledger.admit(c)
    assert conflict["id"].startswith("invalid-") and "with a different prompt than a:1" in conflict["error"]
    assert ledger.admit(done) is None
    assert ledger.admit(dict(a1)) == a1  # the same source again: a retried task, not a duplicate
    assert dict(ledger.stats) == {"rows": 5, "duplicates": 1, "conflicts": 1, "invalid": 1, "recorded": 1}
    assert PromptLedger(skip=[conflict["id"]]).admit(conflict) is None  # a refused row an earlier run recorded


def test_ledger_tells_recorded_ids_without_claiming_and_counts_rows_dropped_for_them():
    from vist3a.io.prompts import PromptLedger, normalise_row

    ledger = PromptLedger(skip=["a", "invalid-x"])
    assert ledger.recorded(["a", "b", "invalid-x"]) == [True, False, True] and not ledger.claims
    ledger.note_recorded(2)
    row = normalise_row({"prompt": "b", "id": "b", "source": "f:1"})
    assert ledger.admit(row) == row
    assert dict(ledger.stats) == {"rows": 3, "recorded": 2}


def test_a_file_version_changes_with_its_content_and_only_then(tmp_path, s3_bucket):
    """What lets a rerun skip a file an earlier run read whole: the version plan_chunks gives every chunk."""
    import os

    from vist3a.io import write_text
    from vist3a.io.prompts import plan_chunks

    def versions(uri):
        return {c["version"] for c in plan_chunks(uri, chunk_bytes=4)}

    (tmp_path / "p.txt").write_text("a barn\na lake\n")
    (v1,) = versions(str(tmp_path / "p.txt"))
    assert versions(str(tmp_path / "p.txt")) == {v1} and v1.startswith("size=14 mtime_ns=")
    st = (tmp_path / "p.txt").stat()
    os.utime(tmp_path / "p.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: read it again
    assert versions(str(tmp_path / "p.txt")) != {v1}
    write_text(f"s3://{s3_bucket}/v/p.txt", "a barn\na lake\n")
    (e1,) = versions(f"s3://{s3_bucket}/v/p.txt")
    write_text(f"s3://{s3_bucket}/v/p.txt", "a barn\na lake\n")  # the same bytes again: the same ETag
    assert versions(f"s3://{s3_bucket}/v/p.txt") == {e1} and e1.startswith("size=14 etag=")
    write_text(f"s3://{s3_bucket}/v/p.txt", "a barn\na pond\n")
    assert versions(f"s3://{s3_bucket}/v/p.txt") != {e1}


def test_a_read_unit_is_finished_once_every_row_has_an_outcome_counted_once():
    from vist3a.io.prompts import ReadUnitTally

    t = ReadUnitTally()
    t.settle([(0, 0), (0, 2), (1, 0)])
    assert t.pop_finished() == []           # no unit fully read yet
    t.read(0, 3)
    t.read(1, 1)
    t.read(2, 0)                            # a unit no line starts in
    assert t.pop_finished() == [(1, 1), (2, 0)]
    t.settle([(0, 2), (0, 0), (None, 5)])   # told again (a retried task), and a row from outside the job
    assert t.pop_finished() == []           # position 1 of unit 0 has no outcome yet
    t.settle([(0, 1)])
    assert t.pop_finished() == [(0, 3)] and t.marks == {} and t.rows == {}
    t.read(0, 3)                            # a retried reader of a finished unit
    t.settle([(0, 1)])
    assert t.pop_finished() == [] and t.marks == {}
