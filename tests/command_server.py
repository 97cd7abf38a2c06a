"""A warm interpreter that runs the tests' ``python -m lmlab.<command> ...`` as a forked child.

Why: an lmlab command spends about three CPU-seconds starting (``import torch`` alone is two) before it
reads its first argument, and the end-to-end tests start well over a hundred of them. This server imports
torch, Hydra and lmlab's library once; each command then runs in a child forked from it, as ``python -m``
would run it: in its own working folder with that folder first on ``sys.path``, ``sys.argv`` set, stdout and
stderr written to their own files, its threads joined and ``atexit`` functions run, and the exit status the
interpreter would give (``sys.exit``'s code, 1 after a traceback printed by ``sys.excepthook``, minus the
signal that killed it).

What differs from a fresh interpreter, and so stays on a real ``python -m`` (``tests.commands.lmlab``'s
``fresh=True``, or an environment that differs from this server's in a variable that may be read at import):
the modules listed in ``PRELOADED`` are already imported, so a test about what a command imports, or about a
variable read at import time, cannot run here. Started by ``tests.commands`` from the user's folder
(``tests.conftest.USER_DIR``), never the checkout, so ``import lmlab`` finds the installed lmlab exactly as the
command does.

Protocol: one JSON request per line on stdin, ``{"module", "args", "cwd", "env", "pythonpath", "stdout",
"stderr"}`` (``env``: the test's environment, which differs from this server's only where nothing reads it at
import; ``pythonpath``: folders a user's ``PYTHONPATH`` would add, put where the interpreter puts them); this
server answers ``{"pid": N}`` once the child runs and ``{"returncode": N}`` when it ended. End of stdin ends it.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import runpy
import sys
import threading

import lmlab.runtime.cpu_load

# What every lmlab command imports before its first step (torch imports its compiler, torch._dynamo, on the
# first optimizer step or model built on the meta device: 1.4 s); nothing here starts a Python thread or
# touches a device, so a fork of this process is as clean as a fresh interpreter that imported the same.
PRELOADED = (
    "torch", "torch._dynamo", "hydra.main", "omegaconf", "lmlab.job", "lmlab.evaluation.methods", "lmlab.factory",
)  # fmt: skip


def _exit_code(code: object) -> int:
    """The status the interpreter gives ``sys.exit(code)`` (it prints a code that is not an int)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run_sitecustomize(folders: list[str]) -> None:
    """What ``site`` does at an interpreter's start with a ``sitecustomize`` on ``PYTHONPATH`` (before the
    command's folder is on ``sys.path``): import the first one (a test's audit hook installs itself so)."""
    for folder in folders:
        path = os.path.join(folder, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("sitecustomize", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            spec.loader.exec_module(module)
            return


def _run_child(request: dict, closing: list[int]) -> None:
    """In the forked child: become ``python -m module args`` in ``cwd``; never returns."""
    code = 1
    try:
        for fd in closing:
            os.close(fd)
        atexit._clear()  # the server's exit functions are not the command's
        lmlab.runtime.cpu_load.restart()  # the command's start, which a fresh interpreter would measure from
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
            os.close(out)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = os.getcwd()  # `python -m` puts the working folder first, then PYTHONPATH's folders
        if request["pythonpath"]:
            sys.path[1:1] = request["pythonpath"]  # (``env`` holds the PYTHONPATH naming them)
            _run_sitecustomize(request["pythonpath"])
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = _exit_code(stop.code)
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            sys.excepthook(*sys.exc_info())
            code = 1
        # The interpreter's own finalisation, in its order: join the threads that are not daemons and run
        # threading's exit hooks (concurrent.futures shuts its executors down there: joblib's loky workers
        # outlived a command that skipped this), then the atexit functions.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream has nothing left to write
                pass
        os._exit(code)


def serve() -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    quiet = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # nothing the server itself prints can reach the reply channel
        os.dup2(quiet, fd)
    os.close(quiet)

    def reply(**fields: int) -> None:
        replies.write(json.dumps(fields) + "\n")
        replies.flush()

    reply(pid=os.getpid())  # ready
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, [requests.fileno(), replies.fileno()])
        reply(pid=pid)
        _, status = os.waitpid(pid, 0)
        reply(returncode=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    serve()
