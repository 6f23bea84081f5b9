"""Running a slice of a transformers model: the bottom (embeddings and blocks ``[0, cut)``), the
middle or top (blocks ``[cut, L)``, fed the hidden states at the cut) and, for the U-shaped
split, the head alone.

Why not rewrite each architecture's forward: the model's own ``forward`` keeps doing what only it
knows (attention masks, rotary positions, pooling, the loss), and fedtune only changes two things
for the duration of a call: the block list is replaced by the slice to run, and the embedding
module by one that returns the received hidden states. The bottom ends with a hook on its last
block that stops the forward pass there. Every slice computes exactly what the whole model
computes for those blocks, so split training with a lossless codec reproduces ordinary training
(fedtune/methods/split/test_split.py checks it step for step).

Works for models whose blocks are one ``ModuleList`` (``layer``/``layers``/``h``) and whose
embeddings are one module (BERT-style ``embeddings``, Llama-style ``embed_tokens``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from fedtune.adapters.lora import AdapterError, keep_first_blocks, num_blocks


class SplitError(ValueError):
    """The model cannot be split as asked (the message says why)."""


@dataclass(frozen=True)
class Anatomy:
    """Where a model keeps its block list and its embedding module."""

    blocks_owner: nn.Module
    blocks_attr: str
    embed_owner: nn.Module
    embed_attr: str
    num_blocks: int

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.blocks_owner, self.blocks_attr)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def anatomy(model: nn.Module) -> Anatomy:
    """Find the block list and the embedding module of ``model`` (peft-wrapped or not)."""
    base = _unwrap(model)
    count = num_blocks(base)
    modules = dict(base.named_modules())
    lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) == count and n.rsplit(".", 1)[-1] in ("layer", "layers", "h")]
    if len(lists) != 1:
        raise SplitError(f"cannot find the block list of {type(base).__name__} (candidates: {lists})")
    blocks_path = lists[0]
    owner_path, _, blocks_attr = blocks_path.rpartition(".")
    backbone = owner_path.rsplit(".encoder", 1)[0] if owner_path.endswith(".encoder") or owner_path == "encoder" else owner_path
    for attr in ("embeddings", "embed_tokens"):
        path = f"{backbone}.{attr}" if backbone else attr
        if path in modules:
            embed_owner_path, _, embed_attr = path.rpartition(".")
            return Anatomy(modules[owner_path], blocks_attr, modules[embed_owner_path], embed_attr, count)
    raise SplitError(f"cannot find the embedding module of {type(base).__name__} next to its blocks ({blocks_path})")


class _Received(nn.Module):
    """Stands in for the embedding module: returns the hidden states that came over the wire."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@contextlib.contextmanager
def _slice(model: nn.Module, start: int, stop: int, hidden: torch.Tensor | None, capture: bool) -> Iterator[None]:
    parts = anatomy(model)
    blocks = parts.blocks
    embed = getattr(parts.embed_owner, parts.embed_attr)
    hook = None
    # Assigning plain attributes: nn.Module.__setattr__ re-registers the submodules, and the
    # finally block puts the originals back even when the forward pass raises.
    setattr(parts.blocks_owner, parts.blocks_attr, nn.ModuleList(list(blocks)[start:stop]))
    if hidden is not None:
        setattr(parts.embed_owner, parts.embed_attr, _Received(hidden))
    if capture:
        def stop_here(module, args, output):
            raise _Stop(output[0] if isinstance(output, tuple) else output)
        hook = blocks[stop - 1].register_forward_hook(stop_here)
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        setattr(parts.blocks_owner, parts.blocks_attr, blocks)
        setattr(parts.embed_owner, parts.embed_attr, embed)


def keep_bottom(model: nn.Module, blocks: int) -> nn.Module:
    """``model`` (a module tree of its own, e.g. from ``share_base``) cut in place to its first
    ``blocks`` blocks, its config saying so: a split device's model, built from a whole model
    already in memory."""
    parts = anatomy(model)
    try:
        keep_first_blocks(_unwrap(model).config, blocks)
    except AdapterError as exc:
        raise SplitError(str(exc)) from exc
    setattr(parts.blocks_owner, parts.blocks_attr, nn.ModuleList(list(parts.blocks)[:blocks]))
    return model


def check_cut(model: nn.Module, cut: int) -> None:
    count = anatomy(model).num_blocks
    if not 1 <= cut < count:
        raise SplitError(f"cut layer {cut} must leave at least one block on each side (the model has {count} blocks: 1..{count - 1})")


def stand_in_ids(attention_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token ids for the far side, which never sees the real ones: ``pad_id`` where the mask is
    0 and another id elsewhere, so models that pool at the last non-pad token still find it."""
    other = 0 if pad_id != 0 else 1
    return torch.where(attention_mask.bool(), torch.full_like(attention_mask, other), torch.full_like(attention_mask, pad_id)).long()


def bottom_forward(model: nn.Module, inputs: dict[str, torch.Tensor], cut: int) -> torch.Tensor:
    """Hidden states after blocks ``[0, cut)``: the client's half (of a whole model, or of one
    that holds only those blocks)."""
    count = anatomy(model).num_blocks
    if not 1 <= cut <= count:
        raise SplitError(f"cut layer {cut} is outside the model's {count} blocks")
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    with _slice(model, 0, cut, None, capture=True):
        try:
            model(**forward, use_cache=False)
        except _Stop as stop:
            return stop.hidden
    raise SplitError("the forward pass did not reach the cut layer")


def middle_forward(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, cut: int, pad_id: int) -> torch.Tensor:
    """Hidden states after blocks ``[cut, L)`` from those at the cut (the U-shaped server half;
    the final norm and the head stay with the client)."""
    count = anatomy(model).num_blocks
    ids = stand_in_ids(attention_mask, pad_id)
    with _slice(model, cut, count, hidden, capture=True):
        try:
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        except _Stop as stop:
            return stop.hidden
    raise SplitError("the forward pass did not reach the last block")


def top_forward(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, cut: int, pad_id: int):
    """The model's output (with its loss) from the hidden states at ``cut``: blocks ``[cut, L)``
    and the head (the plain split's server half; with ``cut = L`` the head alone, the U-shaped
    client's last part)."""
    count = anatomy(model).num_blocks
    ids = stand_in_ids(attention_mask, pad_id)
    with _slice(model, cut, count, hidden, capture=False):
        return model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False)


def block_of(name: str) -> int | None:
    """The block index in an adapter tensor's name (``...layer.3.attention...`` -> 3), or None
    for tensors outside the blocks (the classification head)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def below_cut(name: str, cut: int) -> bool:
    """Whether adapter tensor ``name`` exists in a model cut to blocks ``[0, cut)``: LoRA of
    those blocks, and tensors outside the blocks (the head)."""
    block = block_of(name)
    return block is None or block < cut


def client_side(name: str, cut: int, head_on_client: bool) -> bool:
    """Whether adapter tensor ``name`` is trained by the client: LoRA of blocks below the cut,
    and the head in the U-shaped split."""
    block = block_of(name)
    return block < cut if block is not None else head_on_client
