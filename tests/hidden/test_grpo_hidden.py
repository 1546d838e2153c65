"""Hidden tests of the GRPO assignment: group advantages and the clipped objective against the
token-by-token reference, on random groups, lengths, clip ranges and KL weights.

Tolerance: float64 inputs, the same formula summed in another order: 1e-10.
"""
import pytest
import torch

import grpo
from reference_impl import reference_advantages, reference_grpo_loss


@pytest.mark.points(2)
@pytest.mark.parametrize("scale", ["mean", "std"])
def test_advantages_equal_reference_on_random_groups(scale):
    g = torch.Generator().manual_seed(11)
    # shuffled, uneven groups; group 3 has equal rewards
    group_ids = torch.randint(0, 5, (40,), generator=g)
    group_ids[:5] = torch.arange(5)
    rewards = torch.randint(0, 3, (40,), generator=g).double() / 2
    rewards[group_ids == 3] = 0.5
    A, zero_var = grpo.group_advantages(rewards, group_ids, scale)
    rA, rzero = reference_advantages(rewards, group_ids, scale)
    assert zero_var.tolist() == rzero.tolist()
    torch.testing.assert_close(A.double(), rA, rtol=0, atol=1e-10)
    # float32 rewards keep their dtype
    A32, _ = grpo.group_advantages(rewards.float(), group_ids, scale)
    assert A32.dtype == torch.float32


@pytest.mark.points(3)
@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_loss_equals_reference_with_clipping_and_kl(aggregation):
    g = torch.Generator().manual_seed(5)
    N, T = 5, 7
    logp = (torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3 - 1
    ref = torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3 - 1
    A = torch.randn(N, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, T, generator=g) < 0.7).double()
    mask[0] = 0
    mask[0, -1] = 1
    for old_logp, beta, eps_low, eps_high in ((old, 0.0, 0.2, 0.28), (old, 0.04, 0.1, 0.3),
                                              (None, 0.1, 0.2, 0.2)):
        loss, stats = grpo.grpo_loss(logp, old_logp, A, mask, ref_logp=ref, eps_low=eps_low,
                                     eps_high=eps_high, beta=beta, aggregation=aggregation,
                                     max_len=9)
        expected = reference_grpo_loss(logp.detach(), old_logp, A, mask, ref, eps_low, eps_high,
                                       beta, aggregation, 9)
        assert abs(loss.item() - expected) < 1e-10, \
            f"old_logp {'given' if old_logp is not None else 'None'}, beta {beta}: " \
            f"{loss.item():.12f} vs the reference {expected:.12f}"
        assert set(stats) >= {"clip_frac", "kl", "ratio_mean"}
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.all(grad[mask == 0] == 0), "masked tokens must get no gradient"
