"""Instruction option keys the agent reads itself, outside the recipe: the uplink codec that the
``compress`` wrapper (fedtune.aggregation.compress) asks for and the device's uplink
(fedtune.client.uplink) applies."""

from __future__ import annotations

CODEC_KEY = "codec"
CODEC_OPTION_PREFIX = "codec."
ERROR_FEEDBACK_KEY = "error_feedback"
