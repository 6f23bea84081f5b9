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
    """Cancels a streaming call still unfinished ``grace_s`` seconds after its deadline.

    gRPC enforces deadlines itself, yet a response stream begun while its server was being
    stopped (a coordinator killed and restarted on the same port) was seen waiting past its
    deadline with nothing to end it: a device would then wait for ever for a coordinator that
    had come back. The cancelled call raises ``CANCELLED`` in the waiting thread, which the
    caller's retry path handles like any lost connection. One thread watches every call of the
    process; a call that ends on time is forgotten when it ends."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.cancelled = 0  # calls this watchdog had to cancel
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._calls: dict[int, grpc.Future] = {}
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
        with self._cond:
            self._calls[key] = call
            heapq.heappush(self._heap, (time.monotonic() + details.timeout + self.grace_s, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedtune-call-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        call.add_done_callback(lambda _: self._forget(key))
        return call

    def _forget(self, key: int) -> None:
        with self._cond:
            self._calls.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                due, key = self._heap[0]
                if key not in self._calls:  # ended on time
                    heapq.heappop(self._heap)
                    continue
                if due > time.monotonic():
                    self._cond.wait(due - time.monotonic())
                    continue
                heapq.heappop(self._heap)
                call = self._calls.pop(key)
                self.cancelled += 1
            log.warning("a call ran %.0f s past its deadline with no answer; cancelled it", self.grace_s)
            call.cancel()


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
