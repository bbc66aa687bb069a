"""pipelines.serve: the HTTP endpoint on loopback (tiny preset), its result store, and its config files."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from plyfile import PlyData

from vist3a.config import ConfigError
from vist3a.io.scene_store import SceneStore, id_time, is_scene_id, new_scene_id
from vist3a.splats.spz import read_spz

DONE = ("done", "failed")


def wait_finished(client: httpx.Client, scene_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/scenes/{scene_id}")
        assert r.status_code == 200, r.text
        record = r.json()
        if record["status"] in DONE:
            return record
        assert time.monotonic() < deadline, f"scene {scene_id} still {record['status']} after {timeout}s"
        time.sleep(0.3)


async def post_many(app, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=app.url, headers=app.headers, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/scenes", json=b) for b in bodies))


@pytest.fixture
def client(serve_app):
    with httpx.Client(base_url=serve_app.url, headers=serve_app.headers, timeout=60) as c:
        yield c


# ----------------------------------------------------------------------------- the store (no Ray)


def test_store_local(tmp_path):
    check_store(SceneStore(str(tmp_path / "store")))


def test_store_s3(s3_bucket):
    check_store(SceneStore(f"s3://{s3_bucket}/serve"))


def check_store(store: SceneStore):
    """Records, files, ids by age and both retention limits, against what was written."""
    now = time.time()
    # Five scenes, one per hour, oldest first; the second-newest is still running.
    ids = [new_scene_id(now - 3600 * (5 - k)) for k in range(5)]
    assert ids == sorted(ids) and all(is_scene_id(i) for i in ids)
    assert abs(id_time(ids[0]) - (now - 5 * 3600)) < 0.01
    for k, i in enumerate(ids):
        store.put_status(i, "queued", request={"prompt": f"p{k}"})
        store.put_status(i, "running" if k == 3 else "done", result={"files": ["scene.ply"]})
        store.put_files(i, {"scene.ply": f"ply{k}".encode()})
    rec = store.get_status(ids[3])
    assert rec["status"] == "running" and rec["request"] == {"prompt": "p3"} and rec["id"] == ids[3]
    assert store.read_file(ids[1], "scene.ply") == b"ply1"
    assert store.read_file(ids[1], "preview.png") is None
    assert store.get_status(new_scene_id()) is None
    assert store.get_status("../../etc") is None and store.read_file("../x", "scene.ply") is None
    with pytest.raises(ValueError):
        store.put_files(ids[0], {"../evil": b""})
    assert store.ids() == ids
    # Age: older than 4.5 h -> only ids[0] goes. Count 2: the oldest finished go, the running one stays.
    assert store.apply_retention(None, 4.5, now=now) == [ids[0]]
    assert store.apply_retention(2, None, now=now) == [ids[1], ids[2]]
    assert store.ids() == [ids[3], ids[4]]
    assert store.get_status(ids[1]) is None and store.read_file(ids[1], "scene.ply") is None


def test_store_queue_local(tmp_path):
    check_queue(str(tmp_path / "store"))


def test_store_queue_s3(s3_bucket):
    check_queue(f"s3://{s3_bucket}/serve")


def check_queue(root: str):
    """The store is the queue of record: admission counts its open jobs (two replicas share one limit),
    leases, take-over of an expired job by another replica, closing."""
    a, b = SceneStore(root), SceneStore(root)  # two ingress replicas on one store
    now = time.time()
    ids = [new_scene_id(now + k / 1000) for k in range(4)]
    assert a.admit(ids[0], {"prompt": "p0"}, "A", 30, limit=2)["attempt"] == 1
    assert b.admit(ids[1], {"prompt": "p1"}, "B", 30, limit=2) is not None
    assert a.admit(ids[2], {"prompt": "p2"}, "A", 30, limit=2) is None  # 2 open: refused, and withdrawn
    assert b.admit(ids[3], {"prompt": "p3"}, "B", 30, limit=2) is None
    assert a.open_jobs() == b.open_jobs() == ids[:2] and a.get_status(ids[2]) is None
    assert a.get_status(ids[0])["status"] == "queued" and a.get_status(ids[0])["request"] == {"prompt": "p0"}
    # a leased job is not taken over; an expired one is, by any replica, with its attempt counted
    assert b.claim(ids[0], "B", 30) is None
    assert a.renew(ids[0], "A", 30, attempt=1) and not b.renew(ids[0], "B", 30)
    job = b.claim(ids[0], "B", 30, now=time.time() + 31)
    assert job == {**job, "id": ids[0], "owner": "B", "attempt": 2, "request": {"prompt": "p0"}}
    assert not a.renew(ids[0], "A", 30)  # A lost it: its renewals stop
    # a job whose result landed before its replica died is closed on take-over, not run again
    b.put_status(ids[1], "done", result={"files": []})
    assert a.claim(ids[1], "A", 30, now=time.time() + 31) is None and a.open_jobs() == [ids[0]]
    b.finish_job(ids[0])
    assert a.open_jobs() == [] and a.admit(ids[2], {"prompt": "p2"}, "A", 30, limit=2) is not None
    a.delete(ids[2])
    assert a.open_jobs() == [] and a.ids() == ids[:2]  # jobs/ is no scene


class StubGenerator:
    """Stands in for SceneGenerator to test run_batch's bookkeeping: fails any batch holding 'boom'."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds, steps=None, guidance=None):
        from vist3a.generator import Scene
        from vist3a.splats.gaussians import Cameras, Gaussians

        self.calls.append((list(prompts), steps, guidance))
        if "boom" in prompts:
            raise RuntimeError("boom in the batch")
        scenes = []
        for p, s in zip(prompts, seeds, strict=True):
            n = 3 + len(p)
            g = Gaussians(means=torch.randn(n, 3), quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                          scales=torch.full((n, 3), 0.1), opacities=torch.full((n,), 0.5), sh=torch.zeros(n, 1, 3))
            cams = Cameras(viewmats=torch.eye(4)[None], Ks=torch.eye(3)[None], width=8, height=8)
            scenes.append(Scene(prompt=p, seed=s, gaussians=g, cameras=cams, previews=[]))
        return scenes

    def meta(self, scene):
        lo, hi = scene.bbox()
        return {"num_gaussians": scene.num_gaussians, "bbox_min": lo, "bbox_max": hi, "timings": {}}


def test_run_batch_isolates_a_failing_item_and_groups_by_settings(tmp_path):
    from pipelines.serve import run_batch

    store = SceneStore(str(tmp_path))
    jobs = [{"id": new_scene_id(), "prompt": p, "seed": k, "steps": st, "guidance": 5.0}
            for k, (p, st) in enumerate([("ab", 2), ("boom", 2), ("abcd", 2), ("xyz", 3)])]
    for j in jobs:
        store.put_status(j["id"], "queued")
    gen = StubGenerator()
    out = run_batch(gen, store, jobs, ply_sh_degree=0)
    assert [o["status"] for o in out] == ["done", "failed", "done", "done"]
    assert "boom in the batch" in out[1]["reason"]
    # steps=2 group as one call, then one call per item after it failed; steps=3 alone.
    assert gen.calls == [(["ab", "boom", "abcd"], 2, 5.0), (["ab"], 2, 5.0), (["boom"], 2, 5.0), (["abcd"], 2, 5.0),
                         (["xyz"], 3, 5.0)]
    for job, o in zip(jobs, out, strict=True):
        rec = store.get_status(job["id"])
        assert rec["status"] == o["status"]
        if o["status"] == "done":
            ply = PlyData.read(io.BytesIO(store.read_file(job["id"], "scene.ply")))
            assert ply["vertex"].count == 3 + len(job["prompt"]) == rec["result"]["num_gaussians"]
        else:
            assert store.read_file(job["id"], "scene.ply") is None and rec["reason"] == o["reason"]


def test_meta_records_the_steps_and_guidance_a_request_used(tmp_path, one_torch_thread):
    """A request's steps/guidance, not the config's, are what meta.json (and the record) say was used."""
    from pipelines.serve import run_batch
    from vist3a.config import build_config
    from vist3a.generator import SceneGenerator

    gen = SceneGenerator(build_config({}, ["sampling.steps=3", "sampling.guidance=7.5", "splats.preview_views=0"]))
    store = SceneStore(str(tmp_path))
    jobs = [{"id": new_scene_id(), "prompt": "a red barn", "seed": 1, "steps": 2, "guidance": 3.5},
            {"id": new_scene_id(), "prompt": "a red barn", "seed": 1, "steps": None, "guidance": None}]
    out = run_batch(gen, store, jobs, ply_sh_degree=0)
    assert [o["status"] for o in out] == ["done", "done"], out
    used = [json.loads(store.read_file(j["id"], "meta.json"))["sampling"] for j in jobs]
    assert (used[0]["steps"], used[0]["guidance"]) == (2, 3.5)
    assert (used[1]["steps"], used[1]["guidance"]) == (3, 7.5)  # no override: the config's


# ----------------------------------------------------------------------------- config files


def test_serve_config_files_follow_serve_schema_and_build_configs(repo_root):
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve import config_from_args

    docs = {p: yaml.safe_load(open(f"{repo_root}/deploy/{p}")) for p in ("serve.yaml", "serve.cluster.yaml")}
    kuberay = yaml.safe_load(open(f"{repo_root}/deploy/kuberay/rayservice.yaml"))
    docs["rayservice"] = yaml.safe_load(kuberay["spec"]["serveConfigV2"])
    for name, doc in docs.items():
        ServeDeploySchema.model_validate(doc)
        (app,) = doc["applications"]
        assert app["import_path"] == "pipelines.serve:app_builder"
        cfg = config_from_args(app["args"])
        assert {d["name"] for d in app["deployments"]} == {"SceneAPI", "SceneModel"}
        model = next(d for d in app["deployments"] if d["name"] == "SceneModel")
        assert model["max_ongoing_requests"] >= cfg.serve.batch_max_size, name
    assert docs["serve.yaml"]["http_options"]["host"] == "127.0.0.1"
    assert config_from_args(docs["serve.yaml"]["applications"][0]["args"]).serve.api_key_env is None
    assert config_from_args(docs["serve.cluster.yaml"]["applications"][0]["args"]).serve.api_key_env == "VIST3A_API_KEY"
    for name in ("serve.cluster.yaml", "rayservice"):  # the cluster endpoints serve the released model
        assert config_from_args(docs[name]["applications"][0]["args"]).preset == "vist3a-1.3b", name
    with pytest.raises(ConfigError, match="serve.max_steps"):
        config_from_args({"config": {"serve": {"max_steps": 0}}})
    with pytest.raises(ConfigError, match="unknown application args: confg"):
        config_from_args({"confg": {}})
    assert config_from_args({"config": f"{repo_root}/deploy/local.yaml", "overrides": ["serve.max_steps=7"]}).serve.max_steps == 7


# ----------------------------------------------------------------------------- the endpoint

@pytest.mark.ray
def test_valid_request_ends_with_a_ply_and_a_png(client, serve_app):
    r = client.post("/v1/scenes", json={"prompt": "a red barn in a snowy field", "seed": 7, "steps": 3, "guidance": 4.5})
    assert r.status_code == 202, r.text
    scene_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/scenes/{scene_id}" and r.json()["status"] == "queued"
    assert client.get(f"/v1/scenes/{scene_id}").json()["status"] in ("queued", "running", "done")
    record = wait_finished(client, scene_id)
    assert record["status"] == "done", record
    assert record["request"] == {"prompt": "a red barn in a snowy field", "seed": 7, "steps": 3, "guidance": 4.5}
    assert set(record["links"]) == {"self", "scene.ply", "scene.spz", "preview.png", "cameras.json", "meta.json"}
    spz = read_spz(client.get(record["links"]["scene.spz"]).content)
    assert spz.num == record["result"]["num_gaussians"]

    ply = client.get(record["links"]["scene.ply"])
    assert ply.status_code == 200
    vertex = PlyData.read(io.BytesIO(ply.content))["vertex"]
    assert vertex.count == record["result"]["num_gaussians"] > 0
    xyz = np.stack([vertex[k] for k in ("x", "y", "z")], 1)
    assert np.isfinite(xyz).all()
    assert np.allclose(xyz.min(0), record["result"]["bbox_min"], atol=1e-4)
    assert np.allclose(xyz.max(0), record["result"]["bbox_max"], atol=1e-4)
    for name in ("opacity", "scale_0", "rot_0", "f_dc_0"):
        assert name in vertex.data.dtype.names

    png = client.get(record["links"]["preview.png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    assert image.shape[0] >= 64 and image.std() > 1.0  # a render, not a blank image
    meta = client.get(record["links"]["meta.json"]).json()
    assert meta["seed"] == 7 and meta["prompt"] == "a red barn in a snowy field"


TOO_LONG = "word " * 200  # byt5 tokens > max_length 128, still under the 4096-byte body limit

BAD_BODIES = [
    ({}, "prompt", "Field required"),
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "   "}, "prompt", "only whitespace"),
    ({"prompt": TOO_LONG}, "prompt", "over the limit of 128"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"prompt": "a", "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": "a", "steps": 9}, "steps", "at most 8"),
    ({"prompt": "a", "steps": "4"}, "steps", "valid integer"),
    ({"prompt": "a", "steps": 2.5}, "steps", "valid integer"),
    ({"prompt": "a", "guidance": -1}, "guidance", "greater than or equal to 0"),
    ({"prompt": "a", "guidance": 11}, "guidance", "at most 10"),
    ({"prompt": "a", "guidance": "high"}, "guidance", "valid number"),
    ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "a", "seed": 2**31}, "seed", "less than 2147483648"),
    ({"prompt": "a", "seed": True}, "seed", "valid integer"),
    ({"prompt": "a", "colour": "red"}, "colour", "Extra inputs are not permitted"),
]


@pytest.mark.ray
def test_bad_inputs_answer_with_status_and_field(client, serve_app):
    for body, field, fragment in BAD_BODIES:
        r = client.post("/v1/scenes", json=body)
        assert r.status_code == 422, (body, r.text)
        detail = r.json()["detail"]
        assert any(d["loc"] == ["body", field] and fragment in d["msg"] for d in detail), (body, detail)
        assert f"body.{field}: " in r.json()["message"]
    for raw in (b"{not json", b"[1, 2]", b""):
        r = client.post("/v1/scenes", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"], (raw, r.text)
    for raw in (b'{"prompt": "a", "guidance": NaN}', b'{"prompt": "a", "guidance": Infinity}'):
        r = client.post("/v1/scenes", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "guidance"], (raw, r.text)

    big = {"prompt": "a" * 5000}
    r = client.post("/v1/scenes", json=big)
    assert r.status_code == 413 and "over the limit of 4096" in r.json()["detail"]
    r = client.post("/v1/scenes", content=iter([b'{"prompt": "', b"a" * 5000, b'"}']),  # chunked: no Content-Length
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 4096" in r.json()["detail"]
    # a body that is not declared JSON: 415 naming the type expected (a form post, text, no type at all)
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}, {}):
        r = client.post("/v1/scenes", content=b'{"prompt": "a"}', headers=headers)
        assert r.status_code == 415 and "Content-Type must be application/json" in r.json()["detail"], (headers, r.text)
    r = client.post("/v1/scenes", content=b'{"prompt": "a", "seed": 1.5}',
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 422  # parameters after the type are fine

    unknown = new_scene_id()
    for path in (f"/v1/scenes/{unknown}", "/v1/scenes/not-an-id", f"/v1/scenes/{unknown}/scene.ply"):
        r = client.get(path)
        assert r.status_code == 404 and "no scene" in r.json()["detail"], (path, r.text)
    assert client.get("/v1/scenes/..%2F..%2Fetc/scene.ply").status_code == 404
    ok = client.post("/v1/scenes", json={"prompt": "a small house"}).json()["id"]
    r = client.get(f"/v1/scenes/{ok}/passwd")
    assert r.status_code == 404 and "no file 'passwd'" in r.json()["detail"]
    assert wait_finished(client, ok)["status"] == "done"
    assert client.get("/healthz").json()["pending"] == 0


@pytest.mark.ray
def test_queue_full_answers_503_with_retry_after_and_accepted_ones_finish(client, serve_app):
    limit = serve_app.cfg.serve.max_queued_generations
    responses = asyncio.run(post_many(serve_app, [{"prompt": f"scene {k}", "steps": 8} for k in range(limit + 6)]))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 503}, codes
    assert limit <= codes.count(202) < len(codes), codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == str(serve_app.cfg.serve.retry_after_s)
            assert "queue full" in r.json()["detail"]
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    assert all(wait_finished(client, i)["status"] == "done" for i in accepted)
    assert client.post("/v1/scenes", json={"prompt": "after the rush", "steps": 1}).status_code == 202


@pytest.mark.ray
def test_twenty_concurrent_requests_are_all_answered_and_batched(client, serve_app):
    responses = asyncio.run(post_many(serve_app, [{"prompt": f"a castle number {k}", "steps": 2} for k in range(20)]))
    assert len(responses) == 20
    accepted = []
    for r in responses:
        assert r.status_code in (202, 503), r.text
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) > 0
        else:
            accepted.append(r.json()["id"])
    assert accepted
    records = [wait_finished(client, i) for i in accepted]
    assert all(rec["status"] == "done" for rec in records), records
    # @serve.batch gathered the concurrent prompts into generator calls of more than one.
    assert max(rec["batch_size"] for rec in records) > 1, [rec["batch_size"] for rec in records]


@pytest.mark.ray
def test_docs_health_and_viewer_page(client, repo_root):
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/scenes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"prompt", "seed", "steps", "guidance"} and body["required"] == ["prompt"]
    assert {"/v1/scenes/{scene_id}", "/v1/scenes/{scene_id}/{name}", "/healthz"} <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "https://" not in docs.text  # Swagger UI from this server, not a CDN
    page = client.get("/")
    assert page.status_code == 200 and '"@sparkjsdev/spark": "/vendor/spark/spark.module.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # everything from this server, no CDN
    assert client.get("/vendor/three/../../pyproject.toml").status_code == 404
    assert client.get("/vendor/other/x.js").status_code == 404
    for path in ("/vendor/three/a%00b.js", "/vendor/three/" + "x" * 300 + ".js", "/vendor/three/" + "a/" * 400 + "b.js"):
        r = client.get(path)
        assert r.status_code == 404 and "not found" in r.json()["detail"], (path[:40], r.status_code)
    if os.path.isdir(os.path.join(repo_root, "node_modules")):
        js = client.get("/vendor/spark/spark.module.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert client.get("/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200
        assert client.get("/vendor/swagger-ui/swagger-ui.css").headers["content-type"].startswith("text/css")


# ----------------------------------------------------------------------------- API key


@pytest.mark.ray
def test_api_key_is_enforced_when_set(serve_app):
    store = SceneStore(serve_app.store)
    existing = new_scene_id()
    store.put_files(existing, {"scene.ply": b"ply"})
    store.put_status(existing, "done", result={"files": ["scene.ply"]})
    with httpx.Client(base_url=serve_app.url, timeout=30) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": serve_app.api_key + "x"}):
            for method, path in (("POST", "/v1/scenes"), ("GET", f"/v1/scenes/{existing}"),
                                 ("GET", f"/v1/scenes/{existing}/scene.ply")):
                r = c.request(method, path, json={"prompt": "a"} if method == "POST" else None, headers=headers)
                assert r.status_code == 401 and "X-API-Key" in r.json()["detail"], (method, path, headers, r.text)
        assert c.get(f"/v1/scenes/{existing}", headers=serve_app.headers).status_code == 200
        assert c.get(f"/v1/scenes/{existing}/scene.ply", headers=serve_app.headers).content == b"ply"
        # Liveness, docs and the page stay open (the page asks for the key).
        assert c.get("/healthz").json()["api_key_required"] is True
        assert c.get("/").status_code == 200 and c.get("/openapi.json").status_code == 200
    assert store.get_status(existing)["status"] == "done"


def test_missing_key_variable_refuses_to_start(monkeypatch):
    """api_key_env names an unset or empty variable: the ingress must not start open."""
    from pipelines.serve import api_key_from_env

    monkeypatch.delenv("VIST3A_UNSET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="VIST3A_UNSET_KEY"):
        api_key_from_env("VIST3A_UNSET_KEY")
    monkeypatch.setenv("VIST3A_UNSET_KEY", "")
    with pytest.raises(RuntimeError, match="unset or empty"):
        api_key_from_env("VIST3A_UNSET_KEY")
    monkeypatch.setenv("VIST3A_UNSET_KEY", "k")
    assert api_key_from_env("VIST3A_UNSET_KEY") == "k" and api_key_from_env(None) is None
