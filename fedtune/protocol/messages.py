"""Conversions between fedtune's dataclasses and their protobuf messages."""

from __future__ import annotations

import math

from fedtune.contract.plans import AdapterPlan
from fedtune.devices import Capabilities
from fedtune.protocol import fedtune_pb2 as pb


def plan_to_proto(plan: AdapterPlan) -> pb.AdapterPlan:
    return pb.AdapterPlan(
        rank=plan.rank,
        alpha=plan.alpha,
        dropout=plan.dropout,
        target_modules=list(plan.target_modules),
        layers=list(plan.layers),
        modules_to_save=list(plan.modules_to_save),
        rank_per_layer=dict(plan.rank_per_layer),
        freeze_a=plan.freeze_a,
        core=plan.core,
        kind=plan.kind,
    )


def plan_from_proto(msg: pb.AdapterPlan) -> AdapterPlan:
    """Raises AdapterError (a ValueError) for a plan that makes no sense."""
    return AdapterPlan(
        rank=msg.rank,
        alpha=msg.alpha,
        dropout=msg.dropout,
        target_modules=tuple(msg.target_modules),
        layers=tuple(msg.layers),
        modules_to_save=tuple(msg.modules_to_save),
        rank_per_layer=dict(msg.rank_per_layer),
        freeze_a=msg.freeze_a,
        core=msg.core,
        kind=msg.kind or "lora",  # a coordinator older than adapter kinds sends none: LoRA
    )


def capabilities_to_proto(c: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(
        memory_bytes=c.memory_bytes,
        flops_per_second=c.flops_per_second,
        uplink_bytes_per_second=c.uplink_bytes_per_second,
        downlink_bytes_per_second=c.downlink_bytes_per_second,
        tier=c.tier,
        backward_factor=c.backward_factor,
    )


def capabilities_from_proto(msg: pb.Capabilities) -> Capabilities:
    """Raises ValueError for negative or non-finite figures."""
    numbers = {
        "flops_per_second": msg.flops_per_second,
        "uplink_bytes_per_second": msg.uplink_bytes_per_second,
        "downlink_bytes_per_second": msg.downlink_bytes_per_second,
        "backward_factor": msg.backward_factor,
    }
    for key, value in numbers.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"capabilities.{key} must be a finite non-negative number, got {value}")
    if len(msg.tier) > 64:
        raise ValueError("capabilities.tier is longer than 64 characters")
    return Capabilities(memory_bytes=msg.memory_bytes, tier=msg.tier, **numbers)
