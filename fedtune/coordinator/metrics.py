"""The per-round row of ``metrics.jsonl``, and the file itself.

One JSON object per round: ``round``, ``clients`` (accepted updates), ``selected``,
``client_ids``, ``train_loss`` (example-weighted), ``eval_loss`` and the task's other evaluation
metrics (``eval_accuracy`` or ``eval_perplexity``), ``bytes_up``, ``bytes_down`` (every byte of
the round's messages on the wire, framing included), ``bytes_up_per_client`` (mean over the
accepted updates) and ``bytes_down_per_client`` (mean over the clients sent a task),
``codec_up`` and ``codec_down`` (``raw`` without compression), ``local_seconds`` (mean over
clients of their training time) and, with an uplink codec, ``encode_seconds`` and
``codec_error``,
``rejected_updates``, ``seconds``, ``eval_seconds``; with modeled devices ``sim_seconds`` and
``late_updates``; with a planner ``plans`` and coverage figures; and whatever the strategy
reports (``pseudo_gradient_norm``, ``rank_caps``, ...).

Under client-level DP the amplification by sampling that the accountant counts holds only while
nobody outside the coordinator learns who took part, so the keys that name clients
(``PARTICIPATION_KEYS``) go to ``participation.jsonl`` instead, a file for the operator that is
not part of what the run releases.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from fedtune.adapters import AdapterPlan
from fedtune.aggregation import ClientUpdate


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
    split_keys = sorted({k for u in updates for k in u.metrics if k.startswith("split_")})
    for key in ("local_seconds", "encode_seconds", *split_keys):  # clients' own figures, mean over clients
        values = [u.metrics[key] for u in updates if key in u.metrics]
        if values:
            row[key] = round(sum(values) / len(values), 4)
    return row


def personalized(number: int, updates: Sequence[ClientUpdate]) -> dict:
    """Clients' evaluations of their personalized models (FedSA-LoRA) at the start of round
    ``number``, i.e. of the models after round ``number - 1``: mean and spread over clients."""
    keys = sorted({k for u in updates for k in u.metrics if k.startswith("personal_eval_")})
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


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# Row keys that name the clients of a round: who took part, per-client figures.
PARTICIPATION_KEYS = ("client_ids", "dp_sample", "dp_sample_unaggregated", "plans", "declined")
PARTICIPATION_FILE = "participation.jsonl"


class MetricsLog:
    """``metrics.jsonl``: appended once per closed round. With ``private_participation`` the
    keys that name clients go to ``participation.jsonl`` (owner-only), not ``metrics.jsonl``."""

    def __init__(self, path: Path, private_participation: bool = False) -> None:
        self.path = Path(path)
        self.participation = self.path.with_name(PARTICIPATION_FILE) if private_participation else None

    def append(self, row: Mapping) -> None:
        row = dict(row)
        if self.participation is not None:
            private = {k: row.pop(k) for k in PARTICIPATION_KEYS if k in row}
            _append(self.participation, {"round": row.get("round"), **private}, owner_only=True)
        _append(self.path, row)

    def keep_until(self, last_round: int) -> list[dict]:
        """Drop rows after ``last_round`` (written after the checkpoint a resume starts from:
        their round runs again) and return the rows kept, participation merged back in."""
        kept = _keep_until(self.path, last_round)
        if self.participation is not None:
            by_round = {r.get("round"): r for r in _keep_until(self.participation, last_round)}
            kept = [{**r, **by_round.get(r.get("round"), {})} for r in kept]
        return kept


def _append(path: Path, row: Mapping, owner_only: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if owner_only else 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _keep_until(path: Path, last_round: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r.get("round", 0) <= last_round]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def read_rows(run_dir: Path) -> list[dict]:
    """A run's rows with participation merged back in (for the operator's own tools)."""
    rows = _read(Path(run_dir) / "metrics.jsonl")
    by_round = {r.get("round"): r for r in _read(Path(run_dir) / PARTICIPATION_FILE)}
    return [{**r, **by_round.get(r.get("round"), {})} for r in rows]


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
