"""The package's layers point one way (README, "Layout"): a module imports only modules of its own
layer or of lower ones, never a higher one.

    1  contract and leaves: fedtune.contract, config, registry, options, names, rng, durable,
       devices, credentials, certs, allocator, logs, transport, and the protocol's messages
       (fedtune.protocol, .fedtune_pb2, .fedtune_pb2_grpc, .messages, .generate)
    2  building blocks: tasks, adapters, models, data, compression, privacy (the math), split,
       protocol.tensors and protocol.stubs (tensors on the wire go through the codecs)
    3  the two sides of a round, side by side: aggregation and every method's strategy.py (the
       coordinator's strategies), and client and every method's recipe.py (the device); neither
       imports the other. A method's folder (fedtune.methods.<method>) and its options.py are
       layer 1: both sides read them
    4  coordinator, compose (never the device side: a coordinator runs without device code)
    5  simulation, flower, privacy.audit, privacy.report (they drive both sides)
    6  cli, api

The root package (``fedtune/__init__.py``) imports its public names lazily and belongs to no layer;
the tests kept beside the methods (``test_*.py``, ``conftest.py``) are no part of it.

Two checks: for each layer (each side of layer 3 on its own), a fresh interpreter imports every
module of it and must not have loaded a module it may not import (``sys.modules``; the message
names the chain of imports that loaded it); and every import statement in the package, module
level or inside a function, is read from the source and checked against the same rule.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fedtune"

# Module (or package, for everything in it) -> layer; the longest matching name wins.
PLACES = {
    "fedtune.contract": 1,
    "fedtune.config": 1,
    "fedtune.registry": 1,
    "fedtune.options": 1,
    "fedtune.names": 1,
    "fedtune.rng": 1,
    "fedtune.durable": 1,
    "fedtune.devices": 1,
    "fedtune.credentials": 1,
    "fedtune.certs": 1,
    "fedtune.allocator": 1,
    "fedtune.logs": 1,
    "fedtune.transport": 1,
    "fedtune.quantized_base": 1,
    "fedtune.ggml_blocks": 1,
    "fedtune.protocol": 1,
    "fedtune.protocol.tensors": 2,
    "fedtune.protocol.stubs": 2,
    "fedtune.tasks": 2,
    "fedtune.adapters": 2,
    "fedtune.models": 2,
    "fedtune.data": 2,
    "fedtune.compression": 2,
    "fedtune.privacy": 2,
    "fedtune.split": 2,
    "fedtune.methods": 1,
    "fedtune.aggregation": 3,
    "fedtune.client": 3,
    "fedtune.coordinator": 4,
    "fedtune.compose": 4,
    "fedtune.simulation": 5,
    "fedtune.flower": 5,
    "fedtune.privacy.audit": 5,
    "fedtune.privacy.report": 5,
    "fedtune.cli": 6,
    "fedtune.api": 6,
}
SIDES = {"fedtune.aggregation": "coordinator side", "fedtune.client": "device side"}
# The modules of a method's folder (fedtune.methods.<method>.<part>) that are not layer 1, by part.
METHOD_PARTS = {"strategy": (3, "coordinator side"), "recipe": (3, "device side")}


def _method_part(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    return METHOD_PARTS.get(parts[3]) if len(parts) >= 4 and parts[:2] == ["fedtune", "methods"] else None


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer(module: str) -> int | None:
    if part := _method_part(module):
        return part[0]
    best = max((p for p in PLACES if _within(module, p)), key=len, default=None)
    return PLACES[best] if best else None


def side(module: str) -> str | None:
    if part := _method_part(module):
        return part[1]
    return next((s for p, s in SIDES.items() if _within(module, p)), None)


def why_not(importer: str, target: str) -> str | None:
    """None when ``importer`` may import ``target``, else the rule it breaks."""
    if target == "fedtune":
        return None  # the root package: its names are imported on first use
    a, b = layer(importer), layer(target)
    if a is None or b is None:
        return f"{importer if a is None else target} has no layer (add it to PLACES and to the README)"
    if b > a:
        return f"layer {a} imports layer {b}"
    if a == b == 3 and side(importer) != side(target):
        return f"the {side(importer)} imports the {side(target)}"
    if a == 4 and side(target) == "device side":
        return "the coordinator imports the device side"
    return None


def package_modules() -> dict[str, Path]:
    """Every module of the package -> its file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name.startswith("test_") or path.name == "conftest.py":
            continue  # tests kept beside the code they test
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = package_modules()


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m != "fedtune" and layer(m) is None]
    assert not unplaced, f"modules without a layer (add them to PLACES here and to the README's layout): {unplaced}"


# ------------------------------------------------------------------ every import statement


def _imports(module: str, tree: ast.AST):
    """(line, imported module) of every import statement in ``tree``, wherever it is."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else base


def test_every_import_statement_points_down():
    broken = []
    for module, path in MODULES.items():
        if module == "fedtune":
            continue  # the root's names are imported on first use (and only named under TYPE_CHECKING)
        for line, target in sorted(set(_imports(module, ast.parse(path.read_text(encoding="utf-8"))))):
            if target.split(".")[0] == "fedtune" and (rule := why_not(module, target)):
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target} ({rule})")
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


# ------------------------------------------------------------------ fresh interpreters

# Imports each step's modules in turn, in one interpreter, and prints as JSON what each step
# loaded that was not loaded before, and who loaded each fedtune module first (the module whose
# code was running when it was looked up).
PROBE = r"""
import importlib, json, sys

loaded_by = {}

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("fedtune") and name not in loaded_by:
            frame = sys._getframe(1)
            while frame is not None:
                who = frame.f_globals.get("__name__", "")
                if who != name and (who.startswith("fedtune") or who == "__main__"):
                    loaded_by[name] = who
                    break
                frame = frame.f_back
        return None

def fedtune_modules():
    return {m for m in sys.modules if m.split(".")[0] == "fedtune"}

sys.meta_path.insert(0, Recorder())
steps = []
for modules in json.loads(sys.argv[1]):
    before = fedtune_modules()
    for module in modules:
        importlib.import_module(module)
    steps.append(sorted(fedtune_modules() - before))
print(json.dumps({"steps": steps, "loaded_by": loaded_by}))
"""


def _modules(selected) -> list[str]:
    return [m for m in MODULES if m != "fedtune" and selected(m)]


HAVE_FLOWER = importlib.util.find_spec("flwr") is not None
LAYER_1 = ("layer 1 (contract and leaves)", _modules(lambda m: layer(m) == 1))
LAYER_2 = ("layer 2 (building blocks)", _modules(lambda m: layer(m) == 2))

# Each path is one fresh interpreter that imports its steps in order, lowest layer first. A step
# may load only what its modules may import: whatever earlier steps loaded sits below it, so a
# path checks each of its steps as a fresh interpreter of its own would, for the time of one
# (each spends seconds importing torch and peft). The device side has a path of its own, since
# the coordinator side (and the coordinator) may not import it, nor it them.
PATHS = {
    "coordinator": [
        ("config", ["fedtune.config"]),
        LAYER_1,
        LAYER_2,
        ("layer 3, coordinator side (aggregation)", _modules(lambda m: layer(m) == 3 and side(m) == "coordinator side")),
        ("layer 4 (coordinator, compose)", _modules(lambda m: layer(m) == 4)),
    ],
    "device": [
        LAYER_1,
        LAYER_2,
        ("layer 3, device side (client)", _modules(lambda m: layer(m) == 3 and side(m) == "device side")),
        ("layer 5 (simulation, flower, privacy tools)", _modules(lambda m: layer(m) == 5 and (HAVE_FLOWER or not _within(m, "fedtune.flower")))),
    ],
}
STEPS = [(path, i) for path, steps in PATHS.items() for i in range(len(steps))]


def _probe(steps: list[tuple[str, list[str]]]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-c", PROBE, json.dumps([modules for _, modules in steps])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent, env=env)


@pytest.fixture(scope="module")
def probes():
    """Both paths' interpreters, run side by side."""
    with ThreadPoolExecutor(max_workers=len(PATHS)) as pool:
        futures = {path: pool.submit(_probe, steps) for path, steps in PATHS.items()}
        return {path: f.result() for path, f in futures.items()}


def _chain(module: str, loaded_by: dict[str, str]) -> str:
    chain = [module]
    while chain[-1] in loaded_by and loaded_by[chain[-1]] != "__main__" and len(chain) < 50:
        chain.append(loaded_by[chain[-1]])
    return " -> ".join(reversed(chain))


@pytest.mark.parametrize(("path", "step"), STEPS, ids=[f"{path}: {PATHS[path][i][0]}" for path, i in STEPS])
def test_a_layer_loads_nothing_it_may_not_import(path, step, probes):
    group, modules = PATHS[path][step]
    assert modules, f"no modules in {group}"
    run = probes[path]
    assert run.returncode == 0, f"the {path} path failed to import:\n{run.stderr[-3000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    loaded_by = result["loaded_by"]
    forbidden = {}  # loaded module -> the rule importing it breaks
    for target in result["steps"][step]:
        rules = sorted({why_not(m, target) for m in modules} - {None})
        if rules:
            forbidden[target] = rules[0]
    # one line per place where a chain of imports crosses the rule (its loader is allowed)
    bad = [f"{target} ({rule}): {_chain(target, loaded_by)}" for target, rule in forbidden.items() if loaded_by.get(target) not in forbidden]
    assert not bad, f"importing {group} loads modules it may not import:\n" + "\n".join(bad)


# ------------------------------------------------------------------ the registries' discovery

DISCOVERY = r"""
import json, sys
from fedtune.{package} import {registry}
names = {registry}.names()
print(json.dumps({{"names": names, "loaded": sorted(m for m in sys.modules if m.startswith("fedtune"))}}))
"""


@pytest.mark.parametrize(("package", "registry", "own", "other"), [
    ("client.recipes", "RECIPES", "recipe", "strategy"),
    ("aggregation", "STRATEGIES", "strategy", "recipe"),
], ids=["a device imports every recipe and no strategy", "a coordinator imports every strategy and no recipe"])
def test_a_registry_imports_its_own_side_of_every_method_folder_and_nothing_else(package, registry, own, other):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", DISCOVERY.format(package=package, registry=registry)],
                         capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = set(json.loads(run.stdout.strip().splitlines()[-1])["loaded"])
    folders = sorted(p.parent.name for p in (PACKAGE / "methods").glob(f"*/{own}.py"))
    assert folders and {f"fedtune.methods.{f}.{own}" for f in folders} <= loaded
    wrong = sorted(m for m in loaded if m.endswith("." + other) and m.startswith("fedtune.methods.")
                   or side(m) not in (None, side(f"fedtune.methods.x.{own}")))
    assert not wrong, f"{registry} loaded modules of the other side: {wrong}"
