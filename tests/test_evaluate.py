"""The evaluation (vist3a.evaluation, pipelines.evaluate) and `vist3a dataset filter`: statistics against
their definitions, the job's output schema and resume on Ray Data, a missing scorer refused at start-up."""

from __future__ import annotations

import json
import math
import os
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vist3a.config import SCORE_COLUMNS as ALL_GROUPS
from vist3a.config import load_config
from vist3a.dataset import MANIFEST_SCHEMA, empty_manifest_row, read_manifest, write_manifest_part
from vist3a.evaluation import (ALL_SCORES, EVAL_SCHEMA, compare, empty_eval_row, filter_scores, mean_ci, read_eval,
                               recorded_keys, score_saved_scene, summarize, summary_markdown, t_quantile,
                               write_eval_part)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def eval_rows(bench: str, values: list[float], metric: str = "clip_score", prefix: str = "s") -> list[dict]:
    rows = []
    for i, v in enumerate(values):
        r = empty_eval_row()
        r.update(key=f"{bench}/{prefix}{i}", benchmark=bench, id=f"{prefix}{i}", prompt="p", status="done", **{metric: v})
        rows.append(r)
    return rows


def test_t_quantiles_and_intervals_match_the_tables():
    # two-sided 95% t critical values from any statistics table
    for df, want in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)]:
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)
    values = [1.0, 2.0, 4.0, 7.0, 11.0]
    s = mean_ci(values + [math.nan, None])
    assert s["n"] == 5 and s["mean"] == pytest.approx(5.0)
    assert s["ci"] == pytest.approx(2.776445 * statistics.stdev(values) / math.sqrt(5), rel=1e-5)
    assert math.isnan(mean_ci([3.0])["ci"]) and mean_ci([])["n"] == 0


def test_summary_table_and_paired_and_unpaired_comparisons():
    a = pa.Table.from_pylist(eval_rows("t3bench", [20.0, 22.0, 24.0, 26.0]) + eval_rows("scenebench", [1.0, 2.0]),
                             schema=EVAL_SCHEMA)
    b = pa.Table.from_pylist(eval_rows("t3bench", [21.0, 24.0, 24.5, 28.0]) + eval_rows("scenebench", [3.0, 5.0, 4.0], prefix="u"),
                             schema=EVAL_SCHEMA)
    summary = summarize(a, ["clip_score"])
    assert summary["t3bench"]["scenes"] == 4 and summary["t3bench"]["clip_score"]["mean"] == pytest.approx(23.0)
    table = summary_markdown(summary, ["clip_score"])
    assert "| benchmark | n | failed | clip_score |" in table and "| t3bench | 4 | 0 | 23.000 ± " in table
    diff = compare(a, b, ["clip_score"])
    d = [1.0, 2.0, 0.5, 2.0]  # the same scenes: paired
    assert diff["t3bench"]["clip_score"]["paired"]
    assert diff["t3bench"]["clip_score"]["diff"] == pytest.approx(statistics.mean(d))
    assert diff["t3bench"]["clip_score"]["ci"] == pytest.approx(t_quantile(0.975, 3) * statistics.stdev(d) / 2)
    w = diff["scenebench"]["clip_score"]  # no shared ids: Welch
    assert not w["paired"] and w["diff"] == pytest.approx(4.0 - 1.5)
    va, vb = statistics.variance([1.0, 2.0]) / 2, statistics.variance([3.0, 5.0, 4.0]) / 3
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)
    assert w["ci"] == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb), rel=1e-6)


def test_parts_resume_bookkeeping(tmp_path):
    out = str(tmp_path / "eval")
    failed = eval_rows("b", [1.0, 2.0])
    failed[1].update(status="failed", error="scoring failed: boom", clip_score=None)
    write_eval_part(out, failed)
    assert recorded_keys(out) == {"b/s0", "b/s1"} and recorded_keys(out, include_failed=False) == {"b/s0"}
    write_eval_part(out, eval_rows("b", [5.0, 6.0])[1:])  # the retried scene, done: it wins
    t = read_eval(out)
    assert t.schema == EVAL_SCHEMA and t.column("status").to_pylist() == ["done", "done"]
    assert t.column("clip_score").to_pylist() == [1.0, 6.0]


def manifest_with_scores(out: str) -> None:
    rows = []
    for i, (clip, psnr, floaters, cam) in enumerate([(30.0, 25.0, 0.01, 1.0), (20.0, 25.0, 0.01, 1.0),
                                                     (30.0, 15.0, 0.01, 1.0), (30.0, None, 0.01, 1.0),
                                                     (30.0, 25.0, 0.2, 1.0), (31.0, 26.0, 0.0, 0.0)]):
        r = empty_manifest_row()
        r.update(id=f"id{i}", prompt="p", seed=i, status="done", clip_score=clip, consistency_psnr=psnr,
                 floater_frac=floaters, camera_ok=cam)
        rows.append(r)
    bad = empty_manifest_row()
    bad.update(id="idx", prompt="p", status="failed", error="x", clip_score=99.0)
    write_manifest_part(out, rows + [bad])


def test_dataset_filter_writes_the_rows_that_pass(tmp_path):
    from vist3a.cli import main

    out = str(tmp_path / "ds")
    manifest_with_scores(out)
    dest = str(tmp_path / "good.parquet")
    assert main(["dataset", "filter", out, "--out", dest, "--min-clip", "25", "--min-consistency", "20",
                 "--max-floaters", "0.05", "--cameras-ok"]) == 0
    kept = pq.read_table(dest)
    assert kept.column("id").to_pylist() == ["id0"] and kept.schema == MANIFEST_SCHEMA
    t, dropped = filter_scores(read_manifest(out), {"clip_score": 25.0, "consistency_psnr": 20.0})
    assert t.column("id").to_pylist() == ["id0", "id4", "id5"]
    assert dropped == {"status != done": 1, "clip_score >= 25.0": 1, "consistency_psnr >= 20.0": 2}  # null fails
    with pytest.raises(ValueError, match="no column 'clip'"):
        filter_scores(read_manifest(out), {"clip": 1.0})
    with pytest.raises(SystemExit):  # argparse: "expected COLUMN=NUMBER"
        main(["dataset", "filter", out, "--out", dest, "--min", "nonsense"])


def test_a_missing_scorer_stops_the_job_before_any_work(tmp_path, capsys):
    from pipelines.evaluate import main

    out = tmp_path / "eval"
    rc = main(["--config", "deploy/evaluate.yaml", "--set", f"evaluate.output={out}",
               "--set", f"evaluate.scorers.clip={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "evaluate.scorers.clip" in err and str(tmp_path / "nowhere") in err and "looked" in err
    assert not (out / "generated").exists()  # nothing was generated


def test_evaluate_job_schema_summary_and_resume(ray_local, tmp_path, repo_root):
    """Prompt set -> generate (consistency at generation) -> score on Ray Data; then lose a part and resume."""
    from pipelines.evaluate import run
    from vist3a.scores import write_tiny_scorers

    scorers = write_tiny_scorers(tmp_path / "scorers")
    prompts = tmp_path / "bench.txt"
    prompts.write_text("a red barn\na lighthouse at dusk\na cosy library\n")
    out = str(tmp_path / "eval")
    cfg = load_config(os.path.join(repo_root, "deploy/evaluate.yaml"), [
        f"evaluate.prompts={{mini: {prompts}}}", f"evaluate.output={out}", "evaluate.limit=null",
        f"evaluate.scorers.clip={scorers['clip']}", f"evaluate.scorers.aesthetic_clip={scorers['clip']}",
        f"evaluate.scorers.aesthetic_head={scorers['aesthetic_head']}", "evaluate.scorers.views=2",
        "evaluate.batch_size=2", "evaluate.cpus_per_actor=0.5", "generate.cpus_per_actor=0.5", "sampling.steps=2",
        "ray.progress_bars=false"])
    first = run(cfg)
    table = pq.read_table(os.path.join(out, "scenes.parquet"))
    assert table.schema == EVAL_SCHEMA and table.num_rows == 3
    assert set(table.column("status").to_pylist()) == {"done"}
    rows = table.to_pylist()
    for c in ALL_SCORES:  # every score present, consistency from the generation-time manifest column
        assert all(r[c] is not None and math.isfinite(r[c]) for r in rows), c
    manifest = {r["id"]: r for r in read_manifest(os.path.join(out, "generated", "mini")).to_pylist()}
    assert all(r["consistency_psnr"] == pytest.approx(manifest[r["id"]]["consistency_psnr"]) for r in rows)
    summary = json.loads(open(os.path.join(out, "summary.json")).read())["benchmarks"]["mini"]
    assert summary["scenes"] == 3
    assert summary["clip_score"]["mean"] == pytest.approx(statistics.mean(r["clip_score"] for r in rows))
    assert "| mini | 3 | 0 |" in open(os.path.join(out, "summary.md")).read()
    assert first["this_run"]["done"] == 3

    parts = sorted(os.listdir(os.path.join(out, "parts")))
    assert len(parts) == 2  # batches of 2 + 1
    lost = pq.read_table(os.path.join(out, "parts", parts[0])).column("key").to_pylist()
    os.remove(os.path.join(out, "parts", parts[0]))
    second = run(cfg)
    assert second["this_run"]["done"] == len(lost)  # only the lost scenes were scored again
    again = pq.read_table(os.path.join(out, "scenes.parquet")).to_pylist()
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert all(r["clip_score"] == pytest.approx(by_key[r["key"]]["clip_score"], abs=1e-6) for r in again)


def test_evaluate_deploy_configs(repo_root):
    local = load_config(os.path.join(repo_root, "deploy/evaluate.yaml"))
    cluster = load_config(os.path.join(repo_root, "deploy/evaluate.cluster.yaml"))
    for cfg in (local, cluster):
        assert set(cfg.evaluate.prompts) == {"t3bench", "scenebench", "dpgbench"}
        counts = {n: len(open(os.path.join(repo_root, p)).read().strip().splitlines()) for n, p in cfg.evaluate.prompts.items()}
        assert counts == {"t3bench": 300, "scenebench": 80, "dpgbench": 100}  # the paper's prompt sets
        assert cfg.evaluate.metrics == list(ALL_GROUPS)
    assert local.preset == "tiny" and local.ray.address is None
    assert cluster.preset == "vist3a-1.3b" and cluster.ray.address == "auto" and cluster.evaluate.gpus_per_actor >= 1
    assert cluster.evaluate.output.startswith("s3://") and cluster.evaluate.limit is None
    gen = load_config(os.path.join(repo_root, "deploy/generate.cluster.yaml"))
    assert gen.generate.scores == list(ALL_GROUPS) and gen.evaluate.scorers.clip.startswith("s3://")
    assert not load_config(os.path.join(repo_root, "deploy/generate.yaml")).generate.scores  # off by default


def test_a_saved_scene_scores_as_in_memory_from_ply_and_spz(tmp_path):
    """score_saved_scene reads what the bulk job wrote (.ply, or .spz for the real presets) and cameras.json."""
    from vist3a.generator import generate_scene
    from vist3a.scores import SceneScorer, splat_scores
    from vist3a.splats.spz import spz_bytes

    scene = generate_scene("a red barn", out=str(tmp_path), seed=2, config=load_config(None, ["sampling.steps=2",
                                                                                             "splats.preview_views=0"]))
    (tmp_path / "scene.spz").write_bytes(spz_bytes(scene.gaussians))
    scorer = SceneScorer(["consistency", "splats", "floaters", "cameras"])
    want = scorer.score(scene.gaussians, scene.cameras, scene.prompt)
    for name in ("scene.ply", "scene.spz"):
        row = {"scene_uri": str(tmp_path / name), "cameras_uri": str(tmp_path / "cameras.json"), "prompt": scene.prompt,
               "consistency_psnr": 21.5, "consistency_ssim": None}
        got = score_saved_scene(scorer, row)
        assert got["consistency_psnr"] == 21.5 and math.isnan(got["consistency_ssim"])  # from the manifest row
        assert got["camera_ok"] == 1.0 and got["camera_jump"] == pytest.approx(want["camera_jump"], rel=1e-4)
        tol = 1e-4 if name == "scene.ply" else 2e-2  # SPZ quantises positions, scales and opacities
        for c in splat_scores(scene.gaussians):
            assert got[c] == pytest.approx(want[c], rel=tol, abs=tol), (name, c)
