"""What a client sends back under an update codec: differences from what it received,
compressed, with an error-feedback residual for biased codecs.

The instruction's options name the codec (``codec``), its options (``codec.<name>``) and whether
to keep a residual (``error_feedback``); the recipe never sees these keys. For each float tensor
it sends, the client encodes ``e = update + residual`` (``update`` being the trained tensor
minus the received one when it was received, the tensor itself otherwise) and keeps
``residual = e - decode(encode(e))``, so whatever a round drops is sent in a later one: over
rounds, the sum of what was sent tracks the sum of the true updates to within one residual.

Residuals live in the agent's memory, by tensor name; a residual whose tensor changes shape
(a new rank) is dropped. They do not survive a restart of the client process: a restarted
client loses at most the part of its updates its last residual held back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from fedtune.compression import Codec, make_codec
from fedtune.contract.option_keys import CODEC_KEY, CODEC_OPTION_PREFIX, ERROR_FEEDBACK_KEY
from fedtune.options import parse_scalar
from fedtune.protocol.tensors import EncodedTensor, encode_tensor, encoded_tensor
from fedtune.rng import derive_seed


@dataclass
class Uplink:
    codec: Codec
    error_feedback: bool = True

    @staticmethod
    def from_options(options: Mapping[str, str], seed: int) -> tuple["Uplink | None", dict[str, str]]:
        """(the uplink an instruction asks for or None, the options left for the recipe).
        A codec with a ``seed`` option draws from ``seed``, the client's round seed (mixed with
        the option's value when one is set), so each client and round gets its own random
        directions or positions: the same ones every round would leave the rest of the update
        unsent, round after round."""
        rest = {k: v for k, v in options.items() if k != CODEC_KEY and not k.startswith(CODEC_OPTION_PREFIX) and k != ERROR_FEEDBACK_KEY}
        name = options.get(CODEC_KEY)
        if not name:
            return None, rest
        codec_options = {k[len(CODEC_OPTION_PREFIX):]: parse_scalar(v) for k, v in options.items() if k.startswith(CODEC_OPTION_PREFIX)}
        codec = make_codec(name, codec_options)
        base = getattr(codec.options, "seed", None)
        if base is not None:
            codec = make_codec(name, {**codec_options, "seed": derive_seed(base, seed) if base else seed})
        feedback = options.get(ERROR_FEEDBACK_KEY, "true").lower() == "true"
        return Uplink(codec, feedback), rest

    def encode(self, update: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], residuals: dict[str, torch.Tensor]) -> tuple[list[EncodedTensor], dict[str, float]]:
        """The update's tensors for the wire, the residuals updated in place, and the relative
        error of what was sent (``codec_error``: ||sent - intended|| / ||intended||)."""
        out, err2, norm2 = [], 0.0, 0.0
        for name, t in update.items():
            if not t.is_floating_point():
                out.append(encode_tensor(name, t))
                continue
            base = received.get(name)
            intended = t.detach().float().cpu()
            if base is not None and base.shape == t.shape:
                intended = intended - base.detach().float().cpu()
            use_feedback = self.error_feedback and self.codec.biased
            carried = residuals.get(name) if use_feedback else None
            if carried is not None and carried.shape == intended.shape:
                intended = intended + carried
            encoded, decoded = self.codec.roundtrip(intended, name)
            lost = intended - decoded
            if use_feedback:
                residuals[name] = lost
            err2 += float(lost.double().square().sum())
            norm2 += float(intended.double().square().sum())
            out.append(encoded_tensor(name, t, self.codec, encoded))
        return out, {"codec_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0}
