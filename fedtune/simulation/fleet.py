"""Simulated devices that cost almost nothing while they wait.

A real device long-polls the coordinator: one open call and one server thread per idle device.
That is fine for a fleet of phones, each with its own CPU, and ruinous for a thousand simulated
devices on a two-core machine, where the polls alone eat the cores the training needs. So in a
simulation an idle device is a parked ``ClientAgent`` object: no thread, no open call, only its
data split and whatever its recipe remembers between rounds.

The fleet asks the round engine (in the same process) which devices each round selected and
wakes exactly those. A woken device then does what a real one does, over the same gRPC service:
fetch its task, train (on the simulation's few training threads), push its update. Devices stay
alive in the coordinator's eyes through ordinary heartbeats, sent for all parked devices by one
thread every half client timeout. When the run ends, each device asks once more and is told that
training is over, as a real device is.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import grpc

from fedtune.client.agent import ClientAgent
from fedtune.coordinator.engine import MAX_DELIVERIES, RoundEngine

log = logging.getLogger(__name__)


class Fleet:
    """Runs ``agents`` against ``engine``'s coordinator; ``workers`` threads carry the woken
    devices' calls (a device waiting for a training slot holds one), so a round never needs
    more than its number of selected devices."""

    def __init__(self, agents: Sequence[ClientAgent], engine: RoundEngine, *, workers: int, stop: threading.Event,
                 on_all_failed: Callable[[], None] | None = None) -> None:
        self.agents = list(agents)
        self.engine = engine
        self.stop = stop
        self.errors: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="device")
        self._by_id: dict[str, ClientAgent] = {}
        self._busy: set[str] = set()  # woken devices whose call is still under way
        self._again: set[str] = set()  # busy devices a newer round selected too
        self._failed: set[str] = set()
        self._lock = threading.Lock()
        self._on_all_failed = on_all_failed

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Register every device, wake the selected ones round after round, and tell every
        device that training is over once the engine stops."""
        self._register_all()
        keepalive = threading.Thread(target=self._keepalive, name="fleet-keepalive", daemon=True)
        keepalive.start()
        try:
            last = 0
            while not self.stop.is_set():
                opened = self.engine.wait_for_round(last, 1.0)
                if opened is None:
                    break
                number, selected = opened
                if number == last:
                    continue
                last = number
                for client_id in selected:
                    agent = self._by_id.get(client_id)
                    if agent is not None:
                        self._wake(agent)
            self._tell_all_done()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _register_all(self) -> None:
        futures = [(agent, self._pool.submit(agent.register)) for agent in self.agents]
        for agent, future in futures:
            try:
                future.result()
            except Exception as exc:  # one device failing to enroll must not stop the others
                self._fail(agent, exc)
                continue
            self._by_id[agent.client_id] = agent
        log.info("fleet: %d devices registered", len(self._by_id))

    def _tell_all_done(self) -> None:
        """Each device still standing asks once more and learns that training is over."""
        pending = [self._pool.submit(self._ask_done, agent) for cid, agent in self._by_id.items() if cid not in self._failed]
        for future in pending:
            future.result()

    def _ask_done(self, agent: ClientAgent) -> None:
        try:
            agent.work_once(idle_wait=False)
        except Exception as exc:
            log.debug("%s: last call failed: %s", agent.options.name, exc)

    # ------------------------------------------------------------------ waking devices

    def _wake(self, agent: ClientAgent) -> None:
        with self._lock:
            if agent.client_id in self._failed:
                return
            if agent.client_id in self._busy:  # still on the previous round: ask again after it
                self._again.add(agent.client_id)
                return
            self._busy.add(agent.client_id)
        self._submit(agent)

    def _submit(self, agent: ClientAgent) -> None:
        future: Future = self._pool.submit(self._serve, agent)
        future.add_done_callback(lambda _: self._idle(agent))

    def _serve(self, agent: ClientAgent) -> None:
        """One woken device's round. A device whose task ended without an update the round took
        (its update or split session refused, the session interrupted) asks for work again, as
        a real device's loop does: the coordinator then hands the task again or gives the device
        up for the round, instead of waiting for it (kept alive by heartbeats) until the deadline."""
        try:
            for _ in range(MAX_DELIVERIES + 1):
                agent.work_once(idle_wait=False)
                if self.stop.is_set() or not self.engine.awaits(agent.client_id):
                    break
        except Exception as exc:  # a failing device must not take the simulation down
            self._fail(agent, exc)

    def _idle(self, agent: ClientAgent) -> None:
        with self._lock:
            again = agent.client_id in self._again and agent.client_id not in self._failed
            self._again.discard(agent.client_id)
            if not again:
                self._busy.discard(agent.client_id)
        if again:
            try:
                self._submit(agent)
            except RuntimeError:  # the pool is shutting down: the run is over
                with self._lock:
                    self._busy.discard(agent.client_id)

    def _fail(self, agent: ClientAgent, exc: BaseException) -> None:
        log.error("client %s failed: %s", agent.options.name, exc)
        with self._lock:
            self.errors.append(f"{agent.options.name}: {exc}")
            self._failed.add(agent.client_id or agent.options.name)
            everyone = len(self._failed) >= len(self.agents)
        if everyone and self._on_all_failed is not None:
            log.error("every simulated client has stopped; ending the run")
            self._on_all_failed()

    # ------------------------------------------------------------------ liveness

    def _keepalive(self) -> None:
        """Heartbeat every device every half client timeout, so the coordinator keeps
        counting it as alive (and may select it) although it holds no open call."""
        every = max(1.0, self.engine.fed.client_timeout_s / 2)
        while not self.stop.wait(every) and not self.engine.done:
            with self._lock:  # woken devices too: one may wait in the queue for a worker
                standing = [a for cid, a in self._by_id.items() if cid not in self._failed]
            for agent in standing:
                if self.stop.is_set():
                    return
                try:
                    agent.heartbeat()
                except grpc.RpcError as exc:
                    log.debug("%s: heartbeat failed: %s", agent.options.name, exc.code().name)
