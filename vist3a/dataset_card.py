"""The dataset card of a generated dataset: `dataset.json` (for programs) and `README.md` (for people) at
the output root, rewritten atomically at the end of every run from the consolidated manifest.

It says what is there (rows by status, failures by reason, bytes by file kind), how it was made (preset,
sampling and splat settings, the last run's counts and timings, per-stage p50/p95), under which terms the
scenes may be used (the licences the weights impose), and how to read the manifest."""

from __future__ import annotations

import collections
import json
import os

import pyarrow as pa
import pyarrow.compute as pc

from vist3a import __version__
from vist3a.dataset import MANIFEST_DIR, failure_class, now_utc, read_manifest
from vist3a.io.uri import join, write_bytes

STAGES = ("sample_s", "decode_s", "render_s", "write_s")
FILE_KINDS = ("ply", "spz", "preview", "cameras", "meta")
CARD_COLUMNS = ["status", "error", "licence", "preset", *STAGES, *(f"{k}_bytes" for k in FILE_KINDS)]


def _quantiles(column: pa.ChunkedArray) -> dict | None:
    values = pc.drop_null(column)
    if len(values) == 0:
        return None
    p50, p95 = pc.quantile(values, q=[0.5, 0.95]).to_pylist()
    return {"p50": round(p50, 4), "p95": round(p95, 4), "mean": round(pc.mean(values).as_py(), 4), "n": len(values)}


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(pc.drop_null(column)).to_pylist()
    return dict(sorted(((c["values"], c["counts"]) for c in counts), key=lambda kv: -kv[1]))


def build_card(output: str, cfg, this_run: dict, storage=None) -> dict:
    """The card's content: the whole dataset as the manifest has it, plus the run that just ended."""
    m = read_manifest(output, storage, columns=CARD_COLUMNS)
    done = m.filter(pc.equal(m["status"], "done"))
    failed_errors = m.filter(pc.equal(m["status"], "failed"))["error"].to_pylist()
    sizes = {k: int(pc.sum(done[f"{k}_bytes"]).as_py() or 0) for k in FILE_KINDS}
    s = cfg.sampling
    return {
        "name": os.path.basename(output.rstrip("/")) or output,
        "output": output,
        "updated_at": now_utc().isoformat(timespec="seconds"),
        "vist3a_version": __version__,
        "counts": {"rows": m.num_rows, "done": done.num_rows, "failed": m.num_rows - done.num_rows},
        "failures_by_reason": dict(collections.Counter(failure_class(e) for e in failed_errors).most_common()),
        "licences": _value_counts(done["licence"]),
        "presets": _value_counts(done["preset"]),
        "settings": {
            "preset": cfg.preset,
            "sampling": {"prompt_template": s.prompt_template, "negative_prompt": s.negative_prompt, "steps": s.steps,
                         "guidance": s.guidance, "shift": s.shift, "frames": s.frames, "height": s.height,
                         "width": s.width},
            "splats": {"formats": list(cfg.splats.formats), "sh_degree": cfg.splats.sh_degree,
                       "voxel_footprints": cfg.splats.voxel_footprints, "max_gaussians": cfg.splats.max_gaussians},
            "scores": list(cfg.generate.scores),
        },
        "timings_s": {k: _quantiles(done[k]) for k in STAGES},
        "bytes": {**sizes, "total": sum(sizes.values())},
        "last_run": this_run,
        "layout": {"manifest": f"{MANIFEST_DIR}/ (Parquet, one row per id)", "scenes": "scenes/<shard>/<id>.<ext>",
                   "commit_log": "commits/ (folded into manifest/ at the end of a run)",
                   "inputs_read": "inputs.json (prompt files finished runs read whole, read units killed runs finished: a rerun skips them unread)"},
    }


def card_markdown(card: dict) -> str:
    """The card as a README a person reads first."""
    c, st = card["counts"], card["settings"]
    lines = [f"# {card['name']}", "",
             f"A synthetic 3D Gaussian-splat dataset made by vist3a {card['vist3a_version']} (updated {card['updated_at']}).",
             "", "## Contents", "",
             f"- {c['done']} scenes done, {c['failed']} rows failed ({c['rows']} rows in the manifest).",
             f"- {card['bytes']['total'] / 1e6:.1f} MB of scene files: "
             + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in card["bytes"].items() if k != "total" and v) + "."]
    if card["failures_by_reason"]:
        lines += ["", "Failures by reason:", ""] + [f"- {k}: {v}" for k, v in card["failures_by_reason"].items()]
    lines += ["", "## Licence", "",
              "The scenes carry the terms of the weights that made them (the `licence` column and meta.json):", ""]
    lines += [f"- {k} ({v} scenes)" for k, v in card["licences"].items()] or ["- (no scene records a licence)"]
    sm = st["sampling"]
    lines += ["", "## How it was made", "",
              f"- preset `{st['preset']}`; prompt template `{sm['prompt_template']}`; negative prompt "
              f"`{sm['negative_prompt'] or '(none)'}`",
              f"- {sm['steps']} steps, guidance {sm['guidance']}, shift {sm['shift']}, {sm['frames']} frames at "
              f"{sm['width']}x{sm['height']}",
              f"- splat files {', '.join(st['splats']['formats'])}, SH degree {st['splats']['sh_degree']}",
              "- each row's `provenance` (JSON) names the weights files and their fingerprints, the LoRA, the "
              "sampling settings and the software versions", "",
              "Seconds per scene, by stage (p50 / p95):", ""]
    for k, q in card["timings_s"].items():
        if q:
            lines.append(f"- {k}: {q['p50']} / {q['p95']} (n={q['n']})")
    r = card["last_run"]
    lines += ["", "Last run: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r.items()
                                           if not isinstance(v, dict)) + ".",
              "", "## Reading it", "",
              "The manifest is the directory `manifest/` (Parquet, one row per id; `scene_uri`, `spz_uri`, "
              "`preview_uri` point at the files):", "", "```python",
              "import pandas as pd", 'm = pd.read_parquet("manifest/")', 'done = m[m.status == "done"]', "",
              "import pyarrow.dataset as ds", 'table = ds.dataset("manifest/", format="parquet").to_table()', "",
              "import ray", 'scenes = ray.data.read_parquet("manifest/").filter(lambda r: r["status"] == "done")',
              "```", "", "Paths are relative to this directory (prefix them with the dataset's URI for s3://). "
              "`dataset.json` holds this card for programs.", ""]
    return "\n".join(lines)


def write_dataset_card(output: str, cfg, this_run: dict, storage=None) -> dict:
    """Build the card and write dataset.json and README.md at the output root, each in one atomic write."""
    card = build_card(output, cfg, this_run, storage)
    write_bytes(join(output, "dataset.json"), json.dumps(card, indent=1, default=str).encode("utf-8"), storage)
    write_bytes(join(output, "README.md"), card_markdown(card).encode("utf-8"), storage)
    return card
