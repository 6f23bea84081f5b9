"""Update codecs around any strategy: clients send compressed updates, the coordinator decodes
them before aggregating, and may compress the weights it sends.

- Uplink: a client sends, for every float tensor it was given and sends back, the difference
  between what it trained and what it received, compressed by the uplink codec (tensors it was
  not given, such as SCAFFOLD's control-variate deltas, are compressed as they are). A biased
  codec (top-k, low bits) keeps what it dropped as an error-feedback residual on the device
  and adds it to the next round's update (``fedtune.client.uplink``).
- The service decodes each tensor as its header says; this wrapper then adds each decoded
  difference to the *exact* tensor the client was given, and hands the inner strategy ordinary
  weights. So a client that returns what it received leaves the global model unchanged even
  when the downlink is lossy: the downlink's rounding never accumulates in the global model.
- A lossy downlink without an uplink codec: clients send weights, trained from the lossy copy
  D(s) of each tensor s they were given. The change a client made is w - D(s), and that change
  is what this wrapper applies to the exact s (``reanchor_update``): otherwise every round would
  pull the global model toward its own rounded copy.
- Downlink: the service encodes the instruction's float tensors with the downlink codec. Only
  codecs that can carry weights (fp16, bf16, uniform int) are allowed there; a sparse or
  projected copy of the weights would be a different model.

Codecs are named by ``[compression]`` in the config (``uplink``, ``downlink``, their options);
``--codec`` and ``--downlink-codec`` on the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch

from fedtune.aggregation.base import ClientUpdate, Instruction, RoundContext, State, Strategy, Wrapper, map_instructions
from fedtune.compression import Codec
from fedtune.contract.option_keys import CODEC_KEY, CODEC_OPTION_PREFIX, ERROR_FEEDBACK_KEY
from fedtune.contract.properties import declare
from fedtune.options import OptionsError, options_to_wire
from fedtune.protocol.tensors import decode_tensors, encode_tensors


def restore_update(update: ClientUpdate) -> ClientUpdate:
    """``update`` with every difference turned back into weights: a float tensor the client was
    given (same name and shape) arrives as a difference from it."""
    tensors = {}
    for name, t in update.tensors.items():
        base = update.start.get(name)
        if base is not None and t.is_floating_point() and base.shape == t.shape:
            tensors[name] = (base.double() + t.double()).to(base.dtype)
        else:
            tensors[name] = t
    return dataclasses.replace(update, tensors=tensors)


def reanchor_update(update: ClientUpdate, received: Callable[[torch.Tensor], torch.Tensor]) -> ClientUpdate:
    """``update`` with every float tensor the client was given re-anchored on the exact tensor:
    ``start + (sent - received(start))``, where ``received`` gives the copy the client got."""
    tensors = {}
    for name, t in update.tensors.items():
        base = update.start.get(name)
        if base is not None and t.is_floating_point() and base.shape == t.shape:
            tensors[name] = (base.double() + (t.double() - received(base).double())).to(base.dtype)
        else:
            tensors[name] = t
    return dataclasses.replace(update, tensors=tensors)


class Compress(Wrapper):
    """Compressed updates (and optionally weights) around ``inner``; see the module docstring."""

    name = "compress"
    weighted_mean = True

    def __init__(self, inner: Strategy, uplink: Codec | None, downlink: Codec | None = None, *, error_feedback: bool = True) -> None:
        super().__init__(inner, None, scale=inner.scale, seed=inner.seed)
        feedback = uplink is not None and error_feedback and uplink.biased
        refuses = {"scalar-update": "these clients already upload only seed indices and scalars"} if uplink is not None else {}
        if feedback:
            refuses["refactorized"] = ("error feedback adds last round's codec loss to each tensor by name, and the factors change "
                                       "coordinates every round; set compression.error_feedback = false")
        self.declares = declare(
            provides=[prop for prop, codec in (("update-codec", uplink), ("weight-codec", downlink)) if codec is not None],
            refuses=refuses,
        )
        if downlink is not None and not downlink.carries_weights:
            raise OptionsError(
                f"compression.downlink: codec {downlink.name} compresses updates, not weights; "
                "the downlink carries the global weights (use fp16, bf16, int8, int4 or uniform)"
            )
        self.uplink, self.downlink, self.error_feedback = uplink, downlink, error_feedback
        self._received: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(start) -> (start, its downlink copy)
        self._client_options: dict[str, str] = {}
        if uplink is not None:
            self._client_options[CODEC_KEY] = uplink.name
            self._client_options.update({CODEC_OPTION_PREFIX + k: v for k, v in options_to_wire(uplink.options).items()})
            self._client_options[ERROR_FEEDBACK_KEY] = "true" if error_feedback else "false"

    def configure(self, ctx: RoundContext, state: Mapping[str, torch.Tensor]) -> dict[str, Instruction]:
        def compressed(ins: Instruction) -> Instruction:
            return dataclasses.replace(ins, options={**ins.options, **self._client_options}, downlink=self.downlink)

        return map_instructions(self.inner.configure(ctx, state), compressed)

    def _restored(self, update: ClientUpdate) -> ClientUpdate:
        """``update`` as weights measured from the exact tensors the client was given."""
        if self.uplink is not None:
            return restore_update(update)
        if self.downlink is not None:
            return reanchor_update(update, self._downlink_copy)
        return update

    def _downlink_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """What a client decodes of ``tensor`` sent through the downlink codec (the same bytes
        the service encodes; cached per tensor object, since a round's clients share them)."""
        hit = self._received.get(id(tensor))
        if hit is None or hit[0] is not tensor:
            if len(self._received) > 4096:
                self._received.clear()
            copy = decode_tensors(encode_tensors({"t": tensor}, {"t": self.downlink}))["t"]
            hit = self._received[id(tensor)] = (tensor, copy)
        return hit[1]

    def check_update(self, ctx: RoundContext, update: ClientUpdate) -> None:
        self.inner.check_update(ctx, self._restored(update))

    def aggregate(self, ctx: RoundContext, state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> tuple[State, dict]:
        ours: dict = {"codec_up": self.uplink.name if self.uplink else "raw", "codec_down": self.downlink.name if self.downlink else "raw"}
        if self.uplink is not None:
            errors = [u.metrics["codec_error"] for u in updates if "codec_error" in u.metrics]
            if errors:  # each client's ||sent - intended|| / ||intended||
                ours["codec_error"] = sum(errors) / len(errors)
        updates = [self._restored(u) for u in updates]
        self._received.clear()
        new_state, metrics = self.inner.aggregate(ctx, state, updates)
        return new_state, {**metrics, **ours}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "uplink": self.uplink.describe() if self.uplink else None,
            "downlink": self.downlink.describe() if self.downlink else None,
            "error_feedback": self.error_feedback,
            "inner": self.inner.describe(),
        }
