"""The call metadata that authenticates a client: its id and token, sent with every call but
``Register`` and the health check. The agent and the split link send them
(``credentials``); the coordinator's admission control reads them (``fedtune.coordinator.guard``).
Where secrets themselves come from is ``fedtune.credentials``."""

from __future__ import annotations

CLIENT_ID_KEY = "x-fedtune-client-id"
TOKEN_KEY = "x-fedtune-token"


def credentials(client_id: str, token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates ``client_id`` (what the agent sends on every call)."""
    return ((CLIENT_ID_KEY, client_id), (TOKEN_KEY, token))
