"""A device keeps what it must not forget across its own restarts: its identity, FedSA's
personal B, error-feedback residuals and its DP accounting; a damaged state file is an error,
never a silent fresh start."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch

from fedtune.compose import checked
from fedtune.client.agent import AgentOptions, ClientAgent
from fedtune.client.state import DeviceState, StateError, load_state, save_state
from fedtune.config import RunConfig
from fedtune.coordinator.app import Coordinator
from fedtune.models import resolve_source

from conftest import sentiment_examples


def _state() -> DeviceState:
    return DeviceState(
        federation="10.0.0.1:7070 minilm", client_id="phone-2", token="t0k3n",
        memory={"local": {"kept": {"l0.lora_B.weight": torch.randn(8, 4)}}, "hetlora": {"tail": (4, 0.25)},
                "scaffold": {"c_i": {"w": torch.arange(6.0).reshape(2, 3)}}},
        residuals={"l0.lora_A.weight": torch.randn(4, 8, dtype=torch.float16)},
        privacy={"history": [[1.1, 0.05, 10], [1.1, 0.05, 10]], "sigma": 1.1},
        pending={"round": 3, "memory": {"scaffold": {"c_i": {"w": torch.ones(2, 3)}}}, "residuals": {}},
    )


def test_state_round_trips_tensors_tuples_and_the_privacy_history(tmp_path):
    saved = _state()
    save_state(tmp_path, saved)
    loaded = load_state(tmp_path, saved.federation)
    assert (loaded.client_id, loaded.token, loaded.privacy) == (saved.client_id, saved.token, saved.privacy)
    torch.testing.assert_close(loaded.memory["local"]["kept"]["l0.lora_B.weight"], saved.memory["local"]["kept"]["l0.lora_B.weight"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.memory["scaffold"]["c_i"]["w"], saved.memory["scaffold"]["c_i"]["w"], rtol=0, atol=0)
    assert loaded.memory["hetlora"]["tail"] == (4, 0.25)
    assert loaded.residuals["l0.lora_A.weight"].dtype == torch.float16
    assert loaded.pending["round"] == 3 and torch.equal(loaded.pending["memory"]["scaffold"]["c_i"]["w"], torch.ones(2, 3))
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == "0o600"  # it holds the token
    # saving again replaces the tensor file; no stale copies pile up
    saved.memory["local"]["kept"]["l0.lora_B.weight"] += 1
    save_state(tmp_path, saved)
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 1


def test_another_federation_keeps_only_the_privacy_accounting(tmp_path, caplog):
    save_state(tmp_path, _state())
    other = load_state(tmp_path, "coordinator.example:7070 minilm")
    assert other.memory == {} and other.residuals == {} and other.client_id == ""
    assert other.privacy["history"] == _state().privacy["history"]
    assert "privacy accounting kept" in caplog.text


@pytest.mark.parametrize("damage", ["truncate-json", "flip-tensor-byte", "delete-tensors"])
def test_damaged_state_is_an_error_that_says_what_starting_over_costs(tmp_path, damage):
    save_state(tmp_path, _state())
    tensor_file = next(tmp_path.glob("tensors-*.safetensors"))
    if damage == "truncate-json":
        (tmp_path / "state.json").write_text((tmp_path / "state.json").read_text()[:40])
    elif damage == "flip-tensor-byte":
        blob = bytearray(tensor_file.read_bytes())
        blob[-1] ^= 0xFF
        tensor_file.write_bytes(bytes(blob))
    else:
        tensor_file.unlink()
    with pytest.raises(StateError, match="damaged.*forgets the privacy this device has spent"):
        load_state(tmp_path, _state().federation)


def test_a_restarted_client_rejoins_as_itself_with_its_b_and_its_privacy_spent(tmp_path, tiny_llama):
    config = RunConfig()
    config.model.source, config.model.labels, config.model.max_length = tiny_llama, ["negative", "positive"], 32
    config.federation.rounds, config.federation.min_clients, config.federation.share_a = 2, 1, True
    config.federation.personal_eval = 0.0  # unnoised, so refused under DP-SGD
    config.training.local_steps, config.training.batch_size = 2, 8
    config.privacy.dp, config.privacy.sample_clip, config.privacy.sample_noise_multiplier = "sample", 1.0, 1.0
    config.server.address, config.run_dir = "127.0.0.1:0", str(tmp_path / "run")
    coordinator = Coordinator(checked(config), eval_examples=[])
    port = coordinator.start()
    engine = threading.Thread(target=coordinator.engine.run, daemon=True)
    engine.start()
    source, examples, state_dir = resolve_source(tiny_llama), sentiment_examples(60, seed=3), tmp_path / "device"
    options = AgentOptions(address=f"127.0.0.1:{port}", name="phone", poll_seconds=1, state_dir=str(state_dir))
    try:
        first = ClientAgent(options, examples, source)
        push = first._push

        def push_then_die(*args, **kwargs):  # the device goes away right after its first update
            accepted = push(*args, **kwargs)
            first.stop_event.set()
            return accepted

        first._push = push_then_die
        assert first.run().rounds == [1]
        saved = json.loads((state_dir / "state.json").read_text())
        assert saved["client_id"] == first.report.client_id and saved["privacy"]["rounds_trained"] == 1
        # round 1's memory waits for round 2's task to say that round 1 aggregated the update
        assert first._memory == {} and first._pending["round"] == 1
        (recipe,) = first._pending["memory"]  # the strategy's client recipe (fedlc by default for seq-cls)
        kept = first._pending["memory"][recipe]["kept"]
        assert kept and all(k.endswith("lora_B.weight") for k in kept)

        second = ClientAgent(options, examples, source)  # a new process would build exactly this
        assert second._client_id == first.report.client_id
        for name, tensor in kept.items():
            torch.testing.assert_close(second._pending["memory"][recipe]["kept"][name], tensor, rtol=0, atol=0)
        report = second.run()
        engine.join(timeout=120)
    finally:
        coordinator.stop()
    assert report.rounds == [2] and report.evaluated == [] and report.client_id == first.report.client_id  # no personal evaluation under DP-SGD
    assert len(coordinator.engine.registry) == 1  # one device, one record: it did not register twice
    history = coordinator.engine.history
    assert [row["clients"] for row in history] == [1, 1]
    assert load_state(state_dir, f"127.0.0.1:{port} {source.name}").privacy["rounds_trained"] == 2  # both rounds counted


def test_a_rounds_memory_is_taken_up_only_if_that_round_aggregated_the_update(tiny_llama):
    """What a round leaves on the device (here SCAFFOLD's control variate and a codec residual)
    waits beside the device's memory until the next task names the last round that aggregated
    this device's update: that round, it is taken up; another (refused, screened out), dropped
    and the device goes on from what it had."""
    agent = ClientAgent(AgentOptions(address="", name="phone"), sentiment_examples(4, seed=0), resolve_source(tiny_llama))
    before = {"scaffold": {"c_i": {"w": torch.zeros(2)}}}
    agent._memory, agent._residuals = before, {"w": torch.zeros(2)}
    moved = {"round": 3, "memory": {"scaffold": {"c_i": {"w": torch.ones(2)}}}, "residuals": {"w": torch.ones(2)}}
    agent._pending = dict(moved)
    agent._settle(2)  # round 3 was not aggregated
    assert agent._memory is before and torch.equal(agent._residuals["w"], torch.zeros(2)) and agent._pending == {}
    agent._pending = dict(moved)
    agent._settle(3)
    assert torch.equal(agent._memory["scaffold"]["c_i"]["w"], torch.ones(2)) and torch.equal(agent._residuals["w"], torch.ones(2))
    state = agent.device_state()
    assert state.pending == {}
    agent._pending = dict(moved)
    agent._settle(None)  # a coordinator that does not say: taken up, as before this rule
    assert agent._pending == {}


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "the shared server adapter stayed busy" if self._code == grpc.StatusCode.UNAVAILABLE else "step refused"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION])
def test_a_split_session_the_coordinator_ends_costs_the_round_not_the_agent(tiny_llama, code):
    """Busy (UNAVAILABLE): the agent asks for work again, its task if the round still waits.
    Ended for what it sent: recorded as refused, and the agent goes on with the next round.
    Either way the agent lives on (before, a busy coordinator mid-session ended the agent)."""
    from fedtune.protocol import fedtune_pb2 as pb

    agent = ClientAgent(AgentOptions(address="127.0.0.1:9", name="phone"), sentiment_examples(4, seed=0), resolve_source(tiny_llama))
    agent._client_id, agent._token = "phone-1", "t"
    agent._fetch = lambda request: (pb.TaskHeader(status=pb.TASK_STATUS_TRAIN, round=3), {}, 10)

    def train(header, tensors):
        raise _Refusal(code)

    agent._train = train
    assert agent.work_once(idle_wait=False) is False
    assert agent.report.rejected == ([] if code == grpc.StatusCode.UNAVAILABLE else ["round 3: FAILED_PRECONDITION: step refused"])
