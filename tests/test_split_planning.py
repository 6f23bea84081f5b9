"""The split cost model and the cut planner, on plain numbers and on a real (tiny) BERT."""

from __future__ import annotations

import dataclasses

import pytest

from fedtune.adapters import AdapterPlan
from fedtune.devices import Capabilities
from fedtune.methods.split.test_split import bert
from fedtune.split.planning import SplitCost, SplitGeometry, choose_cut


G = SplitGeometry(num_blocks=6, hidden=384, heads=12, embed_params=12_000_000, block_params=1_800_000, lora_per_block=12_288, head_params=1_155)
COST = SplitCost(batch_size=16, seq_len=64, local_steps=20, act_bits=4, grad_bits=4, head_on_client=True)


def test_geometry_counts_the_embeddings_the_blocks_and_the_lora_of_a_real_model():
    model, _ = bert(4)
    g = SplitGeometry.from_model(model, AdapterPlan(rank=4, alpha=8, target_modules=("query", "value")))
    assert g.num_blocks == 4 and g.hidden == 32
    assert g.embed_params == sum(p.numel() for p in model.bert.embeddings.parameters())
    assert g.block_params == sum(p.numel() for p in model.bert.encoder.layer[0].parameters())
    assert g.lora_per_block == 2 * 4 * (32 + 32)  # query and value, rank 4, 32 in and 32 out


def test_activation_traffic_is_the_same_at_every_cut_and_scales_with_the_bits():
    up, down = COST.bytes_per_step(G)
    # U-shaped: activations and head gradients both ways, T x H elements at 4 bits each
    assert up == down == 2 * 16 * 64 * 384 * 4 / 8
    fp32 = dataclasses.replace(COST, act_bits=32, grad_bits=32)
    assert fp32.bytes_per_step(G)[0] == 8 * up
    plain_up, plain_down = dataclasses.replace(COST, head_on_client=False).bytes_per_step(G)
    assert plain_down == up / 2 and plain_up == up / 2 + 8 * 16  # labels travel up
    fast = Capabilities(uplink_bytes_per_second=1e6, downlink_bytes_per_second=1e6)
    # the wire costs the same at every cut; only compute (not counted here) would differ
    assert COST.step_seconds(G, 1, fast) == COST.step_seconds(G, 5, fast) == pytest.approx(2 * up / 1e6)


def test_memory_picks_the_deepest_cut_that_fits():
    needs = [COST.client_memory_bytes(G, k) for k in range(1, 6)]
    assert needs == sorted(needs) and len(set(needs)) == 5
    for k in range(1, 6):
        device = Capabilities(memory_bytes=needs[k - 1] + 1)
        assert choose_cut(G, COST, device, max_cut=5, round_budget_s=60).cut == k
    assert choose_cut(G, COST, Capabilities(), max_cut=9, round_budget_s=60).cut == 5  # unknown memory: the ceiling, below the last block
    tiny = choose_cut(G, COST, Capabilities(memory_bytes=needs[0] - 1), max_cut=5, round_budget_s=60)
    assert tiny.cut == 1 and not tiny.fits


def test_a_slow_device_gets_a_shallower_cut_and_a_busy_coordinator_counts():
    fast, slow = Capabilities(flops_per_second=1e12), Capabilities(flops_per_second=2e10)
    budget = 20 * COST.client_flops_per_step(G, 2) / 2e10 * 1.01  # the slow device affords two blocks a step
    assert choose_cut(G, COST, fast, max_cut=5, round_budget_s=budget).cut == 5
    assert choose_cut(G, COST, slow, max_cut=5, round_budget_s=budget).cut == 2
    # the coordinator's share of a step grows with the sessions it serves at once
    served = dataclasses.replace(COST, server_flops_per_second=1e12)
    one, eight = served.step_seconds(G, 2, fast), dataclasses.replace(served, sessions=8).step_seconds(G, 2, fast)
    assert eight - one == pytest.approx(7 * served.server_flops_per_step(G, 2) / 1e12)


def test_a_slow_link_is_reported_not_fitting_whatever_the_cut():
    dialup = Capabilities(memory_bytes=1 << 40, flops_per_second=1e12, uplink_bytes_per_second=1e4, downlink_bytes_per_second=1e4)
    choice = choose_cut(G, COST, dialup, max_cut=5, round_budget_s=60)
    assert choice.cut == 1 and not choice.fits
    assert choice.round_seconds > 20 * 2 * COST.bytes_per_step(G)[0] / 1e4


def test_a_cut_never_leaves_the_device_without_a_lora_block():
    """Hybrid stacks (Nemotron-H) have blocks without attention: however small the device, its
    cut keeps at least the first block that carries LoRA."""
    hybrid = dataclasses.replace(G, first_lora_block=2)
    tiny = Capabilities(memory_bytes=1, flops_per_second=1e12, uplink_bytes_per_second=1e9, downlink_bytes_per_second=1e9)
    cost = SplitCost(batch_size=8, seq_len=64, local_steps=4)
    assert choose_cut(G, cost, tiny, 5, float("inf")).cut == 1
    choice = choose_cut(hybrid, cost, tiny, 5, float("inf"))
    assert choice.cut == 3 and not choice.fits


@pytest.mark.parametrize("family,why", [
    ("gemma4", r"split\.mode split: split learning: gemma4_text feeds every block an embedding of the input tokens \(per_layer_input\)"),
    ("nemotron_h", r"split\.cut 1: blocks 0-0 of nemotron_h hold none of the LoRA target modules \(the first is in block 1\)"),
])
def test_models_that_cannot_be_cut_are_refused_at_start_in_one_line(tmp_path, family, why):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import families  # bench/families.py: tiny random models of each family, saved with save_pretrained

    from fedtune.config import ConfigError
    from fedtune.coordinator.app import Coordinator

    fam = families.build_family(family, tmp_path / "model")
    config = families._config(fam, tmp_path, "split")
    config.split.mode, config.split.cut = "split", 1
    with pytest.raises(ConfigError, match=why) as refused:
        Coordinator(config, eval_examples=[])
    assert "\n" not in str(refused.value)
