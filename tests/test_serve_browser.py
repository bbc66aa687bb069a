"""The viewer page in headless Chromium: a generated scene is drawn as splats (three.js + Spark from npm).

Needs Debian's `chromium` and the repository's node_modules (`npm install`); skipped without them.
The browser is driven over the DevTools protocol (a WebSocket), so no browser download is needed.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(CHROMIUM is None, reason="headless browser test needs Debian's `chromium` (apt-get install chromium)"),
]


@pytest.fixture(scope="session", autouse=True)
def viewer_packages(repo_root):
    """Skip (before the session's Ray and Serve start) when the viewer's npm packages are not installed."""
    if not os.path.isdir(os.path.join(repo_root, "node_modules", "@sparkjsdev", "spark")):
        pytest.skip("viewer packages not installed: run `npm install` at the repository root")


class Browser:
    """Headless Chromium with software WebGL, driven over the DevTools protocol."""

    def __init__(self, profile_dir: str, width: int = 1000, height: int = 700):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--ignore-gpu-blocklist", "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("chromium exited during start-up")
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep draining
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.console: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in msg["params"]["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(msg["params"]["exceptionDetails"].get("exception", {}).get("description")))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self) -> Image.Image:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def test_viewer_renders_a_generated_scene(serve_app, tmp_path):
    """A person's path: open /, type a prompt (and the server's API key), press Generate, watch the
    status, see the splats."""
    browser = Browser(str(tmp_path / "profile"))
    try:
        browser.call("Page.navigate", url=f"{serve_app.url}/")
        deadline = time.monotonic() + 60
        while browser.evaluate("document.readyState === 'complete' && !!window.viewerState") is not True:
            assert time.monotonic() < deadline, "page did not load"
            time.sleep(0.2)
        browser.evaluate("document.getElementById('prompt').value = 'a red barn in a snowy field';"
                         "document.getElementById('seed').value = '3';"
                         f"document.getElementById('apikey').value = '{serve_app.api_key}';"
                         "document.getElementById('go').click()")
        deadline = time.monotonic() + 180
        phases = []
        while True:
            state = browser.evaluate("JSON.stringify(window.viewerState)")
            state = json.loads(state) if state else None
            if state and (not phases or phases[-1] != state["phase"]):
                phases.append(state["phase"])
            if state and state["phase"] in ("rendered", "failed"):
                break
            assert time.monotonic() < deadline, f"viewer stuck: {state}; console: {browser.console[-10:]}"
            time.sleep(0.3)
        assert state["phase"] == "rendered", f"{state}; console: {browser.console[-10:]}"
        assert state["format"] == "spz"  # the server stores both (conftest): the page draws the compact file
        assert "waiting" in phases, phases
        scene_id = state["message"]
        status_text = browser.evaluate("document.getElementById('status').textContent")
        assert status_text.startswith("done:") and scene_id in status_text
        assert browser.evaluate("location.search") == f"?scene={scene_id}"
        rect = browser.evaluate("JSON.stringify(document.getElementById('viewer').getBoundingClientRect())")
        rect = json.loads(rect)
        shot = browser.screenshot()
    finally:
        browser.close()

    shot.save(tmp_path / "viewer.png")
    if os.environ.get("VIST3A_SCREENSHOT_DIR"):  # keep a copy to look at
        os.makedirs(os.environ["VIST3A_SCREENSHOT_DIR"], exist_ok=True)
        shot.save(os.path.join(os.environ["VIST3A_SCREENSHOT_DIR"], "viewer.png"))
    x0, y0 = int(rect["left"]), int(rect["top"])
    canvas = np.asarray(shot, dtype=np.float32)[y0:y0 + int(rect["height"]), x0:x0 + int(rect["width"])]
    assert canvas.shape[0] > 100 and canvas.shape[1] > 100
    background = np.array([0x20, 0x20, 0x20], np.float32)  # the page's scene.background
    drawn = np.abs(canvas - background).max(-1) > 6
    # A render, not an empty canvas: a share of pixels differ from the background, they vary, and
    # they spread over the middle of the canvas (the page frames the scene's bounding box).
    assert drawn.mean() > 0.03, f"only {drawn.mean():.4f} of the canvas is drawn"
    assert canvas.std() > 2.0
    rows, cols = np.nonzero(drawn)
    assert np.ptp(cols) > 0.3 * canvas.shape[1] and np.ptp(rows) > 0.3 * canvas.shape[0]
    assert abs(cols.mean() / canvas.shape[1] - 0.5) < 0.2 and abs(rows.mean() / canvas.shape[0] - 0.5) < 0.2
