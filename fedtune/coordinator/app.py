"""Putting the coordinator together: model, strategy, round engine, gRPC server, run directory.

``Coordinator`` is what ``fedtune coordinator`` runs, and what ``fedtune simulate`` runs on
loopback beside its clients: the same object in both.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.adapters import AdapterPlan
from fedtune.config import ConfigError, RunConfig, config_to_toml
from fedtune.coordinator.engine import RoundEngine
from fedtune.coordinator.guard import CallGuard
from fedtune.coordinator.global_model import FixedTensors, GlobalModel
from fedtune.coordinator.planner import CostModel, Planner, model_geometry  # noqa: F401 (model_geometry is re-exported)
from fedtune.coordinator.service import CoordinatorService
from fedtune.credentials import SecretError, read_secret
from fedtune.data import Example, load_examples
from fedtune.models import ModelStore, resolve_source
from fedtune.protocol.stubs import add_coordinator_to_server
from fedtune.transport import is_loopback, make_server, split_address

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", "fedtune.v1.Coordinator")


def plan_from_config(config: RunConfig) -> AdapterPlan:
    lora = config.lora
    return AdapterPlan(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
        layers=tuple(lora.layers),
        core=lora.variant == "fedsb",
    )


def new_run_dir(root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


class Coordinator:
    def __init__(
        self,
        config: RunConfig,
        *,
        store: ModelStore | None = None,
        eval_examples: Sequence[Example] | None = None,
        global_model: GlobalModel | FixedTensors | None = None,
        resume: bool = False,
        on_round_end: Callable[[dict], None] | None = None,
    ) -> None:
        """``global_model`` replaces the model built from ``config.model`` (tests and
        benchmarks serve plain tensors through the same service this way)."""
        config = copy.deepcopy(config).validate()  # the caller's config stays as it was
        if not config.server.enrollment_secret:
            try:
                config.server.enrollment_secret = read_secret(config.server.enrollment_secret_file)
            except SecretError as exc:
                raise ConfigError(f"server.enrollment_secret_file: {exc}") from None
        self.config = config
        task = config.model.task
        labels = list(config.model.labels)
        if resume and not config.run_dir:
            raise ConfigError("run_dir: resuming needs the run directory of the run to continue")
        self.run_dir = Path(config.run_dir) if config.run_dir else new_run_dir()
        config.run_dir = str(self.run_dir)
        self.store = store or ModelStore(seed=config.seed)
        self.planner: Planner | None = None
        geometry = None
        plan = plan_from_config(config)
        if global_model is None:
            if task == "seq-cls" and len(labels) < 2:
                raise ConfigError("model.labels: sequence classification needs the label names (at least 2)")
            if eval_examples is None:
                eval_examples = load_examples(config.eval.data, task=task) if config.eval.data else []
            if config.eval.max_examples:
                eval_examples = list(eval_examples)[: config.eval.max_examples]
            source = resolve_source(config.model.source)
            try:
                geometry, plan = model_geometry(self.store.base(source, task, labels), plan)
            except ValueError as exc:  # only the planner and the delay model need the geometry
                if config.planner.enabled:
                    raise ConfigError(f"planner.enabled: cannot model this architecture: {exc}") from None
                log.info("no cost model for this architecture (%s); modeled round times are off", exc)
            if config.planner.enabled and config.build_strategy().heterogeneous:
                self.planner = Planner(
                    geometry,
                    CostModel(config.training.batch_size, config.model.max_length, config.training.local_steps),
                    plan,
                    min_rank=config.planner.min_rank,
                    max_rank=config.planner.max_rank,
                    round_budget_s=config.planner.round_budget_s,
                )
                plan = self.planner.global_plan
                log.info("planner ladder: %d plans, global adapter on %d layers up to rank %d", len(self.planner.ladder), len(plan.layers), plan.rank)
            global_model = GlobalModel(
                self.store,
                source,
                task,
                labels,
                plan,
                max_length=config.model.max_length,
                eval_examples=eval_examples,
                eval_batch_size=config.eval.batch_size,
                seed=config.seed,
            )
        self.global_model = global_model
        self.strategy = config.build_strategy(scale=self.global_model.plan.scale)
        self.engine = RoundEngine(
            config,
            self.global_model,
            self.strategy,
            self.run_dir,
            planner=self.planner,
            geometry=geometry,
            resume=resume,
            on_round_end=on_round_end,
        )
        split = None
        if config.split.mode == "split":
            from fedtune.coordinator.split_sessions import SplitSessions
            from fedtune.split.planning import SplitCost, SplitGeometry

            splitfed, sp = self.strategy_split(), config.split
            gm = self.global_model
            splitfed.geometry = SplitGeometry.from_model(gm.store.base(gm.source, gm.task_name, gm.labels), gm.plan)
            splitfed.cost = SplitCost(config.training.batch_size, config.model.max_length, config.training.local_steps, sp.act_bits, sp.grad_bits,
                                      sp.head == "client", sp.server_gflops * 1e9)
            splitfed.round_budget_s = config.planner.round_budget_s
            split = SplitSessions(self.engine, self.global_model, config)
            self.engine.split = split
        self.service = CoordinatorService(self.engine, config, config.model.source, task, labels, split)
        self.server = None
        self.port = 0

    def strategy_split(self):
        """The SplitFed wrapper in the strategy chain."""
        return self.engine.split_strategy()

    def prepare_run_dir(self) -> None:
        """Create the run directory and record the effective configuration in it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(self.config))

    def start(self) -> int:
        """Write the effective config, start serving; returns the bound port."""
        srv = self.config.server
        self.guard = CallGuard(self.engine.authenticate, max_streams=srv.max_streams or srv.max_workers - 8,
                               per_client=srv.per_client_calls, stream_deadline_s=srv.stream_deadline_s)
        self.server, self.port = make_server(
            srv.address, tls_cert=srv.tls_cert, tls_key=srv.tls_key, tls_client_ca=srv.tls_client_ca, insecure=srv.insecure, max_workers=srv.max_workers, interceptors=[self.guard]
        )
        if not srv.enrollment_secret and not is_loopback(split_address(srv.address)[0]):
            if not srv.open_enrollment:
                self.server.stop(None)
                self.server = None
                raise ConfigError(f"server.address {srv.address} is reachable from other machines and enrollment is open: anyone who reaches "
                                  "the port could register and be selected; set an enrollment secret (server.enrollment_secret_file or "
                                  "FEDTUNE_ENROLLMENT_SECRET), or open_enrollment = true if that is what you want")
            log.warning("enrollment is open on %s: anyone who reaches the port can register as a client", srv.address)
        self.prepare_run_dir()
        add_coordinator_to_server(self.service, self.server)
        # The standard gRPC health service: "" and "fedtune.v1.Coordinator" are SERVING while
        # the coordinator accepts work, NOT_SERVING once it is shutting down.
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.server.start()
        log.info("coordinator listening on port %d, run directory %s", self.port, self.run_dir)
        return self.port

    def run(self, shutdown_grace_s: float = 30.0) -> list[dict]:
        """Run all rounds, tell the clients training is over, stop serving."""
        if self.server is None:
            self.start()
        try:
            history = self.engine.run()
            self.engine.wait_until_clients_told(shutdown_grace_s)
            return history
        except BaseException:  # Ctrl-C or a crash: the run is to be resumed, clients keep waiting
            self.stop(final=False)
            raise
        finally:
            self.stop()

    def stop(self, grace_s: float = 2.0, final: bool = True) -> None:
        """Stop serving. ``final`` tells waiting clients training is over; ``final=False``
        tells them to wait (the run will be resumed)."""
        self.engine.stop(final=final)
        if self.server is not None:
            self.health.enter_graceful_shutdown()
            self.server.stop(grace_s).wait()
            self.server = None
