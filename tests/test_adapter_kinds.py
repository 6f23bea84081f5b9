"""Adapter kinds: a plan names the form of its adapter, every layer reads it from the plan, and a
kind a method folder registers is found without any list naming it."""

from __future__ import annotations

import pytest
import torch

from fedtune.contract.adapter_kinds import ADAPTER_KINDS, adapter_kind
from fedtune.contract.plans import AdapterError, AdapterPlan
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.messages import plan_from_proto


def test_lora_is_the_default_kind_and_its_update_is_b_times_a():
    lora = adapter_kind(AdapterPlan().kind)
    g = torch.Generator().manual_seed(0)
    tensors = {"m.lora_A.weight": torch.randn(3, 5, generator=g), "m.lora_B.weight": torch.randn(4, 3, generator=g), "head.weight": torch.randn(2, 5, generator=g)}
    assert lora.modules(tensors) == ["m"]
    assert [n for n in tensors if lora.is_factor(n)] == ["m.lora_A.weight", "m.lora_B.weight"]
    torch.testing.assert_close(lora.delta(tensors, "m"), tensors["m.lora_B.weight"].double() @ tensors["m.lora_A.weight"].double())
    lora.check(AdapterPlan(freeze_a=True))  # LoRA has every option of a plan


def test_every_kind_says_where_its_rank_runs():
    kinds = ADAPTER_KINDS.available()
    assert "lora" in kinds
    for name in kinds:
        kind = adapter_kind(name)
        assert kind.factors and all(axis in (0, 1) for axis in kind.factors.values()) and kind.params_per_rank >= 1


def test_a_plan_from_an_older_coordinator_is_lora_and_a_bad_kind_is_refused():
    assert plan_from_proto(pb.AdapterPlan(rank=4, alpha=8.0)).kind == "lora"
    with pytest.raises(AdapterError, match="plain name"):
        AdapterPlan(kind="../x")
    with pytest.raises(AdapterError, match="unknown adapter kind 'nope'"):
        adapter_kind("nope")
