"""Faults a fleet really has, thrown at a live coordinator: clients that drop out mid-round,
clients that send bad updates, and a coordinator killed mid-round and resumed.

    python bench/faults.py [--clients 20] [--rounds 6] [--dropout 0.2] [--bad 0.1] [--scenarios NAME ...]
                           [--repeat N] [--time-limit SECONDS] [--out FILE]

Each scenario runs a real coordinator (gRPC service, guard, round engine, checkpoints) on
loopback with ``--clients`` lightweight devices that speak the real protocol from threads: they
register, long-poll for tasks, send heartbeats and push updates (what they received plus a small
seeded delta; the training itself is not what is measured here). The global model is a fixed
set of tensors, so a scenario takes seconds, not hours.

- dropout: each round, a share of the selected devices goes silent instead of pushing and comes
  back a few seconds later;
- bad updates: a share pushes an update with NaN, Inf, 1e38 values (over the update-norm bound),
  a wrong shape or an unknown tensor instead of a good one, then asks for work again at once, as
  fedtune's agent does (the coordinator gives it up for the round rather than hand it the task again);
- restart: in round 3, once half of the updates are in, the coordinator process state is
  dropped without any shutdown (server stopped at once, nothing flushed) and a new coordinator
  resumes from the run directory on the same port; the devices find it again by themselves.

Columns: ``rounds_completed`` (training rows in the run's metrics.jsonl) of ``rounds_configured``;
``completed`` (every configured round closed within the scenario's wall-time limit, ``--time-limit``:
a scenario that stalls is stopped there, marked failed, and the coordinator's and devices' last
log lines and the engine thread's stack are printed); ``wall_seconds``; ``updates_accepted`` (acknowledged pushes); ``accepted_updates_lost``
(acknowledged by the coordinator life that closed the round, yet missing from that round's
aggregate: must be 0); ``redone_after_restart`` (acknowledged by the killed coordinator for the
round it never closed: those devices are asked again and retrain); ``bad_updates_sent`` and
``bad_updates_refused`` (must be equal); ``bad_rounds_stored`` (rounds whose stored adapter is
not finite: must be 0); ``restart_overhead_seconds`` (from the kill until the resumed
coordinator acknowledges its first update).

The exit status is 1 when any scenario (any repetition, ``--repeat N``) did not complete, lost an
accepted update, stored a bad round or accepted a bad update.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch

from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.coordinator.global_model import FixedTensors
from fedtune.coordinator.guard import credentials
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc
from fedtune.protocol.tensors import TensorReceiver, encode_tensors, tensor_frames
from fedtune.transport import make_channel

SHAPES = {"layer.lora_A": (8, 64), "layer.lora_B": (64, 8), "head": (2, 64)}
BAD_KINDS = ("nan", "inf", "huge", "shape", "name")
CLIENT_TIMEOUT_S = 2.0
TIME_LIMIT_S = 180.0  # a scenario takes 3-25 s on loopback; one that runs this long has stalled


@dataclass
class Scenario:
    name: str
    dropout: float = 0.0
    bad: float = 0.0
    restart: bool = False
    # Coordinator kills, in order: (round, share of that round's good updates acknowledged by the
    # current coordinator life before the kill). ``restart`` alone means ((3, 0.5),).
    kills: tuple[tuple[int, float], ...] = ()
    restart_delay_s: float = 0.0  # from the kill until the new coordinator is built
    # Each (round, device name) -> "drop" or one of BAD_KINDS; given, it replaces the seeded draw.
    fates: dict[tuple[int, str], str] | None = None

    def kill_points(self) -> tuple[tuple[int, float], ...]:
        return self.kills or (((3, 0.5),) if self.restart else ())


@dataclass
class Ledger:
    """What the devices saw, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acks: list[tuple[int, int, str]] = field(default_factory=list)   # (coordinator life, round, client)
    bad_sent: int = 0
    bad_refused: int = 0
    other_errors: list[str] = field(default_factory=list)
    first_ack_after: dict[int, float] = field(default_factory=dict)  # life -> time of its first ack


def fate(seed: int, round_number: int, name: str, scenario: Scenario) -> str:
    """What this device does this round: "ok", "drop" or one of BAD_KINDS (seeded, repeatable)."""
    if scenario.fates is not None:
        return scenario.fates.get((round_number, name), "ok")
    rng = np.random.default_rng([seed, round_number, sum(map(ord, name)) * 7919 + len(name)])
    u = rng.random()
    if u < scenario.dropout:
        return "drop"
    if u < scenario.dropout + scenario.bad:
        return BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
    return "ok"


class Device:
    def __init__(self, name: str, port_box: dict, life_box: dict, scenario: Scenario, ledger: Ledger, stop: threading.Event, seed: int) -> None:
        self.name, self.port_box, self.life_box, self.scenario, self.ledger, self.stop, self.seed = name, port_box, life_box, scenario, ledger, stop, seed
        self.client_id = self.token = ""
        # The coordinator life that issued this device's token: tasks and acknowledgements got with
        # it are that life's (read after the reply: the bench stops a life's server before it
        # counts the next life, so a token issued by a stopped life never gets anything again).
        self.life = 0
        self.delay = 0.02 * (zlib.crc32(name.encode()) % 20)
        self.done_rounds: set[tuple[int, int]] = set()  # (life, round) this device has acted in
        self.started = time.monotonic()
        self.events: deque[str] = deque(maxlen=8)  # its last steps, printed when a scenario stalls
        self.thread_id: int | None = None  # the thread running it, whose stack a stall prints

    def note(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:7.2f}s {text}")

    def run(self) -> None:
        self.thread_id = threading.get_ident()
        # fedtune's own channel: its watchdog ends a call gRPC lets run past its deadline, as a
        # real device's would (fedtune.transport.CallWatchdog)
        channel = make_channel(f"127.0.0.1:{self.port_box['port']}")
        stub = pb_grpc.CoordinatorStub(channel)
        while not self.stop.is_set():
            try:
                if not self.client_id:
                    reply = stub.Register(pb.RegisterRequest(name=self.name, num_examples=100), timeout=10)
                    self.client_id, self.token, self.life = reply.client_id, reply.token, self.life_box["life"]
                    self.note(f"registered as {self.client_id} (life {self.life})")
                if self._one(stub):
                    self.note("told training is over")
                    break
            except grpc.RpcError as exc:
                code = exc.code()
                if not self.events or not self.events[-1].endswith(code.name):
                    self.note(f"call failed: {code.name}")
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED):  # a new coordinator: register again
                    self.client_id = ""
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    self.stop.wait(0.2)
                else:
                    with self.ledger.lock:
                        self.ledger.other_errors.append(f"{self.name}: {code.name}: {exc.details()}")
                    self.stop.wait(0.2)
            except Exception as exc:  # noqa: BLE001 - a device that breaks is reported, not silently lost
                with self.ledger.lock:
                    self.ledger.other_errors.append(f"{self.name}: {type(exc).__name__}: {exc}")
                self.stop.wait(0.2)
        channel.close()

    def _one(self, stub) -> bool:
        meta = credentials(self.client_id, self.token)
        frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=self.client_id, token=self.token, wait_seconds=1.0), timeout=10, metadata=meta))
        header = next(frames).task
        if header.status == pb.TASK_STATUS_DONE:
            return True
        if header.status != pb.TASK_STATUS_TRAIN:
            return False
        receiver = TensorReceiver()
        for frame in frames:
            receiver.feed(frame)
        received = receiver.finish()
        life = self.life
        what = fate(self.seed, header.round, self.name, self.scenario)
        if (life, header.round) in self.done_rounds or what == "drop":
            self.note(f"task for round {header.round} (life {life}): stays silent")
            self.stop.wait(CLIENT_TIMEOUT_S + 1.0)  # silent: the round goes on without it
            return False
        self.note(f"task for round {header.round} (life {life}): pushes {what}")
        self.done_rounds.add((life, header.round))
        self.stop.wait(self.delay)  # devices differ in speed: updates arrive spread over the round
        rng = torch.Generator().manual_seed(zlib.crc32(f"{self.seed} {header.round} {self.name}".encode()))
        update = {k: v + 0.01 * torch.randn(v.shape, generator=rng) for k, v in received.items()}
        if what != "ok":
            update = self._spoil(update, what)
        update_header = pb.UpdateHeader(client_id=self.client_id, token=self.token, round=header.round, num_examples=100,
                                        num_tensors=len(update), metrics={"train_loss": 1.0})
        stream = [pb.Frame(update=update_header), *tensor_frames(encode_tensors(update))]
        try:
            reply = stub.PushUpdate(iter(stream), timeout=30, metadata=meta)
        except grpc.RpcError as exc:
            if what != "ok" and exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                with self.ledger.lock:
                    self.ledger.bad_sent += 1
                    self.ledger.bad_refused += 1
                self.note(f"bad update refused ({exc.code().name})")
                return False  # asks for work again at once, as fedtune's agent does: given up for the round
            raise
        with self.ledger.lock:
            if what != "ok":
                self.ledger.bad_sent += 1  # sent bad and accepted: a failure the table shows
            if reply.accepted:
                self.ledger.acks.append((life, header.round, self.client_id))
                self.ledger.first_ack_after.setdefault(life, time.monotonic())
        self.note(f"update for round {header.round} {'accepted' if reply.accepted else 'not accepted'}")
        return False

    @staticmethod
    def _spoil(update: dict, kind: str) -> dict:
        name = next(iter(update))
        bad = dict(update)
        if kind == "nan":
            bad[name] = bad[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
        elif kind == "inf":
            bad[name] = bad[name].clone().index_fill_(0, torch.tensor([0]), float("inf"))
        elif kind == "huge":
            bad[name] = torch.full_like(bad[name], 1e38)
        elif kind == "shape":
            bad[name] = torch.zeros(bad[name].shape[0] + 1, *bad[name].shape[1:])
        else:
            bad["not.in.the.plan"] = bad.pop(name)
        return bad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(run_dir: Path, port: int, clients: int, rounds: int, seed: int, round_timeout_s: float = 60.0) -> RunConfig:
    config = RunConfig()
    config.seed, config.run_dir = seed, str(run_dir)
    config.federation.rounds, config.federation.min_clients, config.federation.quorum = rounds, clients, 1.0
    config.federation.client_timeout_s, config.federation.round_timeout_s = CLIENT_TIMEOUT_S, round_timeout_s
    config.federation.update_norm_bound, config.federation.update_norm_action = 1e3, "refuse"
    config.server.address = f"127.0.0.1:{port}"
    config.server.max_workers = 2 * clients + 16
    config.server.registration_burst = 4 * clients
    return config


class LogTail(logging.Handler):
    """The coordinator's last log lines (INFO and up), kept to explain a scenario that stalls."""

    def __init__(self, started: float, lines: int = 40) -> None:
        super().__init__(logging.INFO)
        self.started, self.lines = started, deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            when = record.created - self.started
            self.lines.append(f"{when:7.2f}s {record.threadName} {record.name}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a diagnostic must not break the run
            self.handleError(record)


def run_scenario(scenario: Scenario, clients: int, rounds: int, seed: int, folder: Path, time_limit: float = TIME_LIMIT_S,
                 report=None, round_timeout_s: float = 60.0) -> dict:
    """Run ``scenario`` and return its row. A scenario still running after ``time_limit`` seconds
    is stopped and its row says ``completed: False``; ``report`` (a callable taking one line,
    default: print to stderr) then gets the coordinator's last log lines, each device's last
    steps and the round engine's stack."""
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    port = _free_port()
    run_dir = folder / scenario.name
    tensors = {k: torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, (k, shape) in enumerate(SHAPES.items())}
    ledger, stop = Ledger(), threading.Event()
    port_box, life_box = {"port": port}, {"life": 0}
    started = time.monotonic()
    deadline = started + time_limit
    tail = LogTail(time.time())
    fedtune_log = logging.getLogger("fedtune")
    level = fedtune_log.level
    fedtune_log.addHandler(tail)
    fedtune_log.setLevel(logging.INFO)

    def coordinator(resume: bool) -> tuple[Coordinator, threading.Thread]:
        c = Coordinator(_config(run_dir, port, clients, rounds, seed, round_timeout_s), global_model=FixedTensors(dict(tensors)), resume=resume)
        c.start()
        t = threading.Thread(target=c.engine.run, daemon=True, name=f"engine-life-{life_box['life']}")
        t.start()
        return c, t

    devices: list[Device] = []
    try:
        coord, engine = coordinator(False)
        start_rounds = [coord.engine.start_round]  # per coordinator life: the first round it ran
        devices = [Device(f"device-{i:02d}", port_box, life_box, scenario, ledger, stop, seed) for i in range(clients)]
        threads = [threading.Thread(target=d.run, daemon=True, name=d.name) for d in devices]
        for t in threads:
            t.start()
        killed_at = None
        for kill_round, share in scenario.kill_points():
            # wait until the round is open and that share of its good updates is in, then drop everything
            good = sum(1 for d in devices if fate(seed, kill_round, d.name, scenario) == "ok")
            life = life_box["life"]
            while time.monotonic() < deadline:
                with ledger.lock:
                    acked = sum(1 for lf, r, _ in ledger.acks if lf == life and r == kill_round)
                passed = any(row["round"] >= kill_round for row in coord.engine.history[-1:])
                if acked >= max(1, int(good * share)) or passed or not engine.is_alive():
                    break
                time.sleep(0.01)
            if not engine.is_alive() or time.monotonic() >= deadline:
                break
            coord.server.stop(None)       # no grace: calls in flight die with it, nobody is told anything
            coord.engine.stop(final=False)  # the old engine must not go on to another round
            engine.join(max(1.0, min(30.0, deadline - time.monotonic())))
            killed_at = time.monotonic()
            life_box["life"] += 1
            if scenario.restart_delay_s:
                time.sleep(scenario.restart_delay_s)
            coord, engine = coordinator(True)
            start_rounds.append(coord.engine.start_round)
        engine.join(max(0.0, deadline - time.monotonic()))
        stalled = engine.is_alive()
        if stalled:
            _report_stall(report, scenario, time_limit, coord, engine, devices, tail, rounds)
            coord.engine.stop(final=True)
        stop.set()
        for t in threads:
            t.join(10)
        coord.stop()
        engine.join(10)
    finally:
        stop.set()
        fedtune_log.removeHandler(tail)
        fedtune_log.setLevel(level)
    seconds = time.monotonic() - started

    rows: dict[int, dict] = {}
    metrics = run_dir / "metrics.jsonl"
    for line in (metrics.read_text().splitlines() if metrics.exists() else []):
        row = json.loads(line)
        if not row.get("evaluation_only"):
            rows[row["round"]] = row  # a round redone after a restart has one row: the life that closed it
    # The life that closed round r: the last life that started at or before r (a resumed life
    # drops the rows after its checkpoint and runs those rounds again).
    closed_in = {r: max(life for life, first in enumerate(start_rounds) if first <= r) for r in rows}
    lost = sum(1 for life, r, cid in ledger.acks if r in rows and life == closed_in[r] and cid not in rows[r]["client_ids"])
    redone = sum(1 for life, r, _ in ledger.acks if closed_in.get(r) != life)
    from safetensors.torch import load_file

    checkpoints = sorted((run_dir / "checkpoints").glob("round-*"))
    bad_stored = sum(1 for ck in checkpoints if not all(torch.isfinite(t).all() for t in load_file(str(ck / "state.safetensors")).values()))
    # from the (last) kill until the life it started acknowledged its first update
    overhead = (ledger.first_ack_after.get(life_box["life"], float("nan")) - killed_at) if killed_at is not None else 0.0
    rounds_completed = len(rows)
    return {
        "name": scenario.name,
        "completed": not stalled and rounds_completed == rounds,
        "rounds_completed": rounds_completed,
        "rounds_configured": rounds,
        "updates_accepted": len(ledger.acks),
        "accepted_updates_lost": lost,
        "redone_after_restart": redone,
        "bad_updates_sent": ledger.bad_sent,
        "bad_updates_refused": ledger.bad_refused,
        "bad_rounds_stored": bad_stored,
        "restart_overhead_seconds": round(overhead, 2),
        "wall_seconds": round(seconds, 1),
        "unexpected_errors": len(ledger.other_errors),
        "errors": ledger.other_errors[:10],
    }


def _report_stall(report, scenario: Scenario, time_limit: float, coord: Coordinator, engine: threading.Thread, devices: list[Device],
                  tail: LogTail, rounds: int) -> None:
    """What a stalled scenario was doing when its time ran out."""
    eng = coord.engine
    alive = [r.client_id for r in eng.registry.alive(eng.fed.client_timeout_s)]
    report(f"{scenario.name}: STALLED: not done after {time_limit:g} s; {len(eng.history)} rounds in this coordinator's history of {rounds}, "
           f"started at round {eng.start_round}; {len(eng.registry)} clients registered, {len(alive)} alive (min_clients {eng.fed.min_clients})")
    report(f"{scenario.name}: the coordinator's last log lines:")
    for line in tail.lines:
        report(f"  {line}")
    report(f"{scenario.name}: each device's last steps:")
    for d in devices:
        report(f"  {d.name} ({d.client_id or 'unregistered'}): " + " | ".join(list(d.events)[-4:]))
    frames = sys._current_frames()
    waiting = [("the round engine", engine.ident)] + [(d.name, d.thread_id) for d in devices]
    for who, ident in waiting:
        frame = frames.get(ident) if ident is not None else None
        if frame is not None:
            report(f"{scenario.name}: where {who} waits:")
            for line in traceback.format_stack(frame)[-6:]:
                report("  " + line.rstrip().replace("\n", "\n  "))


SCENARIOS = {
    "baseline": lambda a: Scenario("baseline"),
    "dropout": lambda a: Scenario("dropout", dropout=a.dropout),
    "bad-updates": lambda a: Scenario("bad-updates", bad=a.bad),
    "restart": lambda a: Scenario("restart", restart=True),
    "all-faults": lambda a: Scenario("all-faults", dropout=a.dropout, bad=a.bad, restart=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dropout", type=float, default=0.2, help="share of the selected devices that drop out each round")
    parser.add_argument("--bad", type=float, default=0.1, help="share of the selected devices that send a bad update each round")
    parser.add_argument("--scenarios", "--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario this many times in a row (a row per run)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                        help="wall-clock seconds a scenario may take; one still running then has stalled and fails")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the coordinator's warnings (refused updates, silent devices)")
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose else logging.ERROR
    logging.basicConfig(level=level, format="%(message)s")
    for handler in logging.getLogger().handlers:  # the INFO lines kept for a stall report are not printed
        handler.setLevel(level)
    if args.rounds < 4 and any(SCENARIOS[s](args).restart for s in args.scenarios):
        parser.error("--rounds: the restart happens in round 3; give at least 4")
    if args.repeat < 1 or args.time_limit <= 0:
        parser.error("--repeat must be at least 1 and --time-limit positive")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            for i in range(1, args.repeat + 1):
                print(f"running {name}" + (f" ({i} of {args.repeat})" if args.repeat > 1 else "") + " ...", file=sys.stderr, flush=True)
                row = run_scenario(SCENARIOS[name](args), args.clients, args.rounds, args.seed, Path(tmp) / f"{i}", args.time_limit)
                if args.repeat > 1:
                    row = {"name": row.pop("name"), "repeat": i, **row}
                rows.append(row)
    errors = {(r["name"], r.get("repeat", 1)): r.pop("errors") for r in rows}
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))
    summary = {}
    for name in args.scenarios:
        runs = [r for r in rows if r["name"] == name]
        walls = [r["wall_seconds"] for r in runs]
        summary[name] = {"completed": sum(r["completed"] for r in runs), "runs": len(runs), "wall_seconds_min": min(walls),
                         "wall_seconds_median": statistics.median(walls), "wall_seconds_max": max(walls)}
        s = summary[name]
        print(f"{name}: completed {s['completed']} of {s['runs']}; wall seconds min {s['wall_seconds_min']}, median {s['wall_seconds_median']}, "
              f"max {s['wall_seconds_max']} (limit {args.time_limit:g})")
    result = {"rows": rows, "clients": args.clients, "rounds": args.rounds, "dropout": args.dropout, "bad": args.bad, "seed": args.seed,
              "client_timeout_s": CLIENT_TIMEOUT_S, "time_limit_s": args.time_limit, "repeat": args.repeat, "summary": summary}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for (name, i), messages in errors.items():
        for message in messages:
            print(f"{name}" + (f" ({i})" if args.repeat > 1 else "") + f": unexpected: {message}", file=sys.stderr)
    failed = []
    for r in rows:
        label = r["name"] + (f" ({r['repeat']})" if args.repeat > 1 else "")
        why = [text for bad, text in (
            (not r["completed"], f"completed {r['rounds_completed']} of {r['rounds_configured']} rounds in {r['wall_seconds']} s (limit {args.time_limit:g} s)"),
            (r["accepted_updates_lost"], f"lost {r['accepted_updates_lost']} accepted updates"),
            (r["bad_rounds_stored"], f"stored {r['bad_rounds_stored']} bad rounds"),
            (r["bad_updates_sent"] != r["bad_updates_refused"], f"accepted {r['bad_updates_sent'] - r['bad_updates_refused']} bad updates"),
        ) if bad]
        if why:
            failed.append(f"{label}: {'; '.join(why)}")
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
