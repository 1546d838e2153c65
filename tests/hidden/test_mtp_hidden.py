"""Hidden tests of the MTP assignment: the module against its equations written out (with a real
attention block, not the public tests' identity block), and the verify rule's two laws measured
directly: P(keep d) = min(1, p(d)/q(d)), and a rejection resamples from norm(max(0, p - q)).

Tolerances: the float64 module equals the written-out equations to 1e-10; the sampled laws get
bounds of 5 binomial standard deviations (a correct rule fails with probability < 1e-6).
"""
import math

import pytest
import torch

from mtp import DemoConfig, DemoTransformer, MTPConfig, _verify
from reference_impl import reference_mtp_forward


@pytest.mark.points(2)
def test_mtp_module_equals_the_equations_with_a_real_block():
    torch.manual_seed(1)
    cfg = DemoConfig(vocab_size=7, dim=16, n_layers=1, n_heads=2, inter_dim=32, max_seq_len=16,
                     mtp=MTPConfig(n_mtp_depth=1))
    model = DemoTransformer(cfg).double().eval()
    module = model.mtp[0]
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    toks = torch.randint(7, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(module(h, toks), reference_mtp_forward(module, h, toks),
                                   atol=1e-10, rtol=0)


@pytest.mark.points(3)
def test_verify_keeps_with_min_1_p_over_q_and_resamples_the_residual():
    N = 6000
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.5, 0.05, 0.2]], dtype=torch.float64)
    # logits whose softmax at T = 1 is p for t_{n+1}; uniform after the draft
    logits = torch.stack([p.log(), torch.zeros(4, dtype=torch.float64)])
    g = torch.Generator().manual_seed(0)
    for draft in (1, 2):
        kept = 0
        resampled = torch.zeros(4, dtype=torch.float64)
        for _ in range(N):
            keep, token = _verify(logits, draft, q, 1.0, g)
            kept += keep
            if not keep:
                resampled[token] += 1
        accept = min(1.0, float(p[draft] / q[0, draft]))
        sd = math.sqrt(accept * (1 - accept) / N) + 1 / N
        assert abs(kept / N - accept) < 5 * sd, \
            f"draft {draft}: kept {kept / N:.3f} of the time, expected min(1, p/q) = {accept:.3f}"
        if accept < 1:
            residual = (p - q[0]).clamp_min(0)
            residual = residual / residual.sum()
            n = resampled.sum()
            freq = resampled / n
            bound = 5 * (residual * (1 - residual) / n).sqrt() + 1 / n
            assert ((freq - residual).abs() <= bound).all(), \
                f"draft {draft}: rejections resampled {freq.tolist()}, expected " \
                f"norm(max(0, p - q)) = {residual.tolist()}"
