"""The round engine's bookkeeping under concurrency: one update per client, and no update lost
after it was accepted."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from fedtune.compose import compose
from fedtune.config import RunConfig
from fedtune.coordinator.engine import RoundEngine, TrainTask
from fedtune.coordinator.errors import CoordinatorError
from fedtune.coordinator.global_model import FixedTensors
from fedtune.devices import Capabilities
from fedtune.protocol import fedtune_pb2 as pb

from conftest import fetch_task, live_coordinator, push_update


def _config(tmp_path, rounds=1) -> RunConfig:
    config = RunConfig()
    config.run_dir = str(tmp_path / "run")
    config.federation.rounds = rounds
    return config


def test_concurrent_pushes_of_one_client_are_accepted_exactly_once(tmp_path):
    config = _config(tmp_path)
    config.federation.min_clients = 2
    config.server.per_client_calls = 8  # let all eight pushes race (the default admits 3 at once)
    with live_coordinator(config, global_model=FixedTensors({"w": torch.zeros(64)})) as (coordinator, stub, engine):
        me = stub.Register(pb.RegisterRequest(name="twice", num_examples=3), timeout=10)
        other = stub.Register(pb.RegisterRequest(name="other", num_examples=3), timeout=10)
        header, tensors = fetch_task(stub, me.client_id, me.token)
        start = threading.Barrier(8)
        outcomes = []

        def push():
            start.wait()
            try:
                outcomes.append(push_update(stub, me.client_id, me.token, header.round, {"w": torch.ones(64)}).accepted)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

        threads = [threading.Thread(target=push) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count(True) == 1
        assert all(o == grpc.StatusCode.FAILED_PRECONDITION for o in outcomes if o is not True)
        h2, _ = fetch_task(stub, other.client_id, other.token)
        assert push_update(stub, other.client_id, other.token, h2.round, {"w": torch.full((64,), 3.0)}).accepted
        engine.join(timeout=30)
    # the mean of one ones-update and one threes-update, equal weights: counted once each
    torch.testing.assert_close(coordinator.engine.state["w"], torch.full((64,), 2.0))
    assert coordinator.engine.history[0]["clients"] == 2


@pytest.mark.parametrize("trial", range(3))
def test_a_push_racing_the_close_is_aggregated_or_refused_never_lost(tmp_path, trial):
    config = _config(tmp_path / str(trial))
    config.federation.quorum = 0.3          # the round closes while most pushes are in flight
    n = 12
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path / str(trial))
    ids = [engine.register(f"c{i}", Capabilities(), 1).client_id for i in range(n)]
    config.federation.min_clients = n
    driver = threading.Thread(target=engine.run)
    driver.start()
    tasks = {}
    for cid in ids:
        task = engine.next_task(cid, 30)
        assert isinstance(task, TrainTask)
        tasks[cid] = task
    accepted, refused = [], []
    barrier = threading.Barrier(n)

    def submit(i, cid):
        barrier.wait()
        try:
            engine.submit(cid, tasks[cid].round, {"w": torch.full((4,), float(i))}, 1, {"train_loss": 1.0}, 16)
            accepted.append(cid)
        except CoordinatorError as exc:
            assert exc.code == "FAILED_PRECONDITION"
            refused.append(cid)

    threads = [threading.Thread(target=submit, args=(i, cid)) for i, cid in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    driver.join(timeout=30)
    row = engine.history[0]
    assert sorted(row["client_ids"]) == sorted(accepted) and len(accepted) + len(refused) == n
    expected = sum(float(ids.index(c)) for c in accepted) / len(accepted)
    torch.testing.assert_close(engine.state["w"], torch.full((4,), expected))


@pytest.mark.parametrize("final", [True, False])
def test_a_stop_to_resume_later_tells_waiting_clients_to_wait_not_that_training_is_over(tmp_path, final):
    from fedtune.coordinator.engine import Done, Wait

    config = _config(tmp_path, rounds=3)
    config.federation.min_clients = 2  # round 1 never opens: the engine waits for a second client
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path)
    cid = engine.register("only", Capabilities(), 1).client_id
    driver = threading.Thread(target=engine.run)
    driver.start()
    engine.stop(final=final)
    driver.join(10)
    answer = engine.next_task(cid, 0.1)
    # Ctrl-C on a coordinator that will be resumed must not send its fleet home
    assert isinstance(answer, Done) if final else isinstance(answer, Wait) and answer.retry_after_s > 0


def test_heartbeat_says_whether_the_round_still_waits_for_the_client(tmp_path):
    """A device that queued its training asks before it starts: the answer is yes only while
    its round is open and has no update from it."""
    config = _config(tmp_path)
    config.federation.quorum = 0.5
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path)
    a, b = (engine.register(name, Capabilities(), 1).client_id for name in ("a", "b"))
    config.federation.min_clients = 2
    driver = threading.Thread(target=engine.run)
    driver.start()
    task = engine.next_task(a, 30)
    assert isinstance(task, TrainTask)
    assert engine.heartbeat(a, task.round) == (task.round, False, True)
    assert engine.heartbeat(a, task.round + 1)[2] is False   # not the open round
    engine.submit(a, task.round, {"w": torch.ones(4)}, 1, {}, 16)  # quorum 0.5 of 2: closes
    driver.join(timeout=30)
    assert engine.heartbeat(a, task.round)[2] is False        # already sent
    assert engine.heartbeat(b, task.round) == (0, True, False)  # closed, and the run is over


def test_wait_for_round_names_the_selected_clients_and_ends_with_the_run(tmp_path):
    config = _config(tmp_path, rounds=2)
    config.federation.clients_per_round = 2
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path)
    ids = [engine.register(f"c{i}", Capabilities(), 1).client_id for i in range(5)]
    config.federation.min_clients = 5
    assert engine.wait_for_round(0, 0.05) == (0, [])          # nothing open yet: times out
    driver = threading.Thread(target=engine.run)
    driver.start()
    seen = []
    last = 0
    while (opened := engine.wait_for_round(last, 30)) is not None:
        number, selected = opened
        assert number == last + 1 and len(selected) == 2 and set(selected) <= set(ids)
        for cid in selected:
            engine.submit(cid, number, {"w": torch.ones(4)}, 1, {}, 16)
        seen.append(number)
        last = number
    driver.join(timeout=30)
    assert seen == [1, 2]


@pytest.mark.parametrize("slots, waves", [(0, 1), (1, 6), (4, 2)])
def test_a_rounds_deadline_grows_with_the_waves_of_a_simulation(tmp_path, slots, waves):
    config = _config(tmp_path / str(slots))
    config.federation.round_timeout_s = 100.0
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path / str(slots))
    engine.training_slots = slots
    for i in range(6):
        engine.register(f"c{i}", Capabilities(), 1)
    assert engine.open_round(1)
    rnd = engine._round
    assert rnd.deadline - rnd.started == pytest.approx(100.0 * waves, abs=0.5)


def _deadline_round(tmp_path, n: int = 3, client_timeout_s: float = 2.0) -> tuple[RoundEngine, list[str], threading.Thread]:
    """A round of ``n`` clients with quorum 1, a long deadline and a short liveness window: it
    closes early only once no missing client is owed a wait."""
    config = _config(tmp_path)
    config.federation.round_timeout_s, config.federation.client_timeout_s = 120.0, client_timeout_s
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path)
    ids = [engine.register(f"c{i}", Capabilities(), 1).client_id for i in range(n)]
    config.federation.min_clients = n
    driver = threading.Thread(target=engine.run)
    driver.start()
    return engine, ids, driver


def test_a_client_that_keeps_asking_and_never_delivers_is_given_up_not_waited_for(tmp_path):
    """The all-faults stall: a device that asks for its task again and again, never sending an
    update, stays alive and held the round to its deadline (600 s by default)."""
    from fedtune.coordinator.engine import MAX_DELIVERIES, Wait

    engine, (good, other, looping), driver = _deadline_round(tmp_path)
    for cid in (good, other):
        task = engine.next_task(cid, 30)
        engine.submit(cid, task.round, {"w": torch.ones(4)}, 1, {}, 16)
    for _ in range(MAX_DELIVERIES):  # the task again each time it asks: it may have lost its work
        assert isinstance(engine.next_task(looping, 30), TrainTask)
    assert isinstance(engine.next_task(looping, 0), Wait)  # asking once more: given up
    driver.join(timeout=20)
    assert not driver.is_alive(), "the round waited for a client that will not deliver"
    row = engine.history[0]
    assert row["clients"] == 2 and row["seconds"] < 20


def test_a_client_whose_update_is_refused_is_not_waited_for_nor_given_its_task_again(tmp_path):
    """The bench's bad devices: an update refused for what it holds (NaN, say) is a verdict. When
    the client asks for work again the round gives it up at once (not at its deadline, not after
    MAX_DELIVERIES retrainings that would send the same update) and its row says why."""
    from fedtune.coordinator.engine import Wait

    engine, (good, bad, late), driver = _deadline_round(tmp_path, client_timeout_s=100.0)  # never silent in this test
    task = engine.next_task(good, 30)
    engine.submit(good, task.round, {"w": torch.ones(4)}, 1, {}, 16)
    engine.next_task(late, 30)
    engine.submit(late, task.round, {"w": torch.ones(4)}, 1, {}, 16)
    assert isinstance(engine.next_task(bad, 30), TrainTask)
    engine.note_rejected(task.round, 100, bad, "tensor 'w' holds\nNaN")  # the service refused its update
    assert isinstance(engine.next_task(bad, 0), Wait)
    driver.join(timeout=20)
    assert not driver.is_alive() and engine.history[0]["clients"] == 2
    assert engine.history[0]["rejected_by"] == {bad: "tensor 'w' holds NaN"} and engine.history[0]["rejected_updates"] == 1


def test_a_refusal_that_is_no_verdict_leaves_the_client_its_task(tmp_path):
    """A push the coordinator could not take for now (busy) names no client: the client keeps its
    task and the round waits for its retry, whose valid update counts."""
    engine, (a, b, c), driver = _deadline_round(tmp_path)
    task = engine.next_task(a, 30)
    engine.note_rejected(task.round, 100)
    assert isinstance(engine.next_task(a, 30), TrainTask)
    for cid in (a, b, c):
        if cid != a:
            engine.next_task(cid, 30)
        engine.submit(cid, task.round, {"w": torch.ones(4)}, 1, {}, 16)
    driver.join(timeout=20)
    assert engine.history[0]["clients"] == 3 and "rejected_by" not in engine.history[0]


def test_a_refused_client_may_still_send_a_valid_update(tmp_path):
    engine, (a, b, c), driver = _deadline_round(tmp_path)
    task = engine.next_task(a, 30)
    engine.note_rejected(task.round, 100, a, "not finite")
    engine.submit(a, task.round, {"w": torch.ones(4)}, 1, {}, 16)
    for cid in (b, c):
        engine.next_task(cid, 30)
        engine.submit(cid, task.round, {"w": torch.ones(4)}, 1, {}, 16)
    driver.join(timeout=20)
    assert engine.history[0]["clients"] == 3 and "rejected_by" not in engine.history[0]


def test_a_given_up_client_may_still_send_a_valid_update(tmp_path):
    from fedtune.coordinator.engine import MAX_DELIVERIES

    engine, (a, b, c), driver = _deadline_round(tmp_path)
    for _ in range(MAX_DELIVERIES + 1):
        engine.next_task(a, 1)
    engine.submit(a, 1, {"w": torch.ones(4)}, 1, {}, 16)  # given up, yet its update is valid: accepted
    for cid in (b, c):
        engine.next_task(cid, 30)
        engine.submit(cid, 1, {"w": torch.ones(4)}, 1, {}, 16)
    driver.join(timeout=20)
    assert engine.history[0]["clients"] == 3


def test_a_round_hook_is_called_at_each_point_outside_the_lock_and_can_refuse_the_aggregate(tmp_path):
    """The engine keeps time; features plug in through hooks (fedtune.coordinator.hooks). A
    hook sees each point of a round in order, never under the engine's lock (but ``accepted``),
    and its verdict refuses an aggregate like the trust rules do."""
    from fedtune.coordinator.hooks import RoundHook

    class Recorder(RoundHook):
        def __init__(self, engine):
            self.engine, self.calls = engine, []

        def _note(self, point):
            self.calls.append((point, self.engine._cond._is_owned()))

        def arrived(self, rnd, update):
            self._note("arrived")

        def admit(self, rnd, update, registered):
            self._note("admit")
            return update

        def accepted(self, rnd, update, claimed):
            self._note("accepted")

        def screen(self, rnd, updates):
            self._note("screen")
            return list(updates)

        def verdict(self, rnd, before, after, exported):
            self._note("verdict")
            return "the recorder refuses it"

        def row(self, rnd, contributors):
            self._note("row")
            return {"recorded": len(contributors)}

        def closed(self, rnd):
            self._note("closed")

    config = _config(tmp_path)
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path)
    recorder = Recorder(engine)
    engine.hooks.append(recorder)
    cid = engine.register("a", Capabilities(), 1).client_id
    assert engine.open_round(1)
    engine.submit(cid, 1, {"w": torch.ones(4)}, 1, {}, 16)
    row = engine.close_round()
    assert recorder.calls == [("arrived", False), ("admit", False), ("accepted", True), ("screen", False),
                              ("verdict", False), ("row", False), ("closed", False)]
    assert row["recorded"] == 1 and row["round_refused"] == "the recorder refuses it"
    assert torch.equal(engine.state["w"], torch.zeros(4))  # refused: the state stays


def test_each_task_tells_the_last_round_that_aggregated_the_clients_update(tmp_path):
    """A device takes up the memory a round left (SCAFFOLD's control variate, error-feedback
    residuals) only once that round aggregated its update: the next task tells it which round
    last did. A refused update is not aggregated."""
    config = _config(tmp_path, rounds=2)
    config.federation.min_clients = 2
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path)
    a, b = (engine.register(n, Capabilities(), 1).client_id for n in ("a", "b"))
    driver = threading.Thread(target=engine.run)
    driver.start()
    first = {cid: engine.next_task(cid, 30) for cid in (a, b)}
    assert {t.aggregated_round for t in first.values()} == {0}
    engine.submit(a, 1, {"w": torch.ones(4)}, 1, {}, 16)
    engine.note_rejected(1, 16, b, "not finite")
    engine.next_task(b, 0)  # b asks for work again: given up for round 1, which then closes
    second = {cid: engine.next_task(cid, 30) for cid in (a, b)}
    assert second[a].round == second[b].round == 2
    assert second[a].aggregated_round == 1 and second[b].aggregated_round == 0
    for cid in (a, b):
        engine.submit(cid, 2, {"w": torch.ones(4)}, 1, {}, 16)
    driver.join(timeout=30)
    assert engine.aggregated == {a: 2, b: 2}
