"""``run.log``: every line a run prints, on stdout or stderr, also in its folder, each with its time.

One writer for the file, whoever prints: the start banner, progress, epochs, hooks' notes, a stop and its
"Resume with" line, an error. While a :class:`RunLog` is active, ``sys.stdout`` and ``sys.stderr`` write
through to the console as before and hand each complete line to it. Lines printed before the run holds its
folder (the banner, a resume note) are held, and written when :meth:`RunLog.begin` is called, once the run
proved sound: a run refused before then leaves its folder as it found it. A progress bar's redraws (text
after a carriage return) are not lines and stay on the console.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from lmlab.runtime.files import open_append

_active: RunLog | None = None


class RunLog:
    """Copy this process's console lines into ``path`` (see the module's docstring). ``prefix``, which a
    multirun job's console lines start with (``[job 3] ``), is left out of the file: the file is the job's."""

    def __init__(self, path: str | Path, prefix: str = "") -> None:
        self.path, self.prefix = Path(path), prefix
        self._held: list[str] = []
        self._file: IO[str] | None = None
        self._streams: tuple[Any, Any] | None = None
        self._lock, self._busy, self._backlog = threading.RLock(), False, []

    def __enter__(self) -> RunLog:
        global _active
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Tee):
                stream.flush_partial()
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
        _active = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def begin(self) -> None:
        """The run holds its folder: write the held lines, and every line from now on as it comes."""
        if self._file is None:
            self._file = open_append(self.path)
            self._file.writelines(self._held)
            self._file.flush()
            self._held = []

    def take(self, tee: _Tee, text: str) -> None:
        """Text written to ``tee``: its complete lines are added. The one writer for both streams, safe against a
        print from a signal handler that lands inside a write (the Ctrl-C notice): that text waits in a backlog
        instead of re-entering the file's writer (which would raise) or a stream's unfinished line."""
        with self._lock:
            if self._busy:
                self._backlog.append((tee, text))
                return
            self._busy = True
            try:
                self._lines_of(tee, text)
                while self._backlog:
                    self._lines_of(*self._backlog.pop(0))
            finally:
                self._busy = False

    def _lines_of(self, tee: _Tee, text: str) -> None:
        *lines, tee.partial = (tee.partial + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]  # a bar redrawn in place: what is left on the screen
            if line.strip():
                self.add(line)
        tee.partial = tee.partial.rsplit("\r", 1)[-1]

    def add(self, line: str) -> None:
        if line.startswith(self.prefix):
            line = line[len(self.prefix) :]
        stamped = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n"
        if self._file is None:
            self._held.append(stamped)
        else:
            self._file.write(stamped)
            self._file.flush()


def begin_run_log() -> None:
    """Start writing the active :class:`RunLog` (if any) to its file: the run now owns its folder."""
    if _active is not None:
        _active.begin()


class _Tee:
    """A text stream that writes through to ``stream`` and hands what it is written to its :class:`RunLog`,
    which cuts it into lines (this stream's unfinished line is kept here)."""

    def __init__(self, stream: Any, log: RunLog) -> None:
        self._stream, self._log, self.partial = stream, log, ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._log.take(self, text)
        return written

    def flush_partial(self) -> None:
        if self.partial.strip():
            self._log.add(self.partial)
        self.partial = ""

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, flush...: the console's own
        return getattr(self._stream, name)
