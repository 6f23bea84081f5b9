"""The trust rules measure the change an update makes to the model, not the bytes it carries:
FedKSeed's scalars are replayed along their seeds before they are measured, compared and
clipped, and a ceiling never scales with state that earlier updates could have grown."""

from __future__ import annotations

import inspect
import re
import types

import torch

from fedtune.aggregation import ClientUpdate
from fedtune.aggregation.base import build_strategy
from fedtune.compression.seeds import replay
from fedtune.config import FederationSection
from fedtune.coordinator.trust import update_norm
from fedtune.coordinator.trust_checks import TrustChecks
from fedtune.methods.fedkseed.options import GRADS, PROBS, SEEDS

STEPS, POOL = 20, 8


def _start() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"m.lora_A.weight": 0.05 * torch.randn(4, 16, generator=g), "m.lora_B.weight": 0.05 * torch.randn(16, 4, generator=g),
            PROBS: torch.full((POOL,), 1.0 / POOL)}


def _update(cid: str, seeds: list[int], grads: list[float], start) -> ClientUpdate:
    return ClientUpdate(cid, {SEEDS: torch.tensor(seeds, dtype=torch.int32), GRADS: torch.tensor(grads, dtype=torch.float32)}, 10, start=start)


def test_fedkseed_updates_are_measured_by_the_change_their_scalars_replay_to():
    strategy = build_strategy("fedkseed", {"steps": STEPS, "pool": POOL, "lr": 1e-2})
    checks = TrustChecks(FederationSection(), strategy)
    rnd = types.SimpleNamespace(number=1, evaluation=False)
    start = _start()
    g = torch.Generator().manual_seed(1)
    honest = [_update(f"h{i}", torch.randint(0, POOL, (STEPS,), generator=g).tolist(), (0.5 * torch.randn(STEPS, generator=g)).tolist(), start)
              for i in range(3)]
    # The attack: the same seed every step with the same sign, scalars no larger than an honest
    # client's (its bytes look like theirs), so every step pushes one way.
    attacker = _update("a", [3] * STEPS, [1.0] * STEPS, start)
    model = {n: t for n, t in start.items() if n != PROBS}
    for u in (*honest, attacker):
        replayed = replay(model, u.tensors[SEEDS].tolist(), u.tensors[GRADS].tolist(), strategy.pool, 1e-2)
        assert abs(checks.measure(rnd, u).norm - update_norm(replayed, model)) < 1e-5 * update_norm(replayed, model)
    sizes = {u.client_id: checks.measure(rnd, u).norm for u in (*honest, attacker)}
    assert sizes["a"] > 2.5 * max(sizes[f"h{i}"] for i in range(3))  # sent as scalars, the four looked alike
    assert max(abs(v) for v in attacker.tensors[GRADS].tolist()) <= max(abs(v) for u in honest for v in u.tensors[GRADS].tolist())
    strict = TrustChecks(FederationSection(outlier_factor=2.0), strategy)  # the outlier rule compares the changes
    kept = strict.screen(rnd, [*honest, attacker])
    assert {u.client_id for u in kept} == {"h0", "h1", "h2"}


def test_a_fedkseed_update_clipped_to_the_bound_replays_to_a_change_of_that_norm():
    strategy = build_strategy("fedkseed", {"steps": STEPS, "pool": POOL, "lr": 1e-2})
    checks = TrustChecks(FederationSection(update_norm_bound=0.05), strategy)
    rnd = types.SimpleNamespace(number=1, evaluation=False)
    start = _start()
    big = _update("a", [3] * STEPS, [50.0] * STEPS, start)
    (clipped,) = checks.screen(rnd, [big])
    model = {n: t for n, t in start.items() if n != PROBS}
    replayed = replay(model, clipped.tensors[SEEDS].tolist(), clipped.tensors[GRADS].tolist(), strategy.pool, 1e-2)
    assert abs(update_norm(replayed, model) - 0.05) < 1e-4
    assert torch.equal(clipped.tensors[SEEDS], big.tensors[SEEDS])


def test_the_value_ceiling_scales_with_the_model_sent_not_with_a_parts_own_state():
    """Before: the ceiling was 1e4 x the largest value sent, SCAFFOLD's control variate included,
    so a client could grow the control variate by 1e4 x itself every round (0 to 1e29 in 8)."""
    strategy = build_strategy("fedavg", {})
    checks = TrustChecks(FederationSection(), strategy)
    rnd = types.SimpleNamespace(number=1, evaluation=False)
    start = {"m.lora_A.weight": torch.full((2, 2), 0.1), "scaffold.c/m.lora_A.weight": torch.full((2, 2), 1e6)}
    update = ClientUpdate("a", {"m.lora_A.weight": torch.full((2, 2), 0.1), "scaffold.dc/m.lora_A.weight": torch.full((2, 2), 1e7)}, 10, start=start)
    assert checks.measure(rnd, update).ceiling == 1e4  # 1e4 x max(1, 0.1): the poisoned 1e6 does not count
    assert checks.screen(rnd, [update]) == []  # an element changing by 1e7 is absurd


def test_a_clients_metrics_never_replace_or_add_keys_of_the_round_row():
    """Before: a client's ``personal_eval_loss_std`` overwrote the spread the coordinator computed,
    and any ``split_*`` name a client sent became a key of metrics.jsonl."""
    from fedtune.coordinator.metrics import CLIENT_SPLIT_METRICS, personalized

    honest = ClientUpdate("h", {}, 10, metrics={"personal_eval_loss": 1.0})
    liar = ClientUpdate("l", {}, 10, metrics={"personal_eval_loss": 3.0, "personal_eval_loss_std": 0.0, "personal_eval_clients": 99.0})
    out = personalized(2, [honest, liar])
    assert out["personal_eval_loss"] == 2.0 and out["personal_eval_loss_std"] == 1.0 and out["personal_eval_clients"] == 2
    assert "split_bytes_up" not in CLIENT_SPLIT_METRICS and "split_client_ms" in CLIENT_SPLIT_METRICS


def test_every_figure_the_split_recipe_reports_reaches_the_row():
    from fedtune.coordinator.metrics import CLIENT_SPLIT_METRICS
    from fedtune.methods.split import recipe

    sent = set(re.findall(r'"(split_[a-z_]+)"', inspect.getsource(recipe)))
    assert sent and sent <= CLIENT_SPLIT_METRICS, sent - CLIENT_SPLIT_METRICS


def test_a_strategys_own_tensors_are_not_part_of_the_change_that_is_bounded_but_are_compared():
    """SCAFFOLD's control-variate change is tens of times the adapter's change for an honest
    client. Before, it counted in the update's norm: with a norm bound, honest clients were
    clipped for their control variate and the clip scaled it too. Now the bound and the clip act
    on the model's change alone; the control-variate changes are compared among clients by the
    outlier rule (an attacker's large one is left out) and held to the value ceiling."""
    strategy = build_strategy("fedavg", {})
    checks = TrustChecks(FederationSection(update_norm_bound=0.5, outlier_factor=5.0), strategy)
    rnd = types.SimpleNamespace(number=1, evaluation=False)
    start = {"m.lora_A.weight": torch.zeros(2, 2), "scaffold.c/m.lora_A.weight": torch.zeros(2, 2)}

    def update(cid: str, change: float, dc: float) -> ClientUpdate:
        return ClientUpdate(cid, {"m.lora_A.weight": torch.full((2, 2), change), "scaffold.dc/m.lora_A.weight": torch.full((2, 2), dc)}, 10, start=start)

    honest = [update(f"h{i}", 0.1, 3.0 + i) for i in range(3)]
    size = checks.measure(rnd, honest[0])
    assert abs(size.norm - 0.2) < 1e-6 and size.state_norm == 6.0  # 4 elements of 0.1; of 3.0
    big = update("big", 0.4, 3.0)  # a model change over the bound (0.8 > 0.5): clipped, its control variate as sent
    attacker = update("a", 0.1, 1000.0)  # a control-variate change 250 x the others'
    kept = {u.client_id: u for u in checks.screen(rnd, [*honest, big, attacker])}
    assert set(kept) == {"h0", "h1", "h2", "big"}
    for u in honest:
        assert torch.equal(kept[u.client_id].tensors["m.lora_A.weight"], u.tensors["m.lora_A.weight"])  # not clipped for their dc
    assert torch.equal(kept["big"].tensors["scaffold.dc/m.lora_A.weight"], big.tensors["scaffold.dc/m.lora_A.weight"])
    assert abs(update_norm({"m.lora_A.weight": kept["big"].tensors["m.lora_A.weight"]}, start) - 0.5) < 1e-6  # clipped from 0.8
