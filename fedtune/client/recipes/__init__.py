"""Client recipes: how a device trains the adapter it is given, what it keeps between rounds,
and what it sends back.

A strategy's instruction names a recipe and its options (the task header's options map); the
agent looks the recipe up in ``RECIPES`` and runs it. Each method's recipe is in its folder
(``fedtune.methods.<method>.recipe``) and registers itself; ``RECIPES`` imports them at its first
lookup, and never a strategy.
"""

from fedtune.client.recipes.base import RECIPES, Recipe, TrainSettings, make_recipe

__all__ = ["RECIPES", "Recipe", "TrainSettings", "make_recipe"]
