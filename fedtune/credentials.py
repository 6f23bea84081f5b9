"""Where secrets come from: a file or an environment variable, never the command line (every
user of the machine can read a process's argv with ``ps``) and never the run directory."""

from __future__ import annotations

import os
from pathlib import Path

ENROLLMENT_SECRET_ENV = "FEDTUNE_ENROLLMENT_SECRET"


class SecretError(ValueError):
    """A secret file that cannot be used."""


def read_secret(path: str = "", env: str = ENROLLMENT_SECRET_ENV) -> str:
    """The secret in ``path`` (surrounding whitespace stripped) when a path is given, else the
    value of the environment variable ``env``, else ""."""
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"cannot read the secret file {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
        if not value:
            raise SecretError(f"the secret file {path!r} is empty")
        return value
    return os.environ.get(env, "").strip()
