"""Frozen base weights held in fewer bits: 8-bit, 4-bit (NF4) or a GGUF file's own blocks, for
devices short of memory.

LoRA trains only the adapter; the base model is frozen and only read, so it can be held
quantized, as QLoRA does: a device then needs a quarter (int8) or an eighth (4-bit) of the fp32
bytes for the base, which is the largest thing it holds. ``quantize_base`` replaces, in place,
every matrix layer of a loaded model (``nn.Linear`` and transformers' ``Conv1D``) and every large
embedding table by its bitsandbytes counterpart; the trained head (``classifier``/``score``)
stays in fp32.

Why bitsandbytes: peft has LoRA layers of its own for bitsandbytes' ``Linear8bitLt`` and
``Linear4bit`` (so injection, training and merging work unchanged), bitsandbytes runs on the CPU
as well as on CUDA, and NF4 is the data type QLoRA introduced for normally distributed weights.
Why fedtune replaces the modules itself rather than passing a ``BitsAndBytesConfig`` to
``from_pretrained``: transformers' integration leaves the embedding tables in fp32, and on the
small models edge devices run they are the largest tensors (MiniLM: 45 of its 87 MiB); a GGUF
file arrives already dequantized from transformers' GGUF loader; and GPT-2's ``Conv1D`` layers
are turned into plain matrix layers here, in the layout bitsandbytes expects.

A model that arrives as a GGUF file (already 4- to 8-bit) is better held in its file's blocks,
``gguf`` precision (``fedtune.ggml_blocks``): quantizing the file's weights again to NF4 adds
a second rounding to the first, while the file's blocks reproduce its weights exactly, so a
device computes with the very model the fp32 rows load, for about 5 bits a weight. For the same
reason ``4bit`` keeps every weight the file stored in 4-bit blocks (Q4_0, Q4_1) as those blocks
and rounds to NF4 only the others (a model not loaded from GGUF). A language model's output layer
is the exception (``OUTPUT_PRECISION``): held in 8 bits, or in its file's blocks (Q8_0 in most
4-bit GGUF files), as llama.cpp's 4-bit files hold it.

Everything that reads a base weight goes through ``dense_weight`` (the weight as an out x in
float matrix). A method that folds a dense update into the base (FLoRA, the frozen remainder of a
smaller plan) works on a quantized base too: the update is held beside the quantized weight in
float32 (``set_frozen_delta``) and added in every product, never quantized into it.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
from typing import Iterator

import torch

from fedtune import ggml_blocks

log = logging.getLogger(__name__)

# How a base model's frozen weights may be held: name -> what it means.
PRECISIONS = {
    "fp32": "every weight in 32-bit floats, as loaded",
    "int8": "matrix layers and embedding tables in 8-bit integers with a scale per row (LLM.int8 storage)",
    "4bit": "matrix layers and embedding tables in 4 bits: a weight a GGUF file stored in 4-bit blocks (Q4_0, Q4_1) keeps "
            "them, exactly; any other is rounded to NF4 with a scale per block of 64 (QLoRA storage); a language model's "
            "output layer (and the embedding table tied to it) in 8 bits, or in the file's blocks",
    "gguf": "matrix layers and embedding tables kept in the GGUF blocks they were stored in (Q4_0, Q4_1, Q5_0, Q5_1 "
            "or Q8_0: 4.5 to 8.5 bits a weight), reproducing the file's weights exactly; for models loaded from a .gguf file",
}
# The output layer of a language model (``get_output_embeddings``), and the embedding table tied
# to it, held at this precision when the rest is at the key: the logits are the model's most
# rounding-sensitive product (every error in the table reaches every token's scores), which is
# why llama.cpp's 4-bit files store it in 6 to 8 bits and transformers' bitsandbytes integration
# leaves it unquantized. A GGUF file's own blocks for it are kept, whatever their format.
OUTPUT_PRECISION = {"4bit": "int8"}
# Modules a task trains in full (peft's modules_to_save for classification): never quantized.
TRAINED_HEADS = frozenset({"classifier", "score"})
# Embedding tables smaller than this stay in fp32 (token types, a few positions): the saving is
# nothing and their rows are not multiples of a quantization block.
MIN_EMBEDDING_ELEMENTS = 1 << 16
NF4_BLOCK = 64
# The task option that tells a client how the run holds the base (absent: fp32).
BASE_PRECISION_OPTION = "base_precision"


class PrecisionError(ValueError):
    """A base precision that is unknown or that this installation cannot provide."""


def check_precision(name: str, where: str = "model.base_precision") -> str:
    """``name`` if it is a known precision whose backend is installed, else PrecisionError naming
    ``where``, the choices and what to install."""
    if name not in PRECISIONS:
        raise PrecisionError(f"{where}: unknown base precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "gguf":
        if not _has_gguf():
            raise PrecisionError(f"{where} gguf: needs the gguf package (pip install gguf)")
    elif name != "fp32":
        try:
            _bnb()
        except ImportError:
            raise PrecisionError(f"{where} {name}: needs bitsandbytes (pip install bitsandbytes)") from None
    return name


def _has_gguf() -> bool:
    """Whether the gguf package is installed (fedtune.ggml_blocks encodes blocks with it)."""
    return importlib.util.find_spec("gguf") is not None


def _bnb():
    """bitsandbytes (its import's offline-kernel warnings are filtered by fedtune.logs)."""
    import bitsandbytes as bnb

    return bnb


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` (or the base layer peft wrapped around it) holds a quantized weight."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = getattr(base, "weight", None)
    return weight is not None and weight.dtype in (torch.int8, torch.uint8) and _kind(base) is not None


def _kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, (GGUFLinear, GGUFEmbedding)):
        return "gguf"
    try:
        bnb = _bnb()
    except ImportError:
        return None
    if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Embedding4bit)):
        return "4bit"
    if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Embedding8bit)):
        return "int8"
    return None


class GGUFLinear(torch.nn.Linear):
    """A matrix layer whose weight is held as GGUF blocks (``weight``: uint8, out x blocks,
    its format in ``weight.ggml_format``) and decoded for each product, on any device. A
    subclass of ``nn.Linear`` so that peft wraps it as it wraps any linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self, self.bias)


class GGUFEmbedding(torch.nn.Embedding):
    """An embedding table held as GGUF blocks, one row of blocks a token: a lookup decodes only
    the rows it reads."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ggml_blocks.decode(self.weight[ids], self.weight.ggml_format)


class GGUFBlocks(torch.nn.Parameter):
    """A frozen weight held as GGUF blocks (uint8, rows x blocks), its format in
    ``ggml_format``. A Parameter subclass so that the format travels with the tensor through
    ``copy.deepcopy`` (a plain attribute would be lost, and the blocks read as weights)."""

    def __new__(cls, blocks: torch.Tensor, ggml_format: str) -> "GGUFBlocks":
        weight = super().__new__(cls, blocks, requires_grad=False)
        weight.ggml_format = ggml_format
        return weight

    def __deepcopy__(self, memo: dict) -> "GGUFBlocks":
        if id(self) not in memo:
            memo[id(self)] = type(self)(self.data.clone(), self.ggml_format)
        return memo[id(self)]

    def __reduce_ex__(self, protocol: int):
        return type(self), (self.data, self.ggml_format)


def _gguf_layer(module: torch.nn.Module, dense: torch.Tensor, bias: torch.Tensor | None, weight: torch.nn.Parameter) -> torch.nn.Module:
    if isinstance(module, torch.nn.Embedding):
        layer = GGUFEmbedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx, device="meta")
    else:
        out_features, in_features = dense.shape
        layer = GGUFLinear(in_features, out_features, bias=bias is not None, device="meta")
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer.weight = weight
    return layer


def _int8_weight(dense: torch.Tensor) -> torch.nn.Parameter:
    bnb = _bnb()
    weight = bnb.nn.Int8Params(dense.detach().to("cpu", torch.float32).contiguous(), requires_grad=False, has_fp16_weights=False)
    return weight.to("cpu")  # bitsandbytes quantizes when the parameter is first placed on a device


def _nf4_weight(dense: torch.Tensor, module: torch.nn.Module, double_quant: bool) -> torch.nn.Parameter:
    bnb = _bnb()
    weight = bnb.nn.Params4bit(dense.detach().to("cpu", torch.float32).contiguous(), requires_grad=False, quant_type="nf4",
                               blocksize=NF4_BLOCK, compress_statistics=double_quant, module=module)
    return weight.to("cpu")


def _install_int8(module: torch.nn.Module, weight: torch.nn.Parameter) -> None:
    """Give a Linear8bitLt its weight and move the row scales where its forward reads them, now
    (bitsandbytes moves them on the first forward, which would change a weight other module
    trees share). The weight keeps a reference to its scales so that it can be read back."""
    module.weight = weight
    if hasattr(module, "init_8bit_state"):
        module.init_8bit_state()
        module.weight.SCB = module.state.SCB


def _matrix_layer(module: torch.nn.Module, dense: torch.Tensor, bias: torch.Tensor | None, precision: str) -> torch.nn.Module:
    out_features, in_features = dense.shape
    if precision == "4bit":
        layer = _matrix_classes()[1](in_features, out_features, bias=bias is not None, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = _nf4_weight(dense, layer, double_quant=True)
    else:
        layer = _matrix_classes()[0](in_features, out_features, bias=bias is not None, has_fp16_weights=False, device="meta")
        _install_int8(layer, _int8_weight(dense))
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


class _DequantizedLinear(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` the layer's weight dequantized for the product and dropped
    after it: the backward pass dequantizes it again. (``F.linear`` on the dequantized weight
    would keep every layer's fp32 weight alive for the backward pass, the whole fp32 model a
    quantized base exists to avoid.) The base is frozen: no gradient for the weight or bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: torch.nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, dense_weight(layer).to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = dense_weight(ctx.layer).to(grad.dtype)
        return grad @ weight, None, None


def _plus_frozen_delta(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    delta = frozen_delta(layer)
    return out if delta is None else out + torch.nn.functional.linear(x, delta.to(x.dtype))


@functools.cache
def _matrix_classes() -> tuple[type, type]:
    """bitsandbytes' 8-bit and 4-bit matrix layers, computing on the CPU with their weight
    dequantized to fp32, in evaluation as in training. bitsandbytes' own CPU paths differ between
    the two: in eval mode its 8-bit layer quantizes the activations to 8 bits as well, and on CPUs
    with AVX512-BF16 its 4-bit layer repacks its weight in place (a weight other module trees
    share) and computes in bfloat16. A model must be evaluated as it was trained, whatever the
    CPU. On CUDA, bitsandbytes' own kernels run unchanged."""
    bnb = _bnb()

    class Linear8bit(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cpu":
                return _DequantizedLinear.apply(x, self, self.bias)
            return _plus_frozen_delta(self, x, super().forward(x))

    class Linear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cpu":
                return _DequantizedLinear.apply(x, self, self.bias)
            return _plus_frozen_delta(self, x, super().forward(x))

    return Linear8bit, Linear4bit


@functools.cache
def _embedding_classes() -> tuple[type, type]:
    """bitsandbytes' quantized embedding tables with a state dict: theirs refuse to be saved,
    which would break every ``state_dict()`` of a model holding one (peft calls it to read the
    adapter). The state dict holds the table as stored (packed codes), like a quantized Linear's."""
    bnb = _bnb()

    class Embedding4bit(bnb.nn.Embedding4bit):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    class Embedding8bit(bnb.nn.Embedding8bit):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    return Embedding4bit, Embedding8bit


def _embedding(module: torch.nn.Embedding, precision: str) -> torch.nn.Module:
    embedding4bit, embedding8bit = _embedding_classes()
    if precision == "4bit":
        table = embedding4bit(module.num_embeddings, module.embedding_dim, dtype=torch.float32, quant_type="nf4", device="meta")
        # no double quantization: the table is read a row at a time, with each row's block scales
        table.weight = _nf4_weight(module.weight, table, double_quant=False)
    else:
        table = embedding8bit(module.num_embeddings, module.embedding_dim, device="meta")
        table.weight = _int8_weight(module.weight)
    table.padding_idx = module.padding_idx
    return table


def kept_in_fp32(model: torch.nn.Module):
    """A test of a module's qualified name: whether the model's own code needs it in fp32.

    transformers models name such modules in ``_keep_in_fp32_modules`` (and ``..._strict``), and
    their code relies on it: T5's feed-forward casts its input to ``wo.weight.dtype``, which for
    a quantized ``wo`` is an integer type (silently wrong in evaluation, an error in training).
    A name matches an entry when the entry (less a trailing ``.weight``) is the whole name or its
    last components, as transformers' own quantizers skip them."""
    entries = set()
    for attribute in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        for entry in getattr(model, attribute, None) or ():
            entries.add(entry.removesuffix(".weight").removesuffix(".bias"))

    def keep(name: str) -> bool:
        return any(name == entry or name.endswith("." + entry) for entry in entries)

    return keep


def quantize_base(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Hold ``model``'s frozen weights at ``precision`` (in place; returns ``model``). Matrix
    layers and embedding tables of at least ``MIN_EMBEDDING_ELEMENTS`` are replaced; the trained
    heads (``TRAINED_HEADS``), norms and biases stay in fp32, and so do the modules the model's
    code needs in fp32 (``kept_in_fp32``). A tied output layer gets its own quantized copy of
    the embedding table, so the fp32 table is not kept alive through it."""
    check_precision(precision)
    if precision == "fp32":
        return model
    from transformers.pytorch_utils import Conv1D  # GPT-2's matrix layer, its weight stored in x out

    keep = kept_in_fp32(model)
    replaced = 0
    as_stored: dict[int, torch.nn.Parameter | None] = {}  # gguf: each tensor's blocks, found once

    # 4bit keeps a GGUF file's 4-bit blocks (encoding them back needs the gguf package)
    block_formats = {"gguf": tuple(ggml_blocks.FORMATS), "4bit": ggml_blocks.FOUR_BIT if _has_gguf() else ()}.get(precision, ())
    # 4bit holds the output layer, and the table tied to it, in 8 bits (OUTPUT_PRECISION)
    output = model.get_output_embeddings() if precision == "4bit" and hasattr(model, "get_output_embeddings") else None
    output_weight = id(output.weight) if isinstance(getattr(output, "weight", None), torch.Tensor) else None

    def replacement(child: torch.nn.Module, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module | None:
        is_output = id(child.weight) == output_weight
        formats = tuple(ggml_blocks.FORMATS) if is_output and _has_gguf() else block_formats
        if formats and id(child.weight) not in as_stored:  # a tied output layer shares the table's blocks
            held = ggml_blocks.hold_exactly(dense, formats)
            as_stored[id(child.weight)] = None if held is None else GGUFBlocks(held[1], held[0])
        weight = as_stored.get(id(child.weight))
        if weight is not None:
            return _gguf_layer(child, dense, bias, weight)
        if precision == "gguf":
            return None
        held_at = OUTPUT_PRECISION[precision] if is_output else precision
        if isinstance(child, torch.nn.Embedding):
            return _embedding(child, held_at)
        return _matrix_layer(child, dense, bias, held_at)

    for parent_name, parent in list(model.named_modules()):
        if parent_name.split(".")[0] in TRAINED_HEADS or parent_name in TRAINED_HEADS:
            continue
        for name, child in list(parent.named_children()):
            if not parent_name and name in TRAINED_HEADS:
                continue
            if keep(f"{parent_name}.{name}" if parent_name else name):
                continue
            if type(child) is torch.nn.Linear:
                new = replacement(child, child.weight, child.bias)
            elif isinstance(child, Conv1D):
                new = replacement(child, child.weight.T, child.bias)
            elif type(child) is torch.nn.Embedding and child.weight.numel() >= MIN_EMBEDDING_ELEMENTS and child.embedding_dim % NF4_BLOCK == 0:
                new = replacement(child, child.weight, None)
            else:
                continue
            if new is None:
                continue
            setattr(parent, name, new)
            replaced += 1
    kept = sum(held is not None for held in as_stored.values())
    if precision == "4bit" and kept:
        log.info("base precision 4bit: %d weight matrices kept in their GGUF file's 4-bit blocks, exactly", kept)
    if precision == "gguf":
        left = sum(held is None for held in as_stored.values())
        if not replaced:
            raise PrecisionError("base precision gguf: no weight of this model is stored in a GGUF block format fedtune "
                                 f"decodes ({', '.join(ggml_blocks.FORMATS)}); hold it at int8 or 4bit instead")
        if left:
            log.warning("base precision gguf: %d weight matrices are in no format fedtune decodes (a K-quant, or fp16) "
                        "and stay in fp32", left)
    if hasattr(model, "config"):
        # the model no longer ties its output layer to its input embeddings: each is its own table
        model.config.tie_word_embeddings = False
    log.info("base weights held at %s: %d layers quantized, %.1f MiB held", precision, replaced, held_bytes(model) / 2**20)
    return model


def dense_weight(module: torch.nn.Module, weight: torch.nn.Parameter | None = None) -> torch.Tensor:
    """The base weight of a matrix layer as an out x in float32 matrix: dequantized when it is
    held quantized, plus its frozen delta (``set_frozen_delta``). ``weight``: read this (an
    earlier weight of the same layer) instead of the current one, without the delta."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    w = base.weight if weight is None else weight
    kind = _kind(base)
    if kind == "gguf":
        dense = ggml_blocks.decode(w.data, w.ggml_format)
    elif kind == "4bit":
        dense = _bnb().functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    elif kind == "int8":
        scales = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
        dense = w.data.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)
    else:
        return w
    delta = frozen_delta(base) if weight is None else None
    return dense if delta is None else dense + delta.to(dense.device)


# What is folded into a quantized layer's frozen weight (FLoRA's aggregate, a smaller plan's
# frozen remainder) is held beside the quantized weight in float32 and added in every product,
# never quantized into it: most of an update of LoRA's size is smaller than a quantization step
# and would be rounded away (an rms of 1e-3 on a 4-bit weight of std 0.04: about 2% of it kept).
FROZEN_DELTA = "fedtune_frozen_delta"


def frozen_delta(module: torch.nn.Module) -> torch.Tensor | None:
    """The out x in float32 update held beside a quantized layer's weight (None: none)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base._buffers.get(FROZEN_DELTA)


def set_frozen_delta(module: torch.nn.Module, delta: torch.Tensor | None) -> None:
    """Hold ``delta`` (out x in) beside the quantized weight of ``module``, replacing what it held
    (a new tensor, never written in place: module trees share their frozen tensors). A buffer,
    so that it moves with the model and ``held_bytes`` counts it; not saved with the model."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if delta is None:
        base._buffers.pop(FROZEN_DELTA, None)
        return
    expected = (base.out_features, base.in_features)
    if tuple(delta.shape) != expected:
        raise ValueError(f"a {list(delta.shape)} update does not fit a weight of shape {list(expected)} (out x in)")
    base.register_buffer(FROZEN_DELTA, delta.detach().to(base.weight.device, torch.float32).clone(), persistent=False)


def shared_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a module tree of ``model`` holds for its frozen weights: parameters, buffers
    and the quantization statistics bitsandbytes keeps beside them (scales, code books), which a
    copy of the tree must share rather than duplicate."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        yield t
        for extra in (getattr(t, "SCB", None), getattr(t, "CB", None)):
            if isinstance(extra, torch.Tensor):
                yield extra
        state = getattr(t, "quant_state", None)
        while state is not None:
            for extra in (state.absmax, state.code, getattr(state, "offset", None)):
                if isinstance(extra, torch.Tensor):
                    yield extra
            state = getattr(state, "state2", None)
    for m in model.modules():
        state = getattr(m, "state", None)
        for attr in ("CB", "SCB"):
            extra = getattr(state, attr, None)
            if isinstance(extra, torch.Tensor):
                yield extra


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes ``model``'s weights occupy as held: every distinct tensor of ``shared_tensors``
    (a tied weight, or one shared by two layers, counts once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in shared_tensors(model):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    return total


def logical_numel(param: torch.Tensor) -> int:
    """The number of weights ``param`` stands for (a 4-bit parameter packs two per byte, GGUF
    blocks 32 in 18 to 34 bytes)."""
    fmt = getattr(param, "ggml_format", None)
    if fmt is not None:
        return param.numel() // ggml_blocks.FORMATS[fmt] * ggml_blocks.BLOCK
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()
