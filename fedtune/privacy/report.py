"""The privacy budget report of a run: ``fedtune privacy-report RUN_DIR [--delta D]``.

It reads what the run recorded (its configuration and the accountant history in its latest
checkpoint), asks Opacus for epsilon at the report's delta, and writes three files into the run
directory: ``privacy.json`` (the numbers), ``privacy.md`` (what produced them, in plain words)
and ``privacy.png`` (epsilon against rounds). Every epsilon is recomputed from the recorded
history; nothing is copied from logs. A run without differential privacy says so instead of
printing a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedtune.privacy.accounting import epsilon, history_from_tensor, merge


class ReportError(ValueError):
    """A run directory the report cannot read (the message says what is missing)."""


def client_level_entry(history: list[tuple[float, float, int]], delta: float, accountant: str, clip: float, adaptive: bool) -> dict[str, Any]:
    """The ``client_level`` entry of privacy.json for a per-round history."""
    by_round = [epsilon(history[: i + 1], delta, accountant) for i in range(len(history))]
    return {
        "mechanism": "DP-FedAvg: each client's whole update clipped to L2 norm C, Gaussian noise of std sigma*C added to the sum",
        "accountant": accountant,
        "history": [list(h) for h in merge(history)],
        "epsilon": by_round[-1] if by_round else 0.0,
        "epsilon_by_round": by_round,
        "rounds": len(history),
        "clipping_norm": clip,
        "adaptive_clipping": adaptive,
        "sampling": "poisson: each connected client selected independently with rate q at the start of every round",
    }


def sample_level_entries(metrics_path: Path, delta: float) -> dict[str, dict[str, Any]]:
    """Each client's DP-SGD history, one entry per round it trained, from the rounds' rows."""
    histories: dict[str, list[tuple[float, float, int]]] = {}
    rounds: dict[str, list[int]] = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            row = json.loads(line)
            for cid, entry in (row.get("dp_sample") or {}).items():
                histories.setdefault(cid, []).append((float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])))
                rounds.setdefault(cid, []).append(int(row["round"]))
    out = {}
    for cid in sorted(histories):
        history = histories[cid]
        out[cid] = {
            "accountant": "rdp",
            "history": [list(h) for h in merge(history)],
            "epsilon": epsilon(history, delta),
            "epsilon_by_round": {str(r): epsilon(history[: i + 1], delta) for i, r in enumerate(rounds[cid])},
            "rounds": rounds[cid],
        }
    return out


def build_report(run_dir: Path, delta: float | None = None) -> dict[str, Any]:
    from fedtune.aggregation.dp_fedavg import HISTORY
    from fedtune.config import ConfigError, load_config
    from fedtune.coordinator.checkpoint import CheckpointError, load_checkpoint

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
    report: dict[str, Any] = {"run_dir": str(run_dir), "delta": delta, "client_level": None, "sample_level": {}}
    if p.dp in ("sample", "both"):
        report["sample_level"] = sample_level_entries(run_dir / "metrics.jsonl", delta)
    if p.dp in ("client", "both"):
        try:
            checkpoint = load_checkpoint(run_dir)
        except CheckpointError as exc:
            raise ReportError(str(exc)) from None
        history = history_from_tensor(checkpoint.state[HISTORY]) if checkpoint is not None and HISTORY in checkpoint.state else []
        report["client_level"] = client_level_entry(history, delta, p.accountant, p.clip, p.adaptive_clip)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Privacy report", "", f"Run: `{report['run_dir']}`", ""]
    cl = report["client_level"]
    if cl is None and not report["sample_level"]:
        lines += [
            "**This run used no differential privacy.** No epsilon applies to it: the updates its",
            "clients sent and the global models it produced carry no formal privacy guarantee.",
        ]
        return "\n".join(lines) + "\n"
    sl = report["sample_level"]
    if sl:
        worst = max(sl.items(), key=lambda kv: kv[1]["epsilon"])
        lines += [
            "## Sample level (DP-SGD on each device)",
            "",
            f"**The largest device epsilon is {worst[1]['epsilon']:.4g} at delta = {report['delta']:g}** ({worst[0]}); Opacus' RDP accountant, one history per device.",
            "",
            "- Mechanism: on each device every example's gradient was clipped and Gaussian noise added to the batch's sum (DP-SGD), with batches drawn by Poisson sampling of the device's examples.",
            "- What it covers: any single training example of a device; its epsilon counts only the rounds that device trained.",
            "",
            "| client | rounds trained | history (sigma, q, steps) | epsilon |",
            "|---|---|---|---|",
        ]
        for cid, entry in sl.items():
            hist = "; ".join(f"{s:g}, {q:.4g}, {n}" for s, q, n in entry["history"])
            lines.append(f"| {cid} | {len(entry['rounds'])} | {hist} | {entry['epsilon']:.4g} |")
        lines.append("")
    else:
        lines += ["## Sample level", "", "Not used in this run: no device ran DP-SGD, so no guarantee covers a single training example beyond what the client level gives a whole client.", ""]
    if cl is None:
        lines += ["## Client level", "", "Not used in this run: the coordinator did not clip and noise the clients' updates, so no guarantee covers a whole client's data."]
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
            "- What it covers: the sequence of global models the coordinator released. Replacing, adding or removing all the data of any one client changes their distribution by at most (epsilon, delta).",
            "- What it does not cover: the training metrics clients report (train loss), and anything a client's own device reveals; it assumes the coordinator runs the mechanism as configured.",
        ]
        if not math.isfinite(eps):
            lines += ["", "Epsilon is infinite: a round ran without noise (sigma = 0)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    cl = report["client_level"]
    drawn = False
    if cl is not None and cl["epsilon_by_round"]:
        rounds = list(range(1, len(cl["epsilon_by_round"]) + 1))
        ax.plot(rounds, cl["epsilon_by_round"], marker="o", label="client level (global)")
        drawn = True
    for cid, entry in report["sample_level"].items():
        by_round = entry["epsilon_by_round"]
        ax.plot([int(r) for r in by_round], list(by_round.values()), marker=".", alpha=0.7, label=f"sample level: {cid}")
        drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no differential privacy in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel(f"epsilon at delta = {report['delta']:g}")
    ax.set_title("Privacy budget spent")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, delta: float | None = None) -> dict[str, Path]:
    """Write privacy.json, privacy.md and privacy.png into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, delta)
    paths = {"json": run_dir / "privacy.json", "md": run_dir / "privacy.md", "png": run_dir / "privacy.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
