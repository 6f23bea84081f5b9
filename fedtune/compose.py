"""The composer: a run's strategy chain built from its configuration, and refused at start when
two of its parts cannot work together.

A run is made of independent choices:

- the aggregation rule (``federation.aggregation``: fedavg, hetlora, flexlora, flora, fedkseed);
- a server optimizer around it (``federation.server_opt``: fedavgm, fedadam, fedyogi);
- a client-side correction of the objective (``federation.client_correction``: fedlc, fedprox,
  scaffold), by default the one that fits the task (fedlc for classification, which learns
  under label skew) wherever the rest of the run can take it;
- the LoRA variant (``lora.variant``), DP (``privacy.dp``), FedSA (``federation.share_a``), split
  learning (``split.mode``) and the update codecs (``[compression]``).

``federation.strategy`` is a shorthand that sets the one choice its name belongs to. A name may
also be an installed plugin's (entry point group ``fedtune.strategies``) or a
``package.module:Name`` spec, which ``STRATEGIES`` loads on first use (``fedtune.registry``). Each part
declares what it provides, refuses and needs (``fedtune.contract.properties``); the composer
collects the parts, checks them against each other and builds the chain, innermost first:
aggregation, correction, server optimizer, variant, client-level DP, sample-level DP, FedSA,
split, codecs. The configuration is read, never changed: a default is resolved here each time,
so a config file cannot change which default applies.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from fedtune.aggregation import STRATEGIES, Strategy, Wrapper
from fedtune.aggregation.base import variant_class
from fedtune.config import ConfigError, RunConfig
from fedtune.contract.properties import CompositionError, Part, chain_parts, check, conflicts, declare
from fedtune.options import OptionsError, build_options, option_names
from fedtune.registry import UnknownNameError

log = logging.getLogger(__name__)

AXES = ("aggregation", "client-correction", "server-opt")
# The config key of each axis.
AXIS_KEYS = {"aggregation": "federation.aggregation", "client-correction": "federation.client_correction", "server-opt": "federation.server_opt"}
AXIS_NAMES = {"aggregation": "an aggregation rule", "client-correction": "a client correction", "server-opt": "a server optimizer"}
NONE = "none"
# The correction a task gets when the configuration names none, where the run can take it
# (chosen from bench/skew.py: under label skew fedlc learns where the others stall).
DEFAULT_CORRECTION = {"seq-cls": "fedlc"}


@dataclass(frozen=True)
class Choice:
    """One axis's choice: the strategy name ("" for none) and the setting that made it."""

    name: str
    label: str


def choices(config: RunConfig) -> dict[str, Choice]:
    """The three strategy axes as the configuration sets them (explicit keys, the shorthand
    ``federation.strategy`` and an older ``inner`` option), before task defaults. Raises
    ConfigError for an unknown name, a name on the wrong axis, or two names for one axis."""
    fed = config.federation
    found: dict[str, Choice] = {}

    def put(axis: str, name: str, label: str) -> None:
        if axis in found and found[axis].name != name:
            raise ConfigError(f"{found[axis].label} and {label} both choose {AXIS_NAMES[axis]}")
        found[axis] = Choice(name, label)

    def axis_of(name: str, key: str) -> str:
        try:
            return STRATEGIES.get(name).axis
        except UnknownNameError as exc:
            raise ConfigError(f"{key}: {exc}") from None

    for axis in AXES:
        key = AXIS_KEYS[axis]
        value = getattr(fed, key.split(".")[1])
        if not value:
            continue
        if value == NONE and axis != "aggregation":
            put(axis, "", f"{key} = none")
            continue
        actual = axis_of(value, key)
        if actual != axis:
            raise ConfigError(f"{key}: {value} is {AXIS_NAMES.get(actual, 'not a choice of its own')}, not {AXIS_NAMES[axis]}; "
                              f"set {AXIS_KEYS.get(actual, 'federation.strategy')} = \"{value}\" instead")
        put(axis, value, f"{key} {value}")
    if fed.strategy:
        put(axis_of(fed.strategy, "federation.strategy"), fed.strategy, f"federation.strategy {fed.strategy}")
    inner = fed.options.get("inner")
    if inner:
        put(axis_of(str(inner), "federation.options.inner"), str(inner), f"federation.options.inner {inner}")
    return found


def compose(config: RunConfig, scale: float | None = None) -> Strategy:
    """The run's strategy chain (see the module docstring). Raises ConfigError with one line
    naming the setting (or the two parts and the property) that is wrong."""
    from fedtune.tasks import TASKS

    try:
        task = TASKS.get(config.model.task)
    except UnknownNameError as exc:
        raise ConfigError(f"model.task: {exc}") from None
    scale = config.lora.alpha / config.lora.rank if scale is None else scale
    picked = choices(config)
    picked.setdefault("aggregation", Choice("fedavg", "the default aggregation fedavg"))
    picked.setdefault("server-opt", Choice("", ""))
    # The model's parts: its task, and how the frozen base is held (a quantized base is read
    # through bitsandbytes' layers, which not every adapter kind can wrap).
    model_parts = [Part(f"model.task {config.model.task}", task.declares)]
    if config.model.base_precision != "fp32":
        model_parts.append(Part(f"model.base_precision {config.model.base_precision}", declare(provides={"quantized-base"})))
    default = DEFAULT_CORRECTION.get(config.model.task, "")
    if "client-correction" not in picked and default:
        try:
            return _build(config, {**picked, "client-correction": Choice(default, f"the default client correction {default}")}, scale, model_parts)
        except CompositionError as exc:
            log.info("the default client correction %s is left out: %s", default, exc)
    picked.setdefault("client-correction", Choice("", ""))
    try:
        return _build(config, picked, scale, model_parts)
    except CompositionError as exc:
        raise ConfigError(str(exc)) from None


def _build(config: RunConfig, picked: Mapping[str, Choice], scale: float, model_parts: list[Part]) -> Strategy:
    """Build the chain for ``picked`` and check every part; CompositionError (a ConfigError)
    when two parts conflict."""
    seed = config.seed
    order = [picked["aggregation"], picked["client-correction"], picked["server-opt"]]
    named = [c for c in order if c.name]
    options = _split_options(config.federation.options, named)
    labels: dict[int, str] = {}
    strategy: Strategy | None = None
    inner_name = ""  # the name the inner link was chosen by (a plugin's spec, not its class's name)
    for choice in named:
        cls = STRATEGIES.get(choice.name)
        where = f"federation.options ({choice.name})"
        if issubclass(cls, Wrapper):
            own = {**options[choice.name], **({"inner": inner_name} if "inner" in option_names(cls.Options) else {})}
            strategy = cls(strategy, _options(cls, own, where), scale=scale, seed=seed)
        else:
            strategy = cls(_options(cls, options[choice.name], where), scale=scale, seed=seed)
        labels[id(strategy)] = choice.label
        inner_name = choice.name
    if strategy is None:
        raise ConfigError("federation.aggregation: no aggregation rule chosen")

    def wrap(link: Strategy, label: str) -> Strategy:
        labels[id(link)] = label
        return link

    # The adapter variant and FedSA wrap the strategy first: they narrow what clients send, and
    # client-level DP (outside them) clips and noises only that, read from their server_params
    # (not FFA's frozen A, not Fed-SB's fixed factors, not the B that FedSA keeps on devices).
    lora = config.lora
    variant = _variant(lora.variant)
    if variant is not None:
        strategy = wrap(variant(strategy, scale=scale, seed=seed), f"lora.variant {lora.variant}")
    if config.federation.share_a:
        from fedtune.methods.fedsa.options import FedSAOptions
        from fedtune.methods.fedsa.strategy import FedSA

        strategy = wrap(FedSA(strategy, FedSAOptions(config.federation.personal_eval), scale=scale, seed=seed), "federation.share_a")
    # Client-level DP sits inside sample-level DP: the latter reads each real update's
    # accountant figures before the former folds them into one noised mean.
    p = config.privacy
    if p.dp in ("client", "both"):
        from fedtune.methods.client_dp.strategy import ClientDP, ClientDPOptions

        dp_options = _options(ClientDPOptions, {
            "clip": p.clip, "noise_multiplier": p.noise_multiplier, "delta": p.delta, "accountant": p.accountant,
            "adaptive": p.adaptive_clip, "target_quantile": p.target_quantile, "repeatable": p.repeatable,
            "epsilon_budget": p.epsilon_budget, "target_epsilon": p.target_epsilon, "rounds": config.federation.rounds,
        }, "privacy")
        strategy = wrap(ClientDP(strategy, dp_options, scale=scale, seed=seed), f"privacy.dp {p.dp} (client level)")
    if p.dp in ("sample", "both"):
        from fedtune.methods.sample_dp.options import SampleDPOptions
        from fedtune.methods.sample_dp.strategy import SampleDP

        dp_options = _options(SampleDPOptions, {
            "dp_clip": p.sample_clip, "dp_noise_multiplier": p.sample_noise_multiplier, "dp_delta": p.delta, "dp_budget": p.epsilon_budget,
            "dp_target_epsilon": p.target_epsilon, "dp_total_steps": config.federation.rounds * config.training.local_steps if p.target_epsilon else 0,
            "dp_repeatable": p.repeatable, "dp_allow_large_delta": p.allow_large_delta,
        }, "privacy (sample level)")
        strategy = wrap(SampleDP(strategy, dp_options, scale=scale, seed=seed), f"privacy.dp {p.dp} (sample level)")
    if config.split.mode == "split":
        from fedtune.methods.split.options import SplitFedOptions
        from fedtune.methods.split.strategy import SplitFed

        sp = config.split
        anneal = sp.anneal_steps or max(1, config.federation.rounds * config.training.local_steps // 2)
        fields = {k: v for k, v in dataclasses.asdict(sp).items() if k not in ("mode", "server_adapter", "server_gflops")}
        split_options = _options(SplitFedOptions, {**fields, "anneal_steps": anneal, "local_steps": config.training.local_steps}, "split")
        strategy = wrap(SplitFed(strategy, split_options, scale=scale, seed=seed), "split.mode split")
    c = config.compression
    if c.uplink or c.downlink:
        from fedtune.aggregation.compress import Compress

        uplink = _codec("uplink", c.uplink, c.uplink_options)
        downlink = _codec("downlink", c.downlink, c.downlink_options)
        label = " and ".join(f"compression.{d} {n}" for d, n in (("uplink", c.uplink), ("downlink", c.downlink)) if n)
        try:
            strategy = wrap(Compress(strategy, uplink, downlink, error_feedback=c.error_feedback), label)
        except OptionsError as exc:
            raise ConfigError(str(exc)) from None
    check([*chain_parts(strategy, labels), *model_parts])
    return strategy


def check_chain(strategy: Strategy, task: str = "") -> None:
    """Refuse a hand-built chain whose parts conflict (the round engine checks every strategy it
    is given, composed or not). ``task``: the run's task, whose declaration joins the check."""
    from fedtune.tasks import TASKS

    parts = chain_parts(strategy)
    if task in TASKS:
        parts.append(Part(f"model.task {task}", TASKS.get(task).declares))
    found = conflicts(parts)
    if found:
        raise CompositionError(found[0])


def checked(config: RunConfig) -> RunConfig:
    """``config`` checked as a run needs it at start: the schema (``RunConfig.validate``), the
    names of registered parts and the composition. Returns ``config``."""
    compose(config.validate())
    return config


def _variant(name: str) -> type | None:
    """The LoRA variant class ``lora.variant`` names (None for plain LoRA); ConfigError listing
    the valid names for an unknown one."""
    try:
        return variant_class(name)
    except UnknownNameError as exc:
        raise ConfigError(f"lora.variant: {exc}") from None


def _split_options(options: Mapping[str, Any], named: list[Choice]) -> dict[str, dict[str, Any]]:
    """``federation.options`` split among the chosen strategies: each key goes to the first
    part (aggregation, correction, server optimizer) whose options have it."""
    out: dict[str, dict[str, Any]] = {c.name: {} for c in named}
    fields = {c.name: [f for f in option_names(STRATEGIES.get(c.name).Options) if f != "inner"] for c in named}
    for key, value in options.items():
        if key == "inner":
            continue
        owner = next((name for name, names in fields.items() if key in names), None)
        if owner is None:
            valid = "; ".join(f"{name}: {', '.join(names) or 'none'}" for name, names in fields.items())
            raise ConfigError(f"federation.options: unknown option {key!r} for this run's strategies (valid options: {valid})")
        out[owner][key] = value
    return out


def _options(cls: type, values: Mapping[str, Any], where: str) -> Any:
    options_cls = getattr(cls, "Options", cls)
    try:
        return build_options(options_cls, values, where)
    except OptionsError as exc:
        raise ConfigError(str(exc)) from None


def _codec(direction: str, name: str, options: Mapping[str, Any]):
    if not name:
        return None
    from fedtune.compression import make_codec

    try:
        return make_codec(name, options)
    except (OptionsError, UnknownNameError) as exc:
        raise ConfigError(f"compression.{direction}: {exc}") from None
