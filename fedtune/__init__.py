"""fedtune: federated and split fine-tuning of pretrained transformers on edge devices.

The Python API (README, section "Python API"): every name below is imported on first use, so
``import fedtune`` stays light (no torch until a name that needs it is touched).

- ``simulate(config=None, **overrides)``: run a simulation, get its metrics rows;
- ``RunConfig``, ``load_config``: a run's configuration;
- ``Strategy``, ``Wrapper``, ``RecipeWrapper``: the coordinator's side of a method, and
  ``Instruction``, ``ClientUpdate``, ``RoundContext``, ``ClientInfo`` of its round contract;
- ``Recipe``: the device's side (how a client trains);
- ``Options``: a base for their options dataclasses; ``declare``: what a part provides,
  refuses and needs;
- ``register_strategy``, ``register_recipe``: registration under a name (installed entry
  points and ``package.module:Name`` specs need none: ``fedtune.registry``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a few ms)

__version__ = "0.1.0"

from fedtune.logs import quiet_offline_kernel_lookup  # noqa: E402  (logging only: no torch)

quiet_offline_kernel_lookup()

# name -> module that defines it
_EXPORTS = {
    "simulate": "fedtune.api",
    "Options": "fedtune.api",
    "SimulationError": "fedtune.api",
    "register_strategy": "fedtune.api",
    "register_recipe": "fedtune.api",
    "RunConfig": "fedtune.config",
    "ConfigError": "fedtune.config",
    "load_config": "fedtune.config",
    "Strategy": "fedtune.aggregation.base",
    "Wrapper": "fedtune.aggregation.base",
    "RecipeWrapper": "fedtune.aggregation.base",
    "Instruction": "fedtune.aggregation.base",
    "ClientUpdate": "fedtune.aggregation.base",
    "RoundContext": "fedtune.aggregation.base",
    "ClientInfo": "fedtune.aggregation.base",
    "Recipe": "fedtune.client.recipes.base",
    "declare": "fedtune.contract.properties",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from fedtune.aggregation.base import ClientInfo, ClientUpdate, Instruction, RecipeWrapper, RoundContext, Strategy, Wrapper
    from fedtune.api import Options, SimulationError, register_recipe, register_strategy, simulate
    from fedtune.client.recipes.base import Recipe
    from fedtune.config import ConfigError, RunConfig, load_config
    from fedtune.contract.properties import declare


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
