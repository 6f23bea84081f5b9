"""fedtune inside Flower: fedtune's strategies as a Flower strategy of the message API, and a
Flower ClientApp that trains fedtune's client recipes.

Install with ``pip install "fedtune[flower]"``. What runs where:

- ``FedtuneStrategy`` (a ``flwr.serverapp.strategy.Strategy``) drives fedtune's own round
  engine: it registers Flower's nodes as clients, selects and plans each round, and sends each
  node its own RecordDict (its adapter plan and start tensors: heterogeneous ranks and depths
  work, with fedtune's aggregation instead of Flower's shape-equal averaging). Updates pass
  the same checks as on fedtune's coordinator; every round writes metrics.jsonl and a
  checkpoint, and the final adapter is exported as a PEFT folder.
- ``client_app`` / ``train`` run a task with fedtune's ``ClientAgent`` (the same recipes,
  sample-level DP and codecs as ``fedtune client``), keeping the device's memory between rounds
  in Flower's ``context.state``.
- ``server_app`` builds a ServerApp around ``FedtuneStrategy``.

Split learning is not available here: it needs fedtune's coordinator to run the other half of
the model on a stream per client.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('fedtune.flower needs Flower: pip install "fedtune[flower]"') from exc

from fedtune.flower.apps import client_app, server_app, train
from fedtune.flower.strategy import FedtuneStrategy

__all__ = ["FedtuneStrategy", "client_app", "server_app", "train"]
