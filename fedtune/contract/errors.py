"""Errors the coordinator reports to a client. ``code`` is the name of the gRPC status the
service answers with; the round logic itself does not depend on gRPC. Both halves of the
coordinator's work raise them: the round engine (``fedtune.coordinator``) and the server half
of a split session (``fedtune.split.server``)."""

from __future__ import annotations

CODES = {"INVALID_ARGUMENT", "UNAUTHENTICATED", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE"}


class CoordinatorError(Exception):
    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown status code {code}")
        super().__init__(message)
        self.code = code
        self.message = message
