"""The seeds harness of the benchmarks (bench/seeds.py): intervals and paired differences against
a hand computation, and a difference whose interval contains zero reported as such."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from seeds import add_arguments, ci95, combine, compare, format_mean, measure, merge_documents, paired_difference, seeds_of, summarize  # noqa: E402


def test_the_interval_matches_a_hand_computation():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = ci95(values)
    # mean 2.5, sample sd sqrt(5/3), t(0.975, 3) = 3.182446305...
    assert mean == 2.5
    assert half == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-9)
    mean1, half1 = ci95([0.7])
    assert mean1 == 0.7 and math.isnan(half1)  # one run says nothing about its spread
    assert format_mean(mean1, half1) == "0.7000" and format_mean(2.5, 0.25) == "2.5000 ± 0.2500"
    assert format_mean(-0.0015, 0.0022, "+.4f") == "-0.0015 ± 0.0022"  # a sign on the mean, never on the half-width


def test_paired_differences_use_the_spread_of_the_differences():
    a = [0.70, 0.72, 0.69, 0.71, 0.70]
    b = [0.75, 0.78, 0.73, 0.77, 0.74]  # worse by 0.05 +- 0.01 on every seed
    d = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    assert d.mean == pytest.approx(mean) and d.ci95 == pytest.approx(2.7764451051977987 * sd / math.sqrt(5), rel=1e-9)
    assert d.measured and d.verdict("amaq4", "uniform4").startswith("amaq4 vs uniform4: amaq4 better by 0.05")


def test_a_difference_whose_interval_contains_zero_is_no_difference():
    d = paired_difference([0.70, 0.75, 0.68], [0.72, 0.71, 0.73])
    assert not d.measured
    assert "no difference measured" in d.verdict("a", "b")
    single = paired_difference([0.70], [0.80])  # one seed: never a win, however large
    assert not single.measured and "no difference measured" in single.verdict("a", "b")
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_rows_keep_mean_interval_and_each_seed_and_the_flags_give_the_seeds():
    row = summarize({"eval_loss": [1.0, 2.0, 3.0]})
    assert row["eval_loss"] == 2.0 and row["eval_loss_per_seed"] == [1.0, 2.0, 3.0]
    assert row["eval_loss_ci95"] == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3), rel=1e-9)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert seeds_of(parser.parse_args([])) == [0]
    assert seeds_of(parser.parse_args(["--seeds", "5"])) == [0, 1, 2, 3, 4]
    assert seeds_of(parser.parse_args(["--seed-list", "3", "7"])) == [3, 7]
    with pytest.raises(ValueError, match="repeats"):
        seeds_of(parser.parse_args(["--seed-list", "3", "3"]))


def test_measure_runs_every_row_per_seed_and_compare_pairs_rows_by_seed():
    calls = []

    def run(name: str, seed: int) -> dict:
        calls.append((name, seed))
        loss = {"a": 0.70, "b": 0.75}[name] + 0.01 * seed
        return {"eval_loss": loss, "by_round": [1.0 + seed, 2.0 + seed], "codec": "x", "ok": True}

    rows = measure(["a", "b"], [0, 2], run)
    assert calls == [("a", 0), ("a", 2), ("b", 0), ("b", 2)]
    a = rows[0]
    assert a["name"] == "a" and a["eval_loss_per_seed"] == pytest.approx([0.70, 0.72]) and a["eval_loss"] == pytest.approx(0.71)
    assert a["by_round"] == [2.0, 3.0] and a["codec"] == "x" and a["ok"] is True  # lists averaged, the rest kept
    (found,) = compare(rows, [("a", "b"), ("a", "missing")])
    # the same offset on every seed: the difference is exact, its interval zero wide
    assert found["eval_loss_difference"] == pytest.approx(-0.05) and found["eval_loss_difference_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert found["row"] == "a" and found["against"] == "b"
    partial = combine("c", [{"rounds_to_target": 3}, {"rounds_to_target": None}])
    assert partial == {"name": "c", "rounds_to_target": None, "rounds_to_target_ci95": None, "rounds_to_target_per_seed": [3, None]}
    single = compare(measure(["a", "b"], [0], run), [("a", "b")])[0]
    assert single["eval_loss_difference_ci95"] is None and not single["measured"] and "no difference measured" in single["verdict"]


def test_runs_of_other_seeds_merge_into_the_table_one_run_would_give():
    """Two --out documents (seeds 0-2 and 3-4 of the same rows, run on two cores at once) merge
    into the rows one run of seeds 0-4 gives, and refuse what cannot be paired."""
    loss = {"a": [0.5, 0.7, 0.6, 0.9, 0.4], "b": [0.6, 0.7, 0.8, 1.0, 0.5]}
    runs = {name: [{"name": name, "eval_loss": v, "label": name.upper()} for v in values] for name, values in loss.items()}
    whole = [combine(name, rs) for name, rs in runs.items()]
    first = {"seeds": [0, 1, 2], "rounds": 4, "rows": [combine(n, rs[:3]) for n, rs in runs.items()]}
    second = {"seeds": [3, 4], "rounds": 4, "rows": [combine(n, rs[3:]) for n, rs in runs.items()]}
    for docs in ([first, second], [second, first]):
        rows, seeds = merge_documents(docs, settings=("rounds",))
        assert seeds == [0, 1, 2, 3, 4]
        for got, want in zip(rows, whole):
            assert got["eval_loss_per_seed"] == want["eval_loss_per_seed"] and got["label"] == want["label"]
            assert got["eval_loss"] == pytest.approx(want["eval_loss"]) and got["eval_loss_ci95"] == pytest.approx(want["eval_loss_ci95"])
    with pytest.raises(ValueError, match="ran seed 0 in two documents"):
        merge_documents([first, first])
    with pytest.raises(ValueError, match="rounds"):
        merge_documents([first, {**second, "rounds": 8}], settings=("rounds",))
    only_a = {"seeds": [3, 4], "rounds": 4, "rows": [combine("a", runs["a"][3:])]}
    with pytest.raises(ValueError, match="cannot be compared paired"):
        merge_documents([first, only_a])


def test_the_heterogeneity_table_of_two_runs_is_the_table_of_one(tmp_path, capsys):
    """bench/heterogeneity.py --table: seeds 0-2 and 3-4 run apart merge into one run's figures:
    per-seed accuracies in seed order, the per-round curve averaged over all five seeds (not the
    first document's), a target every seed of one document missed, the paired comparison against
    uniform-largest-no-deadline by hand; runs of other settings are refused, naming the setting."""
    import json

    import heterogeneity

    acc = {"uniform-largest-no-deadline": [0.55, 0.60, 0.52, 0.58, 0.50], "hetlora": [0.57, 0.62, 0.50, 0.61, 0.53]}

    def run(name, seed):
        a = acc[name][seed]
        return {"name": name, "final_eval_loss": 1.0 - a, "final_eval_accuracy": a, "mb_up_per_round": 1.0, "mb_down_per_round": 2.0,
                "sim_seconds_per_round": 24.0, "wall_seconds": 60.0, "clients_per_round": 6.0, "rounds_to_target": None if seed >= 2 else 3,
                "sim_seconds_to_target": None if seed >= 2 else 72.0, "speedup_vs_uniform_largest": None, "eval_loss_by_round": [1.0, 1.0 - a],
                "eval_accuracy_by_round": [0.4, a], "sim_seconds_by_round": [24.0, 24.0]}

    settings = {"rounds": 2, "clients_per_tier": 2, "lr": 1e-3, "tiers": {"phone": {"memory_mib": 256}}}
    paths = []
    for part, seeds in (("a", [0, 1, 2]), ("b", [3, 4])):
        doc = {**settings, "seeds": seeds, "rows": [heterogeneity.combine(n, [run(n, s) for s in seeds]) for n in acc]}
        paths.append(tmp_path / f"{part}.json")
        paths[-1].write_text(json.dumps(doc))
    assert heterogeneity.main(["--table", *map(str, paths), "--out", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["seeds"] == [0, 1, 2, 3, 4]
    rows = {r["name"]: r for r in merged["rows"]}
    assert rows["hetlora"]["final_eval_accuracy_per_seed"] == acc["hetlora"]
    assert rows["hetlora"]["final_eval_accuracy"] == pytest.approx(sum(acc["hetlora"]) / 5)
    assert rows["hetlora"]["eval_accuracy_by_round"] == pytest.approx([0.4, sum(acc["hetlora"]) / 5])
    # seeds 3 and 4 both missed the target: their document kept no per-seed list for it
    assert rows["hetlora"]["rounds_to_target_per_seed"] == [3, 3, None, None, None] and rows["hetlora"]["rounds_to_target"] is None
    diffs = [h - u for h, u in zip(acc["hetlora"], acc["uniform-largest-no-deadline"])]
    (found,) = merged["comparisons"]
    assert found["final_eval_accuracy_difference"] == pytest.approx(sum(diffs) / 5)
    assert found["final_eval_accuracy_difference_ci95"] == pytest.approx(ci95(diffs)[1])
    assert "no difference measured" in found["verdict"]  # +0.016 +- 0.031 holds zero
    assert "no difference measured" in capsys.readouterr().out
    extra = tmp_path / "extra.json"  # a row only seed 0 ran: merged only when --only leaves it out
    extra.write_text(json.dumps({**settings, "seeds": [0], "rows": [heterogeneity.combine("flora", [{**run("hetlora", 0), "name": "flora"}])]}))
    with pytest.raises(SystemExit, match="cannot be compared paired"):
        heterogeneity.main(["--table", *map(str, paths), str(extra)])
    assert heterogeneity.main(["--table", *map(str, paths), str(extra), "--only", *acc, "--out", str(tmp_path / "two.json")]) == 0
    assert [r["name"] for r in json.loads((tmp_path / "two.json").read_text())["rows"]] == list(acc)
    other = json.loads(paths[1].read_text())
    paths[1].write_text(json.dumps({**other, "lr": 3e-3}))
    with pytest.raises(SystemExit, match="lr"):
        heterogeneity.main(["--table", *map(str, paths)])


def test_a_seed_changes_the_partition_the_initialization_and_the_dropout_and_repeats_bit_for_bit(tmp_path, tiny_llama):
    """What ``--seeds`` relies on: RunConfig.seed alone decides the data partition, the initial
    adapter and every dropout mask, so one seed repeats a run exactly and another seed is
    another sample."""
    import torch

    from fedtune.config import RunConfig
    from fedtune.coordinator.checkpoint import load_checkpoint
    from fedtune.coordinator.engine import _client_seed
    from fedtune.models import ModelStore
    from fedtune.rng import step_seed, thread_draws
    from fedtune.simulation.runner import client_shares, prepare_data, run_simulation

    from conftest import sentiment_examples
    from test_end_to_end import _write_jsonl

    def config(seed: int, name: str) -> RunConfig:
        c = RunConfig()
        c.model.source, c.model.max_length, c.seed = tiny_llama, 32, seed
        c.federation.rounds, c.simulation.clients, c.simulation.partition = 1, 3, "dirichlet"
        c.simulation.data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(300, seed=1))
        c.simulation.eval_examples = 60
        c.training.local_steps, c.training.batch_size, c.lora.dropout = 3, 8, 0.1
        c.run_dir = str(tmp_path / name)
        return c

    # the partition
    shares = {}
    for seed in (0, 1):
        c = config(seed, f"p{seed}")
        train, _, labels = prepare_data(c)
        shares[seed] = client_shares(c, train, labels, 3)
    assert shares[0] != shares[1]
    # the initial adapter (LoRA's A) and the dropout masks
    from fedtune.adapters import AdapterPlan
    from fedtune.coordinator.global_model import GlobalModel
    from fedtune.models import resolve_source

    store = ModelStore()
    initial = {seed: GlobalModel(store, resolve_source(tiny_llama), "seq-cls", ["a", "b", "c"], AdapterPlan(rank=4, alpha=8.0),
                                 max_length=32, seed=seed).initial_state() for seed in (0, 1)}
    a_factors = [n for n in initial[0] if n.endswith("lora_A.weight")]
    assert a_factors and all(not torch.equal(initial[0][n], initial[1][n]) for n in a_factors)
    masks = {}
    for seed in (0, 1):
        with thread_draws(step_seed(_client_seed(seed, 1, "sim-000"), 0)):
            masks[seed] = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert not torch.equal(masks[0], masks[1])
    # whole runs: the same seed bit for bit, another seed another run
    runs = {name: run_simulation(config(seed, name)) for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    adapters = {name: load_checkpoint(r.run_dir).state for name, r in runs.items()}
    assert runs["a"].history[0]["eval_loss"] == runs["b"].history[0]["eval_loss"]
    assert adapters["a"].keys() == adapters["b"].keys() and all(torch.equal(adapters["a"][n], adapters["b"][n]) for n in adapters["a"])
    assert runs["a"].history[0]["eval_loss"] != runs["c"].history[0]["eval_loss"]
    assert any(not torch.equal(adapters["a"][n], adapters["c"][n]) for n in adapters["a"])


def test_a_split_run_repeats_bit_for_bit_whether_or_not_it_is_the_first_in_the_process(tmp_path, tiny_bert):
    """The U-shaped split's head part learns its blocks' output form on the first call in the
    process; a run that makes that call must train exactly as one that finds it learned (BERT's
    classifier has a dropout of its own, so a draw made by the probe would show)."""
    import torch

    from fedtune.config import RunConfig
    from fedtune.coordinator.checkpoint import load_checkpoint
    from fedtune.simulation.runner import run_simulation
    from fedtune.split import segments

    from conftest import sentiment_examples
    from test_end_to_end import _write_jsonl

    data = _write_jsonl(tmp_path / "train.jsonl", sentiment_examples(120, seed=1))

    def run(name: str):
        c = RunConfig()
        c.model.source, c.model.max_length, c.seed = tiny_bert, 32, 0
        c.federation.rounds, c.simulation.clients, c.simulation.partition = 1, 2, "iid"
        c.simulation.data, c.simulation.eval_examples = data, 24
        c.training.local_steps, c.training.batch_size, c.lora.dropout = 2, 8, 0.1
        c.split.mode, c.split.cut, c.split.head = "split", 1, "client"
        c.federation.client_correction = "none"
        c.run_dir = str(tmp_path / name)
        result = run_simulation(c.validate())
        return result.history[0]["eval_loss"], load_checkpoint(result.run_dir).state

    segments._TUPLE_OUTPUT.clear()  # the first run in the process: a client's first step probes
    loss_a, state_a = run("a")
    assert segments._TUPLE_OUTPUT
    loss_b, state_b = run("b")
    assert loss_a == loss_b
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[n], state_b[n]) for n in state_a)
