"""Client recipes: how a device trains the adapter it is given, what it keeps between rounds,
and what it sends back.

A strategy's instruction names a recipe and its options (the task header's options map); the
agent looks the recipe up in ``RECIPES`` and runs it. Each recipe is one module registering
itself: a new client-side method is a new file here plus its strategy.
"""

import importlib
import pkgutil

from fedtune.client.recipes.base import RECIPES, Recipe, TrainSettings, make_recipe

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RECIPES", "Recipe", "TrainSettings", "make_recipe"]
