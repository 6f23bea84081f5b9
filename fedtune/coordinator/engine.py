"""The round engine: it keeps time. Who trains in which round, when a round closes, and the
bookkeeping around it; what clients get and how updates are folded is the strategy's business
(``fedtune.aggregation.base``), and the wire is the service's.

One round:
1. wait until ``min_clients`` clients are alive (registered and recently heard from);
2. select the round's clients with a generator seeded from (seed, round), and plan each one's
   adapter (the planner, or the configured plan for all);
3. ask the strategy for each client's instruction, and hand it out when the client asks;
4. accept updates until a quorum of the selected clients has answered, every client still
   missing has gone silent, or the deadline passes;
5. aggregate, evaluate on held-out data, append a row to metrics.jsonl, checkpoint.

The engine keeps time and state (round lifecycle, selection, checkpoints). The features that take
part in every round plug in as hooks (``fedtune.coordinator.hooks``) called at fixed points: the
trust rules (``trust_checks``: weights, norms, outliers, the aggregate's sanity), the DP ledger
(``dp_ledger``: what devices report spending, the budget check on resume) and the device times
of a simulation (``device_times``: modeled round times, the deadline). Their tensor math runs
outside the engine's lock.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import numpy as np
import torch

from fedtune.aggregation import (
    ClientInfo,
    ClientUpdate,
    Instruction,
    RoundContext,
    Strategy,
)
from fedtune.compose import check_chain
from fedtune.config import RunConfig
from fedtune.contract.cost import CostModel, ModelGeometry
from fedtune.contract.specs import TensorSpec, specs_of
from fedtune.coordinator.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedtune.coordinator.clients import ClientRecord, ClientRegistry
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.device_times import DeviceTimes
from fedtune.coordinator.dp_ledger import DPLedger
from fedtune.coordinator.global_model import GlobalModel
from fedtune.coordinator.hooks import RoundHook
from fedtune.coordinator.metrics import MetricsLog, personalized, plan_fields, round_row, row_json
from fedtune.coordinator.planner import Planner, plan_round
from fedtune.coordinator.trust_checks import TrustChecks
from fedtune.devices import Capabilities
from fedtune.privacy.randomness import poisson_select

log = logging.getLogger(__name__)

# The key of a checkpoint's metadata that holds its round's metrics row.
ROW_KEY = "metrics_row"

# How many times one round's task is handed to one client that sends no update (a device that
# lost its work gets it again; see RoundEngine.next_task).
MAX_DELIVERIES = 3
T = TypeVar("T")


@dataclass(frozen=True)
class TrainTask:
    round: int
    instruction: Instruction
    seed: int
    deadline_unix: float
    aggregated_round: int = 0  # the last round whose aggregate took this client's update (0: none)


@dataclass(frozen=True)
class Wait:
    retry_after_s: float


@dataclass(frozen=True)
class Done:
    pass


@dataclass
class _Round:
    ctx: RoundContext
    instructions: dict[str, Instruction]
    deadline: float                     # monotonic
    deadline_unix: float
    started: float
    coverage: dict
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    # Wire bytes of each client's accepted update and of each task sent, by client id.
    up_by_client: dict[str, int] = field(default_factory=dict)
    down_by_client: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    declined: dict[str, str] = field(default_factory=dict)  # client id -> why its device declined
    # Selected clients the round no longer waits for, with why: they asked for work again after
    # their task was handed out MAX_DELIVERIES times with no update (see next_task). A later
    # valid update from them is still accepted; the round just does not hold its close for them.
    given_up: dict[str, str] = field(default_factory=dict)
    # Selected clients whose update (or split session) was refused for what they sent, with why.
    # The round does not hand them the task again (retraining would send the same update, and
    # spend the device's privacy): asking for work again, they are given up at once. A valid
    # update they send first is accepted, and takes them off this list.
    rejected_by: dict[str, str] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)  # client id -> times its task was handed out
    refused: str = ""    # why the round's aggregate was refused (set at close)
    open: bool = True
    evaluation: bool = False  # the evaluation-only round after the last: metrics, no tensors

    @property
    def number(self) -> int:
        return self.ctx.number


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
        check_chain(strategy, config.model.task)  # a chain built by hand gets the composer's check
        self.strategy = strategy
        self.planner = planner
        self.geometry = geometry
        self.cost = CostModel(config.training.batch_size, config.model.max_length, config.training.local_steps)
        self.run_dir = Path(run_dir)
        srv = config.server
        self.registry = ClientRegistry(srv.max_clients, rate=srv.registrations_per_second, burst=srv.registration_burst, evict_after_s=srv.evict_after_s)
        self.on_round_end = on_round_end
        # Client-level DP (Poisson selection): who took part stays out of the released metrics.
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", private_participation=strategy.poisson_sampling)
        self._cond = threading.Condition()
        self._round: _Round | None = None
        self._done = False
        self._stopping = False
        self._told_done: set[str] = set()
        self.history: list[dict] = []
        # client id -> the last round whose aggregate took its update (told with each task)
        self.aggregated: dict[str, int] = {}
        self.evaluation: dict | None = None  # the row of the evaluation-only round, if one ran
        self._suspended = False  # stopped to be resumed: clients are told to wait, not that it is over
        self.stopped_because = ""  # why the run ended before its last round (a privacy budget)
        self.start_round = 1
        self.resumed_from = None  # the checkpoint this run continued, if any
        self.split = None  # the split-learning sessions (fedtune.coordinator.split_sessions), in split mode
        # How many clients can train at the same time; 0: each on its own device. A simulation
        # trains its clients a few at a time on one machine, so a round's deadline grows with
        # its number of waves (round_timeout_s each) instead of cutting off the last ones.
        self.training_slots = 0
        # Where the heavy tensor work of a round runs (aggregation, evaluation, export): None for
        # the calling thread. A simulation passes its training threads, so that one set of
        # threads does all of a process's large torch operations (fedtune.simulation.runner).
        self.compute: Executor | None = None
        # The features that take part in every round (fedtune.coordinator.hooks), in the order
        # they screen a round's updates: device times drop the late ones, then the trust rules.
        self.trust = TrustChecks(self.fed, strategy)
        self.hooks: list[RoundHook] = [
            DeviceTimes(config.simulation.deadline_s, self.cost, lambda: self.geometry, self.split_strategy),
            DPLedger(strategy),
            self.trust,
        ]
        self.state = strategy.initial_state(global_model.initial_state())
        if resume:
            self._resume()

    # ------------------------------------------------------------------ resume

    def _run_identity(self) -> dict:
        """What a checkpoint must agree with to be continued by this run."""
        m = self.config.model
        return json.loads(json.dumps({"seed": self.config.seed, "plan": self.plan.to_json(), "strategy": self.strategy.describe(),
                "model": {"source": m.source, "task": m.task, "labels": list(m.labels)}}))  # as the JSON will read back

    def _resume(self) -> None:
        try:
            ckpt = load_checkpoint(self.run_dir)
        except CheckpointError as exc:
            raise CoordinatorError("FAILED_PRECONDITION", f"cannot resume: {exc}") from None
        published = self.metrics.last_training_round()
        if self.strategy.poisson_sampling and published > (ckpt.round if ckpt else 0):
            # The coordinator's privacy history lives in the checkpoint: a round published after
            # the newest whole one would run again with fresh noise that no history counts.
            raise CoordinatorError("FAILED_PRECONDITION", f"cannot resume {self.run_dir}: round {published}'s row is published but the newest "
                                   f"whole checkpoint is of round {ckpt.round if ckpt else 0}; under client-level DP running those rounds again "
                                   "would release fresh noise that no privacy history counts (restore the checkpoint, or start a new run)")
        if ckpt is None:
            log.info("no checkpoint in %s: starting from round 1", self.run_dir)
            return
        for key, now in self._run_identity().items():
            saved = ckpt.meta.get(key)
            if saved is not None and saved != now:
                raise CoordinatorError("FAILED_PRECONDITION", f"cannot resume round {ckpt.round} of {self.run_dir}: {_difference(key, saved, now)}")
        # Adapter and model tensors (frozen factors included) must match in shape; bookkeeping may
        # have grown (a privacy history has a row per round), so only its name and dtype are checked.
        expected, found = specs_of(self.state), specs_of(ckpt.state)
        model = set(self.global_spec) | set(self.strategy.server_params(self.state))
        if any(name not in found or found[name].dtype != spec.dtype or (name in model and found[name] != spec) for name, spec in expected.items()):
            raise CoordinatorError(
                "FAILED_PRECONDITION",
                f"checkpoint in {self.run_dir} does not fit the configured run (different model, LoRA plan or strategy)",
            )
        self.state = ckpt.state
        self.start_round = ckpt.round + 1
        self.history = self.metrics.keep_until(ckpt.round)
        saved_row = ckpt.meta.get(ROW_KEY)
        if isinstance(saved_row, dict) and saved_row.get("round") == ckpt.round and not any(r.get("round") == ckpt.round for r in self.history):
            log.warning("round %d's row was not in metrics.jsonl (the coordinator stopped between its checkpoint and the row): "
                        "written from the checkpoint", ckpt.round)
            self.metrics.append(saved_row)
            self.history.append(saved_row)
        for row in self.history:  # under client-level DP the rows name nobody: devices then start afresh
            if not row.get("round_refused"):
                self.aggregated.update(dict.fromkeys(row.get("client_ids") or (), row["round"]))
        self.resumed_from = ckpt
        if self.start_round <= self.fed.rounds:
            for hook in self.hooks:
                reason = hook.resumed(self.history, self.state)
                if reason:
                    raise CoordinatorError("FAILED_PRECONDITION", f"cannot resume round {self.start_round} of {self.run_dir}: {reason}")
        log.info("resumed from the checkpoint of round %d", ckpt.round)

    # ------------------------------------------------------------------ calls from clients

    def register(self, name: str, capabilities: Capabilities, num_examples: int, secret: str = "", *, peer: str | None = None,
                 certificate: str = "", common_name: str = "") -> ClientRecord:
        """Enroll a client. ``peer`` (the caller's address without its port), ``certificate``
        (its TLS client certificate's fingerprint) and ``common_name`` (that certificate's CN)
        come from the gRPC service; in-process callers (the Flower bridge) leave ``peer`` None
        and enroll without a credential. See ServerSection's identity keys."""
        import secrets

        from fedtune.coordinator.clients import is_local_peer, load_enrollment_secrets

        srv = self.config.server
        name = name or "client"
        credential: str | None = None
        if srv.enrollment_secrets_file:  # per-device secrets: the secret of the very name
            try:
                table = load_enrollment_secrets(srv.enrollment_secrets_file)
            except (OSError, ValueError) as exc:
                log.error("server.enrollment_secrets_file: %s", exc)
                raise CoordinatorError("UNAVAILABLE", "the coordinator cannot read its enrollment secrets; try again later") from None
            expected = table.get(name)
            good = hmac.compare_digest(secret.encode(), (expected if expected is not None else secrets.token_urlsafe(24)).encode())
            if expected is None or not good:
                raise CoordinatorError("UNAUTHENTICATED", "wrong or missing enrollment secret for this client name")
            credential = f"secret:{name}"
        else:
            expected = srv.enrollment_secret
            if expected and not hmac.compare_digest(secret.encode(), expected.encode()):
                raise CoordinatorError("UNAUTHENTICATED", "wrong or missing enrollment secret")
        if peer is not None:
            if srv.bind_names == "cert":
                if not common_name or not (name == common_name or name.startswith(common_name + "-")):
                    raise CoordinatorError("PERMISSION_DENIED", f"client name {name[:80]!r} is not bound to this certificate: register as "
                                           f"{common_name[:64]!r} or {common_name[:64] + '-<suffix>'!r} (server.bind_names = \"cert\")")
            if certificate:
                credential = f"cert:{certificate}"  # the strongest identity wins
            elif credential is None and not is_local_peer(peer):
                credential = f"address:{peer}"
        record = self.registry.register(name, capabilities, num_examples, credential=credential, limit=srv.max_clients_per_credential,
                                        live_s=self.fed.client_timeout_s)
        log.info("registered %s (tier=%s, examples=%d)", record.client_id, capabilities.tier or "-", num_examples, extra={"client_id": record.client_id})
        with self._cond:
            self._cond.notify_all()
        return record

    def authenticate(self, client_id: str, token: str) -> ClientRecord:
        return self.registry.authenticate(client_id, token)

    def next_task(self, client_id: str, wait_s: float) -> TrainTask | Wait | Done:
        """Work for ``client_id``: blocks up to ``wait_s`` seconds for a round that selects it.

        A device asks for work only when it has none, so a selected client asking again for a
        round it got but sent nothing for has lost that work (a restart, a broken stream): it
        gets the task again, up to MAX_DELIVERIES times. Asking once more after that, it is given
        up for the round: otherwise a device that keeps asking and never delivers keeps itself
        alive and holds the round until its deadline."""
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._cond:
            while True:
                if self._done and self._suspended:
                    return Wait(retry_after_s=5.0)
                if self._done:
                    self._told_done.add(client_id)
                    self._cond.notify_all()
                    return Done()
                rnd = self._round
                if rnd is not None and rnd.open and client_id in rnd.instructions and client_id not in rnd.updates:
                    given = rnd.delivered.get(client_id, 0)
                    if client_id in rnd.rejected_by:  # it asks again after a refusal: it has nothing more to send
                        given = MAX_DELIVERIES
                    # Counted when handed out, not when the stream has reached the device: a
                    # client that cancels every fetch must not keep its round waiting.
                    if given < MAX_DELIVERIES:
                        rnd.delivered[client_id] = given + 1
                        return self._task(rnd, client_id)
                    if client_id not in rnd.given_up:
                        rnd.given_up[client_id] = (f"asked for work again after its update was refused: {rnd.rejected_by[client_id]}"
                                                   if client_id in rnd.rejected_by else
                                                   f"asked for work again after {given} deliveries of its task, with no update")
                        log.warning("round %d: %s given up: %s", rnd.number, client_id, rnd.given_up[client_id], extra={"round": rnd.number, "client_id": client_id})
                        self._cond.notify_all()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.registry.touch(client_id)
                    return Wait(retry_after_s=0.5)
                self._cond.wait(remaining)

    def _open_round_for(self, client_id: str, round_number: int) -> _Round:
        """The open round ``client_id`` may send an update for; call with the lock held."""
        rnd = self._round
        if rnd is None or rnd.number != round_number or not rnd.open:
            current = f"round {rnd.number} is {'open' if rnd.open else 'closed'}" if rnd else "no round is open"
            raise CoordinatorError("FAILED_PRECONDITION", f"round {round_number} is not open ({current})")
        if client_id not in rnd.instructions:
            raise CoordinatorError("FAILED_PRECONDITION", f"client {client_id!r} was not selected for round {round_number}")
        if client_id in rnd.updates:
            raise CoordinatorError("FAILED_PRECONDITION", f"client {client_id!r} already sent its update for round {round_number}")
        return rnd

    def instruction_for(self, client_id: str, round_number: int) -> Instruction:
        """The instruction of ``client_id`` in the open round ``round_number``, or why not."""
        with self._cond:
            return self._open_round_for(client_id, round_number).instructions[client_id]

    def expected_update(self, client_id: str, round_number: int) -> Mapping[str, TensorSpec]:
        """The tensors ``client_id`` must send for ``round_number``, or why it may not send."""
        with self._cond:
            return self._open_round_for(client_id, round_number).instructions[client_id].expect

    def submit(self, client_id: str, round_number: int, tensors: dict[str, torch.Tensor], num_examples: int, metrics: Mapping[str, float], bytes_up: int) -> None:
        """Accept an update. The round is checked and the update stored in one critical section:
        of two concurrent pushes by one client exactly one is accepted, and an update accepted
        here is in the round's snapshot at close (the close takes it under the same lock; there
        the round's rules may still leave it out of the aggregate, see ``_screen``). The update
        is checked and measured between two short critical sections, so heartbeats never wait
        on tensor math."""
        if num_examples < 1:
            raise CoordinatorError("INVALID_ARGUMENT", f"num_examples must be at least 1, got {num_examples}")
        if len(metrics) > 32 or any(len(k) > 64 for k in metrics):
            raise CoordinatorError("INVALID_ARGUMENT", "at most 32 metrics with names of at most 64 characters")
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise CoordinatorError("INVALID_ARGUMENT", f"metrics {bad} are not finite numbers")
        with self._cond:
            rnd = self._open_round_for(client_id, round_number)
            start = rnd.instructions[client_id].tensors
            registered = rnd.ctx.clients[client_id].num_examples
        update = ClientUpdate(client_id, tensors, num_examples, dict(metrics), start)
        for hook in self.hooks:
            hook.arrived(rnd, update)
        if not rnd.evaluation:  # an evaluation sends metrics only (checked against an empty expect)
            try:
                self.strategy.check_update(rnd.ctx, update)
            except ValueError as exc:
                raise CoordinatorError("INVALID_ARGUMENT", str(exc)) from None
        for hook in self.hooks:  # outside the lock: the trust rules measure the change here
            update = hook.admit(rnd, update, registered)
        with self._cond:
            if self._open_round_for(client_id, round_number) is not rnd:
                raise CoordinatorError("FAILED_PRECONDITION", f"round {round_number} is not the round this update was checked for")
            rnd.updates[client_id] = update
            rnd.rejected_by.pop(client_id, None)
            for hook in self.hooks:
                hook.accepted(rnd, update, num_examples)
            rnd.bytes_up += bytes_up
            rnd.up_by_client[client_id] = bytes_up
            self._cond.notify_all()
        log.info("round %d: update from %s (%d examples)", round_number, client_id, num_examples, extra={"round": round_number, "client_id": client_id})

    def note_declined(self, client_id: str, round_number: int, reason: str) -> None:
        """A selected device declined its task (its own privacy terms): recorded in the round's
        row, and the round stops waiting for it."""
        reason = " ".join(reason.split())[:300]  # one line, bounded, whatever the device sent
        with self._cond:
            rnd = self._open_round_for(client_id, round_number)
            rnd.declined[client_id] = reason
            self.registry.retire(client_id)  # the device stops training for this federation
            self._cond.notify_all()
        log.warning("round %d: %s declined its task: %s", round_number, client_id, reason, extra={"round": round_number, "client_id": client_id})

    def note_rejected(self, round_number: int, bytes_up: int, client_id: str = "", reason: str = "") -> None:
        """An update refused for round ``round_number``. With ``client_id`` the refusal is a
        verdict on what the client sent (not a busy coordinator, not a caller that went away):
        the round records why, and the client's next request for work gives it up for the
        round instead of handing it the same task again (see ``next_task``)."""
        reason = " ".join(reason.split())[:300]
        with self._cond:
            rnd = self._round
            if rnd is not None and rnd.number == round_number:
                rnd.rejected += 1
                rnd.bytes_up += bytes_up
                if client_id in rnd.instructions and client_id not in rnd.updates and rnd.open:
                    rnd.rejected_by[client_id] = reason or "refused"

    def note_sent(self, round_number: int, nbytes: int, client_id: str = "") -> None:
        with self._cond:
            if self._round is not None and self._round.number == round_number:
                self._round.bytes_down += nbytes
                if client_id:
                    by_client = self._round.down_by_client
                    by_client[client_id] = by_client.get(client_id, 0) + nbytes

    def heartbeat(self, client_id: str, round_number: int = 0) -> tuple[int, bool, bool]:
        """(the current round, whether training is over, whether ``round_number`` is open and
        still waits for this client's update)."""
        self.registry.touch(client_id)
        with self._cond:
            rnd = self._round
            waiting = (rnd is not None and rnd.open and rnd.number == round_number
                       and client_id in rnd.instructions and client_id not in rnd.updates)
            return (rnd.number if rnd else 0), self._done, waiting

    def awaits(self, client_id: str) -> bool:
        """Whether the open round still waits for ``client_id``: selected, and it has neither sent
        an update, declined, nor been given up."""
        with self._cond:
            rnd = self._round
            return (rnd is not None and rnd.open and client_id in rnd.instructions and client_id not in rnd.updates
                    and client_id not in rnd.declined and client_id not in rnd.given_up)

    def wait_for_round(self, after: int, timeout_s: float) -> tuple[int, list[str]] | None:
        """For a fleet in this process (the simulation): wait up to ``timeout_s`` for an open
        round numbered above ``after``; returns (its number, the clients it selected), or
        (``after``, []) when none opened in time, or None once the run is over. In a real
        deployment each device's long-poll learns the same thing; a simulated fleet asks here
        so that its idle devices need no open call and no thread."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._done:
                    return None
                rnd = self._round
                if rnd is not None and rnd.open and rnd.number > after:
                    return rnd.number, sorted(rnd.instructions)
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return after, []
                self._cond.wait(remaining)

    # ------------------------------------------------------------------ the driver

    @property
    def done(self) -> bool:
        return self._done

    def stop(self, final: bool = True) -> None:
        """Ask ``run`` to end after the current step. ``final``: clients asking for work are told
        training is over; otherwise (an operator interrupting a run to resume it later) they are
        told to wait, and find the resumed coordinator by retrying."""
        with self._cond:
            self._stopping = True
            self._suspended = not final
            self._cond.notify_all()

    def run(self) -> list[dict]:
        """Run the remaining rounds; returns the metrics rows of the whole run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for number in range(self.start_round, self.fed.rounds + 1):
                if not self._wait_for_clients():
                    break
                if not self.open_round(number):
                    break
                self._wait_for_close()
                if self._stopping:
                    break
                self.close_round()
            else:
                self.evaluation_round(self.fed.rounds + 1)
        except BaseException:
            # The engine failed: training is not over. Clients are told to wait, so that they
            # are still there when the run is resumed from its last checkpoint (telling them
            # it was over made them exit, and a resumed coordinator then waited for clients
            # that never came back).
            with self._cond:
                self._suspended = True
            log.exception("the round engine failed; clients are told to wait for a resumed run")
            raise
        finally:
            with self._cond:
                self._done = True
                self._round = None
                self._cond.notify_all()
        if not self._stopping:
            self.export()
        return self.history

    def global_model_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The global model now: an adapter at the global plan's shape and base-weight deltas."""
        return self.strategy.global_model(self.state, self.global_spec)

    def _heavy(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the compute threads, if the engine has them."""
        return fn(*args) if self.compute is None else self.compute.submit(fn, *args).result()

    def export(self) -> Path:
        return self._heavy(self._export)

    def _export(self) -> Path:
        adapter, deltas = self.global_model_tensors()
        folder = self.global_model.export(adapter, self.run_dir / "adapter", deltas, rank=self.config.export.rank, merged_folder=self.run_dir / "merged" if self.config.export.merged else None)
        log.info("final adapter written to %s", folder)
        return folder

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

    def _select(self, number: int) -> tuple[list[str], float, int]:
        """(selected clients, the rate each was selected with, how many could have been).
        Normally ``clients_per_round`` clients drawn without replacement; with Poisson sampling
        (client-level DP) each alive client independently with rate clients_per_round / alive,
        so the number selected varies, as the privacy accountant assumes."""
        # Sorted: the draw depends on who is alive, not on the order they happened to register in.
        alive = sorted(r.client_id for r in self.registry.alive(self.fed.client_timeout_s))
        k = self.fed.clients_per_round or len(alive)
        if self.strategy.poisson_sampling:  # a DP mechanism's sampling: secret unless research mode
            q = min(1.0, k / max(len(alive), 1))
            return poisson_select(alive, q, self.config.privacy.repeatable, self.config.seed, number), q, len(alive)
        rng = np.random.default_rng([self.config.seed, number])
        if k >= len(alive):
            return alive, 1.0, len(alive)
        return sorted(alive[i] for i in rng.choice(len(alive), size=k, replace=False)), k / len(alive), len(alive)

    def _context(self, number: int, selected: list[str], rate: float, population: int) -> tuple[RoundContext, dict]:
        records = {r.client_id: r for r in self.registry.all()}
        caps = {cid: records[cid].capabilities for cid in selected}
        plans, cov = plan_round(self.planner, self.plan, caps, self.config.planner.coverage == "adjust")
        clients = {
            cid: ClientInfo(cid, plans[cid], self.global_model.spec(plans[cid]), caps[cid], records[cid].num_examples)
            for cid in selected
        }
        ctx = RoundContext(
            number=number,
            clients=clients,
            seed=self.config.seed,
            sampling_rate=rate,
            population=population,
            global_plan=self.plan,
            global_spec=self.global_spec,
            spec_of=self.global_model.spec,
        )
        return ctx, cov

    def open_round(self, number: int) -> bool:
        """Select, plan and open round ``number``; False when the strategy refuses to run it
        (a privacy budget it would exceed), which ends the run."""
        with self._cond:
            selected, rate, population = self._select(number)
        reason = self.strategy.stop_reason(self.state, rate) or self._delta_refusal(population)
        if reason:
            log.warning("round %d not run: %s", number, reason, extra={"round": number})
            self.stopped_because = reason
            self._evaluate_last_round()
            return False
        ctx, cov = self._context(number, selected, rate, population)
        instructions = self.strategy.configure(ctx, self.state)
        if set(instructions) != set(selected):
            raise RuntimeError(f"strategy {self.strategy.name} configured {sorted(instructions)}, the round selected {selected}")
        if self.planner is not None:
            for cid, ins in instructions.items():
                ranks = [ins.plan.rank_per_layer.get(layer, ins.plan.rank) for layer in ins.plan.layers]
                log.info("round %d: %s gets LoRA on layers %s with ranks %s", number, cid, list(ins.plan.layers), ranks)
        timeout = self.fed.round_timeout_s
        if self.training_slots > 0:
            timeout *= max(1, math.ceil(len(selected) / self.training_slots))
        with self._cond:
            now = time.monotonic()
            self._round = _Round(ctx, instructions, now + timeout, time.time() + timeout, now, cov)
            self._cond.notify_all()
        log.info("round %d/%d open: %d clients selected", number, self.fed.rounds, len(selected), extra={"round": number})
        return True

    def _delta_refusal(self, population: int) -> str:
        """Why client-level DP must not run a round over ``population`` clients: a delta of 1/N
        or more allows releasing one client's data outright."""
        p = self.config.privacy
        if p.dp not in ("client", "both") or not population or p.delta < 1.0 / population:
            return ""
        text = f"client-level delta {p.delta:g} is not below 1/N = {1.0 / population:.3g} for N = {population} clients"
        if p.allow_large_delta:
            log.warning("%s; proceeding because privacy.allow_large_delta is set", text)
            return ""
        return f"{text} (lower privacy.delta, or set privacy.allow_large_delta to proceed)"

    def evaluation_round(self, number: int) -> dict | None:
        """The round after the last, when the strategy asks for one (FedSA-LoRA: each client
        evaluates the global A with its own B): clients are selected as for training, evaluate
        the final models on their held-out data and send back metrics only. Nothing is
        aggregated or checkpointed; the row (``evaluation_only``) goes to metrics.jsonl and to
        ``self.evaluation``, not to ``history``, which holds the training rounds."""
        with self._cond:  # whoever is alive now: an evaluation does not wait for min_clients
            selected, rate, population = self._select(number)
        if not selected:
            return None
        ctx, cov = self._context(number, selected, rate, population)
        instructions = self.strategy.configure_evaluation(ctx, self.state)
        if not instructions:
            return None
        if not set(instructions) <= set(selected) or any(ins.expect for ins in instructions.values()):
            raise RuntimeError(f"strategy {self.strategy.name}: an evaluation goes to selected clients and expects no tensors")
        with self._cond:
            now = time.monotonic()
            timeout = self.fed.round_timeout_s
            self._round = _Round(ctx, instructions, now + timeout, time.time() + timeout, now, cov, evaluation=True)
            self._cond.notify_all()
        log.info("round %d: evaluation only, %d clients evaluate the final models", number, len(instructions), extra={"round": number})
        self._wait_for_close()
        rnd = self._round
        with self._cond:
            rnd.open = False
            arrived = [rnd.updates[c] for c in sorted(rnd.updates)]
            row = {
                "round": number, "evaluation_only": True, "clients": len(arrived), "selected": len(instructions),
                "client_ids": [u.client_id for u in arrived],
                "bytes_up": rnd.bytes_up, "bytes_down": rnd.bytes_down,
                "seconds": round(time.monotonic() - rnd.started, 3),
            }
        row.update(personalized(number, arrived))
        self.metrics.append(row)
        self.evaluation = row
        log.info("round %d (evaluation only) closed: %s", number, {k: v for k, v in row.items() if k.startswith("personal_eval_") and not k.endswith("_std")}, extra={"round": number})
        return row

    def _wait_for_close(self) -> None:
        rnd = self._round
        if rnd is None:
            raise RuntimeError("no round is open to wait for")
        selected = list(rnd.instructions)
        needed = max(1, math.ceil(self.fed.quorum * len(selected)))
        with self._cond:
            while not self._stopping and selected:
                if len(rnd.updates) >= needed:
                    break
                now = time.monotonic()
                if now >= rnd.deadline:
                    log.warning("round %d: deadline passed with %d of %d updates", rnd.number, len(rnd.updates), len(selected), extra={"round": rnd.number})
                    break
                missing = [c for c in selected if c not in rnd.updates and c not in rnd.declined and c not in rnd.given_up]
                if not missing:
                    break  # every selected client answered, declined or was given up
                if missing and not any(self.registry.is_alive(c, self.fed.client_timeout_s) for c in missing):
                    log.warning("round %d: closing early, %s went silent", rnd.number, ", ".join(missing), extra={"round": rnd.number})
                    break
                self._cond.wait(min(1.0, rnd.deadline - now))
            rnd.open = False

    def open_tasks(self) -> dict[str, TrainTask]:
        """The open round's task for each selected client that has not sent its update yet (for
        drivers that hand tasks out themselves, such as the Flower strategy)."""
        with self._cond:
            rnd = self._round
            if rnd is None or not rnd.open:
                return {}
            return {cid: self._task(rnd, cid) for cid in rnd.instructions if cid not in rnd.updates and cid not in rnd.rejected_by}

    def _task(self, rnd: _Round, client_id: str) -> TrainTask:
        return TrainTask(rnd.number, rnd.instructions[client_id], _client_seed(self.config.seed, rnd.number, client_id), rnd.deadline_unix,
                         self.aggregated.get(client_id, 0))

    def close_round(self) -> dict:
        """Close the open round (no update is accepted after this), aggregate what arrived,
        evaluate, log and checkpoint; returns the round's metrics row. ``run`` calls it when a
        round's quorum, silence or deadline says so; an outside driver calls it directly."""
        rnd = self._round
        if rnd is None:
            raise RuntimeError("close_round: no round was opened")
        with self._cond:  # the round is closed: this snapshot is every accepted update
            rnd.open = False
            arrived = dict(rnd.updates)
            traffic = {
                "bytes_up": rnd.bytes_up, "bytes_down": rnd.bytes_down, "rejected": rnd.rejected,
                "up_by_client": dict(rnd.up_by_client), "down_by_client": dict(rnd.down_by_client),
            }
        updates = [arrived[c] for c in sorted(arrived)]
        for hook in self.hooks:  # on the compute threads: the trust rules do tensor math
            updates = self._heavy(hook.screen, rnd, updates)
        contributors = [u.client_id for u in updates]
        strategy_metrics: dict = {}
        exported = None
        if updates or self.strategy.poisson_sampling:  # a DP round releases noise even then
            new_state, strategy_metrics = self._heavy(self.strategy.aggregate, rnd.ctx, self.state, updates)
            rnd.refused, exported = self._heavy(self._verdict, rnd, new_state)
            if rnd.refused:
                log.error("round %d refused: %s; the global adapter stays as it was", rnd.number, rnd.refused, extra={"round": rnd.number})
                exported = None
                self.state = self.strategy.kept_when_refused(self.state, new_state)  # DP accounting keeps the round
            else:
                self.state = new_state
                self.aggregated.update(dict.fromkeys(contributors, rnd.number))
        elif arrived:
            log.warning("round %d: no update is left to aggregate; the global adapter is unchanged", rnd.number, extra={"round": rnd.number})
        else:
            log.warning("round %d: no updates arrived; the global adapter is unchanged", rnd.number, extra={"round": rnd.number})
        eval_started = time.monotonic()
        eval_metrics: dict = {}
        if rnd.number % self.config.eval.every == 0 or rnd.number >= self.fed.rounds:  # eval.every
            adapter, deltas = exported if exported is not None else self._heavy(self.global_model_tensors)
            eval_metrics = self._heavy(self.global_model.evaluate, adapter, deltas)
        eval_seconds = time.monotonic() - eval_started
        row = round_row(rnd.number, len(rnd.instructions), updates, strategy_metrics, eval_metrics, traffic, time.monotonic() - rnd.started, eval_seconds)
        for hook in self.hooks[:1]:  # device times come right after the common fields
            row.update(hook.row(rnd, contributors))
        row.update(plan_fields({c: ins.plan for c, ins in rnd.instructions.items()}, rnd.coverage))
        row["client_ids"] = contributors  # whose updates this round aggregated (an audit trail)
        if rnd.declined:
            row["declined"] = dict(rnd.declined)
        if rnd.rejected_by:
            row["rejected_by"] = dict(rnd.rejected_by)
        for hook in self.hooks[1:]:
            row.update(hook.row(rnd, contributors))
        if rnd.refused:
            row["round_refused"] = rnd.refused
        if self.split is not None:  # the split streams' bytes, as the coordinator counted them
            row.update(self.split.traffic.pop(rnd.number, {}))
        # The checkpoint first, carrying the row: a crash between the two leaves a round whose
        # release (its noise, under DP) is in the accountant's history, and the resume writes the
        # row from the checkpoint. The other order would let a crash publish a row whose round
        # then runs again with fresh noise, the first release never counted.
        save_checkpoint(self.run_dir, rnd.number, self.state, {**self._run_identity(), ROW_KEY: json.loads(row_json(row))})
        self.metrics.append(row)
        self.history.append(row)
        log.info("round %d closed: %s", rnd.number, {k: row[k] for k in ("clients", "train_loss", "eval_loss", "seconds")}, extra={"round": rnd.number})
        for hook in self.hooks:
            hook.closed(rnd)
        if self.on_round_end is not None:
            self.on_round_end(row)
        return row

    def _evaluate_last_round(self) -> None:
        """The run ends early (a privacy budget spent) after a round ``eval.every`` did not
        evaluate: the final model is evaluated now and that round's row completed, in
        ``history`` and in metrics.jsonl, so a run always ends on an evaluated model."""
        if not self.history or self.history[-1].get("eval_loss") is not None:
            return
        row = self.history[-1]
        started = time.monotonic()
        adapter, deltas = self._heavy(self.global_model_tensors)
        eval_metrics = self._heavy(self.global_model.evaluate, adapter, deltas)
        if not eval_metrics:
            return  # the run has no held-out data
        row.update(eval_metrics)
        row["eval_seconds"] = round(time.monotonic() - started, 3)
        save_checkpoint(self.run_dir, row["round"], self.state, {**self._run_identity(), ROW_KEY: json.loads(row_json(row))})  # first, as in close_round
        self.metrics.keep_until(row["round"] - 1)
        self.metrics.append(row)
        log.info("round %d: the run stops here, its model evaluated: eval loss %s", row["round"], row.get("eval_loss"), extra={"round": row["round"]})

    def _verdict(self, rnd: _Round, new_state: Mapping[str, torch.Tensor]) -> tuple[str, tuple[dict, dict] | None]:
        """(why ``new_state`` must not replace the state, empty when it may; the global model it
        exports, to evaluate): its global model must build, and every hook may refuse it."""
        try:
            exported = self.strategy.global_model(new_state, self.global_spec)
        except (ValueError, RuntimeError) as exc:
            return f"its global model cannot be built ({exc})", None
        for hook in self.hooks:
            reason = hook.verdict(rnd, self.state, new_state, exported)
            if reason:
                return reason, None
        return "", exported

    def split_strategy(self):
        """The link of the strategy chain that cuts the model (SplitFed), or None in federated mode."""
        return next((link for link in self.strategy.chain() if "split-model" in link.declares.provides), None)


def _difference(key: str, saved, now) -> str:
    """One line naming what changed between the checkpoint and this run's configuration."""
    if key == "seed":
        return f"it was made with seed {saved}, this run has seed {now}"
    if key == "strategy":
        return f"it was made with strategy {json.dumps(saved, sort_keys=True)}, this run has {json.dumps(now, sort_keys=True)}"
    if isinstance(saved, dict) and isinstance(now, dict):
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        return f"the {'LoRA plan' if key == 'plan' else key} changed ({detail})"
    return f"{key} changed from {saved!r} to {now!r}"


def _client_seed(seed: int, round_number: int, client_id: str) -> int:
    """A per-(run, round, client) seed for data order and dropout, the same on every device."""
    return int(np.random.SeedSequence([seed, round_number, zlib.crc32(client_id.encode())]).generate_state(1)[0])
