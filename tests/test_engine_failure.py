"""A coordinator that fails must not send its clients away, and two coordinators never share a
port: either would leave a resumed run waiting for clients that are gone (the stall seen in
bench/faults.py's all-faults scenario)."""

from __future__ import annotations

import threading

import pytest
import torch

from fedtune.compose import compose
from fedtune.config import RunConfig
from fedtune.coordinator.engine import Done, RoundEngine, Wait
from fedtune.coordinator.global_model import FixedTensors
from fedtune.devices import Capabilities
from fedtune.transport import TransportError, make_server


def test_an_engine_that_fails_tells_its_clients_to_wait_not_that_training_is_over(tmp_path):
    config = RunConfig()
    config.run_dir = str(tmp_path / "run")
    config.federation.rounds, config.federation.min_clients = 2, 1
    engine = RoundEngine(config, FixedTensors({"w": torch.zeros(4)}), compose(config), tmp_path / "run")
    me = engine.register("a", Capabilities(), 10)

    def broken_close():
        raise RuntimeError("disk full")

    engine.close_round = broken_close
    engine._wait_for_close = lambda: None  # close at once
    failed = []
    thread = threading.Thread(target=lambda: failed.append(pytest.raises(RuntimeError, engine.run)))
    thread.start()
    thread.join(timeout=30)
    assert failed and not thread.is_alive()
    answer = engine.next_task(me.client_id, 0.0)
    assert isinstance(answer, Wait) and not isinstance(answer, Done)


def test_a_second_server_cannot_share_a_port_already_listening():
    first, port = make_server("127.0.0.1:0")
    first.start()
    try:
        with pytest.raises(TransportError, match="cannot listen"):
            make_server(f"127.0.0.1:{port}")
    finally:
        first.stop(None)
