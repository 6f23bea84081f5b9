"""The round engine: who trains in which round, what they get, when a round closes, and what
happens when it does. It knows nothing of gRPC; the service translates calls into these methods.

One round:
1. wait until ``min_clients`` clients are alive (registered and recently heard from);
2. select the round's clients with a generator seeded from (seed, round), and give each its
   adapter plan (the same plan for all, or from the capability planner);
3. hand each selected client its slice of the global adapter when it asks for work;
4. accept updates until a quorum of the selected clients has answered, every client still
   missing has gone silent, or the deadline passes;
5. aggregate, evaluate on held-out data, append a row to metrics.jsonl, checkpoint.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from fedtune.adapters import AdapterPlan
from fedtune.adapters.lora import BASE_DELTA
from fedtune.aggregation import ClientUpdate, Strategy
from fedtune.aggregation.lora_math import remainder
from fedtune.config import RunConfig
from fedtune.coordinator.checkpoint import load_checkpoint, save_checkpoint
from fedtune.coordinator.clients import ClientRecord, ClientRegistry
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.global_model import GlobalModel
from fedtune.coordinator.planner import CostModel, ModelGeometry, Planner, coverage
from fedtune.devices import Capabilities
from fedtune.protocol.tensors import EncodedTensor, TensorSpec, encode_tensors, specs_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainTask:
    round: int
    plan: AdapterPlan
    seed: int
    deadline_unix: float
    tensors: list[EncodedTensor]


@dataclass(frozen=True)
class Wait:
    retry_after_s: float


@dataclass(frozen=True)
class Done:
    pass


@dataclass
class _Round:
    number: int
    selected: list[str]
    deadline: float                     # monotonic
    deadline_unix: float
    started: float
    plans: dict[str, AdapterPlan]       # client id -> its plan this round
    payloads: dict[tuple, list[EncodedTensor]]   # plan key -> what a client of that plan gets
    specs: dict[tuple, dict[str, TensorSpec]]    # plan key -> what it must send back
    coverage: dict
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    fetched: set[str] = field(default_factory=set)
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0
    open: bool = True


class RoundEngine:
    def __init__(
        self,
        config: RunConfig,
        global_model: GlobalModel,
        strategy: Strategy,
        run_dir: Path,
        *,
        planner: Planner | None = None,
        geometry: ModelGeometry | None = None,
        resume: bool = False,
        on_round_end: Callable[[dict], None] | None = None,
    ) -> None:
        self.config = config
        self.fed = config.federation
        self.global_model = global_model
        self.plan = global_model.plan
        self.global_spec = global_model.spec(self.plan)
        self.strategy = strategy
        self.planner = planner
        self.geometry = geometry
        self.cost = CostModel(config.training.batch_size, config.model.max_length, config.training.local_steps)
        self.run_dir = Path(run_dir)
        self.registry = ClientRegistry()
        self.on_round_end = on_round_end
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._cond = threading.Condition()
        self._round: _Round | None = None
        self._done = False
        self._stopping = False
        self._told_done: set[str] = set()
        self._rank_caps: dict[str, int] = {}  # HetLoRA self-pruning: client id -> largest rank
        self.history: list[dict] = []
        self.start_round = 1
        self.global_state = strategy.initial_state(global_model.initial_state())
        if resume:
            self._resume()

    # ------------------------------------------------------------------ resume

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is None:
            log.info("no checkpoint in %s: starting from round 1", self.run_dir)
            return
        expected = specs_of(self.global_state)
        if specs_of(ckpt.adapter) != expected:
            raise CoordinatorError(
                "FAILED_PRECONDITION",
                f"checkpoint in {self.run_dir} does not fit the configured adapter (different model or LoRA plan)",
            )
        self.global_state = ckpt.adapter
        self.strategy.load_state_dict(ckpt.strategy)
        self._rank_caps = {str(k): int(v) for k, v in ckpt.state.get("rank_caps", {}).items()}
        self.start_round = ckpt.round + 1
        # Rows written after the checkpoint (a crash between the two) belong to a round that
        # will run again: drop them so metrics.jsonl has one row per round.
        if self.metrics_path.is_file():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("round", 0) <= ckpt.round]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.history = kept
        log.info("resumed from the checkpoint of round %d", ckpt.round)

    # ------------------------------------------------------------------ calls from clients

    def register(self, name: str, capabilities: Capabilities, num_examples: int, secret: str = "") -> ClientRecord:
        expected = self.config.server.enrollment_secret
        if expected and not _equal(secret, expected):
            raise CoordinatorError("UNAUTHENTICATED", "wrong or missing enrollment secret")
        record = self.registry.register(name, capabilities, num_examples)
        log.info("registered %s (tier=%s, examples=%d)", record.client_id, capabilities.tier or "-", num_examples)
        with self._cond:
            self._cond.notify_all()
        return record

    def authenticate(self, client_id: str, token: str) -> ClientRecord:
        return self.registry.authenticate(client_id, token)

    def next_task(self, client_id: str, wait_s: float) -> TrainTask | Wait | Done:
        """Work for ``client_id``: blocks up to ``wait_s`` seconds for a round that selects it."""
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._cond:
            while True:
                if self._done:
                    self._told_done.add(client_id)
                    self._cond.notify_all()
                    return Done()
                rnd = self._round
                if rnd is not None and rnd.open and client_id in rnd.selected and client_id not in rnd.updates:
                    rnd.fetched.add(client_id)
                    seed = _client_seed(self.config.seed, rnd.number, client_id)
                    plan = rnd.plans[client_id]
                    return TrainTask(rnd.number, plan, seed, rnd.deadline_unix, rnd.payloads[plan.key()])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.registry.touch(client_id)
                    return Wait(retry_after_s=0.5)
                self._cond.wait(remaining)

    def expected_update(self, client_id: str, round_number: int) -> dict[str, TensorSpec]:
        """The tensors ``client_id`` must send for ``round_number``, or why it may not send."""
        with self._cond:
            rnd = self._round
            if rnd is None or rnd.number != round_number or not rnd.open:
                current = f"round {rnd.number} is {'open' if rnd.open else 'closed'}" if rnd else "no round is open"
                raise CoordinatorError("FAILED_PRECONDITION", f"round {round_number} is not open ({current})")
            if client_id not in rnd.selected:
                raise CoordinatorError("FAILED_PRECONDITION", f"client {client_id!r} was not selected for round {round_number}")
            if client_id in rnd.updates:
                raise CoordinatorError("FAILED_PRECONDITION", f"client {client_id!r} already sent its update for round {round_number}")
            return rnd.specs[rnd.plans[client_id].key()]

    def submit(self, client_id: str, round_number: int, tensors: dict[str, torch.Tensor], num_examples: int, metrics: Mapping[str, float], bytes_up: int) -> None:
        self.expected_update(client_id, round_number)  # the round may have closed while receiving
        if num_examples < 1:
            raise CoordinatorError("INVALID_ARGUMENT", f"num_examples must be at least 1, got {num_examples}")
        if len(metrics) > 32 or any(len(k) > 64 for k in metrics):
            raise CoordinatorError("INVALID_ARGUMENT", "at most 32 metrics with names of at most 64 characters")
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise CoordinatorError("INVALID_ARGUMENT", f"metrics {bad} are not finite numbers")
        if "rank_cap" in metrics:
            cap = metrics["rank_cap"]
            if cap < 1 or cap != int(cap):
                raise CoordinatorError("INVALID_ARGUMENT", f"rank_cap must be a positive integer, got {cap}")
        with self._cond:
            rnd = self._round
            assert rnd is not None
            rnd.updates[client_id] = ClientUpdate(client_id, tensors, num_examples, dict(metrics))
            if "rank_cap" in metrics:
                self._rank_caps[client_id] = int(metrics["rank_cap"])
            rnd.bytes_up += bytes_up
            self._cond.notify_all()
        log.info("round %d: update from %s (%d examples)", round_number, client_id, num_examples)

    def note_rejected(self, round_number: int, bytes_up: int) -> None:
        with self._cond:
            if self._round is not None and self._round.number == round_number:
                self._round.rejected += 1
                self._round.bytes_up += bytes_up

    def note_sent(self, round_number: int, nbytes: int) -> None:
        with self._cond:
            if self._round is not None and self._round.number == round_number:
                self._round.bytes_down += nbytes

    def heartbeat(self, client_id: str) -> tuple[int, bool]:
        self.registry.touch(client_id)
        with self._cond:
            return (self._round.number if self._round else 0), self._done

    # ------------------------------------------------------------------ the driver

    @property
    def done(self) -> bool:
        return self._done

    def stop(self) -> None:
        """Ask ``run`` to end after the current step (used on Ctrl-C and in tests)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def run(self) -> list[dict]:
        """Run the remaining rounds; returns the metrics rows of the whole run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for number in range(self.start_round, self.fed.rounds + 1):
                if not self._wait_for_clients():
                    break
                self._open_round(number)
                self._wait_for_close()
                if self._stopping:
                    break
                self._close_round()
        finally:
            with self._cond:
                self._done = True
                self._round = None
                self._cond.notify_all()
        if not self._stopping:
            adapter, delta = self.global_adapter(self.fed.rounds + 1)
            self.global_model.export(adapter, self.run_dir / "adapter", delta)
            log.info("final adapter written to %s", self.run_dir / "adapter")
        return self.history

    def wait_until_clients_told(self, timeout_s: float) -> bool:
        """After the run: give alive clients up to ``timeout_s`` to learn training is over."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                alive = {r.client_id for r in self.registry.alive(self.fed.client_timeout_s)}
                if alive <= self._told_done:
                    return True
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 1.0))

    def _wait_for_clients(self) -> bool:
        last_log = 0.0
        with self._cond:
            while not self._stopping:
                alive = self.registry.alive(self.fed.client_timeout_s)
                if len(alive) >= self.fed.min_clients:
                    return True
                if time.monotonic() - last_log > 30:
                    log.info("waiting for clients: %d of %d needed are connected", len(alive), self.fed.min_clients)
                    last_log = time.monotonic()
                self._cond.wait(1.0)
        return False

    def _select(self, number: int) -> list[str]:
        alive = [r.client_id for r in self.registry.alive(self.fed.client_timeout_s)]
        k = self.fed.clients_per_round or len(alive)
        if k >= len(alive):
            return alive
        rng = np.random.default_rng([self.config.seed, number])
        return sorted(alive[i] for i in rng.choice(len(alive), size=k, replace=False))

    def global_adapter(self, round_number: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The global adapter at the global plan's shape, and the base deltas (FLoRA)."""
        shapes = {name: spec.shape for name, spec in self.global_spec.items()}
        return self.strategy.client_state(self.global_state, shapes, round_number), self.strategy.base_delta(self.global_state)

    def _plans(self, selected: list[str]) -> tuple[dict[str, AdapterPlan], dict]:
        """Each selected client's plan, and the coverage of the global adapter they give."""
        records = {r.client_id: r for r in self.registry.all()}
        if self.planner is None:
            return {cid: self.plan for cid in selected}, {}
        plans = {}
        for cid in selected:
            caps = records[cid].capabilities
            if caps.memory_bytes == 0 and caps.flops_per_second == 0:
                plans[cid] = _capped(self.plan, self._rank_caps.get(cid))  # nothing to plan around
                continue
            assignment = self.planner.assign(caps)
            plans[cid] = _capped(assignment.plan, self._rank_caps.get(cid))
            if not assignment.fits:
                log.warning("%s (%s) cannot afford even the smallest plan within budget; giving it the smallest", cid, caps.tier or "no capabilities reported")
        num_blocks = self.planner.geometry.num_blocks
        cov = coverage(plans, self.plan, num_blocks)
        if cov["min_coverage"] == 0 and self.config.planner.coverage == "adjust" and plans:
            # Give the round's most capable client every parameter nobody else trains: the
            # global plan's rank on each layer that falls short.
            strongest = max(selected, key=lambda c: (records[c].capabilities.memory_bytes, records[c].capabilities.flops_per_second, c))
            plan = plans[strongest]
            own = {l: plan.rank_per_layer.get(l, plan.rank) for l in plan.layers or range(num_blocks)}
            ranks = {**own, **{l: max(own.get(l, 0), r) for l, r in cov["short_layers"].items()}}
            top = max(ranks.values())
            plans[strongest] = AdapterPlan(**{**plan.__dict__, "rank": top, "alpha": plan.scale * top, "layers": tuple(sorted(ranks)), "rank_per_layer": ranks})
            log.warning("coverage: parts of layers %s had no client; extended %s's plan to cover them", sorted(cov["short_layers"]), strongest)
            cov = coverage(plans, self.plan, num_blocks)
        elif cov["uncovered_layers"]:
            log.warning("coverage: no client trains layers %s this round; they keep their global values", cov["uncovered_layers"])
        return plans, cov

    def _open_round(self, number: int) -> None:
        with self._cond:
            selected = self._select(number)
        plans, cov = self._plans(selected)
        base_delta = {name + BASE_DELTA: t for name, t in self.strategy.base_delta(self.global_state).items()}
        global_adapter = None
        if self.strategy.heterogeneous and self.fed.freeze_remainder:
            global_adapter, _ = self.global_adapter(number)
        payloads, specs = {}, {}
        for plan in plans.values():
            key = plan.key()
            if key in payloads:
                continue
            spec = self.global_model.spec(plan)
            shapes = {name: s.shape for name, s in spec.items()}
            frozen = remainder(global_adapter, shapes) if global_adapter is not None else {}
            payloads[key] = encode_tensors({**self.strategy.client_state(self.global_state, shapes, number), **base_delta, **frozen})
            # what the client sends back; with FedSA-LoRA its B stays on the device
            specs[key] = {n: s for n, s in spec.items() if not (self.fed.share_a and n.endswith(".lora_B.weight"))}
        if self.planner is not None:
            for cid, plan in plans.items():
                ranks = [plan.rank_per_layer.get(layer, plan.rank) for layer in plan.layers]
                log.info("round %d: %s gets LoRA on layers %s with ranks %s", number, cid, list(plan.layers), ranks)
        with self._cond:
            now = time.monotonic()
            self._round = _Round(
                number=number,
                selected=selected,
                deadline=now + self.fed.round_timeout_s,
                deadline_unix=time.time() + self.fed.round_timeout_s,
                started=now,
                plans=plans,
                payloads=payloads,
                specs=specs,
                coverage=cov,
            )
            self._cond.notify_all()
        log.info("round %d/%d open: %d clients selected", number, self.fed.rounds, len(selected))

    def _wait_for_close(self) -> None:
        rnd = self._round
        assert rnd is not None
        needed = max(1, math.ceil(self.fed.quorum * len(rnd.selected)))
        with self._cond:
            while not self._stopping:
                if len(rnd.updates) >= needed:
                    break
                now = time.monotonic()
                if now >= rnd.deadline:
                    log.warning("round %d: deadline passed with %d of %d updates", rnd.number, len(rnd.updates), len(rnd.selected))
                    break
                missing = [c for c in rnd.selected if c not in rnd.updates]
                if missing and not any(self.registry.is_alive(c, self.fed.client_timeout_s) for c in missing):
                    log.warning("round %d: closing early, %s went silent", rnd.number, ", ".join(missing))
                    break
                self._cond.wait(min(1.0, rnd.deadline - now))
            rnd.open = False

    def _close_round(self) -> None:
        rnd = self._round
        assert rnd is not None
        modeled = self._modeled_seconds(rnd)
        deadline = self.config.simulation.deadline_s
        late = sorted(c for c, t in modeled.items() if deadline and t > deadline and c in rnd.updates)
        if late:
            log.warning("round %d: %s would miss the %.0f s deadline on their devices; their updates are dropped", rnd.number, late, deadline)
        updates = [rnd.updates[c] for c in sorted(rnd.updates) if c not in late]
        if updates:
            self.global_state = self.strategy.aggregate(self.global_state, updates)
        else:
            log.warning("round %d: no updates arrived; the global adapter is unchanged", rnd.number)
        eval_started = time.monotonic()
        adapter, delta = self.global_adapter(rnd.number + 1)
        metrics = self.global_model.evaluate(adapter, delta)
        eval_seconds = time.monotonic() - eval_started
        weights = [u.num_examples for u in updates]
        losses = [u.metrics.get("train_loss") for u in updates]
        train_loss = (
            sum(w * l for w, l in zip(weights, losses)) / sum(weights)
            if updates and all(l is not None for l in losses)
            else None
        )
        row = {
            "round": rnd.number,
            "clients": len(updates),
            "selected": len(rnd.selected),
            "client_ids": [u.client_id for u in updates],
            "train_loss": train_loss,
            "eval_loss": metrics.get("eval_loss"),
            **{k: v for k, v in metrics.items() if k != "eval_loss"},
            "bytes_up": rnd.bytes_up,
            "bytes_down": rnd.bytes_down,
            "rejected_updates": rnd.rejected,
            "seconds": round(time.monotonic() - rnd.started, 3),
            "eval_seconds": round(eval_seconds, 3),
        }
        arrived = [modeled[c] for c in rnd.updates if c in modeled]
        if arrived:
            # The emulated round lasts as long as its slowest accepted client, or the deadline.
            row["sim_seconds"] = round(min(max(arrived), deadline) if deadline else max(arrived), 3)
            row["late_updates"] = len(late)
        if self._rank_caps:
            row["rank_caps"] = dict(sorted(self._rank_caps.items()))
        if rnd.coverage:
            row["coverage_min"] = rnd.coverage["min_coverage"]
            row["coverage_per_layer"] = {str(k): v for k, v in rnd.coverage["per_layer"].items()}
            row["uncovered_layers"] = rnd.coverage["uncovered_layers"]
            row["plans"] = {c: {"layers": list(p.layers), "ranks": [p.rank_per_layer.get(l, p.rank) for l in p.layers]} for c, p in rnd.plans.items()}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(
            self.run_dir,
            rnd.number,
            self.global_state,
            self.strategy.state_dict(),
            {"seed": self.config.seed, "plan": self.plan.to_json(), "strategy": self.fed.strategy, "rank_caps": self._rank_caps},
        )
        self.history.append(row)
        log.info("round %d closed: %s", rnd.number, {k: row[k] for k in ("clients", "train_loss", "eval_loss", "seconds")})
        if self.on_round_end is not None:
            self.on_round_end(row)


    def _modeled_seconds(self, rnd: _Round) -> dict[str, float]:
        """Each selected client's round time on its own device under the cost model (only for
        clients that reported their compute speed, and when the model geometry is known)."""
        if self.geometry is None:
            return {}
        records = {r.client_id: r for r in self.registry.all()}
        out = {}
        for cid, plan in rnd.plans.items():
            caps = records[cid].capabilities if cid in records else None
            if caps is not None and caps.flops_per_second > 0:
                out[cid] = self.cost.round_seconds(self.geometry, plan, caps)
        return out


def _capped(plan: AdapterPlan, cap: int | None) -> AdapterPlan:
    """``plan`` with every rank at most ``cap`` (a client that pruned its rank)."""
    if cap is None or max([plan.rank, *plan.rank_per_layer.values()]) <= cap:
        return plan
    rank = min(plan.rank, cap)
    return AdapterPlan(**{
        **plan.__dict__,
        "rank": rank,
        "alpha": plan.scale * rank,
        "rank_per_layer": {layer: min(r, cap) for layer, r in plan.rank_per_layer.items()},
    })


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _client_seed(seed: int, round_number: int, client_id: str) -> int:
    """A per-(run, round, client) seed for data order and dropout, the same on every device."""
    return int(np.random.SeedSequence([seed, round_number, zlib.crc32(client_id.encode())]).generate_state(1)[0])
