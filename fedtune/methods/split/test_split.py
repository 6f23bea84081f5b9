"""Split learning on tiny models built from configs: the split is exact (a lossless codec
reproduces ordinary training step for step, plain and U-shaped), lossy codecs still learn, and
the coordinator's half refuses frames that do not fit."""

import copy

import pytest
import torch

from fedtune.adapters import AdapterPlan, adapter_state, inject_lora
from fedtune.client.recipes import TrainSettings, make_recipe
from fedtune.methods.split.options import DirectionCodec, SplitOptions
from fedtune.protocol import fedtune_pb2 as pb
from fedtune.protocol.tensors import ProtocolError, encode_tensor
from fedtune.split.link import LocalLink
from fedtune.split.segments import SplitError, anatomy, check_cut, client_side, keep_bottom
from fedtune.split.server import ServerHalf
from fedtune.split.wire import Sender, uniform_width
from fedtune.tasks import get_task
from fedtune.tasks.base import EncodedExample

PAD = 0


def bert(blocks=4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=blocks, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval(), "seq-cls"


def llama(blocks=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=blocks, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=PAD, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), "causal-lm"


def data(task: str, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(1, 120, (length,), generator=g).tolist()
        target = sum(ids) % 3 if task == "seq-cls" else ids
        items.append(EncodedExample(ids, target))
    return items


def adapted(factory, plan):
    base, task = factory()
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    return inject_lora(base, plan, task), task


PLAN = AdapterPlan(rank=4, alpha=8, target_modules=("query", "value", "q_proj", "v_proj"))
SETTINGS = TrainSettings(local_steps=6, batch_size=8, learning_rate=5e-3, seed=3)


def run_both(factory, options: dict, settings=SETTINGS, bottom_only=False):
    """(local recipe, split recipe, local result, what the split client sent, the server half,
    the split metrics) from the same start. ``bottom_only``: the device's model holds only the
    blocks below its cut, as the agent builds it."""
    plan = PLAN if factory is llama else AdapterPlan(rank=4, alpha=8, target_modules=("query", "value"), modules_to_save=("classifier",))
    whole, task_name = adapted(factory, plan)
    start = adapter_state(whole)
    client, server_model = copy.deepcopy(whole), copy.deepcopy(whole)
    task = get_task(task_name)
    items = data(task_name)
    local = make_recipe({"recipe": "local"}, {})
    reference, _ = local.run(whole, start, {}, task, items, settings, PAD)
    split_options = make_recipe({"recipe": "split", **options}, {})
    if bottom_only:
        base, _ = factory()
        for p in base.parameters():
            p.requires_grad_(False)
        blocks, bottom_plan = split_options.bottom_plan(plan)
        client = inject_lora(keep_bottom(base, blocks), bottom_plan, task_name)
        assert anatomy(client).num_blocks == blocks == int(options["cut"]) < anatomy(whole).num_blocks
    server = ServerHalf(server_model, split_options.options, settings.learning_rate, settings.weight_decay, PAD)
    split_options.link = LocalLink(server)
    sent, metrics = split_options.run(client, start, {}, task, items, settings, PAD)
    return local, split_options, reference, sent, server, metrics


@pytest.mark.parametrize("factory", [bert, llama], ids=["bert-seq-cls", "llama-causal-lm"])
@pytest.mark.parametrize("head", ["server", "client"], ids=["plain", "u-shaped"])
@pytest.mark.parametrize("bottom_only", [False, True], ids=["device-whole", "device-bottom"])
def test_lossless_split_reproduces_ordinary_training_step_for_step(factory, head, bottom_only):
    options = {"cut": "2", "head": head, "act_codec": "fp32", "grad_codec": "fp32"}
    local, split, reference, sent, server, metrics = run_both(factory, options, bottom_only=bottom_only)
    assert len(split.step_losses) == SETTINGS.local_steps
    assert split.step_losses == pytest.approx(local.step_losses, abs=1e-5)
    merged = {**sent, **server.tensors()}
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        assert torch.allclose(merged[name], tensor, atol=1e-5), name
    # the client sent exactly its side: LoRA below the cut (and the head when it runs it)
    assert all(client_side(n, 2, head == "client") for n in sent)
    assert not any(client_side(n, 2, head == "client") for n in server.tensors())
    assert metrics["split_bits_up"] == 32.0


def test_split_bytes_per_step_are_what_the_codec_says():
    _, _, _, _, _, fp32 = run_both(bert, {"cut": "2", "head": "server", "act_codec": "fp32", "grad_codec": "fp32"})
    _, _, _, _, _, u4 = run_both(bert, {"cut": "2", "head": "server", "act_codec": "uniform", "act_bits": "4", "grad_codec": "uniform", "grad_bits": "4"})
    # 4-bit codes plus per-channel scales: several times fewer bytes than float32 each way
    assert fp32["split_bytes_up_per_step"] / u4["split_bytes_up_per_step"] > 3.0
    assert fp32["split_bytes_down_per_step"] / u4["split_bytes_down_per_step"] > 3.5
    # the reported width is what the frame really cost per element: 4-bit codes plus a float32
    # minimum and step per channel
    assert 4.0 < u4["split_bits_up"] < 4.0 + 64 / 8


def test_amaq_split_learns_and_anneals_the_mean_width_to_its_budget():
    settings = TrainSettings(local_steps=30, batch_size=8, learning_rate=1e-2, seed=3)
    local, split, _, _, _, metrics = run_both(llama, {"cut": "1", "head": "client", "act_codec": "amaq", "act_bits": "4", "grad_codec": "amaq", "grad_bits": "4",
                                                      "start_bits": "8", "anneal_steps": "20"}, settings)
    # 4 bits each way after annealing, and the run follows the lossless one closely
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(split.step_losses[-10:]) < mean(split.step_losses[:10]) - 0.03
    assert abs(mean(split.step_losses) - mean(local.step_losses)) < 0.01
    assert metrics["split_bits_up"] <= 4.0
    assert 2.0 <= metrics["split_bits_down"] <= 8.0


def test_uniform_on_amaqs_schedule_steps_down_in_whole_bits_within_the_budget():
    spec = DirectionCodec("uniform", 3, 8.0, 10, anneal_uniform=True)
    # the budget falls 8 -> 3 over 10 steps (0.5 bit a step); uniform takes the whole bits under it
    assert [uniform_width(spec, s) for s in range(12)] == [8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 3]
    sender, x = Sender(spec), torch.randn(64, 16)
    _, first = sender.send("hidden", x, 0)
    _, last = sender.send("hidden", x, 11)
    scales = 8 * 16  # a float32 minimum and step per channel
    assert (len(first.payload) - scales, len(last.payload) - scales) == (64 * 16 * 8 // 8, 64 * 16 * 3 // 8)
    # and through the options a split task carries, end to end
    settings = TrainSettings(local_steps=12, batch_size=8, learning_rate=1e-2, seed=3)
    _, split, _, _, _, metrics = run_both(llama, {"cut": "1", "head": "client", "act_codec": "uniform", "act_bits": "3", "grad_codec": "uniform",
                                                  "grad_bits": "3", "start_bits": "8", "anneal_steps": "10", "anneal_uniform": "true"}, settings)
    assert 3.0 < metrics["split_bits_up"] < 4.0  # 3-bit codes and their scales at the end
    assert len(split.step_losses) == 12


def test_cut_must_leave_a_block_on_each_side_and_options_are_checked():
    model, _ = bert(3)
    with pytest.raises(SplitError, match="1..2"):
        check_cut(model, 3)
    with pytest.raises(ValueError, match="cut must be"):
        SplitOptions(cut=0)
    with pytest.raises(ValueError, match="head must be"):
        SplitOptions(cut=1, head="nowhere")
    with pytest.raises(ValueError, match="unknown split codec"):
        SplitOptions(cut=1, act_codec="int3")


def _server(head="server"):
    model, _ = adapted(bert, AdapterPlan(rank=2, alpha=4, target_modules=("query", "value"), modules_to_save=("classifier",)))
    return ServerHalf(model, SplitOptions(cut=2, head=head, act_codec="fp32", grad_codec="fp32"), 1e-3, 0.0, PAD)


def test_the_coordinators_half_refuses_frames_that_do_not_fit():
    server = _server()
    mask = torch.ones(2, 5, dtype=torch.uint8)
    good = {"hidden": torch.randn(10, 32), "mask": mask, "labels": torch.tensor([0, 1])}
    header = pb.SplitHeader(step=0, kind=pb.SPLIT_KIND_ACTIVATIONS)
    reply, out = server.handle(header, good)
    assert reply.kind == pb.SPLIT_KIND_GRADIENTS and list(out[0].header.shape) == [10, 32]
    with pytest.raises(ProtocolError, match=r"hidden has shape \[9, 32\], the batch needs \[10, 32\]"):
        server.handle(header, {**good, "hidden": torch.randn(9, 32)})
    with pytest.raises(ProtocolError, match=r"the batch needs \[10, 32\]"):
        server.handle(header, {**good, "hidden": torch.randn(10, 31)})
    with pytest.raises(ProtocolError, match="expected"):
        server.handle(header, {"hidden": good["hidden"], "mask": mask})
    with pytest.raises(ProtocolError, match="labels must be int64"):
        server.handle(header, {**good, "labels": torch.tensor([0.0, 1.0])})
    with pytest.raises(ProtocolError, match="do not fit the model"):
        server.handle(header, {**good, "labels": torch.tensor([0, 7])})
    with pytest.raises(ProtocolError, match="unexpected split message kind"):
        server.handle(pb.SplitHeader(step=0, kind=pb.SPLIT_KIND_LABELS), good)


def test_u_shaped_half_refuses_a_gradient_for_activations_it_never_sent():
    server = _server("client")
    with pytest.raises(ProtocolError, match="never sent"):
        server.handle(pb.SplitHeader(step=4, kind=pb.SPLIT_KIND_GRADIENTS), {"grad": torch.randn(10, 32)})
    mask = torch.ones(2, 5, dtype=torch.uint8)
    reply, out = server.handle(pb.SplitHeader(step=0, kind=pb.SPLIT_KIND_ACTIVATIONS), {"hidden": torch.randn(10, 32), "mask": mask})
    assert reply.kind == pb.SPLIT_KIND_ACTIVATIONS
    with pytest.raises(ProtocolError, match="waits for its gradient"):
        server.handle(pb.SplitHeader(step=1, kind=pb.SPLIT_KIND_ACTIVATIONS), {"hidden": torch.randn(10, 32), "mask": mask})
    assert encode_tensor("x", torch.zeros(1)).header.name == "x"


def test_a_shared_server_adapter_is_copied_between_two_steps_never_during_one():
    """SplitFed-V2: every client steps one server-side adapter in turn. A client's push copies it
    under the step lock, so another client's optimizer step is never read half done."""
    import threading

    model, _ = adapted(bert, AdapterPlan(rank=2, alpha=4, target_modules=("query", "value"), modules_to_save=("classifier",)))
    lock = threading.Lock()
    halves = [ServerHalf(model, SplitOptions(cut=2, head="server", act_codec="fp32", grad_codec="fp32"), 1e-3, 0.0, PAD, step_lock=lock)
              for _ in range(2)]
    trained = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    taken: list[dict] = []
    lock.acquire()  # the other client's step is under way ...
    with torch.no_grad():
        trained.add_(1.0)  # ... half of its update written
    reader = threading.Thread(target=lambda: taken.append(halves[0].tensors()))
    reader.start()
    reader.join(timeout=0.5)
    assert reader.is_alive() and not taken  # the copy waits for the step to end
    with torch.no_grad():
        trained.add_(1.0)  # the rest of the update
    lock.release()
    reader.join(timeout=10)
    assert taken and all(torch.equal(taken[0][n], t) for n, t in halves[1].tensors().items())
    assert not lock.locked()  # the copy gave the lock back
