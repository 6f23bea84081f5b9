"""Instruction option keys the agent reads itself, outside the recipe: the uplink codec that the
``compress`` wrapper (fedtune.aggregation.compress) asks for and the device's uplink
(fedtune.client.uplink) applies, and the last round that aggregated the device's update."""

from __future__ import annotations

CODEC_KEY = "codec"
CODEC_OPTION_PREFIX = "codec."
ERROR_FEEDBACK_KEY = "error_feedback"
# The last round whose aggregate took this client's update (0: none). The device's memory and
# residuals of a round are its own only once that round aggregated its update (an update can be
# refused, screened out or its round refused); the device learns it with its next task.
AGGREGATED_ROUND_KEY = "aggregated_round"
