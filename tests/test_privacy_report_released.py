"""The privacy report lists every figure a DP run published that no epsilon covers: the ones
every run reports by name, and any other key of metrics.jsonl, so a new figure cannot slip out
of the list."""

from __future__ import annotations

from fedtune.privacy.report import released_outside


def test_every_uncovered_key_of_a_row_is_listed_by_name():
    rows = [{
        "round": 1, "clients": 3, "selected": 4, "train_loss": 0.7, "eval_loss": 0.6, "eval_accuracy": 0.7, "eval_seconds": 1.0,
        "bytes_up": 10, "bytes_down": 10, "bytes_up_per_client": 3.0, "bytes_down_per_client": 3.0, "seconds": 2.0,
        "codec_up": "int8", "codec_down": "raw", "dp_epsilon": 1.0, "dp_unclipped_fraction_noised": 0.4,
        "codec_error": 0.05, "clipped_updates": 1, "rejected_updates": 0,
    }]
    lines = released_outside(None, rows, participation_public=False)
    assert any("train_loss" in line for line in lines)
    (other,) = [line for line in lines if line.startswith("other figures")]
    assert "`clipped_updates`, `codec_error`, `rejected_updates`" in other
    for covered in ("eval_loss", "dp_epsilon", "codec_up", "`round`", "dp_unclipped_fraction_noised"):
        assert covered not in other
    # A row with only public and described keys adds no such line.
    plain = [{k: v for k, v in rows[0].items() if k not in ("codec_error", "clipped_updates", "rejected_updates")}]
    assert not any(line.startswith("other figures") for line in released_outside(None, plain, participation_public=False))
