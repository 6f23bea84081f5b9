"""The coordinator's record of registered clients: identity, secret token, capabilities, and
when each was last heard from."""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from fedtune.coordinator.errors import CoordinatorError
from fedtune.devices import Capabilities

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class ClientRecord:
    client_id: str
    token: str = field(repr=False)
    name: str
    capabilities: Capabilities
    num_examples: int
    registered_at: float
    last_seen: float
    # The device declined to train for this federation (its own privacy terms): never selected
    # again under this id.
    retired: bool = False
    # With mutual TLS: the SHA-256 fingerprint of the certificate the client registered with;
    # its token is then accepted only on connections made with that certificate.
    certificate: str = field(default="", repr=False)


# The one answer to credentials that do not match: the same whether the client id exists or
# not, so ids cannot be discovered by asking.
BAD_CREDENTIALS = "unknown client id or bad token (or certificate) for it: register again"
_DUMMY_TOKEN = secrets.token_urlsafe(24).encode()


class ClientRegistry:
    """Thread-safe registry. Client ids derive from the name the device gives (made unique),
    so simulated runs with named clients are reproducible; tokens are random secrets.

    Registrations are rate-limited (a token bucket: ``rate`` per second, bursts of ``burst``);
    when the registry is full, records silent for ``evict_after_s`` make room (an evicted
    client that comes back is told to register again)."""

    def __init__(self, max_clients: int = 100_000, *, rate: float = 20.0, burst: int = 100, evict_after_s: float = 86_400.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_clients = max_clients
        self.rate, self.burst, self.evict_after_s, self.clock = rate, burst, evict_after_s, clock
        self._lock = threading.Lock()
        self._clients: dict[str, ClientRecord] = {}
        self._allowance, self._refilled = float(burst), clock()
        self._suffix: dict[str, int] = {}  # name -> last suffix given, so a taken name costs O(1)

    def register(self, name: str, capabilities: Capabilities, num_examples: int) -> ClientRecord:
        name = name or "client"
        if not _NAME.fullmatch(name):
            raise CoordinatorError("INVALID_ARGUMENT", f"client name {name[:80]!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        with self._lock:
            now = self.clock()
            self._allowance = min(float(self.burst), self._allowance + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._allowance < 1.0:
                wait = (1.0 - self._allowance) / self.rate
                raise CoordinatorError("RESOURCE_EXHAUSTED", f"too many registrations; retry in {wait:.1f} s")
            self._allowance -= 1.0
            if len(self._clients) >= self.max_clients:
                self._evict(now)
            if len(self._clients) >= self.max_clients:
                raise CoordinatorError("RESOURCE_EXHAUSTED", f"the coordinator already has {self.max_clients} clients")
            client_id, n = name, self._suffix.get(name, 1)
            while client_id in self._clients:
                n += 1
                client_id = f"{name}-{n}"
            self._suffix[name] = n
            record = ClientRecord(client_id, secrets.token_urlsafe(24), name, capabilities, num_examples, now, now)
            self._clients[client_id] = record
            return record

    def _evict(self, now: float) -> None:
        """Drop the records silent for longer than evict_after_s; call with the lock held."""
        stale = [cid for cid, r in self._clients.items() if r.last_seen < now - self.evict_after_s]
        for cid in stale:
            del self._clients[cid]

    def authenticate(self, client_id: str, token: str, certificate: str | None = None) -> ClientRecord:
        """The client's record, after checking its token; refreshes its last-seen time. With
        ``certificate`` (the fingerprint of the caller's TLS client certificate, "" for none), a
        client that registered with a certificate must also call with that one. An unknown id,
        a wrong token and a wrong certificate get the same UNAUTHENTICATED answer."""
        with self._lock:
            record = self._clients.get(client_id)
            # compared either way, so an unknown id takes as long to refuse as a known one
            good = hmac.compare_digest(record.token.encode() if record is not None else _DUMMY_TOKEN, token.encode())
            if record is None or not good:
                raise CoordinatorError("UNAUTHENTICATED", BAD_CREDENTIALS)
            if certificate is not None and record.certificate and not hmac.compare_digest(record.certificate, certificate):
                raise CoordinatorError("UNAUTHENTICATED", BAD_CREDENTIALS)
            record.last_seen = self.clock()
            return record

    def bind_certificate(self, client_id: str, certificate: str) -> None:
        """Accept ``client_id``'s token only with the TLS client certificate of this
        fingerprint from now on (called at registration, before the token is handed out)."""
        with self._lock:
            if client_id in self._clients:
                self._clients[client_id].certificate = certificate

    def touch(self, client_id: str) -> None:
        with self._lock:
            if client_id in self._clients:
                self._clients[client_id].last_seen = self.clock()

    def alive(self, timeout_s: float) -> list[ClientRecord]:
        """Clients heard from within ``timeout_s``, sorted by id."""
        cutoff = self.clock() - timeout_s
        with self._lock:
            return sorted((r for r in self._clients.values() if r.last_seen >= cutoff and not r.retired), key=lambda r: r.client_id)

    def is_alive(self, client_id: str, timeout_s: float) -> bool:
        with self._lock:
            record = self._clients.get(client_id)
            return record is not None and not record.retired and record.last_seen >= self.clock() - timeout_s

    def retire(self, client_id: str) -> None:
        """Stop selecting ``client_id``: its device declined to train for this federation."""
        with self._lock:
            if client_id in self._clients:
                self._clients[client_id].retired = True

    def all(self) -> list[ClientRecord]:
        with self._lock:
            return sorted(self._clients.values(), key=lambda r: r.client_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)
