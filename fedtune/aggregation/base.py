"""The round contract between the coordinator and a strategy.

A round is a conversation between a strategy (on the coordinator) and the clients' recipes (on
the devices); the round engine only keeps time.

- ``Strategy.configure(ctx, state)`` says what each selected client gets: an ``Instruction``
  with its adapter plan, the tensors it starts from, the tensors it must send back (names,
  shapes, dtypes) and the options of the recipe it trains with.
- ``Strategy.aggregate(ctx, state, updates)`` folds what came back into a new state and
  returns metrics for the round's row.
- ``Strategy.configure_evaluation(ctx, state)``, asked once after the last training round, says
  which clients evaluate the final models themselves (FedSA-LoRA: each client's personalized
  model); by default none. Those instructions expect no tensors back, only metrics.
- ``Strategy.global_model(state, spec)`` is the state as one adapter at the global plan's shape
  plus dense base-weight deltas: what the coordinator evaluates and exports.

The state is a flat dict of tensors, so the engine checkpoints it without knowing what it
holds (server optimizer moments, control variates and rank caps live there too). Strategies
are pure: everything they need is in the context and the state, which makes each one testable
with plain tensors. A ``Wrapper`` strategy wraps another (server optimizers, FedProx, FedSA...)
and changes one side of the conversation.

Strategies are chosen by name through ``STRATEGIES``; each declares a typed ``Options``
dataclass that ``build_strategy`` fills from the config file or the command line. LoRA variants
(wrappers that change the adapter clients train) are chosen by ``lora.variant`` through
``VARIANTS``. Both registries import every method folder's ``strategy`` module at their first
lookup (``fedtune.methods``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from fedtune.aggregation.lora_math import blockwise_mean
from fedtune.contract.plans import AdapterPlan
from fedtune.contract.properties import NOTHING, Declaration, chain_parts, conflicts, declare
from fedtune.contract.specs import TensorSpec
from fedtune.devices import Capabilities
from fedtune.methods import discover
from fedtune.options import MethodOptions, NoOptions, OptionsError, build_options, option_names, options_to_wire
from fedtune.registry import PluginError, Registry, UnknownNameError

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientInfo:
    """A selected client as the strategy sees it."""

    client_id: str
    plan: AdapterPlan                   # the adapter the planner gave it this round
    spec: Mapping[str, TensorSpec]      # the adapter tensors that plan builds
    capabilities: Capabilities = field(default_factory=Capabilities)
    num_examples: int = 0


@dataclass(frozen=True)
class RoundContext:
    """What a strategy knows about the round it configures or aggregates."""

    number: int
    clients: Mapping[str, ClientInfo]                  # the selected clients, by id
    seed: int = 0
    # Selected / clients known to the coordinator; with Poisson sampling (DP runs), the rate
    # each known client was selected with.
    sampling_rate: float = 1.0
    population: int = 0                                # clients known to the coordinator
    global_plan: AdapterPlan = field(default_factory=AdapterPlan)
    global_spec: Mapping[str, TensorSpec] = field(default_factory=dict)
    # The adapter tensors a plan builds on this model (a strategy that changes a plan, such as
    # HetLoRA's rank caps, needs the new shapes).
    spec_of: Callable[[AdapterPlan], Mapping[str, TensorSpec]] | None = None

    def specs(self, plan: AdapterPlan) -> Mapping[str, TensorSpec]:
        if self.spec_of is None:
            raise ValueError("this round context cannot build specs for new plans")
        return self.spec_of(plan)


@dataclass(frozen=True)
class Instruction:
    """What one client is told to do. Instructions with the same ``tensors`` object share one
    wire encoding (the service encodes each distinct payload once per round)."""

    plan: AdapterPlan
    tensors: Mapping[str, torch.Tensor]      # adapter to start from, frozen updates, recipe tensors
    expect: Mapping[str, TensorSpec]         # exactly what must come back
    options: Mapping[str, str] = field(default_factory=lambda: {"recipe": "local"})
    # How the service encodes ``tensors`` for the wire (a fedtune.compression.Codec; None: raw).
    downlink: Any = None

    @property
    def recipe(self) -> str:
        return self.options.get("recipe", "local")

    @property
    def procedure(self) -> str:
        """How the client trains: "local", "split" or "fedkseed" (see ``procedure_of``)."""
        return procedure_of(self.recipe)


@dataclass
class ClientUpdate:
    """What one client sent back: its tensors (as listed in its instruction's ``expect``), how
    many examples its weight counts for, and its training metrics."""

    client_id: str
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    # The tensors its instruction gave it (what its update is measured from; the engine fills
    # this in, so wrappers such as update codecs and client-level DP can compute deltas).
    start: Mapping[str, torch.Tensor] = field(default_factory=dict)


class Strategy:
    """Base class of every strategy; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # What this part of a run provides, refuses and needs (fedtune.contract.properties): the
    # composer (fedtune.compose) checks a run's parts against each other with these, never by
    # name. A wrapper declares only its own; ``chain`` walks the whole.
    declares: ClassVar[Declaration] = NOTHING
    # The independent choice this strategy is made for: "aggregation" (the rule that folds
    # updates), "server-opt" (a server optimizer around it), "client-correction" (a change of
    # the clients' objective); empty for parts the composer adds itself (variants, DP, codecs).
    axis: ClassVar[str] = ""
    # Clients are selected by Poisson sampling, and rounds are aggregated even when no update
    # arrived (client-level DP: its accountant assumes both).
    poisson_sampling: ClassVar[bool] = False
    # The aggregate sets each model element to a weighted mean of the values the senders sent
    # for it (or leaves it where nobody sent it); for a wrapper: it hands the inner strategy's
    # aggregate on unchanged. The coordinator then bounds the aggregate's change by what such a
    # mean can do (coordinator/trust.py); server optimizers, noise, re-factorizations and
    # control variates leave it False and get only the sanity ceiling.
    weighted_mean: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that brings its own aggregate says again what it is: a declaration is
        # never inherited by code that changes what it declares.
        if "aggregate" in cls.__dict__ and "weighted_mean" not in cls.__dict__:
            cls.weighted_mean = False

    def __init__(self, options: Any = None, *, scale: float = 1.0, seed: int = 0) -> None:
        self.options = options if options is not None else self.Options()
        self.scale = scale  # alpha / rank: the factor of every B @ A
        self.seed = seed

    # ---------------------------------------------------------------- the contract

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        """The state of round 1, from the freshly initialized global adapter."""
        return {k: v.clone() for k, v in adapter.items()}

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        raise NotImplementedError

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        raise NotImplementedError

    def configure_evaluation(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        """After the last training round: the clients (of ``ctx``) that evaluate the final
        models on their own data, and what each gets; empty (the default) for no such round.
        An evaluation instruction expects no tensors back and trains nothing."""
        return {}

    def global_model(self, state: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(adapter at ``spec``'s shapes, module name -> dense delta of its frozen weight)."""
        return {name: state[name].clone() for name in spec}, {}

    # ---------------------------------------------------------------- optional hooks

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """State tensors that are the model (what a server optimizer steps and client-level DP
        clips); the rest is bookkeeping. Default: every floating-point tensor."""
        return [n for n, t in state.items() if t.is_floating_point()]

    def kept_when_refused(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> State:
        """The state after a round whose aggregate ``new`` the coordinator refused: by default
        ``old``, as if the round had not run. A mechanism whose aggregate released something
        even so (DP noise, read by the refusal and the round's row) keeps its accounting of it."""
        return dict(old)

    def check_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        """Reject an update whose content makes no sense (ValueError with the reason); shapes
        and dtypes were already checked against the instruction."""

    def update_change(self, update: ClientUpdate) -> dict[str, torch.Tensor] | None:
        """The change ``update`` makes to the model tensors, where it is not the tensors sent
        less those received (FedKSeed's scalars stand for steps along seeded directions). The
        trust rules measure, bound and compare this, never the bytes alone: a client must not
        be able to send small numbers that stand for a large change. None: the tensors as sent."""
        return None

    def stop_reason(self, state: Mapping[str, torch.Tensor], sampling_rate: float) -> str:
        """Why the next round must not run (e.g. it would exceed a privacy budget); empty to
        go on. Asked before each round with the rate its clients are sampled at."""
        return ""

    def recipe(self) -> str:
        """The client recipe this strategy's instructions name."""
        return "local"

    def recipe_options(self) -> dict[str, str]:
        return {"recipe": self.recipe()}

    def describe(self) -> dict:
        """Name and options, for the run's records."""
        return {"name": self.name, "options": dataclasses.asdict(self.options)}

    @property
    def aggregates_weighted_mean(self) -> bool:
        """Whether the whole chain's aggregate is a weighted mean (see ``weighted_mean``)."""
        return self.weighted_mean

    def chain(self) -> list["Strategy"]:
        """This strategy and the ones it wraps, outermost first."""
        links, link = [], self
        while link is not None:
            links.append(link)
            link = getattr(link, "inner", None)
        return links

    def chain_provides(self, prop: str) -> bool:
        """Whether any link of the chain declares that it provides ``prop``."""
        return any(prop in link.declares.provides for link in self.chain())

    @property
    def heterogeneous(self) -> bool:
        """Clients may train adapters of different shapes in one round (the planner sizes them)."""
        return self.chain_provides("mixed-shapes")


class Wrapper(Strategy):
    """A strategy around another one: by default every call goes to ``inner``, with the state
    tensors the wrapper owns (``<namespace>/<name>`` for each of its ``namespaces``) left out."""

    namespaces: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inner: Strategy, options: Any = None, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(options, scale=scale, seed=seed)
        self.inner = inner

    def inner_state(self, state: Mapping[str, torch.Tensor]) -> State:
        """The part of ``state`` that belongs to the inner strategy."""
        own = tuple(ns + "/" for ns in self.namespaces)
        return {n: t for n, t in state.items() if not (own and n.startswith(own))}

    @property
    def aggregates_weighted_mean(self) -> bool:
        return self.weighted_mean and self.inner.aggregates_weighted_mean

    @property
    def poisson_sampling(self) -> bool:  # type: ignore[override]
        return self.inner.poisson_sampling

    def initial_state(self, adapter: Mapping[str, torch.Tensor]) -> State:
        return self.inner.initial_state(adapter)

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        return self.inner.configure(ctx, self.inner_state(state))

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        new_state, metrics = self.inner.aggregate(ctx, self.inner_state(state), updates)
        return {**state, **new_state}, metrics

    def configure_evaluation(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        return self.inner.configure_evaluation(ctx, self.inner_state(state))

    def global_model(self, state, spec):
        return self.inner.global_model(self.inner_state(state), spec)

    def server_params(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        return self.inner.server_params(self.inner_state(state))

    def kept_when_refused(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> State:
        return {**old, **self.inner.kept_when_refused(self.inner_state(old), self.inner_state(new))}

    def check_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        self.inner.check_update(ctx, update)

    def update_change(self, update: ClientUpdate) -> dict[str, torch.Tensor] | None:
        return self.inner.update_change(update)

    def stop_reason(self, state: Mapping[str, torch.Tensor], sampling_rate: float) -> str:
        return self.inner.stop_reason(self.inner_state(state), sampling_rate)

    def recipe(self) -> str:
        return self.inner.recipe()

    def recipe_options(self) -> dict[str, str]:
        return self.inner.recipe_options()

    def describe(self) -> dict:
        return {**super().describe(), "inner": self.inner.describe()}


def map_instructions(instructions: Mapping[str, Instruction], change: Callable[[Instruction], Instruction]) -> dict[str, Instruction]:
    """``change`` applied to each distinct instruction once: clients that shared an instruction
    (and so one wire encoding) still share the changed one."""
    changed: dict[int, Instruction] = {}
    out = {}
    for cid, ins in instructions.items():
        if id(ins) not in changed:
            changed[id(ins)] = change(ins)
        out[cid] = changed[id(ins)]
    return out


def share_by_plan(ctx: RoundContext, plan_of: Callable[[str], AdapterPlan], build: Callable[[ClientInfo, AdapterPlan], Instruction]) -> dict[str, Instruction]:
    """One instruction per distinct plan, shared by the clients of that plan (so its payload is
    built and encoded once per round)."""
    by_plan: dict[tuple, Instruction] = {}
    out = {}
    for cid, info in ctx.clients.items():
        plan = plan_of(cid)
        if plan.key() not in by_plan:
            by_plan[plan.key()] = build(info, plan)
        out[cid] = by_plan[plan.key()]
    return out


def mean_over_senders(state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], names: Sequence[str], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """For each of ``names``: the blockwise weighted mean over the updates that carry it (see
    ``lora_math.blockwise_mean``); names nobody sent are left out."""
    out = {}
    for name in names:
        senders = [u for u in updates if name in u.tensors]
        if senders:
            out[name] = blockwise_mean(state[name], [u.tensors[name] for u in senders], [weights[u.client_id] for u in senders])
    return out


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """FedAvg weights: example counts, or equal weights when every count is zero."""
    weights = [float(u.num_examples) for u in updates]
    return weights if sum(weights) > 0 else [1.0] * len(updates)


def weights_by_client(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    return dict(zip((u.client_id for u in updates), example_weights(updates)))


def weighted_train_loss(updates: Sequence[ClientUpdate]) -> float | None:
    losses = [u.metrics.get("train_loss") for u in updates]
    if not updates or any(l is None for l in losses):
        return None
    weights = example_weights(updates)
    return sum(w * l for w, l in zip(weights, losses)) / sum(weights)


# ---------------------------------------------------------------- registry

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", discover=lambda: discover("strategy"))


class Variant(Wrapper):
    """A LoRA variant (``lora.variant``): a wrapper that changes the adapter clients train.
    ``global_plan``: the fields of the global adapter plan it sets (Fed-SB: ``core``), applied
    by the coordinator when it builds the run's plan."""

    global_plan: ClassVar[Mapping[str, Any]] = {}


# Plain LoRA is no variant: the name that turns every variant off.
PLAIN_LORA = "lora"
VARIANTS: Registry[type[Variant]] = Registry("variant", discover=lambda: discover("strategy"))


def variant_class(name: str) -> type[Variant] | None:
    """The variant registered as ``name``; None for plain LoRA. UnknownNameError (a ValueError)
    listing the valid names, plain LoRA first, for any other name."""
    if name == PLAIN_LORA:
        return None
    try:
        return VARIANTS.get(name)
    except PluginError:  # an installed variant that cannot be used says why
        raise
    except UnknownNameError:
        raise UnknownNameError(f"unknown variant {name!r}; choose one of: {', '.join([PLAIN_LORA, *VARIANTS.available()])}") from None


@dataclass(frozen=True)
class InnerOption(MethodOptions):
    """The option every wrapper on a strategy axis has besides its method's: the strategy it
    wraps (only the coordinator needs it, so it is not part of the method's options)."""

    inner: str = "fedavg"


def build_strategy(name: str, options: Mapping[str, Any] | None = None, *, scale: float = 1.0, seed: int = 0) -> Strategy:
    """The strategy registered as ``name`` with its options (unknown names and options raise).

    A wrapper's options include ``inner``, the strategy it wraps; options that are not the
    wrapper's own go to the inner strategy, so one flat table configures the whole chain.
    """
    cls = STRATEGIES.get(name)
    options = dict(options or {})
    if issubclass(cls, Wrapper):
        own_names = set(option_names(cls.Options))
        own = {k: v for k, v in options.items() if k in own_names}
        rest = {k: v for k, v in options.items() if k not in own_names}
        parsed = build_options(cls.Options, own, f"strategy {name}")
        inner_name = getattr(parsed, "inner", "fedavg")
        if inner_name == name:
            raise OptionsError(f"strategy {name}: cannot wrap itself")
        inner_cls = STRATEGIES.get(inner_name)
        unknown = sorted(k for k in rest if not issubclass(inner_cls, Wrapper) and k not in option_names(inner_cls.Options))
        if unknown:
            inner_valid = ", ".join(option_names(inner_cls.Options)) or "none"
            raise OptionsError(
                f"strategy {name}: unknown option {unknown[0]!r} (valid options: {', '.join(option_names(cls.Options))}; "
                f"and those of its inner strategy {inner_name}: {inner_valid})"
            )
        inner = build_strategy(inner_name, rest, scale=scale, seed=seed)
        chain = cls(inner, parsed, scale=scale, seed=seed)
        found = conflicts(chain_parts(chain), needs=False)  # needs may be met by the task; the engine checks those
        if found:
            raise OptionsError(found[0])
        return chain
    return cls(build_options(cls.Options, options, f"strategy {name}"), scale=scale, seed=seed)


class RecipeWrapper(Wrapper):
    """A wrapper whose clients train with its own recipe (FedProx, FedLC, SCAFFOLD): the inner
    strategy's instructions, with its correction put in front of the inner recipe ("fedlc" in
    front of "hetlora": "fedlc+hetlora"; see fedtune.client.recipes.base.recipe_class) and its
    client options added."""

    recipe_name: ClassVar[str] = ""
    # The wrapper's options its clients need (sent in the instruction); the rest stay here.
    client_options: ClassVar[tuple[str, ...]] = ()
    axis = "client-correction"
    declares = declare(provides={"loss-correction"}, refuses={"loss-correction": "a client trains with one correction of its objective"})

    def recipe(self) -> str:
        return stack_recipe(self.recipe_name, self.inner.recipe())

    def recipe_options(self) -> dict[str, str]:
        own = {k: v for k, v in options_to_wire(self.options).items() if k in self.client_options}
        return {**self.inner.recipe_options(), **own, "recipe": self.recipe()}

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        own = {k: v for k, v in options_to_wire(self.options).items() if k in self.client_options}
        return map_instructions(super().configure(ctx, state), lambda ins: dataclasses.replace(
            ins, options={**ins.options, **own, "recipe": stack_recipe(self.recipe_name, ins.recipe)}))


def stack_recipe(correction: str, recipe: str) -> str:
    """``correction`` in front of ``recipe``: "fedlc" before "local" is "fedlc+local". A spec
    the coordinator writes always ends with its training procedure."""
    return f"{correction}+{recipe or 'local'}"


def procedure_of(recipe: str) -> str:
    """The training procedure a recipe spec ends with ("split" in "fedlc+split"). The client
    side composes the spec (fedtune.client.recipes.base.recipe_class)."""
    return recipe.split("+")[-1] or "local"
