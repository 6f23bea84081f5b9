"""Admission control in front of the coordinator's handlers: who may call, how many calls at
once, and for how long.

A server interceptor sees each call's metadata before any handler runs or reads a byte of the
request. Every method except ``Register`` and the health check needs the caller's client id and token in the
metadata (``x-fedtune-client-id``, ``x-fedtune-token``); a call without them, or with a wrong
token, ends with UNAUTHENTICATED at once, so unauthenticated streams hold no worker thread. An
authenticated streaming call (a task long-poll, an update upload, a split session) also needs a
free slot: at most ``max_streams`` at once overall, leaving the rest of the worker pool to
unary calls such as heartbeats, and ``per_client`` at once per client. A call over either limit
ends with RESOURCE_EXHAUSTED, which clients retry with backoff. Every admitted stream is
cancelled after ``stream_deadline_s`` seconds, whatever deadline the client asked for, so an
idle upload cannot keep its slot.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Iterator

import grpc

from fedtune.coordinator.errors import CoordinatorError

log = logging.getLogger(__name__)

CLIENT_ID_KEY = "x-fedtune-client-id"
TOKEN_KEY = "x-fedtune-token"
# Full method names callable without a token: registration, and the standard health check
# (a load balancer or orchestrator probes it; it reveals only SERVING / NOT_SERVING).
OPEN_METHODS = frozenset({"/fedtune.v1.Coordinator/Register", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"})


def credentials(client_id: str, token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates ``client_id`` (what the agent sends on every call)."""
    return ((CLIENT_ID_KEY, client_id), (TOKEN_KEY, token))


def caller(context: grpc.ServicerContext) -> str:
    """The client id an admitted call authenticated as."""
    return dict(context.invocation_metadata()).get(CLIENT_ID_KEY, "")


class _Reaper:
    """One thread that cancels calls whose server-side deadline has passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, grpc.ServicerContext]] = []
        self._count = itertools.count()
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="fedtune-deadlines", daemon=True).start()

    def watch(self, context: grpc.ServicerContext, seconds: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._count), context))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, context = heapq.heappop(self._heap)
            if context.is_active():
                log.warning("cancelling a call past the server-side deadline")
                context.cancel()


class CallGuard(grpc.ServerInterceptor):
    def __init__(self, authenticate: Callable[[str, str], object], *, max_streams: int, per_client: int = 3, stream_deadline_s: float = 900.0) -> None:
        self.authenticate = authenticate
        self.max_streams, self.per_client, self.stream_deadline_s = max_streams, per_client, stream_deadline_s
        self._lock = threading.Lock()
        self._streams = 0
        self._by_client: dict[str, int] = {}
        self._reaper = _Reaper()

    @property
    def open_streams(self) -> int:
        return self._streams

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        metadata = dict(details.invocation_metadata or ())
        client_id, token = metadata.get(CLIENT_ID_KEY, ""), metadata.get(TOKEN_KEY, "")
        if not client_id or not token:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, f"missing {CLIENT_ID_KEY} / {TOKEN_KEY} call metadata: register first")
        try:
            self.authenticate(client_id, token)
        except CoordinatorError as exc:
            return _refusal(handler, getattr(grpc.StatusCode, exc.code), exc.message)
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        return self._admitted(handler, client_id)

    def _enter(self, client_id: str, context: grpc.ServicerContext) -> None:
        """Take a stream slot for the call, or end it with RESOURCE_EXHAUSTED. The slot is given
        back when the call terminates, however it ends: gRPC runs the callback even for a call
        whose handler never ran its body (a request that failed to parse, a caller that
        cancelled first), where a ``finally`` in the handler would never run."""
        with self._lock:
            if self._streams >= self.max_streams:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the coordinator is at its limit of concurrent streams; retry shortly")
            if self._by_client.get(client_id, 0) >= self.per_client:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"client {client_id!r} already has {self.per_client} calls open")
            self._streams += 1
            self._by_client[client_id] = self._by_client.get(client_id, 0) + 1
        released = False

        def release() -> None:  # gRPC's callback and our own fallback may both call it
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._streams -= 1
                left = self._by_client.get(client_id, 1) - 1
                if left:
                    self._by_client[client_id] = left
                else:
                    self._by_client.pop(client_id, None)

        if not context.add_callback(release):  # already over
            release()
        self._reaper.watch(context, self.stream_deadline_s)

    def _admitted(self, handler: grpc.RpcMethodHandler, client_id: str) -> grpc.RpcMethodHandler:
        """``handler`` behind a stream slot, with a server-side deadline."""
        guard = self
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream

            def streaming(request, context) -> Iterator:
                guard._enter(client_id, context)
                yield from behavior(request, context)

            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
            return make(streaming, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        behavior = handler.stream_unary

        def unary(request_iterator, context):
            guard._enter(client_id, context)
            return behavior(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with ``code`` at once. It is request-streaming whatever the
    method, so gRPC does not wait for a request message first (a unary handler would hold a
    worker until a stalled caller sent one); the caller only sees the status."""

    def refuse(request_iterator, context):
        context.abort(code, message)

    make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    return make(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
