"""Where the HTTP endpoint keeps requested scenes: one folder per id under a local dir or s3:// prefix.

    <root>/<id>/status.json   {"id", "status": queued|running|done|failed, "reason", "request", "result", times}
    <root>/<id>/scene.ply, preview.png, cameras.json, meta.json   (once done)

Every replica of the endpoint reads and writes the same store, so any of them can answer a
status query. Ids start with the creation time in hex, so sorting them sorts by age: retention
deletes the oldest without reading every record.
"""

from __future__ import annotations

import json
import os
import re
import time

from vist3a.io.uri import filesystem, join, read_bytes, write_bytes

STATUSES = ("queued", "running", "done", "failed")
UNFINISHED = ("queued", "running")
SCENE_FILES = {"scene.ply": "application/octet-stream", "preview.png": "image/png",
               "cameras.json": "application/json", "meta.json": "application/json"}
STATUS_FILE = "status.json"
_ID = re.compile(r"^[0-9a-f]{12}[0-9a-f]{8}$")


def new_scene_id(now: float | None = None) -> str:
    """12 hex digits of creation time in ms, then 8 random hex digits: unique and sortable by age."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(4).hex()}"


def is_scene_id(text: str) -> bool:
    return bool(_ID.match(text))


def id_time(scene_id: str) -> float:
    """Creation time (unix seconds) encoded in an id."""
    return int(scene_id[:12], 16) / 1000.0


def utc_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


class SceneStore:
    """Status records and result files of requested scenes (local directory or s3:// prefix)."""

    def __init__(self, root: str, storage=None):
        self.root = str(root)
        self.storage = storage

    def _uri(self, scene_id: str, name: str) -> str:
        if not is_scene_id(scene_id):  # never build a path from an unchecked string
            raise ValueError(f"not a scene id: {scene_id!r}")
        if name != STATUS_FILE and name not in SCENE_FILES:
            raise ValueError(f"not a scene file: {name!r}")
        return join(self.root, scene_id, name)

    def put_status(self, scene_id: str, status: str, **fields) -> dict:
        """Write the record of `scene_id` (replacing the previous one, keeping fields not given)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        record = self.get_status(scene_id) or {"id": scene_id, "created_at": utc_iso(id_time(scene_id))}
        record.update(fields)
        record["status"] = status
        record["updated_at"] = utc_iso()
        write_bytes(self._uri(scene_id, STATUS_FILE), json.dumps(record).encode(), self.storage)
        return record

    def get_status(self, scene_id: str) -> dict | None:
        """The record, or None for an unknown (or malformed) id."""
        if not is_scene_id(scene_id):
            return None
        try:
            return json.loads(read_bytes(self._uri(scene_id, STATUS_FILE), self.storage))
        except FileNotFoundError:
            return None

    def put_files(self, scene_id: str, files: dict[str, bytes]) -> list[str]:
        for name, data in files.items():
            write_bytes(self._uri(scene_id, name), data, self.storage)
        return sorted(files)

    def read_file(self, scene_id: str, name: str) -> bytes | None:
        if not is_scene_id(scene_id) or name not in SCENE_FILES:
            return None
        try:
            return read_bytes(self._uri(scene_id, name), self.storage)
        except FileNotFoundError:
            return None

    def ids(self) -> list[str]:
        """All ids in the store, oldest first."""
        fs, path = filesystem(self.root, self.storage)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = (os.path.basename(str(e).rstrip("/")) for e in entries)
        return sorted(n for n in names if is_scene_id(n))

    def delete(self, scene_id: str) -> None:
        if not is_scene_id(scene_id):
            raise ValueError(f"not a scene id: {scene_id!r}")
        fs, path = filesystem(join(self.root, scene_id), self.storage)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def apply_retention(self, max_scenes: int | None, max_age_hours: float | None, now: float | None = None) -> list[str]:
        """Delete scenes older than `max_age_hours`, then the oldest finished ones past `max_scenes`.

        Unfinished scenes are kept by the count limit (a client is still waiting for them);
        the age limit removes everything, so records orphaned by a crashed replica go too."""
        now = time.time() if now is None else now
        ids = self.ids()
        doomed = []
        if max_age_hours is not None:
            cutoff = now - max_age_hours * 3600.0
            doomed = [i for i in ids if id_time(i) < cutoff]
            ids = [i for i in ids if id_time(i) >= cutoff]
        if max_scenes is not None and len(ids) > max_scenes:
            excess = len(ids) - max_scenes
            for i in ids:  # oldest first
                if excess <= 0:
                    break
                record = self.get_status(i)
                if record is not None and record.get("status") in UNFINISHED:
                    continue
                doomed.append(i)
                excess -= 1
        for i in doomed:
            self.delete(i)
        return doomed
