"""fedtune's round engine behind Flower's message-API ``Strategy``.

Flower's built-in strategies send every node the same RecordDict and average arrays of equal
shapes. fedtune's strategies give each client its own adapter plan (rank, layers) and fold
updates of different shapes exactly (HetLoRA, FlexLoRA, FLoRA...), with client-level DP,
trust checks and checkpoints around them. ``FedtuneStrategy`` keeps all of that by driving
fedtune's ``RoundEngine`` itself: Flower only carries the messages.

- ``configure_train``: Flower's nodes are registered with the engine as clients. Each new node
  is first asked who it is (a query message answered by fedtune's ClientApp: its name, example
  count and device, as a fedtune device's Register says); a node that does not answer is
  registered as ``node-<id>`` with a device from ``capabilities``. A name is bound to the node
  that registered it (see ``FedtuneStrategy.enroll``): never renamed, never taken over by
  another node. The engine selects the round's
  clients (seeded, or Poisson-sampled for client-level DP), plans their adapters and asks the
  fedtune strategy for each one's instruction; each selected node gets a RecordDict with its
  start tensors (``arrays``) and the same task header fedtune's coordinator sends
  (``config["fedtune.task"]``, a serialized ``TaskHeader``).
- ``aggregate_train``: each reply is checked as fedtune's service checks an update stream
  (names, shapes, dtypes, finite values), submitted to the engine (example caps, norm bound,
  the strategy's own checks), then the engine closes the round: aggregate, evaluate on held-out
  data, append to metrics.jsonl, checkpoint. The returned ArrayRecord is the global adapter, the
  MetricRecord the round's finite numbers (see ``flower_metrics``). A reply with a metric that is
  not a finite number has that metric left out (a warning names the node); one whose example
  count is not a whole number of at least 1 is rejected. Either way the round goes on.
- Evaluation is fedtune's central evaluation after each round; ``configure_evaluate`` sends
  nothing.
- The run folder is claimed as by ``fedtune coordinator``: one that holds files is refused unless
  ``resume`` continues the run in it (from its last checkpoint: Flower's round 1 is then the
  engine's first round not yet run, and ``rounds_left`` says how many remain) or ``force`` moves
  it aside.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy
from google.protobuf.message import DecodeError

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.clients import ClientRecord
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.metrics import NONFINITE_KEY, _json_safe
from fedtune.data import Example
from fedtune.devices import Capabilities
from fedtune.flower.records import check_update, record_to_tensors, tensors_to_record
from fedtune.models import ModelStore
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.messages import capabilities_from_proto
from fedtune.protocol.tensors import decode_tensors, encode_tensors

log = logging.getLogger(__name__)

TASK_KEY = "fedtune.task"         # the serialized TaskHeader in a train message's config
HELLO_KEY = "fedtune.hello"       # a query asking a node who it is, and the ConfigRecord of its answer
EXAMPLES_KEY = "num-examples"     # Flower's name for a reply's example count
# Flower nodes report their own example counts, which fedtune cannot check against a
# registration: they are trusted up to federation.max_examples_per_client.
_UNCHECKED_EXAMPLES = 1 << 40
# The credential a Flower node's registration is bound to: Flower's node ids are unique per
# node (the SuperLink authenticates nodes), so a name belongs to the node that registered it.
NODE_CREDENTIAL = "flower-node:{}"
_NODE_NAME = re.compile(r"node-([0-9]+)")  # the name of a node that does not say its own: reserved to that node
# Metrics a device's sample-level DP accounting is read from: an update whose figures are not
# finite is rejected, not kept without them (the privacy report cannot leave them out).
_ACCOUNTING_PREFIX = "dp_sample_"


class FedtuneStrategy(FlowerStrategy):
    """A Flower strategy running fedtune's ``config.federation.strategy`` (any registered
    strategy, with its wrappers: client-level DP, codecs, FedSA...).

    ``min_nodes``: nodes to wait for before each round (default ``federation.min_clients``);
    ``capabilities``: the device of the i-th node that does not say its own, in node-id order
    (default: from ``simulation.tiers`` / ``simulation.profiles``, else identical devices);
    ``resume`` / ``force``: what to do with a run folder that already holds files, as
    ``fedtune coordinator --resume`` / ``--force`` (neither: refused, RunDirError);
    ``on_round_end``: called with each closed round's row, its non-finite numbers written as
    None and their keys listed under ``nonfinite``, as in metrics.jsonl."""

    def __init__(
        self,
        config: RunConfig,
        *,
        eval_examples: Sequence[Example] | None = None,
        store: ModelStore | None = None,
        min_nodes: int | None = None,
        capabilities: Callable[[int], Capabilities] | None = None,
        node_wait_s: float = 300.0,
        resume: bool = False,
        force: bool = False,
        on_round_end: Callable[[dict], None] | None = None,
    ) -> None:
        config = copy.deepcopy(config)
        if config.split.mode == "split":
            raise ValueError("split learning needs fedtune's own coordinator (it runs the other half of the model); use fedtune simulate or fedtune coordinator")
        config.server.registration_burst = max(config.server.registration_burst, 1 << 20)  # nodes arrive all at once
        config.server.max_clients = max(config.server.max_clients, 1 << 20)
        self.coordinator = Coordinator(config, store=store, eval_examples=eval_examples, resume=resume, force=force)
        self.coordinator.prepare_run_dir()
        self.engine = self.coordinator.engine
        self.config = self.coordinator.config
        self.min_nodes = min_nodes or self.config.federation.min_clients
        self.capabilities = capabilities or _default_capabilities(self.config)
        self.node_wait_s = node_wait_s
        self.on_round_end = on_round_end
        self.client_of: dict[int, str] = {}   # Flower node id -> fedtune client id
        self.node_of: dict[str, int] = {}
        self.records: dict[int, ClientRecord] = {}  # Flower node id -> its registration
        self.refused: dict[int, str] = {}  # Flower node id -> why it was not enrolled (not asked again)
        self.history: list[dict] = list(self.engine.history)  # a resumed run's rows so far, then each round's
        self.stopped = False

    @property
    def rounds_left(self) -> int:
        """Rounds still to run (``num_rounds`` for Flower's ``start``): all of them, or after a
        resumed checkpoint the rounds after it."""
        return max(0, self.config.federation.rounds - self.engine.start_round + 1)

    def engine_round(self, server_round: int) -> int:
        """The engine's round number of Flower's ``server_round`` (they differ on resume)."""
        return server_round + self.engine.start_round - 1

    def initial_arrays(self) -> ArrayRecord:
        """The global adapter before round 1 (pass as ``start(initial_arrays=...)``)."""
        adapter, _ = self.engine.global_model_tensors()
        return tensors_to_record(adapter)

    # ------------------------------------------------------------------ Flower's Strategy

    def summary(self) -> None:
        log.info("fedtune strategy %s over Flower; run directory %s", self.engine.strategy.describe(), self.engine.run_dir)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.stopped:
            return []
        self._enroll(grid, self._wait_for_nodes(grid))
        server_round = self.engine_round(server_round)
        if not self.engine.open_round(server_round):  # e.g. a privacy budget it would exceed
            log.warning("round %d not run: %s", server_round, self.engine.stopped_because)
            self.stopped = True
            return []
        messages = []
        for client_id, task in self.engine.open_tasks().items():
            tensors = dict(task.instruction.tensors)
            sent = tensors if task.instruction.downlink is None else _downlink(tensors, task.instruction.downlink)
            record = tensors_to_record(sent)
            header = self.coordinator.service.task_header(task, len(sent))
            content = RecordDict({"arrays": record, "config": ConfigRecord({TASK_KEY: header.SerializeToString()})})
            self.engine.note_sent(server_round, record.count_bytes(), client_id)
            messages.append(Message(content=content, dst_node_id=self.node_of[client_id], message_type=MessageType.TRAIN))
        log.info("round %d: %d nodes get their own task", server_round, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.stopped:
            return None, None
        server_round = self.engine_round(server_round)
        for reply in replies:
            self._submit(server_round, reply)
        row = self.engine.close_round()
        self.history.append(row)
        if self.on_round_end is not None:
            self.on_round_end(finite_row(row))
        adapter, _ = self.engine.global_model_tensors()
        return tensors_to_record(adapter), flower_metrics(row)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # fedtune evaluates the global model centrally when it closes a round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def finish(self):
        """After ``start``: export the global adapter (a PEFT folder in the run directory)."""
        return self.engine.export()

    # ------------------------------------------------------------------ helpers

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """Flower's nodes connect asynchronously: wait until ``min_nodes`` are there."""
        end = time.monotonic() + self.node_wait_s
        while True:
            ids = sorted(grid.get_node_ids())
            if len(ids) >= self.min_nodes:
                return ids
            if time.monotonic() > end:
                raise TimeoutError(f"only {len(ids)} of {self.min_nodes} Flower nodes connected within {self.node_wait_s:.0f} s")
            time.sleep(0.2)

    def enroll(self, node: int, name: str, capabilities: Capabilities, num_examples: int) -> ClientRecord:
        """Register Flower node ``node`` as the fedtune client ``name``, the name bound to the
        node (credential ``flower-node:<id>``).

        A node registers once: asked again, under any name, it gets back its own record (same
        client id and token, retired or not). A name is never renamed ("dev-2") and never taken
        over: a name another node holds is refused (CoordinatorError FAILED_PRECONDITION), live
        or silent; so is ``node-<n>`` (the name of a node that does not say its own) for any
        node but n. Flower authenticates its nodes itself: fedtune's enrollment secrets, which
        a node's messages do not carry, are not asked for."""
        mine = self.records.get(node)
        if mine is not None and any(r is mine for r in self.engine.registry.all()):
            if name != mine.client_id:
                log.warning("Flower node %d registered as %s asked to register as %r: it keeps %s", node, mine.client_id, name[:80], mine.client_id)
            return mine
        reserved = _NODE_NAME.fullmatch(name or "")
        if reserved and int(reserved.group(1)) != node:
            raise CoordinatorError("FAILED_PRECONDITION", f"client name {name!r} is reserved for Flower node {reserved.group(1)}")
        holder = next((n for n, r in self.records.items() if r.client_id == name and n != node), None)
        if holder is not None:
            raise CoordinatorError("FAILED_PRECONDITION", f"client name {name!r} is held by Flower node {holder}; give each node its own "
                                   "name (fedtune's ClientApp: its own partition-id in the node config)")
        record = self.engine.registry.register(name, capabilities, num_examples, credential=NODE_CREDENTIAL.format(node), limit=1,
                                               live_s=math.inf)
        self.records[node] = record
        self.client_of[node], self.node_of[record.client_id] = record.client_id, node
        log.info("registered Flower node %d as %s (tier=%s, examples=%d)", node, record.client_id, capabilities.tier or "-", num_examples,
                 extra={"client_id": record.client_id})
        return record

    def _enroll(self, grid: Grid, node_ids: list[int]) -> None:
        new = [node for node in node_ids if node not in self.client_of and node not in self.refused]
        hellos = self._ask_who(grid, new) if new else {}
        for node in new:  # the engine's selection depends on the names, not on this order
            if node in hellos:
                name, examples, caps = hellos[node]
            else:
                name, examples, caps = f"node-{node}", _UNCHECKED_EXAMPLES, self.capabilities(len(self.client_of))
            try:
                self.enroll(node, name, caps, examples)
            except CoordinatorError as exc:
                log.warning("Flower node %d not enrolled: %s", node, exc.message)
                if exc.code == "FAILED_PRECONDITION":  # a name conflict: asking again changes nothing
                    self.refused[node] = exc.message
                continue
        for node in node_ids:
            if node in self.client_of:
                self.engine.registry.touch(self.client_of[node])  # listed by Flower's grid: alive

    def _ask_who(self, grid: Grid, nodes: list[int]) -> dict[int, tuple[str, int, Capabilities]]:
        """Each node's (name, example count, device), from fedtune's ClientApp; nodes that do
        not answer, or answer nonsense, are left out."""
        ask = getattr(grid, "send_and_receive", None)
        if ask is None:
            return {}
        query = [Message(content=RecordDict({"config": ConfigRecord({HELLO_KEY: 1})}), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        out = {}
        for reply in ask(query, timeout=self.node_wait_s):
            node = reply.metadata.src_node_id
            if reply.has_error() or HELLO_KEY not in reply.content.config_records:
                continue
            hello = reply.content[HELLO_KEY]
            try:
                caps = capabilities_from_proto(pb.Capabilities.FromString(bytes(hello["capabilities"])))
                examples = int(hello["num-examples"])
                if examples < 0:
                    raise ValueError(f"num-examples {examples} is negative")
                out[node] = (str(hello["name"]), examples, caps)
            except (KeyError, ValueError, TypeError, DecodeError) as exc:
                log.warning("Flower node %d answered who it is with %s: %s", node, dict(hello), exc)
        return out

    def _submit(self, server_round: int, reply: Message) -> None:
        client_id = self.client_of.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        if reply.has_error():
            log.warning("round %d: node %s failed: %s", server_round, client_id, reply.error.reason.strip().splitlines()[-1:])
            return
        record = reply.content.array_records.get("arrays")
        nbytes = record.count_bytes() if record is not None else 0
        try:
            expected = self.engine.expected_update(client_id, server_round)
            if record is None or "metrics" not in reply.content.metric_records:
                raise CoordinatorError("INVALID_ARGUMENT", "a reply needs an 'arrays' ArrayRecord and a 'metrics' MetricRecord")
            num_examples, metrics, dropped = reply_metrics(reply.content["metrics"])
            if dropped:
                log.warning("round %d: node %s sent metrics that are not finite numbers, left out: %s", server_round, client_id,
                            ", ".join(dropped[:8]) + (f" and {len(dropped) - 8} more" if len(dropped) > 8 else ""), extra={"round": server_round, "client_id": client_id})
            try:
                tensors = record_to_tensors(record, expected)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise CoordinatorError("INVALID_ARGUMENT", f"the 'arrays' record cannot be read: {str(exc)[:200]}") from None
            check_update(tensors, expected)
            self.engine.submit(client_id, server_round, tensors, num_examples, metrics, nbytes)
        except CoordinatorError as exc:
            self.engine.note_rejected(server_round, nbytes, client_id, exc.message)  # a node's reply is final
            log.warning("round %d: rejected update from %s: %s", server_round, client_id, exc.message)


def reply_metrics(record: Mapping[str, Any]) -> tuple[int, dict[str, float], list[str]]:
    """A node's reply MetricRecord as (example count, metrics, names left out).

    A metric that is not one finite number (NaN, Inf, a list, anything else) is left out, so
    that one bad figure costs the figure, not the update, nor the round. The example count
    weighs the update: one that is missing or not a whole number of at least 1, and sample-level
    DP accounting figures (``dp_sample_*``) that are not finite, make the update rejected
    (CoordinatorError INVALID_ARGUMENT)."""
    count = record.get(EXAMPLES_KEY)
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or count != int(count) or count < 1:
        raise CoordinatorError("INVALID_ARGUMENT", f"{EXAMPLES_KEY} must be a whole number of at least 1, got {str(count)[:40]}")
    metrics: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in record.items():
        if key == EXAMPLES_KEY:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key] = float(value)
        elif key.startswith(_ACCOUNTING_PREFIX):
            raise CoordinatorError("INVALID_ARGUMENT", f"DP accounting metric {key!r} is not a finite number")
        else:
            dropped.append(key[:64])
    return int(count), metrics, dropped


def finite_row(row: Mapping) -> dict:
    """A round's row as metrics.jsonl holds it: every number that is not finite (at any depth)
    None, and its key path listed under ``nonfinite``; for callbacks and JSON writers."""
    nonfinite: list[str] = []
    safe = {str(k): _json_safe(v, nonfinite, str(k)) for k, v in row.items() if k != NONFINITE_KEY}
    flagged = list(row.get(NONFINITE_KEY) or []) + [k for k in nonfinite if k not in (row.get(NONFINITE_KEY) or [])]
    if flagged:
        safe[NONFINITE_KEY] = flagged
    return safe


def flower_metrics(row: Mapping) -> MetricRecord:
    """The top-level numbers of a round's row as a Flower MetricRecord: only finite ones (a
    MetricRecord holds no None); ``nonfinite`` counts the numbers left out."""
    numbers: dict[str, float | int] = {}
    left_out = 0
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                numbers[str(key)] = float(value)
            else:
                left_out += 1
    if left_out:
        numbers[NONFINITE_KEY] = left_out
    return MetricRecord(numbers)


def _downlink(tensors: dict, codec) -> dict:
    """What a client decodes from a downlink-compressed task (Flower carries the decoded
    arrays; the compression's effect on training is the same, its bytes are not saved)."""
    return decode_tensors(encode_tensors(tensors, {name: codec for name, t in tensors.items() if t.is_floating_point()}))


def _default_capabilities(config: RunConfig) -> Callable[[int], Capabilities]:
    from fedtune.devices import load_profiles, tier

    sim = config.simulation
    if sim.profiles:
        devices = load_profiles(sim.profiles)
        return lambda i: devices[i % len(devices)]
    if sim.tiers:
        return lambda i: tier(sim.tiers[i % len(sim.tiers)])
    return lambda i: Capabilities(tier="flower")
