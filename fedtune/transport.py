"""gRPC channels and server ports, with the security rule fedtune enforces: plaintext only on
loopback, unless the operator asks for it explicitly; TLS otherwise. Every streaming call made
on a channel from ``make_channel`` is bounded by its deadline even where gRPC lets it overrun
(``CallWatchdog``)."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc

log = logging.getLogger(__name__)

# Chunks stay under 4 MiB, but headers with long tensor lists should not hit the cap either.
MESSAGE_LIMIT = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class TransportError(ValueError):
    """A misconfigured address or TLS setting."""


class CallWatchdog(grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Ends a streaming call whose reader still waits ``grace_s`` seconds after its deadline.

    gRPC enforces deadlines itself, yet two ways of overrunning them were seen with a coordinator
    killed and restarted on the same port: a response stream begun while the server was stopping
    ran on past its deadline; and gRPC gave a call its final status ("failed to connect")
    while its reader, already waiting for the next message, was never woken (gRPC Python's
    iterator has no timeout of its own: grpc/grpc#20562). Either way a device would wait for
    ever for a coordinator that had come back. So a call is watched until its *reader* is done
    with it, not until gRPC calls it done, and when its time is up the watchdog cancels it (a
    call still running) or wakes its reader (a call gRPC already ended); the reader then gets
    the call's error (``CANCELLED``, or the status gRPC gave it), which the caller's retry path
    handles like any lost connection. A reader still waiting ``ended_grace_s`` after gRPC ended
    its call is woken then, without waiting for the deadline (a device's task download has a
    deadline of minutes). One thread watches every call of the process."""

    def __init__(self, grace_s: float = 5.0, ended_grace_s: float = 1.0) -> None:
        self.grace_s, self.ended_grace_s = grace_s, ended_grace_s
        self.cancelled = 0  # calls this watchdog had to end
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._calls: dict[int, _WatchedStream] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._watch(continuation(client_call_details, request), client_call_details)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._watch(continuation(client_call_details, request_iterator), client_call_details)

    def _watch(self, call, details):
        if details.timeout is None or not hasattr(call, "add_done_callback"):
            return call
        key = next(self._ids)
        stream = _WatchedStream(call, lambda: self._forget(key), lambda: self._expedite(key))
        with self._cond:
            self._calls[key] = stream
            heapq.heappush(self._heap, (time.monotonic() + details.timeout + self.grace_s, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedtune-call-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        call.add_done_callback(lambda _: stream.ended_by_grpc())
        return stream

    def _forget(self, key: int) -> None:
        with self._cond:
            self._calls.pop(key, None)

    def _expedite(self, key: int) -> None:
        """gRPC ended the call while its reader waits: look again in ``ended_grace_s``."""
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + self.ended_grace_s, key))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                due, key = self._heap[0]
                if key not in self._calls:  # its reader is done with it
                    heapq.heappop(self._heap)
                    continue
                if due > time.monotonic():
                    self._cond.wait(due - time.monotonic())
                    continue
                heapq.heappop(self._heap)
                stream = self._calls.pop(key)
            if stream.end():
                with self._cond:
                    self.cancelled += 1
                log.warning("a streaming call's reader was still waiting when its time was up (deadline passed, or the call "
                            "already ended); ended it so the caller can retry")


class _WatchedStream:
    """A streaming call as its caller sees it (an iterator of responses that is also the gRPC
    call), which tells the watchdog when its reader is done with it."""

    def __init__(self, call, forget, expedite) -> None:
        self._call, self._forget, self._expedite = call, forget, expedite
        self._lock = threading.Lock()
        self._reading = False  # the reader waits in __next__ now
        self._grpc_done = False

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            self._reading = True
        try:
            return next(self._call)
        except BaseException:
            self._forget()  # the stream ended (StopIteration) or failed: nothing left to watch
            raise
        finally:
            with self._lock:
                self._reading = False
                done = self._grpc_done
            if done:
                self._forget()  # a reader that comes back to a call gRPC ended is answered at once

    def __getattr__(self, name):
        return getattr(self._call, name)  # the call's methods: cancel, code, details, metadata ...

    def ended_by_grpc(self) -> None:
        with self._lock:
            self._grpc_done = True
            reading = self._reading
        if reading:
            self._expedite()  # gRPC normally wakes the reader itself at once
        else:
            self._forget()

    def end(self) -> bool:
        """Cancel the call, or wake a reader gRPC left waiting on an ended call; True when either
        was needed."""
        if self._call.cancel():
            return True
        return _wake_reader(self._call)


class _PendingOperations(set):
    """gRPC's set of a call's pending operations, in which the receives the watchdog gave up on
    no longer count as awaited by the reader (``in``), yet still count for gRPC's own
    bookkeeping (the set's size, ``remove`` when they complete late): gRPC decides that a call
    is finished when the set is empty, and must go on deciding that itself."""

    def __init__(self, pending, given_up) -> None:
        super().__init__(pending)
        self.given_up = frozenset(given_up)

    def __contains__(self, operation) -> bool:
        return operation not in self.given_up and super().__contains__(operation)


def _wake_reader(call) -> bool:
    """Wake the reader of a call gRPC ended while its receive operations stayed pending.

    This reads gRPC Python's private call state (``_state``: its condition, status code and
    pending operations), because there is no public way to end a wait gRPC itself should have
    ended; tests/test_transport.py checks it against the installed gRPC. With the pending
    receives no longer awaited, the reader raises the status gRPC gave the call. Returns False,
    and changes nothing, where the call is not in that state or its state looks different."""
    state = getattr(call, "_state", None)
    condition, due = getattr(state, "condition", None), getattr(state, "due", None)
    if condition is None or not isinstance(due, set):
        return False
    with condition:
        if getattr(state, "code", None) is None:
            return False
        stale = {op for op in due if getattr(op, "name", "").startswith("receive_")}
        if not stale:
            return False
        state.due = _PendingOperations(due, stale)
        condition.notify_all()
    return True


# The watchdog of every channel ``make_channel`` makes.
WATCHDOG = CallWatchdog()


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise TransportError(f"address {address!r} must be HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise TransportError(f"address {address!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise TransportError(f"address {address!r}: port {number} is out of range")
    return host.strip("[]"), number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def make_server(address: str, *, tls_cert: str = "", tls_key: str = "", tls_client_ca: str = "", insecure: bool = False,
                max_workers: int = 32, interceptors: Sequence[grpc.ServerInterceptor] = (), thread_pool: futures.ThreadPoolExecutor | None = None,
                maximum_concurrent_rpcs: int = 0) -> tuple[grpc.Server, int]:
    """A gRPC server bound to ``address`` (port 0 picks a free port); returns it and its port.
    With ``tls_client_ca`` (mutual TLS) the handshake fails for a client without a certificate
    signed by that CA. ``thread_pool`` runs the handlers (default: ``max_workers`` threads).
    Calls beyond ``maximum_concurrent_rpcs`` at once (default: four per worker), queued ones
    included, are refused at once (RESOURCE_EXHAUSTED) instead of queued.

    Stalled calls are not bounded here: gRPC's connection options (keepalive, idle and age
    limits) see a connection whose peer answers pings as healthy, however long a call on it
    waits for its request. The coordinator's interceptor (fedtune.coordinator.guard) gives
    every call its server-side deadlines."""
    host, _ = split_address(address)
    if tls_client_ca and not tls_cert:
        raise TransportError("mutual TLS (tls_client_ca) needs the server's own tls_cert and tls_key")
    pool = thread_pool or futures.ThreadPoolExecutor(max_workers=max_workers)
    # No SO_REUSEPORT (gRPC's default): a second coordinator started on a port already in use
    # would otherwise share it silently, the kernel handing each new connection to either one.
    server = grpc.server(pool, options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)], interceptors=list(interceptors),
                         maximum_concurrent_rpcs=maximum_concurrent_rpcs or 4 * max_workers)
    try:
        if tls_cert:
            creds = grpc.ssl_server_credentials(
                [(_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate"))],
                root_certificates=_read(tls_client_ca, "TLS client CA certificate") if tls_client_ca else None,
                require_client_auth=bool(tls_client_ca),
            )
            port = server.add_secure_port(address, creds)
        else:
            if not (is_loopback(host) or insecure):
                raise TransportError(
                    f"refusing to serve plaintext on {address}: give tls_cert and tls_key, "
                    "or set insecure = true if the network is trusted"
                )
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise TransportError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise TransportError(f"cannot listen on {address} (in use or not a local address)")
    return server, port


def make_channel(address: str, *, tls_ca: str = "", tls_cert: str = "", tls_key: str = "", insecure: bool = False) -> grpc.Channel:
    """A channel to the coordinator: TLS when a CA file is given (or the host is remote); with
    ``tls_cert``/``tls_key`` the client also proves who it is (mutual TLS)."""
    host, _ = split_address(address)
    if bool(tls_cert) != bool(tls_key):
        raise TransportError("the client's tls_cert and tls_key go together")
    if tls_cert and not tls_ca:
        raise TransportError("a client certificate (mutual TLS) needs tls_ca, the CA that signed the coordinator's certificate")
    if tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca, "TLS CA certificate"),
            private_key=_read(tls_key, "TLS client key") if tls_key else None,
            certificate_chain=_read(tls_cert, "TLS client certificate") if tls_cert else None,
        )
        channel = grpc.secure_channel(address, creds, options=GRPC_OPTIONS)
    elif is_loopback(host) or insecure:
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    else:  # a remote coordinator without an explicit CA: TLS with the system's roots
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(), options=GRPC_OPTIONS)
    return grpc.intercept_channel(channel, WATCHDOG)
