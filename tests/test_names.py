"""Tensor names: a namespaced tensor (one part's bookkeeping about a tensor) is never taken for
the tensor its suffix names, by any part that selects tensors by suffix."""

from __future__ import annotations

import torch

from fedtune.names import A_SUFFIX, B_SUFFIX, BASE_DELTA, ends_with, is_frozen_update, is_lora, lora_modules, namespaced

MODULE = "base_model.model.layers.0.q_proj"


def test_a_namespaced_name_never_matches_the_suffix_it_ends_with():
    moment = namespaced("server_opt.m", MODULE + A_SUFFIX)
    assert ends_with(MODULE + A_SUFFIX, A_SUFFIX) and not ends_with(moment, A_SUFFIX)
    assert not is_lora(moment) and is_lora(MODULE + B_SUFFIX)
    assert not is_frozen_update(namespaced("scaffold.c", MODULE + BASE_DELTA))
    names = [MODULE + A_SUFFIX, MODULE + B_SUFFIX, namespaced("server_opt.m", "x" + A_SUFFIX), namespaced("server_opt.m", "x" + B_SUFFIX)]
    assert lora_modules(names) == [MODULE]


def test_fedsvd_refactorizes_factors_and_leaves_other_parts_state_alone():
    # Before: a server optimizer's moments of A and B were put through FedSVD's SVD as if they
    # were a LoRA module (an orthonormal "moment" of A, then NaN in Adam's square root).
    from fedtune.methods.ffa.strategy import refactorize

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    m_a, m_b = torch.zeros(4, 6), torch.zeros(5, 4)
    state = {MODULE + A_SUFFIX: a, MODULE + B_SUFFIX: b, namespaced("server_opt.m", MODULE + A_SUFFIX): m_a, namespaced("server_opt.m", MODULE + B_SUFFIX): m_b}
    out = refactorize(state)
    assert set(out) == {MODULE + A_SUFFIX, MODULE + B_SUFFIX}
    assert torch.allclose(out[MODULE + B_SUFFIX] @ out[MODULE + A_SUFFIX], b @ a, atol=1e-5)


def test_fedsa_keeps_b_on_devices_but_not_other_parts_tensors_about_b():
    from fedtune.methods.fedsa.options import FedSAOptions
    from fedtune.methods.fedsa.strategy import FedSA
    from fedtune.methods.fedavg.strategy import FedAvg

    state = {MODULE + A_SUFFIX: torch.zeros(2, 3), MODULE + B_SUFFIX: torch.zeros(3, 2), "head.weight": torch.zeros(3, 3)}
    fedsa = FedSA(FedAvg(), FedSAOptions(0.0))
    assert fedsa.server_params(state) == [MODULE + A_SUFFIX, "head.weight"]
