"""Putting the coordinator together: model, strategy, round engine, gRPC server, run directory.

``Coordinator`` is what ``fedtune coordinator`` runs, and what ``fedtune simulate`` runs on
loopback beside its clients: the same object in both.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Callable, Sequence

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtune.adapters import AdapterPlan
from fedtune.aggregation.base import variant_class
from fedtune.compose import checked, compose
from fedtune.config import ConfigError, RunConfig, config_from_dict, config_to_toml
from fedtune.contract.cost import CostModel, model_geometry, resolve_targets
from fedtune.coordinator.clients import load_enrollment_secrets
from fedtune.coordinator.engine import RoundEngine, _difference
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.global_model import FixedTensors, GlobalModel
from fedtune.coordinator.guard import CallGuard
from fedtune.coordinator.planner import Planner, frozen_updates_of
from fedtune.coordinator.service import CoordinatorService
from fedtune.credentials import SecretError, read_secret
from fedtune.data import Example, load_examples
from fedtune.durable import fsync_dir, read_text_nofollow, replace_file
from fedtune.models import ModelStore, resolve_source
from fedtune.protocol.stubs import add_coordinator_to_server
from fedtune.tasks import EvalOptions
from fedtune.transport import is_loopback, make_server, split_address

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", "fedtune.v1.Coordinator")


def plan_from_config(config: RunConfig) -> AdapterPlan:
    lora = config.lora
    variant = variant_class(lora.variant)  # what the LoRA variant sets in the plan (Fed-SB: core)
    return AdapterPlan(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
        layers=tuple(lora.layers),
        **(dict(variant.global_plan) if variant is not None else {}),
    )


def new_run_dir(root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


class RunDirError(ConfigError):
    """A run directory that cannot be used as asked; the message (one line) says what to do."""


# What a run writes at the top of its run directory. The export folders are written by
# transformers/peft, which open files without O_NOFOLLOW: links in them are removed at start.
EXPORT_FOLDERS = ("adapter", "merged")


def _entries(run_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(run_dir))
    except FileNotFoundError:
        return []


def check_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse a run directory that already holds something, unless the run is resumed
    (``--resume``) or the old contents are to be moved aside (``--force``)."""
    if resume and force:
        raise RunDirError(f"--resume continues the run in {run_dir} and --force moves it aside: pass one or the other")
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a folder")
    if resume or force:
        return
    entries = _entries(run_dir)
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunDirError(f"run directory {run_dir} is not empty ({shown}): pass --resume to continue the run in it, "
                          f"or --force to move it aside to {run_dir}.old-<timestamp> and start a new run there")


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.old-<timestamp>`` beside it (nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(os.path.abspath(run_dir))
    aside, n = base.with_name(f"{base.name}.old-{stamp}"), 1
    while os.path.lexists(aside):
        n += 1
        aside = base.with_name(f"{base.name}.old-{stamp}-{n}")
    try:
        os.rename(base, aside)
    except OSError as exc:
        raise RunDirError(f"cannot move run directory {run_dir} aside to {aside}: {exc.strerror or exc}") from None
    return aside


class Coordinator:
    def __init__(
        self,
        config: RunConfig,
        *,
        store: ModelStore | None = None,
        eval_examples: Sequence[Example] | None = None,
        global_model: GlobalModel | FixedTensors | None = None,
        resume: bool = False,
        force: bool = False,
        on_round_end: Callable[[dict], None] | None = None,
    ) -> None:
        """``global_model`` replaces the model built from ``config.model`` (tests and
        benchmarks serve plain tensors through the same service this way).

        A run directory that already holds files is refused (RunDirError) unless ``resume``
        continues the run in it or ``force`` moves its contents aside (when the run directory
        is prepared, at start); nothing is ever deleted."""
        config = checked(copy.deepcopy(config))  # the caller's config stays as it was
        if config.server.enrollment_secrets_file:
            try:
                load_enrollment_secrets(config.server.enrollment_secrets_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"server.enrollment_secrets_file: {exc}") from None
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
        check_run_dir(self.run_dir, resume=resume, force=force)  # before any model is loaded
        self._resume, self._force, self._claimed = resume, force, False
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
            source = resolve_source(config.model.source, config.model.base_precision)
            base = self.store.base(source, task, labels)
            try:  # the targets every client's adapter uses: named in the config, or the default
                plan = resolve_targets(base, plan)
            except ValueError as exc:
                raise ConfigError(str(exc) if str(exc).startswith("lora.") else f"lora.target_modules: {exc}") from None
            # Only the planner (with a heterogeneous strategy) needs the geometry; the delay
            # model uses it when it has it.
            composed = compose(config)
            plans_per_client = config.planner.enabled and composed.heterogeneous
            try:
                geometry, plan = model_geometry(base, plan)
            except ValueError as exc:
                if plans_per_client:
                    raise ConfigError(f"planner.enabled (strategy {config.federation.aggregation or config.federation.strategy}): "
                                      f"cannot model this architecture ({getattr(base.config, 'model_type', '?')}): {exc}; "
                                      "set planner.enabled = false (--no-planner) to give every client the [lora] plan") from None
                log.info("no cost model for this architecture (%s); modeled round times are off", exc)
            if plans_per_client:
                bare = sorted(set(range(geometry.num_blocks)) - {b for b, _, _, _ in geometry.modules})
                if bare:  # ALBERT: one set of weights computes every block; no block is its own
                    raise ConfigError(f"planner.enabled (strategy {config.federation.aggregation or config.federation.strategy}): "
                                      f"{getattr(base.config, 'model_type', '?')} has no LoRA modules of its own in blocks {bare} "
                                      "(its blocks share weights, or those blocks hold none of the target modules), so per-block plans cannot apply; "
                                      "set planner.enabled = false (--no-planner)")
                self.planner = Planner(
                    geometry,
                    CostModel(config.training.batch_size, config.model.max_length, config.training.local_steps, frozen_updates=frozen_updates_of(composed)),
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
                eval_options=EvalOptions(config.model.chat_template, config.eval.generate, config.eval.max_new_tokens),
            )
        self.global_model = global_model
        self.strategy = compose(config, scale=self.global_model.plan.scale)
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
        if resume and self.engine.resumed_from is None:
            self._resume_without_checkpoint()
        split = None
        if config.split.mode == "split":
            from fedtune.coordinator.split_sessions import SplitSessions
            from fedtune.split.planning import SplitCost, SplitGeometry
            from fedtune.split.segments import SplitError

            splitfed, sp = self.strategy_split(), config.split
            gm = self.global_model
            whole = gm.store.base(gm.source, gm.task_name, gm.labels)
            try:
                g = splitfed.geometry = SplitGeometry.from_model(whole, gm.plan)
            except SplitError as exc:
                raise ConfigError(f"split.mode split: {exc}") from None
            if sp.cut <= g.first_lora_block:
                fix = (f"set split.cut to {g.first_lora_block + 1} or more" if g.first_lora_block + 1 < g.num_blocks
                       else "no cut leaves one on the device; name other lora.target_modules")
                raise ConfigError(f"split.cut {sp.cut}: blocks 0-{sp.cut - 1} of {getattr(whole.config, 'model_type', 'the model')} hold none of the "
                                  f"LoRA target modules (the first is in block {g.first_lora_block}), so a device would train nothing; {fix}")
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

    def _resume_without_checkpoint(self) -> None:
        """``--resume`` of a run directory with no checkpoint starts from round 1, provided the
        config.toml there describes the same run (what a checkpoint is checked against: seed,
        model, LoRA settings, strategy); rows a crash left before the first checkpoint are
        dropped, as rows after a checkpoint are when resuming from it."""
        difference = self._saved_config_difference()
        if difference:
            raise CoordinatorError("FAILED_PRECONDITION", f"cannot resume {self.run_dir}: its config.toml describes another run "
                                   f"({difference}); choose another run directory, or --force instead of --resume to move it aside")
        self.engine.history = self.engine.metrics.keep_until(0)

    def _saved_config_difference(self) -> str:
        """How the run directory's config.toml differs from this run where a checkpoint would
        be refused for it; "" where it does not, or where there is no config fedtune wrote."""
        path = self.run_dir / "config.toml"
        text = read_text_nofollow(path)
        if text is None:
            if path.is_symlink():
                log.warning("%s is a symbolic link, not a config this program wrote: not compared, it will be replaced", path)
            return ""
        try:
            saved = config_from_dict(tomllib.loads(text))
        except (ConfigError, tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
            log.warning("%s is not a config fedtune can read (%s): not compared, it will be replaced", path, str(exc)[:120])
            return ""
        now = self.config
        pairs = {
            "seed": (saved.seed, now.seed),
            "model": ({"source": saved.model.source, "task": saved.model.task, "labels": list(saved.model.labels)},
                      {"source": now.model.source, "task": now.model.task, "labels": list(now.model.labels)}),
            "plan": (dataclasses.asdict(saved.lora), dataclasses.asdict(now.lora)),
        }
        try:
            pairs["strategy"] = (compose(saved, scale=self.global_model.plan.scale).describe(), self.strategy.describe())
        except Exception as exc:  # an old strategy that no longer builds: the other keys still tell
            log.debug("strategy of %s not compared: %s", path, exc)
        for key, (old, new) in pairs.items():
            if old != new:
                return _difference(key, old, new)
        return ""

    def prepare_run_dir(self) -> None:
        """Claim the run directory and record the effective configuration in it.

        The first call refuses a directory that holds files unless the run resumes it, and with
        ``force`` moves its contents aside to ``<run_dir>.old-<timestamp>``. Files are never
        written through symbolic links: config.toml replaces whatever is there, and links left
        in the folders the export writes into are removed (their targets are left alone)."""
        if not self._claimed:
            check_run_dir(self.run_dir, resume=self._resume, force=self._force)
            if self._force and _entries(self.run_dir):
                aside = move_aside(self.run_dir)
                log.warning("moved the previous contents of %s aside to %s", self.run_dir, aside)
            self._claimed = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in EXPORT_FOLDERS:
            folder = self.run_dir / name
            links = [folder] if folder.is_symlink() else [p for p in folder.iterdir() if p.is_symlink()] if folder.is_dir() else []
            for link in links:
                log.warning("removing the symbolic link %s (to %s): the export writes its own files there", link, os.readlink(link))
                link.unlink()
        replace_file(self.run_dir / "config.toml", config_to_toml(self.config).encode())
        fsync_dir(self.run_dir)

    def start(self) -> int:
        """Write the effective config, start serving; returns the bound port."""
        srv = self.config.server
        if getattr(self, "guard", None) is not None:  # started again: the old guard's pools go
            self.guard.close()
        self.guard = CallGuard(self.engine.registry.authenticate, max_streams=srv.max_streams or srv.max_workers - 8,
                               per_client=srv.per_client_calls, stream_deadline_s=srv.stream_deadline_s, request_timeout_s=srv.request_timeout_s,
                               max_workers=srv.max_workers, open_workers=srv.open_workers, auth_delay_max_s=srv.auth_delay_max_s)
        self.service.guard = self.guard
        # Queued calls count against the limit too: room for every worker of both pools, four times.
        self.server, self.port = make_server(
            srv.address, tls_cert=srv.tls_cert, tls_key=srv.tls_key, tls_client_ca=srv.tls_client_ca, insecure=srv.insecure, max_workers=srv.max_workers,
            interceptors=[self.guard], thread_pool=self.guard.pool, maximum_concurrent_rpcs=4 * (srv.max_workers + srv.open_workers)
        )
        if not (srv.enrollment_secret or srv.enrollment_secrets_file) and not is_loopback(split_address(srv.address)[0]):
            if not srv.open_enrollment:
                self.server.stop(None)
                self.server = None
                raise ConfigError(f"server.address {srv.address} is reachable from other machines and enrollment is open: anyone who reaches "
                                  "the port could register and be selected; set an enrollment secret (server.enrollment_secret_file or "
                                  "FEDTUNE_ENROLLMENT_SECRET), or open_enrollment = true if that is what you want")
            log.warning("enrollment is open on %s: anyone who reaches the port can register as a client", srv.address)
        try:
            self.prepare_run_dir()
        except BaseException:  # a refused run directory: the port is not left bound
            self.server.stop(None)
            self.server = None
            raise
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
        except BaseException:  # Ctrl-C or a crash: the run is to be resumed, clients keep waiting
            self.stop(final=False)
            raise
        self.stop()
        return history

    def stop(self, grace_s: float = 2.0, final: bool = True) -> None:
        """Stop serving. ``final`` tells waiting clients training is over; ``final=False``
        tells them to wait (the run will be resumed)."""
        self.engine.stop(final=final)
        if self.server is not None:
            self.health.enter_graceful_shutdown()
            self.server.stop(grace_s).wait()
            self.server = None
        if getattr(self, "guard", None) is not None:  # its deadline thread and worker pools end with the server
            self.guard.close()
