"""Where the HTTP endpoint keeps requested scenes, and its queue of record: a local dir or s3:// prefix.

    <root>/<id>/status.json   {"id", "status": queued|running|done|failed, "reason", "request", "result",
                               "attempt", times}: what a client sees
    <root>/<id>/scene.ply and/or scene.spz, preview.png, cameras.json, meta.json   (once done)
    <root>/jobs/<id>.json     an open job: {"id", "request", "attempt", "owner", "lease_until"}; it exists
                              from admission until the job's status is final (done or failed)

Every replica of the endpoint reads and writes the same store, so any of them can answer a status
query, and the open jobs are the queue: the ingress replica holding a job's lease renews it while the
job runs; a job whose lease expired (its replica died, or was cut off) is taken over by any ingress
replica, one started later included, and dispatched again under the same id (`claim`). The admission
limit counts the open jobs here, so it holds across replicas and restarts (`admit`). Ids start with
the creation time in hex, so sorting them sorts by age: retention deletes the oldest without reading
every record.
"""

from __future__ import annotations

import json
import os
import re
import time

from vist3a.io.uri import filesystem, join, read_bytes, write_bytes

STATUSES = ("queued", "running", "done", "failed")
UNFINISHED = ("queued", "running")
SCENE_FILES = {"scene.ply": "application/octet-stream", "scene.spz": "application/octet-stream", "preview.png": "image/png",
               "cameras.json": "application/json", "meta.json": "application/json"}
STATUS_FILE = "status.json"
JOBS_DIR = "jobs"
FINAL = ("done", "failed")
_ID = re.compile(r"^[0-9a-f]{12}[0-9a-f]{8}$")


def new_scene_id(now: float | None = None) -> str:
    """12 hex digits of creation time in ms, then 8 random hex digits: unique and sortable by age."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(4).hex()}"


def is_scene_id(text) -> bool:
    return isinstance(text, str) and bool(_ID.fullmatch(text))


def id_time(scene_id: str) -> float:
    """Creation time (unix seconds) encoded in an id."""
    return int(scene_id[:12], 16) / 1000.0


def utc_iso(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


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

    # -- the queue of record

    def _job_uri(self, scene_id: str) -> str:
        if not is_scene_id(scene_id):  # never build a path from an unchecked string
            raise ValueError(f"not a scene id: {scene_id!r}")
        return join(self.root, JOBS_DIR, scene_id + ".json")

    def _write_job(self, job: dict) -> dict:
        write_bytes(self._job_uri(job["id"]), json.dumps(job).encode(), self.storage)
        return job

    def get_job(self, scene_id: str) -> dict | None:
        try:
            return json.loads(read_bytes(self._job_uri(scene_id), self.storage))
        except FileNotFoundError:
            return None

    def open_jobs(self) -> list[str]:
        """Ids of the jobs accepted and not yet final, oldest first (one listing of jobs/)."""
        fs, path = filesystem(join(self.root, JOBS_DIR), self.storage)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = (os.path.basename(str(e).rstrip("/")) for e in entries)
        return sorted(n[:-5] for n in names if n.endswith(".json") and is_scene_id(n[:-5]))

    def admit(self, scene_id: str, request: dict, owner: str, lease_s: float, limit: int) -> dict | None:
        """Accept `request` as job `scene_id` held by `owner`, unless `limit` jobs are open: -> the job, or None.

        The job is written first, then the open jobs are counted; past the limit it is withdrawn. So every
        admission that counts to `limit` or less has seen every job written before it: replicas sharing
        this store never hold more than `limit` open jobs between them. Two replicas admitting at the same
        moment may both withdraw (a 503 the client retries), never both accept past the limit. One replica
        admits one request at a time (pipelines.serve), so within a replica the count is exact."""
        job = self._write_job({"id": scene_id, "request": request, "attempt": 1, "owner": owner,
                               "lease_until": time.time() + lease_s})
        if len(self.open_jobs()) > limit:
            self.finish_job(scene_id)
            return None
        try:
            self.put_status(scene_id, "queued", request=request, attempt=1)
        except Exception:
            self.finish_job(scene_id)  # not accepted: the client is told the store is unavailable
            raise
        return job

    def renew(self, scene_id: str, owner: str, lease_s: float, **fields) -> bool:
        """Extend `owner`'s lease on the job (and set `fields`, e.g. its attempt); False when the job is
        closed or another replica has taken it over."""
        current = self.get_job(scene_id)
        if current is None or current.get("owner") != owner:
            return False
        current.update(fields, lease_until=time.time() + lease_s)
        self._write_job(current)
        return True

    def claim(self, scene_id: str, owner: str, lease_s: float, now: float | None = None) -> dict | None:
        """Take over a job whose lease has expired: -> the job with its attempt counted up and `owner`
        holding a fresh lease, or None (still leased, or gone). A job already final is closed here (its
        replica died between recording the result and closing it) and None returned. Two replicas
        claiming at once: the one whose write lands last holds it; the other sees that on re-reading and
        backs off (and were both to run it, the second run rewrites the same files: same id, same seed)."""
        now = time.time() if now is None else now
        job = self.get_job(scene_id)
        if job is None or job.get("lease_until", 0) > now:
            return None
        record = self.get_status(scene_id)
        if record is not None and record.get("status") in FINAL:
            self.finish_job(scene_id)
            return None
        job.update(attempt=int(job.get("attempt", 1)) + 1, owner=owner, lease_until=now + lease_s)
        self._write_job(job)
        again = self.get_job(scene_id)
        return job if again is not None and again.get("owner") == owner else None

    def finish_job(self, scene_id: str) -> None:
        """Close a job (its status is final, or it was withdrawn at admission)."""
        fs, path = filesystem(self._job_uri(scene_id), self.storage)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    # -- result files

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
        self.finish_job(scene_id)

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
