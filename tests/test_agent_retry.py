"""Which failed calls the client agent retries: a busy or restarting coordinator, yes; an
oversized message, which fails the same way every time, no."""

from __future__ import annotations

import grpc
import pytest

from fedtune.client.agent import AgentError, AgentOptions, ClientAgent, retryable
from fedtune.data import Example


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


OVERSIZED = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)")
BUSY = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many registrations; try again in 2 s")
DOWN = Failure(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")


def test_transient_failures_are_retried_and_permanent_ones_are_not():
    assert retryable(DOWN) and retryable(BUSY) and retryable(Failure(grpc.StatusCode.DEADLINE_EXCEEDED, ""))
    assert not retryable(OVERSIZED)
    assert not retryable(Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad shape"))


def _agent(**options) -> ClientAgent:
    return ClientAgent(AgentOptions(address="127.0.0.1:9", max_backoff_seconds=0.05, **options), [Example("x", "a")], source=None)


def test_an_oversized_message_fails_at_once_without_retrying():
    agent = _agent()
    calls = []

    def push():
        calls.append(1)
        raise OVERSIZED

    with pytest.raises(grpc.RpcError):
        agent._call(push)
    assert len(calls) == 1


def test_a_restarting_coordinator_is_retried_with_backoff_until_it_answers():
    agent = _agent()
    outcomes = iter([DOWN, BUSY, DOWN, "ok"])

    def call():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert agent._call(call) == "ok"


def test_the_agent_gives_up_after_its_limit_with_a_clear_error():
    agent = _agent(give_up_after_seconds=0.2)

    def call():
        raise DOWN

    with pytest.raises(AgentError, match="unreachable for"):
        agent._call(call)
