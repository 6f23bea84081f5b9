"""Shared by the benchmarks: run a worker in its own child process and measure the peak resident
memory of the child and every process it starts (Ray workers, SuperNodes), sampled every 50 ms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_worker(script: str, args: list[str], out: Path, *, env: dict | None = None, timeout_s: float = 3600) -> dict:
    """Run ``python script --worker-out out *args``; returns the JSON it wrote plus ``peak_mib``."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, script, *args, "--worker-out", str(out)], env=env)
    parent, peak, started = psutil.Process(proc.pid), 0, time.monotonic()
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        if time.monotonic() - started > timeout_s:
            proc.kill()
            raise SystemExit(f"worker {args} ran past {timeout_s:.0f} s")
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    result["peak_mib"] = peak / 1024**2
    return result
