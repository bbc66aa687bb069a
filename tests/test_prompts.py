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
