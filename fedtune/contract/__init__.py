"""The contract layer: what both sides of a federation agree on, below the client and the
coordinator (neither imports the other). Today: the properties parts declare so that one
composer can check that they work together (``properties``)."""
