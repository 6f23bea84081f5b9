"""The exported adapter (and merged model) is written into a fresh folder and renamed into place:
a symbolic link planted at the export folder, or at a file in it, before the run or while it
runs, is replaced and never written through; its target is left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedtune.adapters import AdapterPlan, adapter_state, export_adapter, inject_lora
from fedtune.durable import fresh_folder
from fedtune.simulation.runner import run_simulation

from test_run_folders import _sim_config, _snapshot

LABELS = ["negative", "positive"]


def _outside(tmp_path) -> Path:
    """A folder outside the run folder, with something precious in it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("precious\n")
    (outside / "adapter_model.safetensors").write_text("precious\n")
    return outside


def _leftovers(run: Path) -> list[str]:
    return [n for n in os.listdir(run) if n.endswith(".tmp")]


# ---------------------------------------------------------------------- fresh_folder


def test_a_link_to_a_folder_at_the_destination_is_removed_itself_not_written_through(tmp_path):
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(outside, target_is_directory=True)
    with fresh_folder(run / "adapter") as folder:
        (folder / "adapter_model.safetensors").write_bytes(b"new")
        (folder / "precious.txt").write_bytes(b"new")
    assert _snapshot(outside) == before
    assert (run / "adapter").is_dir() and not (run / "adapter").is_symlink()
    assert _snapshot(run / "adapter") == {"adapter_model.safetensors": b"new", "precious.txt": b"new"}
    assert _leftovers(run) == []


def test_an_earlier_export_with_a_link_in_it_is_replaced_whole(tmp_path):
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (run / "adapter" / "stale.json").write_text("{}")
    with fresh_folder(run / "adapter") as folder:
        (folder / "adapter_model.safetensors").write_bytes(b"new")
    assert _snapshot(outside) == before
    assert _snapshot(run / "adapter") == {"adapter_model.safetensors": b"new"}  # the old folder went whole
    assert _leftovers(run) == []


def test_a_link_to_a_file_at_the_destination_is_replaced(tmp_path):
    outside = _outside(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(outside / "precious.txt")
    with fresh_folder(run / "adapter") as folder:
        (folder / "a").write_bytes(b"new")
    assert (outside / "precious.txt").read_text() == "precious\n"
    assert _snapshot(run / "adapter") == {"a": b"new"}


def test_a_link_planted_at_the_staging_folders_name_meanwhile_is_not_written_through(tmp_path):
    """Someone who can write into the run folder renames the staging folder away while the
    export is being written and plants a link to an outside folder at its name: the writer
    still reaches its own folder (through its descriptor), and that folder is what lands."""
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    run = tmp_path / "run"
    run.mkdir()
    with fresh_folder(run / "adapter") as folder:
        (folder / "first").write_bytes(b"1")
        (staging,) = _leftovers(run)
        os.rename(run / staging, tmp_path / "moved")
        (run / staging).symlink_to(outside, target_is_directory=True)
        (folder / "second").write_bytes(b"2")
    assert _snapshot(outside) == before
    assert _snapshot(run / "adapter") == {"first": b"1", "second": b"2"}
    assert not (run / "adapter").is_symlink()


def test_an_error_while_writing_leaves_the_destination_as_it_was(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "old").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fresh_folder(run / "adapter") as folder:
            (folder / "half").write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert _snapshot(run / "adapter") == {"old": b"old"}
    assert _leftovers(run) == []


# ---------------------------------------------------------------------- the adapter export


def _model(tiny_bert: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(LABELS))


def test_export_adapter_replaces_a_planted_link_and_the_export_loads_with_peft(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    outside = _outside(tmp_path)
    before = _snapshot(outside)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").symlink_to(outside, target_is_directory=True)
    model = inject_lora(_model(tiny_bert), AdapterPlan(rank=4), "seq-cls", seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)  # not the zero initialization: the loaded adapter must be this one
    export_adapter(model, run / "adapter", {"labels": LABELS})
    assert _snapshot(outside) == before
    assert (run / "adapter").is_dir() and not (run / "adapter").is_symlink()
    assert {"adapter_config.json", "adapter_model.safetensors", "fedtune.json"} <= set(os.listdir(run / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(LABELS)), str(run / "adapter"))
    want, got = adapter_state(model), adapter_state(loaded)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert _leftovers(run) == []


def test_links_planted_mid_run_at_the_export_folders_are_not_written_through(tmp_path, tiny_llama):
    """The run folder is checked for links when the run starts; links planted after that (here
    after round 1) at the adapter and merged folders must not be followed by the export."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    outside, merged_outside = _outside(tmp_path), tmp_path / "merged-outside"
    merged_outside.mkdir()
    (merged_outside / "config.json").write_text("precious\n")
    before, merged_before = _snapshot(outside), _snapshot(merged_outside)
    run_dir = tmp_path / "run"
    config = _sim_config(tmp_path, tiny_llama, run_dir)
    config.model.labels = LABELS
    config.export.merged = True

    def plant(row):
        if row["round"] == 1:
            (run_dir / "adapter").symlink_to(outside, target_is_directory=True)
            (run_dir / "merged").symlink_to(merged_outside, target_is_directory=True)

    result = run_simulation(config, on_round_end=plant)
    assert [r["round"] for r in result.history] == [1, 2]
    assert _snapshot(outside) == before and _snapshot(merged_outside) == merged_before
    for name in ("adapter", "merged"):
        assert (run_dir / name).is_dir() and not (run_dir / name).is_symlink()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=len(LABELS))
    PeftModel.from_pretrained(base, str(run_dir / "adapter"))  # a real adapter folder
    AutoModelForSequenceClassification.from_pretrained(str(run_dir / "merged"))
    assert _leftovers(run_dir) == []
