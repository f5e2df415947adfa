"""A page opened in headless Chromium (Debian's `chromium`), driven over the DevTools protocol
through a pipe (--remote-debugging-pipe: JSON messages separated by NUL on fds 3 and 4), so
that a test sees what a reader's browser does: console errors, uncaught exceptions, images
that fail to load, what is visible. No library beyond the standard one.

    with Browser() as b:
        page = b.open("report.html")      # waits for the load event
        page.errors                        # console errors and exceptions, as text
        page.evaluate("document.title")
        page.screenshot("shot.png")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe", "--window-size=1280,1000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, timeout: float = 60.0):
        self.timeout, self.next_id, self.events = timeout, 0, []

    def __enter__(self):
        exe = chromium()
        if exe is None:
            raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="icl-jax-chromium-")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # the child reads commands on fd 3 and writes replies on fd 4: bash moves the pipe
        # ends there from fds >= 10, clear of 3 and 4 (dash takes no fd above 9; a
        # preexec_fn would fork a process that holds JAX's threads)
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', exe, *FLAGS,
             f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(r, w))
        os.close(r)  # the child's now
        os.close(w)
        self.buffer = b""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close")
        except Exception:  # it may be gone already
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.to_browser)
        os.close(self.from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

    # --- the protocol
    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, method: str):
        deadline = time.time() + self.timeout
        seen = len(self.events)
        while time.time() < deadline:
            for e in self.events[seen:]:
                if e.get("method") == method:
                    return e
            seen = len(self.events)
            self.events.append(self._read())
        raise TimeoutError(method)

    def open(self, path) -> "Page":
        self.events.clear()
        url = pathlib.Path(path).resolve().as_uri()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        return Page(self)


class Page:
    def __init__(self, browser: Browser):
        self.b = browser

    def evaluate(self, expression: str):
        r = self.b.call("Runtime.evaluate", session=True, expression=expression,
                        returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads since the page was opened."""
        out = []
        for e in self.b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + d.get("exception", {}).get("description",
                                                                       d.get("text", "")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.loadingFailed":
                out.append("load failed: " + p.get("errorText", ""))
        return out

    @property
    def requests(self) -> list[str]:
        """Every URL the page asked for (data: URLs included)."""
        return [e["params"]["request"]["url"] for e in self.b.events
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path, full_page: bool = False):
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.b.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": min(size["height"], 12000), "scale": 1}
        data = self.b.call("Page.captureScreenshot", session=True, **params)["data"]
        pathlib.Path(path).write_bytes(base64.b64decode(data))
        return path
