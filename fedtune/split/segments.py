"""Running a slice of a transformers model: the bottom (embeddings and blocks ``[0, cut)``), the
middle or top (blocks ``[cut, L)``, fed the hidden states at the cut) and, for the U-shaped
split, the head alone.

Why not rewrite each architecture's forward: the model's own ``forward`` keeps doing what only it
knows (embeddings with their positions, scales and norms, attention masks, rotary positions,
pooling, the loss), and fedtune only changes two things for the duration of a call: the block
list is replaced by the slice to run, and the hidden states entering the slice's first block are
replaced by the received ones (a forward pre-hook; what the embeddings computed from stand-in
ids is dropped). The bottom ends with a hook on its last block that stops the forward pass
there. Every slice computes exactly what the whole model computes for those blocks, so split
training with a lossless codec reproduces ordinary training
(fedtune/methods/split/test_split.py checks it step for step).

Works for models whose blocks are one ``ModuleList`` of same-class blocks, as many as the
config's block count, whose first argument is the hidden states (every decoder and encoder
family transformers builds: ``layer``/``layers``/``h``/``blocks``...). Encoder-decoder models
(two block stacks), models whose blocks also take the input tokens (Gemma 4's per-layer
inputs) and models whose block list is not found are refused with a SplitError.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from fedtune.adapters.lora import AdapterError, keep_first_blocks, num_blocks


class SplitError(ValueError):
    """The model cannot be split as asked (the message says why)."""


# Block arguments that carry the input tokens themselves (Gemma 3n's and Gemma 4's per-layer
# token embeddings): a model whose blocks take one cannot be cut, since the coordinator's blocks
# would need the tokens the split keeps on the device.
PER_BLOCK_TOKEN_INPUTS = frozenset({"per_layer_input", "per_layer_inputs"})


@dataclass(frozen=True)
class Anatomy:
    """Where a model keeps its block list, and its input embedding module."""

    blocks_owner: nn.Module
    blocks_attr: str
    embed: nn.Module
    num_blocks: int

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.blocks_owner, self.blocks_attr)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def anatomy(model: nn.Module) -> Anatomy:
    """Find the block list and the input embeddings of ``model`` (peft-wrapped or not).

    The block list is the outermost ``ModuleList`` with as many modules of one class as the
    config has blocks (an MoE layer's experts, inside a block, do not count)."""
    base = _unwrap(model)
    name = getattr(base.config, "model_type", type(base).__name__)
    if getattr(base.config, "is_encoder_decoder", False):
        raise SplitError(f"split learning: {name} is an encoder-decoder model (two block stacks); split needs one stack of blocks")
    try:
        count = num_blocks(base)
    except AdapterError as exc:
        raise SplitError(f"split learning: {name}: {exc}") from None
    lists = [n for n, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == count and count > 0 and len({type(b) for b in m}) == 1]
    lists = [n for n in lists if not any(n.startswith(other + ".") for other in lists if other != n)]
    if len(lists) != 1:
        raise SplitError(f"split learning: cannot find the block list of {name} ({type(base).__name__}; candidates: {lists})")
    owner_path, _, blocks_attr = lists[0].rpartition(".")
    block = base.get_submodule(lists[0])[0]
    token_inputs = sorted(set(inspect.signature(type(block).forward).parameters) & PER_BLOCK_TOKEN_INPUTS)
    if token_inputs:
        raise SplitError(f"split learning: {name} feeds every block an embedding of the input tokens ({', '.join(token_inputs)}), "
                         f"so the blocks above the cut would need the tokens themselves; split needs blocks that see only the hidden states")
    embed = base.get_input_embeddings()
    if embed is None:
        raise SplitError(f"split learning: {name} has no input embedding module")
    return Anatomy(base.get_submodule(owner_path), blocks_attr, embed, count)


class _Emit(nn.Module):
    """Stands in for the blocks of an empty slice (the U-shaped client's head part): returns
    the received hidden states in the form the model's blocks return them (a tensor, or a
    tuple led by it, learned once per block class by running one real block), and answers
    attribute lookups (``attention_type``...) as the block it stands for."""

    def __init__(self, hidden: torch.Tensor, template: nn.Module, width: int) -> None:
        super().__init__()
        self.__dict__["_template"] = template  # not a submodule: no parameters of its own
        self.hidden, self.width = hidden, width

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_template"], name)

    def forward(self, *args, **kwargs):
        # the other members (attention weights...) are only read when the caller asks for them
        return (self.hidden, *[None] * (self.width - 1)) if self.width else self.hidden


_TUPLE_OUTPUT: dict[type, int] = {}  # block class -> length of the tuple its forward returns (0: a tensor)


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@contextlib.contextmanager
def _slice(model: nn.Module, start: int, stop: int, hidden: torch.Tensor | None, capture: bool) -> Iterator[None]:
    parts = anatomy(model)
    blocks = parts.blocks
    part = nn.ModuleList(list(blocks)[start:stop])
    hooks = []
    restore: list = []  # undo steps for the finally block
    last = blocks[len(blocks) - 1]
    if not len(part) and hidden is not None and type(last) in _TUPLE_OUTPUT:
        part = nn.ModuleList([_Emit(hidden, last, _TUPLE_OUTPUT[type(last)])])
        hidden = None
    elif not len(part) and hidden is not None:
        # First empty slice of this block class: run one real block, replace its output by
        # the received hidden states, and remember the output's form. The block runs in eval
        # mode: a probe must draw no random numbers (dropout...), or the step that happens to
        # run it first (which depends on thread timing) would get different masks downstream
        # from the same seed than every later step.
        part, arrived = nn.ModuleList([last]), hidden
        was_training = last.training
        last.eval()
        restore.append(lambda: last.train(was_training))

        def emit(module, args, output):
            _TUPLE_OUTPUT[type(module)] = len(output) if isinstance(output, tuple) else 0
            return (arrived, *output[1:]) if isinstance(output, tuple) else arrived
        hooks.append(last.register_forward_hook(emit))
        hidden = None
    # Assigning plain attributes: nn.Module.__setattr__ re-registers the submodules, and the
    # finally block puts the originals back even when the forward pass raises.
    setattr(parts.blocks_owner, parts.blocks_attr, part)
    if hidden is not None:
        def received(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            raise SplitError(f"split learning: cannot tell the hidden states among the arguments of {type(module).__name__}")
        hooks.append(part[0].register_forward_pre_hook(received, with_kwargs=True))
    if capture:
        def stop_here(module, args, output):
            raise _Stop(output[0] if isinstance(output, tuple) else output)
        hooks.append(blocks[stop - 1].register_forward_hook(stop_here))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for undo in restore:
            undo()
        setattr(parts.blocks_owner, parts.blocks_attr, blocks)


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
    for tensors outside the blocks (the classification head): the first numbered part, as
    blocks are the outermost numbered modules of every family split learning takes."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if parts[i + 1].isdigit() and i > 0:
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
