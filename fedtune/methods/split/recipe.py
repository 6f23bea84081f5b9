"""Split learning, the device's half (SplitFed): the client runs the embeddings and blocks
``[0, cut)`` with their LoRA, streams the activations at the cut to the coordinator every step
and backpropagates the gradient it gets back. In the U-shaped split (``head = "client"``, the
default) it also runs the head: the coordinator returns the activations after the last block,
the client computes the loss and sends their gradient, so labels never leave the device.

The options (``SplitOptions``, in fedtune.methods.split.options) are shared with the
coordinator's half (fedtune.split.server), which reads them from the same task options. The
agent gives the recipe its ``link`` (a gRPC stream, or an in-process server half in tests)
before ``run``; the update sent at the end holds the client's tensors only.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import torch

from fedtune.adapters import adapter_parameters
from fedtune.adapters.lora import AdapterPlan
from fedtune.client.recipes.base import RECIPES, Recipe, TrainSettings
from fedtune.methods.split.options import SplitOptions
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import ProtocolError, encode_tensor
from fedtune.rng import derive_seed, step_seed, thread_draws
from fedtune.split.segments import anatomy, below_cut, bottom_forward, client_side, top_forward
from fedtune.split.wire import Sender, check_rows, scatter
from fedtune.tasks import EncodedExample, Task
from fedtune.tasks.base import sample_batches


@RECIPES.register("split")
class SplitRecipe(Recipe):
    name = "split"
    Options = SplitOptions

    link = None  # set by the agent: an object with exchange(header, tensors) -> (header, tensors)

    def bottom_plan(self, plan: AdapterPlan) -> tuple[int, AdapterPlan]:
        """(blocks the device must hold, the LoRA plan over them): the blocks below the cut,
        with the plan's LoRA there. (0, plan), the whole model, when the plan puts no LoRA
        below the cut: the device then trains the head alone and an empty layer list would
        mean "every block" to peft."""
        cut = self.options.cut
        layers = tuple(i for i in plan.layers if i < cut)
        if plan.layers and not layers:
            return 0, plan
        ranks = {i: r for i, r in plan.rank_per_layer.items() if i < cut}
        return cut, dataclasses.replace(plan, layers=layers, rank_per_layer=ranks)

    def run(self, model, start, extras, task, items, settings, pad_id, device="cpu", eval_items=()):
        if self.link is None:
            raise RuntimeError("split training needs a link to the coordinator's half")
        o = self.options
        if anatomy(model).num_blocks <= o.cut:  # a device model without the blocks above its cut
            start = {k: v for k, v in start.items() if below_cut(k, o.cut)}
        send, metrics = super().run(model, start, extras, task, items, settings, pad_id, device, eval_items)
        return {k: v for k, v in send.items() if client_side(k, o.cut, o.head_on_client)}, metrics

    def train(self, model: torch.nn.Module, task: Task, items: Sequence[EncodedExample], settings: TrainSettings, pad_id: int, device: torch.device) -> dict[str, float]:
        o = self.options
        model.train()
        params = [p for n, p in adapter_parameters(model).items() if client_side(n, o.cut, o.head_on_client)]
        if not params:
            raise ValueError(f"no trainable adapter tensors on the client's side of cut {o.cut}")
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        blocks = anatomy(model).num_blocks
        up_act = Sender(o.direction("act"))
        up_grad = Sender(o.direction("grad"))
        order = torch.Generator().manual_seed(settings.seed)
        losses: list[float] = []
        compute = 0.0
        server = 0.0
        round_trips = 0.0
        for i, batch in enumerate(sample_batches(items, settings.local_steps, settings.batch_size, order)):
            step = o.step0 + i
            t0 = time.perf_counter()
            inputs = {k: v.to(device) for k, v in task.collate(batch, pad_id).items()}
            mask = inputs["attention_mask"].bool()
            optimizer.zero_grad(set_to_none=True)
            with thread_draws(step_seed(settings.seed, step)):  # this step's own dropout masks
                hidden = bottom_forward(model, inputs, o.cut)
            rows = hidden[mask]
            rows_hat, wire = up_act.send("hidden", rows, step)
            tensors = [wire, encode_tensor("mask", mask.to("cpu", torch.uint8))]
            if not o.head_on_client:
                tensors.append(encode_tensor("labels", inputs["labels"].cpu()))
            compute += time.perf_counter() - t0
            t1 = time.perf_counter()
            reply, got = self.link.exchange(pb.SplitHeader(step=step, kind=pb.SPLIT_KIND_ACTIVATIONS), tensors)
            round_trips += time.perf_counter() - t1
            server += reply.metrics.get("server_seconds", 0.0)
            t2 = time.perf_counter()
            if o.head_on_client:
                top_rows = _rows(got, "hidden", mask, rows.shape[1], pb.SPLIT_KIND_ACTIVATIONS, reply)
                top = scatter(top_rows.to(device, rows.dtype), mask).requires_grad_(True)
                with thread_draws(derive_seed(settings.seed, "top", step)):
                    loss = self.output_loss(top_forward(model, top, inputs["attention_mask"], inputs["labels"], blocks, pad_id), inputs["labels"])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()}; lower the learning rate")
                loss.backward()
                top_grad = top.grad[mask]
                _, gwire = up_grad.send("grad", top_grad, step)
                up_grad.learn(top_grad, None)
                compute += time.perf_counter() - t2
                t3 = time.perf_counter()
                reply, got = self.link.exchange(pb.SplitHeader(step=step, kind=pb.SPLIT_KIND_GRADIENTS), [gwire])
                round_trips += time.perf_counter() - t3
                server += reply.metrics.get("server_seconds", 0.0)
                t2 = time.perf_counter()
                value = loss.item()
            else:
                value = float(reply.metrics.get("loss", float("nan")))
                if not torch.isfinite(torch.tensor(value)):
                    raise FloatingPointError(f"the coordinator's loss became {value}; lower the learning rate")
            grad = _rows(got, "grad", mask, rows.shape[1], pb.SPLIT_KIND_GRADIENTS, reply).to(device, rows.dtype)
            rows_hat.backward(grad)
            extra = self.penalty(model)  # a correction's term on the device's own tensors (FedProx)
            if extra is not None:
                extra.backward()
            self.after_backward(model)
            up_act.learn(rows, grad)
            optimizer.step()
            compute += time.perf_counter() - t2
            losses.append(value)
        model.eval()
        self.step_losses = losses
        n = max(len(losses), 1)
        link = self.link
        codec = up_act.encode_seconds + up_grad.encode_seconds + getattr(link, "decode_seconds", 0.0)
        metrics = {
            "train_loss": sum(losses) / n, "steps": float(len(losses)),
            "split_client_ms": 1000 * (compute - codec) / n, "split_server_ms": 1000 * server / n,
            "split_wire_ms": 1000 * max(round_trips - server, 0.0) / n, "split_codec_ms": 1000 * codec / n,
            "split_bytes_up_per_step": link.bytes_up / n, "split_bytes_down_per_step": link.bytes_down / n,
            "split_bits_up": up_act.last_bits if not o.head_on_client else (up_act.last_bits + up_grad.last_bits) / 2,
            "split_cut": float(o.cut),
        }
        if link.bits_down:
            metrics["split_bits_down"] = link.bits_down
        return metrics


def _rows(got: Mapping[str, torch.Tensor], name: str, mask: torch.Tensor, channels: int, kind: int, reply: pb.SplitHeader) -> torch.Tensor:
    """The coordinator's reply tensor ``name``, checked against the batch it answers."""
    if reply.kind != kind or set(got) != {name}:
        raise ProtocolError(f"the coordinator answered with {pb.SplitKind.Name(reply.kind)} {sorted(got)}, expected {pb.SplitKind.Name(kind)} [{name!r}]")
    check_rows(got[name], mask, channels, f"the coordinator's {name}")
    return got[name]
