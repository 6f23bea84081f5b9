"""A client measures its own training throughput in the cost model's units."""

from __future__ import annotations

import math

from fedtune.client.calibrate import calibrate
from fedtune.coordinator.planner import CostModel, model_geometry
from fedtune.adapters import AdapterPlan
from fedtune.models import ModelStore, resolve_source

from conftest import sentiment_examples


def test_calibration_reports_the_cost_models_flops_over_measured_seconds(tiny_bert):
    store, source = ModelStore(), resolve_source(tiny_bert)
    labels = ["negative", "positive"]
    result = calibrate(store, source, "seq-cls", labels, sentiment_examples(100, seed=0), batch_size=8, seq_len=16, steps=3)
    geometry, plan = model_geometry(store.base(source, "seq-cls", labels), AdapterPlan(rank=8, alpha=16.0))
    assert result.flops_per_step == CostModel(8, 16, 1).flops_per_step(geometry, plan)
    assert 0 < result.seconds_per_step < 10 and math.isfinite(result.flops_per_second)
    assert result.flops_per_second == result.flops_per_step / result.seconds_per_step
