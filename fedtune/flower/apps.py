"""The Flower apps: a ServerApp around ``FedtuneStrategy`` and a ClientApp that trains fedtune's
client recipes.

Both read the same fedtune configuration: the ``config`` given to the factory, else the TOML
file named by the run config key ``fedtune-config`` (``flwr run -c fedtune-config=run.toml``,
or ``[tool.flwr.app.config]``), else the embedded defaults; a few run config keys override it
(``num-rounds``, ``strategy``, ``clients-per-round``, ``local-steps``, ``min-nodes``,
``run-dir``; an empty string is no override). The run config keys ``resume`` and ``force`` say
what the ServerApp does with a run folder that already holds files, as ``fedtune coordinator
--resume`` / ``--force`` do: continue the run in it from its last checkpoint, or move it aside to
``<run_dir>.old-<timestamp>``; with neither it is refused (RunDirError, one line). Each
node trains on its share of the data, cut as ``fedtune simulate`` cuts it: partition
``partition-id`` of ``num-partitions`` (Flower's node config), the held-out evaluation examples
set aside first, so the coordinator's evaluation never sees training data.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.client.agent import AgentOptions, ClientAgent
from fedtune.client.policy import PrivacyPolicy
from fedtune.client.state import state_from_bytes, state_to_bytes
from fedtune.config import ConfigError, RunConfig, config_to_toml, load_config
from fedtune.coordinator.app import RunDirError
from fedtune.flower.records import record_to_tensors, tensors_to_record
from fedtune.devices import Capabilities
from fedtune.flower.strategy import EXAMPLES_KEY, HELLO_KEY, TASK_KEY, FedtuneStrategy
from fedtune.models import ModelStore, resolve_source
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.messages import capabilities_to_proto
from fedtune.simulation.runner import client_name, client_shares, fleet, prepare_data

log = logging.getLogger(__name__)

STATE_KEY = "fedtune.device"      # the device's memory in Flower's context.state
_OVERRIDES = {
    "num-rounds": ("federation", "rounds", int),
    "strategy": ("federation", "strategy", str),
    "clients-per-round": ("federation", "clients_per_round", int),
    "min-nodes": ("federation", "min_clients", int),
    "local-steps": ("training", "local_steps", int),
    "run-dir": ("", "run_dir", str),
}

# One per process: Flower's simulation runs many nodes' messages in each worker process, and the
# frozen base model and each node's tokenized data are worth keeping between them. Agents are
# kept per run: a node's memory (control variates, residuals, privacy spent) lives in its
# context.state, and a new run starts with none, so an agent of an earlier run must not be reused.
_STORE = ModelStore()
_AGENTS: dict[tuple, ClientAgent] = {}


def resolve_config(run_config: Mapping[str, Any], given: RunConfig | None = None) -> RunConfig:
    """The fedtune configuration of a Flower run (see the module docstring)."""
    if given is not None:
        config = copy.deepcopy(given)
    elif run_config.get("fedtune-config"):
        config = load_config(str(run_config["fedtune-config"]))
    else:
        config = RunConfig()
    for key, (section, field, kind) in _OVERRIDES.items():
        if key in run_config and run_config[key] != "":
            setattr(getattr(config, section) if section else config, field, kind(run_config[key]))
    return config.validate()


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0", ""}


def run_config_flag(run_config: Mapping[str, Any], key: str) -> bool:
    """A yes/no run config key (a TOML boolean; also 0/1 and "true"/"false"), False where absent."""
    value = run_config.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"run config key {key!r}: expected true or false, got {str(value)[:40]!r}")


def run_dir_choice(run_config: Mapping[str, Any]) -> tuple[bool, bool]:
    """(resume, force) from the run config keys ``resume`` and ``force``."""
    return run_config_flag(run_config, "resume"), run_config_flag(run_config, "force")


# ---------------------------------------------------------------------- server


def server_app(config: RunConfig | None = None, **strategy_options: Any) -> ServerApp:
    """A ServerApp running ``FedtuneStrategy`` for ``federation.rounds`` rounds (on ``resume``,
    the rounds after the last checkpoint), then exporting the global adapter into the run
    directory. ``strategy_options`` go to ``FedtuneStrategy`` (``on_round_end``, ...); the run
    config keys ``resume`` / ``force`` choose what happens to a used run folder."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(context.run_config, config)
        resume, force = run_dir_choice(context.run_config)
        _, evals, labels = prepare_data(cfg)
        cfg.model.labels = labels
        try:
            strategy = FedtuneStrategy(cfg, eval_examples=evals, resume=resume, force=force, **strategy_options)
        except RunDirError as exc:  # the coordinator's one line, with Flower's way to answer it
            raise RunDirError(f"{exc}; with Flower, as run config keys: -c resume=true or -c force=true") from None
        if strategy.rounds_left:
            strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=strategy.rounds_left,
                           timeout=cfg.federation.round_timeout_s)
        else:
            log.info("the resumed run in %s has no round left to run: exporting its adapter", strategy.engine.run_dir)
        folder = strategy.finish()
        rows = strategy.history
        last = rows[-1] if rows else {}
        log.info("fedtune over Flower: %d rounds, final eval loss %s; adapter in %s", len(rows), last.get("eval_loss"), folder)
        app.fedtune_history = rows  # for callers in the same process (tests, benchmarks)
        app.fedtune_run_dir = strategy.engine.run_dir

    return app


# ---------------------------------------------------------------------- client


def train(msg: Message, context: Context, config: RunConfig | None = None) -> Message:
    """Train the task in ``msg`` with fedtune's recipes on this node's partition."""
    cfg = resolve_config(context.run_config, config)
    part = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    agent = _agent(cfg, part, parts, context.run_id)
    if STATE_KEY in context.state.config_records:
        agent.restore(state_from_bytes(context.state[STATE_KEY]["blob"]))
    header = pb.TaskHeader.FromString(msg.content["config"][TASK_KEY])
    tensors = record_to_tensors(msg.content["arrays"])
    update, num_examples, metrics = agent.train(header, tensors)
    context.state[STATE_KEY] = ConfigRecord({"blob": state_to_bytes(agent.device_state())})
    reply = RecordDict({
        "arrays": tensors_to_record(update),
        "metrics": MetricRecord({EXAMPLES_KEY: num_examples, **{k: float(v) for k, v in metrics.items()}}),
    })
    return Message(content=reply, reply_to=msg)


def hello(msg: Message, context: Context, config: RunConfig | None = None) -> Message:
    """Answer the strategy's question of who this node is, as a fedtune device's Register does:
    its name (the simulated client of its partition), example count and device (from
    ``simulation.tiers`` / ``simulation.profiles``, else an unnamed device)."""
    cfg = resolve_config(context.run_config, config)
    part = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    agent = _agent(cfg, part, parts, context.run_id)
    devices = fleet(cfg)
    caps = devices[part % len(devices)] if devices else Capabilities(tier="flower")
    record = ConfigRecord({"name": agent.options.name, "num-examples": len(agent.examples),
                           "capabilities": capabilities_to_proto(caps).SerializeToString()})
    return Message(content=RecordDict({HELLO_KEY: record}), reply_to=msg)


def client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp whose train messages run ``train`` and whose queries run ``hello``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, config)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return hello(msg, context, config)

    return app


def _agent(config: RunConfig, part: int, parts: int, run_id: int) -> ClientAgent:
    key = (run_id, config_to_toml(config), part, parts)
    agent = _AGENTS.get(key)
    if agent is None:
        for old in [k for k in _AGENTS if k[0] != run_id]:  # an earlier run's: its data and memory go
            del _AGENTS[old]
        train_examples, _, labels = prepare_data(config)
        share = client_shares(config, train_examples, labels, parts)[part]
        source = resolve_source(config.model.source)
        policy = PrivacyPolicy(allow_known_seed=config.privacy.repeatable)  # research mode only when the run asks for it
        agent = ClientAgent(AgentOptions(address="", name=client_name(part), privacy_policy=policy), [train_examples[i] for i in share], source, store=_STORE)
        _AGENTS[key] = agent
    return agent
