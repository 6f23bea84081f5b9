"""The per-round row of ``metrics.jsonl``, and the file itself.

One JSON object per round: ``round``, ``clients`` (accepted updates), ``selected``,
``client_ids``, ``train_loss`` (example-weighted), ``eval_loss`` and the task's other evaluation
metrics (``eval_accuracy`` or ``eval_perplexity``), ``bytes_up``, ``bytes_down`` (every byte of
the round's messages on the wire, framing included), ``bytes_up_per_client`` (mean over the
accepted updates) and ``bytes_down_per_client`` (mean over the clients sent a task),
``codec_up`` and ``codec_down`` (``raw`` without compression), ``local_seconds`` (mean over
clients of their training time) and, with an uplink codec, ``encode_seconds`` and
``codec_error``,
``rejected_updates``, ``seconds``, ``eval_seconds``; ``declined`` and ``rejected_by`` (client
id -> why: a device that declined its task, one whose update or split session was refused);
with modeled devices ``sim_seconds`` and
``late_updates``; with a planner ``plans`` and coverage figures; and whatever the strategy
reports (``pseudo_gradient_norm``, ``rank_caps``, ...).

Under client-level DP the amplification by sampling that the accountant counts holds only while
nobody outside the coordinator learns who took part, so the keys that name clients
(``PARTICIPATION_KEYS``) go to ``participation.jsonl`` instead, a file for the operator that is
not part of what the run releases.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from fedtune.adapters import AdapterPlan
from fedtune.aggregation import ClientUpdate
from fedtune.durable import append_line, fsync_dir, read_text_nofollow, replace_file

log = logging.getLogger(__name__)


def round_row(
    number: int,
    selected: int,
    updates: Sequence[ClientUpdate],
    strategy_metrics: Mapping,
    eval_metrics: Mapping[str, float],
    traffic: Mapping[str, int],
    seconds: float,
    eval_seconds: float,
) -> dict:
    row = {
        "round": number,
        "clients": len(updates),
        "selected": selected,
        "client_ids": [u.client_id for u in updates],
        "train_loss": strategy_metrics.get("train_loss"),
        "eval_loss": eval_metrics.get("eval_loss"),
        **{k: v for k, v in eval_metrics.items() if k != "eval_loss"},
        "bytes_up": traffic.get("bytes_up", 0),
        "bytes_down": traffic.get("bytes_down", 0),
        "bytes_up_per_client": _mean(traffic.get("up_by_client", {}).values()),
        "bytes_down_per_client": _mean(traffic.get("down_by_client", {}).values()),
        "rejected_updates": traffic.get("rejected", 0),
        "seconds": round(seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
    }
    row.update({k: _json_safe(v) for k, v in strategy_metrics.items() if k != "train_loss"})
    row.setdefault("codec_up", "raw")
    row.setdefault("codec_down", "raw")
    row.update(personalized(number, updates))
    split_keys = sorted({k for u in updates for k in u.metrics if k in CLIENT_SPLIT_METRICS})
    for key in ("local_seconds", "encode_seconds", *split_keys):  # clients' own figures, mean over clients
        values = [u.metrics[key] for u in updates if key in u.metrics]
        if values:
            row[key] = round(sum(values) / len(values), 4)
    return row


# The split recipe's per-step figures (``fedtune.methods.split.recipe``), averaged over clients
# into the row. Only these: a client's metric never becomes a key of its own in the row, nor
# replaces one the coordinator computed (``split_bytes_up``, which it counts itself).
CLIENT_SPLIT_METRICS = frozenset({
    "split_client_ms", "split_server_ms", "split_wire_ms", "split_codec_ms", "split_bytes_up_per_step",
    "split_bytes_down_per_step", "split_bits_up", "split_bits_down", "split_cut",
})


def personalized(number: int, updates: Sequence[ClientUpdate]) -> dict:
    """Clients' evaluations of their personalized models (FedSA-LoRA) at the start of round
    ``number``, i.e. of the models after round ``number - 1``: mean and spread over clients.
    The spreads and the count are the coordinator's: a client's ``personal_eval_*_std`` or
    ``personal_eval_clients`` is ignored, never copied over them."""
    keys = sorted({k for u in updates for k in u.metrics
                   if k.startswith("personal_eval_") and not k.endswith("_std") and k != "personal_eval_clients"})
    if not keys:
        return {}
    out: dict = {"personalized_after_round": number - 1}
    for key in keys:
        values = [u.metrics[key] for u in updates if key in u.metrics]
        mean = sum(values) / len(values)
        out[key] = mean
        out[key + "_std"] = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    out["personal_eval_clients"] = len([u for u in updates if keys[0] in u.metrics])
    return out


def plan_fields(plans: Mapping[str, AdapterPlan], coverage: Mapping) -> dict:
    """The planner's part of a row: who trained which layers at which ranks, and coverage."""
    if not coverage:
        return {}
    return {
        "coverage_min": coverage["min_coverage"],
        "coverage_per_layer": {str(k): v for k, v in coverage["per_layer"].items()},
        "uncovered_layers": coverage["uncovered_layers"],
        "plans": {c: {"layers": list(p.layers), "ranks": [p.rank_per_layer.get(l, p.rank) for l in p.layers]} for c, p in plans.items()},
    }


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 1) if values else None


def _json_safe(value, nonfinite: list[str] | None = None, key: str = ""):
    """``value`` as strict JSON can hold it: every float that is not finite (inf, -inf, nan),
    at any depth of dicts and lists, becomes None, and its key path (``train_loss``,
    ``dp_sample.<client>.epsilon``, ``rank_caps[2]``) is appended to ``nonfinite``.

    Without ``nonfinite`` (``round_row``'s call on a strategy's figures) the value is returned
    as it is: the row keeps the numbers in memory, and ``MetricsLog`` makes the whole row safe,
    flagging each key it changed, when it writes it (``json.dumps`` would write ``Infinity``
    and ``NaN``, which are not JSON)."""
    if nonfinite is None:
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        nonfinite.append(key)
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v, nonfinite, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, nonfinite, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


# Row keys that name the clients of a round: who took part, per-client figures.
PARTICIPATION_KEYS = ("client_ids", "dp_sample", "dp_sample_unaggregated", "plans", "declined", "rejected_by")
PARTICIPATION_FILE = "participation.jsonl"


NONFINITE_KEY = "nonfinite"  # the keys of a row whose numbers were not finite, written as null


class MetricsLog:
    """``metrics.jsonl``: appended once per closed round, one strict-JSON line per row (a
    number that is not finite is written as null and its key listed under ``nonfinite``). With
    ``private_participation`` the keys that name clients go to ``participation.jsonl``
    (owner-only), not ``metrics.jsonl``.

    Each row is appended with one ``write`` on an ``O_APPEND`` descriptor and fsynced, and
    ``keep_until`` rewrites a file through a temporary file renamed over it, so a crash leaves
    every row whole; neither ever writes through a symbolic link."""

    def __init__(self, path: Path, private_participation: bool = False) -> None:
        self.path = Path(path)
        self.participation = self.path.with_name(PARTICIPATION_FILE) if private_participation else None

    def append(self, row: Mapping) -> None:
        row = dict(row)
        if self.participation is not None:
            private = {k: row.pop(k) for k in PARTICIPATION_KEYS if k in row}
            _append(self.participation, {"round": row.get("round"), **private}, owner_only=True)
        _append(self.path, row)

    def last_training_round(self) -> int:
        """The newest training round with a row in metrics.jsonl (0 for none)."""
        text = read_text_nofollow(self.path)
        rows = _rows(text, self.path) if text is not None else []
        return max((r["round"] for r in rows if isinstance(r.get("round"), int) and not r.get("evaluation_only")), default=0)

    def keep_until(self, last_round: int) -> list[dict]:
        """Drop rows after ``last_round`` (written after the checkpoint a resume starts from:
        their round runs again) and return the rows kept, participation merged back in."""
        kept = _keep_until(self.path, last_round)
        if self.participation is not None:
            by_round = {r.get("round"): r for r in _keep_until(self.participation, last_round, owner_only=True)}
            kept = [_merge(r, by_round.get(r.get("round"))) for r in kept]
        return kept


def row_json(row: Mapping) -> str:
    """A row as strict JSON, as metrics.jsonl holds it (non-finite numbers as null, flagged)."""
    return _line(row).decode().rstrip("\n")


def _line(row: Mapping) -> bytes:
    """One row as a line of strict JSON, non-finite numbers as null and flagged."""
    nonfinite: list[str] = []
    safe = {str(k): _json_safe(v, nonfinite, str(k)) for k, v in row.items() if k != NONFINITE_KEY}
    flagged = list(row.get(NONFINITE_KEY) or []) + [k for k in nonfinite if k not in (row.get(NONFINITE_KEY) or [])]
    if flagged:
        safe[NONFINITE_KEY] = flagged
    return (json.dumps(safe, allow_nan=False) + "\n").encode()


def _merge(row: dict, private: Mapping | None) -> dict:
    """A metrics row with its participation row merged back in (both lists of non-finite keys)."""
    if not private:
        return row
    merged = {**row, **private}
    flagged = list(row.get(NONFINITE_KEY) or []) + list(private.get(NONFINITE_KEY) or [])
    if flagged:
        merged[NONFINITE_KEY] = flagged
    return merged


def _append(path: Path, row: Mapping, owner_only: bool = False) -> None:
    line, mode = _line(row), 0o600 if owner_only else 0o644
    try:
        append_line(path, line, mode=mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP or not path.is_symlink():
            raise
        # Not a file this run wrote: the link goes (its target is left as it was), a file of
        # the run's own takes its place.
        log.warning("%s is a symbolic link (to %s): replacing the link with this run's own file", path, os.readlink(path))
        path.unlink()
        append_line(path, line, mode=mode)


def _keep_until(path: Path, last_round: int, owner_only: bool = False) -> list[dict]:
    text = read_text_nofollow(path)
    if text is None:
        if path.is_symlink():
            log.warning("%s is a symbolic link (to %s), not a file this run wrote: its rows are not read, the link will be replaced", path, os.readlink(path))
        return []
    kept = [r for r in _rows(text, path) if r.get("round", 0) <= last_round]
    replace_file(path, b"".join(_line(r) for r in kept), mode=0o600 if owner_only else 0o644)
    fsync_dir(path.parent)
    return kept


def read_rows(run_dir: Path) -> list[dict]:
    """A run's rows with participation merged back in (for the operator's own tools)."""
    rows = _read(Path(run_dir) / "metrics.jsonl")
    by_round = {r.get("round"): r for r in _read(Path(run_dir) / PARTICIPATION_FILE)}
    return [_merge(r, by_round.get(r.get("round"))) for r in rows]


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return _rows(path.read_text(), path)


def _rows(text: str, path: Path) -> list[dict]:
    """The rows of a JSON-lines file. A last line that is not JSON is a row torn by a crash
    while it was written (its round has no checkpoint, so it runs again): skipped with a
    warning. (Files written before rows were strict JSON may hold ``Infinity``/``NaN``, which
    are read as floats.)"""
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i != lines[-1][0]:
                raise ValueError(f"{path}: line {i} is not JSON") from None
            log.warning("%s: the last line is not JSON (a row torn by a crash), skipped", path)
    return rows
