"""The median strategy from Python: the run of `fedtune simulate --clients 3 --rounds 2
--aggregation median`, through `fedtune.simulate`, naming the strategy by its `module:Name` spec
(which needs no entry point, only `fedtune_median` importable). Same seed, same method: it prints
the same eval losses as the command.

    python examples/custom_strategy/run.py
"""

from __future__ import annotations

import warnings

import fedtune


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    rows = fedtune.simulate(
        federation={"aggregation": "fedtune_median:Median", "rounds": 2},
        simulation={"clients": 3},
        # more keys as dotted strings: **{"training.local_steps": 10}, or the options of the
        # chosen parts: federation={"options": {"weighted": True}, ...}
        on_round_end=lambda row: print(f"round {row['round']}: train loss {row['train_loss']:.4f}, "
                                       f"eval loss {row['eval_loss']:.4f}, eval accuracy {row['eval_accuracy']:.3f}", flush=True),
    )
    print(f"eval loss per round: {[round(row['eval_loss'], 4) for row in rows]}")


if __name__ == "__main__":
    main()
