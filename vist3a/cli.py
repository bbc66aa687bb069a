"""`vist3a` command line: generate a scene from a prompt, inspect configs and presets."""

from __future__ import annotations

import argparse
import json
import sys
import time

from vist3a.config import ConfigError, load_config, preset_names

EPILOG_GENERATE = """\
examples:
  vist3a generate "a red barn in a snowy field" --out out/barn
  vist3a generate "a lighthouse at dusk" --out s3://my-bucket/scenes/lighthouse --seed 7
  vist3a generate "a cosy library" --out out/lib --config deploy/local.yaml --set sampling.steps=8

writes into --out:
  scene.ply     3D Gaussians in the INRIA 3DGS layout (opens in common splat viewers)
  preview.png   a grid of orbit renders of the scene
  cameras.json  the cameras the decoder predicted (OpenCV, world-to-camera, pixel intrinsics)
  meta.json     prompt, seed, preset, weights fingerprint, package versions, timings

The default config is the `tiny` preset: small random-weight models that run on a CPU in seconds.
They prove the machinery, not image quality. s3:// outputs use AWS_ENDPOINT_URL / AWS credentials
or storage.s3_endpoint in the config.
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (default: the embedded tiny preset)")
    p.add_argument("--preset", help=f"model preset, overrides the file's ({', '.join(preset_names())})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config key, e.g. --set sampling.steps=8 (repeatable)")


def _config(args):
    overrides = list(args.overrides)
    if args.preset:
        overrides.insert(0, f"preset={args.preset}")
    return load_config(args.config, overrides)


def cmd_generate(args) -> int:
    from vist3a.generator import SceneGenerator, generate_scene
    from vist3a.io import ensure_writable

    overrides = []
    if args.steps is not None:
        overrides.append(f"sampling.steps={args.steps}")
    if args.guidance is not None:
        overrides.append(f"sampling.guidance={args.guidance}")
    args.overrides = overrides + args.overrides
    cfg = _config(args)
    ensure_writable(args.out, cfg.storage)
    t0 = time.perf_counter()
    print(f"[vist3a] loading preset {cfg.preset!r} ...", file=sys.stderr)
    gen = SceneGenerator(cfg)
    reason = gen.check_prompt(args.prompt)
    if reason:
        raise ValueError(f"prompt: {reason}")
    print(f"[vist3a] models ready in {gen.load_seconds:.1f}s on {gen.device}; generating ...", file=sys.stderr)
    scene = generate_scene(args.prompt, out=args.out, seed=args.seed, generator=gen)
    lo, hi = scene.bbox()
    print(json.dumps({
        "out": args.out, "seed": scene.seed, "num_gaussians": scene.num_gaussians,
        "bbox_min": lo, "bbox_max": hi, "seconds": round(time.perf_counter() - t0, 2),
    }))
    return 0


def cmd_config(args) -> int:
    cfg = _config(args)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def cmd_presets(args) -> int:
    from vist3a.presets import DESCRIPTIONS

    width = max(map(len, preset_names()))
    for name in preset_names():
        print(f"{name:<{width}}  {DESCRIPTIONS.get(name, '')}")
    print("\n`vist3a weights check PRESET` lists the files a preset loads, where to get them and their licences.")
    return 0


EPILOG_WEIGHTS = """\
examples:
  vist3a weights check wan2.1-1.3b+anysplat
  vist3a weights check wan2.1-1.3b+anysplat --set model.recon.weights=/data/weights/anysplat
  vist3a weights check wan2.1-14b+anysplat --config deploy/cluster.yaml --fetch
  vist3a weights manifest /data/weights/anysplat     # before `aws s3 sync` to a bucket

`check` exits 0 when every weight the config loads is present and fits, 1 otherwise.
Locations: a local path, an s3:// prefix (fetched once into storage.cache_dir and verified against
its vist3a-manifest.json), or a Hugging Face hub id (downloaded only with --fetch or at start-up).
"""


def cmd_weights_check(args) -> int:
    from vist3a.weights import check_weights

    if args.preset_name:
        args.overrides = [f"preset={args.preset_name}"] + list(args.overrides)
    cfg = _config(args)
    result = check_weights(cfg, fetch=args.fetch, deep=not args.shallow)
    print(result)
    return 0 if result.ok else 1


def cmd_weights_manifest(args) -> int:
    from vist3a.weights import write_manifest

    path = write_manifest(args.directory)
    print(path)
    return 0


EPILOG_DATASET = """\
examples:
  vist3a dataset filter out/dataset --out out/dataset/manifest.good.parquet --min-clip 25 --min-consistency 20
  vist3a dataset filter s3://bucket/ds --out s3://bucket/ds/manifest.clean.parquet --max-floaters 0.02 --cameras-ok
  vist3a dataset filter out/eval/scenes.parquet --out out/eval/best.parquet --min aesthetic=5.5

Keeps the rows with status done whose scores pass every test; a score that was not computed (null) fails
its test. The input is a dataset (its manifest) or any Parquet file with score columns (pipelines.evaluate's
scenes.parquet). Score columns and their meaning: README "Scene scores".
"""

SHORTCUTS = {"min_clip": ("min", "clip_score"), "min_aesthetic": ("min", "aesthetic"),
             "min_consistency": ("min", "consistency_psnr"), "min_ssim": ("min", "consistency_ssim"),
             "max_floaters": ("max", "floater_frac")}


def _bound(item: str) -> tuple[str, float]:
    col, sep, value = item.partition("=")
    try:
        if not sep:
            raise ValueError
        return col.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COLUMN=NUMBER, got {item!r}") from None


def cmd_dataset_filter(args) -> int:
    import io

    import pyarrow.parquet as pq

    from vist3a.config import StorageConfig
    from vist3a.dataset import MANIFEST_PLACES, read_manifest
    from vist3a.evaluation import filter_scores
    from vist3a.io import read_bytes, write_bytes

    storage = StorageConfig(s3_endpoint=args.s3_endpoint) if args.s3_endpoint else None
    if args.source.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(read_bytes(args.source, storage)))
    else:
        table = read_manifest(args.source, storage)
        if not table.num_rows:
            raise FileNotFoundError(f"no manifest at {args.source} (looked for {MANIFEST_PLACES})")
    minimum, maximum = dict(args.min), dict(args.max)
    for flag, (kind, col) in SHORTCUTS.items():
        if getattr(args, flag) is not None:
            (minimum if kind == "min" else maximum)[col] = getattr(args, flag)
    if args.cameras_ok:
        minimum["camera_ok"] = 1.0
    kept, dropped = filter_scores(table, minimum, maximum)
    buf = io.BytesIO()
    pq.write_table(kept, buf)
    write_bytes(args.out, buf.getvalue(), storage)
    print(json.dumps({"out": args.out, "rows": table.num_rows, "kept": kept.num_rows, "dropped_by": dropped}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vist3a",
        description="Text -> 3D Gaussian-splat scenes (VIST3A: video diffusion latents decoded by a stitched 3D network).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `vist3a generate --help` to start. Bulk datasets: python -m pipelines.generate --help",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate one scene from a prompt", epilog=EPILOG_GENERATE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="text describing the scene")
    g.add_argument("--out", required=True, help="output directory or s3:// prefix")
    g.add_argument("--seed", type=int, help="noise seed (default: derived from the prompt, so reruns agree)")
    g.add_argument("--steps", type=int, help="sampling steps (sampling.steps)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (sampling.guidance)")
    _add_config_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("config", help="print the validated config (preset + file + overrides) as JSON")
    _add_config_args(c)
    c.set_defaults(func=cmd_config)

    p = sub.add_parser("presets", help="list model presets")
    p.set_defaults(func=cmd_presets)

    w = sub.add_parser("weights", help="check or prepare model weights", epilog=EPILOG_WEIGHTS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    wsub = w.add_subparsers(dest="weights_command", required=True)
    wc = wsub.add_parser("check", help="what is present, what is missing, where it looked, how to fetch it",
                         epilog=EPILOG_WEIGHTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    wc.add_argument("preset_name", nargs="?", metavar="PRESET", help=f"preset to check ({', '.join(preset_names())})")
    wc.add_argument("--fetch", action="store_true", help="download remote weights (s3://, hub ids) that are not cached")
    wc.add_argument("--shallow", action="store_true", help="skip matching the Wan files' tensor names and shapes")
    _add_config_args(wc)
    wc.set_defaults(func=cmd_weights_check)
    wm = wsub.add_parser("manifest", help="write DIR/vist3a-manifest.json (sizes + SHA-256) for an s3:// upload")
    wm.add_argument("directory", help="local weights directory")
    wm.set_defaults(func=cmd_weights_manifest)

    d = sub.add_parser("dataset", help="work with a generated dataset's manifest", epilog=EPILOG_DATASET,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    df = dsub.add_parser("filter", help="write the manifest rows whose scores pass the given thresholds",
                         epilog=EPILOG_DATASET, formatter_class=argparse.RawDescriptionHelpFormatter)
    df.add_argument("source", help="dataset directory / s3:// prefix (its manifest), or a .parquet file")
    df.add_argument("--out", required=True, help="where to write the filtered manifest (.parquet; local or s3://)")
    df.add_argument("--min-clip", type=float, help="clip_score >= X (100 x cosine)")
    df.add_argument("--min-aesthetic", type=float, help="aesthetic >= X")
    df.add_argument("--min-consistency", type=float, help="consistency_psnr >= X (dB)")
    df.add_argument("--min-ssim", type=float, help="consistency_ssim >= X")
    df.add_argument("--max-floaters", type=float, help="floater_frac <= X")
    df.add_argument("--cameras-ok", action="store_true", help="camera_ok == 1 (every predicted camera valid)")
    df.add_argument("--min", type=_bound, action="append", default=[], metavar="COLUMN=X", help="any score column >= X")
    df.add_argument("--max", type=_bound, action="append", default=[], metavar="COLUMN=X", help="any score column <= X")
    df.add_argument("--s3-endpoint", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    df.set_defaults(func=cmd_dataset_filter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PermissionError, FileNotFoundError, ValueError) as exc:
        print(f"vist3a: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
