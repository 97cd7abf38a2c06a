"""Pages looked at as a user sees them: Debian's headless Chromium, started by the test (skipped without it).

:func:`screenshot` takes a static page (lmlab.compare's); :func:`open_app` drives a web app (MLflow's UI) through the
DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages ending in a NUL byte on file descriptors
3 and 4, no websocket library needed) and waits until the page shows what the test looks for."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

# As a machine with no outside network needs them: no background connections, updates or sync.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--window-size=1366,900"]  # fmt: skip


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return chromium


def screenshot(url: str, png: Path, wait_ms: int = 0) -> str:
    """A screenshot of ``url`` into ``png``; returns the page's DOM after its scripts ran (``wait_ms``: the
    page's own time to fetch and draw, for a web app)."""
    chromium = _chromium()
    flags = [*FLAGS, f"--user-data-dir={png.parent / 'chromium-profile'}"]
    flags += [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
    shot = subprocess.run([chromium, *flags, f"--screenshot={png}", url], capture_output=True, timeout=180)
    assert png.is_file(), shot.stderr[-2000:]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return dom.stdout


def open_app(url: str, png: Path, shows: list[str], timeout: float = 120) -> str:
    """Open ``url`` in headless Chromium, wait until the page's text holds every string of ``shows`` (a web app
    draws after its own requests), screenshot it into ``png``; returns the page's text."""
    chromium = _chromium()
    commands_read, commands = os.pipe()  # Chromium reads the protocol's commands on fd 3...
    replies, replies_written = os.pipe()  # ...and writes its replies and events on fd 4

    def on_fds_3_and_4() -> None:  # (above 4 first: either end may itself be 3 or 4)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_written)]
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)

    browser = subprocess.Popen(
        [chromium, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={png.parent / 'chromium-profile'}",
         "about:blank"],
        pass_fds=(3, 4), preexec_fn=on_fds_3_and_4,  # kept open in Chromium: 3 and 4, made by preexec_fn
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(commands_read)
    os.close(replies_written)
    pending, sent = b"", 0
    deadline = time.monotonic() + timeout

    def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
        nonlocal pending, sent
        sent += 1
        message = {"id": sent, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" in pending:
                raw, pending = pending.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == sent:
                    assert "error" not in reply, reply
                    return reply["result"]
            assert time.monotonic() < deadline, f"Chromium did not answer {method} in {timeout} s"
            chunk = os.read(replies, 1 << 20)
            assert chunk, "Chromium ended"
            pending += chunk

    try:
        target = call("Target.createTarget", {"url": url})["targetId"]
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        text = ""
        while not all(s in text for s in shows):
            assert time.monotonic() < deadline, f"the page never showed {shows}; it shows: {text[:2000]}"
            time.sleep(0.5)
            value = call("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''",
                                              "returnByValue": True}, session)  # fmt: skip
            text = value["result"].get("value", "")
        png.write_bytes(base64.b64decode(call("Page.captureScreenshot", {"format": "png"}, session)["data"]))
        return text
    finally:
        browser.kill()
        browser.wait(timeout=30)
        os.close(commands)
        os.close(replies)
