"""Every transformer family fedtune claims (peft's default-target model types and DistilBERT,
the list bench/families.py reports on), each built tiny from its config with no download:
LoRA with the default targets trains one step without touching the base, Fed-SB's start is
the base model, the split finds the block stack and its halves compute the whole model (or the
split is refused with a line naming the family), and the exported adapter, loaded by plain
peft on a fresh base, computes what the trained model computes.

bench/families.py runs the same families through whole federated runs (planner, DP-SGD,
FFA-LoRA and the rest); these are the fast, in-process checks that catch a family breaking."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fedtune.adapters import AdapterPlan, inject_lora, load_exported_adapter
from fedtune.adapters.lora import export_adapter
from fedtune.models import load_base_model, load_tokenizer, resolve_source
from fedtune.split.segments import SplitError, anatomy, bottom_forward, top_forward


def _bench():
    spec = importlib.util.spec_from_file_location("bench_families", Path(__file__).resolve().parent.parent / "bench" / "families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


BENCH = _bench()
SENTENCES = ["great trip today", "the car was awful", "my new city was nice", "worst road"]


def _batch(tokenizer, task: str) -> dict:
    batch = dict(tokenizer(SENTENCES, return_tensors="pt", padding=True))
    mask = batch["attention_mask"]
    if task == "seq-cls":
        batch["labels"] = torch.tensor([1, 0, 1, 0])
    elif task == "seq2seq":
        batch["labels"] = batch["input_ids"][:, -2:].clone()  # a target of two tokens
    else:
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)
    return batch


def _outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", BENCH.family_names())
def test_every_family_trains_exports_and_splits(tmp_path, name):
    try:
        family = BENCH.build_family(name, tmp_path / "model")
    except BENCH.Skip as why:
        pytest.skip(f"{name}: {why}")
    source = resolve_source(family.folder)
    labels = BENCH.LABELS if family.task == "seq-cls" else []
    tokenizer = load_tokenizer(source)
    batch = _batch(tokenizer, family.task)

    def fresh():
        return load_base_model(source, family.task, labels, seed=0)

    # LoRA on the default targets: one step trains the adapter and leaves the base untouched
    model = inject_lora(fresh(), AdapterPlan(rank=2, alpha=4.0), family.task, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".lora_B." in n for n, p in model.named_parameters() if p.requires_grad), f"{name}: no LoRA factor to train"
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss), name
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    trained_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert any(float(p.abs().max()) > 0 for p in trained_b), f"{name}: LoRA B did not move"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), f"{name}: a base weight moved"

    # the exported adapter on a fresh base computes what the trained model computes
    model.eval()
    export_adapter(model, tmp_path / "adapter")
    reloaded = load_exported_adapter(fresh(), tmp_path / "adapter").eval()
    assert torch.allclose(_outputs(reloaded, batch), _outputs(model, batch), atol=1e-5), f"{name}: export does not reproduce the model"

    # Fed-SB starts from zero cores between factors of the base weights: the base model itself
    base = fresh()
    start = inject_lora(fresh(), AdapterPlan(rank=2, alpha=4.0, core=True), family.task, seed=0).eval()
    assert torch.allclose(_outputs(start, batch), _outputs(base, batch), atol=1e-5), f"{name}: Fed-SB's start is not the base"

    # the split: the block stack is found and its halves compute the whole model, or it is
    # refused with one line that names the family
    try:
        anatomy(base)
    except SplitError as refusal:
        assert name.replace("-", "") in str(refusal).replace("-", "").replace("_", "").lower() or base.config.model_type in str(refusal)
        assert "\n" not in str(refusal)
        return
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        whole = base(**batch)
        hidden = bottom_forward(base, inputs, 1)
        top = top_forward(base, hidden, batch["attention_mask"], batch["labels"], 1, tokenizer.pad_token_id)
    assert torch.allclose(top.logits, whole.logits, atol=1e-4), f"{name}: the split's halves differ from the whole model"
