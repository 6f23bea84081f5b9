"""Atomic per-round checkpoints of the coordinator.

Layout under the run directory::

    checkpoints/round-0003/state.safetensors     the strategy's state after round 3 (global
                                                 adapter, server optimizer moments, ...)
    checkpoints/round-0003/state.json            round number, seed, plan, strategy, model,
                                                 and the SHA-256 of state.safetensors
    checkpoints/LATEST                           "round-0003"

A checkpoint folder is written under a temporary name, its files and the folder fsynced, then
renamed into place; LATEST is written the same way and the checkpoints folder fsynced after
each rename, so a power cut at any moment leaves a complete previous checkpoint. Reading
checks every part (pointer, metadata, checksum, tensors) and falls back to the newest older
checkpoint that is whole, saying which one was damaged and why. Random choices are derived
from (seed, round), so the round number is all the RNG state needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedtune.durable import O_NOFOLLOW, fsync_dir, remove_path, replace_file, write_file

log = logging.getLogger(__name__)

KEEP = 2
_FOLDER = re.compile(r"round-(\d{4,})")


class CheckpointError(Exception):
    """A checkpoint folder that cannot be used (the message says why)."""


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    meta: dict
    damaged: tuple[str, ...] = ()  # newer checkpoints skipped, each "name: reason"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_folders(root: Path) -> list[tuple[int, Path]]:
    """The ``round-NNNN`` entries of a checkpoints folder with their round numbers, oldest
    first, ordered by number (``round-10000`` after ``round-9999``, which text order gets
    wrong)."""
    if not root.is_dir():
        return []
    found = ((_FOLDER.fullmatch(p.name), p) for p in root.iterdir())
    return sorted(((int(m.group(1)), p) for m, p in found if m), key=lambda item: item[0])


def save_checkpoint(run_dir: Path, round_number: int, state: dict[str, torch.Tensor], meta: dict) -> Path:
    root = Path(run_dir) / "checkpoints"
    if root.is_symlink():  # written into, a link would put the checkpoints wherever it points
        log.warning("%s is a symbolic link (to %s): replacing it with a folder of this run's own", root, os.readlink(root))
        root.unlink()
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_number:04d}"
    final, tmp = root / name, root / f".{name}.tmp"
    remove_path(tmp)
    # Created afresh by this call (nothing in it can be a link planted beforehand) and for the
    # operator only: its metadata carries the round's row with who took part, which a run under
    # client-level DP keeps out of what it publishes.
    tmp.mkdir(mode=0o700)
    tensors = tmp / "state.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tensors))
    fd = os.open(tensors, os.O_RDONLY | O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    record = {**meta, "round": round_number, "sha256": _sha256(tensors)}
    write_file(tmp / "state.json", (json.dumps(record, indent=2) + "\n").encode(), mode=0o600, exclusive=True)
    fsync_dir(tmp)
    remove_path(final)  # a folder of an earlier attempt at this round, or a link (never followed)
    os.replace(tmp, final)
    fsync_dir(root)
    replace_file(root / "LATEST", (name + "\n").encode())
    fsync_dir(root)
    # Keep this checkpoint and the KEEP - 1 newest before it, by round number. The one just
    # written is never pruned; folders of later rounds (left by a run that went further before
    # it was resumed from an earlier checkpoint) are replaced as their rounds run again.
    older = [p for number, p in round_folders(root) if number < round_number]
    for old in older[: max(0, len(older) - (KEEP - 1))]:
        remove_path(old)
    return final


def read_checkpoint(folder: Path) -> Checkpoint:
    """One checkpoint folder, checked whole; CheckpointError says what is wrong with it."""
    match = _FOLDER.fullmatch(folder.name)
    if match is None or not folder.is_dir():
        raise CheckpointError("no such checkpoint folder")
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"state.json unreadable ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("round") != int(match.group(1)):
        raise CheckpointError("state.json does not name this round")
    tensors = folder / "state.safetensors"
    try:
        digest = _sha256(tensors)
    except OSError as exc:
        raise CheckpointError(f"state.safetensors unreadable ({exc.__class__.__name__})") from None
    if "sha256" in meta and digest != meta["sha256"]:
        raise CheckpointError("state.safetensors does not match its checksum")
    try:
        state = load_file(str(tensors))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"state.safetensors unreadable ({str(exc)[:80]})") from None
    return Checkpoint(int(meta["round"]), state, meta)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest whole checkpoint of ``run_dir``, or None when it has none. The one LATEST
    names comes first; a damaged one (or a damaged LATEST) is skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    folders = [p for _, p in reversed(round_folders(root))]  # newest first, by round number
    damaged: list[str] = []
    latest = root / "LATEST"
    if latest.is_file():
        named = latest.read_text(errors="replace").strip()
        if _FOLDER.fullmatch(named) and (root / named).is_dir():
            folders = [root / named] + [p for p in folders if p.name != named]
        else:
            damaged.append(f"LATEST: names {named[:40]!r}, not a checkpoint folder")
    elif not folders:
        return None
    for folder in folders:
        try:
            ckpt = read_checkpoint(folder)
        except CheckpointError as exc:
            damaged.append(f"{folder.name}: {exc}")
            continue
        for line in damaged:
            log.warning("checkpoint damaged, skipped: %s", line)
        if damaged:
            log.warning("resuming from the older checkpoint %s", folder.name)
        ckpt.damaged = tuple(damaged)
        return ckpt
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(damaged))
