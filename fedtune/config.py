"""Run configuration: typed dataclasses, loaded from TOML, with defaults that work.

A config file only needs the keys it changes. Unknown keys and wrongly typed values are errors
that name the key (``training.lr``), because a typo that silently falls back to a default is
the worst kind of bug in an experiment. The same dataclasses back the CLI flags.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.methods.split.options import SplitStream
from fedtune.options import coerce_scalar


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# Differential privacy modes: none, client-level DP-FedAvg at the coordinator, sample-level
# DP-SGD on the devices, or both.
DP_MODES = ("", "client", "sample", "both")


@dataclass
class ModelConfig:
    # An embedded model name ("minilm", "smollm2"), a transformers model folder, or a .gguf file.
    source: str = "minilm"
    # "seq-cls" (sequence classification), "causal-lm" or "seq2seq" (encoder-decoder models:
    # source text to target text, the loss on the target).
    task: str = "seq-cls"
    # seq-cls label names (index = class id). Empty: taken from the training data.
    labels: list[str] = field(default_factory=list)
    max_length: int = 64
    # causal-lm: "auto" formats prompt/response examples (training and held-out alike) with the
    # tokenizer's chat template when it has one; "none" uses the prompt's own tokens. Plain text
    # examples are never templated.
    chat_template: str = "auto"
    # How every device (and the coordinator) holds the frozen base weights: "fp32", "int8" or
    # "4bit" (NF4, through bitsandbytes; a .gguf model's 4-bit blocks kept as they are), or "gguf"
    # (a .gguf model in its file's own blocks; see fedtune.quantized_base). LoRA trains on top in fp32.
    base_precision: str = "fp32"


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module name suffixes that get LoRA, or ["all-linear"] (peft's: every linear layer but the
    # output head). Empty: peft's default for the architecture, or, for a model type peft has
    # none for, the attention's query and value projections found by name.
    target_modules: list[str] = field(default_factory=list)
    # Transformer block indices that carry LoRA. Empty: all blocks.
    layers: list[int] = field(default_factory=list)
    # "lora"; "ffa" (FFA-LoRA: every A frozen at its initialization, only B trained and sent);
    # "fedsvd" (as ffa, and the coordinator re-factorizes B @ A by SVD after every round);
    # "fedsb" (Fed-SB: B and A fixed from the truncated SVD of each pretrained weight, only a
    # rank x rank core R between them trained and sent). Variants are registered in
    # fedtune.aggregation.VARIANTS (fedtune.methods); the composer checks the name.
    variant: str = "lora"


@dataclass
class TrainingSection:
    local_steps: int = 20
    batch_size: int = 16
    # 3e-3 suits LoRA on the embedded MiniLM under non-IID splits (1e-3 learns visibly slower
    # there: bench/simulate.py's fixed workload uses it).
    learning_rate: float = 3e-3
    weight_decay: float = 0.0


@dataclass
class FederationSection:
    rounds: int = 6
    # Clients trained per round; 0 means every registered client.
    clients_per_round: int = 0
    # Registered clients needed before the first round starts.
    min_clients: int = 1
    # Fraction of a round's selected clients whose updates close the round early.
    quorum: float = 1.0
    # A round closes at this deadline with whatever updates have arrived.
    round_timeout_s: float = 600.0
    # A selected client silent for this long (no call, no heartbeat) is counted as dropped.
    client_timeout_s: float = 120.0
    # Three independent choices (`fedtune strategies` lists them by kind), each empty for its
    # default:
    # - aggregation: the rule that folds the clients' updates: fedavg (default), hetlora,
    #   flexlora, flora (heterogeneous ranks), fedkseed (zeroth-order, seeds and scalars);
    # - server_opt: a server optimizer around it: fedavgm, fedadam, fedyogi ("none": default);
    # - client_correction: a change of the clients' objective: fedlc, fedprox, scaffold
    #   ("none"). Default: fedlc for seq-cls (label skew is the rule with real clients;
    #   bench/skew.py) wherever the rest of the run can take it, none for causal-lm.
    aggregation: str = ""
    server_opt: str = ""
    client_correction: str = ""
    # Shorthand: one name that sets the choice it belongs to (`strategy = "hetlora"` is
    # `aggregation = "hetlora"`, `strategy = "fedadam"` is `server_opt = "fedadam"`); the
    # other two keep their defaults.
    strategy: str = ""
    # The options of the chosen parts in one table, each key going to the part that has it
    # (`fedtune strategies` lists them), for example:
    #   [federation.options]
    #   server_lr = 0.01   # fedadam's
    #   tau = 0.5          # fedlc's
    # `inner = NAME` (older configs: the strategy a wrapper wraps) sets that name's choice too.
    options: dict[str, Any] = field(default_factory=dict)
    # FedSA-LoRA: only the A matrices (and trained heads) are shared; each client keeps its B.
    # Refused at start by strategies that need B (flexlora, flora).
    share_a: bool = False
    # With share_a: the fraction of each client's data held out to evaluate its personalized
    # model (shared A, its own B) at the start of every round (0: off; must be 0 under
    # sample-level DP, which does not cover these evaluations).
    personal_eval: float = 0.2
    # Trusted weights (fedtune.coordinator.trust). An update's claimed example count is capped
    # by what the client registered and by max_examples_per_client (a hard ceiling); both are
    # the client's own word, so at the round's close `weighting` decides what it weighs:
    # "clipped": its count, at most weight_clip_factor times the lower median of the counts
    #   claimed in the round (one client, or equal counts: plain FedAvg);
    # "equal": every update weighs 1;
    # "claimed": the capped count as claimed (a client may weigh up to max_examples_per_client).
    weighting: str = "clipped"
    weight_clip_factor: float = 3.0
    max_examples_per_client: int = 1_000_000
    # With update_norm_bound > 0, an update whose change (L2, from what the client was sent, as
    # the aggregate sees it) exceeds the bound is refused at submit ("refuse") or clipped
    # ("clip"); at close every update is also clipped to bound * min(1, mean weight / its
    # weight), so weight times update, as a share of the weighted mean, is at most bound / n.
    update_norm_bound: float = 0.0
    update_norm_action: str = "clip"
    # In a round of at least 3 updates, an update whose change norm exceeds outlier_factor times
    # the lower median change norm of the round is left out of the aggregate alone (0: off). An
    # update with an element changed by more than 1e4 times the largest magnitude it was sent
    # (at least 1) is always left out. Under client-level DP (privacy.dp) the outlier rule and
    # the weight ratio of the norm bound are off: its clip bounds every client already. The
    # change is the model's: a strategy's own tensors sent beside it (SCAFFOLD's control-variate
    # change) are not clipped with it; they are compared among clients by the same outlier rule
    # and held to the same ceiling.
    outlier_factor: float = 20.0


@dataclass
class PlannerSection:
    # With a heterogeneous strategy (hetlora, flexlora, flora), give each client its own LoRA
    # depth and ranks from its reported capabilities. fedavg always uses the [lora] plan.
    enabled: bool = True
    min_rank: int = 2
    max_rank: int = 16
    # A client's modeled round time (compute + transfer) must stay within this budget.
    round_budget_s: float = 60.0
    # When some part of the global adapter would be trained by no client this round:
    # "warn" logs it; "adjust" adds the uncovered layers, at the global adapter's rank, to the
    # plan of the round's most capable client (beyond its budget if need be).
    coverage: str = "warn"


@dataclass
class EvalSection:
    # Held-out data evaluated centrally after each round (JSONL/CSV/text). Empty: none, unless
    # the simulation holds out part of its data.
    data: str = ""
    batch_size: int = 64
    # Use at most this many evaluation examples (0: all).
    max_examples: int = 0
    # causal-lm and seq2seq: answer the first `generate` held-out prompt/response (seq2seq:
    # source/target) examples by greedy
    # generation and report the exact-match rate (eval_generate_exact_match; 0: off), each
    # answer at most `max_new_tokens` tokens long.
    generate: int = 0
    max_new_tokens: int = 32
    # Evaluate after every `every`-th round and after the last one (1: after every round): an
    # LLM's held-out questions can cost more than a round of training. Rows of the rounds in
    # between have no eval figures.
    every: int = 1


@dataclass
class ServerSection:
    address: str = "127.0.0.1:7070"
    # TLS: certificate chain and private key files (PEM). Plaintext is only allowed on loopback
    # addresses unless `insecure = true`.
    tls_cert: str = ""
    tls_key: str = ""
    # Mutual TLS: a CA certificate (PEM); clients must present a certificate it signed.
    # `fedtune certs` makes a CA and certificates for a test deployment.
    tls_client_ca: str = ""
    insecure: bool = False
    # When set, a client must present the enrollment secret to register. Give it in a file
    # (enrollment_secret_file) or the FEDTUNE_ENROLLMENT_SECRET environment variable; a secret
    # written here is used but never copied into the run directory.
    enrollment_secret_file: str = ""
    enrollment_secret: str = field(default="", repr=False)
    # Without a secret, a coordinator listening beyond loopback refuses to start unless this is
    # set (and then warns): open enrollment lets anyone who reaches the port take part.
    open_enrollment: bool = False
    chunk_bytes: int = 3 * 1024 * 1024
    # Largest update (all tensors together) a client may push, in bytes.
    max_update_bytes: int = 1024**3
    max_workers: int = 32
    # Admission control (fedtune.coordinator.guard): authenticated streams (task long-polls,
    # uploads, split sessions) open at once overall (0: max_workers - 8, the rest is kept for
    # heartbeats and registrations) and per client, and the longest any stream may last.
    max_streams: int = 0
    per_client_calls: int = 3
    stream_deadline_s: float = 900.0
    # Every call must deliver its request message within request_timeout_s, and under load a
    # call that waits for it much longer than a real client would is cut first. Register and
    # the health check run on open_workers threads of their own, apart from authenticated calls.
    request_timeout_s: float = 10.0
    open_workers: int = 64
    # Failed authentications from one address (for one client id, or the enrollment secret)
    # are slowed down after a few: each attempt waits up to this many seconds (0: no waits).
    auth_delay_max_s: float = 2.0
    # Registrations: at most max_clients records; new ones at registrations_per_second with
    # bursts of registration_burst; records silent for evict_after_s make room when full.
    max_clients: int = 100_000
    registrations_per_second: float = 20.0
    registration_burst: int = 100
    evict_after_s: float = 86_400.0
    # Identities (fedtune.coordinator.clients). A registering party is identified by its TLS
    # client certificate (mutual TLS), else its per-device secret, else its address; parties on
    # loopback without a certificate or per-device secret (simulations) are exempt. A name held by
    # another party's live client is refused (never renamed "name-2"), the same party
    # re-registering a name replaces its record, and one party holds at most
    # max_clients_per_credential records (0: no limit).
    max_clients_per_credential: int = 4
    # Per-device enrollment secrets: a file of `name secret` lines (secrets of at least 16
    # characters); when set, a client registers only under a name whose secret it presents, and
    # the shared enrollment secret is not accepted. Re-read when it changes.
    enrollment_secrets_file: str = ""
    # "cert": with mutual TLS, a client registers only under its certificate's common name, or
    # that name followed by "-" and a suffix ("c1", "c1-gpu"). "" (default): names are free.
    bind_names: str = ""


@dataclass
class SimulationSection:
    clients: int = 5
    # Training data; empty means the embedded tweet-sentiment corpus.
    data: str = ""
    # "iid" or "dirichlet"
    partition: str = "dirichlet"
    alpha: float = 0.5
    # Examples held out from the training data for central evaluation when `eval.data` is empty.
    eval_examples: int = 1000
    # Clients training at the same time. Training already uses every core, so 1 is fastest on
    # small machines; raise it when clients are mostly waiting on emulated links.
    parallel: int = 1
    # Device mix: tier names cycled over the clients (phone, laptop, server), or a TOML file
    # of [[device]] entries (see fedtune.devices.load_profiles). Empty: identical clients.
    tiers: list[str] = field(default_factory=list)
    profiles: str = ""
    # Emulated deadline: an update whose modeled round time on its device (cost model in
    # fedtune.contract.cost) exceeds this many seconds is dropped as late. 0: no deadline.
    deadline_s: float = 0.0


@dataclass
class ExportSection:
    # Rank of the exported adapter when the global model has dense base-weight deltas (flora,
    # flexlora): 0 keeps the numerical rank, so the export reproduces the run's model exactly.
    rank: int = 0
    # Also write the merged model (base weights + adapter) as a transformers folder `merged/`.
    merged: bool = False


@dataclass
class CompressionSection:
    # Codec of the updates clients send (`fedtune codecs` lists them): fp16, bf16, int8, int4,
    # uniform, compeft, randsign, projection. Empty: raw float32.
    uplink: str = ""
    # Codec of the weights the coordinator sends: fp16, bf16, int8, int4 or uniform. Empty: raw.
    downlink: str = ""
    # Biased uplink codecs (int-b, compeft, randsign) keep what a round drops and send it later.
    error_feedback: bool = True
    # The codecs' options, e.g. [compression.uplink_options] density = 0.05, or k = 64 for
    # projection; checked against the codec's options.
    uplink_options: dict[str, Any] = field(default_factory=dict)
    downlink_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrivacySection:
    # "" (off); "client": client-level DP-FedAvg at the coordinator (every client's update is
    # clipped to `clip`, Gaussian noise of std noise_multiplier * clip is added to their sum, and
    # clients are selected by Poisson sampling, rate clients_per_round / clients connected);
    # "sample": DP-SGD on every device (per-example gradients clipped to `sample_clip`, noise
    # std sample_noise_multiplier * sample_clip, Poisson batches); "both".
    dp: str = ""
    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5
    # Opacus accountant: "rdp" or "prv".
    accountant: str = "rdp"
    # Adaptive clipping (Andrew et al.): the clip norm tracks this quantile of the update norms.
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    # Research mode: DP noise, DP batch masks and DP client selection drawn from seeds derived
    # from the run's seed, so a DP run repeats. The guarantee then does not hold against
    # whoever knows the seed (the coordinator, the operator), and the privacy report says so
    # first. Off (default): those draws come from secrets no other party knows.
    repeatable: bool = False
    # delta must be below 1/N (client level, N clients) and 1/n (sample level, n examples of
    # a device), or (epsilon, delta) allows releasing some record outright; true proceeds
    # anyway, and the run and its privacy report say so.
    allow_large_delta: bool = False
    # Stop before a round would take the client-level epsilon past this budget, and devices
    # decline a round that would take their sample-level epsilon past it (0: no budget).
    epsilon_budget: float = 0.0
    sample_clip: float = 1.0
    sample_noise_multiplier: float = 1.0
    # Instead of the noise multipliers: the epsilon to end the run at (client level: sigma
    # fixed at round 1 for federation.rounds rounds; sample level: each device's sigma for
    # rounds x local_steps steps at its own sample rate). 0: use the noise multipliers.
    target_epsilon: float = 0.0


@dataclass
class SplitPlacement:
    """Where a split run cuts the model and how the coordinator serves its half."""

    # "federated" (every client trains the whole adapter) or "split": devices run the
    # embeddings and blocks below their cut layer, the coordinator the rest (SplitFed).
    mode: str = "federated"
    # The deepest cut handed out; a device reporting its memory gets the deepest cut whose
    # bottom fits in it. Clamped to the model's blocks minus one.
    cut: int = 3
    # The coordinator's side when several clients train at once: "copies" (each session trains
    # its own copy of the server-side adapter, averaged with the round; sessions run in
    # parallel) or "shared" (one copy per round, stepped by one client step at a time).
    server_adapter: str = "copies"
    # The coordinator's training throughput in GFLOP/s, shared by the round's sessions; with it
    # the cut planner counts the coordinator's time per step. 0: not counted.
    server_gflops: float = 0.0


def _fields_of(options: type) -> list[tuple[str, Any, Any]]:
    """``options``' fields as ``make_dataclass`` takes them: name, type, default."""
    hints = typing.get_type_hints(options)
    return [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(options)]


# The [split] table: the placement above, then the split method's own stream settings (where the
# head runs, each direction's codec, AMAQ's schedule: fedtune.methods.split.options.SplitStream,
# which the SplitFed wrapper and every split device read), taken from that dataclass with their
# names, types and defaults rather than written out again, so the table cannot drift from it.
SplitSection = dataclasses.make_dataclass(
    "SplitSection", _fields_of(SplitStream), bases=(SplitPlacement,), namespace={"__module__": __name__},
)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    federation: FederationSection = field(default_factory=FederationSection)
    planner: PlannerSection = field(default_factory=PlannerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    server: ServerSection = field(default_factory=ServerSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    export: ExportSection = field(default_factory=ExportSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    split: SplitSection = field(default_factory=SplitSection)
    # Where metrics, checkpoints and the final adapter go. Empty: a new folder under runs/.
    run_dir: str = ""
    seed: int = 0

    def validate(self) -> "RunConfig":
        """Check value ranges; raise ConfigError naming the key. The schema alone: the names
        of registered parts (tasks, strategies, codecs, partitions) and whether the chosen parts
        work together are checked by ``fedtune.compose.checked``, which every command runs."""
        _check(self.model.max_length >= 8, "model.max_length", "must be at least 8")
        _check(len(set(self.model.labels)) == len(self.model.labels), "model.labels", "labels must be distinct")
        _check(self.lora.rank >= 1, "lora.rank", "must be at least 1")
        _check(self.lora.alpha > 0, "lora.alpha", "must be positive")
        _check(0.0 <= self.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _check(self.split.mode in ("federated", "split"), "split.mode", f"must be federated or split, got {self.split.mode!r}")
        _check(self.split.cut >= 1, "split.cut", "must be at least 1")
        _check(self.split.head in ("client", "server"), "split.head", f"must be client or server, got {self.split.head!r}")
        _check(self.split.server_gflops >= 0, "split.server_gflops", "must be >= 0")
        _check(self.split.server_adapter in ("copies", "shared"), "split.server_adapter", f"must be copies or shared, got {self.split.server_adapter!r}")
        _check(all(i >= 0 for i in self.lora.layers), "lora.layers", "layer indices must be >= 0")
        targets = self.lora.target_modules
        _check(all(isinstance(t, str) and t.strip() for t in targets), "lora.target_modules", "module names must be non-empty strings")
        _check("all-linear" not in targets or len(targets) == 1, "lora.target_modules",
               "'all-linear' (every linear layer but the output head) stands alone, not among module names")
        _check(self.training.local_steps >= 1, "training.local_steps", "must be at least 1")
        _check(self.training.batch_size >= 1, "training.batch_size", "must be at least 1")
        _check(self.training.learning_rate > 0, "training.learning_rate", "must be positive")
        _check(self.training.weight_decay >= 0, "training.weight_decay", "must be >= 0")
        _check(self.federation.rounds >= 1, "federation.rounds", "must be at least 1")
        _check(self.federation.clients_per_round >= 0, "federation.clients_per_round", "must be >= 0")
        _check(self.federation.min_clients >= 1, "federation.min_clients", "must be at least 1")
        _check(0.0 < self.federation.quorum <= 1.0, "federation.quorum", "must be in (0, 1]")
        _check(self.federation.round_timeout_s > 0, "federation.round_timeout_s", "must be positive")
        _check(self.server.max_workers >= 10, "server.max_workers", "must be at least 10 (8 are kept for unary calls)")
        _check(0 <= self.server.max_streams < self.server.max_workers, "server.max_streams", "must be in [0, max_workers)")
        _check(self.server.max_clients >= 1 and self.server.registration_burst >= 1, "server.max_clients", "max_clients and registration_burst must be at least 1")
        _check(self.server.registrations_per_second > 0 and self.server.evict_after_s > 0, "server.registrations_per_second", "registrations_per_second and evict_after_s must be positive")
        _check(self.server.max_clients_per_credential >= 0, "server.max_clients_per_credential", "must be >= 0 (0: no limit)")
        _check(self.server.bind_names in ("", "cert"), "server.bind_names", f"must be \"\" or \"cert\", got {self.server.bind_names!r}")
        _check(not self.server.bind_names or bool(self.server.tls_client_ca), "server.bind_names", "\"cert\" needs mutual TLS (server.tls_client_ca)")
        _check(self.server.per_client_calls >= 1, "server.per_client_calls", "must be at least 1")
        _check(self.server.stream_deadline_s > 0, "server.stream_deadline_s", "must be positive")
        _check(self.server.request_timeout_s > 0, "server.request_timeout_s", "must be positive")
        _check(self.server.open_workers >= 2, "server.open_workers", "must be at least 2")
        _check(self.server.auth_delay_max_s >= 0, "server.auth_delay_max_s", "must be >= 0")
        _check(self.federation.max_examples_per_client >= 1, "federation.max_examples_per_client", "must be at least 1")
        _check(self.federation.weighting in ("clipped", "equal", "claimed"), "federation.weighting",
               f"must be clipped, equal or claimed, got {self.federation.weighting!r} (HetLoRA's norm weighting is the strategy option federation.options.weighting)")
        _check(self.federation.weight_clip_factor >= 1, "federation.weight_clip_factor", "must be at least 1")
        _check(self.federation.outlier_factor == 0 or self.federation.outlier_factor >= 2, "federation.outlier_factor", "must be 0 (off) or at least 2")
        _check(self.federation.update_norm_bound >= 0, "federation.update_norm_bound", "must be >= 0 (0: no bound)")
        _check(self.federation.update_norm_action in ("clip", "refuse"), "federation.update_norm_action", f"must be clip or refuse, got {self.federation.update_norm_action!r}")
        _check(self.federation.client_timeout_s > 0, "federation.client_timeout_s", "must be positive")
        _check(self.privacy.dp in DP_MODES, "privacy.dp", f"unknown mode {self.privacy.dp!r}; choose one of: {', '.join(repr(m) for m in DP_MODES)}")
        for direction in ("uplink", "downlink"):
            _check(bool(getattr(self.compression, direction)) or not getattr(self.compression, direction + "_options"),
                   f"compression.{direction}_options", f"given without compression.{direction}")
        _check(0 <= self.federation.personal_eval < 1, "federation.personal_eval", "must be in [0, 1)")
        # A personalized evaluation is computed from a device's data without noise: under DP-SGD it
        # would be released outside the guarantee, and a device with a privacy policy declines it.
        _check(not (self.federation.share_a and self.federation.personal_eval > 0 and self.privacy.dp in ("sample", "both")),
               "federation.personal_eval", f"{self.federation.personal_eval:g} cannot be combined with privacy.dp {self.privacy.dp}: each device's evaluation of its "
               "personalized model is not noised, so it would be released outside DP-SGD's guarantee (and devices with a privacy "
               "policy decline such a task); set federation.personal_eval = 0")
        _check(self.export.rank >= 0, "export.rank", "must be >= 0")
        _check(1 <= self.planner.min_rank <= self.planner.max_rank, "planner.min_rank", "must be between 1 and planner.max_rank")
        _check(self.planner.round_budget_s > 0, "planner.round_budget_s", "must be positive")
        _check(self.planner.coverage in ("warn", "adjust"), "planner.coverage", "must be \"warn\" or \"adjust\"")
        from fedtune.devices import TIERS

        bad_tiers = [t for t in self.simulation.tiers if t not in TIERS]
        _check(not bad_tiers, "simulation.tiers", f"unknown tier {bad_tiers[0]!r}; choose from {', '.join(sorted(TIERS))}" if bad_tiers else "")
        _check(self.simulation.deadline_s >= 0, "simulation.deadline_s", "must be >= 0")
        _check(self.eval.batch_size >= 1, "eval.batch_size", "must be at least 1")
        _check(self.eval.max_examples >= 0, "eval.max_examples", "must be >= 0")
        _check(self.eval.every >= 1, "eval.every", "must be at least 1 (1: evaluate after every round)")
        _check(self.model.chat_template in ("auto", "none"), "model.chat_template", f"must be auto or none, got {self.model.chat_template!r}")
        from fedtune.quantized_base import PrecisionError, check_precision

        try:
            check_precision(self.model.base_precision)
        except PrecisionError as exc:
            raise ConfigError(str(exc)) from None
        _check(self.eval.generate >= 0, "eval.generate", "must be >= 0 (0: no generation)")
        _check(1 <= self.eval.max_new_tokens <= 4096, "eval.max_new_tokens", "must be between 1 and 4096")
        _check(":" in self.server.address, "server.address", "must be HOST:PORT")
        _check(bool(self.server.tls_cert) == bool(self.server.tls_key), "server.tls_key", "tls_cert and tls_key go together")
        _check(not self.server.tls_client_ca or bool(self.server.tls_cert), "server.tls_client_ca", "mutual TLS needs the server's tls_cert and tls_key")
        _check(self.server.chunk_bytes >= 1024, "server.chunk_bytes", "must be at least 1024")
        _check(self.server.chunk_bytes <= 4 * 1024**2 - 4096, "server.chunk_bytes", "must stay under gRPC's 4 MiB message cap")
        _check(self.server.max_update_bytes >= 1, "server.max_update_bytes", "must be positive")
        _check(self.simulation.clients >= 1, "simulation.clients", "must be at least 1")
        _check(self.simulation.alpha > 0, "simulation.alpha", "must be positive")
        _check(self.simulation.eval_examples >= 0, "simulation.eval_examples", "must be >= 0")
        _check(self.simulation.parallel >= 1, "simulation.parallel", "must be at least 1")
        _check(self.seed >= 0, "seed", "must be >= 0")
        return self


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ---------------------------------------------------------------- loading


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML file into a validated RunConfig."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data).validate()


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data, prefix="")


# Keys that earlier versions read, with what to write instead.
REMOVED_KEYS = {
    "privacy.secure_noise": "no longer needed: DP noise and sampling now come from the OS's randomness by default; "
                            "remove the key (privacy.repeatable = true asks for seed-derived, repeatable DP instead)",
}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            if prefix + key in REMOVED_KEYS:
                raise ConfigError(f"{prefix + key}: {REMOVED_KEYS[prefix + key]}")
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {prefix + key!r} (valid keys here: {valid})")
        values[key] = _coerce(hints[key], value, prefix + key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is dict:  # a free table (strategy options), checked by its consumer
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {_describe(value)}")
        return dict(value)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint in (bool, int, float, str):
        try:
            return coerce_scalar(hint, value, from_text=False)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}, got {_describe(value)}") from None
    if isinstance(hint, types.UnionType):  # pragma: no cover - no unions in the config today
        raise ConfigError(f"{key}: union types are not supported")
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def set_key(config: RunConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` (e.g. from a CLI flag), with the same type checks as a file."""
    *path, last = dotted.split(".")
    target: Any = config
    for part in path:
        target = getattr(target, part)
    hints = typing.get_type_hints(type(target))
    if last not in hints:
        raise ConfigError(f"unknown key {dotted!r}")
    setattr(target, last, _coerce(hints[last], value, dotted))


# ---------------------------------------------------------------- writing


# Keys never written out: the run directory is not a place for secrets.
SECRET_KEYS = {"server.enrollment_secret"}


def config_to_toml(config: RunConfig) -> str:
    """The effective config as TOML, written into each run directory (secrets left out)."""
    top, sections = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines = [f"[{f.name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(value).items() if f"{f.name}.{k}" not in SECRET_KEYS]
            sections.append("\n".join(lines))
        else:
            top.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
