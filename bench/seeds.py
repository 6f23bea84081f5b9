"""Several seeds per benchmark row: means with 95% confidence intervals, and paired comparisons
that say "no difference measured" when the interval of the difference contains zero.

A benchmark that trains takes ``--seeds N`` (seeds 0..N-1, or ``--seed-list 3 7 11``); each seed
sets ``RunConfig.seed``, from which the data partition, the initialization and every dropout mask
derive. Rows report each figure's mean under its usual key (``eval_loss``), the half-width of its
95% interval as ``<key>_ci95`` and each seed's value as ``<key>_per_seed`` (in seed order); the
JSON's settings list the seeds under ``seeds``.

Rows are compared paired: both rows ran the same seeds, so the difference is taken seed by seed
and its interval comes from the spread of those differences (Student's t with n - 1 degrees of
freedom). A single run, or an interval containing zero, is never printed as a win.

Why not scipy.stats directly: its ``ttest_rel`` gives a p-value, and the tables want the interval
itself; the one number needed from scipy is the t quantile.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from scipy.stats import t as student_t


def add_arguments(parser: argparse.ArgumentParser, default: int = 1) -> None:
    """``--seeds N`` and ``--seed-list S [S ...]`` on a benchmark's parser."""
    parser.add_argument("--seeds", type=int, default=default, help=f"run every row with seeds 0..N-1 (default {default})")
    parser.add_argument("--seed-list", type=int, nargs="+", metavar="S", help="run every row with exactly these seeds")


def seeds_of(args: argparse.Namespace) -> list[int]:
    """The seeds the arguments ask for (``--seed-list`` wins over ``--seeds``)."""
    if getattr(args, "seed_list", None):
        seeds = list(args.seed_list)
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seed-list repeats a seed: {seeds}")
        return seeds
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    return list(range(args.seeds))


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval of the mean); the half-width is nan for one value
    (one run says nothing about its own spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(student_t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def summarize(per_seed: Mapping[str, Sequence[float]]) -> dict:
    """Row fields for each figure: ``key`` (mean), ``key_ci95`` and ``key_per_seed``."""
    out: dict = {}
    for key, values in per_seed.items():
        mean, half = ci95(list(values))
        out[key] = mean
        out[f"{key}_ci95"] = None if math.isnan(half) else half  # JSON has no NaN: one seed gives no interval
        out[f"{key}_per_seed"] = list(values)
    return out


@dataclass(frozen=True)
class Difference:
    """``a - b`` over paired seeds: its mean, the interval's half-width, and what it says."""

    mean: float
    ci95: float
    n: int

    @property
    def measured(self) -> bool:
        """Whether the interval excludes zero (with one seed: never)."""
        return self.n > 1 and not math.isnan(self.ci95) and abs(self.mean) > self.ci95

    def verdict(self, a: str, b: str, lower_is_better: bool = True) -> str:
        """One line: which row is better with the interval, or "no difference measured"."""
        if not self.measured:
            return f"{a} vs {b}: no difference measured ({self.mean:+.4g} ± {self.ci95:.2g}, {self.n} seeds)"
        better = a if (self.mean < 0) == lower_is_better else b
        return f"{a} vs {b}: {better} better by {abs(self.mean):.4g} ± {self.ci95:.2g} ({self.n} paired seeds)"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """The paired difference ``a - b`` (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows need the same seeds: {len(a)} values against {len(b)}")
    mean, half = ci95([x - y for x, y in zip(a, b)])
    return Difference(mean, half, len(a))


def format_mean(mean: float, half: float | None, spec: str = ".4f") -> str:
    """``0.7444 ± 0.0123`` (or the mean alone for one seed)."""
    return format(mean, spec) if half is None or math.isnan(half) else f"{format(mean, spec)} ± {format(half, spec.lstrip('+'))}"


def measure(names: Sequence[str], seeds: Sequence[int], run: Callable[[str, int], Mapping[str, Any]]) -> list[dict]:
    """Every row of ``names`` run once per seed (``run(name, seed)`` returns one run's figures),
    each row's runs combined by ``combine``."""
    rows = []
    for name in names:
        runs = []
        for seed in seeds:
            print(f"running {name} (seed {seed}) ...", file=sys.stderr, flush=True)
            runs.append(dict(run(name, seed)))
        rows.append(combine(name, runs))
    return rows


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def combine(name: str, runs: Sequence[Mapping[str, Any]]) -> dict:
    """One row from one run per seed (in seed order). Each numeric figure becomes
    ``key``/``key_ci95``/``key_per_seed`` (``summarize``); a figure some seeds lack (None: a
    target never reached) keeps its per-seed list, with mean and interval None; a list of numbers
    (a figure per round) becomes its element-wise mean; anything else is kept from the first seed."""
    row: dict = {"name": name}
    numbers = {}
    for key, value in runs[0].items():
        if key == "name":
            continue
        values = [r.get(key) for r in runs]
        if all(_number(v) or v is None for v in values) and any(_number(v) for v in values):
            if all(_number(v) for v in values):
                numbers[key] = [float(v) for v in values]
            else:
                row.update({key: None, f"{key}_ci95": None, f"{key}_per_seed": values})
        elif isinstance(value, list) and value and all(isinstance(v, list) and len(v) == len(value) and all(_number(x) for x in v) for v in values):
            row[key] = [sum(v[i] for v in values) / len(values) for i in range(len(value))]
        else:
            row[key] = value
    row.update(summarize(numbers))
    return row


def compare(rows: Sequence[Mapping], pairs: Sequence[tuple[str, str]], key: str = "eval_loss", lower_is_better: bool = True) -> list[dict]:
    """Each ``(a, b)`` of ``pairs`` whose rows both exist, compared on ``key`` paired by seed:
    ``{"row", "against", "<key>_difference", "<key>_difference_ci95", "measured", "verdict"}``."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for a, b in pairs:
        if a in by_name and b in by_name:
            d = paired_difference(by_name[a][f"{key}_per_seed"], by_name[b][f"{key}_per_seed"])
            out.append({"row": a, "against": b, f"{key}_difference": d.mean, f"{key}_difference_ci95": None if math.isnan(d.ci95) else d.ci95,
                        "measured": d.measured, "verdict": d.verdict(a, b, lower_is_better)})
    return out


def merge_documents(documents: Sequence[Mapping[str, Any]], settings: Sequence[str] = ()) -> tuple[list[dict], list[int]]:
    """The rows of several ``--out`` documents of one benchmark, run with other seeds or other
    rows (on two cores at once, say), as one table: each row's per-seed figures joined in seed
    order and summarized again (``summarize``); its other fields come from its first document.
    ValueError when two documents ran a row with the same seed, when the documents differ in
    one of ``settings`` (keys of the document), or when the rows end up with different seeds
    (they could not be compared paired)."""
    by_row: dict[str, dict] = {}
    for index, doc in enumerate(documents):
        for key in settings:
            if doc.get(key) != documents[0].get(key):
                raise ValueError(f"document {index + 1} has {key} = {doc.get(key)!r}, document 1 {documents[0].get(key)!r}")
        seeds = list(doc.get("seeds") or [])
        for row in doc["rows"]:
            entry = by_row.setdefault(row["name"], {"row": row, "values": {}})
            for key in (k[: -len("_per_seed")] for k in row if k.endswith("_per_seed")):
                values = row[f"{key}_per_seed"]
                if len(values) != len(seeds):
                    raise ValueError(f"row {row['name']}: {len(values)} values of {key} for {len(seeds)} seeds")
                mine = entry["values"].setdefault(key, {})
                for seed, value in zip(seeds, values):
                    if seed in mine:
                        raise ValueError(f"row {row['name']} ran seed {seed} in two documents")
                    mine[seed] = value
    rows, all_seeds = [], None
    for name, entry in by_row.items():
        row_seeds = sorted({seed for values in entry["values"].values() for seed in values})
        if all_seeds is not None and row_seeds != all_seeds:
            raise ValueError(f"row {name} ran seeds {row_seeds}, another row {all_seeds}: they cannot be compared paired")
        all_seeds = row_seeds
        row = {k: v for k, v in entry["row"].items() if not (k.endswith("_per_seed") or k.endswith("_ci95") or k in entry["values"])}
        for key, values in entry["values"].items():
            if sorted(values) != row_seeds:
                raise ValueError(f"row {name}: {key} was measured for seeds {sorted(values)}, the row for {row_seeds}")
            ordered = [values[s] for s in row_seeds]
            if all(_number(v) for v in ordered):
                row.update(summarize({key: ordered}))
            else:  # a figure some seeds lack (None) keeps its per-seed list, as ``combine`` does
                row.update({key: None, f"{key}_ci95": None, f"{key}_per_seed": ordered})
        rows.append(row)
    return rows, all_seeds or []
