"""Pages looked at as a user sees them: Debian's headless Chromium, started by the test (skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# As a machine with no outside network needs them: no background connections, updates or sync.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--window-size=1366,900"]  # fmt: skip


def screenshot(url: str, png: Path, wait_ms: int = 0) -> str:
    """A screenshot of ``url`` into ``png``; returns the page's DOM after its scripts ran (``wait_ms``: the
    page's own time to fetch and draw, for a web app)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    flags = [*FLAGS, f"--user-data-dir={png.parent / 'chromium-profile'}"]
    flags += [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
    shot = subprocess.run([chromium, *flags, f"--screenshot={png}", url], capture_output=True, timeout=180)
    assert png.is_file(), shot.stderr[-2000:]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return dom.stdout
