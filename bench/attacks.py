"""Attacks on a live coordinator (gRPC on 127.0.0.1, in this process) and the defences that
stop them: one row per attack, each with the rule that says whether the defence held.

    python bench/attacks.py [--quick] [--only NAME ...] [--out FILE]

The coordinator runs in this process (its gRPC server, guard and round engine threads), so
``coordinator_peak_mib`` is this process's peak RSS while the attack ran (psutil, sampled every
20 ms): coordinator and attacker together, an upper bound on the coordinator's own.
``honest_round_seconds`` is, for attacks on calls, the slowest honest Heartbeat made from a
separate connection while the attack ran; for attacks on rounds, the honest round's wall time
(first task fetched to round closed); for resumed-stall, the scenario's wall seconds per round.
``accepted``/``refused`` count the attacker's calls or updates (identities: its registrations and
streams; resumed-stall: the bad updates). ``global_change_cosine_with_attacker`` is set for the
weight takeover only.

Rules (``held``):
- stalled-unary-calls: 100 Register calls (plus 10 with a squatter's credentials) that never
  send their request; every honest call < 2 s, and every stalled call ended by the coordinator
  within request_timeout_s (3 s) + 5 s.
- short-call-memory: 20000 (quick: 4000) short authenticated calls (Heartbeat/FetchTask);
  RSS growth after them < 50 MiB and the guard tracks no call afterwards.
- weight-takeover: an attacker registers and claims 10^6 examples against three honest ~100
  example clients, its change orthogonal to theirs; cosine(global change, attacker change) < 0.9.
- one-update-destroys: one float32-max update among three honest ones; the round is not
  refused, the honest updates are aggregated, the attacker's is not, and the eval is finite.
- colluding-overflow: +max and -max updates from two colluders among two honest ones; the same.
- run-folder-reuse: a new Coordinator on the folder of a finished run is refused (RunDirError)
  and the folder's bytes are unchanged.
- split-unchecked-allocation: a SplitStep declaring a 256 MiB tensor for round 99 and for the
  open round is refused (FAILED_PRECONDITION / INVALID_ARGUMENT), RSS grows < 128 MiB, and an
  honest split session beside it completes its steps.
- failed-auth-invisible: 12 wrong enrollment secrets; each one refused, from the 5th on each
  waits >= 0.18 s, exactly one log line names them (with the address), no secret is logged, and
  the right secret still registers in < 1 s.
- huge-tensor-name: a 10 MB tensor name with line breaks; refused INVALID_ARGUMENT, status
  details < 1000 characters, every log line < 2000 characters and on one line.
- one-byte-frames: a 64 KiB update in one-byte frames; refused ("payload frames") in < 2 s
  after fewer than 65536 frames read, and the same update in ordinary chunks accepted.
- stolen-token-other-cert: alice's token used over mallory's mTLS certificate; Heartbeat and
  FetchTask refused UNAUTHENTICATED, alice's own call still works.
- identities: on the default server settings (24 stream slots, 3 per client, a party's budget
  max(3, 24 // 4) = 6, max_clients_per_credential 4) with mutual TLS, erin registers and round 1
  opens for her; mallory, one certificate, registers 8 names and then "erin", and opens 3 idle
  streams (2 task long-polls, 1 silent upload) on every name it got. Held: exactly 4 of its names
  accepted, the other 4 RESOURCE_EXHAUSTED and "erin" FAILED_PRECONDITION; at most 6 of its
  streams admitted, the rest RESOURCE_EXHAUSTED; erin's task fetch and update are accepted and
  her round closes meanwhile; her id is "erin", again when she registers anew, and the registry
  holds erin and mallory's 4 names only.
- control-variate-growth: SCAFFOLD, 4 rounds, outlier rule off; an attacker's control change
  each round is 0.9 x 10^4 times the largest value it was sent (the server's control variate
  included), two honest clients' are ~0.01. Held: every round closes with a finite eval and the
  server's control variate never exceeds 10^4 times the model's largest value.
- huge-header-dims: a selected client's update whose tensor header declares 1,000,000
  dimensions; refused INVALID_ARGUMENT naming the dimensions in < 2 s (the honest probe < 2 s,
  details < 1000 characters), and the same update with an honest header accepted.
- registration-drain: per-device secrets; one enrolled party re-registers its name as fast as one
  connection allows for 1 s, then on while a fleet of 120 devices (quick: 60), each with its own
  secret, arrives at the shared rate (20 a second, the default). Held: at least 80% of the fleet
  registered while the attacker made more than 10 attempts per device.
- resumed-stall: bench/faults.py's all-faults scenario once (20 devices, 6 rounds; quick: 8
  devices, 4 rounds): 20 % dropouts, 10 % bad updates, the coordinator killed mid-round 3 and
  resumed from its run folder. Held: every configured round completed within faults.py's time
  limit (180 s), 0 accepted updates lost, 0 bad rounds stored and no bad update accepted.

Exit status 1 when a row does not hold (a row that raised counts as not held).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harnesses: live_coordinator, fetch_task, push_update, save_llama
sys.path.insert(0, str(ROOT / "bench"))  # sibling benches (faults), also when this file is loaded from a test

import grpc  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from fedtune.config import RunConfig  # noqa: E402
from fedtune.coordinator.app import Coordinator, RunDirError  # noqa: E402
from fedtune.coordinator.global_model import FixedTensors  # noqa: E402
from fedtune.coordinator.guard import credentials  # noqa: E402
from fedtune.protocol import fedtune_pb2 as pb  # noqa: E402
from fedtune.protocol import fedtune_pb2_grpc as pb_grpc  # noqa: E402
from fedtune.protocol.tensors import make_header  # noqa: E402

from conftest import fetch_task, live_coordinator, push_update  # noqa: E402

MiB = 1 << 20
FMAX = torch.finfo(torch.float32).max
REGISTER = "/fedtune.v1.Coordinator/Register"
HEARTBEAT = "/fedtune.v1.Coordinator/Heartbeat"
ATTACKS = ["stalled-unary-calls", "short-call-memory", "weight-takeover", "one-update-destroys", "colluding-overflow",
           "control-variate-growth", "run-folder-reuse", "split-unchecked-allocation", "failed-auth-invisible", "huge-tensor-name", "one-byte-frames",
           "stolen-token-other-cert", "identities", "huge-header-dims", "registration-drain", "resumed-stall"]


# ---------------------------------------------------------------------------------- measuring


def _rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRss:
    """This process's peak RSS while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return round(self.peak / MiB, 1)


class HonestProbe:
    """An honest client on its own connection making a Heartbeat every 0.2 s while the block
    runs (at most 600 calls); ``max_s`` is the slowest one, a failed call counts 10 s."""

    def __init__(self, port: int, stub) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        reply = stub.Register(pb.RegisterRequest(name="honest-probe", num_examples=1), timeout=10)
        self.beat = pb.HeartbeatRequest(client_id=reply.client_id, token=reply.token)
        self.metadata = credentials(reply.client_id, reply.token)
        self.seconds: list[float] = []

    def once(self) -> float:
        started = time.monotonic()
        try:
            self.stub.Heartbeat(self.beat, timeout=10, metadata=self.metadata)
            took = time.monotonic() - started
        except grpc.RpcError:
            took = 10.0
        self.seconds.append(took)
        return took

    def __enter__(self):
        self._stop = threading.Event()

        def loop():
            for _ in range(600):
                if self._stop.wait(0.2):
                    return
                self.once()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)
        self.channel.close()

    @property
    def max_s(self) -> float:
        return round(max(self.seconds), 3) if self.seconds else None


def _row(name, *, honest_s, peak, accepted, refused, held, cosine=None, note=""):
    return {"name": name, "honest_round_seconds": honest_s, "coordinator_peak_mib": peak.mib if isinstance(peak, PeakRss) else peak,
            "accepted": accepted, "refused": refused, "global_change_cosine_with_attacker": cosine, "held": bool(held), "note": note}


def _config(tmp: Path, *, min_clients: int = 5, rounds: int = 1, **server) -> RunConfig:
    config = RunConfig()
    config.federation.rounds, config.federation.min_clients = rounds, min_clients  # min_clients 5: no round opens
    config.federation.strategy = "fedavg"
    config.run_dir = str(tmp / "run")
    for key, value in server.items():
        setattr(config.server, key, value)
    return config


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def _code(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


# ---------------------------------------------------------------------------------- call attacks


class Stalled:
    """Calls that send their headers and never their request message (stream-unary with a
    silent request stream: to the server, a unary call whose request never arrives)."""

    def __init__(self, channel) -> None:
        self.channel, self.release, self.calls = channel, threading.Event(), []

    def _never(self):
        self.release.wait(60)
        yield from ()

    def open(self, method, n, metadata=()):
        call = self.channel.stream_unary(method, request_serializer=lambda m: m, response_deserializer=lambda b: b)
        opened = [call.future(self._never(), timeout=60, metadata=metadata) for _ in range(n)]
        self.calls += opened
        return opened

    def close(self):
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


def stalled_unary_calls(tmp: Path, quick: bool) -> dict:
    config = _config(tmp, request_timeout_s=3.0)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        squatter = stub.Register(pb.RegisterRequest(name="squatter", num_examples=1), timeout=10)
        probe = HonestProbe(coordinator.port, stub)
        attacker = Stalled(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}"))
        try:
            with PeakRss() as peak, probe:
                calls = attacker.open(REGISTER, 100) + attacker.open(HEARTBEAT, 10, metadata=credentials(squatter.client_id, squatter.token))
                time.sleep(1.0)
                for i in range(5):  # honest registrations too, on the attacker's shared connection's twin
                    started = time.monotonic()
                    _code(lambda: stub.Register(pb.RegisterRequest(name=f"late-{i}", num_examples=1), timeout=10))
                    probe.seconds.append(time.monotonic() - started)
                ended = _wait_for(lambda: all(f.done() for f in calls), 3.0 + 5.0)
        finally:
            attacker.close()
        codes = [f.exception().code().name if f.done() and f.exception() else ("OK" if f.done() else "OPEN") for f in calls]
        coordinator.engine.stop()
    accepted = sum(c == "OK" for c in codes)
    return _row("stalled-unary-calls", honest_s=probe.max_s, peak=peak, accepted=accepted, refused=len(codes) - accepted - codes.count("OPEN"),
                held=probe.max_s < 2.0 and ended and accepted == 0, note=f"{len(calls)} stalled calls; still open at the deadline: {codes.count('OPEN')}")


def short_call_memory(tmp: Path, quick: bool) -> dict:
    n = 4000 if quick else 20_000
    with live_coordinator(_config(tmp), global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        metadata = credentials(c.client_id, c.token)
        beat = pb.HeartbeatRequest(client_id=c.client_id, token=c.token)
        fetch = pb.FetchTaskRequest(client_id=c.client_id, token=c.token, wait_seconds=0)
        probe = HonestProbe(coordinator.port, stub)
        for _ in range(300):  # warm up gRPC's and Python's caches
            stub.Heartbeat(beat, timeout=10, metadata=metadata)
            list(stub.FetchTask(fetch, timeout=10, metadata=metadata))
        ok = bad = 0
        with PeakRss() as peak, probe:
            before = _rss()
            for i in range(n):
                try:
                    if i % 4:
                        stub.Heartbeat(beat, timeout=10, metadata=metadata)
                    else:
                        list(stub.FetchTask(fetch, timeout=10, metadata=metadata))
                    ok += 1
                except grpc.RpcError:
                    bad += 1
            grown = (_rss() - before) / MiB
        clean = _wait_for(lambda: coordinator.guard.tracked_calls == 0 and coordinator.guard.open_streams == 0, 5.0)
        coordinator.engine.stop()
    return _row("short-call-memory", honest_s=probe.max_s, peak=peak, accepted=ok, refused=bad, held=grown < 50 and clean,
                note=f"{n} calls, RSS grew {grown:.1f} MiB")


# ---------------------------------------------------------------------------------- round attacks


class Scored(FixedTensors):
    """Fixed tensors whose evaluation, like a real loss, stops being finite for absurd weights."""

    def evaluate(self, state, base_delta=None):
        return {"eval_loss": float(sum((t.float() ** 2).sum() for t in state.values() if t.is_floating_point()))}


def _start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, generator=g), "v": torch.randn(8, 8, generator=g)}


def _flat(tensors) -> torch.Tensor:
    return torch.cat([tensors[n].double().flatten() for n in sorted(tensors)])


def _direction(seed: int, norm: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(t.shape, generator=g) for n, t in _start().items()}
    size = float(_flat(d).norm())
    return {n: t * (norm / size) for n, t in d.items()}


def _cosine(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def network_rounds(tmp: Path, clients: dict[str, tuple[int, object]], rounds: int = 1, **federation):
    """``rounds`` rounds over loopback: each client (name -> (claimed examples, start -> tensors))
    registers with its claim, then fetches its task and pushes, round after round; returns (the
    rows of metrics.jsonl, state before, state after, push answers by name (the
    last round's), seconds, peak, run folder)."""
    config = _config(tmp, min_clients=len(clients), rounds=rounds)
    config.federation.round_timeout_s = 60.0
    for key, value in federation.items():
        setattr(config.federation, key, value)
    with PeakRss() as peak, live_coordinator(config, global_model=Scored(_start())) as (coordinator, stub, engine):
        ids = {name: stub.Register(pb.RegisterRequest(name=name, num_examples=claim), timeout=10) for name, (claim, _) in clients.items()}
        before = {n: t.clone() for n, t in coordinator.engine.state.items()}
        answers: dict[str, str] = {}
        started = time.monotonic()

        def client(name):
            reply, (claim, make), done = ids[name], clients[name], 0
            while done < rounds:
                header, state = fetch_task(stub, reply.client_id, reply.token)
                if header.status == pb.TASK_STATUS_DONE:
                    return
                if header.status != pb.TASK_STATUS_TRAIN:
                    continue
                try:
                    got = push_update(stub, reply.client_id, reply.token, header.round, make(state), num_examples=claim)
                    answers[name] = "accepted" if got.accepted else "refused"
                except grpc.RpcError as exc:
                    answers[name] = f"refused {exc.code().name}"
                done += 1

        threads = [threading.Thread(target=client, args=(name,), daemon=True) for name in clients]
        [t.start() for t in threads]
        [t.join(60 * rounds) for t in threads]
        engine.join(60)
        seconds = round(time.monotonic() - started, 3)
        after = {n: t.clone() for n, t in coordinator.engine.state.items()}
        run_dir = Path(coordinator.engine.run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, before, after, answers, seconds, peak, run_dir


def network_round(tmp: Path, clients: dict[str, tuple[int, object]], **federation):
    """One round of ``network_rounds``; its metrics row ({} when none was written)."""
    rows, before, after, answers, seconds, peak, run_dir = network_rounds(tmp, clients, 1, **federation)
    train = [r for r in rows if r.get("round") == 1]
    return (train[-1] if train else {}), before, after, answers, seconds, peak, run_dir


def _moved(by):
    return lambda start: {n: start[n] + by[n] for n in by}


def weight_takeover(tmp: Path, quick: bool) -> dict:
    honest = _direction(1)
    attack = _direction(2)
    a = _flat(attack)
    attack = {n: t - float(_flat(honest) @ a) * honest[n] for n, t in attack.items()}  # orthogonal to the honest change
    attack = {n: t / float(_flat(attack).norm()) for n, t in attack.items()}
    clients = {"attacker": (1_000_000, _moved(attack))}
    for i, claim in enumerate((90, 100, 110)):
        wiggle = _direction(10 + i, 0.01)
        clients[f"h{i}"] = (claim, _moved({n: honest[n] + wiggle[n] for n in honest}))
    row, before, after, answers, seconds, peak, run_dir = network_round(tmp, clients)
    cosine = round(_cosine(_flat(after) - _flat(before), _flat(attack)), 4)
    accepted = int(answers.get("attacker") == "accepted")
    weight_takeover.run_dir = run_dir  # the finished run's folder, reused by run-folder-reuse
    # control: the same round with the defence off (weighting "claimed"), to show the attack is real
    _, before_c, after_c, _, _, _, _ = network_round(tmp / "control", clients, weighting="claimed")
    control = _cosine(_flat(after_c) - _flat(before_c), _flat(attack))
    return _row("weight-takeover", honest_s=seconds, peak=peak, accepted=accepted, refused=1 - accepted, cosine=cosine,
                held=cosine < 0.9 and bool(row), note=f"capped_examples={row.get('capped_examples')} round_refused={row.get('round_refused')!r}; "
                                                      f"control with weighting=claimed: cosine {control:.4f}")


def _absurd(value: float):
    return lambda start: {n: torch.full_like(t, value) for n, t in start.items()}


def _outlier_round(name: str, tmp: Path, attackers: dict[str, float], honest_n: int) -> dict:
    moves = {f"h{i}": _direction(30 + i, 0.5) for i in range(honest_n)}
    clients = {a: (10, _absurd(v)) for a, v in attackers.items()}
    clients.update({n: (10, _moved(m)) for n, m in moves.items()})
    row, before, after, answers, seconds, peak, _ = network_round(tmp, clients)
    expected = {n: before[n] + sum(m[n] for m in moves.values()) / honest_n for n in before}
    honest_aggregated = all(torch.allclose(after[n], expected[n], atol=1e-5) for n in before)
    finite = row.get("eval_loss") is not None and math.isfinite(row["eval_loss"]) and all(bool(torch.isfinite(t).all()) for t in after.values())
    accepted_by_push = sum(answers.get(a) == "accepted" for a in attackers)
    left_out = int(row.get("outlier_updates", 0))
    # an attacker's update counts as accepted only if it reached the aggregate
    in_aggregate = max(0, accepted_by_push - left_out)
    held = bool(row) and "round_refused" not in row and honest_aggregated and finite and in_aggregate == 0
    return _row(name, honest_s=seconds, peak=peak, accepted=in_aggregate, refused=len(attackers) - in_aggregate, held=held,
                note=f"pushes {answers}; outlier_updates={left_out}; eval_loss={row.get('eval_loss')}; round_refused={row.get('round_refused')!r}")


def one_update_destroys(tmp: Path, quick: bool) -> dict:
    return _outlier_round("one-update-destroys", tmp, {"attacker": FMAX}, 3)


def colluding_overflow(tmp: Path, quick: bool) -> dict:
    return _outlier_round("colluding-overflow", tmp, {"plus": FMAX, "minus": -FMAX}, 2)


def control_variate_growth(tmp: Path, quick: bool) -> dict:
    """SCAFFOLD, 4 rounds: an attacker sends, every round, a control change 0.9 x 10^4 times the
    largest value it was sent, the server's control variate included (what a ceiling scaled by
    everything sent admits); two honest clients send small changes. The outlier rule is off
    (outlier_factor 0), so the value ceiling alone is measured."""
    rounds = 4
    g = torch.Generator().manual_seed(7)

    def honest(state):
        out = {n: state[n] + 0.01 * torch.randn(state[n].shape, generator=g) for n in _start()}
        out.update({f"scaffold.dc/{n}": 0.01 * torch.randn(state[n].shape, generator=g) for n in _start()})
        return out

    def attacker(state):
        largest = max(1.0, max(float(t.abs().max()) for t in state.values()))
        out = {n: state[n].clone() for n in _start()}
        out.update({f"scaffold.dc/{n}": torch.full_like(state[n], 0.9e4 * largest) for n in _start()})
        return out

    clients = {"attacker": (10, attacker), "h0": (10, honest), "h1": (10, honest)}
    rows, before, after, answers, seconds, peak, _ = network_rounds(tmp, clients, rounds, strategy="scaffold", outlier_factor=0.0)
    trained = [r for r in rows if "clients" in r and not r.get("evaluation_only")]
    control = max(float(t.abs().max()) for n, t in after.items() if n.startswith("scaffold.c/"))
    ceiling = 1e4 * max(1.0, max(float(t.abs().max()) for n, t in before.items() if not n.startswith("scaffold.")))
    left_out = sum(int(r.get("outlier_updates", 0)) for r in trained)
    finite = all(math.isfinite(r.get("eval_loss", math.nan)) for r in trained) and all(bool(torch.isfinite(t).all()) for t in after.values())
    held = len(trained) == rounds and control <= ceiling and finite
    return _row("control-variate-growth", honest_s=round(seconds / rounds, 3), peak=peak, accepted=rounds - left_out, refused=left_out, held=held,
                note=f"{rounds} rounds: the server's largest control value {control:.3g} (the model's ceiling {ceiling:.3g}); the attacker's "
                     f"updates left out in {left_out} of {rounds} rounds; eval finite: {finite}")


def _snapshot(folder: Path) -> dict:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = Path(path).read_bytes()
    return out


def run_folder_reuse(tmp: Path, quick: bool) -> dict:
    run_dir = getattr(weight_takeover, "run_dir", None)
    if run_dir is None:  # run one honest round to get a finished run folder
        network_round(tmp / "first", {f"h{i}": (10, _moved(_direction(90 + i, 0.1))) for i in range(2)})
        run_dir = tmp / "first" / "run"
    before = _snapshot(run_dir)
    config = _config(run_dir.parent)
    config.run_dir = str(run_dir)
    with PeakRss() as peak:
        try:
            coordinator = Coordinator(config, global_model=Scored(_start()))
            coordinator.stop()
            refused, message = False, ""
        except RunDirError as exc:
            refused, message = True, str(exc)
    unchanged = _snapshot(run_dir) == before
    return _row("run-folder-reuse", honest_s=None, peak=peak, accepted=int(not refused), refused=int(refused), held=refused and unchanged,
                note=f"folder unchanged: {unchanged}; {message[:120]}")


# ---------------------------------------------------------------------------------- split


def split_unchecked_allocation(tmp: Path, quick: bool) -> dict:
    from fedtune.protocol.tensors import encode_tensor
    from fedtune.split.wire import Receiver, message_frames

    from conftest import save_llama
    from test_split_e2e import HIDDEN, _split_config

    model = save_llama(tmp / "llama3", HIDDEN, 256, 3)
    config = _split_config(tmp, model, rounds=1, head="server")
    config.federation.min_clients = 2
    config.split.act_codec = config.split.grad_codec = "fp32"
    config.model.labels = ["negative", "positive"]
    config.training.batch_size, config.model.max_length = 8, 32
    notes, codes = [], []
    started = None
    with live_coordinator(config) as (coordinator, stub, engine):
        a, b = [(r.client_id, r.token) for r in (stub.Register(pb.RegisterRequest(name=n, num_examples=10), timeout=30) for n in ("a", "b"))]
        tasks = {}
        threads = [threading.Thread(target=lambda who=who: tasks.__setitem__(who, fetch_task(stub, *who)), daemon=True) for who in (a, b)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        started = time.monotonic()
        mask = torch.ones(2, 4, dtype=torch.uint8)

        def step(who, number):
            msg = pb.SplitHeader(client_id=who[0], token=who[1], round=1, step=number, kind=pb.SPLIT_KIND_ACTIVATIONS)
            tensors = {"hidden": torch.randn(8, HIDDEN), "mask": mask, "labels": torch.tensor([0, 1])}
            return message_frames(msg, [encode_tensor(n, t) for n, t in tensors.items()])

        out: queue.Queue = queue.Queue()
        call = stub.SplitStep(iter(lambda: out.get(timeout=30), None), timeout=60, metadata=credentials(*b))
        rx = Receiver()
        [out.put(f) for f in step(b, 0)]
        honest_ok = rx.read(call)[0].kind == pb.SPLIT_KIND_GRADIENTS
        rows = 256 * MiB // (4 * HIDDEN)
        declared = pb.SplitFrame(tensor=pb.TensorHeader(name="hidden", dtype=pb.DTYPE_FLOAT32, shape=[rows, HIDDEN], encoding=pb.ENCODING_RAW,
                                                        payload_bytes=rows * HIDDEN * 4))
        with PeakRss() as peak:
            for round_number in (99, 1):
                attack = [pb.SplitFrame(header=pb.SplitHeader(client_id=a[0], token=a[1], round=round_number, kind=pb.SPLIT_KIND_ACTIVATIONS, num_tensors=3)),
                          declared, pb.SplitFrame(chunk=b"\0" * 4096)]
                codes.append(_code(lambda: list(stub.SplitStep(iter(attack), timeout=30, metadata=credentials(*a)))))
        [out.put(f) for f in step(b, 1)]
        reply, got, _ = rx.read(call)
        honest_ok = honest_ok and reply.step == 1 and list(got["grad"].shape) == [8, HIDDEN]
        out.put(None)
        honest_ok = honest_ok and rx.read(call) is None
        honest_s = round(time.monotonic() - started, 3)
        engine_stop = getattr(coordinator.engine, "stop", None)
        if engine_stop:
            engine_stop()
    grown = (peak.peak - peak.start) / MiB
    refused = sum(c != "OK" for c in codes)
    notes.append(f"codes {codes}; RSS grew {grown:.1f} MiB")
    held = codes == ["FAILED_PRECONDITION", "INVALID_ARGUMENT"] and grown < 128 and honest_ok
    return _row("split-unchecked-allocation", honest_s=honest_s, peak=peak, accepted=len(codes) - refused, refused=refused, held=held,
                note="; ".join(notes) + f"; honest session completed: {honest_ok}")


# ---------------------------------------------------------------------------------- auth, logs, frames


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _logged():
    handler, logger = Lines(), logging.getLogger("fedtune")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    return handler, logger


def failed_auth_invisible(tmp: Path, quick: bool) -> dict:
    config = _config(tmp, auth_delay_max_s=0.2)
    config.server.enrollment_secret = "correct-horse-battery"
    handler, logger = _logged()
    try:
        with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
            seconds, codes = [], []
            with PeakRss() as peak:
                for i in range(12):
                    started = time.monotonic()
                    codes.append(_code(lambda: stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret=f"guess-{i}"), timeout=10)))
                    seconds.append(time.monotonic() - started)
                started = time.monotonic()
                right = _code(lambda: stub.Register(pb.RegisterRequest(name="x", num_examples=1, enrollment_secret="correct-horse-battery"), timeout=10))
                honest_s = round(time.monotonic() - started, 3)
            coordinator.engine.stop()
    finally:
        logger.removeHandler(handler)
    lines = [m for m in handler.messages if "enrollment secret" in m]
    text = "\n".join(handler.messages)
    leaked = "guess-" in text or "correct-horse" in text
    held = (codes == ["UNAUTHENTICATED"] * 12 and min(seconds[4:]) >= 0.18 and len(lines) == 1 and "127.0.0.1" in lines[0]
            and not leaked and right == "OK" and honest_s < 1.0)
    return _row("failed-auth-invisible", honest_s=honest_s, peak=peak, accepted=codes.count("OK"), refused=12 - codes.count("OK"), held=held,
                note=f"guess seconds {[round(s, 2) for s in seconds]}; log lines {len(lines)}; secret in logs: {leaked}")


def _open_round(tmp, tensors):
    return live_coordinator(_config(tmp, min_clients=1), global_model=FixedTensors(tensors))


def huge_tensor_name(tmp: Path, quick: bool) -> dict:
    handler, logger = _logged()
    try:
        with _open_round(tmp, {"w": torch.zeros(4)}) as (coordinator, stub, _):
            c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
            header, state = fetch_task(stub, c.client_id, c.token)
            probe = HonestProbe(coordinator.port, stub)
            name = "n\n" * (5 * MiB)  # 10 MB, with line breaks to forge log lines
            with PeakRss() as peak, probe:
                try:
                    push_update(stub, c.client_id, c.token, header.round, {name: state["w"]})
                    code, details = "OK", ""
                except grpc.RpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                probe.once()
            coordinator.engine.stop()
    finally:
        logger.removeHandler(handler)
    records = [m for m in handler.messages if "rejected update" in m]
    clean_logs = all(len(m) < 2000 and "\n" not in m for m in handler.messages)
    held = code == "INVALID_ARGUMENT" and len(details) < 1000 and clean_logs
    return _row("huge-tensor-name", honest_s=probe.max_s, peak=peak, accepted=int(code == "OK"), refused=int(code != "OK"), held=held,
                note=f"{code}; details {len(details)} chars; {len(records)} 'rejected update' lines, longest log line "
                     f"{max((len(m) for m in handler.messages), default=0)} chars")


def _hand_push(tmp: Path, tensor: torch.Tensor, body) -> tuple:
    """One selected client's PushUpdate built by hand: its update header, then the frames
    ``body(state)`` yields for the task's tensor ``w``; then the same update sent the ordinary
    way. Returns (code, details, seconds, ordinary accepted, probe, peak)."""
    with _open_round(tmp, {"w": tensor}) as (coordinator, stub, _):
        c = stub.Register(pb.RegisterRequest(name="c", num_examples=1), timeout=10)
        header, state = fetch_task(stub, c.client_id, c.token)
        probe = HonestProbe(coordinator.port, stub)

        def frames():
            yield pb.Frame(update=pb.UpdateHeader(client_id=c.client_id, token=c.token, round=header.round, num_examples=1, num_tensors=1))
            yield from body(state)

        with PeakRss() as peak, probe:
            started = time.monotonic()
            try:
                stub.PushUpdate(frames(), timeout=30, metadata=credentials(c.client_id, c.token))
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            took = time.monotonic() - started
            probe.once()
        try:
            ordinary = push_update(stub, c.client_id, c.token, header.round, state).accepted
        except grpc.RpcError:
            ordinary = False
        coordinator.engine.stop()
    return code, details, took, ordinary, probe, peak


def huge_header_dims(tmp: Path, quick: bool) -> dict:
    """A selected client's update whose one tensor header declares a million dimensions (1 MB of
    varints): refused on the header, before any size is computed from it."""
    def body(state):
        lying = make_header("w", state["w"])
        lying.shape[:] = [2] * 1_000_000
        lying.payload_bytes = 16
        yield pb.Frame(tensor=lying)
        yield pb.Frame(chunk=state["w"].numpy().tobytes())

    code, details, took, ordinary, probe, peak = _hand_push(tmp, torch.zeros(4), body)
    held = code == "INVALID_ARGUMENT" and "dimensions" in details and took < 2.0 and probe.max_s < 2.0 and len(details) < 1000 and ordinary
    return _row("huge-header-dims", honest_s=probe.max_s, peak=peak, accepted=int(code == "OK"), refused=int(code != "OK"), held=held,
                note=f"{code} after {took:.3f} s: {details[:120]!r}; the same update with an honest header accepted: {ordinary}")


def one_byte_frames(tmp: Path, quick: bool) -> dict:
    sent = [0]

    def body(state):
        yield pb.Frame(tensor=make_header("w", state["w"]))
        for byte in state["w"].numpy().tobytes():
            sent[0] += 1
            yield pb.Frame(chunk=bytes([byte]))

    code, details, took, ordinary, probe, peak = _hand_push(tmp, torch.zeros(16384), body)  # 64 KiB
    held = code == "INVALID_ARGUMENT" and "payload frames" in details and took < 2.0 and sent[0] < 16384 * 4 and ordinary
    return _row("one-byte-frames", honest_s=probe.max_s, peak=peak, accepted=int(code == "OK"), refused=int(code != "OK"), held=held,
                note=f"{code} after {took:.2f} s and {sent[0]} one-byte frames; ordinary chunks accepted: {ordinary}")


def stolen_token_other_cert(tmp: Path, quick: bool) -> dict:
    from fedtune.certs import make_test_pki
    from fedtune.transport import make_channel

    pki = make_test_pki(tmp / "pki", ["localhost", "127.0.0.1"], ["alice", "mallory"])
    config = _config(tmp, address="127.0.0.1:0", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca_cert))
    coordinator = Coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)}))
    port = coordinator.start()
    channels = {who: make_channel(f"localhost:{port}", tls_ca=str(pki.ca_cert), tls_cert=str(pki.clients[who][0]), tls_key=str(pki.clients[who][1]))
                for who in ("alice", "mallory")}
    try:
        alice, mallory = (pb_grpc.CoordinatorStub(channels[who]) for who in ("alice", "mallory"))
        reply = alice.Register(pb.RegisterRequest(name="alice", num_examples=1), timeout=10)
        beat = pb.HeartbeatRequest(client_id=reply.client_id, token=reply.token)
        meta = credentials(reply.client_id, reply.token)
        with PeakRss() as peak:
            codes = [_code(lambda: mallory.Heartbeat(beat, timeout=10, metadata=meta)),
                     _code(lambda: list(mallory.FetchTask(pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token), timeout=10, metadata=meta)))]
            started = time.monotonic()
            own = _code(lambda: alice.Heartbeat(beat, timeout=10, metadata=meta))
            honest_s = round(time.monotonic() - started, 3)
    finally:
        for channel in channels.values():
            channel.close()
        coordinator.stop()
    held = codes == ["UNAUTHENTICATED", "UNAUTHENTICATED"] and own == "OK"
    return _row("stolen-token-other-cert", honest_s=honest_s, peak=peak, accepted=codes.count("OK"), refused=2 - codes.count("OK"), held=held,
                note=f"mallory got {codes}; alice got {own}")


# ---------------------------------------------------------------------------------- identities, restarts


def identities(tmp: Path, quick: bool) -> dict:
    """One party (mallory's certificate) against an honest device (erin's), on the default
    server settings: 24 stream slots, 3 per client, max_clients_per_credential 4."""
    from fedtune.certs import make_test_pki
    from fedtune.transport import make_channel

    pki = make_test_pki(tmp / "pki", ["localhost", "127.0.0.1"], ["erin", "mallory"])
    config = _config(tmp, min_clients=1, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca_cert))
    config.federation.round_timeout_s = 60.0
    names = [f"m{i}" for i in range(8)]
    register_codes: dict[str, str] = {}
    stream_calls: list = []
    erin_codes: list[str] = []
    release = threading.Event()
    still_admitted = None

    def idle():
        release.wait(60)
        yield from ()

    with PeakRss() as peak, live_coordinator(config, global_model=Scored(_start())) as (coordinator, _, engine):
        channels = {who: make_channel(f"localhost:{coordinator.port}", tls_ca=str(pki.ca_cert), tls_cert=str(pki.clients[who][0]),
                                      tls_key=str(pki.clients[who][1])) for who in ("erin", "mallory")}
        erin_stub, mallory = (pb_grpc.CoordinatorStub(channels[who]) for who in ("erin", "mallory"))
        try:
            erin = erin_stub.Register(pb.RegisterRequest(name="erin", num_examples=10), timeout=10)
            opened = _wait_for(lambda: erin.client_id in coordinator.engine.open_tasks(), 10.0)  # round 1 selects erin alone
            got = {}
            for name in names + ["erin"]:  # 8 names of its own, then the honest device's
                try:
                    got[name] = mallory.Register(pb.RegisterRequest(name=name, num_examples=10), timeout=10)
                    register_codes[name] = "OK"
                except grpc.RpcError as exc:
                    register_codes[name] = exc.code().name
            party = next((r.credential for r in coordinator.engine.registry.all() if r.client_id in got), None)  # "cert:<fingerprint>"
            for reply in got.values():  # every name it got: 2 idle task long-polls and 1 upload that never sends
                meta = credentials(reply.client_id, reply.token)
                poll = pb.FetchTaskRequest(client_id=reply.client_id, token=reply.token, wait_seconds=60)
                stream_calls += [mallory.FetchTask(poll, timeout=90, metadata=meta) for _ in range(2)]
                stream_calls.append(mallory.PushUpdate.future(idle(), timeout=90, metadata=meta))
            guard = coordinator.guard
            _wait_for(lambda: guard.party_streams(party) + sum(c.done() for c in stream_calls) >= len(stream_calls), 5.0)
            admitted = guard.party_streams(party)
            stream_codes = [c.code().name for c in stream_calls if c.done()]
            # the honest device's round, while mallory's streams are open
            started = time.monotonic()
            try:
                header, state = fetch_task(erin_stub, erin.client_id, erin.token)
                still_admitted = guard.party_streams(party)
                erin_codes.append("OK" if header.status == pb.TASK_STATUS_TRAIN else pb.TaskStatus.Name(header.status))
                moved = _moved(_direction(5, 0.1))(state)
                erin_codes.append("OK" if push_update(erin_stub, erin.client_id, erin.token, header.round, moved).accepted else "not accepted")
            except grpc.RpcError as exc:
                erin_codes.append(exc.code().name)
            closed = _wait_for(lambda: any(r.get("round") == 1 for r in coordinator.engine.history), 30.0)
            honest_s = round(time.monotonic() - started, 3)
            # a restarted erin registers again: still "erin", never "erin-2"
            again = _code(lambda: erin_stub.Register(pb.RegisterRequest(name="erin", num_examples=10), timeout=10))
            ids = sorted(r.client_id for r in coordinator.engine.registry.all())
        finally:
            release.set()
            for call in stream_calls:
                call.cancel()
            coordinator.engine.stop()
            for channel in channels.values():
                channel.close()
    accepted_names = [n for n, c in register_codes.items() if c == "OK"]
    limit = config.server.max_clients_per_credential
    refused_streams = sum(c == "RESOURCE_EXHAUSTED" for c in stream_codes)
    held = (opened and closed and erin_codes == ["OK", "OK"] and len(accepted_names) == limit and register_codes["erin"] == "FAILED_PRECONDITION"
            and all(register_codes[n] == "RESOURCE_EXHAUSTED" for n in names[limit:]) and erin.client_id == "erin" and again == "OK"
            and ids == sorted(["erin", *accepted_names]) and admitted <= guard.per_party and refused_streams == len(stream_calls) - admitted)
    accepted = len(accepted_names) + admitted
    return _row("identities", honest_s=honest_s, peak=peak, accepted=accepted, refused=len(register_codes) + len(stream_calls) - accepted, held=held,
                note=f"one certificate, 9 names: {len(accepted_names)} accepted (max_clients_per_credential {limit}), 'erin' "
                     f"{register_codes['erin']}, the rest {sorted(set(register_codes[n] for n in names[limit:]))}; idle streams on its names: "
                     f"{admitted} of {len(stream_calls)} admitted (per party {guard.per_party}, pool {guard.max_streams}; {still_admitted} still "
                     f"open when erin's task arrived), {refused_streams} RESOURCE_EXHAUSTED; erin's fetch and push {erin_codes}, her id "
                     f"{erin.client_id!r} (again after re-registering: {again}); registry {ids}")


def registration_drain(tmp: Path, quick: bool) -> dict:
    """One enrolled party (its own per-device secret) re-registering as fast as one connection
    allows while a fleet of devices, each with its own secret, arrives at the shared rate."""
    seconds, per_second = (3, 20) if quick else (6, 20)
    fleet = [f"d{i}" for i in range(seconds * per_second)]
    table = tmp / "devices.secrets"
    table.write_text("".join(f"{name} {name}-secret-0123456789abcdef\n" for name in ["mallory", *fleet]))
    config = _config(tmp, enrollment_secrets_file=str(table))  # registrations_per_second 20, burst 100: the defaults
    stop = threading.Event()
    mallory_codes: dict[str, int] = {}
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(2)})) as (coordinator, stub, _):
        attacker = pb_grpc.CoordinatorStub(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}"))
        ask = pb.RegisterRequest(name="mallory", num_examples=1, enrollment_secret="mallory-secret-0123456789abcdef")

        def hammer():
            while not stop.is_set():
                code = _code(lambda: attacker.Register(ask, timeout=10))
                mallory_codes[code] = mallory_codes.get(code, 0) + 1

        thread = threading.Thread(target=hammer, daemon=True)
        admitted, slowest = 0, 0.0
        with PeakRss() as peak:
            thread.start()
            time.sleep(1.0)  # the attacker has had a second to drain whatever it can
            started = time.monotonic()
            for second in range(seconds):
                for name in fleet[second * per_second:(second + 1) * per_second]:
                    t0 = time.monotonic()
                    code = _code(lambda: stub.Register(pb.RegisterRequest(name=name, num_examples=1, enrollment_secret=f"{name}-secret-0123456789abcdef"), timeout=10))
                    slowest = max(slowest, time.monotonic() - t0)
                    admitted += code == "OK"
                _wait_for(lambda: False, max(0.0, started + second + 1 - time.monotonic()))  # the next second's arrivals
            stop.set()
            thread.join(15)
        coordinator.engine.stop()
    attempts = sum(mallory_codes.values())
    held = admitted >= 0.8 * len(fleet) and attempts > 10 * seconds * per_second
    return _row("registration-drain", honest_s=round(slowest, 3), peak=peak, accepted=mallory_codes.get("OK", 0), refused=attempts - mallory_codes.get("OK", 0),
                held=held, note=f"the attacker's {attempts} attempts in {seconds + 1} s: {dict(sorted(mallory_codes.items()))}; the fleet: {admitted} of "
                                f"{len(fleet)} devices registered ({per_second} a second, the shared rate)")


def resumed_stall(tmp: Path, quick: bool) -> dict:
    """bench/faults.py's all-faults scenario once (quick: 8 devices, 4 rounds)."""
    import faults  # bench/faults.py

    clients, rounds = (8, 4) if quick else (20, 6)
    scenario = faults.Scenario("all-faults", dropout=0.2, bad=0.1, restart=True)
    with PeakRss() as peak:
        row = faults.run_scenario(scenario, clients, rounds, 0, tmp, faults.TIME_LIMIT_S)
    bad_accepted = row["bad_updates_sent"] - row["bad_updates_refused"]
    held = (row["completed"] and row["rounds_completed"] == row["rounds_configured"] and row["accepted_updates_lost"] == 0
            and row["bad_rounds_stored"] == 0 and bad_accepted == 0)
    return _row("resumed-stall", honest_s=round(row["wall_seconds"] / row["rounds_configured"], 3), peak=peak, accepted=bad_accepted,
                refused=row["bad_updates_refused"], held=held,
                note=f"{clients} devices, dropout 0.2, bad 0.1, coordinator killed mid-round 3 and resumed: {row['rounds_completed']} of "
                     f"{row['rounds_configured']} rounds in {row['wall_seconds']} s (limit {faults.TIME_LIMIT_S:g} s); updates accepted "
                     f"{row['updates_accepted']}, lost {row['accepted_updates_lost']}, redone after the restart {row['redone_after_restart']}; "
                     f"bad rounds stored {row['bad_rounds_stored']}; restart overhead {row['restart_overhead_seconds']} s; "
                     f"unexpected errors {row['unexpected_errors']}")


RUNNERS = {name: globals()[name.replace("-", "_")] for name in ATTACKS}


# ---------------------------------------------------------------------------------- main


def write_json(path: Path, rows: list[dict], args, seconds: float) -> None:
    path.write_text(json.dumps({
        "rows": rows, "quick": args.quick, "short_calls": 4000 if args.quick else 20_000, "stalled_calls": 110,
        "peak_rss_of": "this process (the coordinator runs in it, beside the attacking clients), psutil RSS sampled every 20 ms",
        "honest_round_seconds_is": "slowest honest Heartbeat during the attack (call attacks), the honest round's wall time (round attacks, "
                                   "identities) or the wall seconds per round (resumed-stall)",
        "resumed_stall": {"clients": 8 if args.quick else 20, "rounds": 4 if args.quick else 6, "dropout": 0.2, "bad": 0.1, "seed": 0},
        "wall_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
    }, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer short calls (4000), a smaller resumed-stall (8 devices, 4 rounds); for the smoke test")
    parser.add_argument("--only", nargs="+", choices=ATTACKS, metavar="NAME", help="run only these rows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    logging.getLogger("fedtune").setLevel(logging.WARNING)
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or ATTACKS:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            folder = Path(tmp) / name
            folder.mkdir()
            try:
                row = RUNNERS[name](folder, args.quick)
            except Exception as exc:  # a row that raised did not hold
                traceback.print_exc()
                row = _row(name, honest_s=None, peak=round(_rss() / MiB, 1), accepted=None, refused=None, held=False,
                           note=f"raised {type(exc).__name__}: {str(exc)[:200]}")
            row["wall_seconds"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            if args.out:
                write_json(args.out, rows, args, time.monotonic() - started)
    print(f"\n{'attack':<28}{'honest s':>10}{'peak MiB':>10}{'accepted':>10}{'refused':>9}{'cosine':>8}{'held':>6}{'wall s':>8}")
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{r['name']:<28}{fmt(r['honest_round_seconds'], '.3f'):>10}{fmt(r['coordinator_peak_mib'], '.1f'):>10}"
              f"{fmt(r['accepted'], 'd'):>10}{fmt(r['refused'], 'd'):>9}{fmt(r['global_change_cosine_with_attacker'], '.3f'):>8}"
              f"{str(r['held']).lower():>6}{r['wall_seconds']:>8.1f}")
    for r in rows:
        if r["note"]:
            print(f"  {r['name']}: {r['note']}")
    print(f"total {time.monotonic() - started:.1f} s")
    failed = [r["name"] for r in rows if not r["held"]]
    if failed:
        print("did not hold: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
