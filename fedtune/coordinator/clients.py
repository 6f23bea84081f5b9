"""The coordinator's record of registered clients: identity, secret token, capabilities, and
when each was last heard from."""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

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


class ClientRegistry:
    """Thread-safe registry. Client ids derive from the name the device gives (made unique),
    so simulated runs with named clients are reproducible; tokens are random secrets."""

    def __init__(self, max_clients: int = 100_000) -> None:
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._clients: dict[str, ClientRecord] = {}
        self._suffix: dict[str, int] = {}  # name -> last suffix given, so a taken name costs O(1)

    def register(self, name: str, capabilities: Capabilities, num_examples: int) -> ClientRecord:
        name = name or "client"
        if not _NAME.fullmatch(name):
            raise CoordinatorError("INVALID_ARGUMENT", f"client name {name[:80]!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        with self._lock:
            if len(self._clients) >= self.max_clients:
                raise CoordinatorError("RESOURCE_EXHAUSTED", f"the coordinator already has {self.max_clients} clients")
            client_id, n = name, self._suffix.get(name, 1)
            while client_id in self._clients:
                n += 1
                client_id = f"{name}-{n}"
            self._suffix[name] = n
            now = time.monotonic()
            record = ClientRecord(client_id, secrets.token_urlsafe(24), name, capabilities, num_examples, now, now)
            self._clients[client_id] = record
            return record

    def authenticate(self, client_id: str, token: str) -> ClientRecord:
        """The client's record, after checking its token; refreshes its last-seen time."""
        with self._lock:
            record = self._clients.get(client_id)
            if record is None:
                raise CoordinatorError("NOT_FOUND", f"unknown client id {client_id[:80]!r}: register first")
            if not hmac.compare_digest(record.token.encode(), token.encode()):
                raise CoordinatorError("UNAUTHENTICATED", f"bad token for client {client_id!r}")
            record.last_seen = time.monotonic()
            return record

    def touch(self, client_id: str) -> None:
        with self._lock:
            if client_id in self._clients:
                self._clients[client_id].last_seen = time.monotonic()

    def alive(self, timeout_s: float) -> list[ClientRecord]:
        """Clients heard from within ``timeout_s``, sorted by id."""
        cutoff = time.monotonic() - timeout_s
        with self._lock:
            return sorted((r for r in self._clients.values() if r.last_seen >= cutoff), key=lambda r: r.client_id)

    def is_alive(self, client_id: str, timeout_s: float) -> bool:
        with self._lock:
            record = self._clients.get(client_id)
            return record is not None and record.last_seen >= time.monotonic() - timeout_s

    def all(self) -> list[ClientRecord]:
        with self._lock:
            return sorted(self._clients.values(), key=lambda r: r.client_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)
