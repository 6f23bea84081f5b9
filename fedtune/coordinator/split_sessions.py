"""The coordinator's split-learning sessions: one ``ServerHalf`` per (client, round), built from
the client's instruction when its ``SplitStep`` stream opens, kept after the stream ends until
the client pushes its bottom half, which the server half's tensors then complete. With
``split.server_adapter = "shared"`` the sessions of a round share one model and one step lock
(fedtune.split.server says why copies are the default).

A client may start at most ``training.local_steps`` steps per round, what an honest device runs
(``ServerHalf.step_limit``), in all its sessions of the round together: the steps a session
started are kept when it ends (``_started``) and a new session of the same client and round
goes on from there, or is refused before its model is built when none are left. Without that,
a client could end a session by a bad frame and open a new one for a fresh allowance."""

from __future__ import annotations

import logging
import threading

import torch

from fedtune.adapters import apply_base_delta, inject_lora, load_adapter_state, split_task_tensors
from fedtune.coordinator.errors import CoordinatorError
from fedtune.methods.split.options import SplitOptions
from fedtune.options import OptionsError, build_options, option_names
from fedtune.split.server import ServerHalf

log = logging.getLogger(__name__)


class SplitSessions:
    def __init__(self, engine, global_model, config) -> None:
        self.engine, self.global_model, self.config = engine, global_model, config
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], ServerHalf] = {}
        self._done: dict[tuple[str, int], ServerHalf] = {}
        self._opening: set[tuple[str, int]] = set()  # claimed by an open() still building its half
        self._shared: dict[int, tuple[torch.nn.Module, threading.Lock]] = {}  # round -> model, step lock
        # Steps started by the client's sessions of the round that ended (open round only).
        self._started: dict[tuple[str, int], int] = {}
        # Wire bytes of the split streams, by round: what the coordinator received and sent.
        self.traffic: dict[int, dict[str, int]] = {}

    def open(self, client_id: str, round_number: int) -> ServerHalf:
        """A new session for ``client_id`` in ``round_number``: the client must be selected in
        the open round with a split instruction, and may open one session per round. The check
        and the claim of the (client, round) are one critical section, so of two concurrent
        opens exactly one gets the session; the server half is built after it, outside the lock
        (the claim stays in ``_opening`` meanwhile and is dropped if the build fails). A client
        that already started all the round's steps (``step_limit``) in earlier sessions is
        refused."""
        instruction = self.engine.instruction_for(client_id, round_number)
        if instruction.procedure != "split":
            raise CoordinatorError("FAILED_PRECONDITION", f"round {round_number} is not a split round for {client_id!r}")
        key = (client_id, round_number)
        limit = self.step_limit
        with self._lock:
            for old in [k for k in self._started if k[1] < round_number]:  # counts of closed rounds
                del self._started[old]
            if key in self._open or key in self._done or key in self._opening:
                raise CoordinatorError("FAILED_PRECONDITION", f"{client_id!r} already had its split session for round {round_number}")
            started = self._started.get(key, 0)
            if started >= limit:
                raise CoordinatorError("FAILED_PRECONDITION", f"{client_id!r} already started all {limit} split steps of round {round_number} "
                                                              f"(the limit per client and round: training.local_steps)")
            self._opening.add(key)
        try:
            half = self._build(instruction, round_number, started)
        except BaseException:
            with self._lock:
                self._opening.discard(key)
            raise
        with self._lock:
            self._opening.discard(key)
            self._open[key] = half
        log.info("round %d: split session of %s opened (cut %d, head on the %s)", round_number, client_id, half.options.cut, half.options.head)
        return half

    @property
    def step_limit(self) -> int:
        """Steps a client may start per round: the ``local_steps`` its task header tells it to
        train (fedtune.coordinator.service, ``task_header``), each one activations message."""
        return int(self.config.training.local_steps)

    def _build(self, instruction, round_number: int, steps_started: int = 0) -> ServerHalf:
        try:
            # The split half's own options (a correction in front of it, such as FedLC's, is the device's).
            fields = set(option_names(SplitOptions))
            options = build_options(SplitOptions, {k: v for k, v in instruction.options.items() if k in fields}, "split task")
        except (OptionsError, ValueError) as exc:  # our own instruction: a bug, not the client's
            raise CoordinatorError("INTERNAL", f"bad split instruction: {exc}") from None
        step_lock = None
        if self.config.split.server_adapter == "shared":
            with self._lock:
                if round_number not in self._shared:
                    self._shared = {round_number: (self._model(instruction), threading.Lock())}
                model, step_lock = self._shared[round_number]
        else:
            model = self._model(instruction)
        training = self.config.training
        return ServerHalf(model, options, training.learning_rate, training.weight_decay, self.global_model.pad_id, step_lock=step_lock,
                          step_limit=self.step_limit, steps_started=steps_started)

    def _model(self, instruction) -> torch.nn.Module:
        """The model with the round's global adapter, as the instruction hands it out."""
        gm = self.global_model
        adapter, frozen, _ = split_task_tensors(instruction.tensors, instruction.plan.scale)
        # peft's initial A (replaced below) drawn under the process's RNG lock
        model = inject_lora(gm.store.instance(gm.source, gm.task_name, gm.labels), instruction.plan, gm.task_name, seed=0)
        apply_base_delta(model, frozen)
        load_adapter_state(model, adapter)
        return model

    def _traffic(self, round_number: int) -> dict[str, int]:
        """The round's counters; call with the lock held."""
        return self.traffic.setdefault(round_number, {"split_bytes_up": 0, "split_bytes_down": 0, "split_steps": 0})

    def count(self, round_number: int, up: int = 0, down: int = 0) -> None:
        with self._lock:
            t = self._traffic(round_number)
            t["split_bytes_up"] += up
            t["split_bytes_down"] += down

    def finish(self, client_id: str, round_number: int) -> None:
        """The stream ended cleanly: keep the server half for the client's push."""
        with self._lock:
            half = self._open.pop((client_id, round_number), None)
            if half is not None:
                half.close()
                self._done[(client_id, round_number)] = half
                self._started[(client_id, round_number)] = half.started

    def discard(self, client_id: str, round_number: int) -> None:
        """The stream broke (bad frame, or the client went away): the session ends, its half-done
        step is dropped and the other sessions go on."""
        with self._lock:
            half = self._open.pop((client_id, round_number), None)
            if half is not None:  # a later session of the client in this round goes on from here
                self._started[(client_id, round_number)] = half.started
        if half is not None:
            half.close()

    def server_half(self, client_id: str, round_number: int) -> dict[str, torch.Tensor]:
        """The server-side tensors of a finished session, for the client's push, or a refusal.
        The session is kept until ``settle`` says what became of the push: reading the tensors
        may fail for a moment (a shared server adapter busy: UNAVAILABLE), and the client's
        retry must find them still there."""
        with self._lock:
            for key in [k for k in self._done if k[1] < round_number]:  # sessions of closed rounds
                del self._done[key]
            half = self._done.get((client_id, round_number))
        if half is None:
            raise CoordinatorError("FAILED_PRECONDITION", f"{client_id!r} pushed a split update for round {round_number} without a finished split session")
        return half.tensors()

    def settle(self, client_id: str, round_number: int, accepted: bool) -> None:
        """The push that carried a finished session's tensors was accepted, or refused for good:
        the session is used up. Its steps count in the round's traffic once an accepted push
        claims them (a stream that ended because its caller vanished can look like a clean end
        to the server, and is never claimed)."""
        with self._lock:
            half = self._done.pop((client_id, round_number), None)
            if half is not None and accepted:
                self._traffic(round_number)["split_steps"] += half.steps
