"""A real headless Chromium, driven over the DevTools protocol (websockets, already a
dependency of the server), for tests of what a person sees in the report."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
from websockets.sync.client import ClientConnection, connect

# no network here: without these, Chromium keeps trying to reach Google's services
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--window-size=1200,900",
)


def chromium() -> str:
    """Path of the Chromium binary; `scripts/setup.sh` installs Debian's package."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError(
            "no Chromium on PATH: run `bash scripts/setup.sh` (installs Debian's "
            "`chromium` package) or install Chromium yourself"
        )
    return found


class Page:
    """One page of a running Chromium: evaluate JavaScript, take a screenshot."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive between replies; skip them
            reply = json.loads(self._ws.recv(timeout=60))
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_loaded(self, url: str, timeout_s: float = 60) -> None:
        """Until `url` is the page's document and has loaded. The tab starts on
        about:blank, which is "complete" at once: readiness alone can come too early."""
        deadline = time.monotonic() + timeout_s
        loaded = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        while not self.evaluate(loaded):
            if time.monotonic() > deadline:
                href = self.evaluate("location.href")
                raise TimeoutError(f"{url} did not finish loading (the page is at {href})")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def _stop_group(proc: subprocess.Popen) -> None:
    """Terminate Chromium, then kill its helpers (one process group) that outlive it."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def open_page(url: str, timeout_s: float = 60) -> Iterator[Page]:
    """Start a headless Chromium (own profile, loopback debugging port) on `url`."""
    # Chromium's helper processes outlive the browser for a moment and still write into
    # the profile: stop its whole process group, and let the profile's removal be lenient
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium(), *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout_s
            while not port_file.exists() or not port_file.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Chromium did not start (exit code {proc.poll()})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            debugger = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
            with connect(debugger, max_size=None) as ws:
                page = Page(ws)
                page.call("Page.navigate", url=url)  # whatever the tab shows now
                page.wait_loaded(url, timeout_s)
                yield page
        finally:
            _stop_group(proc)
