"""FedSA-LoRA: where sharing only A is refused, and its personalized evaluation round."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import build_strategy
from fedtune.compose import check_chain
from fedtune.contract.properties import CompositionError
from fedtune.methods.fedsa.strategy import FedSA

from strategy_fixtures import MIXED, context, random_adapter


@pytest.mark.parametrize("name", ["flexlora", "flora"])
def test_share_a_is_refused_where_b_is_needed(name):
    for chain in (FedSA(build_strategy(name)), FedSA(build_strategy("fedadam", {"inner": name}))):
        with pytest.raises(CompositionError, match=f"strategy {name} cannot be combined with strategy fedsa \\(b-kept-on-device\\): {name}"):
            check_chain(chain)


def test_fedsa_without_personal_evaluation_asks_for_no_evaluation_round():
    from fedtune.methods.fedsa.strategy import FedSAOptions

    strategy = FedSA(build_strategy("fedavg"), FedSAOptions(personal_eval=0.0))
    state = strategy.initial_state(random_adapter(torch.Generator().manual_seed(0)))
    assert strategy.configure_evaluation(context(MIXED), state) == {}
