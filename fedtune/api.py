"""fedtune's Python API: what ``fedtune`` exports (see ``fedtune/__init__.py``) beyond the
classes of the round contract.

- ``simulate(config, **overrides)``: a whole federation on this machine, as ``fedtune simulate``
  runs it, returning the metrics rows;
- ``Options``: a base for the options dataclass of a strategy or a recipe;
- ``register_strategy`` / ``register_recipe``: registration under a name, from any package.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from fedtune.config import ConfigError, RunConfig, config_from_dict, load_config, set_key

C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class Options:
    """A base for the options of a strategy or a recipe (``Options = MyOptions`` on the class).

    Any frozen dataclass is one; this base only says what fedtune expects of it. Subclass it
    with ``@dataclass(frozen=True)`` and give every field a type (bool, int, float or str) and a
    default. fedtune fills it from ``[federation.options]`` (TOML values) or ``-o key=value``
    (strings, parsed by the field's type), refuses unknown keys and wrong types naming the key,
    and reports a ``ValueError`` raised by ``__post_init__`` (a range check) the same way::

        @dataclass(frozen=True)
        class MedianOptions(fedtune.Options):
            weighted: bool = False

            def __post_init__(self) -> None:
                ...  # raise ValueError("...") for values out of range

    A recipe's options travel to the device as strings in the instruction; a strategy sends
    the ones its recipe needs (``Strategy.recipe_options``).
    """


class SimulationError(RuntimeError):
    """A simulation that ended before its last round for a reason other than a stop rule of
    the run (a privacy budget): the message names the first client error."""


def simulate(config: RunConfig | str | os.PathLike | Mapping[str, Any] | None = None, *,
             on_round_end: Callable[[dict], None] | None = None, **overrides: Any) -> list[dict]:
    """Run a simulation (one coordinator and ``simulation.clients`` clients in this process,
    over gRPC on loopback, as ``fedtune simulate``) and return its metrics rows, one dict per
    round (``round``, ``train_loss``, ``eval_loss``, ``eval_accuracy`` or ``eval_perplexity``,
    ``bytes_up``, ...; the rows of the run directory's ``metrics.jsonl``).

    ``config``: a RunConfig (left unchanged: the run works on a copy), the path of a TOML file,
    a dict shaped like one, or None for the defaults. ``overrides`` set keys on top of it, with
    the type checks of a config file:

    - a dotted key, ``simulate(**{"federation.rounds": 2})``, or the same with ``__`` for the
      dot, ``simulate(federation__rounds=2, simulation__clients=3)``;
    - a section as a dict, ``simulate(federation={"rounds": 2, "aggregation": "median"})``;
    - a top-level key, ``simulate(seed=1, run_dir="runs/demo")``.

    ``on_round_end(row)`` is called after each round. An unknown key, a wrong value or parts
    that cannot work together raise ``ConfigError`` before anything runs; a run whose clients
    failed raises ``SimulationError``. ``fedtune.simulation.runner.run_simulation`` gives the
    whole result (run directory, client reports, FedSA's evaluation-only round).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fedtune never downloads models
    from fedtune.simulation.runner import run_simulation

    run_config = build_config(config, **overrides)
    result = run_simulation(run_config, on_round_end=on_round_end)
    rounds = run_config.federation.rounds
    if len(result.history) < rounds and not result.stopped_because:
        first = f": {result.client_errors[0]}" if result.client_errors else ""
        raise SimulationError(f"the simulation ended after {len(result.history)} of {rounds} rounds{first} (run directory {result.run_dir})")
    return [dict(row) for row in result.history]


def build_config(config: RunConfig | str | os.PathLike | Mapping[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """The RunConfig ``simulate`` runs (see there for ``config`` and ``overrides``), a new
    object; the schema is checked, the composition when the run starts."""
    if config is None:
        out = RunConfig()
    elif isinstance(config, RunConfig):
        out = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        out = load_config(Path(config))
    elif isinstance(config, Mapping):
        out = config_from_dict(copy.deepcopy(dict(config)))
    else:
        raise TypeError(f"config: expected a RunConfig, a TOML path, a dict or None, got {type(config).__name__}")
    for key, value in overrides.items():
        _override(out, key.replace("__", "."), value)
    return out.validate()


def _override(config: RunConfig, dotted: str, value: Any) -> None:
    target: Any = config
    *path, last = dotted.split(".")
    for i, part in enumerate(path):
        if not (dataclasses.is_dataclass(target) and part in _fields(target) and dataclasses.is_dataclass(getattr(target, part))):
            raise ConfigError(f"unknown key {'.'.join(path[: i + 1])!r} (in override {dotted!r})")
        target = getattr(target, part)
    fields = _fields(target)
    if last not in fields:
        where = ".".join(path)
        raise ConfigError(f"unknown key {dotted!r} (valid keys{' of ' + where if where else ''}: {', '.join(sorted(fields))})")
    if dataclasses.is_dataclass(getattr(target, last)):  # a whole section: federation={"rounds": 2}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{dotted}: expected a dict of its keys, got {type(value).__name__}")
        for key, item in value.items():
            _override(config, f"{dotted}.{key}", item)
        return
    set_key(config, dotted, value)


def _fields(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def register_strategy(name: str, cls: C | None = None) -> Any:
    """Register a Strategy subclass as ``name`` (``--aggregation name``): as a decorator,
    ``@register_strategy("median")``, or a call, ``register_strategy("median", Median)``. A
    class that sets no ``name`` of its own takes this one. Registering runs when its module is
    imported; an entry point (group ``fedtune.strategies``) or a ``module:Name`` spec lets
    fedtune import it when a run names it."""
    return _register("strategy", name, cls)


def register_recipe(name: str, cls: C | None = None) -> Any:
    """Register a Recipe subclass as ``name`` (what a strategy's ``recipe()`` returns): as a
    decorator or a call, like ``register_strategy``. A device finds recipes by registered name
    or installed entry point (group ``fedtune.recipes``), never by a module the coordinator
    names: a real device needs the package installed, and its entry point (or an import that
    registers it) declared. Simulated clients share the coordinator's process, so a recipe
    registered when its strategy's module is imported is found there."""
    return _register("recipe", name, cls)


def _register(kind: str, name: str, cls: Any) -> Any:
    if kind == "strategy":
        from fedtune.aggregation.base import STRATEGIES as registry, Strategy as base
    else:
        from fedtune.client.recipes.base import RECIPES as registry, Recipe as base  # type: ignore[assignment]

    def decorate(obj: Any) -> Any:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"register_{kind}({name!r}): {obj!r} is not a {base.__name__} subclass")
        return registry.register(name)(obj)

    return decorate if cls is None else decorate(cls)
