"""Text -> 3D scene over HTTP on Ray Serve: a FastAPI ingress in front of a batched model deployment.

    serve run deploy/serve.yaml                    # local: http://127.0.0.1:8000/ (viewer), /docs (OpenAPI)
    serve deploy deploy/serve.cluster.yaml         # a running Ray cluster (GPU replicas, API key, S3 store)

The story of a request:
  1. POST /v1/scenes  the ingress (`SceneAPI`) checks the key, the content type, the body size, the
     fields and the prompt's token limit; then it admits the request as a durable job in the store
     (the queue of record: id, request, attempt, lease; refused with 503 when the store already holds
     `serve.max_queued_generations` open jobs, whichever replica accepted them), starts the job's call
     to the model and answers 202 + id. Admission and the job run outside the HTTP request, so a client
     that goes away changes nothing. The replica renews the job's lease while it runs; a model replica
     that dies mid-call costs an attempt and the job is dispatched again, up to `serve.max_attempts`.
     Every ingress replica (one started later too) takes over open jobs whose lease expired (their
     replica died) and dispatches them again under the same id.
  2. `SceneModel` (one per GPU) gathers the calls that arrive together with @serve.batch, runs one
     generator batch, writes scene.ply / preview.png / cameras.json / meta.json and the final record
     (`done`, or `failed` with the reason) to the store. A failing batch is retried item by item,
     and nothing a request carries can take the replica down.
  3. GET /v1/scenes/{id} and its files are answered from the store, so any ingress replica can answer.

The model math lives in `vist3a` (SceneGenerator); this module is the service around it.
(No `from __future__ import annotations` here: Serve's ingress reads the handlers' annotations at run time.)
"""

import asyncio
import collections
import contextvars
import hmac
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError

from pipelines.ray_setup import run_isolated, set_torch_threads
from vist3a.config import Config, ConfigError, build_config, load_config
from vist3a.generator import SceneGenerator, scene_files
from vist3a.ids import seed_from
from vist3a.io import is_s3
from vist3a.io.scene_store import FINAL, SCENE_FILES, SceneStore, is_scene_id, new_scene_id

log = logging.getLogger("vist3a.serve")

WEB_DIR = Path(__file__).resolve().parent / "web"
# Browser packages installed by `npm install` (Makefile `venv`); never committed, never from a CDN.
NODE_MODULES = Path(os.environ.get("VIST3A_NODE_MODULES", Path(__file__).resolve().parents[1] / "node_modules"))
VENDOR_ROOTS = {"three": "three", "spark": "@sparkjsdev/spark/dist", "swagger-ui": "swagger-ui-dist"}
API_KEY_HEADER = "X-API-Key"
JSON_TYPE = "application/json"
MAX_VENDOR_PATH = 512  # characters of a /vendor/ path; each part at most 255 bytes (a file name's limit)


# ----------------------------------------------------------------------------- request body


class SceneRequest(BaseModel):
    """POST /v1/scenes. Limits that depend on the deployment (steps, guidance, the prompt's token
    count) are checked against the config passed as validation context."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: StrictStr = Field(..., description="what to generate; at most the text encoder's token limit",
                              examples=["a red barn in a snowy field"])
    seed: StrictInt | None = Field(None, ge=0, lt=2**31, description="default: derived from the prompt")
    steps: StrictInt | None = Field(None, ge=1, description="sampling steps (default from the config; at most serve.max_steps)")
    guidance: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="classifier-free guidance (at most serve.max_guidance)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        check = (info.context or {}).get("check_prompt")
        reason = check(v) if check else (None if v.strip() else "prompt is empty")
        if reason:
            raise PydanticCustomError("prompt_invalid", reason)
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_steps")
        if v is not None and limit is not None and v > limit:
            raise PydanticCustomError("too_many_steps", "steps must be at most {limit}", {"limit": limit})
        return v

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v: float | None, info: ValidationInfo) -> float | None:
        limit = (info.context or {}).get("max_guidance")
        if v is not None and limit is not None and v > limit:
            raise PydanticCustomError("guidance_too_large", "guidance must be at most {limit}", {"limit": limit})
        return v


def validation_response(err: ValidationError) -> JSONResponse:
    """422 in FastAPI's shape (`detail[].loc` names the field) plus one readable `message`."""
    detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors(include_url=False)]
    message = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail)
    return JSONResponse({"detail": detail, "message": message}, status_code=422)


def api_key_from_env(variable: str | None) -> str | None:
    """The key requests must carry, from the variable named by serve.api_key_env (None: no key).

    Fails closed: a configured variable that is unset or empty stops the replica from starting."""
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise RuntimeError(f"serve.api_key_env names {variable!r}, but that environment variable is unset or empty")
    return key


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- model side


def run_batch(generator: SceneGenerator, store: SceneStore, jobs: list[dict], ply_sh_degree: int = 3,
              formats: tuple[str, ...] | list[str] = ("ply",)) -> list[dict]:
    """Generate `jobs` (dicts: id, prompt, seed, steps, guidance) and record each as done or failed.

    One generator call per distinct (steps, guidance) group; a group that raises is retried one
    job at a time so a single bad item fails alone. Never raises: the outcome is in the records.
    Idempotent by id: a job whose record is already final (a dispatch repeated after a replica died)
    is answered from the record, not generated again."""
    outcomes: dict[str, dict] = {}
    todo = []
    for job in jobs:
        try:
            record = store.get_status(job["id"])
            if record is not None and record.get("status") in FINAL:
                outcomes[job["id"]] = {k: record[k] for k in ("status", "reason", "result") if k in record}
                continue
            store.put_status(job["id"], "running", batch_size=len(jobs))
        except Exception:  # noqa: BLE001 - only progress; the final record is written (or reported) below
            log.exception("could not mark scene %s running", job["id"])
        todo.append(job)
    groups: dict[tuple, list[dict]] = {}
    for job in todo:
        groups.setdefault((job.get("steps"), job.get("guidance")), []).append(job)

    def generate(group: list[dict]) -> list:
        steps, guidance = group[0].get("steps"), group[0].get("guidance")
        return generator.generate([j["prompt"] for j in group], [int(j["seed"]) for j in group],
                                  steps=steps, guidance=guidance)

    for group in groups.values():
        t0 = time.perf_counter()
        results, failed = run_isolated(generate, group)
        for job, reason in failed:  # recorded; the replica goes on
            outcomes[job["id"]] = {"status": "failed", "reason": reason}
        seconds = (time.perf_counter() - t0) / max(len(group), 1)
        for job, scene in results:
            try:
                meta = generator.meta(scene)
                names = store.put_files(job["id"], scene_files(scene, meta, ply_sh_degree, formats))
                outcomes[job["id"]] = {"status": "done", "result": {
                    "num_gaussians": meta["num_gaussians"], "bbox_min": meta["bbox_min"], "bbox_max": meta["bbox_max"],
                    "files": names, "generate_s": round(seconds, 3), "timings": meta["timings"],
                    "scores": meta.get("scores", {})}}
            except Exception as exc:  # noqa: BLE001
                outcomes[job["id"]] = {"status": "failed", "reason": f"writing results failed: {type(exc).__name__}: {exc}"[:500]}
    out = []
    for job in jobs:
        o = outcomes[job["id"]]
        if job not in todo:
            out.append({"id": job["id"], **o})
            continue
        try:
            store.put_status(job["id"], o["status"], **{k: v for k, v in o.items() if k != "status"})
        except Exception as exc:  # noqa: BLE001 - the ingress records it as failed from the returned outcome
            o = {"status": "failed", "reason": f"store unavailable: {type(exc).__name__}: {exc}"[:500]}
        out.append({"id": job["id"], **o})
    return out


@serve.deployment(name="SceneModel", max_ongoing_requests=8, max_queued_requests=64,
                  ray_actor_options={"num_cpus": 1})
class SceneModel:
    """One model replica: loads the generator once; `generate` is batched across concurrent callers."""

    def __init__(self, cfg: dict):
        self.cfg = Config.model_validate(cfg)
        set_torch_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1), torch.cuda.is_available(),
                          self.cfg.runtime.torch_threads)
        self.generator = SceneGenerator(self.cfg)
        self.store = SceneStore(self.cfg.serve.store, self.cfg.storage)
        self.generate.set_max_batch_size(self.cfg.serve.batch_max_size)
        self.generate.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> generator calls

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[dict]) -> list[dict]:
        self.batch_sizes[len(jobs)] += 1
        # In a thread: the replica's event loop keeps answering health checks and queueing callers.
        return await asyncio.to_thread(run_batch, self.generator, self.store, jobs, self.cfg.splats.ply_sh_degree,
                                       self.cfg.splats.formats)

    def stats(self) -> dict[int, int]:
        """How many generator calls of each batch size this replica made (the benchmark reports them)."""
        return dict(self.batch_sizes)


# ----------------------------------------------------------------------------- HTTP side

app = FastAPI(
    title="vist3a",
    version="1",
    description="Text to 3D Gaussian-splat scenes. POST a prompt, poll the status, fetch the .ply. "
                "When the server has an API key, send it in the X-API-Key header.",
    docs_url=None,   # served below from node_modules: FastAPI's default page loads Swagger UI from a CDN
    redoc_url=None,
)


@serve.deployment(name="SceneAPI", max_ongoing_requests=64, max_queued_requests=128,
                  backpressure_config=BackpressureConfig(status_code=503, retry_after_s=5),
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class SceneAPI:
    """HTTP ingress: validation, admission (queue limit), status and files from the store, the viewer page."""

    def __init__(self, model, cfg: dict):
        self.model = model
        self.cfg = Config.model_validate(cfg)
        s = self.cfg.serve
        self.store = SceneStore(s.store, self.cfg.storage)
        self.api_key = api_key_from_env(s.api_key_env)
        from vist3a.video import check_prompt, load_tokenizer  # after the key check: a slow import

        tokenizer = load_tokenizer(self.cfg.model.video)
        limit, template = self.cfg.model.video.text_encoder.max_length, self.cfg.sampling.prompt_template
        self.context = {"check_prompt": lambda p: check_prompt(tokenizer, p, limit, template),
                        "max_steps": s.max_steps, "max_guidance": s.max_guidance}
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"  # owner of the leases it holds
        self.running: dict[str, asyncio.Task] = {}   # jobs this replica runs (holds the lease of)
        self.tasks: set[asyncio.Task] = set()         # detached tasks, referenced so none is collected mid-run
        self.admission: asyncio.Lock | None = None    # one admission at a time here: the store's count stays exact
        self.recovery: asyncio.Task | None = None
        self.last_retention = 0.0
        self._ensure_recovery()

    # -- helpers

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get(API_KEY_HEADER, "")
        if hmac.compare_digest(given.encode(), self.api_key.encode()):
            return None
        return error(401, f"missing or wrong {API_KEY_HEADER} header", {"WWW-Authenticate": API_KEY_HEADER})

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        limit = self.cfg.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return error(413, f"request body is {declared} bytes, over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():  # also bounds bodies sent without Content-Length
            body += chunk
            if len(body) > limit:
                return error(413, f"request body is over the limit of {limit} bytes")
        return bytes(body)

    @staticmethod
    def _links(request: Request, scene_id: str, record: dict) -> dict:
        base = f"{request.scope.get('root_path', '').rstrip('/')}/v1/scenes/{scene_id}"  # under the app's route prefix
        links = {"self": base}
        for name in (record.get("result") or {}).get("files", []):
            links[name] = f"{base}/{name}"
        return links

    def _detached(self, coro) -> asyncio.Task:
        """Run `coro` outside any HTTP request: in a fresh context, so Serve does not cancel it (or the model
        calls it makes) when a client disconnects; referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _ensure_recovery(self) -> None:
        """Start the loop that takes over jobs with expired leases (from __init__, health checks and requests:
        whichever first runs on the replica's event loop)."""
        if self.recovery is not None and not self.recovery.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.recovery = self._detached(self._recover_forever())

    async def _recover_forever(self) -> None:
        while True:
            try:
                await self.recover_expired()
            except Exception:  # noqa: BLE001 - e.g. the store briefly unavailable: try again next round
                log.exception("taking over expired jobs failed")
            await asyncio.sleep(self.cfg.serve.lease_s / 2 * random.uniform(0.75, 1.25))  # replicas drift apart

    async def recover_expired(self) -> int:
        """Take over every open job whose lease expired and run it again; -> how many were taken over."""
        s = self.cfg.serve
        taken = 0
        for scene_id in await asyncio.to_thread(self.store.open_jobs):
            if scene_id in self.running:
                continue
            job = await asyncio.to_thread(self.store.claim, scene_id, self.replica, s.lease_s)
            if job is None:
                continue
            if job["attempt"] > s.max_attempts:
                last = job.get("last_error") or "the ingress replica running it was lost"
                await self._fail(scene_id, f"gave up after {s.max_attempts} attempts; last: {last}")
                continue
            log.warning("scene %s: lease expired, taking it over (attempt %d)", scene_id, job["attempt"])
            await asyncio.to_thread(self.store.put_status, scene_id, "queued", attempt=job["attempt"])
            self._start_job(job)
            taken += 1
        return taken

    def _start_job(self, job: dict) -> None:
        self.running[job["id"]] = self._detached(self._run_job(job))

    async def _fail(self, scene_id: str, reason: str) -> None:
        await asyncio.to_thread(self.store.put_status, scene_id, "failed", reason=reason[:500])
        await asyncio.to_thread(self.store.finish_job, scene_id)

    async def _renew_lease(self, scene_id: str) -> None:
        s = self.cfg.serve
        while True:
            await asyncio.sleep(s.lease_s / 3)
            try:
                if not await asyncio.to_thread(self.store.renew, scene_id, self.replica, s.lease_s):
                    return  # closed, or taken over after this replica stalled (a second run writes the same)
            except Exception:  # noqa: BLE001 - the next renewal may work; else the lease lapses and a replica retries
                log.exception("could not renew the lease of scene %s", scene_id)

    async def _call_model(self, payload: dict) -> dict:
        delay = 0.2
        while True:
            try:
                return await self.model.generate.remote(payload)
            except BackPressureError:  # the model's queue is full: wait (the lease is renewed meanwhile)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _run_job(self, job: dict) -> None:
        """Run one job to a final status: the model records done/failed; a model call that fails (a replica
        died mid-batch) is retried as the next attempt, up to serve.max_attempts. The job is closed once
        its status is final; if this replica dies first, the lease lapses and another one takes over."""
        s = self.cfg.serve
        scene_id, attempt = job["id"], int(job["attempt"])
        renewer = self._detached(self._renew_lease(scene_id))
        try:
            while True:
                try:
                    outcome = await self._call_model({"id": scene_id, **job["request"]})
                except Exception as exc:  # noqa: BLE001 - e.g. ActorDiedError: the model replica died mid-batch
                    reason = f"model call failed: {type(exc).__name__}: {exc}"[:400]
                    log.warning("scene %s, attempt %d of %d: %s", scene_id, attempt, s.max_attempts, reason)
                    record = await asyncio.to_thread(self.store.get_status, scene_id)
                    if record is not None and record.get("status") in FINAL:
                        break  # the result landed before the failure
                    if attempt >= s.max_attempts:
                        await self._fail(scene_id, f"{reason} (attempt {attempt} of {s.max_attempts})")
                        return
                    attempt += 1
                    await asyncio.to_thread(self.store.renew, scene_id, self.replica, s.lease_s,
                                            attempt=attempt, last_error=reason)
                    await asyncio.to_thread(self.store.put_status, scene_id, "queued", attempt=attempt)
                    await asyncio.sleep(min(0.5 * 2 ** attempt, 10.0))
                    continue
                if outcome.get("status") == "failed" and outcome.get("reason", "").startswith("store unavailable"):
                    await asyncio.to_thread(self.store.put_status, scene_id, "failed", reason=outcome["reason"])
                break
            await asyncio.to_thread(self.store.finish_job, scene_id)
        except Exception:  # noqa: BLE001 - the store failed: the job stays open, its lease lapses, a replica retries
            log.exception("scene %s: could not finish the job here", scene_id)
        finally:
            renewer.cancel()
            self.running.pop(scene_id, None)

    async def _admit(self, scene_id: str, request: dict) -> dict | None:
        """The job, or None when the store holds serve.max_queued_generations open jobs. Runs detached: once
        the request reached here, the job is admitted (and started) or refused whatever the client does."""
        s = self.cfg.serve
        if self.admission is None:
            self.admission = asyncio.Lock()
        async with self.admission:
            job = await asyncio.to_thread(self.store.admit, scene_id, request, self.replica, s.lease_s,
                                          s.max_queued_generations)
        if job is not None:
            self._start_job(job)
        return job

    def _maybe_apply_retention(self) -> None:
        now = time.monotonic()
        if now - self.last_retention < self.cfg.serve.retention_check_s:
            return
        self.last_retention = now
        s = self.cfg.serve

        async def apply():
            try:
                deleted = await asyncio.to_thread(self.store.apply_retention, s.retention_max_scenes, s.retention_hours)
                if deleted:
                    log.info("retention deleted %d scene(s)", len(deleted))
            except Exception:  # noqa: BLE001 - retention is housekeeping; requests go on
                log.exception("retention failed")

        self._detached(apply())

    # -- API

    @app.post("/v1/scenes", status_code=202, summary="Request a scene (returns at once with an id)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": SceneRequest.model_json_schema()}}}},
              responses={202: {"description": "accepted; poll the `self` link"}, 401: {"description": "API key"},
                         413: {"description": "body too large"}, 415: {"description": "not application/json"},
                         422: {"description": "a field is invalid"},
                         503: {"description": "queue full; retry after `Retry-After` seconds"}})
    async def create_scene(self, request: Request):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        self._ensure_recovery()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != JSON_TYPE:
            return error(415, f"Content-Type must be {JSON_TYPE}, got {media or 'none'!r}")
        body = await self._read_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = SceneRequest.model_validate_json(body, context=self.context)
        except ValidationError as err:
            return validation_response(err)
        s = self.cfg.serve
        scene_id = new_scene_id()
        sampling = self.cfg.sampling
        seed = req.seed if req.seed is not None else sampling.seed
        if seed is None:
            seed = seed_from(req.prompt)
        job_request = {"prompt": req.prompt, "seed": seed, "steps": req.steps or sampling.steps,
                       "guidance": sampling.guidance if req.guidance is None else req.guidance}
        try:
            # shielded: a client that disconnects cancels this await, never the admission (or the job)
            job = await asyncio.shield(self._detached(self._admit(scene_id, job_request)))
        except Exception as exc:  # noqa: BLE001
            log.exception("store unavailable")
            return error(503, f"result store unavailable: {type(exc).__name__}", {"Retry-After": str(s.retry_after_s)})
        if job is None:
            return error(503, f"queue full: {s.max_queued_generations} scenes waiting; retry later",
                         {"Retry-After": str(s.retry_after_s)})
        self._maybe_apply_retention()
        links = self._links(request, scene_id, {})
        return JSONResponse({"id": scene_id, "status": "queued", "links": links},
                            status_code=202, headers={"Location": links["self"]})

    @app.get("/v1/scenes/{scene_id}", summary="Status of a scene: queued, running, done or failed (with reason)")
    async def get_scene(self, scene_id: str, request: Request):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        record = await asyncio.to_thread(self.store.get_status, scene_id) if is_scene_id(scene_id) else None
        if record is None:
            return error(404, f"no scene with id {scene_id!r}")
        return {**record, "links": self._links(request, scene_id, record)}

    @app.get("/v1/scenes/{scene_id}/{name}", summary="A result file: scene.ply and/or scene.spz (splats.formats), preview.png, cameras.json or meta.json")
    async def get_scene_file(self, scene_id: str, name: str, request: Request):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        if name not in SCENE_FILES or not is_scene_id(scene_id):
            return error(404, f"no file {name!r} for scene {scene_id!r} (files: {', '.join(SCENE_FILES)})")
        data = await asyncio.to_thread(self.store.read_file, scene_id, name)
        if data is None:
            record = await asyncio.to_thread(self.store.get_status, scene_id)
            if record is None:
                return error(404, f"no scene with id {scene_id!r}")
            return error(404, f"{name} of scene {scene_id} is not available (status: {record['status']})")
        return Response(data, media_type=SCENE_FILES[name],
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/healthz", summary="Liveness of this ingress replica and the open jobs of the whole endpoint")
    async def healthz(self):
        self._ensure_recovery()
        return {"status": "ok", "pending": len(await asyncio.to_thread(self.store.open_jobs)),
                "running_here": len(self.running), "max_queued_generations": self.cfg.serve.max_queued_generations,
                "api_key_required": self.api_key is not None}

    async def check_health(self):
        """Serve's periodic health check: also (re)starts the take-over loop, so a replica with no traffic,
        one started after a crash included, still picks up expired jobs."""
        self._ensure_recovery()

    # -- viewer page and API docs

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="vist3a API",
                                   swagger_js_url=f"{root}/vendor/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/vendor/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/vendor/swagger-ui/favicon-32x32.png")

    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/vendor/{package}/{path:path}", include_in_schema=False)
    async def vendor(self, package: str, path: str):
        """three.js, Spark and Swagger UI from node_modules (installed by `npm ci`)."""
        if package not in VENDOR_ROOTS:
            return error(404, "unknown package")
        root = (NODE_MODULES / VENDOR_ROOTS[package]).resolve()
        # a NUL byte or an over-long name is no file we serve: 404 (the OS would raise on it: a 500)
        if "\x00" in path or len(path) > MAX_VENDOR_PATH or any(len(p.encode()) > 255 for p in path.split("/")):
            return error(404, f"not found: {package}/{path[:80]!r}")
        try:
            target = (root / path).resolve()
            found = target.is_relative_to(root) and target.is_file()
        except (OSError, ValueError):
            found = False
        if not found:
            hint = "" if root.is_dir() else " (browser packages not installed: run `npm install` in the repository)"
            return error(404, f"not found: {package}/{path}{hint}")
        media = "text/javascript" if target.suffix in (".js", ".mjs") else None
        return FileResponse(target, media_type=media)


# ----------------------------------------------------------------------------- building the application


def config_from_args(args: dict[str, Any] | None) -> Config:
    """The vist3a config from the Serve config file's `args`: `config` (a path or an inline mapping,
    same schema as deploy/*.yaml) and `overrides` (list of `key.path=value`)."""
    args = dict(args or {})
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown application args: {', '.join(sorted(unknown))} (expected: config, overrides)")
    source, overrides = args.get("config"), list(args.get("overrides") or [])
    if source is None or isinstance(source, str):
        return load_config(source, overrides)
    if isinstance(source, dict):
        return build_config(source, overrides, source="serve args.config")
    raise ConfigError(f"args.config must be a path or a mapping, got {type(source).__name__}")


def build_app(cfg: Config, model_options: dict | None = None, api_options: dict | None = None):
    """The Serve application for `cfg`; the options override the deployments' defaults (tests, benchmarks)."""
    if not is_s3(cfg.serve.store):  # replicas may run in another directory: pin a relative store here
        cfg = cfg.model_copy(deep=True)
        cfg.serve.store = os.path.abspath(os.path.expanduser(cfg.serve.store))
    cfg_dict = cfg.model_dump(mode="json")
    model = SceneModel.options(**(model_options or {})) if model_options else SceneModel
    api = SceneAPI.options(**(api_options or {})) if api_options else SceneAPI
    return api.bind(model.bind(cfg_dict), cfg_dict)


def app_builder(args: dict[str, Any]):
    """Entry point named by deploy/serve*.yaml (`import_path: pipelines.serve:app_builder`)."""
    return build_app(config_from_args(args))


def run_local(cfg: Config, host: str = "127.0.0.1", port: int = 8000, name: str = "vist3a", route_prefix: str = "/",
              model_options: dict | None = None, api_options: dict | None = None):
    """Start Serve (if needed) on an already-initialised Ray and deploy the application (tests, benchmarks)."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(cfg, model_options, api_options), name=name, route_prefix=route_prefix)

