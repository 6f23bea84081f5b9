"""Admission control in front of the coordinator's handlers: who may call, how many calls at
once, for how long, and what a caller can make the coordinator spend before it is known.

Every method except ``Register`` and the health check needs the caller's client id and token in
the call metadata (``x-fedtune-client-id``, ``x-fedtune-token``). A call without them ends with
UNAUTHENTICATED before anything else; a call with them is authenticated before its request is
read, so a stranger never gets a request message read, let alone a handler run. An unknown id,
a wrong token and (with mutual TLS) a token used from another client's certificate all get the
same answer, UNAUTHENTICATED with one message, so ids cannot be discovered by asking.

The gRPC server's handlers are synchronous: a call holds a worker thread from the moment it is
handled, and for a call with a single request message gRPC's own code holds it while waiting for
that message, with no deadline but the caller's. So every handler is wrapped here as a
request-streaming one, and the wrapper reads the request itself, under watch:

- every call must deliver its request message within ``request_timeout_s``;
- when a worker pool runs short (calls waiting for their request message plus calls queued for
  a worker reach the pool's budget), calls that have waited longer than ``read_grace_s`` are
  cancelled, oldest first. A caller that sends its request promptly (every real client does: the
  message goes out with the call's headers) is never among them, so a crowd of stalled calls
  costs an honest call at most a fraction of a second;
- the open methods (``Register``, health ``Check``/``List``) run on a pool of their own
  (``open_workers``), so stalled anonymous calls never take a worker from authenticated
  clients; and at most ``per_client`` calls of one authenticated client may wait for their
  request at once.

An authenticated streaming call (a task long-poll, an update upload, a split session) also
needs a free slot: at most ``max_streams`` at once overall, leaving the rest of the worker pool
to unary calls such as heartbeats, ``per_client`` at once per client, and ``per_party`` at once
per party. A party is the credential its client registered with (``ClientRecord.credential``,
fedtune.coordinator.clients: a TLS client certificate, a per-device enrollment secret, a remote
address), which may hold up to ``max_clients_per_credential`` client ids (4 by default): without
a party budget one party would hold 4 x 3 = 12 slots and two parties the whole default pool of
24. ``per_party`` defaults to ``max(per_client, max_streams // 4)`` (6 of the default 24): one
party takes at most a quarter of the pool, two or three together still leave an honest client
its slots, and filling the pool takes four parties that each hold a credential the operator let
in (a certificate, a device secret, an address of their own). Devices of one party share its
budget (say, a fleet behind one NAT address without certificates); a refused stream is retried
with backoff like any other. Clients enrolled without a credential (in-process, and on loopback
without a certificate or device secret: simulations) have the per-client limit only. A call over
any limit ends with RESOURCE_EXHAUSTED, which clients retry with backoff. Every admitted stream
is cancelled after ``stream_deadline_s`` seconds, whatever deadline the client asked for, so an
idle upload cannot keep its slot. Unary handlers never wait on the caller once the request is
read.

Failed authentications (bad tokens, wrong enrollment secrets) are logged, at most one WARNING
per address and kind every ``log_every_s`` seconds with a count of those left out (never the
secret or token), and slowed down: after a few failures for the same address and the same
presented client id (or the enrollment secret), each further attempt waits a delay that doubles
per failure up to ``auth_delay_max_s`` before it is checked. Only a few such waits run at once;
past that an attempt is refused (RESOURCE_EXHAUSTED, retried with backoff) unchecked.

Nothing is kept for a finished call: a call's deadline entry goes when the call ends, and the one
thread that cancels calls runs only while there are calls to watch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent import futures
from typing import Callable, Hashable

import grpc

from fedtune.contract.credentials import CLIENT_ID_KEY, TOKEN_KEY, credentials  # noqa: F401 (credentials is re-exported)
from fedtune.contract.errors import CoordinatorError
from fedtune.logs import clip

log = logging.getLogger(__name__)

REGISTER = "/fedtune.v1.Coordinator/Register"
# Full method names callable without a token: registration, and the standard health check
# (a load balancer or orchestrator probes it; it reveals only SERVING / NOT_SERVING).
OPEN_METHODS = frozenset({REGISTER, "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"})


def caller(context: grpc.ServicerContext) -> str:
    """The client id an admitted call authenticated as."""
    return dict(context.invocation_metadata()).get(CLIENT_ID_KEY, "")


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.7", "ipv6:[::1]")."""
    peer = context.peer() or ""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


def certificate_fingerprint(context: grpc.ServicerContext) -> str:
    """SHA-256 of the caller's TLS client certificate (mutual TLS), "" without one."""
    try:
        pem = (context.auth_context() or {}).get("x509_pem_cert") or [b""]
    except Exception:  # noqa: BLE001 - a context without TLS details
        return ""
    return hashlib.sha256(pem[0]).hexdigest() if pem[0] else ""


class RateLimitedLog:
    """WARNING lines, at most one per key every ``interval_s`` seconds; the next line after a
    quiet spell says how many were left out. Keeps at most ``max_keys`` keys."""

    def __init__(self, interval_s: float = 10.0, max_keys: int = 1024, logger: logging.Logger = log) -> None:
        self.interval_s, self.max_keys, self.logger = interval_s, max_keys, logger
        self._lock = threading.Lock()
        self._keys: OrderedDict[Hashable, list] = OrderedDict()  # key -> [last line's time, left out since]

    def warning(self, key: Hashable, message: str, *args) -> bool:
        now = time.monotonic()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return False
            left_out = entry[1] if entry is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        if left_out:
            message += f" (and {left_out} more like it in the last {self.interval_s:g} s)"
        self.logger.warning(message, *args)
        return True


class AuthFailures:
    """Recent failed authentications per key (an address with what it presented). The first
    ``free`` attempts that fail cost nothing; after them each attempt under that key waits
    ``first_delay_s``, doubling per further failure up to ``max_delay_s``. A key is forgotten
    ``forget_after_s`` after its last failure; at most ``max_keys`` are kept."""

    def __init__(self, *, free: int = 3, first_delay_s: float = 0.1, max_delay_s: float = 2.0, forget_after_s: float = 600.0,
                 max_keys: int = 10_000) -> None:
        self.free, self.first_delay_s, self.max_delay_s = free, first_delay_s, max_delay_s
        self.forget_after_s, self.max_keys = forget_after_s, max_keys
        self._lock = threading.Lock()
        self._keys: OrderedDict[Hashable, list] = OrderedDict()  # key -> [failures, last failure's time]

    def failures(self, key: Hashable) -> int:
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                return 0
            if time.monotonic() - entry[1] > self.forget_after_s:
                del self._keys[key]
                return 0
            return entry[0]

    def delay(self, key: Hashable) -> float:
        """How long an attempt under ``key`` waits before it is checked."""
        over = self.failures(key) - self.free  # the attempt after the free ones waits first_delay_s
        if over < 0 or self.max_delay_s <= 0:
            return 0.0
        return min(self.max_delay_s, self.first_delay_s * 2 ** min(over, 30))

    def failed(self, key: Hashable) -> int:
        now = time.monotonic()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or now - entry[1] > self.forget_after_s:
                entry = self._keys[key] = [0, now]
            entry[0] += 1
            entry[1] = now
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            return entry[0]


class _Reaper:
    """Cancels calls past their server-side deadline and, when a worker pool runs short, calls
    that have held a worker for over ``grace_s`` waiting for their request message.

    It knows only calls in flight: each entry goes when its call ends (or its request arrives).
    Its one thread is started when there is something to watch and ends when there is nothing
    left, so a guard leaves no thread behind."""

    def __init__(self, *, grace_s: float, notes: RateLimitedLog) -> None:
        self.grace_s, self.notes = grace_s, notes
        self._cond = threading.Condition()
        self._seq = itertools.count()
        # duration -> {key: (deadline, context)}: one duration's deadlines come in order
        self._timed: dict[float, OrderedDict[int, tuple[float, grpc.ServicerContext]]] = {}
        # calls waiting for their request message, oldest first: key -> (started, deadline, context, pool, client)
        self._reading: OrderedDict[int, tuple[float, float, grpc.ServicerContext, object, str]] = OrderedDict()
        self._reading_per_pool: dict[int, int] = {}
        self._reading_per_client: dict[str, int] = {}
        self._budgets: dict[int, tuple[futures.ThreadPoolExecutor, int]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ bookkeeping

    def budget(self, pool: futures.ThreadPoolExecutor, calls: int) -> None:
        """At most ``calls`` of ``pool``'s calls may wait for their request (or a worker) before
        the longest waiting are cut."""
        self._budgets[id(pool)] = (pool, max(1, calls))

    @property
    def tracked(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._timed.values()) + len(self._reading)

    @property
    def reading(self) -> int:
        with self._cond:
            return len(self._reading)

    def watch(self, context: grpc.ServicerContext, seconds: float) -> int:
        with self._cond:
            key = next(self._seq)
            self._timed.setdefault(seconds, OrderedDict())[key] = (time.monotonic() + seconds, context)
            self._wake()
            return key

    def unwatch(self, key: int, seconds: float) -> None:
        with self._cond:
            queue = self._timed.get(seconds)
            if queue is not None:
                queue.pop(key, None)
                if not queue:
                    del self._timed[seconds]

    def start_reading(self, context: grpc.ServicerContext, pool: futures.ThreadPoolExecutor, timeout_s: float, client: str = "",
                      per_client: int = 0) -> int | None:
        """Watch a call waiting for its request; None when ``client`` already has
        ``per_client`` calls waiting."""
        with self._cond:
            if client and per_client and self._reading_per_client.get(client, 0) >= per_client:
                return None
            key, now = next(self._seq), time.monotonic()
            self._reading[key] = (now, now + timeout_s, context, id(pool), client)
            self._count(id(pool), client, +1)
            self._wake()
            return key

    def done_reading(self, key: int) -> None:
        with self._cond:
            entry = self._reading.pop(key, None)
            if entry is not None:
                self._count(entry[3], entry[4], -1)

    def _count(self, pool: int, client: str, step: int) -> None:
        n = self._reading_per_pool.get(pool, 0) + step
        if n > 0:
            self._reading_per_pool[pool] = n
        else:
            self._reading_per_pool.pop(pool, None)
        if client:
            n = self._reading_per_client.get(client, 0) + step
            if n > 0:
                self._reading_per_client[client] = n
            else:
                self._reading_per_client.pop(client, None)

    def poke(self) -> None:
        """A call arrived: if calls are waiting for their request, look at the pools' load."""
        if self._reading:
            with self._cond:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._timed.clear()
            self._reading.clear()
            self._reading_per_pool.clear()
            self._reading_per_client.clear()
            self._cond.notify()

    def _wake(self) -> None:
        """Call with the lock held: make sure the thread runs and sees the new entry."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="fedtune-deadlines", daemon=True)
            self._thread.start()
        self._cond.notify()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed or not (self._timed or self._reading):
                        self._thread = None
                        return
                    now = time.monotonic()
                    due = self._due(now)
                    if due:
                        break
                    self._cond.wait(self._until_next(now))
            reasons: dict[str, int] = {}
            for context, reason in due:
                reasons[reason] = reasons.get(reason, 0) + 1
                context.cancel()
            del due, context
            self.notes.warning("deadline", "cancelled %s", ", ".join(f"{n} call(s) {why}" for why, n in reasons.items()))

    def _due(self, now: float) -> list[tuple[grpc.ServicerContext, str]]:
        """Pop what is to be cancelled now; call with the lock held."""
        due = []
        for seconds in list(self._timed):
            queue = self._timed[seconds]
            while queue:
                key, (deadline, context) = next(iter(queue.items()))
                if deadline > now:
                    break
                del queue[key]
                due.append((context, "past the server-side deadline"))
            if not queue:
                del self._timed[seconds]
        while self._reading:
            key, entry = next(iter(self._reading.items()))
            if entry[1] > now:
                break
            self.done_reading(key)
            due.append((entry[2], "that sent no request in time"))
        for pool, excess in self._excess().items():
            for key, entry in list(self._reading.items()):
                if excess <= 0 or entry[0] + self.grace_s > now:
                    break
                if entry[3] == pool:
                    self.done_reading(key)
                    due.append((entry[2], "waiting for their request while the server was busy"))
                    excess -= 1
        return due

    def _excess(self) -> dict[int, int]:
        """Per pool: by how many calls its waiting calls and queued work exceed its budget."""
        excess = {}
        for pool_id, waiting in self._reading_per_pool.items():
            pool, budget = self._budgets.get(pool_id, (None, 1 << 30))
            queue = getattr(pool, "_work_queue", None)
            backlog = queue.qsize() if queue is not None else 0
            if waiting + backlog > budget:
                excess[pool_id] = waiting + backlog - budget
        return excess

    def _until_next(self, now: float) -> float:
        nexts = [next(iter(q.values()))[0] for q in self._timed.values() if q]
        if self._reading:
            nexts.append(next(iter(self._reading.values()))[1])
            nexts.append(now + self.grace_s / 2)  # look at the pools' load again
        return max(0.0, min(nexts) - now) if nexts else 1.0


class CallGuard(grpc.ServerInterceptor):
    """The interceptor (see the module's docstring). ``authenticate(client_id, token,
    certificate)`` returns the caller's record (its ``credential`` attribute names the party;
    None or missing: no party budget) or raises CoordinatorError. ``per_party`` 0 means
    ``max(per_client, max_streams // 4)``. The guard owns the worker pools: ``pool`` (give it to
    the server) and ``open_pool`` for the open methods."""

    def __init__(self, authenticate: Callable[[str, str, str], object], *, max_streams: int, per_client: int = 3, per_party: int = 0,
                 stream_deadline_s: float = 900.0, request_timeout_s: float = 10.0, max_workers: int = 32, open_workers: int = 64,
                 read_grace_s: float = 0.5, auth_delay_max_s: float = 2.0, log_every_s: float = 10.0) -> None:
        self.authenticate = authenticate
        self.max_streams, self.per_client, self.stream_deadline_s = max_streams, per_client, stream_deadline_s
        self.per_party = per_party if per_party > 0 else max(per_client, max_streams // 4)
        self.request_timeout_s = request_timeout_s
        self.pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="fedtune-rpc")
        self.open_pool = futures.ThreadPoolExecutor(open_workers, thread_name_prefix="fedtune-open")
        self.notes = RateLimitedLog(log_every_s)
        self.failures = AuthFailures(max_delay_s=auth_delay_max_s)
        # Failed-authentication waits hold a worker: only a few at once in each pool.
        self._token_waits = threading.BoundedSemaphore(max(1, (max_workers - max_streams) // 4))
        self._enrollment_waits = threading.BoundedSemaphore(max(1, open_workers // 4))
        self._reaper = _Reaper(grace_s=read_grace_s, notes=self.notes)
        self._reaper.budget(self.pool, max(2, (max_workers - max_streams) // 2))
        self._reaper.budget(self.open_pool, max(2, open_workers // 2))
        self._lock = threading.Lock()
        self._streams = 0
        self._by_client: dict[str, int] = {}
        self._by_party: dict[str, int] = {}

    @property
    def open_streams(self) -> int:
        return self._streams

    def party_streams(self, party: str) -> int:
        """Streams open now for clients of ``party`` (a registry record's credential)."""
        with self._lock:
            return self._by_party.get(party, 0)

    @property
    def tracked_calls(self) -> int:
        """Calls the guard holds anything for (deadline entries, calls waiting for a request)."""
        return self._reaper.tracked

    def close(self) -> None:
        """Stop watching calls and let the worker pools' threads end (after the server stopped)."""
        self._reaper.close()
        self.pool.shutdown(wait=False)
        self.open_pool.shutdown(wait=False)

    # ------------------------------------------------------------------ interception

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None
        self._reaper.poke()
        if details.method in OPEN_METHODS:
            return self._open(handler)
        metadata = dict(details.invocation_metadata or ())
        client_id, token = metadata.get(CLIENT_ID_KEY, ""), metadata.get(TOKEN_KEY, "")
        if not client_id or not token:
            return self._refusal(handler, details.method)
        return self._guarded(handler, client_id, token)

    def _open(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """An open unary method, on the open pool, with its request read under watch."""
        if handler.request_streaming or handler.response_streaming:
            return handler
        behavior, guard = handler.unary_unary, self

        def open_call(request_iterator, context):
            return behavior(guard._read(request_iterator, context, guard.open_pool), context)

        open_call.experimental_thread_pool = self.open_pool  # gRPC runs it on this pool
        return grpc.stream_unary_rpc_method_handler(open_call, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    def _guarded(self, handler: grpc.RpcMethodHandler, client_id: str, token: str) -> grpc.RpcMethodHandler:
        """``handler`` behind authentication, a stream slot for streaming calls, and a watched
        request read for single-request calls."""
        guard, streaming = self, handler.request_streaming or handler.response_streaming
        if handler.request_streaming:
            behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
        else:
            behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def admit(request_iterator, context):
            record = guard._authenticate(context, client_id, token)
            if streaming:
                guard._enter(client_id, context, getattr(record, "credential", None))
            if handler.request_streaming:
                return request_iterator
            return guard._read(request_iterator, context, guard.pool, client_id)

        if handler.response_streaming:
            def call(request_iterator, context):
                yield from behavior(admit(request_iterator, context), context)

            make = grpc.stream_stream_rpc_method_handler
        else:
            def call(request_iterator, context):
                return behavior(admit(request_iterator, context), context)

            make = grpc.stream_unary_rpc_method_handler
        return make(call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A handler that ends the call with UNAUTHENTICATED at once. It is request-streaming
        whatever the method, so nothing waits for a request message first."""
        notes = self.notes

        def refuse(request_iterator, context):
            host = peer_host(context)
            notes.warning(("anonymous", host), "refused %s from %s: no credentials", clip(method, 80), clip(host, 80))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing {CLIENT_ID_KEY} / {TOKEN_KEY} call metadata: register first")

        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
        return make(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    # ------------------------------------------------------------------ the steps of a call

    def _read(self, request_iterator, context: grpc.ServicerContext, pool: futures.ThreadPoolExecutor, client_id: str = ""):
        """The call's one request message, read while the reaper watches the wait."""
        key = self._reaper.start_reading(context, pool, self.request_timeout_s, client_id, self.per_client)
        if key is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"client {clip(client_id, 80)!r} already has {self.per_client} calls waiting to send their request")
        try:
            request = next(request_iterator, None)  # raises when the call is cancelled meanwhile
        finally:
            self._reaper.done_reading(key)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this method takes exactly one request message")
        return request

    def _authenticate(self, context: grpc.ServicerContext, client_id: str, token: str) -> object:
        """The caller's record (what ``authenticate`` returned), or the call ends here."""
        host = peer_host(context)
        key = ("token", host, client_id[:200])
        try:
            self._slow_down(key, self._token_waits, context)
            return self.authenticate(client_id, token, certificate_fingerprint(context))
        except CoordinatorError as exc:
            if exc.code == "UNAUTHENTICATED":
                failures = self.failures.failed(key)
                self.notes.warning(("token", host), "refused a call from %s: bad credentials for client id %s (failure %d from there for that id)",
                                   clip(host, 80), clip(client_id, 80), failures)
            context.abort(getattr(grpc.StatusCode, exc.code), exc.message)

    def before_enrollment(self, context: grpc.ServicerContext) -> None:
        """Called by Register before it checks the enrollment secret: waits if this address
        failed often lately; raises CoordinatorError (RESOURCE_EXHAUSTED) when too many wait."""
        self._slow_down(("enrollment", peer_host(context)), self._enrollment_waits, context)

    def enrollment_failed(self, context: grpc.ServicerContext) -> None:
        host = peer_host(context)
        failures = self.failures.failed(("enrollment", host))
        self.notes.warning(("enrollment", host), "refused a registration from %s: wrong or missing enrollment secret (failure %d from there)",
                           clip(host, 80), failures)

    def denied(self, context: grpc.ServicerContext, message: str) -> None:
        """Log (rate-limited) a call refused after authentication (one client speaking for another)."""
        host = peer_host(context)
        self.notes.warning(("denied", host), "denied a call from %s as %s: %s", clip(host, 80), clip(caller(context), 80), clip(message))

    def _slow_down(self, key: Hashable, waits: threading.BoundedSemaphore, context: grpc.ServicerContext) -> None:
        delay = self.failures.delay(key)
        if delay <= 0:
            return
        if not waits.acquire(blocking=False):
            raise CoordinatorError("RESOURCE_EXHAUSTED", f"too many failed authentications from this address; retry in {delay:.1f} s")
        try:
            time.sleep(max(0.0, min(delay, context.time_remaining() - 0.05)))
        finally:
            waits.release()

    def _enter(self, client_id: str, context: grpc.ServicerContext, party: str | None = None) -> None:
        """Take a stream slot for the call, or end it with RESOURCE_EXHAUSTED; ``party`` is the
        credential the client registered with (None: no party budget). The slot and the call's
        deadline entry are given back when the call terminates, however it ends: gRPC runs the
        callback even for a call whose handler never ran its body (a request that failed to
        parse, a caller that cancelled first), where a ``finally`` in the handler would never run."""
        with self._lock:
            if self._streams >= self.max_streams:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the coordinator is at its limit of concurrent streams; retry shortly")
            if self._by_client.get(client_id, 0) >= self.per_client:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"client {clip(client_id, 80)!r} already has {self.per_client} calls open")
            if party is not None and self._by_party.get(party, 0) >= self.per_party:
                # the credential itself (a fingerprint, a device name, an address) is not echoed
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the clients registered with the credential of {clip(client_id, 80)!r} "
                              f"already have {self.per_party} calls open; retry shortly")
            self._streams += 1
            self._by_client[client_id] = self._by_client.get(client_id, 0) + 1
            if party is not None:
                self._by_party[party] = self._by_party.get(party, 0) + 1
        released = False
        watched = self._reaper.watch(context, self.stream_deadline_s)

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
                if party is not None:
                    left = self._by_party.get(party, 1) - 1
                    if left:
                        self._by_party[party] = left
                    else:
                        self._by_party.pop(party, None)
            self._reaper.unwatch(watched, self.stream_deadline_s)

        if not context.add_callback(release):  # already over
            release()
