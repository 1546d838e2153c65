"""Hidden tests of the MoE assignment (the gate's routing and the loss-free bias update), against
the reference implementations of reference_impl.py.

Tolerance: float32 routing compared with a float64 reference: rtol 1e-5, atol 1e-6.
"""
import pytest
import torch

from moe import Gate, MoEConfig, loss_free_bias_update
from reference_impl import reference_bias_update, reference_gate

F32 = dict(rtol=1e-5, atol=1e-6)


def config(**kw) -> MoEConfig:
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                n_shared_experts=1)
    return MoEConfig(**{**base, **kw})


def same_routing(gate, x, **reference_kw):
    w, i = gate(x)
    rw, ri = reference_gate(x, gate.weight.detach(), gate.bias, **reference_kw)
    assert torch.equal(i.sort(-1).values, ri.sort(-1).values), \
        "selected experts differ from the reference gate"
    # the same experts in the same order, then the same weights
    torch.testing.assert_close(w.gather(1, i.argsort(-1)).double(), rw.gather(1, ri.argsort(-1)),
                               **F32)


@pytest.mark.points(3)
@pytest.mark.parametrize("E,k,groups,kept,scale", [(16, 3, 4, 2, 2.5), (12, 2, 3, 1, 1.0),
                                                   (8, 4, 1, 1, 1.0), (32, 6, 8, 3, 2.0)])
def test_gate_equals_reference_with_bias_and_groups(E, k, groups, kept, scale):
    cfg = config(n_routed_experts=E, n_activated_experts=k, n_expert_groups=groups,
                 n_limited_groups=kept, route_scale=scale)
    gate = Gate(cfg)
    gate.bias.copy_(torch.randn(E) * 0.1)
    same_routing(gate, torch.randn(40, 16), k=k, n_groups=groups, topk_groups=kept,
                 route_scale=scale)


def test_softmax_gate_equals_reference():
    gate = Gate(config(score_func="softmax", n_expert_groups=2, n_limited_groups=1,
                       route_scale=1.5))
    same_routing(gate, torch.randn(30, 16), k=2, n_groups=2, topk_groups=1, route_scale=1.5,
                 score_func="softmax")


@pytest.mark.points(2)
def test_bias_update_equals_reference_on_random_loads():
    g = torch.Generator().manual_seed(3)
    for gamma in (1e-3, 0.05):
        bias = torch.randn(12, generator=g)
        load = torch.randint(0, 6, (12,), generator=g)
        # ties with the mean (no change) and an all-zero load (nothing changes)
        for loads in (load, torch.tensor([2, 2, 1, 3] * 3), torch.zeros(12, dtype=torch.long)):
            expected = reference_bias_update(bias, loads, gamma)
            got = bias.clone()
            loss_free_bias_update(got, loads, gamma)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
