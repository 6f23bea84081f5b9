"""The contract layer: what both sides of a federation agree on, below the coordinator's
strategies (``fedtune.aggregation``) and the device (``fedtune.client``), neither of which imports
the other. Each module is small and imports nothing of fedtune but other contract modules and
the leaf modules (``fedtune.names``, ``fedtune.devices``, ``fedtune.options``):

- ``properties``: what a part of a run declares, so that one composer can check that parts work
  together;
- ``plans``: ``AdapterPlan``, where LoRA goes and how large it is;
- ``specs``: ``TensorSpec``, what a receiver expects of a tensor;
- ``option_keys``: instruction options the agent reads itself (the uplink codec);
- ``local_options``: the options every recipe understands (a method's own options, and the
  tensor names its strategy and recipe exchange, are in its folder: ``fedtune.methods``);
- ``credentials``: the call metadata that authenticates a client;
- ``errors``: the errors the coordinator reports, by gRPC status;
- ``cost``: the cost model (memory, compute, bytes and time of a plan on a device).

The package's layers are in the README ("How it works") and checked by ``tests/test_layers.py``.
"""
