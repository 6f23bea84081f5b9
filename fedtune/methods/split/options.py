"""The split's options, shared by both halves: the device's recipe (``recipe.py``) and the
coordinator's half (``fedtune.split.server``) read the same task options into ``SplitOptions``;
the SplitFed wrapper (``strategy.py``) is configured by ``SplitFedOptions`` (the ``[split]``
table), writes ``SplitOptions``' fields into each instruction and checks them at start.
``DirectionCodec`` says how one direction of the stream is compressed (``fedtune.split.wire``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.contract.local_options import LocalOptions
from fedtune.options import MethodOptions

SPLIT_CODECS = ("fp32", "fp16", "bf16", "uniform", "amaq")
# How AMAQ chooses each channel's width (fedtune.compression.amaq.MixedBitQuantizer): the exact
# minimizer of its bit regularizer at the budget, or the paper's trainable gates.
AMAQ_ALLOCATIONS = ("exact", "gates")


@dataclass(frozen=True)
class DirectionCodec:
    """How one direction is compressed. ``bits``: uniform's width, AMAQ's target mean width."""

    codec: str = "amaq"
    bits: float = 4.0
    start_bits: float = 8.0
    anneal_steps: int = 0          # AMAQ: steps from start_bits to bits (0: no annealing)
    b_min: int = 2
    b_max: int = 8
    reg_weight: float = 0.01       # AMAQ: weight of the mean width in the bit regularization
    layer_weight: float = 1.0      # AMAQ: layer-wise importance of this cut
    gate_lr: float = 0.05
    anneal_uniform: bool = False   # uniform: follow the same schedule, start_bits down to bits
    allocation: str = "exact"      # AMAQ: how widths are chosen, "exact" or the paper's "gates"

    def __post_init__(self) -> None:
        if self.codec not in SPLIT_CODECS:
            raise ValueError(f"unknown split codec {self.codec!r} (valid: {', '.join(SPLIT_CODECS)})")
        if self.codec == "uniform" and (self.bits != int(self.bits) or not 1 <= self.bits <= 8):
            raise ValueError(f"uniform needs whole bits in 1..8, got {self.bits}")
        if self.allocation not in AMAQ_ALLOCATIONS:
            raise ValueError(f"unknown AMAQ allocation {self.allocation!r} (valid: {', '.join(AMAQ_ALLOCATIONS)})")
        if self.codec == "amaq" and not self.b_min <= self.bits <= self.start_bits <= self.b_max:
            raise ValueError(f"amaq needs b_min <= bits <= start_bits <= b_max, got {self.b_min}, {self.bits}, {self.start_bits}, {self.b_max}")

    @property
    def lossless(self) -> bool:
        return self.codec == "fp32"


HEAD_PLACES = ("client", "server")


@dataclass(frozen=True)
class SplitStream(MethodOptions):
    """Where the head runs and how each direction of the stream is compressed: the settings of
    the ``[split]`` table (``fedtune.config.SplitSection`` takes these fields), which the SplitFed
    wrapper (``SplitFedOptions``) hands on to every split task (``SplitOptions``)."""

    # "client": U-shaped split, the client also runs the head, so labels never leave the device
    # (two round trips per step). "server": the coordinator runs the head; labels travel with
    # the activations.
    head: str = "client"
    # Codec of each direction: fp32, fp16, bf16, uniform (bits) or amaq (bits = mean budget).
    act_codec: str = "amaq"
    act_bits: float = 4.0
    grad_codec: str = "amaq"
    grad_bits: float = 4.0
    # AMAQ: the budget falls from start_bits to the bits above over anneal_steps steps (0: half
    # of the run's steps); reg_weight weighs the mean width in the bit regularization, gate_lr
    # is the step size of the gates that choose each channel's width.
    start_bits: float = 8.0
    anneal_steps: int = 0
    reg_weight: float = 0.01
    gate_lr: float = 0.05
    # Uniform follows AMAQ's schedule too (its width the widest whole number of bits within the
    # budget at each step): the control that tells AMAQ's schedule from its mixed widths.
    anneal_uniform: bool = False
    # AMAQ's widths: "exact" (the bit regularizer's minimizer at the budget, each frame) or
    # "gates" (the paper's gates, trained by the task loss and the regularizer).
    amaq_allocation: str = "exact"
    # AMAQ: the narrowest and the widest width a channel may get.
    b_min: int = 2
    b_max: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEAD_PLACES:
            raise ValueError(f"head must be one of {HEAD_PLACES}, got {self.head!r}")
        self.direction("act"), self.direction("grad")  # each checks its codec and widths

    def direction(self, prefix: str) -> DirectionCodec:
        """The codec settings of activations (``act``) or gradients (``grad``)."""
        codec, bits = getattr(self, f"{prefix}_codec"), getattr(self, f"{prefix}_bits")
        start = max(self.start_bits, bits) if codec in ("amaq", "uniform") else self.start_bits
        try:
            return DirectionCodec(codec, bits, start, self.anneal_steps, self.b_min, self.b_max, self.reg_weight, 1.0,
                                  self.gate_lr, self.anneal_uniform and codec == "uniform", self.amaq_allocation)
        except ValueError as exc:
            raise ValueError(f"{prefix}_codec {codec}: {exc}") from None


@dataclass(frozen=True)
class SplitOptions(LocalOptions, SplitStream):
    recipe: str = "split"
    # The client runs the embeddings and blocks [0, cut); the coordinator blocks [cut, L).
    cut: int = 0
    # The first step of this round in the whole run (AMAQ's budget schedule counts from it).
    step0: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cut < 1:
            raise ValueError(f"cut must be a block index of at least 1, got {self.cut}")
        if self.keep or self.dp_clip:
            raise ValueError("split training does not combine with keep (FedSA) or sample-level DP")

    @property
    def head_on_client(self) -> bool:
        return self.head == "client"


@dataclass(frozen=True)
class SplitFedOptions(SplitStream):
    cut: int = 1
    local_steps: int = 1          # to number steps across rounds (AMAQ's schedule)
