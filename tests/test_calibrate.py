"""A client measures its own training throughput in the cost model's units."""

from __future__ import annotations

import math

import pytest

from fedtune.client.calibrate import backward_factor, calibrate
from fedtune.contract.cost import CostModel, model_geometry
from fedtune.adapters import AdapterPlan
from fedtune.models import ModelStore, resolve_source

from conftest import sentiment_examples


def test_calibration_reports_the_cost_models_flops_over_measured_seconds(tiny_bert):
    store, source = ModelStore(), resolve_source(tiny_bert)
    labels = ["negative", "positive"]
    result = calibrate(store, source, "seq-cls", labels, sentiment_examples(100, seed=0), batch_size=8, seq_len=16, steps=3)
    geometry, plan = model_geometry(store.base(source, "seq-cls", labels), AdapterPlan(rank=8, alpha=16.0))
    assert result.flops_per_step == CostModel(8, 16, 1).flops_per_step(geometry, plan, result.backward_factor)
    # (the measured factor itself depends on timing, which a loaded machine can flatten to 0)
    assert 0 < result.seconds_per_step < 10 and math.isfinite(result.flops_per_second) and result.backward_factor >= 0
    assert result.flops_per_second == result.flops_per_step / result.seconds_per_step


def test_backward_factor_from_two_timings():
    # 6 blocks, forward 6 x 30 ms; backward 18 ms per crossed block (0.6 of a block's forward)
    assert backward_factor(0.180 + 0.018, 0.180 + 6 * 0.018, 6) == pytest.approx(0.6)


def test_a_measured_backward_factor_changes_the_modeled_round_time(tiny_bert):
    from fedtune.devices import Capabilities

    store, source = ModelStore(), resolve_source(tiny_bert)
    geometry, plan = model_geometry(store.base(source, "seq-cls", ["a", "b"]), AdapterPlan(rank=8, alpha=16.0))
    cost = CostModel(8, 16, 10)
    slow, fast = Capabilities(flops_per_second=1e9, backward_factor=2.0), Capabilities(flops_per_second=1e9, backward_factor=0.5)
    assert cost.round_seconds(geometry, plan, slow) > cost.round_seconds(geometry, plan, fast)
    assert cost.round_seconds(geometry, plan, Capabilities(flops_per_second=1e9)) == cost.local_steps * cost.flops_per_step(geometry, plan) / 1e9
