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
"""

from __future__ import annotations

import json
import math
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


class MetricsLog:
    """``metrics.jsonl``: appended once per closed round."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: Mapping) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def keep_until(self, last_round: int) -> list[dict]:
        """Drop rows after ``last_round`` (written after the checkpoint a resume starts from:
        their round runs again) and return the rows kept."""
        if not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("round", 0) <= last_round]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept
