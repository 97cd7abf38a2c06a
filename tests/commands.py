"""``lmlab(module, *args)``: run ``python -m <module> <args>`` as a user does, from their own folder.

Every end-to-end test starts its commands through here. A command whose environment is the test session's
runs in a child forked from a warm interpreter (``tests/command_server.py``: the installed lmlab, torch and
Hydra imported once per test worker), which saves the ~3 CPU-seconds each fresh interpreter spends importing
before it reads its first argument. ``fresh=True``, or an environment that differs in a variable something
may read at import (``READ_AFTER_START`` lists those that cannot), runs a real ``python -m``: for tests about
a fresh process (what it imports, what it does with such a variable). Tests that signal a running command, and
torchrun's, start their own processes (``subprocess.Popen``), not this.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import USER_DIR

SERVER = Path(__file__).resolve().parent / "command_server.py"
# Variables a fork may see differ from the server's, because nothing reads them at import: those the test
# process sets on itself while it runs (pytest for each test; torch's compiler once a test compiled) and
# lmlab's own (LMLAB_DATA_DIR, LMLAB_CACHE_DIR: read when a command needs them). The child gets the test's
# environment, as a real subprocess would; any other difference runs a fresh interpreter.
READ_AFTER_START = ("PYTEST_", "TORCHINDUCTOR_", "_TORCHINDUCTOR_", "LMLAB_")


def _import_environment(env: dict) -> dict:
    return {key: value for key, value in env.items() if not key.startswith(READ_AFTER_START)}


class _CommandServer:
    """One warm interpreter per test process, started on first use and ended with the process."""

    def __init__(self) -> None:
        self.env = _import_environment(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER)], cwd=USER_DIR, env=self.env, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._replies, self._pending = self.process.stdout.fileno(), b""
        self._read(timeout=120)  # its pid: it is ready

    def _read(self, timeout: float | None) -> dict:
        """The server's next reply line (read from the raw pipe: a buffered reader could hold a second
        reply that ``select`` then never reports)."""
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(self._replies, 4096)
            if not chunk:
                raise RuntimeError(f"the command server ended (exit {self.process.wait()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(
        self, module: str, args: list[str], cwd: Path, env: dict, pythonpath: list[str], timeout: float
    ) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", module, *args]
        with tempfile.TemporaryDirectory(prefix="lmlab-command-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"module": module, "args": args, "cwd": str(cwd), "env": env, "pythonpath": pythonpath}
            request |= {"stdout": str(out), "stderr": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._read(timeout=60)["pid"]
            try:
                returncode = self._read(timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)  # what subprocess.run does on its timeout
                self._read(timeout=60)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


_server: _CommandServer | None = None


def lmlab(
    module: str,
    *args: str,
    cwd: Path = USER_DIR,
    pythonpath: tuple[Path, ...] = (),
    env: dict | None = None,
    timeout: float = 300,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd``: its exit code and its stdout and stderr as text.
    ``pythonpath``: a user's own module folders, put before what ``PYTHONPATH`` already names (a
    ``sitecustomize.py`` there runs first, as at an interpreter's start)."""
    global _server
    env = dict(os.environ if env is None else env)
    at_import = _import_environment(env)
    warm = not fresh and at_import == _import_environment(os.environ) and (not _server or _server.env == at_import)
    if pythonpath:  # what the command's own subprocesses inherit, either way
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    if not warm:
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    if _server is None:
        _server = _CommandServer()
    return _server.run(module, list(args), Path(cwd), env, [str(p) for p in pythonpath], timeout)


def close_server() -> None:
    """End this test process's warm interpreter (the session's end calls it)."""
    global _server
    if _server is not None:
        _server.close()
        _server = None
