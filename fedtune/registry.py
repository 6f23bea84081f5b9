"""Name -> implementation registries that reject unknown names, and find plugins.

Algorithms (aggregation strategies, client recipes, codecs, tasks, data partitions) are chosen
by name in config files and on the command line. A typo must fail loudly with the list of valid
names, never fall back to a default silently.

A name that is not registered is looked for, in this order, among:

1. the installed entry points of the registry's group (``fedtune.strategies``,
   ``fedtune.recipes``, ``fedtune.variants``, ``fedtune.codecs``, ``fedtune.tasks``, ``fedtune.partitions``,
   ``fedtune.adapter_kinds``): a
   package declares ``median = "fedtune_median:Median"`` under
   ``[project.entry-points."fedtune.strategies"]`` and ``--aggregation median`` finds it. Only the
   entry point named is loaded, on first use, so an installed plugin costs nothing until chosen;
2. a spec ``package.module:Name`` (registries whose names only the local operator chooses:
   strategies and partitions). The module is imported and ``Name`` registered under the spec.

Either way the object must be what the registry holds (a ``Strategy`` subclass for strategies,
and so on), or the lookup fails with one line naming the problem. A device never imports a module
named by the coordinator: recipes, codecs and tasks (whose names arrive in the coordinator's
instructions) take registered names and installed entry points only.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised when a name is not registered; the message lists the valid names."""


class PluginError(UnknownNameError):
    """A ``module:Name`` spec or an entry point that cannot be used: the module or attribute is
    missing, fails to import, or is not what the registry holds; the message is one line."""


@dataclass(frozen=True)
class PluginPolicy:
    """How a registry finds what is not registered: its entry point ``group``, the class every
    item must subclass (``base``, as ``"module:Name"``, imported when first needed; empty: any
    callable) and whether it imports ``module:Name`` specs (``specs``)."""

    group: str
    base: str = ""
    specs: bool = False


# fedtune's registries, by kind. Recipes, codecs, tasks and adapter kinds are named by the coordinator in what it
# sends a device, so they resolve only what is installed on the device (never a module a remote
# party names). A Registry may also be given its policy directly.
POLICIES: dict[str, PluginPolicy] = {
    "strategy": PluginPolicy("fedtune.strategies", "fedtune.aggregation.base:Strategy", specs=True),
    "recipe": PluginPolicy("fedtune.recipes", "fedtune.client.recipes.base:Recipe"),
    "variant": PluginPolicy("fedtune.variants", "fedtune.aggregation.base:Variant"),
    "codec": PluginPolicy("fedtune.codecs", "fedtune.compression.base:Codec"),
    "task": PluginPolicy("fedtune.tasks", "fedtune.tasks.base:Task"),
    "partition": PluginPolicy("fedtune.partitions", specs=True),
    "adapter kind": PluginPolicy("fedtune.adapter_kinds", "fedtune.contract.adapter_kinds:AdapterKind"),
}

_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_spec(name: str) -> bool:
    """Whether ``name`` is written as ``package.module:Name`` (registered names have no colon)."""
    return ":" in name


class Registry(Generic[T]):
    """A small mapping from names to objects (usually classes or factories)."""

    def __init__(self, kind: str, policy: PluginPolicy | None = None, discover: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.policy = policy or POLICIES.get(kind) or PluginPolicy(f"fedtune.{kind}s")
        self._items: dict[str, T] = {}
        self._lock = threading.RLock()  # lookups that load plugins (clients train on threads)
        # Imports the modules that register fedtune's own items, once, at the first lookup
        # (fedtune.methods.discover): a registry costs nothing until it is used.
        self._discover = discover
        self._discovered = discover is None
        self._discovering = False

    def discover(self) -> None:
        """Register fedtune's own items now (done by the first lookup)."""
        if self._discovered:
            return
        with self._lock:
            if self._discovered or self._discovering:  # done, or a re-entrant call from the discovery itself
                return
            self._discovering = True
            try:
                assert self._discover is not None
                self._discover()
                self._discovered = True
            finally:
                self._discovering = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("fedavg")``."""

        def decorate(obj: T) -> T:
            with self._lock:
                if name in self._items and self._items[name] is not obj:
                    raise ValueError(f"{self.kind} {name!r} is registered twice")
                _name(obj, name)
                self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The object registered as ``name``; else the installed entry point of that name, or
        the ``module:Name`` spec, loaded and registered (see the module docstring). Raises
        UnknownNameError (listing the valid names) or PluginError (one line: what is wrong)."""
        try:
            return self._items[name]
        except KeyError:
            pass
        self.discover()
        with self._lock:
            if name in self._items:
                return self._items[name]
            obj = self._from_spec(name) if is_spec(name) else self._from_entry_point(name)
            if obj is None:
                raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.available())}")
            if self._items.setdefault(name, obj) is not obj:  # the plugin's import registered another object as name
                raise PluginError(f"{self.kind} {name!r}: its package registers another object under that name on import")
            _name(obj, name)
            return obj

    def names(self) -> list[str]:
        """The registered names (fedtune's own, and plugins loaded so far)."""
        self.discover()
        return sorted(self._items)

    def available(self) -> list[str]:
        """The registered names and the names of installed entry points not loaded yet."""
        self.discover()
        return sorted(set(self._items) | {ep.name for ep in self._entry_points()})

    def __contains__(self, name: object) -> bool:
        """Registered now (``get`` also loads plugins)."""
        self.discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # ---------------------------------------------------------------- plugins

    def _entry_points(self) -> list[Any]:
        import importlib.metadata  # only on a miss: `import fedtune` stays light

        try:
            return list(importlib.metadata.entry_points(group=self.policy.group))
        except Exception:  # a broken installed distribution must not hide fedtune's own names
            return []

    def _from_entry_point(self, name: str) -> T | None:
        found = [ep for ep in self._entry_points() if ep.name == name]
        if not found:
            return None
        values = sorted({ep.value for ep in found})
        if len(values) > 1:
            raise PluginError(f"{self.kind} {name!r}: installed packages give different entry points for it "
                              f"in group {self.policy.group} ({', '.join(values)}); uninstall one")
        where = f"{self.kind} {name!r} (entry point {name} = {values[0]} in group {self.policy.group})"
        try:
            obj = found[0].load()
        except Exception as exc:
            raise PluginError(f"{where}: failed to load: {_one_line(exc)}") from None
        self._check(obj, where)
        return obj

    def _from_spec(self, spec: str) -> T:
        where = f"{self.kind} {spec!r}"
        if not self.policy.specs:
            raise PluginError(f"{where}: a {self.kind} is found by a registered name or an installed entry point "
                              f"(group {self.policy.group}), not by a module:Name spec; install the package that provides it")
        if not _SPEC.match(spec):
            raise PluginError(f"{where}: expected package.module:Name")
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise PluginError(f"{where}: no module named {exc.name!r} (is its package installed?)") from None
            raise PluginError(f"{where}: importing {module_name} failed: {_one_line(exc)}") from None
        except Exception as exc:
            raise PluginError(f"{where}: importing {module_name} failed: {_one_line(exc)}") from None
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise PluginError(f"{where}: module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        self._check(obj, where)
        return obj

    def _check(self, obj: Any, where: str) -> None:
        base = self.policy.base
        if not base:
            if not callable(obj):
                raise PluginError(f"{where}: {_qualname(obj)} is not callable")
            return
        module_name, _, attr = base.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(obj, type) and issubclass(obj, cls)):
            raise PluginError(f"{where}: {_qualname(obj)} is not a {attr} subclass ({module_name}.{attr})")


def _name(obj: Any, name: str) -> None:
    """A class that has a ``name`` attribute (strategies, recipes, codecs, tasks) but does not
    set its own takes the name it is registered under: an inherited name ("local") would make
    two different recipes one in the composed recipes' cache and in the run's records."""
    if isinstance(obj, type) and hasattr(obj, "name") and "name" not in vars(obj):
        obj.name = name


def _qualname(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    return f"{type(obj).__name__} {obj!r}"[:80]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
