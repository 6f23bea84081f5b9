"""Atomic per-round checkpoints of the coordinator.

Layout under the run directory::

    checkpoints/round-0003/state.safetensors     the strategy's state after round 3 (global
                                                 adapter, server optimizer moments, ...)
    checkpoints/round-0003/state.json            round number, seed, plan, strategy
    checkpoints/LATEST                           "round-0003"

A checkpoint folder is written under a temporary name and renamed into place, then LATEST is
replaced atomically; a crash at any moment leaves the previous checkpoint intact. Random
choices are derived from (seed, round), so the round number is all the RNG state needed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP = 2


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    meta: dict


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, round_number: int, state: dict[str, torch.Tensor], meta: dict) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_number:04d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "round": round_number}, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = root / ".LATEST.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "LATEST")
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The latest checkpoint of ``run_dir``, or None when it has none."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    folder = root / latest.read_text().strip()
    meta = json.loads((folder / "state.json").read_text())
    state = load_file(str(folder / "state.safetensors"))
    return Checkpoint(int(meta["round"]), state, meta)
