"""A real headless browser for page tests: Debian's chromium, driven over its DevTools protocol.

`load(path)` opens a local file in a fresh headless chromium and returns what a person
would see and what the page did: console messages and uncaught errors, every request it
made, the boxes of the elements asked for, and a full-page screenshot (PNG). No browser
automation library: the DevTools protocol over a websocket is a few messages.
`.ci/run` installs chromium when it is missing; a machine without it fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lakehouse.source.embedded import free_port


@dataclass
class Page:
    """What loading a page gave."""

    console: list[dict[str, Any]] = field(default_factory=list)
    """Console messages at level warning or error, and uncaught exceptions."""
    requests: list[str] = field(default_factory=list)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    screenshot: bytes = b""
    device_pixel_ratio: float = 1.0


def _found() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium() -> str:
    """Return the browser's path; as root on Debian, install it first if it is missing.

    The tests start their own services (Postgres, the S3 server); the browser is a system
    package, so the suite installs it only where it may (root, with apt-get), and fails
    elsewhere saying what to run.
    """
    found = _found()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(step, env=env, capture_output=True, check=False, timeout=900)
        found = _found()
    if found is None:
        msg = "no chromium on PATH: install Debian's package (`sudo apt-get install chromium`)"
        raise AssertionError(msg)
    return found


@contextlib.contextmanager
def _browser() -> Iterator[str]:
    """Start headless chromium; yield the websocket URL of its first page."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    process = subprocess.Popen(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",  # as root in a container, chromium's sandbox cannot start
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "--window-size=1200,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its zygote and renderers: one group, stopped together
    )
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
                url = pages[0]["webSocketDebuggerUrl"] if pages else None
            except OSError:
                pass
            if url is None and (time.monotonic() > deadline or process.poll() is not None):
                msg = f"chromium did not start (exit code {process.poll()})"
                raise AssertionError(msg)
            time.sleep(0.1)
        yield url  # outside the polling: the caller's errors are not taken for start-up's
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


class _Session:
    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(url, max_size=None, open_timeout=10)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {method} within {timeout} s")
            self.events.append(json.loads(self.socket.recv(timeout=remaining)))


_BOXES = """
JSON.stringify([...document.querySelectorAll(%s)].map(e => {
  const r = e.getBoundingClientRect();
  return {name: e.dataset.plot || e.tagName, empty: e.dataset.empty === "true",
          svg: !!e.querySelector("svg"), x: r.left + scrollX, y: r.top + scrollY,
          width: r.width, height: r.height};
}))
"""


def load(path: Path, selector: str) -> Page:
    """Open `path` in headless chromium; measure the `selector` elements; screenshot all."""
    page = Page()
    with _browser() as url:
        session = _Session(url)
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                session.call(f"{domain}.enable")
            session.events.clear()  # about:blank's own load is not the page's
            session.call("Page.navigate", url=path.resolve().as_uri())
            session.wait_for("Page.loadEventFired")
            found = session.call(
                "Runtime.evaluate", expression=_BOXES % json.dumps(selector), returnByValue=True
            )
            page.boxes = json.loads(found["result"]["value"])
            ratio = session.call(
                "Runtime.evaluate", expression="window.devicePixelRatio", returnByValue=True
            )
            page.device_pixel_ratio = float(ratio["result"]["value"])
            metrics = session.call("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            shot = session.call(
                "Page.captureScreenshot",
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
            import base64

            page.screenshot = base64.b64decode(shot["data"])
        finally:
            session.socket.close()
    problems = {"error", "warning", "assert"}
    for event in session.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown" or (
            method == "Runtime.consoleAPICalled" and params["type"] in problems
        ):
            page.console.append(params)
        elif method == "Log.entryAdded" and params["entry"]["level"] in problems:
            page.console.append(params["entry"])
        elif method == "Network.requestWillBeSent":
            page.requests.append(params["request"]["url"])
    return page
