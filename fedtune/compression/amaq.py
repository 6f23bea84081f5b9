"""AMAQ: adaptive mixed-bit quantization of split-learning activations and gradients.

A tensor crossing the cut is viewed as a matrix of N rows (tokens) by C channels (its last
dimension). Channel ``c`` is quantized uniformly over its own range at its own width ``b_c``
bits, on a grid with zero as a level (``fedtune.compression.grid``: the exact zeros of padding
and of tokens the head ignores stay exact). The widths come from trainable gates ``Q_c`` (``BitGates``):

    b_c = b_min + (b_max - b_min) * sigmoid(alpha * Q_c)

What the paper leaves open, and what fedtune chose:

- Wire widths are ``round(b_c)``, an integer in [b_min, b_max]; gradients reach ``Q_c`` through
  the rounding by the straight-through estimator, and through the quantizer's step by the
  LSQ-style estimator ``d x_hat / d step = round(u) - u``.
- The gates live with the sender: the client owns the activation gates, the coordinator owns
  the gradient gates of each client's session. They are optimized separately from the LoRA
  weights (their own Adam) and never cross the wire; only the widths do.
- The bit regularization (``BitGates.regularizer``) is the importance-weighted expected
  quantization error plus ``weight`` times the mean width:
  ``sum_c I_c * range_c**2 / (2**b_c - 1)**2 / 12 / sum_c I_c range_c**2 + weight * mean(b)``.
  Feature-wise importance ``I_c`` is a running mean of the squared gradient that reached channel
  ``c`` (the expected loss increase from noise on a channel grows with it); for the gradient
  direction, where no loss measures the error, it is 1 (plain relative error). Layer-wise
  importance is ``layer_weight``, a factor on the whole term for this cut. Minimizing it at a
  fixed mean width is reverse water-filling: wide or important channels get more bits.
- The allocation (``MixedBitQuantizer(allocation=)``): by default each frame's widths are the
  exact minimizer of the regularizer's error term at the budget (``water_fill``), with the
  importance learned from the returning gradients; the paper's gates (``"gates"``), trained by
  the task loss and the regularizer, are the other choice (see ``MixedBitQuantizer``).
- The budget is a hard cap on everything sent, per element: before every frame the widths
  (shifted gates, or the exact allocation) take the largest mean code width that, with the
  frame's overhead (scales and bit map, ``overhead_bits``), stays within the scheduled budget
  (``BitBudget``: linear from ``start_bits`` down to ``target_bits`` over ``anneal_steps``
  steps). A 4-bit budget thus costs at most 1/8 of float32, and the traffic of a run is known
  in advance, whatever the allocation learns. The one exception is the floor: no channel goes
  below ``b_min``, so a budget under ``b_min`` plus a frame's overhead (2.13 bits on a frame of
  fewer than 515 tokens, with ``b_min = 2``) sends that frame at ``b_min`` plus its overhead.

Wire format (``ENCODING_AMAQ``), for N x C codes with widths summing to ``code_bits``:
``[bit map: C widths minus one, 3 bits each, when params map = "1"]``, then C minima and C steps
(float32), then for each width w = 1..8 the codes of the channels of that width, channel after
channel, N codes of w bits each. Its size is exactly ``ceil(3C/8)`` (map) + ``8C`` +
``ceil(N * code_bits / 8)`` bytes. The bit map is sent only when the widths differ from the
previous frame of the same stream; a receiver keeps the last widths (``decode(..., widths=)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fedtune.compression.base import Codec, CodecError, Encoded, check_params, choice_param, int_param, numel, register_codec
from fedtune.compression.bitpack import pack_segments, unpack_segments
from fedtune.compression.grid import zero_grid
from fedtune.protocol import fedtune_pb2 as pb

MAX_WIDTH = 8
MAP_BITS = 3  # a width 1..8 is sent as width - 1


def as_channels(shape: Sequence[int]) -> tuple[int, int]:
    """(rows N, channels C) of a tensor whose last dimension holds the channels."""
    if not shape:
        return 1, 1
    channels = int(shape[-1])
    return (numel(shape) // channels if channels else 0), channels


def overhead_bits(rows: int) -> float:
    """Bits per element an AMAQ frame of ``rows`` x C spends besides the codes: a float32 minimum
    and step per channel and, at most, a 3-bit width per channel."""
    return (64 + MAP_BITS) / max(rows, 1)


def quantize_channels(x: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, minima, steps) of ``x`` (N x C) at integer ``widths`` per channel, on a grid with
    zero as a level (``fedtune.compression.grid``); rounding to nearest, so every element is
    reconstructed within half its channel's step."""
    levels = (2.0 ** widths.to(x.dtype)) - 1
    low, step = zero_grid(x.min(dim=0).values, x.max(dim=0).values, levels)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((x - low) / safe).clamp_(min=0)
    codes = torch.minimum(codes, levels).where(step > 0, torch.zeros_like(codes))
    return codes.to(torch.int64), low, step


def dequantize_channels(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return low + codes.to(low.dtype) * step


@dataclass(frozen=True)
class AMAQOptions:
    bits: int = 4  # the width of every channel when the codec is used alone, without gates

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_WIDTH:
            raise ValueError(f"bits must be in 1..{MAX_WIDTH}, got {self.bits}")


@register_codec("amaq")
class AMAQ(Codec):
    """Per-channel mixed-width uniform quantization (see the module docstring for the format)."""

    encoding = pb.ENCODING_AMAQ
    Options = AMAQOptions
    biased = True

    def encode(self, tensor: torch.Tensor, key: str = "") -> Encoded:
        channels = as_channels(tuple(tensor.shape))[1]
        return self.encode_with(tensor, torch.full((channels,), self.options.bits, dtype=torch.int64), send_map=True)

    @staticmethod
    def encode_with(tensor: torch.Tensor, widths: torch.Tensor, send_map: bool) -> Encoded:
        """``tensor`` at the given per-channel ``widths`` (ints in 1..8); the bit map is in the
        payload only with ``send_map``."""
        n, c = as_channels(tuple(tensor.shape))
        widths = widths.to("cpu", torch.int64)
        if widths.shape != (c,) or (c and (int(widths.min()) < 1 or int(widths.max()) > MAX_WIDTH)):
            raise CodecError(f"AMAQ needs {c} widths in 1..{MAX_WIDTH}")
        x = tensor.detach().to("cpu", torch.float32).reshape(n, c)
        codes, low, step = quantize_channels(x, widths)
        return Encoded(AMAQ._payload(codes, low, step, widths, send_map), AMAQ._params(widths, send_map))

    @staticmethod
    def _params(widths: torch.Tensor, send_map: bool) -> dict[str, str]:
        return {"map": "1" if send_map else "0", "code_bits": str(int(widths.sum()))}

    @staticmethod
    def _payload(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, widths: torch.Tensor, send_map: bool) -> bytes:
        w = widths.numpy()
        segments = [((w - 1), MAP_BITS)] if send_map else []
        head = pack_segments(segments) if segments else b""
        codes_np = codes.numpy()
        groups = [(codes_np[:, w == width].T.reshape(-1), width) for width in range(1, MAX_WIDTH + 1) if (w == width).any()]
        scales = np.concatenate([low.numpy(), step.numpy()]).astype("<f4").tobytes()
        return head + scales + (pack_segments(groups) if groups else b"")

    @classmethod
    def _parse(cls, shape: Sequence[int], params: Mapping[str, str]) -> tuple[int, int, bool, int]:
        check_params(params, ("map", "code_bits"))
        n, c = as_channels(shape)
        send_map = choice_param(params, "map", ("0", "1")) == "1"
        code_bits = int_param(params, "code_bits", c, MAX_WIDTH * c)
        return n, c, send_map, code_bits

    @classmethod
    def payload_bytes(cls, shape: Sequence[int], params: Mapping[str, str]) -> int:
        n, c, send_map, code_bits = cls._parse(shape, params)
        return (math.ceil(MAP_BITS * c / 8) if send_map else 0) + 8 * c + math.ceil(n * code_bits / 8)

    @classmethod
    def read_widths(cls, payload, shape: Sequence[int], params: Mapping[str, str]) -> torch.Tensor | None:
        """The bit map of a payload that carries one, else None."""
        _, c, send_map, _ = cls._parse(shape, params)
        if not send_map:
            return None
        size = math.ceil(MAP_BITS * c / 8)
        return torch.from_numpy(unpack_segments(memoryview(payload)[:size], [(c, MAP_BITS)])[0] + 1)

    @classmethod
    def decode(cls, payload, shape, params, widths: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 tensor; ``widths`` are the stream's current widths, needed when the
        payload carries no bit map (a payload's own map wins)."""
        n, c, send_map, code_bits = cls._parse(shape, params)
        expected = cls.payload_bytes(shape, params)
        if len(payload) != expected:
            raise CodecError(f"AMAQ payload has {len(payload)} bytes, shape {list(shape)} with these parameters needs {expected}")
        view = memoryview(payload)
        offset = 0
        if send_map:
            widths = cls.read_widths(payload, shape, params)
            offset = math.ceil(MAP_BITS * c / 8)
        elif widths is None:
            raise CodecError("AMAQ payload without a bit map, and no widths from an earlier frame of this stream")
        widths = torch.as_tensor(widths, dtype=torch.int64)
        if widths.shape != (c,) or int(widths.sum()) != code_bits:
            raise CodecError(f"AMAQ widths sum to {int(widths.sum())} over {widths.numel()} channels; the header says {code_bits} over {c}")
        head = np.frombuffer(view[offset : offset + 8 * c], dtype="<f4").astype(np.float32)
        if not np.isfinite(head).all() or (head[c:] < 0).any():
            raise CodecError("AMAQ payload has a non-finite minimum or a negative step")
        w = widths.numpy()
        present = [width for width in range(1, MAX_WIDTH + 1) if (w == width).any()]
        layout = [(n * int((w == width).sum()), width) for width in present]
        blocks = unpack_segments(view[offset + 8 * c :], layout) if layout else []
        codes = np.zeros((n, c), dtype=np.int64)
        for width, block in zip(present, blocks):
            codes[:, w == width] = block.reshape(-1, n).T
        if (codes > (1 << w) - 1).any():  # cannot happen with packing, kept as a guard
            raise CodecError("AMAQ code outside its channel's width")
        low, step = torch.from_numpy(head[:c].copy()), torch.from_numpy(head[c:].copy())
        return dequantize_channels(torch.from_numpy(codes), low, step).reshape(tuple(shape))


# ---------------------------------------------------------------- trainable widths


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """What the receiver will decode from ``x`` (N x C) at ``round(bits)`` per channel, as a
    differentiable function: the gradient passes to ``x`` unchanged (straight through) and to
    ``bits`` through the quantization step (LSQ: ``d x_hat / d step = round(u) - u``)."""
    return _fake_quantize(x, bits, *torch.aminmax(x.detach(), dim=0))[0]


def _fake_quantize(x: torch.Tensor, bits: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat, codes, grid minima, steps) from the channels' precomputed ``low`` and ``high``:
    one pass gives the sender's differentiable view and the codes the wire carries."""
    b = _round_ste(bits)
    levels = 2.0**b - 1
    grid_low, grid_step = zero_grid(low, high, levels.detach())
    step = grid_step * (levels.detach() / levels)  # its value, with the min-max step's gradient to the bits
    safe = torch.where(grid_step > 0, grid_step, torch.ones_like(grid_step))
    u = (x.detach() - grid_low) / safe
    codes = torch.minimum(torch.round(u).clamp_(min=0), levels.detach())
    decoded = grid_low + codes * grid_step  # what the receiver computes, to the last bit
    x_hat = decoded + (x - x.detach()) + (step - step.detach()) * (codes - u)
    return torch.where(grid_step > 0, x_hat, x), codes, grid_low, grid_step


class BitGates(torch.nn.Module):
    """Per-channel gates ``Q``; ``bits()`` is ``b_min + (b_max - b_min) * sigmoid(alpha * Q)``."""

    def __init__(self, channels: int, b_min: int = 2, b_max: int = 8, alpha: float = 1.0, init_bits: float | None = None) -> None:
        super().__init__()
        if not 1 <= b_min < b_max <= MAX_WIDTH:
            raise ValueError(f"need 1 <= b_min < b_max <= {MAX_WIDTH}, got {b_min}, {b_max}")
        self.b_min, self.b_max, self.alpha = b_min, b_max, alpha
        start = b_max - 0.25 if init_bits is None else min(max(init_bits, b_min + 0.01), b_max - 0.01)
        p = (start - b_min) / (b_max - b_min)
        self.gate = torch.nn.Parameter(torch.full((channels,), math.log(p / (1 - p)) / alpha))
        self.register_buffer("importance", torch.ones(channels))

    def bits(self) -> torch.Tensor:
        return self.b_min + (self.b_max - self.b_min) * torch.sigmoid(self.alpha * self.gate)

    def widths(self) -> torch.Tensor:
        """The integer widths that go on the wire."""
        with torch.no_grad():
            return torch.round(self.bits()).to(torch.int64).clamp_(self.b_min, self.b_max)

    @torch.no_grad()
    def observe(self, grad: torch.Tensor, momentum: float = 0.9) -> None:
        """Update the feature-wise importance from a gradient (N x C) that reached the channels."""
        g2 = grad.detach().float().pow(2).mean(dim=0)
        g2 = g2 / g2.mean().clamp_min(1e-30)
        self.importance.mul_(momentum).add_((1 - momentum) * g2)

    def regularizer(self, x: torch.Tensor, weight: float, layer_weight: float = 1.0) -> torch.Tensor:
        """The bit regularization for quantizing ``x`` (N x C); see the module docstring."""
        low, high = torch.aminmax(x.detach(), dim=0)
        return self.regularizer_of_span(high - low, weight, layer_weight)

    def regularizer_of_span(self, span: torch.Tensor, weight: float, layer_weight: float = 1.0) -> torch.Tensor:
        """The same, from the channels' ranges."""
        cost = self.importance * span.pow(2)
        bits = self.bits()
        error = (cost / (2.0**bits - 1).pow(2) / 12).sum() / cost.sum().clamp_min(1e-30)
        return layer_weight * (error + weight * bits.mean())

    @torch.no_grad()
    def cap(self, budget: float) -> None:
        """Shift every gate by one common offset so that the mean wire width is the largest one
        at most ``budget``. The relative allocation the gates learned is kept; the level is the
        budget's, up as well as down, so no frame wastes its budget and a short batch (more
        overhead per element) does not leave the gates low.

        The mean width only grows with the offset, so the search brackets the largest offset
        that fits: each pass evaluates 64 offsets at once and narrows the bracket 64-fold, four
        passes resolve it to 80 / 64**4 / alpha (a bisection needs 24 one-offset steps, each a
        handful of tiny tensor operations: the pass costs about as much as one of them)."""
        base = self.gate.detach().clone()
        lo, hi = -40.0 / self.alpha, 40.0 / self.alpha
        for _ in range(4):
            offsets = torch.linspace(lo, hi, 65, dtype=base.dtype)
            bits = self.b_min + (self.b_max - self.b_min) * torch.sigmoid(self.alpha * (base[None, :] + offsets[:, None]))
            fits = torch.round(bits).clamp_(self.b_min, self.b_max).mean(dim=1) <= budget
            if not bool(fits[0]):  # not even the lowest offset fits: every channel at b_min
                break
            best = int(fits.nonzero().max())
            lo, hi = float(offsets[best]), float(offsets[min(best + 1, 64)])
            if best == 64:
                break
        self.gate.copy_(base + lo)


def water_fill(cost: torch.Tensor, mean_bits: float, b_min: int = 2, b_max: int = MAX_WIDTH) -> torch.Tensor:
    """Integer widths in [b_min, b_max], averaging at most ``mean_bits``, that minimize
    ``sum_c cost_c / (2**w_c - 1)**2`` (the bit regularizer's error term, ``cost = I * span**2``).

    Each channel's cost falls convexly with its width, so the bits above ``b_min`` go to the
    largest marginal gains over all channels and widths at once: a channel's gains shrink with
    every bit it already has, so the chosen ones form a prefix of each channel's, and the result
    is the exact optimum (reverse water-filling in whole bits)."""
    channels = cost.numel()
    widths = torch.full((channels,), b_min, dtype=torch.int64)
    spare = min(int(math.floor(mean_bits * channels + 1e-6)) - b_min * channels, (b_max - b_min) * channels)
    if spare <= 0 or channels == 0:
        return widths
    w = torch.arange(b_min, b_max, dtype=torch.float64)
    error = lambda bits: 1.0 / (2.0**bits - 1) ** 2  # noqa: E731
    gains = cost.detach().double().reshape(-1, 1) * (error(w) - error(w + 1))  # C x (b_max - b_min), falling along each row
    chosen = torch.topk(gains.reshape(-1), spare).indices // (b_max - b_min)
    return widths + torch.bincount(chosen, minlength=channels).cpu()


@dataclass(frozen=True)
class BitBudget:
    """The mean-width budget at a training step: ``start_bits`` falling linearly to
    ``target_bits`` over ``anneal_steps`` steps (AMAQ's progressive compression)."""

    start_bits: float = 8.0
    target_bits: float = 4.0
    anneal_steps: int = 100

    def at(self, step: int) -> float:
        if self.anneal_steps <= 0 or step >= self.anneal_steps:
            return self.target_bits
        return self.start_bits + (self.target_bits - self.start_bits) * step / self.anneal_steps


ALLOCATIONS = ("exact", "gates")


class MixedBitQuantizer:
    """One direction of one split stream: how its widths are chosen and the budget schedule.

    ``quantize(x, step)`` gives the differentiable ``x_hat`` (for the sender's own backward) and
    the wire encoding; ``learn(x)`` updates the allocation once the gradient of ``x_hat`` is known
    (for activations) or on the reconstruction objective alone (for gradients).

    ``allocation``:

    - ``"exact"`` (the default): each frame's widths are the exact minimizer of the bit
      regularizer's error term at the budget (``water_fill`` of ``importance * span**2``), the
      importance learned from the gradients that come back. No learning rate, no gate drift.
    - ``"gates"``: the paper's trainable gates, stepped by Adam on the task loss (through the
      quantizer's step) plus the bit regularization, then shifted to the budget.

    The two optimize different things (bench/amaq_allocation.py measures both on a model's own
    activations): the exact allocation the regularizer's second-order error, which on MiniLM it
    cuts below uniform's; the gates mostly the task loss's first-order response to the rounding,
    which they learn to make negative while their second-order error grows to about twice
    uniform's. Which trains the better model is bench/split.py's question.
    """

    def __init__(self, channels: int, budget: BitBudget, *, b_min: int = 2, b_max: int = 8, lr: float = 0.05,
                 weight: float = 0.01, layer_weight: float = 1.0, allocation: str = "exact") -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown AMAQ allocation {allocation!r} (valid: {', '.join(ALLOCATIONS)})")
        self.allocation = allocation
        self.gates = BitGates(channels, b_min, b_max, init_bits=min(budget.start_bits, b_max - 0.25))
        self.budget = budget
        self.weight, self.layer_weight = weight, layer_weight
        self.optimizer = torch.optim.Adam(self.gates.parameters(), lr=lr)
        self._sent: torch.Tensor | None = None  # the widths of the last frame sent
        self._span: torch.Tensor | None = None  # the channel ranges of the last frame quantized

    def quantize(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Encoded, torch.Tensor]:
        """(x_hat with gradients to x and the gates, the wire encoding, the widths used)."""
        n, c = as_channels(tuple(x.shape))
        flat = x.reshape(n, c)
        low, high = torch.aminmax(flat.detach(), dim=0)
        self._span = high - low  # for learn(): the same frame's ranges
        budget = self.budget.at(step) - overhead_bits(n)
        if self.allocation == "exact":
            cost = self.gates.importance.to(self._span.device) * self._span.float().pow(2)
            widths = water_fill(cost, budget, self.gates.b_min, self.gates.b_max).to(x.device)
            bits = widths.to(flat.dtype)
        else:
            self.gates.cap(budget)
            widths = self.gates.widths()
            bits = self.gates.bits()
        x_hat, codes, grid_low, grid_step = _fake_quantize(flat, bits, low, high)
        send_map = self._sent is None or not torch.equal(widths, self._sent)
        self._sent = widths
        payload = AMAQ._payload(codes.to("cpu", torch.int64), grid_low.cpu(), grid_step.cpu(), widths.cpu(), send_map)
        encoded = Encoded(payload, AMAQ._params(widths, send_map))
        return x_hat.reshape(x.shape), encoded, widths

    def learn(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """One gate step: the gates' gradient from the task (already accumulated by the
        caller's backward through ``x_hat``), plus the bit regularization."""
        n, c = as_channels(tuple(x.shape))
        if grad is not None:
            self.gates.observe(grad.reshape(n, c))
        if self.allocation == "exact":  # the importance is all it learns
            self._span = None
            return
        span = self._span if self._span is not None and self._span.shape == (c,) else None
        if span is None:
            low, high = torch.aminmax(x.detach().reshape(n, c).float(), dim=0)
            span = high - low
        self._span = None
        self.gates.regularizer_of_span(span, self.weight, self.layer_weight).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
