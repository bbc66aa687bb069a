"""Are the weights a config needs present, complete and the right ones? (`vist3a weights check`)

One pass over the components a config loads (Wan directory, reconstruction checkpoint, our
stitching-layer checkpoint and, where the schema has one, a video LoRA) that reports, for each: where it looked, what it found, what is missing
or does not fit, and how to fetch it. Generation runs the same check at start-up, so missing
weights stop it with this message instead of a stack trace from deep inside a model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vist3a.ids import fingerprint
from vist3a.weights.convert import (
    Checkpoint,
    ConversionReport,
    compare_state,
    find_checkpoint,
    plan_recon_checkpoint,
)
from vist3a.weights.locate import (
    COMPLETE_NAME,
    MANIFEST_NAME,
    Location,
    WeightsError,
    classify,
    hub_download_command,
    hub_parts,
    hub_repo,
    resolve,
)

if TYPE_CHECKING:  # the schema imports nothing from here; only annotations need it
    from vist3a.config import Config


@dataclass(frozen=True)
class Release:
    """A published checkpoint: where it is, which files we need, its licence, a suggested local dir."""

    repo: str
    what: str
    files: tuple[str, ...]
    licence: str
    local_dir: str


RELEASES = {
    "wan2.1-1.3b": Release("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan 2.1 text-to-video 1.3B (diffusers format)",
                           (), "Apache-2.0", "weights/wan2.1-t2v-1.3b"),
    "wan2.1-14b": Release("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan 2.1 text-to-video 14B (diffusers format)",
                          (), "Apache-2.0", "weights/wan2.1-t2v-14b"),
    "vggt-1b": Release("facebook/VGGT-1B", "VGGT-1B", ("model.safetensors",),
                       "VGGT licence, non-commercial weights (see the model card)", "weights/vggt-1b"),
    "anysplat": Release("lhjiang/anysplat", "AnySplat", ("model.safetensors", "config.json"),
                        "code MIT; weights derived from VGGT-1B, non-commercial", "weights/anysplat"),
    "vist3a": Release("HJGO/VIST3A", "VIST3A release: stitched AnySplat decoder and reward-aligned Wan LoRAs", (),
                      "no licence file in the release; the decoder sits on AnySplat weights derived from VGGT-1B "
                      "(non-commercial); the Wan LoRAs adapt Apache-2.0 Wan 2.1", "weights/vist3a"),
}
#: hub download filters: only what we load (repos also hold READMEs, images, duplicate formats).
WAN_PATTERNS = ["model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "transformer/*", "vae/*"]
RECON_PATTERNS = ["model.safetensors", "config.json"]
WAN_WEIGHT_FILES = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
TEXT_ENCODER_FIELDS = ("vocab_size", "d_model", "d_ff", "d_kv", "num_layers", "num_heads")


@dataclass
class ComponentCheck:
    name: str
    key: str  # the config key naming its weights
    spec: str | None
    status: str  # ok | missing | invalid | random | unset
    location: Location | None = None
    found: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    reports: list[ConversionReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "random", "unset")

    def format(self) -> str:
        tag = {"ok": "ok", "random": "random", "unset": "note", "missing": "MISSING", "invalid": "INVALID"}[self.status]
        head = f"[{tag}] {self.name}: {self.key} = {self.spec!r}" if self.spec else f"[{tag}] {self.name}: {self.key} not set"
        lines = [head]
        loc = self.location
        if loc is not None:
            if loc.local is not None:
                lines.append(f"    found at {loc.local}")
            lines += [f"    looked: {w}" for w in loc.looked] if not loc.found else []
            lines += [f"    note: {n}" for n in loc.notes]
        lines += [f"    file: {f}" for f in self.found]
        lines += [f"    problem: {p}" for p in self.problems]
        lines += [f"    note: {n}" for n in self.notes]
        for report in self.reports:
            if not report.ok or self.status == "ok":
                lines += ["    " + line for line in report.format().splitlines()]
        lines += [f"    how to fix: {h}" if i == 0 else f"                {h}" for i, h in enumerate(self.hints)]
        return "\n".join(lines)


@dataclass
class WeightsCheck:
    preset: str
    components: list[ComponentCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components)

    def __str__(self) -> str:
        verdict = "all weights present" if self.ok else "weights missing or unusable"
        return "\n".join([f"weights for preset {self.preset!r}: {verdict}"] + [c.format() for c in self.components])

    def local_config(self, cfg):
        """`cfg` with every remote weights location replaced by its verified local copy."""
        updates = {c.key: str(c.location.local) for c in self.components
                   if c.location is not None and c.location.local is not None and c.location.kind != "local"}
        if not updates:
            return cfg
        data = cfg.model_dump()
        for key, value in updates.items():
            node = data
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            node[last] = value
        return type(cfg).model_validate(data)


def check_weights(cfg: Config, *, fetch: bool = False, deep: bool = True, hub_cache_dir: str | None = None) -> WeightsCheck:
    """Check every weight the config loads. `fetch` downloads remote locations that are not cached
    (s3:// prefixes, hub ids); `deep` also matches the Wan files' tensor names and shapes against
    the modules the preset describes (built on the meta device: no memory, a few seconds)."""
    kw = {"fetch": fetch, "hub_cache_dir": hub_cache_dir}
    model = cfg.model
    comps = [_check_video(cfg, deep=deep, **kw), _check_recon(cfg, **kw)]
    stitch = _check_own(cfg, "stitch", "model.stitch.weights", model.stitch.weights,
                        "the stitching layer starts from random weights (scenes will be noise until it is fitted)",
                        needed=model.video.source == "pretrained" or model.recon.source == "pretrained", **kw)
    lora = _check_own(cfg, "lora", "model.video.lora", model.video.lora,
                      "no video LoRA (the base Wan model is used)", needed=False, **kw)
    comps += [_check_stitch_file(cfg, stitch), _check_video_lora(cfg, lora)]
    for comp in comps:
        _note_source(cfg, comp)
    return WeightsCheck(cfg.preset, comps)


def _note_source(cfg: Config, comp: ComponentCheck) -> None:
    """Where a component that is in place came from: hub id, licence and the line that fetches it,
    so a check that passes still says what the user is bound by."""
    if comp.status != "ok" or not comp.spec:
        return
    release = {"video": _release_for_video(cfg), "recon": _release_for_recon(cfg)}.get(comp.name)
    if classify(comp.spec) == "hub":
        repo = hub_parts(comp.spec)[0]
        release = next((r for r in RELEASES.values() if r.repo == repo), release)
        comp.notes.append(f"source: {comp.spec} ({hub_download_command(comp.spec, release.local_dir if release else 'DIR')})")
    if release is not None:
        comp.notes.append(f"licence ({release.repo}): {release.licence}")


def prepare_weights(cfg: Config, *, fetch: bool = True, hub_cache_dir: str | None = None) -> tuple[Config, WeightsCheck]:
    """Start-up check for generation: -> cfg with local weight paths, or WeightsError whose message
    is the full check (what is missing, where we looked, how to fetch it)."""
    result = check_weights(cfg, fetch=fetch, deep=False, hub_cache_dir=hub_cache_dir)
    if not result.ok:
        raise WeightsError(f"cannot start: {result}\n(run `vist3a weights check {cfg.preset}` to re-check)")
    return result.local_config(cfg), result


# ----------------------------------------------------------------------------- components


def _release_for_video(cfg: Config) -> Release | None:
    layers = cfg.model.video.transformer.num_layers
    return RELEASES.get({30: "wan2.1-1.3b", 40: "wan2.1-14b"}.get(layers, ""))


def _release_for_recon(cfg: Config) -> Release:
    return RELEASES["anysplat" if "gaussians" in cfg.model.recon.heads else "vggt-1b"]


def _fetch_hints(spec: str, key: str, release: Release | None, preset: str) -> list[str]:
    kind = classify(spec)
    if kind == "hub" and hub_parts(spec)[2] is not None:  # a file or folder inside a hub repo
        repo, _, inner = hub_parts(spec)
        known = next((r for r in RELEASES.values() if r.repo == repo), None)
        local_dir = known.local_dir if known else "weights/" + repo.split("/")[-1].lower()
        what = f" ({known.what}; licence: {known.licence})" if known else ""
        return [f"download {inner} of {repo}{what} on a machine with network:",
                f"  {hub_download_command(spec, local_dir)}",
                f"then use it with --set {key}={local_dir}/{inner} (a path, or an s3:// prefix you copied it to)",
                f"or let vist3a download it: `vist3a weights check {preset} --fetch` on a machine with network"]
    repo = hub_repo(spec)[0] if kind == "hub" else (release.repo if release else None)
    known = release if release is not None and release.repo == repo else None
    hints = []
    if repo:
        local_dir = known.local_dir if known else "weights/" + repo.split("/")[-1].lower()
        what = f" ({known.what}; licence: {known.licence})" if known else ""
        files = " ".join(known.files) + " " if known and known.files else ""
        hints.append(f"download {repo}{what} on a machine with network:")
        hints.append(f"  hf download {repo} {files}--local-dir {local_dir}")
        hints.append(f"then use it with --set {key}={local_dir} (a path, or an s3:// prefix you copied it to)")
    if kind == "hub":
        hints.append(f"or let vist3a download it: `vist3a weights check {preset} --fetch` on a machine with network")
    if kind == "s3":
        hints.append("check storage.s3_endpoint / AWS credentials, or upload a local copy: "
                     f"`vist3a weights manifest DIR && aws s3 sync DIR {spec}`")
    return hints


def _check_video(cfg: Config, *, deep: bool, fetch: bool, hub_cache_dir) -> ComponentCheck:
    video = cfg.model.video
    key = "model.video.weights"
    if video.source == "random":
        return ComponentCheck("video", "model.video.source", "random", "random")
    if not video.weights:
        release = _release_for_video(cfg)
        hints = [f"set {key} to a diffusers-format Wan directory, s3:// prefix or hub id"
                 + (f" (e.g. {release.repo})" if release else "")]
        return ComponentCheck("video", key, None, "missing", problems=["no location configured"], hints=hints)
    comp = _locate(cfg, "video", key, video.weights, fetch=fetch, hub_cache_dir=hub_cache_dir,
                   allow_patterns=WAN_PATTERNS,
                   hints=lambda: _fetch_hints(video.weights, key, _release_for_video(cfg), cfg.preset))
    if comp.status != "ok":
        return comp
    root = comp.location.local
    _check_diffusers_dir(root, video, comp, deep)
    if comp.problems:
        comp.status = "invalid"
        comp.hints = _fetch_hints(video.weights, key, _release_for_video(cfg), cfg.preset)
    return comp


def _check_diffusers_dir(root: Path, video, comp: ComponentCheck, deep: bool) -> None:
    if not root.is_dir():
        comp.problems.append(f"{root} is not a directory (a diffusers-format Wan directory is needed)")
        return
    required = {"scheduler": ["scheduler_config.json"], "tokenizer": ["tokenizer_config.json"],
                "text_encoder": ["config.json"], "transformer": ["config.json"], "vae": ["config.json"]}
    for sub, names in required.items():
        for name in names:
            if not (root / sub / name).is_file():
                comp.problems.append(f"missing {sub}/{name}")
    shards = {}
    for sub, stem in WAN_WEIGHT_FILES.items():
        if (root / sub).is_dir():
            files, problem = _weight_files(root / sub, stem)
            if problem:
                comp.problems.append(problem)
            else:
                shards[sub] = files
                comp.found.append(f"{sub}: {len(files)} weight file(s), {sum(f.stat().st_size for f in files) / 1e9:.2f} GB")
    expected = {
        "transformer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in video.transformer.model_dump().items()},
        "vae": {k: (list(v) if isinstance(v, tuple) else v) for k, v in video.vae.model_dump().items()},
        "text_encoder": {k: getattr(video.text_encoder, k) for k in TEXT_ENCODER_FIELDS},
    }
    for sub, want in expected.items():
        conf_path = root / sub / "config.json"
        if conf_path.is_file():
            have = json.loads(conf_path.read_text())
            diffs = [f"{k} {have[k]!r} (config expects {v!r})" for k, v in want.items() if k in have and have[k] != v]
            if diffs:
                comp.problems.append(f"{sub}/config.json describes another model: " + ", ".join(diffs))
    if deep and not comp.problems:
        comp.reports = _wan_key_reports(root, video, shards)
        comp.problems += [f"{r.target}: checkpoint tensors do not fit (report below)" for r in comp.reports if not r.ok]


def _weight_files(folder: Path, stem: str) -> tuple[list[Path], str | None]:
    """The safetensors files of one diffusers/transformers folder, single or sharded (index complete)."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single], None
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            return [], f"{folder.name}: {len(absent)} of {len(names)} shards missing ({', '.join(absent[:3])}...)"
        return [folder / n for n in names], None
    return [], f"{folder.name}: no {stem}.safetensors or {stem}.safetensors.index.json"


def _header_shapes(files: list[Path]) -> dict[str, tuple]:
    shapes = {}
    for f in files:
        shapes.update(Checkpoint(f).shapes)
    return shapes


def _wan_key_reports(root: Path, video, shards: dict[str, list[Path]]) -> list[ConversionReport]:
    """Match the Wan files' tensor names/shapes against the modules the config describes (meta device)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    reports = []
    with torch.device("meta"):
        v = video.vae
        modules = {
            "transformer": WanTransformer3DModel(**video.transformer.model_dump()),
            "vae": AutoencoderKLWan(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult),
                                    num_res_blocks=v.num_res_blocks, temperal_downsample=list(v.temperal_downsample)),
            "text_encoder": UMT5EncoderModel(UMT5Config.from_json_file(root / "text_encoder" / "config.json")),
        }
    for sub, module in modules.items():
        if sub in shards:
            reports.append(compare_state(_header_shapes(shards[sub]), module, source=str(root / sub),
                                         target=type(module).__name__))
    return reports


def _check_recon(cfg: Config, *, fetch: bool, hub_cache_dir) -> ComponentCheck:
    rc = cfg.model.recon
    key = "model.recon.weights"
    if rc.source == "random":
        return ComponentCheck("recon", "model.recon.source", "random", "random")
    release = _release_for_recon(cfg)
    if not rc.weights:
        return ComponentCheck("recon", key, None, "missing", problems=["no location configured"],
                              hints=[f"set {key} to a checkpoint file/directory, s3:// prefix or hub id (e.g. {release.repo})"])
    comp = _locate(cfg, "recon", key, rc.weights, fetch=fetch, hub_cache_dir=hub_cache_dir,
                   allow_patterns=RECON_PATTERNS, hints=lambda: _fetch_hints(rc.weights, key, release, cfg.preset))
    if comp.status != "ok":
        return comp
    try:
        path = find_checkpoint(comp.location.local)
        comp.found.append(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")
        report = plan_recon_checkpoint(rc, Checkpoint(path)).report
        comp.reports.append(report)
        if not report.ok:
            comp.problems.append("the checkpoint does not fit the configured network (report below)")
    except Exception as exc:  # noqa: BLE001 - unreadable/corrupt files are a finding, not a crash
        comp.problems.append(f"{type(exc).__name__}: {exc}")
    if comp.problems:
        comp.status = "invalid"
        comp.hints = _fetch_hints(rc.weights, key, release, cfg.preset)
    return comp


def _check_own(cfg: Config, name: str, key: str, spec: str | None, unset_note: str, *, needed: bool, fetch: bool,
               hub_cache_dir) -> ComponentCheck:
    """Our own checkpoints (stitching layer, LoRA): present or not; unset is a note, not an error."""
    if not spec:
        comp = ComponentCheck(name, key, None, "unset")
        if needed:
            comp.notes.append(unset_note)
        return comp
    def hints() -> list[str]:
        if classify(spec) == "hub":
            return _fetch_hints(spec, key, None, cfg.preset)
        released = _preset_default(cfg.preset, key)
        if released and classify(released) == "hub":  # a local copy of what the preset fetches: say where from
            return _fetch_hints(released, key, None, cfg.preset)
        return [f"point {key} at the checkpoint written by the stitching/fine-tuning job (or the release's file), "
                "or unset it"]

    return _locate(cfg, name, key, spec, fetch=fetch, hub_cache_dir=hub_cache_dir, hints=hints)


def _preset_default(preset: str, key: str) -> str | None:
    """The preset's own value of a dotted config key (e.g. its hub reference for model.stitch.weights)."""
    from vist3a.presets import PRESETS

    node = PRESETS.get(preset, {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, str) else None


def _check_stitch_file(cfg: Config, comp: ComponentCheck) -> ComponentCheck:
    """The stitch file must fit the configured decoder: the release's .pth (planned on a meta-device
    network, so wrong cut, spec, rank or layers show here) or vist3a's own checkpoint."""
    if comp.status != "ok" or comp.location is None:
        return comp
    from vist3a.recon import ReconNet
    from vist3a.stitching import StitchingLayer
    from vist3a.stitching.checkpoint import FORMAT, check_compatible
    from vist3a.weights.release import FORMAT_NAME, is_release_checkpoint, plan_release, read_checkpoint_file

    sc = cfg.model.stitch
    try:
        payload = read_checkpoint_file(comp.location.local)
        with torch.device("meta"):
            recon = ReconNet(cfg.model.recon)
            stitch = StitchingLayer(sc.spec, in_channels=cfg.model.video.vae.z_dim)
        if is_release_checkpoint(payload):
            comp.found.append(f"{comp.location.local}: {FORMAT_NAME}")
            if sc.lora_rank is None or sc.lora_alpha is None:
                comp.problems.append("a released .pth needs model.stitch.lora_rank and model.stitch.lora_alpha (the "
                                     "file stores no alpha; HJGO/VIST3A: rank 64, alpha 32, as the vist3a presets set)")
            else:
                report = plan_release(payload, recon, sc.cut, stitch, sc.lora_rank, sc.lora_alpha,
                                      source=str(comp.location.local)).report
                comp.reports.append(report)
                if not report.ok:
                    comp.problems.append("the released decoder file does not fit the configured network (report below)")
        elif payload.get("format") == FORMAT:
            comp.found.append(f"{comp.location.local}: vist3a stitch checkpoint, cut {payload.get('cut')}")
            check_compatible(payload, stitch, sc.cut, source=str(comp.location.local))
        else:
            comp.problems.append(f"{comp.location.local} is neither a vist3a stitch checkpoint ({FORMAT}) nor the "
                                 f"release's anysplat_stitched.pth (top-level keys {sorted(payload)[:8]})")
    except (WeightsError, ValueError) as exc:
        comp.problems.append(str(exc))
    if comp.problems:
        comp.status = "invalid"
    return comp


def _check_video_lora(cfg: Config, comp: ComponentCheck) -> ComponentCheck:
    """A peft adapter directory whose target modules and shapes fit the configured Wan transformer
    (built on the meta device: a 14B adapter given to the 1.3B preset shows here)."""
    if comp.status != "ok" or comp.location is None:
        return comp
    from diffusers import WanTransformer3DModel

    from vist3a.lora import check_video_lora, read_lora_dir

    try:
        config, state, _ = read_lora_dir(str(comp.location.local))
        with torch.device("meta"):
            transformer = WanTransformer3DModel(**cfg.model.video.transformer.model_dump())
        comp.found.append(f"{comp.location.local}: peft LoRA r {config.get('r')}, alpha {config.get('lora_alpha')}, "
                          f"{len(state)} tensors")
        comp.problems += check_video_lora(transformer, config, state, str(comp.location.local))
    except (OSError, ValueError) as exc:
        comp.problems.append(str(exc))
    if comp.problems:
        comp.status = "invalid"
    return comp


def _locate(cfg: Config, name: str, key: str, spec: str, *, fetch: bool, hub_cache_dir, hints, allow_patterns=None
            ) -> ComponentCheck:
    """Resolve `spec`; status "ok" (location set), "invalid" (with the reason) or "missing" (with hints())."""
    comp = ComponentCheck(name, key, spec, "ok")
    try:
        comp.location = resolve(spec, cfg.storage, fetch=fetch, allow_patterns=allow_patterns,
                                hub_cache_dir=hub_cache_dir)
    except WeightsError as exc:
        comp.status, comp.problems = "invalid", [str(exc)]
        return comp
    if not comp.location.found:
        comp.status, comp.hints = "missing", hints()
    return comp


# ----------------------------------------------------------------------------- provenance

RANDOM_LICENCE = "random weights (no licence terms)"
QUICK_BYTES = 1 << 20
#: how the per-file fingerprints in a provenance record are made (stated in the record itself)
QUICK_FINGERPRINT = "sha256(size, first MiB, last MiB)[:16 hex]: a quick fingerprint, not a full-file hash"
_LORA_FILES = "adapter_*"  # peft's adapter_config.json and adapter_model.safetensors (or .bin)


def quick_file_fingerprint(path: str | Path) -> str:
    """16 hex digits of SHA-256 over the file's size, its first MiB and its last MiB (QUICK_FINGERPRINT):
    cheap for multi-GB checkpoints, the same for any copy of the file (no path, no mtime)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(b"vist3a-quick-fingerprint/1\0" + size.to_bytes(8, "big"))
    with open(path, "rb") as f:
        if size <= 2 * QUICK_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(QUICK_BYTES))
            f.seek(size - QUICK_BYTES)
            h.update(f.read(QUICK_BYTES))
    return h.hexdigest()[:16]


def weights_provenance(cfg: Config, check: WeightsCheck | None = None) -> dict:
    """What a scene's weights were, small and JSON-able (a generated scene's meta.json carries it):

        {"fingerprint": over the components' fingerprints,
         "file_fingerprint": how file fingerprints are made (QUICK_FINGERPRINT),
         "components": {"video" | "recon" | "stitch" | "lora": {
             "source": the configured location (path, s3:// URI, hub reference) or "random",
             "revision": the hub commit the files came from (hub locations only),
             "release": the known release it is (RELEASES repo), where identified,
             "seed": (random weights only),
             "files": {file name relative to the location: quick fingerprint} ({} for random weights),
             "fingerprint": over `files`, or over the seeded config section for random weights,
             "licence": the terms of these weights}},
         "lora": model.video.lora or None,
         "licence": one string: the terms the weights impose on the outputs}

    `check` is the start-up check (`prepare_weights`' WeightsCheck); without it the weights are located
    again without fetching (`check_weights(fetch=False, deep=False)`: file headers only)."""
    if check is None:
        check = check_weights(cfg, fetch=False, deep=False)
    comps = {}
    for comp in check.components:
        if comp.name == "lora" and comp.status == "unset":
            continue  # no adapter: nothing loaded
        comps[comp.name] = (_random_provenance(cfg, comp.name) if comp.status in ("random", "unset")
                            else _file_provenance(cfg, comp))
    return {"fingerprint": fingerprint({name: c["fingerprint"] for name, c in comps.items()}),
            "file_fingerprint": QUICK_FINGERPRINT, "components": comps, "lora": cfg.model.video.lora,
            "licence": combined_licence(comps)}


def combined_licence(components: dict[str, dict]) -> str:
    """One string from the components' licences: the most restrictive terms first, then each component's."""
    licences = [c["licence"] for c in components.values()]
    if all(lic == RANDOM_LICENCE for lic in licences):
        return RANDOM_LICENCE
    groups: dict[tuple[str, str], list[str]] = {}
    for name, c in components.items():
        groups.setdefault((c.get("release", ""), c["licence"]), []).append(name)
    parts = [", ".join(names) + (f" ({repo})" if repo else "") + f": {lic}" for (repo, lic), names in groups.items()]
    if any("non-commercial" in lic.lower() for lic in licences):
        head = "non-commercial use only (the most restrictive terms of the weights used): "
    elif any(lic.startswith("unknown") for lic in licences):
        head = "terms not known for every component: "
    else:
        head = ""
    return head + " | ".join(parts)


def _random_provenance(cfg: Config, name: str) -> dict:
    """Seeded random weights: fingerprinted by the config section they are drawn from (seed included)."""
    model = cfg.model
    section = {"video": lambda: model.video.model_dump(exclude={"weights", "lora"}),
               "recon": lambda: model.recon.model_dump(exclude={"weights"}),
               "stitch": lambda: {**model.stitch.model_dump(exclude={"weights", "lora_rank", "lora_alpha"}),
                                  "in_channels": model.video.vae.z_dim}}[name]()
    return {"source": "random", "seed": section["seed"], "files": {},
            "fingerprint": fingerprint({"random": name, "config": section}), "licence": RANDOM_LICENCE}


def _file_provenance(cfg: Config, comp: ComponentCheck) -> dict:
    entry: dict = {"source": comp.spec}
    local = comp.location.local if comp.location is not None else None
    if comp.location is not None and comp.location.kind == "hub":
        revision = (_hub_revision(local) if local is not None else None) or hub_parts(comp.spec)[1]
        if revision:
            entry["revision"] = revision
    release, licence = _component_licence(cfg, comp)
    if release is not None:
        entry["release"] = release.repo
    files = {}
    try:
        if local is None:
            raise WeightsError(f"not found ({comp.status})")
        files = {rel: quick_file_fingerprint(p) for rel, p in sorted(_loaded_files(comp.name, local).items())}
    except (OSError, WeightsError) as exc:
        entry["problem"] = f"{type(exc).__name__}: {exc}"[:300]
    entry.update(files=files, fingerprint=fingerprint(files), licence=licence)
    return entry


def _loaded_files(name: str, local: Path) -> dict[str, Path]:
    """The files a component loads from its local copy, by name relative to that location."""
    if name == "video":  # the diffusers directory's subfolders the loader reads (as WAN_PATTERNS fetches them)
        return {rel: p for rel, p in _dir_files(local) if any(fnmatch.fnmatch(rel, pat) for pat in WAN_PATTERNS)}
    if name == "recon":  # the checkpoint, and the config.json beside it (AnySplat post-processing reads it)
        ckpt = find_checkpoint(local)
        files = {ckpt.name: ckpt}
        if (ckpt.parent / "config.json").is_file() and ckpt.name != "config.json":
            files["config.json"] = ckpt.parent / "config.json"
        return files
    if name == "stitch":  # one .pth/.pt file, or the one inside a directory (as read_checkpoint_file finds it)
        if local.is_dir():
            candidates = sorted(local.glob("*.pth")) + sorted(local.glob("*.pt"))
            return {p.name: p for p in candidates[:1]} if len(candidates) == 1 else {}
        return {local.name: local}
    if name == "lora":  # peft's adapter files
        return {rel: p for rel, p in _dir_files(local) if fnmatch.fnmatch(p.name, _LORA_FILES)}
    raise ValueError(f"unknown weights component {name!r}")


def _dir_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix name, path) of the files under `root`, our download bookkeeping left out."""
    if root.is_file():
        return [(root.name, root)]
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (COMPLETE_NAME, MANIFEST_NAME) and not p.name.endswith((".partial", ".lock")):
            out.append((p.relative_to(root).as_posix(), p))
    return out


def _hub_revision(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot a path lies in (.../models--owner--name/snapshots/<commit>/...)."""
    parts = Path(path).parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return parts[i + 1]
    return None


def _release_by_repo(repo: str) -> Release | None:
    return next((r for r in RELEASES.values() if r.repo == repo), None)


def _component_licence(cfg: Config, comp: ComponentCheck) -> tuple[Release | None, str]:
    """(the release the component is, where known; the terms of its weights)."""
    from vist3a.weights.release import FORMAT_NAME

    if classify(comp.spec) == "hub":
        repo = hub_parts(comp.spec)[0]
        release = _release_by_repo(repo)
        if release is None:
            return None, f"unknown: {repo} is not a release vist3a knows (see its model card)"
        return release, release.licence
    if comp.name == "video":  # a local or s3 copy: the release of that shape, as `vist3a weights check` assumes
        release = _release_for_video(cfg)
        if release is None:
            return None, "unknown: not the shape of a known Wan release (check the terms of these weights)"
        return release, release.licence
    if comp.name == "recon":
        release = _release_for_recon(cfg)
        return release, release.licence
    if comp.name == "stitch":
        if any(FORMAT_NAME in line for line in comp.found):  # the release's file, told by its contents
            return RELEASES["vist3a"], RELEASES["vist3a"].licence
        return None, "own stitch checkpoint: bound by the terms of the video and reconstruction weights it was fitted to"
    default = _preset_default(cfg.preset, comp.key)  # the LoRA: a copy of what the preset fetches, if it names a release
    release = _release_by_repo(hub_parts(default)[0]) if default and classify(default) == "hub" else None
    if release is not None:
        return release, release.licence
    return None, "own adapter: bound by the terms of the video weights it adapts"
