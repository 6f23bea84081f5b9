"""The combination matrix: every pair (and chosen triples) of the features that meet in a run.

Factors: strategy, LoRA variant, uplink codec, downlink codec, DP level, split mode, update norm
bound, FedSA, and how the frozen base is held (fp32, 4-bit or int8). For every combination:

- the composer refuses it at start in one line naming both parts and the property, or
- it keeps the echo invariant: clients that return what they got leave the global model's
  function unchanged (to 1e-6), round after round (state a part carries between rounds, such as
  a server optimizer's moments, must not move it either), through the composed chain, the
  downlink and uplink codecs as the wire carries them, the engine's trust checks and the split's
  server half, in process on a tiny Llama;
- and a covering set, in which every allowed pair appears at least once, trains one round over
  loopback gRPC with real clients (``test_a_covering_set_trains_one_round_over_grpc``).
"""

from __future__ import annotations

import functools
import itertools

import torch

from fedtune.aggregation.base import VARIANTS
from fedtune.compose import checked
from fedtune.config import ConfigError, RunConfig
from fedtune.devices import tier
from fedtune.contract.adapter_kinds import adapter_kind
from fedtune.names import A_SUFFIX, B_SUFFIX, CORE_SUFFIX
from fedtune.protocol.tensors import decode_tensors, encode_tensors

FACTORS: dict[str, list] = {
    "strategy": ["fedavg", "hetlora", "flexlora", "flora", "fedkseed", "fedprox", "scaffold", "fedadam"],
    "variant": ["lora", *sorted(VARIANTS.available())],  # every variant, a new one included
    "uplink": ["", "int8", "compeft", "projection"],   # biased with error feedback (two kinds), unbiased
    "downlink": ["", "fp16"],
    "dp": ["", "client", "sample", "both"],
    "split": ["federated", "split"],
    "bound": [0.0, 0.5],
    "share_a": [False, True],
    "base": ["fp32", "4bit", "int8"],
}
DEFAULT = {name: levels[0] for name, levels in FACTORS.items()}
# Triples where three features meet in one place (the aggregate, the client's update, the clip).
TRIPLES = [
    {"strategy": "hetlora", "dp": "sample", "uplink": "int8"},
    {"strategy": "fedprox", "split": "split", "bound": 0.5},
    {"strategy": "fedadam", "variant": "ffa", "uplink": "projection"},
    {"strategy": "fedadam", "variant": "fedsvd", "uplink": "projection"},   # refused: moments across a change of basis
    {"strategy": "scaffold", "uplink": "int8", "downlink": "fp16"},
    {"variant": "fedsb", "dp": "client", "downlink": "fp16"},
    {"variant": "ffa", "dp": "both", "bound": 0.5},
    {"strategy": "flexlora", "uplink": "int8", "bound": 0.5},
    {"share_a": True, "dp": "sample", "downlink": "fp16"},
    {"strategy": "fedkseed", "dp": "client", "downlink": "fp16"},
    {"split": "split", "downlink": "fp16", "strategy": "fedavg"},
    {"base": "4bit", "strategy": "flora", "dp": "sample"},      # folds into a quantized base (held beside it), per-example gradients over it
    {"base": "4bit", "strategy": "hetlora", "dp": "sample"},    # per-example gradients over a quantized base, per-device ranks
    {"strategy": "flora", "uplink": "int8", "dp": "client"},     # refused: error feedback across fresh factors
    {"base": "4bit", "variant": "fedsb", "split": "split"},
]
LABELS = ["negative", "neutral", "positive"]
TIERS = ["phone", "laptop", "server"]
SIGMA = 1.0
ECHO_ROUNDS = 3  # a part's state carried between rounds (moments, control variates) acts from round 2


def key(combo: dict) -> tuple:
    return tuple(combo[name] for name in FACTORS)


def combinations() -> list[dict]:
    """Every pair of factor levels (the other factors at their defaults), then the triples."""
    seen, out = set(), []
    for (f1, l1), (f2, l2) in itertools.combinations(FACTORS.items(), 2):
        for v1, v2 in itertools.product(l1, l2):
            combo = {**DEFAULT, f1: v1, f2: v2}
            if key(combo) not in seen:
                seen.add(key(combo))
                out.append(combo)
    for triple in TRIPLES:
        combo = {**DEFAULT, **triple}
        if key(combo) not in seen:
            seen.add(key(combo))
            out.append(combo)
    return out


def label(combo: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items() if v != DEFAULT[k]) or "defaults"


def config_for(combo: dict, model: str, run_dir: str) -> RunConfig:
    config = RunConfig()
    config.model.source, config.model.task, config.model.max_length, config.model.labels = model, "seq-cls", 16, list(LABELS)
    config.run_dir = run_dir
    config.federation.rounds, config.federation.min_clients = ECHO_ROUNDS, 3
    config.federation.strategy = combo["strategy"]
    config.lora.variant = combo["variant"]
    config.lora.rank, config.lora.alpha = 4, 8.0
    config.compression.uplink, config.compression.downlink = combo["uplink"], combo["downlink"]
    config.privacy.dp = combo["dp"]
    config.privacy.noise_multiplier, config.privacy.clip = 0.0, 1.0  # client level: the echo invariant needs no noise
    config.privacy.sample_noise_multiplier, config.privacy.sample_clip = SIGMA, 1.0
    config.privacy.repeatable = True
    config.split.mode = combo["split"]
    config.federation.update_norm_bound = combo["bound"]
    config.federation.share_a = combo["share_a"]
    config.federation.personal_eval = 0.0 if combo["dp"] in ("sample", "both") else 0.2  # not noised: refused under DP-SGD
    config.model.base_precision = combo["base"]
    config.training.local_steps, config.training.batch_size = 2, 4
    config.simulation.clients, config.simulation.tiers = 3, list(TIERS)
    config.eval.max_examples = 0
    return config


@functools.lru_cache(maxsize=None)
def verdicts(model: str) -> tuple[tuple[dict, str], ...]:
    """(combination, "" when the composer allows it, else its one-line refusal), once per model."""
    out = []
    for combo in combinations():
        try:
            checked(config_for(combo, model, "unused"))
            out.append((combo, ""))
        except ConfigError as exc:
            out.append((combo, str(exc)))
    return tuple(out)


# ---------------------------------------------------------------- the global model's function


def function(engine) -> dict[str, torch.Tensor]:
    """What the global model computes, tensor by tensor: scale * B (R) A per LoRA module (or
    the update of the plan's adapter kind) plus its dense delta, and every other tensor (heads)
    as it is. Re-factorizations (FedSVD, FLoRA) change the factors, never this."""
    adapter, deltas = engine.strategy.global_model(engine.state, engine.global_spec)
    scale, kind = engine.plan.scale, adapter_kind(engine.plan.kind)
    out = {}
    for module in kind.modules(adapter):
        core = adapter.get(module + CORE_SUFFIX)
        if core is None:
            out[module] = scale * kind.delta(adapter, module)
        else:
            out[module] = scale * adapter[module + B_SUFFIX].double() @ core.double() @ adapter[module + A_SUFFIX].double()
    for name, t in adapter.items():
        if not kind.is_factor(name) and not name.endswith(CORE_SUFFIX):
            out[name] = t.double()
    for module, delta in deltas.items():
        out[module] = out.get(module, 0) + delta.double()
    return out


def assert_same_function(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys(), what
    for name in before:
        gap = float((after[name] - before[name]).abs().max()) if before[name].numel() else 0.0
        assert gap <= 1e-6 * max(1.0, float(before[name].abs().max())), f"{what}: {name} moved by {gap:.3g}"


# ---------------------------------------------------------------- echo clients in process


def echo_update(engine, client_id: str, round_number: int) -> tuple[dict, dict]:
    """What a client that trained nothing sends back, as the coordinator decodes it: the
    instruction's tensors through the downlink codec (as the service encodes them), back through
    the uplink codec the task names (or raw), plus the split's server half (what the session
    holds, unchanged by no steps). Returns (tensors, metrics)."""
    from fedtune.client.uplink import Uplink

    ins = engine.instruction_for(client_id, round_number)
    codecs = {n: ins.downlink for n, t in ins.tensors.items() if t.is_floating_point()} if ins.downlink is not None else None
    received = decode_tensors(encode_tensors(ins.tensors, codecs))
    update = {}
    for name, spec in ins.expect.items():
        if name in received:
            update[name] = received[name].clone()
        elif spec.dtype == torch.int64:  # HetLoRA's rank cap: the plan's largest rank
            update[name] = torch.tensor(max([ins.plan.rank, *ins.plan.rank_per_layer.values()]), dtype=torch.int64)
        else:  # control-variate changes, FedKSeed's scalars: nothing learnt
            update[name] = torch.zeros(spec.shape, dtype=spec.dtype)
    uplink, _ = Uplink.from_options(dict(ins.options), 0)
    metrics = {"train_loss": 1.0}
    if uplink is not None:
        encoded, codec_metrics = uplink.encode(update, received, {})
        metrics.update({k: v for k, v in codec_metrics.items() if k == "codec_error"})
    else:
        encoded = encode_tensors(update)
    tensors = decode_tensors(encoded)
    if ins.procedure == "split":  # the coordinator's half: the adapter tensors above the cut, as sent
        tensors.update({n: t.clone() for n, t in ins.tensors.items() if n not in ins.expect and "/" not in n and (n.endswith(".weight") or adapter_kind(ins.plan.kind).is_factor(n))
                        and n in engine.global_spec})
    if "dp_clip" in ins.options and float(ins.options["dp_clip"]) > 0:  # a DP-SGD device's accountant figures
        metrics.update({"dp_sample_noise_multiplier": SIGMA, "dp_sample_rate": 0.25, "dp_sample_steps": 2.0, "dp_sample_epsilon": 1.0,
                        "dp_sample_rounds": 1.0, "dp_sample_secret": 0.0})
    return tensors, metrics


def run_echo_round(config: RunConfig) -> dict:
    """``ECHO_ROUNDS`` rounds of three echo clients (a phone, a laptop, a server) through a
    coordinator's engine, without gRPC; returns the last round's row after checking the function
    is unchanged after every round."""
    from fedtune.coordinator.app import Coordinator

    coordinator = Coordinator(config, eval_examples=[])
    engine = coordinator.engine
    engine.run_dir.mkdir(parents=True, exist_ok=True)  # what engine.run does first
    for i, name in enumerate(TIERS):
        engine.register(f"c{i}", tier(name), 20)
    # LoRA starts with B = 0, under which B·A hides any drift of A: start from a trained-looking B.
    g = torch.Generator().manual_seed(0)
    for name, t in list(engine.state.items()):
        if name.endswith(B_SUFFIX) and "/" not in name:
            engine.state[name] = (0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)
    before = function(engine)
    for number in range(1, ECHO_ROUNDS + 1):
        assert engine.open_round(number), engine.stopped_because
        for cid in sorted(engine.open_tasks()):
            tensors, metrics = echo_update(engine, cid, number)
            engine.submit(cid, number, tensors, 20, metrics, 0)
        row = engine.close_round()
        assert "round_refused" not in row, row.get("round_refused")
        assert_same_function(before, function(engine), f"echo, round {number}")
    return row


def test_the_matrix_is_as_large_as_it_claims(tiny_llama):
    found = verdicts(tiny_llama)
    pairs = sum(len(a) * len(b) for a, b in itertools.combinations(FACTORS.values(), 2))
    assert len(found) >= pairs - 2 * sum(len(v) for v in FACTORS.values()) ** 2 // 4  # pairs share their all-default members
    allowed = [c for c, why in found if not why]
    refused = [c for c, why in found if why]
    assert len(allowed) > 100 and len(refused) > 20, (len(allowed), len(refused))


def test_every_refused_combination_fails_at_start_in_one_line(tiny_llama):
    for combo, why in verdicts(tiny_llama):
        if why:
            assert "\n" not in why and ("cannot be combined with" in why or " needs " in why), f"{label(combo)}: {why}"


def test_every_allowed_combination_keeps_the_echo_invariant(tiny_llama, tmp_path):
    failures = []
    for i, (combo, why) in enumerate(verdicts(tiny_llama)):
        if why:
            continue
        try:
            run_echo_round(config_for(combo, tiny_llama, str(tmp_path / f"run-{i}")))
        except Exception as exc:  # noqa: BLE001 - collected, so one run names every combination that fails
            failures.append(f"{label(combo)}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, f"{len(failures)} allowed combinations break the echo invariant:\n" + "\n".join(failures)


# ---------------------------------------------------------------- a covering set over gRPC


def covering_set(model: str) -> list[dict]:
    """Whole configurations (every factor set) that the composer allows and in which every
    allowed pair of factor levels appears at least once (greedy: each configuration starts from
    an uncovered pair and takes, factor by factor, the level covering most uncovered pairs that
    keeps the configuration allowed)."""
    found = verdicts(model)
    allowed = {key(c) for c, why in found if not why}
    names = list(FACTORS)
    uncovered = set()
    for combo, why in found:
        if not why:
            for f1, f2 in itertools.combinations(names, 2):
                uncovered.add(((f1, combo[f1]), (f2, combo[f2])))

    @functools.lru_cache(maxsize=None)
    def composes(items: tuple) -> bool:
        if items in allowed:
            return True
        try:
            checked(config_for(dict(zip(names, items)), model, "unused"))
            return True
        except ConfigError:
            return False

    out = []
    while uncovered:
        (f1, v1), (f2, v2) = min(uncovered, key=repr)
        combo = {**DEFAULT, f1: v1, f2: v2}
        for f in names:
            if f in (f1, f2):
                continue

            def gain(level):
                trial = {**combo, f: level}
                return sum(1 for g in names if g != f and tuple(sorted(((f, level), (g, trial[g])), key=lambda p: names.index(p[0]))) in uncovered)

            for level in sorted(FACTORS[f], key=gain, reverse=True):
                if composes(key({**combo, f: level})):
                    combo[f] = level
                    break
        if not composes(key(combo)):  # the pair's own defaults-filled form is allowed by construction
            combo = {**DEFAULT, f1: v1, f2: v2}
        out.append(combo)
        for a, b in itertools.combinations(names, 2):
            uncovered.discard(((a, combo[a]), (b, combo[b])))
    return out


def test_a_covering_set_trains_one_round_over_grpc(tiny_llama, tmp_path):
    from fedtune.simulation.runner import run_simulation

    configs = covering_set(tiny_llama)
    assert len(configs) < 60, len(configs)
    failures = []
    for i, combo in enumerate(configs):
        config = config_for(combo, tiny_llama, str(tmp_path / f"grpc-{i}"))
        config.simulation.eval_examples, config.simulation.parallel = 24, 3
        config.federation.rounds = 1
        try:
            result = run_simulation(config)
            row = result.history[-1]
            assert row["clients"] >= 1 and "round_refused" not in row and row["train_loss"] is not None and row["train_loss"] == row["train_loss"], row
        except Exception as exc:  # noqa: BLE001 - collected: one run names every configuration that fails
            failures.append(f"{label(combo)}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, f"{len(failures)} of {len(configs)} configurations failed over gRPC:\n" + "\n".join(failures)
