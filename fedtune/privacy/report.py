"""The privacy budget report of a run: ``fedtune privacy-report RUN_DIR [--delta D]``.

It reads what the run recorded (its configuration and the accountant history in its latest
checkpoint), asks Opacus for epsilon at the report's delta, and writes three files into the run
directory: ``privacy.json`` (the numbers), ``privacy.md`` (what produced them, in plain words)
and ``privacy.png`` (epsilon against rounds, from zero, with the budget and target drawn).
Every epsilon is recomputed from the recorded history; a device's own reported epsilon is
shown beside it and the larger of the two is the one reported, so rounds the coordinator never
saw are not forgotten. The report states the adjacency (add/remove), whether noise and
sampling were secret (research mode says so in its first line), the adaptive clip's two noise
multipliers, the client-level epsilon if participation were public, and what the run released
outside any guarantee. A run without differential privacy says so instead of printing a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedtune.privacy.accounting import epsilon, history_from_tensor, merge
from fedtune.privacy.client_level import combined_noise_multiplier


class ReportError(ValueError):
    """A run directory the report cannot read (the message says what is missing)."""


ADJACENCY = ("add/remove: the neighbouring data sets differ by adding or removing one record "
             "(client level: one client with all its data; sample level: one training example of a device)")


def client_level_entry(history: list[tuple[float, float, int]], delta: float, accountant: str, clip: float, adaptive: bool) -> dict[str, Any]:
    """The ``client_level`` entry of privacy.json for a per-round history."""
    by_round = [epsilon(history[: i + 1], delta, accountant) for i in range(len(history))]
    return {
        "mechanism": "DP-FedAvg: each client's whole update clipped to L2 norm C, Gaussian noise of std sigma*C added to the sum",
        "adjacency": "add/remove one client with all its data",
        "accountant": accountant,
        "history": [list(h) for h in merge(history)],
        "epsilon": by_round[-1] if by_round else 0.0,
        "epsilon_by_round": by_round,
        "rounds": len(history),
        "clipping_norm": clip,
        "adaptive_clipping": adaptive,
        "sampling": "poisson: each connected client selected independently with rate q at the start of every round",
    }


def adaptive_rounds(rows: list[dict]) -> list[dict[str, float]]:
    """Each round's two adaptive-clipping queries, so the combined multiplier can be recomputed:
    ``combined = (update^-2 + (count_sensitivity / count_noise_std)^2)^-1/2``."""
    out = []
    for row in rows:
        if "dp_count_noise_std" not in row:
            continue
        update, count, sens = float(row["dp_update_noise_multiplier"]), float(row["dp_count_noise_std"]), float(row["dp_count_sensitivity"])
        out.append({"round": int(row["round"]), "update_noise_multiplier": update, "count_noise_std": count, "count_sensitivity": sens,
                    "combined_noise_multiplier": combined_noise_multiplier(update, count, sens), "accounted_noise_multiplier": row.get("dp_noise_multiplier")})
    return out


def participation_public_epsilon(rows: list[dict], delta: float, accountant: str) -> tuple[float, str, int]:
    """(epsilon, client, rounds) of the client whose known participation costs most when who
    took part is public: each round it joined is a Gaussian mechanism without amplification
    (q = 1), the rounds it did not join cost nothing."""
    joined: dict[str, list[float]] = {}
    for row in rows:
        sigma = row.get("dp_noise_multiplier")
        if sigma is None:
            continue
        for cid in row.get("client_ids") or []:
            joined.setdefault(cid, []).append(float(sigma))
    worst = (0.0, "", 0)
    for cid, sigmas in sorted(joined.items()):
        eps = epsilon([(s, 1.0, 1) for s in sigmas], delta, accountant)
        if eps > worst[0]:
            worst = (eps, cid, len(sigmas))
    return worst


def sample_level_entries(rows: list[dict], delta: float) -> dict[str, dict[str, Any]]:
    """Each device's DP-SGD spending: every round it reported spending on (aggregated or not),
    recomputed by the accountant, and the larger of that and what the device itself reported
    (its history may hold rounds the coordinator never saw: earlier federations, lost pushes)."""
    histories: dict[str, list[tuple[float, float, int]]] = {}
    priors: dict[str, list[tuple[float, float, int]]] = {}  # FedLC's noised label prior, released once
    rounds: dict[str, list[int]] = {}
    reported: dict[str, float] = {}
    trained: dict[str, int] = {}
    secret: dict[str, bool] = {}
    for row in rows:
        # a client's spendings in the round: those the aggregate did not take (a list each; one
        # entry in runs written before a client could spend twice a round), then the aggregated one
        seen: list[tuple[str, dict]] = []
        for cid, entries in (row.get("dp_sample_unaggregated") or {}).items():
            seen += [(cid, e) for e in (entries if isinstance(entries, list) else [entries])]
        seen += list((row.get("dp_sample") or {}).items())
        for cid, entry in seen:
            if entry.get("prior_noise") is not None and cid not in priors:
                priors[cid] = [(float(entry["prior_noise"]), 1.0, 1)]
            histories.setdefault(cid, []).append((float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])))
            rounds.setdefault(cid, []).append(int(row["round"]))
            if entry.get("epsilon") is not None:
                reported[cid] = max(reported.get(cid, 0.0), float(entry["epsilon"]))
            if entry.get("rounds_trained") is not None:
                trained[cid] = max(trained.get(cid, 0), int(entry["rounds_trained"]))
            if entry.get("secret") is not None:
                secret[cid] = secret.get(cid, True) and bool(entry["secret"])
    out = {}
    for cid in sorted(histories):
        history = [*priors.get(cid, []), *histories[cid]]
        start = len(priors.get(cid, []))
        recomputed = epsilon(history, delta)
        out[cid] = {
            "accountant": "rdp",
            "history": [list(h) for h in merge(history)],
            "epsilon_recomputed": recomputed,
            "epsilon_reported": reported.get(cid),
            "epsilon": max(recomputed, reported.get(cid, 0.0)),
            "epsilon_by_round": {str(r): epsilon(history[: start + i + 1], delta) for i, r in enumerate(rounds[cid])},
            "rounds": rounds[cid],
            "rounds_trained_reported": trained.get(cid),
            "noise_secret": secret.get(cid),
            "label_prior_noise": priors[cid][0][0] if cid in priors else None,
        }
    return out


# Keys of a round's row that need no epsilon: the round's number and settings, the evaluation
# of the released (noised) model and the accountant's own figures (``eval_*``, ``dp_*``), and a
# refusal read off the noised aggregate.
_PUBLIC_KEYS = frozenset({"round", "codec_up", "codec_down", "round_refused", "evaluation_only"})
_PUBLIC_PREFIXES = ("eval_", "dp_")
# Keys that ``released_outside``'s named lines describe.
_DESCRIBED_KEYS = frozenset({"train_loss", "clients", "selected", "client_ids", "seconds", "local_seconds", "encode_seconds",
                             "bytes_up", "bytes_down", "bytes_up_per_client", "bytes_down_per_client",
                             "personalized_after_round", "personal_eval_clients"})
_DESCRIBED_PREFIXES = ("personal_eval_", "split_")


def released_outside(config, rows: list[dict], participation_public: bool) -> list[str]:
    """What the run released that no epsilon covers: the figures every run reports, by name,
    then every other key of ``rows`` (metrics.jsonl as published, without the operator's
    participation file) that is neither public nor an evaluation of the released model, so a
    new figure is listed as soon as a row carries it."""
    out = ["training losses: each round's `train_loss` (the clients' reported losses, example-weighted)",
           "example counts: each client's reported number of examples (used as its aggregation weight), the number of updates per round (`clients`) and of clients selected (`selected`)"]
    if any(k.startswith("personal_eval_") for row in rows for k in row):
        out.append("personal evaluation: the clients' evaluations of their personalized models (`personal_eval_*`)")
    if participation_public:
        out.append("participation: which clients took part in each round (`client_ids` in metrics.jsonl)")
    out.append("timing and traffic: per-round seconds and bytes (means over clients)")
    other = sorted({k for row in rows for k in row
                    if k not in _PUBLIC_KEYS | _DESCRIBED_KEYS and not k.startswith(_PUBLIC_PREFIXES + _DESCRIBED_PREFIXES)})
    if other:
        out.append("other figures in metrics.jsonl, not covered by the epsilons above (computed by the coordinator or reported "
                   "by clients; some may depend on the released model only, which this report does not assume): "
                   + ", ".join(f"`{k}`" for k in other))
    return out


def build_report(run_dir: Path, delta: float | None = None) -> dict[str, Any]:
    from fedtune.methods.client_dp.strategy import HISTORY
    from fedtune.config import ConfigError, load_config
    from fedtune.coordinator.checkpoint import CheckpointError, load_checkpoint
    from fedtune.coordinator.metrics import PARTICIPATION_FILE, read_rows

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ReportError(f"{run_dir} is not a fedtune run directory (no config.toml)")
    try:
        config = load_config(run_dir / "config.toml")
    except ConfigError as exc:
        raise ReportError(f"{run_dir / 'config.toml'}: {exc}") from None
    p = config.privacy
    delta = p.delta if delta is None else delta
    if not 0.0 < delta < 1.0:
        raise ReportError(f"delta must be in (0, 1), got {delta}")
    try:
        rows = read_rows(run_dir)
    except (OSError, ValueError) as exc:
        raise ReportError(f"{run_dir}: cannot read its metrics: {exc}") from None
    rows = [r for r in rows if not r.get("evaluation_only")]
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "delta": delta, "adjacency": ADJACENCY,
        "research_mode": p.repeatable,
        "randomness": {"noise": "derived from the run's seed (research mode)" if p.repeatable else "secret (the OS's randomness, never sent)",
                       "sampling": "derived from the run's seed (research mode)" if p.repeatable else "secret (the OS's randomness, never sent)"},
        "allow_large_delta": p.allow_large_delta,
        "epsilon_budget": p.epsilon_budget or None, "target_epsilon": p.target_epsilon or None,
        "client_level": None, "sample_level": {}, "released_outside_the_guarantee": [],
    }
    participation_public = False
    if p.dp in ("sample", "both"):
        report["sample_level"] = sample_level_entries(rows, delta)
    if p.dp in ("client", "both"):
        try:
            checkpoint = load_checkpoint(run_dir)
        except CheckpointError as exc:
            raise ReportError(str(exc)) from None
        history = history_from_tensor(checkpoint.state[HISTORY]) if checkpoint is not None and HISTORY in checkpoint.state else []
        entry = client_level_entry(history, delta, p.accountant, p.clip, p.adaptive_clip)
        entry["adaptive_rounds"] = adaptive_rounds(rows)
        # Participation is private when it was kept out of metrics.jsonl (in the operator's file).
        published = any("client_ids" in r for r in _plain_rows(run_dir / "metrics.jsonl"))
        participation_public = published
        eps_public, who, joined = participation_public_epsilon(rows, delta, p.accountant)
        entry["participation"] = "public (client_ids in metrics.jsonl)" if published else f"private (kept in {PARTICIPATION_FILE}, for the operator)"
        entry["epsilon_if_participation_public"] = eps_public
        entry["participation_public_worst_client"] = {"client": who, "rounds_joined": joined}
        entry["epsilon_amplified"] = entry["epsilon"]
        if published:  # amplification by sampling does not hold: the public figure is the guarantee
            entry["epsilon"] = max(entry["epsilon"], eps_public)
        report["client_level"] = entry
    if p.dp:
        published = [r for r in _plain_rows(run_dir / "metrics.jsonl") if not r.get("evaluation_only")]
        report["released_outside_the_guarantee"] = released_outside(config, published, participation_public)
    return report


def _plain_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Privacy report", ""]
    cl, sl = report["client_level"], report["sample_level"]
    if report.get("research_mode") and (cl is not None or sl):
        lines = ["**Research mode: this run's DP noise and sampling were drawn from seeds derived from the run's seed. "
                 "The epsilons below do not hold against anyone who knows that seed (the coordinator and its operator).**", "", *lines]
    lines += [f"Run: `{report['run_dir']}`", ""]
    if cl is None and not sl:
        lines += [
            "**This run used no differential privacy.** No epsilon applies to it: the updates its",
            "clients sent and the global models it produced carry no formal privacy guarantee.",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        f"- Adjacency: {report['adjacency']}.",
        f"- Noise: {report['randomness']['noise']}; sampling: {report['randomness']['sampling']}.",
    ]
    if report.get("epsilon_budget") or report.get("target_epsilon"):
        lines.append(f"- Budget: {report.get('epsilon_budget') or 'none'}; target epsilon: {report.get('target_epsilon') or 'none'}.")
    if report.get("allow_large_delta"):
        lines.append(f"- **delta = {report['delta']:g} was allowed to reach 1/N or 1/n (privacy.allow_large_delta)**: such a delta permits releasing a record outright.")
    lines.append("")
    if sl:
        worst = max(sl.items(), key=lambda kv: kv[1]["epsilon"])
        lines += [
            "## Sample level (DP-SGD on each device)",
            "",
            f"**The largest device epsilon is {worst[1]['epsilon']:.4g} at delta = {report['delta']:g}** ({worst[0]}); Opacus' RDP accountant, one history per device.",
            "",
            "- Mechanism: on each device every example's gradient (of that example's own loss) was clipped and Gaussian noise added to the batch's sum (DP-SGD), with batches drawn by Poisson sampling of the device's examples.",
            "- What it covers: adding or removing any single training example of a device; a device's epsilon is the larger of what the coordinator recomputes from every round the device reported spending on, and what the device itself reported (which also counts rounds the coordinator never saw).",
        ]
        if any(e.get("label_prior_noise") for e in sl.values()):
            lines.append("- FedLC's label prior: each device released its label histogram once with Gaussian noise (sigma per count in the history's first entry, q = 1), counted in its epsilon.")
        lines += [
            "",
            "| client | rounds spent on | history (sigma, q, steps) | recomputed | reported by device | epsilon | noise secret |",
            "|---|---|---|---|---|---|---|",
        ]
        for cid, entry in sl.items():
            hist = "; ".join(f"{s:g}, {q:.4g}, {n}" for s, q, n in entry["history"])
            rep = "" if entry["epsilon_reported"] is None else f"{entry['epsilon_reported']:.4g}"
            sec = {True: "yes", False: "**no**", None: "unknown"}[entry["noise_secret"]]
            lines.append(f"| {cid} | {', '.join(map(str, entry['rounds']))} | {hist} | {entry['epsilon_recomputed']:.4g} | {rep} | {entry['epsilon']:.4g} | {sec} |")
        lines.append("")
    else:
        lines += ["## Sample level", "", "Not used in this run: no device ran DP-SGD, so no guarantee covers a single training example beyond what the client level gives a whole client.", ""]
    if cl is None:
        lines += ["## Client level", "", "Not used in this run: the coordinator did not clip and noise the clients' updates, so no guarantee covers a whole client's data.", ""]
    else:
        eps = cl["epsilon"]
        sigma_q = ", ".join(f"sigma = {s:g} at sampling rate q = {q:g} for {n} round{'s' if n != 1 else ''}" for s, q, n in cl["history"]) or "no round completed"
        lines += [
            "## Client level (DP-FedAvg at the coordinator)",
            "",
            f"**epsilon = {eps:.4g} at delta = {report['delta']:g}** after {cl['rounds']} rounds ({cl['accountant'].upper()} accountant of Opacus).",
            "",
            f"- Mechanism: every selected client's whole update (all adapter tensors together) was clipped to L2 norm C = {cl['clipping_norm']:g}"
            + (" (adaptively tracked from there)" if cl["adaptive_clipping"] else "")
            + "; Gaussian noise with standard deviation sigma * C was added to the sum, which was divided by the expected number of clients.",
            f"- Noise and sampling: {sigma_q}. Clients were selected by Poisson sampling: each connected client independently with rate q.",
            "- What it covers: the sequence of global models the coordinator released. Adding or removing one client with all its data changes their distribution by at most (epsilon, delta).",
            f"- Participation: {cl['participation']}. The amplification by sampling in this epsilon assumes nobody outside the coordinator learns who took part; "
            f"if participation is published, the guarantee is epsilon = {cl['epsilon_if_participation_public']:.4g} "
            f"({cl['participation_public_worst_client']['client'] or 'no client'}, known to have joined {cl['participation_public_worst_client']['rounds_joined']} rounds, each without amplification).",
            "- It assumes the coordinator runs the mechanism as configured: a device that does not trust the coordinator needs sample-level DP and a policy of its own (`fedtune client --max-epsilon`).",
        ]
        if cl.get("adaptive_rounds"):
            a = cl["adaptive_rounds"][-1]
            lines.append(f"- Adaptive clipping releases a noised count of clients within the clip each round (centred bits, sensitivity {a['count_sensitivity']:g}): "
                         f"update noise multiplier {a['update_noise_multiplier']:.4g} and count noise std {a['count_noise_std']:.4g} combine to {a['combined_noise_multiplier']:.4g}, the multiplier accounted (every round in privacy.json).")
        if not math.isfinite(eps):
            lines += ["", "Epsilon is infinite: a round ran without noise (sigma = 0)."]
        lines.append("")
    lines += ["## Released outside the guarantee", "", "No epsilon above covers these; they are published in metrics.jsonl as they are:", ""]
    lines += [f"- {item}" for item in report["released_outside_the_guarantee"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """Draw privacy.png; returns what it drew (the epsilon axis' limits, the legend's labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    cl = report["client_level"]
    drawn = False
    top = 0.0
    if cl is not None and cl["epsilon_by_round"]:
        rounds = list(range(1, len(cl["epsilon_by_round"]) + 1))
        ax.plot(rounds, cl["epsilon_by_round"], marker="o", label="client level (global)")
        top = max(top, *[e for e in cl["epsilon_by_round"] if math.isfinite(e)], 0.0)
        drawn = True
    for cid, entry in report["sample_level"].items():
        by_round = entry["epsilon_by_round"]
        ax.plot([int(r) for r in by_round], list(by_round.values()), marker=".", alpha=0.7, label=f"sample level: {cid}")
        top = max(top, *[e for e in by_round.values() if math.isfinite(e)], 0.0)
        drawn = True
    for value, label, style in ((report.get("epsilon_budget"), "budget", "--"), (report.get("target_epsilon"), "target", ":")):
        if value:
            ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{label} = {value:g}")
            top = max(top, value)
    if drawn:
        ax.legend(fontsize="small")
        ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)  # from zero: the scale of what was spent
    else:
        ax.text(0.5, 0.5, "no differential privacy in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel(f"epsilon at delta = {report['delta']:g}")
    ax.set_title("Privacy budget spent" + (" (research mode: seed known)" if report.get("research_mode") else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    drew = {"ylim": tuple(ax.get_ylim()), "labels": [t.get_text() for t in (ax.get_legend().get_texts() if ax.get_legend() else [])]}
    plt.close(fig)
    return drew


def write_report(run_dir: Path, delta: float | None = None) -> dict[str, Path]:
    """Write privacy.json, privacy.md and privacy.png into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, delta)
    paths = {"json": run_dir / "privacy.json", "md": run_dir / "privacy.md", "png": run_dir / "privacy.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
