"""The coordinator's record of registered clients: identity, secret token, capabilities, and
when each was last heard from."""

from __future__ import annotations

import hmac
import math
import os
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
    # What the party registered with (see ClientRegistry.register): "cert:<fingerprint>",
    # "secret:<name>", "address:<host>"; None for enrollments without one (loopback, in-process).
    credential: str | None = field(default=None, repr=False)


# The one answer to credentials that do not match: the same whether the client id exists or
# not, so ids cannot be discovered by asking.
BAD_CREDENTIALS = "unknown client id or bad token (or certificate) for it: register again"
_DUMMY_TOKEN = secrets.token_urlsafe(24).encode()
_LOOPBACK = re.compile(r"(ipv4:127\.[0-9.]+|ipv6:\[?::1\]?|ipv6:\[?::ffff:127\.[0-9.]+\]?|unix:.*|unix-abstract:.*|localhost)")


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer address without its port ("ipv4:127.0.0.1", "ipv6:[::1]",
    "unix:/path") is on this host."""
    return bool(_LOOPBACK.fullmatch(peer))


_secrets_cache: dict[str, tuple[int, dict[str, str]]] = {}
_secrets_lock = threading.Lock()


def load_enrollment_secrets(path: str) -> dict[str, str]:
    """Per-device enrollment secrets: a file of ``name secret`` lines (blank lines and lines
    starting with '#' are skipped), each name a valid client name, each secret at least 16
    characters. Re-read when the file changes, so devices can be added without a restart.
    Raises ValueError naming the line on a malformed file, OSError when it cannot be read."""
    mtime = os.stat(path).st_mtime_ns
    with _secrets_lock:
        hit = _secrets_cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    table: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not _NAME.fullmatch(parts[0]) or len(parts[1]) < 16:
                raise ValueError(f"line {number}: expected 'name secret' (a client name and a secret of at least 16 characters)")
            if parts[0] in table:
                raise ValueError(f"line {number}: name {parts[0]!r} given twice")
            table[parts[0]] = parts[1]
    with _secrets_lock:
        _secrets_cache[path] = (mtime, table)
    return table


class ClientRegistry:
    """Thread-safe registry. Client ids derive from the name the device gives (made unique),
    so simulated runs with named clients are reproducible; tokens are random secrets.

    Registrations are rate-limited (a token bucket: ``rate`` per second, bursts of ``burst``);
    a registering party with a credential first spends from its own bucket (a tenth of the
    rate, bursts of ``CREDENTIAL_BURST``), so that one party's attempts, refused or not, cannot
    drain the bucket the rest of the fleet registers from. When the registry is full, records
    silent for ``evict_after_s`` make room (an evicted client that comes back is told to
    register again)."""

    CREDENTIAL_BURST = 16
    CREDENTIAL_SHARE = 0.1  # of ``rate``
    _MAX_BUCKETS = 10_000   # credentials' buckets kept; full (idle) ones are dropped beyond it

    def __init__(self, max_clients: int = 100_000, *, rate: float = 20.0, burst: int = 100, evict_after_s: float = 86_400.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_clients = max_clients
        self.rate, self.burst, self.evict_after_s, self.clock = rate, burst, evict_after_s, clock
        self._lock = threading.Lock()
        self._clients: dict[str, ClientRecord] = {}
        self._allowance, self._refilled = float(burst), clock()
        self._suffix: dict[str, int] = {}  # name -> last suffix given, so a taken name costs O(1)
        self._by_credential: dict[str, set[str]] = {}  # credential -> ids of its records
        self._buckets: dict[str, tuple[float, float]] = {}  # credential -> (allowance, refilled at)

    def register(self, name: str, capabilities: Capabilities, num_examples: int, *, credential: str | None = None, limit: int = 0,
                 live_s: float = math.inf) -> ClientRecord:
        """A new record for ``name``; its client id is the name.

        Without ``credential`` (in-process enrollments, and open or shared-secret enrollment on
        loopback) a taken name is made unique with a suffix ("dev-2"), as before. With one (what
        identifies the registering party: a certificate fingerprint, a per-device secret, an
        address), names are not renamed:

        - a name held by a record of the same credential is replaced (a restarted device gets a
          new token under its old id);
        - a name held by another credential's record heard from within ``live_s`` seconds is
          refused (FAILED_PRECONDITION); a silent one is taken over;
        - a credential holds at most ``limit`` records (0: no limit): over it, its longest-silent
          record makes room if silent for ``live_s`` seconds, else RESOURCE_EXHAUSTED."""
        name = name or "client"
        if not _NAME.fullmatch(name):
            raise CoordinatorError("INVALID_ARGUMENT", f"client name {name[:80]!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        with self._lock:
            now = self.clock()
            if credential is not None:
                self._spend_credential(credential, now, limit)
            self._allowance = min(float(self.burst), self._allowance + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._allowance < 1.0:
                wait = (1.0 - self._allowance) / self.rate
                raise CoordinatorError("RESOURCE_EXHAUSTED", f"too many registrations; retry in {wait:.1f} s")
            self._allowance -= 1.0  # refused attempts count too
            if credential is None:
                self._make_room(now)
                client_id, n = name, self._suffix.get(name, 1)
                while client_id in self._clients:
                    n += 1
                    client_id = f"{name}-{n}"
                self._suffix[name] = n
                return self._add(ClientRecord(client_id, secrets.token_urlsafe(24), name, capabilities, num_examples, now, now))
            held = self._clients.get(name)
            if held is not None and held.credential != credential and held.last_seen >= now - live_s:
                raise CoordinatorError("FAILED_PRECONDITION", f"client name {name!r} is held by a live client that registered with another credential; "
                                       f"choose another name, or register with the same certificate or secret (or after {live_s:g} s of its silence)")
            mine = [self._clients[cid] for cid in self._by_credential.get(credential, ()) if cid != name]
            while limit and len(mine) >= limit:
                stalest = min(mine, key=lambda r: r.last_seen)
                if stalest.last_seen >= now - live_s:
                    raise CoordinatorError("RESOURCE_EXHAUSTED", f"this credential already holds {len(mine)} live clients, the most allowed "
                                           "(server.max_clients_per_credential); retry once one has gone silent")
                self._remove(stalest.client_id)
                mine.remove(stalest)
            if held is not None:
                self._remove(name)
            else:
                self._make_room(now)
            return self._add(ClientRecord(name, secrets.token_urlsafe(24), name, capabilities, num_examples, now, now, credential=credential))

    def _spend_credential(self, credential: str, now: float, limit: int) -> None:
        """One attempt from ``credential``'s own bucket; RESOURCE_EXHAUSTED when it is empty.
        Lock held."""
        burst = float(max(self.CREDENTIAL_BURST, 2 * limit))
        rate = self.rate * self.CREDENTIAL_SHARE
        allowance, refilled = self._buckets.get(credential, (burst, now))
        allowance = min(burst, allowance + (now - refilled) * rate)
        if allowance < 1.0:
            self._buckets[credential] = (allowance, now)
            raise CoordinatorError("RESOURCE_EXHAUSTED", f"too many registrations with this credential; retry in {(1.0 - allowance) / rate:.1f} s")
        self._buckets[credential] = (allowance - 1.0, now)
        if len(self._buckets) > self._MAX_BUCKETS:  # forget idle parties: a full bucket is what a new one gets
            for key in [k for k, (a, t) in self._buckets.items() if min(burst, a + (now - t) * rate) >= burst]:
                del self._buckets[key]

    def _make_room(self, now: float) -> None:
        """Evict stale records when full; RESOURCE_EXHAUSTED when still full. Lock held."""
        if len(self._clients) >= self.max_clients:
            self._evict(now)
        if len(self._clients) >= self.max_clients:
            raise CoordinatorError("RESOURCE_EXHAUSTED", f"the coordinator already has {self.max_clients} clients")

    def _add(self, record: ClientRecord) -> ClientRecord:
        self._clients[record.client_id] = record
        if record.credential is not None:
            self._by_credential.setdefault(record.credential, set()).add(record.client_id)
        return record

    def _remove(self, client_id: str) -> None:
        record = self._clients.pop(client_id, None)
        if record is not None and record.credential is not None:
            ids = self._by_credential.get(record.credential)
            if ids is not None:
                ids.discard(client_id)
                if not ids:
                    del self._by_credential[record.credential]

    def _evict(self, now: float) -> None:
        """Drop the records silent for longer than evict_after_s; call with the lock held."""
        stale = [cid for cid, r in self._clients.items() if r.last_seen < now - self.evict_after_s]
        for cid in stale:
            self._remove(cid)

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
