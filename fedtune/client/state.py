"""What a device keeps across its own restarts (``fedtune client --state-dir``).

Three kinds of state outlive a round on the device, and losing any of them on a restart is a
silent error rather than a crash:

- the recipes' memory: FedSA-LoRA's personal B matrices, SCAFFOLD's control variates,
  HetLoRA's tail-norm history: without them a restarted client trains from the wrong start;
- the uplink codec's error-feedback residuals: without them what earlier rounds dropped is lost;
- the sample-level DP accounting (every round's noise multiplier, sample rate and steps):
  without it the device would report a smaller epsilon than it has spent.

It also keeps the client id and token the coordinator gave it, so a restarted device rejoins
as itself (a stale token is simply replaced by registering again).

The state is one folder: ``tensors.safetensors`` and ``state.json`` (everything else, and the
tensor file's sha256), written to temporary names, fsynced, then renamed, so a crash leaves
either the old state or the new one. Files are private to the user (mode 0600). The memory
and residuals belong to one federation: loaded for another coordinator address or model they
are dropped with a warning, while the privacy accounting is kept whatever the federation,
because it is about this device's data. A damaged state file is an error, never a fresh
start: starting over would forget privacy already spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedtune.durable import fsync_dir, replace_file

log = logging.getLogger(__name__)

STATE_VERSION = 1
_TENSOR = "__tensor__"   # a JSON leaf that stands for a tensor in tensors.safetensors
_TUPLE = "__tuple__"     # a JSON leaf that stands for a tuple (HetLoRA keeps (rank, norm))


class StateError(RuntimeError):
    """The device's saved state cannot be read; the message says which file and what to do."""


@dataclass
class DeviceState:
    federation: str = ""          # coordinator address and model the memory belongs to
    client_id: str = ""
    token: str = field(default="", repr=False)
    memory: dict[str, dict] = field(default_factory=dict)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)
    # A round whose update a host (Flower) sent with no answer yet: {"round", "memory",
    # "residuals"}, the state to take up once the update is known to be accepted.
    pending: dict = field(default_factory=dict)


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, with each tensor moved into ``tensors`` under its path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise StateError(f"device state {path!r}: only string keys can be saved")
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE: [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise StateError(f"device state {path!r}: cannot save a {type(value).__name__}")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_TUPLE}:
            return tuple(_join(v, tensors) for v in value[_TUPLE])
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _body(state: DeviceState, tensors: dict[str, torch.Tensor]) -> dict:
    """``state`` as JSON, its tensors moved into ``tensors``."""
    return {
        "version": STATE_VERSION,
        "federation": state.federation,
        "client_id": state.client_id,
        "token": state.token,
        "memory": _split(state.memory, "memory", tensors),
        "residuals": _split(state.residuals, "residuals", tensors),
        "privacy": _split(state.privacy, "privacy", tensors),
        "pending": _split(state.pending, "pending", tensors),
    }


def state_to_bytes(state: DeviceState) -> bytes:
    """The recipes' memory, residuals and privacy accounting as one blob (a JSON line, then the
    tensors as safetensors), for hosts that keep a device's state themselves (Flower's
    ``context.state``). Identity is left out: a host has its own."""
    tensors: dict[str, torch.Tensor] = {}
    body = _body(state, tensors)
    del body["client_id"], body["token"]
    return json.dumps(body).encode() + b"\n" + (save_tensors(tensors) if tensors else b"")


def state_from_bytes(blob: bytes) -> DeviceState:
    """The inverse of ``state_to_bytes``; a damaged blob is a StateError, never a fresh start."""
    try:
        head, _, rest = bytes(blob).partition(b"\n")
        body = json.loads(head)
        if not isinstance(body, dict) or body.get("version") != STATE_VERSION:
            raise ValueError("unknown state version")
        tensors = load_tensors(rest) if rest else {}
        return DeviceState(federation=str(body["federation"]), memory=_join(body["memory"], tensors),
                           residuals=_join(body["residuals"], tensors), privacy=_join(body["privacy"], tensors),
                           pending=_join(body.get("pending", {}), tensors))
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"device state blob is damaged ({exc})") from None


def save_state(folder: str | Path, state: DeviceState) -> None:
    """Write ``state`` into ``folder`` so that a crash at any point leaves a readable state.

    The tensor file is written under a name that includes its hash, then state.json (which names
    it) replaces the old one: the rename of state.json is the single commit point."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tensors: dict[str, torch.Tensor] = {}
    body = _body(state, tensors)
    blob = save_tensors(tensors) if tensors else b""
    digest = hashlib.sha256(blob).hexdigest()
    tensor_file = f"tensors-{digest[:16]}.safetensors"
    body["tensors"], body["tensors_sha256"] = tensor_file, digest
    replace_file(folder / tensor_file, blob, mode=0o600)
    replace_file(folder / "state.json", json.dumps(body, indent=1).encode(), mode=0o600)
    fsync_dir(folder)
    for old in folder.glob("tensors-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)


def load_state(folder: str | Path, federation: str) -> DeviceState:
    """The state saved in ``folder`` (an empty one when there is none yet). Memory, residuals
    and identity saved for another ``federation`` are dropped with a warning; the privacy
    accounting is always kept."""
    folder = Path(folder)
    path = folder / "state.json"
    if not path.exists():
        return DeviceState(federation=federation)
    advice = f"move {folder} away to start afresh (which forgets the privacy this device has spent)"
    try:
        body = json.loads(path.read_text())
        if not isinstance(body, dict) or body.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {body.get('version') if isinstance(body, dict) else None!r}")
        blob = (folder / body["tensors"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != body["tensors_sha256"]:
            raise ValueError(f"{body['tensors']} does not match its checksum")
        tensors = load_tensors(blob) if blob else {}
        state = DeviceState(
            federation=str(body["federation"]), client_id=str(body["client_id"]), token=str(body["token"]),
            memory=_join(body["memory"], tensors), residuals=_join(body["residuals"], tensors), privacy=_join(body["privacy"], tensors),
            pending=_join(body.get("pending", {}), tensors),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"device state in {folder} is damaged ({exc}); {advice}") from None
    if state.federation != federation:
        if state.memory or state.residuals or state.pending or state.client_id:
            log.warning("device state in %s belongs to %s, not %s: its training memory and identity are dropped, its privacy accounting kept",
                        folder, state.federation or "another federation", federation)
        return DeviceState(federation=federation, privacy=state.privacy)
    return state
