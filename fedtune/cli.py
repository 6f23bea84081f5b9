"""The ``fedtune`` command: coordinator, client, simulate.

Flags override the config file, which overrides the defaults. Mistakes (a bad flag, an
unknown config key, a missing file) end with one line that names the problem, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from fedtune import __version__
from fedtune.allocator import tune_allocator
from fedtune.config import ConfigError, RunConfig, load_config, set_key
from fedtune.options import parse_scalar

# flag dest -> config key; a flag left at None keeps the file's (or default) value
COMMON_KEYS = {
    "model": "model.source",
    "task": "model.task",
    "labels": "model.labels",
    "max_length": "model.max_length",
    "rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "rounds": "federation.rounds",
    "clients_per_round": "federation.clients_per_round",
    "strategy": "federation.strategy",
    "aggregation": "federation.aggregation",
    "server_opt": "federation.server_opt",
    "client_correction": "federation.client_correction",
    "round_timeout": "federation.round_timeout_s",
    "max_rank": "planner.max_rank",
    "min_rank": "planner.min_rank",
    "round_budget": "planner.round_budget_s",
    "local_steps": "training.local_steps",
    "batch_size": "training.batch_size",
    "lr": "training.learning_rate",
    "eval_data": "eval.data",
    "chat_template": "model.chat_template",
    "base_precision": "model.base_precision",
    "eval_generate": "eval.generate",
    "eval_max_new_tokens": "eval.max_new_tokens",
    "eval_every": "eval.every",
    "run_dir": "run_dir",
    "seed": "seed",
    "lora_variant": "lora.variant",
    "target_modules": "lora.target_modules",
    "dp": "privacy.dp",

    "delta": "privacy.delta",
    "epsilon_budget": "privacy.epsilon_budget",
    "target_epsilon": "privacy.target_epsilon",
    "dp_repeatable": "privacy.repeatable",
    "allow_large_delta": "privacy.allow_large_delta",
    "codec": "compression.uplink",
    "mode": "split.mode",
    "cut": "split.cut",
    "head": "split.head",
    "downlink_codec": "compression.downlink",
}
COORDINATOR_KEYS = {
    "address": "server.address",
    "min_clients": "federation.min_clients",
    "quorum": "federation.quorum",
    "tls_cert": "server.tls_cert",
    "tls_key": "server.tls_key",
    "tls_client_ca": "server.tls_client_ca",
    "enrollment_secret_file": "server.enrollment_secret_file",
    "enrollment_secrets_file": "server.enrollment_secrets_file",
    "max_clients_per_credential": "server.max_clients_per_credential",
    "bind_names": "server.bind_names",
}
SIMULATION_KEYS = {
    "clients": "simulation.clients",
    "data": "simulation.data",
    "partition": "simulation.partition",
    "dirichlet_alpha": "simulation.alpha",
    "eval_examples": "simulation.eval_examples",
    "parallel": "simulation.parallel",
    "tiers": "simulation.tiers",
    "profiles": "simulation.profiles",
    "deadline": "simulation.deadline_s",
}


def target_modules_arg(text: str) -> list[str]:
    """``--target-modules``: a comma-separated list of module names, or ``all-linear``."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected module names separated by commas (e.g. q_proj,v_proj) or all-linear")
    if "all-linear" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("all-linear (every linear layer but the output head) stands alone, not among module names")
    return names


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML run configuration (flags override it)")
    p.add_argument("--model", help="embedded model name (minilm, smollm2), model folder or .gguf file")
    p.add_argument("--task", help="seq-cls, causal-lm or seq2seq (encoder-decoder models: source text to target text)")
    p.add_argument("--labels", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], help="comma-separated label names (seq-cls)")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--lora-variant", help="lora (plain LoRA, the default) or a variant: ffa, fedsvd, fedsb, loha, ...; "
                                          "`fedtune strategies` lists every variant installed")
    p.add_argument("--target-modules", type=target_modules_arg, metavar="NAMES",
                   help="comma-separated names of the modules that get LoRA (e.g. q_proj,v_proj), or all-linear; "
                        "default: peft's choice for the model type, else the attention's query and value projections")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (the update is scaled by alpha/rank)")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--clients-per-round", type=int, help="clients trained per round (0: all)")
    p.add_argument("--aggregation", help="the aggregation rule: fedavg (default), hetlora, flexlora, flora, fedkseed")
    p.add_argument("--server-opt", help="a server optimizer around it: fedavgm, fedadam, fedyogi, or none (default)")
    p.add_argument("--client-correction", help="a change of the clients' objective: fedlc, fedprox, scaffold, or none; "
                                               "default: fedlc for seq-cls where the run can take it, none for causal-lm")
    p.add_argument("--strategy", help="shorthand: one name that sets the choice it belongs to (--strategy hetlora is --aggregation hetlora); "
                                      "`fedtune strategies` lists them with their options")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="an option of the chosen strategies, e.g. -o server_lr=0.01 -o tau=0.5 (repeatable)")
    p.add_argument("--codec", help="codec of the clients' updates (`fedtune codecs` lists them): fp16, bf16, int8, int4, compeft, randsign, projection, ...")
    p.add_argument("--codec-option", action="append", metavar="KEY=VALUE", help="an option of the uplink codec, e.g. --codec-option density=0.05 (repeatable)")
    p.add_argument("--k", type=int, help="directions per block of --codec projection (shorthand for --codec-option k=K)")
    p.add_argument("--downlink-codec", help="codec of the weights the coordinator sends: fp16, bf16, int8, int4")
    p.add_argument("--no-error-feedback", action="store_true", default=None, help="biased uplink codecs drop what they lose instead of sending it later")
    p.add_argument("--dp", choices=["client", "sample", "both"], help="differential privacy: client (DP-FedAvg: clip each client's update, noise the sum), sample (DP-SGD on every device), or both")
    p.add_argument("--noise-multiplier", type=float, help="DP noise multiplier sigma (noise std = sigma * clip) of the level(s) --dp names")
    p.add_argument("--clip", type=float, help="DP clip norm: of each client's whole update (client level), of each example's gradient (sample level)")
    p.add_argument("--delta", type=float, help="DP delta of the reported epsilon")
    p.add_argument("--target-epsilon", type=float, help="DP: choose the noise multiplier(s) that end the run at this epsilon")
    p.add_argument("--epsilon-budget", type=float, help="stop before a round would take the client-level epsilon past this")
    p.add_argument("--dp-repeatable", action="store_true", default=None, help="research mode: DP noise and sampling drawn from the run's seed, so the run repeats; "
                   "the guarantee then does not hold against whoever knows the seed (the report says so first)")
    p.add_argument("--allow-large-delta", action="store_true", default=None, help="proceed although delta >= 1/N clients or 1/n examples of a device (the report says so)")
    p.add_argument("--mode", choices=["federated", "split"], help="split: devices run the bottom of the model up to their cut layer, the coordinator the rest (activations and gradients AMAQ-compressed)")
    p.add_argument("--cut", type=int, help="split: deepest cut layer (devices that report memory may get a shallower one)")
    p.add_argument("--head", choices=["client", "server"], help="split: client (U-shaped, labels stay on the device; default) or server (labels travel with the activations)")
    p.add_argument("--split-codec", help="split: codec of activations and gradients: fp32, fp16, bf16, uniform, amaq (default)")
    p.add_argument("--split-bits", type=float, help="split: bits per element (uniform) or mean budget (amaq) of both directions")
    p.add_argument("--share-a", action="store_true", default=None, help="FedSA-LoRA: share only A; each client keeps its B")
    p.add_argument("--min-rank", type=int, help="planner: smallest rank it hands out")
    p.add_argument("--max-rank", type=int, help="planner: largest rank (the global adapter's)")
    p.add_argument("--round-budget", type=float, help="planner: seconds a client's modeled round may take")
    p.add_argument("--no-planner", action="store_true", default=None, help="one plan for every client, even with a heterogeneous strategy")
    p.add_argument("--round-timeout", type=float, help="seconds before a round closes with what it has")
    p.add_argument("--local-steps", type=int, help="optimizer steps per client per round")
    p.add_argument("--batch-size", type=int, help="local batch size")
    p.add_argument("--lr", type=float, help="local learning rate")
    p.add_argument("--eval-data", help="held-out data evaluated centrally after each round")
    p.add_argument("--chat-template", choices=["auto", "none"], help="causal-lm: format prompt/response examples with the tokenizer's chat template "
                   "when it has one (auto, the default) or never (none)")
    p.add_argument("--base-precision", choices=["fp32", "int8", "4bit", "gguf"], help="how devices and the coordinator hold the frozen base weights: "
                   "fp32 (the default), int8 (through bitsandbytes), 4bit (NF4 through bitsandbytes; a .gguf model's 4-bit blocks "
                   "kept as they are; a language model's output layer in 8 bits), or gguf (a .gguf model kept in its file's own "
                   "4- to 8-bit blocks, exactly the file's weights); LoRA trains on top in fp32")
    p.add_argument("--eval-generate", type=int, metavar="N", help="causal-lm and seq2seq: answer the first N held-out prompts by greedy generation and report "
                   "the exact-match rate against their responses (0: off, the default)")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate after every N-th round and after the last (default 1: every round)")
    p.add_argument("--eval-max-new-tokens", type=int, metavar="N", help="causal-lm: new tokens each --eval-generate answer may take (default 32)")
    p.add_argument("--run-dir", help="output folder (default: a new folder under runs/)")
    p.add_argument("--seed", type=int, help="seed of every random choice")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    _add_log_format(p)


def _add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["rich", "plain", "json"], default=None,
                   help="log lines: rich (terminal), plain, or json (one object per line with ts, level, logger, message, round, client_id); "
                        "default rich, or FEDTUNE_LOG_FORMAT")


class _RefuseSecret(argparse.Action):
    """``--enrollment-secret VALUE`` would put the secret where ``ps`` shows it: refuse it and
    say what to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--enrollment-secret: a secret on the command line is visible to every user of the machine (ps); "
                     "put it in a file and pass --enrollment-secret-file, or set FEDTUNE_ENROLLMENT_SECRET")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of transformers with LoRA over gRPC.")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="coordinator + N clients on this machine over loopback gRPC")
    _add_common(sim)
    sim.add_argument("--clients", type=int, help="number of simulated clients")
    sim.add_argument("--data", help="training data (JSONL/CSV/text); default: the embedded tweet corpus")
    sim.add_argument("--partition", help="iid or dirichlet")
    sim.add_argument("--dirichlet-alpha", dest="dirichlet_alpha", type=float, help="Dirichlet concentration of --partition dirichlet (smaller = more skewed)")
    sim.add_argument("--eval-examples", type=int, help="examples held out for evaluation when --eval-data is not given")
    sim.add_argument("--parallel", type=int, help="clients training at the same time")
    sim.add_argument("--tiers", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], help="device tiers cycled over the clients, e.g. phone,laptop,server")
    sim.add_argument("--profiles", help="TOML file of [[device]] entries (sets the number of clients)")
    sim.add_argument("--deadline", type=float, help="emulated deadline: drop updates whose modeled round time on their device is longer")
    sim.add_argument("--force", action="store_true", help="a --run-dir that is not empty: move its contents aside to <run-dir>.old-<timestamp> and start afresh")

    coord = sub.add_parser("coordinator", help="serve a federated run to client agents")
    _add_common(coord)
    coord.add_argument("--address", help="HOST:PORT to listen on (default 127.0.0.1:7070)")
    coord.add_argument("--min-clients", type=int, help="clients needed before the first round")
    coord.add_argument("--quorum", type=float, help="fraction of selected clients that closes a round")
    coord.add_argument("--tls-cert", help="TLS certificate chain (PEM)")
    coord.add_argument("--tls-key", help="TLS private key (PEM)")
    coord.add_argument("--tls-client-ca", help="mutual TLS: CA certificate (PEM) that must have signed every client's certificate")
    coord.add_argument("--insecure", action="store_true", default=None, help="allow plaintext on a non-loopback address")
    coord.add_argument("--enrollment-secret-file", help="file holding the secret a client must present to register (or set FEDTUNE_ENROLLMENT_SECRET)")
    coord.add_argument("--enrollment-secret", action=_RefuseSecret, help=argparse.SUPPRESS)
    coord.add_argument("--enrollment-secrets-file", help="per-device enrollment secrets: a file of `name secret` lines; a client registers only under "
                       "a name whose secret it presents (the shared secret is then not accepted); re-read when it changes")
    coord.add_argument("--max-clients-per-credential", type=int, help="client records one party (client certificate, per-device secret or "
                       "remote address) may hold (default 4; 0: no limit)")
    coord.add_argument("--bind-names", metavar="cert", help="cert: with mutual TLS, a client registers only as its certificate's common name "
                       "or CN-<suffix>; \"\" (default): names are free")
    coord.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    coord.add_argument("--force", action="store_true", help="a --run-dir that is not empty: move its contents aside to <run-dir>.old-<timestamp> and start afresh")

    sub.add_parser("strategies", help="list the strategies and their options")
    sub.add_parser("codecs", help="list the update codecs and their options")

    report = sub.add_parser("privacy-report", help="write privacy.json, privacy.md and privacy.png for a finished run")
    report.add_argument("run_dir", type=Path, help="the run's directory")
    report.add_argument("--delta", type=float, default=None, help="delta of the reported epsilon (default: the run's)")

    audit = sub.add_parser("privacy-audit", help="a lower bound on epsilon of fedtune's DP mechanisms from one run each with canaries (Steinke et al. 2023)")
    audit.add_argument("--level", choices=["sample", "client", "both"], default="both", help="DP-SGD on a device, DP-FedAvg on the coordinator, or both")
    audit.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 4.0, 8.0], metavar="E", help="target epsilons of the correct mechanisms (the broken controls report epsilon 1)")
    audit.add_argument("--canaries", type=int, default=1000, help="canaries per run, each included with probability 1/2")
    audit.add_argument("--seed", type=int, default=None, help="the auditor's seed (default: fresh secrets, recorded in --out)")
    audit.add_argument("--out", type=Path, help="write the rows as JSON")

    cli = sub.add_parser("client", help="run a device agent against a coordinator")
    cli.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    cli.add_argument("--data", required=True, help="this device's training data (JSONL/CSV/text)")
    cli.add_argument("--model", default="minilm", help="the base model the coordinator serves (embedded name, folder or .gguf)")
    cli.add_argument("--task", default="seq-cls", choices=["seq-cls", "causal-lm", "seq2seq"], help="how to read --data")
    cli.add_argument("--name", default=None, help="name shown in the coordinator's logs (default: host name)")
    cli.add_argument("--tier", default="", help="device tier label")
    cli.add_argument("--memory-gb", type=float, default=0.0, help="memory the device can give to training")
    cli.add_argument("--tflops", type=float, default=0.0, help="sustained training throughput")
    cli.add_argument("--calibrate", action="store_true", help="measure the training throughput on this device (a few steps of the model) and report it instead of --tflops")
    cli.add_argument("--uplink-mbps", type=float, default=0.0)
    cli.add_argument("--downlink-mbps", type=float, default=0.0)
    cli.add_argument("--tls-ca", default="", help="CA certificate (PEM) to verify the coordinator")
    cli.add_argument("--tls-cert", default="", help="mutual TLS: this device's certificate (PEM)")
    cli.add_argument("--tls-key", default="", help="mutual TLS: this device's private key (PEM)")
    cli.add_argument("--insecure", action="store_true", help="allow plaintext to a non-loopback coordinator")
    cli.add_argument("--enrollment-secret-file", default="", help="file holding the coordinator's enrollment secret (or set FEDTUNE_ENROLLMENT_SECRET)")
    cli.add_argument("--enrollment-secret", action=_RefuseSecret, help=argparse.SUPPRESS)
    cli.add_argument("--state-dir", default="", help="folder where the device keeps its identity, recipe memory (FedSA's B, SCAFFOLD's controls), "
                     "error-feedback residuals and DP accounting across restarts")
    cli.add_argument("--give-up-after", type=float, default=300.0, help="seconds of unreachable coordinator before exiting")
    cli.add_argument("--max-epsilon", type=float, default=None, help="this device's own privacy policy: refuse any task that is not DP-SGD "
                     "or would take its epsilon (all rounds it ever trained, kept in --state-dir) past this")
    cli.add_argument("--min-noise-multiplier", type=float, default=None, help="policy: refuse DP-SGD tasks with less noise than this")
    cli.add_argument("--delta", type=float, default=None, help="policy: the delta this device accounts at; tasks with a larger delta are refused")
    cli.add_argument("--allow-known-seed", action="store_true", default=None, help="policy: accept research-mode DP (noise from the coordinator's seed; no guarantee against it)")
    cli.add_argument("--config", type=Path, default=None, help="TOML file with this device's privacy policy as a [privacy] table "
                     "(max_epsilon, min_noise_multiplier, delta, allow_known_seed); the flags above override it")
    cli.add_argument("-v", "--verbose", action="count", default=0)
    _add_log_format(cli)

    certs = sub.add_parser("certs", help="make a CA, a coordinator certificate and client certificates for a test deployment (mutual TLS)")
    certs.add_argument("--out", type=Path, required=True, help="folder to write the PEM files into")
    certs.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP",
                       help="a name or address clients dial the coordinator at (repeatable; the first is its common name)")
    certs.add_argument("--client", action="append", default=[], metavar="NAME", help="a client certificate to make (repeatable)")
    certs.add_argument("--clients", type=int, default=0, help="also make N client certificates named client-1 .. client-N")
    certs.add_argument("--days", type=int, default=30, help="validity in days")
    certs.add_argument("--force", action="store_true", help="replace existing files")

    demo = sub.add_parser("demo-data", help="write shards of the embedded tweet-sentiment corpus as JSONL files, to try a deployment")
    demo.add_argument("--out", type=Path, required=True, help="folder for client-1.jsonl .. client-N.jsonl and eval.jsonl")
    demo.add_argument("--clients", type=int, default=3, help="number of client shards")
    demo.add_argument("--per-client", type=int, default=2000, help="examples per client shard")
    demo.add_argument("--eval-examples", type=int, default=500, help="examples in eval.jsonl")
    demo.add_argument("--seed", type=int, default=0)

    check = sub.add_parser("health", help="ask a coordinator's standard gRPC health service; exit 0 when it is SERVING")
    check.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    check.add_argument("--tls-ca", default="", help="CA certificate (PEM) to verify the coordinator")
    check.add_argument("--tls-cert", default="", help="mutual TLS: client certificate (PEM)")
    check.add_argument("--tls-key", default="", help="mutual TLS: client key (PEM)")
    check.add_argument("--insecure", action="store_true", help="allow plaintext to a non-loopback coordinator")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    return parser


def _config_from_args(args: argparse.Namespace, keys: dict[str, str]) -> RunConfig:
    config = load_config(args.config) if args.config else RunConfig()
    for dest, key in keys.items():
        value: Any = getattr(args, dest, None)
        if value is not None:
            set_key(config, key, value)
    if getattr(args, "insecure", None):
        config.server.insecure = True
    if getattr(args, "share_a", None):
        config.federation.share_a = True
    for item in getattr(args, "option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        config.federation.options[key.strip()] = parse_scalar(value.strip())
    for item in getattr(args, "codec_option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--codec-option {item!r}: expected KEY=VALUE")
        config.compression.uplink_options[key.strip()] = parse_scalar(value.strip())
    if getattr(args, "k", None) is not None:
        config.compression.uplink_options["k"] = args.k
    if getattr(args, "no_error_feedback", None):
        config.compression.error_feedback = False
    if getattr(args, "split_codec", None):
        config.split.act_codec = config.split.grad_codec = args.split_codec
    if getattr(args, "split_bits", None) is not None:
        config.split.act_bits = config.split.grad_bits = args.split_bits
    if getattr(args, "no_planner", None):
        config.planner.enabled = False
    for flag, client_key, sample_key in (("noise_multiplier", "noise_multiplier", "sample_noise_multiplier"), ("clip", "clip", "sample_clip")):
        value = getattr(args, flag, None)
        if value is not None:  # the flag sets the level(s) --dp (or the config) names
            mode = config.privacy.dp
            if mode in ("client", "both", ""):
                setattr(config.privacy, client_key, value)
            if mode in ("sample", "both"):
                setattr(config.privacy, sample_key, value)
    from fedtune.compose import checked

    return checked(config)


def _setup_logging(verbose: int, command: str, fmt: str | None) -> None:
    """fedtune's own log: warnings only for `simulate` (its table shows progress), INFO for the
    services (an operator wants to see registrations, plans and rounds); -v one step more,
    -vv debug output of every library."""
    from fedtune.logs import LOG_FORMATS, setup_logging

    fmt = fmt or os.environ.get("FEDTUNE_LOG_FORMAT", "") or "rich"
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"FEDTUNE_LOG_FORMAT={fmt!r}: choose one of {', '.join(LOG_FORMATS)}")
    quiet = logging.WARNING if command == "simulate" else logging.INFO
    ours = [quiet, logging.INFO, logging.DEBUG][min(verbose, 2)]
    setup_logging(fmt, root_level=logging.DEBUG if verbose >= 2 else logging.WARNING, fedtune_level=ours)


def _console():
    """Rich console for progress; piped or logged output (CI) gets a wide fixed width, so the
    round table is not squeezed into 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _round_table(task: str):
    from rich.table import Table

    table = Table(title="fedtune rounds", title_justify="left")
    for col in ("round", "clients", "train loss", "eval loss", "eval acc" if task == "seq-cls" else "eval ppl", "MB up", "MB down", "secs", "sim secs"):
        table.add_column(col, justify="right", no_wrap=True)
    return table


# Evaluation metrics some runs have (causal LM: --eval-generate, questions with choices):
# (row key, column title, format); a column appears when the first evaluated row holds its metric.
OPTIONAL_COLUMNS = (
    ("eval_generate_exact_match", "gen EM", ".3f"),
    ("eval_choice_accuracy", "choice acc", ".3f"),
    ("eval_choice_accuracy_norm", "choice acc norm", ".3f"),
)


def _optional_columns(row: dict) -> list[tuple[str, str, str]]:
    """The optional evaluation columns whose metric ``row`` holds."""
    return [col for col in OPTIONAL_COLUMNS if col[0] in row]


def _row_cells(row: dict, task: str, optional: Sequence[tuple[str, str, str]] = ()) -> list[str]:
    """A round's row as table cells; ``optional``: the optional columns the table has."""
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    extra = row.get("eval_accuracy") if task == "seq-cls" else row.get("eval_perplexity")
    return [
        str(row["round"]),
        f"{row['clients']}/{row['selected']}",
        f(row["train_loss"], ".4f"),
        f(row["eval_loss"], ".4f"),
        f(extra, ".3f" if task == "seq-cls" else ".2f"),
        f(row["bytes_up"] / 1e6, ".2f"),
        f(row["bytes_down"] / 1e6, ".2f"),
        f(row["seconds"], ".1f"),
        f(row.get("sim_seconds"), ".1f"),
        *(f(row.get(key), fmt) for key, _, fmt in optional),
    ]


def _evaluation_line(row: dict) -> str:
    """The evaluation-only round (FedSA's personalized models after the last round), in words."""
    parts = [f"{key[len('personal_eval_'):].replace('_', ' ')} {row[key]:.4g} ± {row[key + '_std']:.2g}"
             for key in sorted(row) if key.startswith("personal_eval_") and key + "_std" in row]
    return (f"personalized models after round {row.get('personalized_after_round', row['round'] - 1)}, "
            f"evaluated by {row['clients']} of {row['selected']} clients on their own held-out data: " + ("; ".join(parts) or "no metrics"))


def _check_inputs(config: RunConfig) -> None:
    """Fail on a missing model or data file before any progress output starts."""
    from fedtune.data import DataError
    from fedtune.models import resolve_source

    resolve_source(config.model.source, config.model.base_precision)
    for key, value in (("--data", config.simulation.data), ("--eval-data", config.eval.data), ("--profiles", config.simulation.profiles)):
        if value and not Path(value).is_file():
            raise DataError(f"{key}: file {value!r} does not exist")
    if config.simulation.profiles:
        from fedtune.devices import load_profiles

        load_profiles(config.simulation.profiles)


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.live import Live

    from fedtune.simulation.runner import run_simulation

    config = _config_from_args(args, {**COMMON_KEYS, **SIMULATION_KEYS})
    _check_inputs(config)
    console = _console()
    task = config.model.task
    table = _round_table(task)
    console.print(
        f"[bold]fedtune simulate[/]: {config.simulation.clients} clients, {config.federation.rounds} rounds, "
        f"model {config.model.source}, {task}, partition {config.simulation.partition}"
        + (f" (alpha={config.simulation.alpha})" if config.simulation.partition == "dirichlet" else "")
    )
    started = time.monotonic()
    with Live(table, console=console, refresh_per_second=2, transient=False) as live:
        optional: list[tuple[str, str, str]] = []
        shown: list[dict] = []

        def on_round(row: dict) -> None:
            nonlocal table
            shown.append(row)
            if row.get("eval_loss") is not None and not optional and _optional_columns(row):
                # the first evaluated row (eval.every may skip rounds) says which optional metrics
                # this run reports: the table is drawn again with their columns
                optional.extend(_optional_columns(row))
                table = _round_table(task)
                for _, title, _ in optional:
                    table.add_column(title, justify="right", no_wrap=True)
                for earlier in shown[:-1]:
                    table.add_row(*_row_cells(earlier, task, optional))
                live.update(table)
            table.add_row(*_row_cells(row, task, optional))
            live.refresh()

        result = run_simulation(config, on_round_end=on_round, force=args.force)
    console.print()
    for error in result.client_errors:
        console.print(f"[red]client error:[/] {error}")
    console.print(f"done in {time.monotonic() - started:.1f} s; run directory: {result.run_dir}")
    if result.stopped_because:
        console.print(f"stopped after {len(result.history)} of {config.federation.rounds} rounds: {result.stopped_because}")
    if result.evaluation:
        console.print(_evaluation_line(result.evaluation))
    complete = len(result.history) == config.federation.rounds or bool(result.stopped_because)
    return 0 if complete or (result.history and not result.client_errors) else 1


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedtune.coordinator.app import Coordinator
    from fedtune.logs import redact

    config = _config_from_args(args, {**COMMON_KEYS, **COORDINATOR_KEYS})
    _check_inputs(config)
    task = config.model.task
    console = _console()
    def on_round(row: dict) -> None:
        # the header line names the fixed columns; optional metrics carry their name
        optional = _optional_columns(row)
        cells = _row_cells(row, task, optional)
        fixed = len(cells) - len(optional)
        console.print(" | ".join(cells[:fixed] + [f"{title} {cell}" for (_, title, _), cell in zip(optional, cells[fixed:])]))

    coordinator = Coordinator(config, resume=args.resume, force=args.force, on_round_end=on_round)
    redact([coordinator.config.server.enrollment_secret])
    port = coordinator.start()
    host = config.server.address.rpartition(":")[0]
    console.print(f"coordinator listening on {host}:{port}; run directory {coordinator.run_dir}")
    console.print("round | clients | train loss | eval loss | " + ("eval acc" if task == "seq-cls" else "eval ppl") + " | MB up | MB down | seconds | sim s")
    try:
        history = coordinator.run()
    except KeyboardInterrupt:
        coordinator.stop(final=False)  # clients keep waiting for the resumed coordinator
        console.print("interrupted; the last checkpoint is in the run directory (resume with --resume)")
        return 130
    if coordinator.engine.stopped_because:
        console.print(f"stopped early: {coordinator.engine.stopped_because}")
    if coordinator.engine.evaluation:
        console.print(_evaluation_line(coordinator.engine.evaluation))
    console.print(f"finished {len(history)} rounds; adapter in {coordinator.run_dir / 'adapter'}")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    import socket

    policy = _client_policy(args)  # a bad policy file is refused before anything is loaded
    from fedtune.client.agent import AgentOptions, ClientAgent
    from fedtune.credentials import read_secret
    from fedtune.data import load_examples
    from fedtune.devices import Capabilities
    from fedtune.logs import redact
    from fedtune.models import resolve_source

    examples = load_examples(args.data, task=args.task)
    for flag in ("memory_gb", "tflops", "uplink_mbps", "downlink_mbps", "give_up_after"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 0")
    flops, factor = args.tflops * 1e12, 0.0
    source = resolve_source(args.model)
    if args.calibrate:
        from fedtune.client.calibrate import calibrate
        from fedtune.data import resolve_labels
        from fedtune.models import ModelStore

        labels = resolve_labels(examples) if args.task == "seq-cls" else []
        measured = calibrate(ModelStore(), source, args.task, labels, examples)
        flops, factor = measured.flops_per_second, measured.backward_factor
        print(f"calibrated: {measured.seconds_per_step:.3f} s per training step, {flops / 1e9:.1f} GFLOP/s, backward factor {factor:.2f}")
    caps = Capabilities(
        memory_bytes=int(args.memory_gb * 1024**3),
        flops_per_second=flops,
        backward_factor=factor,
        uplink_bytes_per_second=args.uplink_mbps * 1e6 / 8,
        downlink_bytes_per_second=args.downlink_mbps * 1e6 / 8,
        tier=args.tier,
    )
    name = args.name or "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())[:64] or "client"
    secret = read_secret(args.enrollment_secret_file)
    redact([secret])
    options = AgentOptions(
        address=args.coordinator,
        name=name,
        capabilities=caps,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure=args.insecure,
        enrollment_secret=secret,
        state_dir=args.state_dir,
        give_up_after_seconds=args.give_up_after,
        privacy_policy=policy,
    )
    report = ClientAgent(options, examples, source).run()
    print(f"{report.client_id}: trained rounds {report.rounds}; refused updates: {len(report.rejected)}")
    if report.declined:
        print(f"{report.client_id}: declined to train: {report.declined}")
    return 0


def _client_policy(args: argparse.Namespace):
    """The device's privacy policy from its flags; None (the one kept in --state-dir, if any)
    when no policy flag is given."""
    from fedtune.client.policy import PrivacyPolicy

    given = {"max_epsilon": args.max_epsilon, "min_noise_multiplier": args.min_noise_multiplier, "delta": args.delta,
             "allow_known_seed": args.allow_known_seed}
    given = {k: v for k, v in given.items() if v is not None}
    config = getattr(args, "config", None)
    if not given and config is None:
        return None
    try:
        base = PrivacyPolicy.from_toml(config) if config is not None else PrivacyPolicy()
        return PrivacyPolicy(**{**base.to_dict(), **given})
    except ValueError as exc:
        raise ConfigError(f"client privacy policy: {exc}") from None


def _print_registry(registry) -> None:
    import dataclasses

    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {doc}")
        for f in dataclasses.fields(cls.Options):
            print(f"    {f.name} = {f.default!r}")


def cmd_strategies(args: argparse.Namespace) -> int:
    """The strategies by the choice each is made for (aggregation rule, client correction,
    server optimizer), with their options, then the LoRA variants."""
    import dataclasses

    from fedtune.aggregation import STRATEGIES
    from fedtune.compose import AXES, AXIS_KEYS

    for axis in AXES:
        print(f"{axis} ({AXIS_KEYS[axis]}, --{axis}):")
        for name in STRATEGIES.available():  # installed plugins too
            try:
                cls = STRATEGIES.get(name)
            except ValueError as exc:  # a plugin that does not load: say so, list the rest
                print(f"  {name}: does not load: {exc}")
                continue
            if cls.axis != axis:
                continue
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"  {name}: {doc}")
            for f in dataclasses.fields(cls.Options):
                if f.name != "inner":
                    print(f"      {f.name} = {f.default!r}")
    from fedtune.aggregation.base import PLAIN_LORA, VARIANTS

    print("variant (lora.variant, --lora-variant):")
    print(f"  {PLAIN_LORA}: plain LoRA (the default)")
    for name in VARIANTS.available():
        try:
            cls = VARIANTS.get(name)
        except ValueError as exc:
            print(f"  {name}: does not load: {exc}")
            continue
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"  {name}: {doc}")
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from fedtune.privacy.report import ReportError, write_report

    try:
        paths = write_report(args.run_dir, args.delta)
    except ReportError as exc:
        print(f"fedtune privacy-report: {exc}", file=sys.stderr)
        return 2
    print((args.run_dir / "privacy.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_privacy_audit(args: argparse.Namespace) -> int:
    """The audit's rows (correct mechanisms at each epsilon, then broken ones it must catch) as
    a table; exit status 1 when a row does not hold."""
    import json

    from rich.table import Table

    from fedtune.privacy.audit import COLUMNS, AuditSettings, report, run_rows, standard_rows, table_cells

    if args.canaries < 2 or any(e <= 0 for e in args.epsilon):
        raise ConfigError("--canaries must be at least 2 and every --epsilon positive")
    settings = AuditSettings(canaries=args.canaries)
    console = _console()
    started = time.monotonic()
    rows = standard_rows(["sample", "client"] if args.level == "both" else [args.level], args.epsilon)
    rounds_log = logging.getLogger("fedtune.aggregation")  # not the audited rounds' own lines
    level = rounds_log.level
    rounds_log.setLevel(logging.WARNING)
    try:
        results = run_rows(rows, settings, args.seed, progress=lambda name: console.print(f"auditing {name} ...", style="dim"))
    finally:
        rounds_log.setLevel(level)
    table = Table(title=f"privacy audit: lower bounds on epsilon at {1 - settings.beta:.0%} confidence, delta {settings.delta:g}, one run each", title_justify="left")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for r in results:
        table.add_row(*table_cells(r))
    console.print(table)
    console.print("A correct row holds when its lower bound stays at or below the reported epsilon (which does not prove the claim); "
                  "a broken row when the audit catches it (bound above the reported epsilon).")
    if args.out:
        args.out.write_text(json.dumps(report(results, settings, args.seed, round(time.monotonic() - started, 1)), indent=2) + "\n")
        console.print(f"wrote {args.out}")
    return 0 if all(r.held for r in results) else 1


def cmd_certs(args: argparse.Namespace) -> int:
    from fedtune.certs import make_test_pki

    if args.clients < 0:
        raise ConfigError("--clients: must be >= 0")
    clients = list(args.client) + [f"client-{i}" for i in range(1, args.clients + 1)]
    pki = make_test_pki(args.out, args.host, clients, days=args.days, overwrite=args.force)
    print(f"CA:          {pki.ca_cert} (key {pki.ca_key}: keep it off the devices)")
    print(f"coordinator: --tls-cert {pki.server_cert} --tls-key {pki.server_key} --tls-client-ca {pki.ca_cert}  (valid for {', '.join(args.host)})")
    for name, (cert, key) in pki.clients.items():
        print(f"{name}: --tls-ca {pki.ca_cert} --tls-cert {cert} --tls-key {key}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from fedtune.data import embedded_tweets

    if args.clients < 1 or args.per_client < 1 or args.eval_examples < 0:
        raise ConfigError("--clients and --per-client must be >= 1, --eval-examples >= 0")
    examples = embedded_tweets()
    need = args.clients * args.per_client + args.eval_examples
    if need > len(examples):
        raise ConfigError(f"the embedded corpus has {len(examples)} examples; {need} were asked for")
    order = np.random.default_rng(args.seed).permutation(len(examples))
    args.out.mkdir(parents=True, exist_ok=True)
    files = {f"client-{i + 1}.jsonl": order[i * args.per_client:(i + 1) * args.per_client] for i in range(args.clients)}
    files["eval.jsonl"] = order[args.clients * args.per_client:need]
    for name, indices in files.items():
        (args.out / name).write_text("".join(json.dumps({"text": examples[i].text, "label": examples[i].label}) + "\n" for i in indices))
    print(f"wrote {', '.join(files)} to {args.out} (labels: negative, neutral, positive)")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedtune.transport import make_channel

    channel = make_channel(args.coordinator, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fedtune.v1.Coordinator"), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.coordinator}: no answer ({exc.code().name}: {exc.details()})")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.coordinator}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_codecs(args: argparse.Namespace) -> int:
    from fedtune.compression import CODECS

    _print_registry(CODECS)
    return 0


# Commands that run for rounds on end; they get fedtune's malloc settings (fedtune.allocator).
LONG_RUNNING = frozenset({"simulate", "coordinator", "client"})


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fedtune never downloads models
    # Deprecation chatter from transformers/peft internals is not actionable for fedtune's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    tuned = tune_allocator() if args.command in LONG_RUNNING else {}
    import grpc

    from fedtune.adapters import AdapterError
    from fedtune.certs import CertError
    from fedtune.client.agent import AgentError
    from fedtune.client.state import StateError
    from fedtune.coordinator.errors import CoordinatorError
    from fedtune.credentials import SecretError
    from fedtune.data import DataError
    from fedtune.devices import ProfileError
    from fedtune.models import ModelError
    from fedtune.transport import TransportError

    handlers = {"simulate": cmd_simulate, "coordinator": cmd_coordinator, "client": cmd_client, "strategies": cmd_strategies, "codecs": cmd_codecs,
                "privacy-report": cmd_privacy_report, "privacy-audit": cmd_privacy_audit, "certs": cmd_certs, "health": cmd_health,
                "demo-data": cmd_demo_data}
    try:
        _setup_logging(getattr(args, "verbose", 0), args.command, getattr(args, "log_format", None))
        if tuned:
            logging.getLogger("fedtune").debug("malloc settings: %s (FEDTUNE_MALLOC=default leaves glibc's)", tuned)
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelError, TransportError, AgentError, AdapterError, ProfileError, SecretError, CertError, StateError) as exc:
        print(f"fedtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CoordinatorError as exc:
        print(f"fedtune {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # a refusal the agent cannot get past by waiting
        print(f"fedtune {args.command}: error: the coordinator refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
