"""A whole federation on one machine: one coordinator and N client agents in this process,
talking real gRPC over loopback.

One process, not one per client: every agent and the coordinator share one copy of the frozen
base weights (see ``ModelStore``), start in milliseconds instead of paying a torch import each,
and the process's memory is the base model once plus small per-client adapters. An idle agent
has no thread and no open call (``fedtune.simulation.fleet``), so thousands fit on a laptop. Training is
CPU-bound and torch already spreads one client's step over all cores, so by default one client
trains at a time (``simulation.parallel``): agents hand their training to a shared pool of that
many worker threads and wait, while their gRPC calls, heartbeats and the coordinator keep
running. Training always on the same few threads also keeps memory flat: each thread that
allocates large tensors grows its own malloc arena, and those are not given back.
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fedtune.client.agent import AgentOptions, AgentReport, ClientAgent
from fedtune.client.policy import PrivacyPolicy
from fedtune.compose import checked
from fedtune.config import ConfigError, RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.data import TWEETS_LABELS, Example, embedded_tweets, label_ids, load_examples, resolve_labels
from fedtune.devices import Capabilities, load_profiles, tier
from fedtune.models import ModelStore, resolve_source
from fedtune.registry import UnknownNameError
from fedtune.simulation.fleet import Fleet
from fedtune.simulation.partition import PARTITIONS, partition
from fedtune.transport import make_channel

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    run_dir: Path
    history: list[dict]
    clients: list[AgentReport] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)
    stopped_because: str = ""  # why the run ended before its last round (a privacy budget)
    evaluation: dict | None = None  # the evaluation-only round's row (FedSA's personalized models)


def prepare_data(config: RunConfig) -> tuple[list[Example], list[Example], list[str]]:
    """Training examples, held-out examples and label names for a simulation."""
    sim, task = config.simulation, config.model.task
    if sim.data:
        examples = load_examples(sim.data, task=task)
    else:
        if task != "seq-cls":
            raise ValueError(f"the embedded corpus is for seq-cls; give --data for {task}")
        examples = embedded_tweets()
    labels = list(config.model.labels)
    if task == "seq-cls":
        labels = labels or (TWEETS_LABELS if not sim.data else resolve_labels(examples))
    if config.eval.data:
        return examples, load_examples(config.eval.data, task=task), labels
    n_eval = min(sim.eval_examples, len(examples) // 5)
    order = np.random.default_rng([config.seed, 7]).permutation(len(examples))
    held = set(order[:n_eval].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [examples[i] for i in sorted(held)]
    return train, evals, labels


def client_shares(config: RunConfig, train: Sequence[Example], labels: Sequence[str], num_clients: int) -> list[list[int]]:
    """Indices of each client's training examples, cut as ``simulation.partition`` says (label
    skew on the labels for classification)."""
    sim = config.simulation
    options = {"alpha": sim.alpha}
    if config.model.task == "seq-cls" and sim.partition == "dirichlet":
        options["labels"] = label_ids(train, list(labels))
    return partition(sim.partition, len(train), num_clients, config.seed, **options)


def client_name(i: int) -> str:
    """The name simulated client ``i`` registers under (a Flower node of partition ``i`` takes
    it too, so both runs select and seed the same clients)."""
    return f"sim-{i:03d}"


def fleet(config: RunConfig) -> list[Capabilities] | None:
    """The simulated devices: from ``simulation.profiles`` (which then sets the number of
    clients), from ``simulation.tiers`` cycled over the clients, or None for identical ones."""
    sim = config.simulation
    if sim.profiles:
        devices = load_profiles(sim.profiles)
        if sim.clients != len(devices):
            log.info("%s lists %d devices: simulating %d clients", sim.profiles, len(devices), len(devices))
            sim.clients = len(devices)
        return devices
    if sim.tiers:
        return [tier(sim.tiers[i % len(sim.tiers)]) for i in range(sim.clients)]
    return None


def _training_thread(threads: int) -> None:
    """A training thread's intra-op threads: the machine's cores shared by the clients that
    train at once (with 2 cores and parallel 2, one each, as Flower's one-CPU workers get)."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


class _WholeMachine(Executor):
    """The training pool as the engine sees it: its work between trainings (aggregation,
    evaluation, export) runs on a training thread with every core's intra-op threads, and the
    thread goes back to its share afterwards."""

    def __init__(self, pool: ThreadPoolExecutor, threads: int, share: int) -> None:
        self.pool, self.threads, self.share = pool, threads, share

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        def run():
            torch.set_num_threads(self.threads)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(self.share)

        return self.pool.submit(run)


def _check_delta(config: RunConfig, clients: int, smallest_device: int) -> None:
    """Refuse at start a delta of 1/N or more (client level, N clients) or of 1/n or more
    (sample level, n the smallest device's examples), unless privacy.allow_large_delta."""
    p = config.privacy
    problems = []
    if p.dp in ("client", "both") and p.delta >= 1.0 / clients:
        problems.append(f"client-level delta {p.delta:g} is not below 1/N = {1.0 / clients:.3g} for {clients} clients")
    if p.dp in ("sample", "both") and p.delta >= 1.0 / max(smallest_device, 1):
        problems.append(f"sample-level delta {p.delta:g} is not below 1/n = {1.0 / max(smallest_device, 1):.3g} for the smallest device's {smallest_device} examples")
    if not problems:
        return
    if p.allow_large_delta:
        log.warning("%s; proceeding because privacy.allow_large_delta is set", "; ".join(problems))
        return
    raise ConfigError(f"privacy.delta: {'; '.join(problems)} (lower privacy.delta, or set privacy.allow_large_delta to proceed)")


def run_simulation(
    config: RunConfig,
    *,
    on_round_end: Callable[[dict], None] | None = None,
    capabilities: Sequence[Capabilities] | None = None,
    force: bool = False,
) -> SimulationResult:
    config = checked(copy.deepcopy(config))  # the caller's config is left as it was
    try:  # a partition of an installed package (entry point) or a module:Name spec is loaded here
        PARTITIONS.get(config.simulation.partition)
    except UnknownNameError as exc:
        raise ConfigError(f"simulation.partition: {exc}") from None
    sim = config.simulation
    capabilities = capabilities or fleet(config)
    train, evals, labels = prepare_data(config)
    config.model.labels = labels
    config.server.address = "127.0.0.1:0"
    config.federation.min_clients = max(config.federation.min_clients, sim.clients)
    # Devices woken at once: a round's selection (see Fleet); each holds at most a stream and a
    # heartbeat on the server.
    workers = min(max(config.federation.clients_per_round or sim.clients, sim.parallel) + 2, 256)
    config.server.max_workers = max(config.server.max_workers, 2 * workers + 16)
    # Registrations and health checks of a simulated fleet on loopback: a few threads serve them.
    config.server.open_workers = min(config.server.open_workers, 8)
    config.server.registration_burst = max(config.server.registration_burst, sim.clients)  # they all register at once
    parts = client_shares(config, train, labels, sim.clients)
    sizes = sorted(len(p) for p in parts)
    shown = [len(p) for p in parts] if len(sizes) <= 20 else f"from {sizes[0]} to {sizes[-1]}, median {sizes[len(sizes) // 2]}"
    log.info("partitioned %d examples over %d clients (%s): sizes %s", len(train), sim.clients, sim.partition, shown)
    _check_delta(config, sim.clients, sizes[0])

    store = ModelStore(seed=config.seed)
    threads_before = torch.get_num_threads()
    share = max(1, threads_before // sim.parallel)  # each training thread's intra-op threads
    compute = ThreadPoolExecutor(max_workers=sim.parallel, thread_name_prefix="train", initializer=_training_thread, initargs=(share,))
    # Every large torch operation of the process runs on the training threads: loading the
    # model here, evaluation and aggregation in the engine (engine.compute). Each further thread
    # that runs one opens an OpenMP team of its own, and once a process has more OpenMP threads
    # than cores libgomp stops spinning between parallel regions for all of them: a training
    # step measured 1.5x slower when the main thread had merely summed a large tensor first.
    try:
        coordinator = compute.submit(Coordinator, config, store=store, eval_examples=evals, force=force, on_round_end=on_round_end).result()
    except BaseException:
        compute.shutdown(wait=False)
        torch.set_num_threads(threads_before)
        raise
    coordinator.engine.compute = _WholeMachine(compute, threads_before, share)
    coordinator.engine.training_slots = sim.parallel  # a round's deadline grows with its waves
    port = coordinator.start()
    source = resolve_source(config.model.source)
    channel = make_channel(f"127.0.0.1:{port}")  # one connection for the whole fleet
    stop = threading.Event()
    agents = [
        ClientAgent(
            AgentOptions(
                address=f"127.0.0.1:{port}",
                name=client_name(i),
                capabilities=capabilities[i] if capabilities else Capabilities(tier="sim"),
                give_up_after_seconds=60.0,
                enrollment_secret=coordinator.config.server.enrollment_secret,
                # Simulated devices accept research-mode DP exactly when the run asks for it.
                privacy_policy=PrivacyPolicy(allow_known_seed=config.privacy.repeatable),
            ),
            [train[j] for j in part],
            source,
            store=store,
            compute=compute,
            stop_event=stop,
            channel=channel,
        )
        for i, part in enumerate(parts)
    ]
    devices = Fleet(agents, coordinator.engine, workers=workers, stop=stop, on_all_failed=coordinator.engine.stop)
    fleet_thread = threading.Thread(target=devices.run, name="fleet", daemon=True)
    fleet_thread.start()
    failure: list[BaseException] = []
    try:
        try:
            coordinator.engine.run()
        except BaseException as exc:  # re-raised below, after the fleet and server are down
            failure.append(exc)
        fleet_thread.join(timeout=60.0)
    finally:
        stop.set()
        coordinator.stop()
        compute.shutdown(wait=False, cancel_futures=True)
        channel.close()
        torch.set_num_threads(threads_before)  # as the caller had it (the pool may have changed it)
    if failure:
        raise failure[0]
    return SimulationResult(coordinator.run_dir, coordinator.engine.history, [a.report for a in agents], devices.errors, coordinator.engine.stopped_because, coordinator.engine.evaluation)
