"""The coordinator's half of split learning: one ``ServerHalf`` per client session.

How several clients are served at once: each session gets its own copy of the server-side
adapter (the round's global adapter), trained only by that client's steps; when the client
pushes its bottom half, the copy's tensors complete its update, and the round's strategy
averages whole adapters as in federated mode (SplitFed-V1). The alternative
(``split.server_adapter = "shared"``, SplitFed-V2) is one copy per round stepped by every
client in turn: a session holds the round's step lock from its activations to the end of that
step (in the U-shaped split across the client's head computation and a second round trip),
so the clients' steps serialize and the result depends on their arrival order; each client's
update then carries the shared copy as it stood when the client pushed. Copies cost one
adapter per session (the frozen base weights are shared, fedtune.models.ModelStore) and let
sessions run in parallel; bench/split.py measures both (rows ``amaq4`` and ``amaq4-shared``).
With a shared copy, the steps of a session that ends early (a bad frame, a client gone) stay in
it: they were applied to the copy every client steps, and cannot be taken out of it; the round's
``split_steps`` counts only the steps of sessions whose update was accepted.

Steps are bounded: an honest device runs exactly ``training.local_steps`` steps a round (the split
recipe's loop; its evaluation runs on the device and never crosses the link), each opened by one
activations message. ``step_limit`` is that number, counted per client and round across the
client's sessions (fedtune.coordinator.split_sessions carries the count from a session that
ended to the next): the activations message that would start one more step is refused with
FAILED_PRECONDITION before anything is computed for it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Mapping

import torch

from fedtune.adapters import adapter_parameters, adapter_state
from fedtune.contract.errors import CoordinatorError
from fedtune.methods.split.options import SplitOptions
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import EncodedTensor, ProtocolError
from fedtune.split.segments import anatomy, client_side, middle_forward, top_forward
from fedtune.split.wire import Sender, check_rows, scatter

STEP_LOCK_WAIT_SECONDS = 300.0  # shared server adapter: longest wait for another client's step


class ServerHalf:
    """Runs blocks ``[cut, L)`` (and the head in the plain split) for one client's session."""

    def __init__(self, model: torch.nn.Module, options: SplitOptions, learning_rate: float, weight_decay: float, pad_id: int, device: str = "cpu",
                 step_lock: threading.Lock | None = None, step_limit: int | None = None, steps_started: int = 0) -> None:
        """``step_limit``: the steps the client may start in the round, its earlier sessions'
        ``steps_started`` included (None: no bound, for in-process use such as tests, where the
        caller is the device itself; the coordinator always sets it)."""
        self.model, self.options, self.pad_id = model, options, pad_id
        if step_limit is not None and step_limit < 1:
            raise ValueError(f"step_limit must be at least 1, got {step_limit}")
        self.step_limit = step_limit
        self.started = steps_started  # steps the client started in this round (every session)
        # Shared server adapter: the lock this session holds for the length of one step.
        self.step_lock, self._holding = step_lock, False
        self.device = torch.device(device)
        self.blocks = anatomy(model).num_blocks
        if not 1 <= options.cut < self.blocks:
            raise ProtocolError(f"cut layer {options.cut} must leave at least one block on each side (the model has {self.blocks})")
        self.channels = int(model.get_base_model().config.hidden_size)
        # Dropout stays off on the coordinator's blocks, which run on gRPC threads that no
        # per-step generator (fedtune.rng.thread_draws) covers: their draws would come from the
        # process-wide generator that every session shares, so steps would depend on how sessions
        # interleave. The device's blocks keep their dropout, seeded per step (the split recipe).
        model.to(self.device).eval()
        self.params = [p for n, p in adapter_parameters(model).items() if not client_side(n, options.cut, options.head_on_client)]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay) if self.params else None
        self.down_act = Sender(options.direction("act"))
        self.down_grad = Sender(options.direction("grad"))
        self._pending: tuple | None = None  # U-shaped: the step between its two messages
        self.steps = 0

    def admit(self, header: pb.SplitHeader) -> None:
        """Refuse (CoordinatorError FAILED_PRECONDITION) a message that would start a step past
        ``step_limit``. Only reads the header: a caller may call it before reading the message's
        tensors, and ``handle`` calls it before anything else."""
        if header.kind == pb.SPLIT_KIND_ACTIVATIONS and self._pending is None and self.step_limit is not None and self.started >= self.step_limit:
            raise CoordinatorError("FAILED_PRECONDITION", f"step {header.step} refused: over the split step limit, at most {self.step_limit} steps "
                                                          f"per client and round (training.local_steps), all started already")

    def handle(self, header: pb.SplitHeader, tensors: Mapping[str, torch.Tensor]) -> tuple[pb.SplitHeader, list[EncodedTensor]]:
        """Answer one message of the client; ProtocolError for anything that does not fit,
        CoordinatorError for a step over the limit (``admit``)."""
        self.admit(header)
        started = time.perf_counter()
        try:
            if header.kind == pb.SPLIT_KIND_ACTIVATIONS:
                if self._pending is None:
                    self._lock_step()
                    self.started += 1  # counted once started: a step that fails still cost its work
                kind, out, metrics = self._activations(header.step, tensors)
            elif header.kind == pb.SPLIT_KIND_GRADIENTS:
                kind, out, metrics = self._gradients(header.step, tensors)
            else:
                raise ProtocolError(f"unexpected split message kind {header.kind}")
        except ProtocolError:
            self.close()
            raise
        except (RuntimeError, IndexError, ValueError) as exc:  # the model refused the inputs
            self.close()
            raise ProtocolError(f"step {header.step}: the inputs do not fit the model: {str(exc)[:200]}") from None
        if self._pending is None:  # the step is complete
            self._unlock_step()
        return pb.SplitHeader(step=header.step, kind=kind, metrics={**metrics, "server_seconds": time.perf_counter() - started}), out

    def _inputs(self, tensors: Mapping[str, torch.Tensor], names: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if set(tensors) != names:
            raise ProtocolError(f"activations message has tensors {sorted(tensors)}, expected {sorted(names)}")
        mask = tensors["mask"]
        # Its size is bounded before it is read, by the session's SplitAllowance (the run's batch
        # size x max length, fedtune.split.wire): here only its form and values.
        if mask.dim() != 2 or mask.dtype != torch.uint8 or ((mask != 0) & (mask != 1)).any():
            raise ProtocolError(f"the mask must be a batch x length uint8 matrix of 0 and 1, got {list(mask.shape)} {mask.dtype}")
        mask = mask.bool().to(self.device)
        check_rows(tensors["hidden"], mask, self.channels, "hidden")
        return tensors["hidden"].to(self.device), mask

    def _activations(self, step: int, tensors: Mapping[str, torch.Tensor]):
        if self._pending is not None:
            raise ProtocolError(f"step {step}: activations arrived while step {self._pending[0]} waits for its gradient")
        o = self.options
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if o.head_on_client:
            rows, mask = self._inputs(tensors, {"hidden", "mask"})
            h = scatter(rows, mask).requires_grad_(True)
            top = middle_forward(self.model, h, mask.long(), o.cut, self.pad_id)[mask]
            top_hat, wire = self.down_act.send("hidden", top, step)
            self._pending = (step, h, mask, top, top_hat)
            return pb.SPLIT_KIND_ACTIVATIONS, [wire], {"bits": self.down_act.last_bits}
        rows, mask = self._inputs(tensors, {"hidden", "mask", "labels"})
        h = scatter(rows, mask).requires_grad_(True)
        labels = tensors["labels"].to(self.device)
        if labels.dtype != torch.int64 or labels.shape[0] != mask.shape[0]:
            raise ProtocolError(f"labels must be int64 with one row per example, got {list(labels.shape)} {labels.dtype}")
        loss = top_forward(self.model, h, mask.long(), labels, o.cut, self.pad_id).loss
        value = loss.item()
        if not math.isfinite(value):
            raise ProtocolError(f"step {step}: the loss is {value}")
        loss.backward()
        wire = self._send_gradient(step, h, mask)
        self.steps += 1
        return pb.SPLIT_KIND_GRADIENTS, [wire], {"loss": value, "bits": self.down_grad.last_bits}

    def _gradients(self, step: int, tensors: Mapping[str, torch.Tensor]):
        if self._pending is None or self._pending[0] != step:
            raise ProtocolError(f"step {step}: a gradient for activations never sent")
        _, h, mask, top, top_hat = self._pending
        if set(tensors) != {"grad"}:
            raise ProtocolError(f"gradients message has tensors {sorted(tensors)}, expected ['grad']")
        check_rows(tensors["grad"], mask, self.channels, "grad")
        grad = tensors["grad"].to(self.device, top_hat.dtype)
        top_hat.backward(grad)
        self.down_act.learn(top, grad)
        wire = self._send_gradient(step, h, mask)
        self._pending = None
        self.steps += 1
        return pb.SPLIT_KIND_GRADIENTS, [wire], {"bits": self.down_grad.last_bits}

    def _send_gradient(self, step: int, h: torch.Tensor, mask: torch.Tensor) -> EncodedTensor:
        grad = h.grad[mask]
        _, wire = self.down_grad.send("grad", grad, step)
        self.down_grad.learn(grad, None)
        if self.optimizer is not None:
            self.optimizer.step()
        return wire

    def _lock_step(self) -> None:
        if self.step_lock is None or self._holding:
            return
        if not self.step_lock.acquire(timeout=STEP_LOCK_WAIT_SECONDS):
            raise CoordinatorError("UNAVAILABLE", f"the shared server adapter stayed busy for {STEP_LOCK_WAIT_SECONDS:.0f} s")
        self._holding = True

    def _unlock_step(self) -> None:
        if self._holding:
            self._holding = False
            self.step_lock.release()

    def close(self) -> None:
        """End the session's part in the round: drop a half-done step and free the step lock."""
        self._pending = None
        self._unlock_step()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The server-side part of the client's adapter, as trained in this session (with a
        shared server adapter: as it stands between two steps, copied under the step lock so
        that another client's optimizer step is never read half done)."""
        o = self.options
        self._lock_step()
        try:
            state = adapter_state(self.model)
        finally:
            self._unlock_step()
        return {k: v for k, v in state.items() if not client_side(k, o.cut, o.head_on_client)}
