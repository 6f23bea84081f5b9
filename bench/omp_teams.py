"""Why a simulation keeps its large torch operations on the training threads.

    python bench/omp_teams.py [--steps 15] [--out FILE]

One MiniLM training step (LoRA r=8 on query/value, batch 16 x 40 tokens) timed in a worker
thread, each row in a fresh process:

- ``worker-only``: the worker thread is the only one that runs torch's parallel operations;
- ``main-also``: the main thread first sums one large tensor (as a coordinator that evaluates on
  its own thread does), so it holds an OpenMP team of its own;
- ``main-also-passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (no spinning at all).

Once a process holds more OpenMP threads than the machine has cores, libgomp shortens the spin
of every team between parallel regions, and each region pays to wake its threads: that is the
difference between the first two rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = {"worker-only": {}, "main-also": {}, "main-also-passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def worker(mode: str, steps: int, out: Path) -> None:
    import threading

    import torch

    from fedtune.adapters import AdapterPlan, inject_lora
    from fedtune.models import ModelStore, quiet_transformers, resolve_source

    quiet_transformers()
    store, source = ModelStore(), resolve_source("minilm")
    plan = AdapterPlan(rank=8, alpha=16.0, target_modules=("query", "value"))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 40), generator=g), "attention_mask": torch.ones(16, 40, dtype=torch.long),
             "labels": torch.randint(0, 3, (16,), generator=g)}
    result: dict = {}

    def train() -> None:
        model = inject_lora(store.instance(source, "seq-cls", ["a", "b", "c"]), plan, "seq-cls")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        times = []
        for step in range(steps + 3):  # 3 warm-up steps
            started = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 3:
                times.append(time.perf_counter() - started)
        result["ms_per_step"] = 1000 * sorted(times)[len(times) // 2]

    if mode != "worker-only":
        torch.randn(4_000_000).exp_().sum()  # the main thread's own OpenMP team
    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    out.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.worker_out)
        return 0
    rows = []
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"omp-teams-{os.getpid()}.json"
    for name, env in ROWS.items():
        subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--worker-out", str(out)],
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, check=True)
        rows.append({"name": name, **json.loads(out.read_text())})
    out.unlink(missing_ok=True)
    base = rows[0]["ms_per_step"]
    print(f"{'row':<20} {'ms/step':>8} {'vs worker-only':>15}")
    for row in rows:
        row["vs_worker_only"] = row["ms_per_step"] / base
        print(f"{row['name']:<20} {row['ms_per_step']:>8.1f} {row['vs_worker_only']:>14.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "steps": args.steps, "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
