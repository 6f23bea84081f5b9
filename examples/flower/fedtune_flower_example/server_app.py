"""The ServerApp: fedtune's round engine (strategy, planner, checks, metrics, checkpoints) with
Flower carrying the messages."""

from fedtune.flower import server_app

app = server_app()
