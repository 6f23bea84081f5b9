"""Running fedtune commands as real processes in tests, and waiting for what they print."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

FEDTUNE = [sys.executable, "-m", "fedtune.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "FEDTUNE_LOG_FORMAT": "plain"}


class Proc:
    """A fedtune process whose merged output is read by a thread, so a test can wait for a line."""

    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**ENV, **(env or {})})
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)
            self._new.put(line)

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """The first line from now on that matches ``pattern``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._new.get(timeout=0.5)
            except queue.Empty:
                if self.popen.poll() is not None and self._new.empty():
                    break
                continue
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "".join(self.lines[-60:]))

    def finish(self, timeout: float = 300) -> int:
        return self.popen.wait(timeout=timeout)

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)
