"""Headless Chromium driven through the Chrome DevTools protocol, for the report's tests.

Chromium is started with ``--remote-debugging-pipe``: it reads protocol commands from file
descriptor 3 and writes replies and events to descriptor 4, each message JSON ending in a NUL
byte. That needs no websocket library and no TCP port. :meth:`Browser.load` opens a page and
returns what a user would meet: console errors, uncaught exceptions, failed loads, and the
page's images, links and element ids as the browser sees them after the load event.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")

# What the page holds once loaded: every <img> (decoded or not), every <a href> as written and
# resolved, every element id, and the section ids.
_INSPECT = """JSON.stringify({
  images: Array.from(document.images).map(i => ({src: i.getAttribute('src').slice(0, 80), alt: i.alt,
    ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => ({href: a.getAttribute('href'), url: a.href})),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  sections: Array.from(document.querySelectorAll('section[id]')).map(e => e.id),
  toc: Array.from(document.querySelectorAll('nav#contents a')).map(a => a.getAttribute('href')),
  height: document.documentElement.scrollHeight, title: document.title})"""


@dataclass
class Loaded:
    """A page after its load event: problems reported by the browser, and what it holds."""

    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict] = field(default_factory=list)
    links: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    toc: list[str] = field(default_factory=list)
    height: int = 0
    title: str = ""


class Browser:
    """One headless Chromium process; use as a context manager."""

    def __init__(self, profile: Path, chromium: Path = CHROMIUM, width: int = 1200, height: int = 900):
        cmd_read, self._cmd = os.pipe()  # we write commands, Chromium reads fd 3
        self._out, out_write = os.pipe()  # Chromium writes fd 4, we read

        def fds() -> None:  # in the child: the two pipe ends as fds 3 and 4 (inheritable)
            a = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(out_write, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=fds, close_fds=False)
        os.close(cmd_read)
        os.close(out_write)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd, self._out):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ protocol

    def _message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from chromium")
            ready, _, _ = select.select([self._out], [], [], left)
            if ready:
                chunk = os.read(self._out, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode()[-2000:]}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, session: bool = False, timeout: float = 60) -> dict:
        """Send a command and wait for its reply (events that arrive meanwhile are kept)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline - time.monotonic())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        """The first event ``method`` not yet seen (events before it are kept)."""
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            e = self._message(deadline - time.monotonic())
            if e.get("method") == method:
                return e
            self.events.append(e)

    def evaluate(self, expression: str):
        out = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:60]}: {out['exceptionDetails']}")
        return out["result"].get("value")

    # ------------------------------------------------------------------ pages

    def load(self, url: str, settle: float = 0.5) -> Loaded:
        """Open ``url``, wait for its load event (and ``settle`` s for late scripts)."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for("Page.loadEventFired")
        time.sleep(settle)
        found = Loaded(**json.loads(self.evaluate(_INSPECT)))
        while True:  # drain what arrived
            ready, _, _ = select.select([self._out], [], [], 0.2)
            if not ready and b"\0" not in self._buffer:
                break
            self.events.append(self._message(5))
        found.errors = problems(self.events)
        return found

    def screenshot(self, path: Path, width: int, height: int, top: int = 0) -> None:
        """``width`` x ``height`` CSS px of the open page from ``top`` as a PNG."""
        import base64

        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": top, "width": width, "height": height, "scale": 1}}, session=True)
        path.write_bytes(base64.b64decode(shot["data"]))


def problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries and failed loads among ``events``."""
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"load failed: {p.get('errorText')} ({p.get('type')})")
    return out


def ensure_chromium(root: Path) -> Path:
    """Debian's chromium, installed by ``scripts/ensure_chromium`` when missing."""
    if not CHROMIUM.exists():
        subprocess.run(["bash", str(root / "scripts" / "ensure_chromium")], check=False, timeout=900)
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing and scripts/ensure_chromium could not install it")
    return CHROMIUM
