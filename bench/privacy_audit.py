"""An empirical privacy audit of fedtune's DP mechanisms in one run each (Steinke, Nasr,
Jagielski, NeurIPS 2023): a lower bound on epsilon at 95% confidence against the epsilon the
mechanism's accountant reports.

    python bench/privacy_audit.py [--canaries 1000] [--seed S] [--out FILE]

Each row runs a mechanism once with ``--canaries`` Dirac canaries, each included by a coin of
the auditor's (``fedtune.privacy.audit``, white-box: the auditor reads the released model):

- ``sample-eps<E>``: DP-SGD as devices run it (``dp_train``: Opacus per-example clipping,
  secure-mode noise, AdamW), Poisson rate 0.25 over the canaries and 64 honest examples, 20
  steps, sigma chosen for epsilon E (delta 1e-5); secret batches and noise.
- ``client-eps<E>``: DP-FedAvg as the coordinator runs it (``ClientDP`` around fedavg), clients
  drawn by ``poisson_select`` at rate 0.5 from the canaries and 50 honest clients, 4 rounds,
  ``target_epsilon`` E; secret selection and noise.
- ``broken-noise-off`` / ``broken-noise-off-client``: sigma configured for epsilon 1 and
  reported so, but no noise added.
- ``broken-known-seed`` / ``broken-known-seed-client``: research mode (``repeatable``), the
  seed the coordinator knows; the auditor regenerates the noise and the Poisson draws and takes
  them out.

Columns: ``epsilon_reported``, ``epsilon_lower_bound`` (95%, the paper's bound for (eps,
delta)-DP, the best of a grid of guess counts fixed by m, each at beta / grid size), the number
of ``canaries``, ``guesses`` and ``correct`` guesses, and ``held``: a correct row holds when its
bound stays at or below the reported epsilon, a broken row when its bound exceeds it (caught).
Exit status 1 when a row does not hold. The auditor's coins come from ``--seed`` (per row:
derived from it and the row's name) or from fresh secrets, recorded in the JSON either way.
A bound below the reported epsilon does not prove the claim; one above it disproves it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedtune.privacy.audit import AuditSettings, format_table, report, run_rows, standard_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None, help="the auditor's seed (default: fresh secrets, recorded)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    settings = AuditSettings(canaries=args.canaries)
    started = time.monotonic()
    results = run_rows(standard_rows(), settings, args.seed, progress=lambda name: print(f"running {name} ...", file=sys.stderr, flush=True))
    seconds = round(time.monotonic() - started, 1)
    print(format_table(results))
    print(f"\n{len(results)} rows in {seconds:.1f} s; lower bounds at {1 - settings.beta:.0%} confidence, delta {settings.delta:g}")
    if args.out:
        args.out.write_text(json.dumps(report(results, settings, args.seed, seconds), indent=2) + "\n")
    failed = [r.name for r in results if not r.held]
    if failed:
        print(f"did not hold: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
