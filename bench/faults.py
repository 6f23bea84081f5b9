"""Faults a fleet really has, thrown at a live coordinator: clients that drop out mid-round,
clients that send bad updates, and a coordinator killed mid-round and resumed.

    python bench/faults.py [--clients 20] [--rounds 6] [--dropout 0.2] [--bad 0.1] [--out FILE]

Each scenario runs a real coordinator (gRPC service, guard, round engine, checkpoints) on
loopback with ``--clients`` lightweight devices that speak the real protocol from threads: they
register, long-poll for tasks, send heartbeats and push updates (what they received plus a small
seeded delta; the training itself is not what is measured here). The global model is a fixed
set of tensors, so a scenario takes seconds, not hours.

- dropout: each round, a share of the selected devices goes silent instead of pushing and comes
  back a few seconds later;
- bad updates: a share pushes an update with NaN, Inf, 1e38 values (over the update-norm bound),
  a wrong shape or an unknown tensor instead of a good one, then goes silent for the round;
- restart: in round 3, once half of the updates are in, the coordinator process state is
  dropped without any shutdown (server stopped at once, nothing flushed) and a new coordinator
  resumes from the run directory on the same port; the devices find it again by themselves.

Columns: ``rounds_completed``; ``updates_accepted`` (acknowledged pushes); ``accepted_updates_lost``
(acknowledged by the coordinator life that closed the round, yet missing from that round's
aggregate: must be 0); ``redone_after_restart`` (acknowledged by the killed coordinator for the
round it never closed: those devices are asked again and retrain); ``bad_updates_sent`` and
``bad_updates_refused`` (must be equal); ``bad_rounds_stored`` (rounds whose stored adapter is
not finite: must be 0); ``restart_overhead_seconds`` (from the kill until the resumed
coordinator acknowledges its first update).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import tempfile
import threading
import time
import zlib
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
from fedtune.transport import GRPC_OPTIONS

SHAPES = {"layer.lora_A": (8, 64), "layer.lora_B": (64, 8), "head": (2, 64)}
BAD_KINDS = ("nan", "inf", "huge", "shape", "name")
CLIENT_TIMEOUT_S = 2.0


@dataclass
class Scenario:
    name: str
    dropout: float = 0.0
    bad: float = 0.0
    restart: bool = False


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
        self.delay = 0.02 * (zlib.crc32(name.encode()) % 20)
        self.done_rounds: set[tuple[int, int]] = set()  # (life, round) this device has acted in

    def run(self) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port_box['port']}", options=GRPC_OPTIONS)
        stub = pb_grpc.CoordinatorStub(channel)
        while not self.stop.is_set():
            try:
                if not self.client_id:
                    reply = stub.Register(pb.RegisterRequest(name=self.name, num_examples=100), timeout=10)
                    self.client_id, self.token = reply.client_id, reply.token
                if self._one(stub):
                    break
            except grpc.RpcError as exc:
                code = exc.code()
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
        frames = iter(stub.FetchTask(pb.FetchTaskRequest(client_id=self.client_id, token=self.token, wait_seconds=1.0), timeout=30, metadata=meta))
        header = next(frames).task
        if header.status == pb.TASK_STATUS_DONE:
            return True
        if header.status != pb.TASK_STATUS_TRAIN:
            return False
        receiver = TensorReceiver()
        for frame in frames:
            receiver.feed(frame)
        received = receiver.finish()
        life = self.life_box["life"]
        what = fate(self.seed, header.round, self.name, self.scenario)
        if (life, header.round) in self.done_rounds or what == "drop":
            self.stop.wait(CLIENT_TIMEOUT_S + 1.0)  # silent: the round goes on without it
            return False
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
                self.stop.wait(CLIENT_TIMEOUT_S + 1.0)
                return False
            raise
        with self.ledger.lock:
            if what != "ok":
                self.ledger.bad_sent += 1  # sent bad and accepted: a failure the table shows
            if reply.accepted:
                self.ledger.acks.append((life, header.round, self.client_id))
                self.ledger.first_ack_after.setdefault(life, time.monotonic())
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


def _config(run_dir: Path, port: int, clients: int, rounds: int, seed: int) -> RunConfig:
    config = RunConfig()
    config.seed, config.run_dir = seed, str(run_dir)
    config.federation.rounds, config.federation.min_clients, config.federation.quorum = rounds, clients, 1.0
    config.federation.client_timeout_s, config.federation.round_timeout_s = CLIENT_TIMEOUT_S, 60.0
    config.federation.update_norm_bound, config.federation.update_norm_action = 1e3, "refuse"
    config.server.address = f"127.0.0.1:{port}"
    config.server.max_workers = 2 * clients + 16
    config.server.registration_burst = 4 * clients
    return config


def run_scenario(scenario: Scenario, clients: int, rounds: int, seed: int, folder: Path) -> dict:
    port = _free_port()
    run_dir = folder / scenario.name
    tensors = {k: torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, (k, shape) in enumerate(SHAPES.items())}
    ledger, stop = Ledger(), threading.Event()
    port_box, life_box = {"port": port}, {"life": 0}
    started = time.monotonic()

    def coordinator(resume: bool) -> tuple[Coordinator, threading.Thread]:
        c = Coordinator(_config(run_dir, port, clients, rounds, seed), global_model=FixedTensors(dict(tensors)), resume=resume)
        c.start()
        t = threading.Thread(target=c.engine.run, daemon=True)
        t.start()
        return c, t

    coord, engine = coordinator(False)
    devices = [Device(f"device-{i:02d}", port_box, life_box, scenario, ledger, stop, seed) for i in range(clients)]
    threads = [threading.Thread(target=d.run, daemon=True) for d in devices]
    for t in threads:
        t.start()
    killed_at = None
    if scenario.restart:
        # wait until round 3 is open and half of its good updates are in, then drop everything
        good = sum(1 for d in devices if fate(seed, 3, d.name, scenario) == "ok")
        while time.monotonic() - started < 300:
            with ledger.lock:
                in_round_3 = sum(1 for life, r, _ in ledger.acks if life == 0 and r == 3)
            if in_round_3 >= max(1, good // 2) or not engine.is_alive():
                break
            time.sleep(0.01)
        coord.server.stop(None)       # no grace: calls in flight die with it, nobody is told anything
        coord.engine.stop(final=False)  # the old engine must not go on to another round
        engine.join(30)
        killed_at = time.monotonic()
        life_box["life"] = 1
        coord, engine = coordinator(True)
    engine.join(600)
    stop.set()
    for t in threads:
        t.join(10)
    coord.stop()
    seconds = time.monotonic() - started

    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["round"]] = row  # a round redone after the restart has one row: the life that closed it
    resumed_from = coord.engine.resumed_from.round if killed_at is not None else rounds  # later rounds were closed by the second life
    closed_in = {r: (1 if r > resumed_from else 0) for r in rows}
    lost = sum(1 for life, r, cid in ledger.acks if r in rows and life == closed_in[r] and cid not in rows[r]["client_ids"])
    redone = sum(1 for life, r, _ in ledger.acks if life == 0 and r > resumed_from)
    from safetensors.torch import load_file

    checkpoints = sorted((run_dir / "checkpoints").glob("round-*"))
    bad_stored = sum(1 for ck in checkpoints if not all(torch.isfinite(t).all() for t in load_file(str(ck / "state.safetensors")).values()))
    overhead = (ledger.first_ack_after.get(1, float("nan")) - killed_at) if killed_at is not None else 0.0
    return {
        "name": scenario.name,
        "rounds_completed": len(rows),
        "updates_accepted": len(ledger.acks),
        "accepted_updates_lost": lost,
        "redone_after_restart": redone,
        "bad_updates_sent": ledger.bad_sent,
        "bad_updates_refused": ledger.bad_refused,
        "bad_rounds_stored": bad_stored,
        "restart_overhead_seconds": round(overhead, 2),
        "seconds": round(seconds, 1),
        "unexpected_errors": len(ledger.other_errors),
        "errors": ledger.other_errors[:10],
    }


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
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the coordinator's warnings (refused updates, silent devices)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(message)s")
    if args.rounds < 4 and any(SCENARIOS[s](args).restart for s in args.scenarios):
        parser.error("--rounds: the restart happens in round 3; give at least 4")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows.append(run_scenario(SCENARIOS[name](args), args.clients, args.rounds, args.seed, Path(tmp)))
    errors = {r["name"]: r.pop("errors") for r in rows}
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))
    result = {"rows": rows, "clients": args.clients, "rounds": args.rounds, "dropout": args.dropout, "bad": args.bad, "seed": args.seed,
              "client_timeout_s": CLIENT_TIMEOUT_S}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, messages in errors.items():
        for message in messages:
            print(f"{name}: unexpected: {message}", file=sys.stderr)
    failed = [r["name"] for r in rows if r["accepted_updates_lost"] or r["bad_rounds_stored"] or r["bad_updates_sent"] != r["bad_updates_refused"]]
    if failed:
        print(f"FAILED: {', '.join(failed)} lost an accepted update, stored a bad round or accepted a bad update", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
