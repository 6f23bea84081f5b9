"""fedtune.rng: per-thread random draws for training steps, the locked default generator for
the rest, and seeds that are the same on every machine."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from fedtune.rng import derive_seed, seeded, step_seed, thread_draws


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, "step", 3) == derive_seed(7, "step", 3)
    assert step_seed(7, 3) == derive_seed(7, "step", 3)
    assert len({step_seed(7, s) for s in range(1000)}) == 1000
    assert 0 <= derive_seed(-1, "x") < 2**63
    assert derive_seed(7, "a", 1) != derive_seed(7, "a1")  # labels are separated, not concatenated


DRAWS = {
    "dropout": lambda: F.dropout(torch.ones(64), 0.5),
    "nn.Dropout": lambda: torch.nn.Dropout(0.3)(torch.ones(64)),
    "torch.dropout": lambda: torch.dropout(torch.ones(64), 0.5, True),
    "attention dropout": lambda: F.scaled_dot_product_attention(torch.ones(1, 4, 8), torch.ones(1, 4, 8), torch.randn(1, 4, 8), dropout_p=0.5),
    "rand": lambda: torch.rand(8),
    "randn": lambda: torch.randn(8),
    "randint": lambda: torch.randint(100, (8,)),
    "randperm": lambda: torch.randperm(8),
    "bernoulli_": lambda: torch.empty(8).bernoulli_(0.5),
    "uniform_": lambda: torch.empty(8).uniform_(),
    "normal_": lambda: torch.empty(8).normal_(),
    "multinomial": lambda: torch.ones(8).multinomial(4),
    "kaiming_uniform_": lambda: torch.nn.init.kaiming_uniform_(torch.empty(4, 4)),
    "rand_like (no generator argument)": lambda: torch.rand_like(torch.ones(8)),
    "dropout1d (no generator argument)": lambda: F.dropout1d(torch.ones(2, 4, 8), 0.5),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_thread_draws_repeat_and_leave_the_default_generator_alone(name):
    draw = DRAWS[name]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with thread_draws(5):
        first = draw()
    assert torch.equal(torch.get_rng_state(), before), f"{name} drew from the process's default generator"
    with thread_draws(5):
        again = draw()
    with thread_draws(6):
        other = draw()
    assert torch.equal(first, again)
    assert not torch.equal(first, other), f"{name}: a different seed gave the same draw"


def test_dropout_keeps_1_minus_p_scaled_up_and_its_gradient_is_the_mask():
    x = torch.ones(200_000, requires_grad=True)
    with thread_draws(0):
        y = F.dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask / 0.7)/dx = mask / 0.7 = y at x = 1
    with thread_draws(0):
        assert torch.equal(F.dropout(x, 0.3, training=False), x)
        assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))
        with pytest.raises(ValueError, match="between 0 and 1"):
            F.dropout(x, 1.5)
        z = torch.ones(1000)
        F.dropout(z, 0.5, inplace=True)
        assert (z == 0).any() and (z == 2).any()


@pytest.mark.parametrize("case", ["bool mask", "float mask", "causal", "grouped heads", "scale"])
def test_attention_with_dropout_is_torchs_attention_before_the_dropout(case):
    """With a dropout so small that nothing is dropped, the generator-driven formula must give
    torch's own attention for every kind of mask."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    kwargs: dict = {}
    if case == "bool mask":
        mask = torch.rand(2, 1, 6, 6, generator=g) > 0.4
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    elif case == "float mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, generator=g)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "grouped heads":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    else:
        kwargs["scale"] = 0.05
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with thread_draws(3):
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=1e-12, **kwargs)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, **kwargs)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(dropped, want)


def test_threads_in_thread_draws_run_at_the_same_time():
    """Two training threads must not wait for each other (``seeded`` would serialize them)."""
    both_inside = threading.Barrier(2, timeout=10)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def step(seed: int) -> None:
        try:
            with thread_draws(seed):
                first = F.dropout(torch.ones(32), 0.5)
                both_inside.wait()  # a lock held across the block would time out here
                results[seed] = torch.cat([first, F.dropout(torch.ones(32), 0.5)])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=step, args=(s,)) for s in (1, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for seed in (1, 2):
        with thread_draws(seed):
            alone = torch.cat([F.dropout(torch.ones(32), 0.5), F.dropout(torch.ones(32), 0.5)])
        assert torch.equal(results[seed], alone)


def test_thread_draws_stay_on_their_thread():
    """The mode is per thread: a thread started inside the block draws from the default generator."""
    seen: dict[str, bool] = {}

    def other() -> None:
        before = torch.get_rng_state()
        torch.rand(4)
        seen["default generator used"] = not torch.equal(before, torch.get_rng_state())

    with thread_draws(1):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["default generator used"]


def test_seeded_restores_the_default_generator():
    torch.manual_seed(9)
    before = torch.get_rng_state()
    with seeded(4):
        a = torch.rand(3)
    with seeded(4):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
