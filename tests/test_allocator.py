"""fedtune's malloc settings: applied by the long-running commands on glibc, never over a
setting the user made, and not at all with FEDTUNE_MALLOC=default. Each case runs in a fresh
interpreter: mallopt changes the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = ("import json; from fedtune.allocator import release_free_memory, tune_allocator; "
          "applied = tune_allocator({arenas}); release_free_memory(); print(json.dumps(applied))")
GLIBC = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))


def _applied(arenas: int = 2, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FEDTUNE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(arenas=arenas)], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_settings_apply_on_glibc_and_respect_the_users():
    assert _applied(1) == {"MALLOC_ARENA_MAX": 1} and _applied() == {"MALLOC_ARENA_MAX": 2}
    # A setting the user made in the environment is glibc's already: left alone.
    assert _applied(2, MALLOC_ARENA_MAX="4") == {}
    assert _applied(2, FEDTUNE_MALLOC="default") == {}


def test_only_the_long_running_commands_tune_the_allocator():
    from fedtune.cli import LONG_RUNNING, build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert LONG_RUNNING == {"simulate", "coordinator", "client"} and LONG_RUNNING <= commands
