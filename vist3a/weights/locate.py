"""Where weights live: a local path, an s3:// prefix (fetched once into a verified local cache)
or a Hugging Face hub reference: a repo (`owner/name`, `hf://owner/name[@revision]`) or a file or
folder inside one (`hf://owner/name[@revision]/path`, e.g. `hf://HJGO/VIST3A/anysplat_stitched.pth`).

Every resolution says where it looked, so a missing file becomes a message a person can act on.
s3:// prefixes are copied file by file into `storage.cache_dir/s3/<bucket>/<key>`; each file is
written under a temporary name, its size (and SHA-256, when the prefix carries a
`vist3a-manifest.json`) checked, then renamed; a completion record written last marks the copy
as whole, so an interrupted download is resumed, never used. A file lock keeps several processes
on one machine from downloading the same prefix at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "vist3a-manifest.json"
MANIFEST_FORMAT = "vist3a-weights-manifest/1"
COMPLETE_NAME = ".vist3a-complete.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HUB_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?(/[\w.-]+)+$")
_CHUNK = 8 << 20


class WeightsError(FileNotFoundError):
    """Weights that cannot be used: the message says what is missing, where we looked and how to fetch it."""


class ManifestMismatchError(WeightsError):
    """A downloaded file differs from its manifest entry (size or SHA-256)."""


@dataclass
class Location:
    """A resolved weight location. `local` is None when nothing usable was found."""

    spec: str
    kind: str  # "local" | "s3" | "hub"
    local: Path | None = None
    looked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.local is not None and self.local.exists()


def classify(spec: str) -> str:
    """"s3", "hub" or "local". A bare `owner/name` is a hub id only when no such local path exists."""
    if spec.startswith("s3://"):
        return "s3"
    if spec.startswith("hf://"):
        return "hub"
    if "://" in spec:
        raise WeightsError(f"unsupported weights location {spec!r}: use a local path, s3://bucket/prefix or a hub id")
    # A file inside a repo needs hf:// (weights/vist3a/x.pth is a local path, present or not).
    if _HUB_ID.match(spec) and not Path(spec).expanduser().exists() and not spec.startswith((".", "~")):
        return "hub"
    return "local"


def hub_repo(spec: str) -> tuple[str, str | None]:
    """'hf://owner/name@rev[/path]' or 'owner/name' -> ('owner/name', 'rev' | None)."""
    return hub_parts(spec)[:2]


def hub_parts(spec: str) -> tuple[str, str | None, str | None]:
    """-> (repo, revision, path inside the repo). A revision followed by a path holds no '/'."""
    ref = spec.removeprefix("hf://")
    if _HUB_REF.match(ref):
        owner, name, *rest = ref.split("/")
        name, _, revision = name.partition("@")
        return f"{owner}/{name}", revision or None, "/".join(rest)
    repo, _, revision = ref.partition("@")
    return repo, revision or None, None


def hub_download_command(spec: str, local_dir: str) -> str:
    """The `hf download` line that fetches what `spec` names into `local_dir`."""
    repo, revision, path = hub_parts(spec)
    rev = f" --revision {revision}" if revision else ""
    if path is None:
        return f"hf download {repo}{rev} --local-dir {local_dir}"
    if Path(path).suffix in (".pth", ".pt", ".safetensors", ".bin", ".json", ".ckpt"):  # a file
        return f"hf download {repo} {path}{rev} --local-dir {local_dir}"
    return f'hf download {repo} --include "{path}/*"{rev} --local-dir {local_dir}'



def resolve(spec: str, storage=None, *, fetch: bool = False, allow_patterns: list[str] | None = None,
            hub_cache_dir: str | None = None) -> Location:
    """Find `spec` locally (fetching it first when `fetch` and it is remote) -> Location.

    Never raises for a merely missing location: the Location records what was tried."""
    kind = classify(spec)
    if kind == "local":
        path = Path(spec).expanduser().absolute()
        loc = Location(spec, kind, looked=[f"{path} (local path)"])
        if path.exists():
            loc.local = path
        else:
            loc.notes.append("does not exist")
        return loc
    if kind == "s3":
        return _resolve_s3(spec, storage, fetch)
    return _resolve_hub(spec, fetch, allow_patterns, hub_cache_dir)


def require(spec: str | None, storage=None, *, what: str, fetch: bool = True,
            allow_patterns: list[str] | None = None, hub_cache_dir: str | None = None) -> Path:
    """The local path of `spec` (fetched when remote), or WeightsError saying where we looked."""
    if not spec:
        raise WeightsError(f"{what}: no weights location configured")
    loc = resolve(spec, storage, fetch=fetch, allow_patterns=allow_patterns, hub_cache_dir=hub_cache_dir)
    if not loc.found:
        raise WeightsError(f"{what} {spec!r} not found; looked: " + "; ".join(loc.looked)
                           + (" (" + "; ".join(loc.notes) + ")" if loc.notes else "")
                           + ". `vist3a weights check <preset>` says how to fetch it.")
    return loc.local


# ----------------------------------------------------------------------------- manifests


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(directory: str | Path) -> dict:
    """{format, files: {relative path: {size, sha256}}} for every file under `directory`
    (the manifest itself and our cache bookkeeping excluded)."""
    root = Path(directory)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST_NAME, COMPLETE_NAME) and not p.name.endswith(".partial"):
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"format": MANIFEST_FORMAT, "files": files}


def write_manifest(directory: str | Path) -> Path:
    """Write `directory/vist3a-manifest.json`; upload it with the weights so downloads are verified."""
    out = Path(directory) / MANIFEST_NAME
    out.write_text(json.dumps(build_manifest(directory), indent=1, sort_keys=True))
    return out


def _parse_manifest(data: bytes, where: str) -> dict[str, dict]:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        for rel, entry in files.items():
            if not isinstance(entry.get("size"), int) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
                raise ValueError(f"entry {rel!r} needs an integer size and a hex sha256")
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"entry {rel!r} leaves the prefix")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"unreadable weights manifest {where}: {exc}") from None
    return files


# ----------------------------------------------------------------------------- s3


def s3_cache_path(uri: str, storage=None) -> Path:
    """storage.cache_dir/s3/<bucket>/<key...>: one stable local place per URI."""
    cache_dir = getattr(storage, "cache_dir", None) or "~/.cache/vist3a"
    parts = [p for p in uri[len("s3://"):].split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise WeightsError(f"bad s3 URI {uri!r}")
    return Path(cache_dir).expanduser().absolute().joinpath("s3", *parts)


def _complete_record(target: Path) -> Path:
    """Directory prefixes keep the record inside; single objects keep a sidecar beside the file."""
    return target / COMPLETE_NAME if target.is_dir() else target.with_name(target.name + COMPLETE_NAME)


def _cached_copy_ok(target: Path) -> tuple[bool, str]:
    """A completion record exists and every file it lists is there with its recorded size."""
    if not target.exists():
        return False, "not in the cache"
    record = _complete_record(target)
    if not record.is_file():
        return False, "incomplete earlier download in the cache"
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError):
        return False, "unreadable completion record in the cache"
    base = target if target.is_dir() else target.parent
    for rel, entry in files.items():
        p = base / rel
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return False, f"cached file {p} is missing or has the wrong size"
    return True, "cached"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resolve_s3(uri: str, storage, fetch: bool) -> Location:
    target = s3_cache_path(uri, storage)
    loc = Location(uri, "s3", looked=[f"{target} (local cache of {uri})"])
    ok, why = _cached_copy_ok(target)
    if ok:
        loc.local = target
        return loc
    loc.notes.append(why)
    if not fetch:
        loc.notes.append("not fetched (fetching was not asked for)")
        return loc
    loc.looked.append(uri)
    try:
        with _locked(target):
            ok, _ = _cached_copy_ok(target)  # another process may have finished it meanwhile
            if not ok:
                loc.notes.append(_download_s3(uri, target, storage))
        loc.local = target
    except ManifestMismatchError:
        raise
    except WeightsError as exc:
        loc.notes.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - network/credential errors become a readable note
        loc.notes.append(f"could not fetch {uri}: {type(exc).__name__}: {exc}")
    return loc


def _download_s3(uri: str, target: Path, storage) -> str:
    """Copy an s3:// object or prefix to `target`, verifying sizes (and SHA-256 with a manifest)."""
    from vist3a.io import filesystem

    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    if fs.isfile(path):  # a single object, e.g. s3://bucket/vggt/model.safetensors
        listing = {target.name: fs.info(path)["size"]}
        sources = {target.name: path}
        base = target.parent
        parent = path.rsplit("/", 1)[0]
        manifest_key = f"{parent}/{MANIFEST_NAME}"
        manifest = _parse_manifest(fs.cat_file(manifest_key), f"s3://{manifest_key}") if fs.exists(manifest_key) else None
        if manifest is not None:
            manifest = {target.name: manifest[target.name]} if target.name in manifest else None
    else:
        found = fs.find(path, detail=True)
        if not found:
            raise WeightsError(f"nothing at {uri} (no object and no files under that prefix)")
        listing, sources = {}, {}
        for key, info in found.items():
            rel = key[len(path) + 1:]
            if rel and rel != MANIFEST_NAME:
                listing[rel], sources[rel] = info["size"], key
        base = target
        manifest_key = f"{path}/{MANIFEST_NAME}"
        manifest = _parse_manifest(fs.cat_file(manifest_key), f"s3://{manifest_key}") if manifest_key in found else None
    if manifest is not None:
        absent = sorted(set(manifest) - set(listing))
        if absent:
            raise WeightsError(f"{uri}: files listed in {MANIFEST_NAME} are not in the bucket: {', '.join(absent[:10])}")
        wanted = {rel: manifest[rel] for rel in manifest}
    else:
        wanted = {rel: {"size": size} for rel, size in listing.items()}
    base.mkdir(parents=True, exist_ok=True)
    record = {}
    total = 0
    for rel, entry in sorted(wanted.items()):
        dest = base / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        h = hashlib.sha256()
        with fs.open(sources[rel], "rb") as src, open(partial, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        size, digest = partial.stat().st_size, h.hexdigest()
        problems = []
        if size != entry["size"]:
            problems.append(f"size {size} != expected {entry['size']}")
        if "sha256" in entry and digest != entry["sha256"]:
            problems.append(f"sha256 {digest[:12]}... != manifest {entry['sha256'][:12]}...")
        if problems:
            partial.unlink()
            raise ManifestMismatchError(f"downloaded {uri}/{rel} does not match: {'; '.join(problems)}. "
                                        f"The bucket's copy is damaged or the manifest is stale; nothing was kept.")
        os.replace(partial, dest)
        record[rel] = {"size": size, "sha256": digest}
        total += size
    completion = _complete_record(target)
    completion.write_text(json.dumps({"source": uri, "files": record, "verified": "sha256" if manifest else "size"},
                                     indent=1, sort_keys=True))
    check = "size + sha256 against the manifest" if manifest else f"sizes only (no {MANIFEST_NAME} at the prefix)"
    return f"downloaded {len(record)} file(s), {total / 1e9:.2f} GB, verified: {check}"


# ----------------------------------------------------------------------------- hub


def _resolve_hub(spec: str, fetch: bool, allow_patterns: list[str] | None, cache_dir: str | None) -> Location:
    """With `fetch`, ask the hub first (it downloads only what the cache lacks, so a partial earlier
    download is completed) and fall back to the cache when the hub is unreachable; without it,
    the cache alone."""
    from huggingface_hub import constants, snapshot_download

    repo, revision, path = hub_parts(spec)
    if path is not None:  # a file or folder inside the repo: fetch only that
        allow_patterns = [path, f"{path}/*"]
    cache = cache_dir or constants.HF_HUB_CACHE
    where = f"repo {repo}" + (f", {path}" if path else "")
    loc = Location(spec, "hub", looked=[f"{cache} (Hugging Face cache, {where})"])
    kwargs = {"repo_id": repo, "revision": revision, "allow_patterns": allow_patterns, "cache_dir": cache_dir}

    def inside(snapshot: str) -> Path:
        return Path(snapshot) / path if path else Path(snapshot)

    if fetch:
        loc.looked.append(f"https://huggingface.co/{repo}" + (f" ({path})" if path else ""))
        try:
            loc.local = inside(snapshot_download(**kwargs))
            return loc
        except Exception as exc:  # noqa: BLE001 - offline, gated, unknown repo: all reported the same way
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            loc.notes.append(f"hub download failed ({type(exc).__name__}: {first_line[:200]})")
    try:
        loc.local = inside(snapshot_download(local_files_only=True, **kwargs))
        if not loc.local.exists():
            loc.notes.append(f"the cached snapshot of {repo} has no {path}")
        elif fetch:
            loc.notes.append("using the cached copy")
    except Exception as exc:  # noqa: BLE001 - not cached, in any of its spellings
        loc.notes.append(f"not in the cache ({type(exc).__name__})")
        if not fetch:
            loc.notes.append("hub not contacted (fetching was not asked for)")
    return loc
