"""Tests for mtp.py: the MTP module and its causal chain, L_MTP, and speculative decoding.

Tolerance: the models here run in float64, so equivalences of the same math hold to 1e-10; the one
statistical test derives its bound from the sample count (see test_sampling_speculative_...).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import demo_figures
from mtp import (DemoConfig, DemoTransformer, MTPConfig, MTPModule, demo, generate_plain,
                 mtp_logits, mtp_loss, speculative_generate)

ATOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds waiting, a lot of it on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(vocab_size: int = 6, depth: int = 1, seed: int = 0,
               head_scale: float = 1.0) -> DemoTransformer:
    torch.manual_seed(seed)
    cfg = DemoConfig(vocab_size=vocab_size, dim=16, n_layers=2, n_heads=2, inter_dim=32,
                     max_seq_len=32, mtp=MTPConfig(n_mtp_depth=depth))
    model = DemoTransformer(cfg).double().eval()
    with torch.no_grad():
        # sharper distributions: p and q then differ clearly
        model.head.weight.mul_(head_scale)
    return model


class IdentityBlock(nn.Module):
    """A block that returns its input, to read MTPModule's own arithmetic."""

    def forward(self, x, start_pos=0, cache=None):
        return x


@pytest.mark.points(3)
def test_mtp_module_shapes_names_and_embedding_first_concat():
    dim = 8
    V = 11
    B = 2
    T = 5
    embed = nn.Embedding(V, dim)
    head = nn.Linear(dim, V, bias=False)
    m = MTPModule(dim, IdentityBlock(), embed, head)
    own = set(n.split(".")[0] for n, _ in m.named_parameters())
    assert own == {"enorm", "hnorm", "eh_proj", "norm"}, \
        "MTPModule's own weights are enorm, hnorm, eh_proj, block, norm (V3 names); " \
        "embed/head are shared"
    assert m.eh_proj.weight.shape == (dim, 2 * dim), "M_k is a d x 2d projection"
    h_prev = torch.randn(B, T, dim)
    toks = torch.randint(V, (B, T))
    with torch.no_grad():
        m.eh_proj.weight.copy_(torch.cat([torch.eye(dim), torch.zeros(dim, dim)], dim=1))
        emb_half = m(h_prev, toks)
        m.eh_proj.weight.copy_(torch.cat([torch.zeros(dim, dim), torch.eye(dim)], dim=1))
        h_half = m(h_prev, toks)
        logits = m.logits(h_half)
    torch.testing.assert_close(emb_half, m.enorm(embed(toks)),
                               msg="the first half of the concat must be RMSNorm(Emb(t_{i+k})), "
                                   "as in the released V3 weights")
    torch.testing.assert_close(h_half, m.hnorm(h_prev),
                               msg="the second half must be RMSNorm(h^{k-1}_i)")
    assert logits.shape == (B, T, V)
    torch.testing.assert_close(logits, head(m.norm(h_half)))


def test_embedding_and_head_are_shared_objects_counted_once():
    model = tiny_model(depth=2)
    for module in model.mtp:
        assert module.embed is model.embed and module.head is model.head, "shared, not copied"
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    keys = model.state_dict().keys()
    assert not [k for k in keys if k.startswith("mtp.") and (".embed." in k or ".head." in k)], \
        "the state_dict must hold the shared embedding and head once, under the main model's names"
    own = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed.weight) not in own and id(model.head.weight) not in own
    # The MTP loss trains the shared embedding and head and the main trunk too.
    tokens = torch.randint(6, (2, 10))
    mtp_loss(model.mtp, model.forward_hidden(tokens), tokens, 0.3).backward()
    for p in (model.embed.weight, model.head.weight, model.layers[0].attn.wqkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.points(3)
def test_causal_chain_depth_k_at_i_sees_tokens_up_to_i_plus_k():
    torch.manual_seed(0)
    model = tiny_model(depth=2)
    T = 9
    tokens = torch.randint(6, (1, T))
    with torch.no_grad():
        ref = mtp_logits(model.mtp, model.forward_hidden(tokens), tokens)
        assert [lg.shape[1] for lg in ref] == [T - 2, T - 3], "depth k covers T - k - 1 positions"
        for j in range(T):
            changed = tokens.clone()
            changed[0, j] = (changed[0, j] + 1) % 6
            out = mtp_logits(model.mtp, model.forward_hidden(changed), changed)
            for k, (a, b) in enumerate(zip(ref, out), start=1):
                moved = (a - b).abs().amax(dim=(0, 2)) > ATOL                 # [L_k]
                expect = torch.arange(a.shape[1]) + k >= j
                assert torch.equal(moved, expect), \
                    f"depth {k}: changing t_{j} must move exactly the positions i with " \
                    f"i + {k} >= {j}; moved {moved.int().tolist()}"


@pytest.mark.points(2)
def test_mtp_loss_is_lambda_over_D_times_sum_of_depth_CEs():
    torch.manual_seed(0)
    model = tiny_model(depth=2)
    T = 10
    tokens = torch.randint(6, (3, T + 1))
    with torch.no_grad():
        h = model.forward_hidden(tokens[:, :T])
        # tokens of length T: depth k predicts tokens[:, k+1:] from positions 0..T-k-2.
        lg = mtp_logits(model.mtp, h, tokens[:, :T])
        ce = [F.cross_entropy(lg[0].flatten(0, 1), tokens[:, 2:T].flatten()),
              F.cross_entropy(lg[1].flatten(0, 1), tokens[:, 3:T].flatten())]
        torch.testing.assert_close(mtp_loss(model.mtp, h, tokens[:, :T], 0.3),
                                   0.3 / 2 * (ce[0] + ce[1]))
        # train.py's form: the inputs plus the last target (T + 1 tokens) gives each depth one
        # more position.
        lg = mtp_logits(model.mtp, h, tokens)
        assert [x.shape[1] for x in lg] == [T - 1, T - 2]
        ce = [F.cross_entropy(lg[0].flatten(0, 1), tokens[:, 2:].flatten()),
              F.cross_entropy(lg[1].flatten(0, 1), tokens[:, 3:].flatten())]
        torch.testing.assert_close(mtp_loss(model.mtp, h, tokens, 0.1), 0.1 / 2 * (ce[0] + ce[1]))


def greedy_by_full_recompute(model, prompt, n_new):
    seq = prompt
    for _ in range(n_new):
        nxt = model.logits(model.forward_hidden(seq))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.points(2)
def test_greedy_speculative_equals_greedy_plain_on_several_prompts():
    model = tiny_model(vocab_size=4, head_scale=4.0)
    accepted = 0
    drafted = 0
    g = torch.Generator().manual_seed(1)
    for P in (1, 2, 3, 5, 8):
        prompt = torch.randint(4, (1, P), generator=g)
        with torch.no_grad():
            reference = greedy_by_full_recompute(model, prompt, 20)
        plain = generate_plain(model, prompt, 20)
        spec, stats = speculative_generate(model, prompt, 20)
        assert torch.equal(plain, reference), \
            "cached plain decoding must equal recomputing everything"
        assert torch.equal(spec, plain), \
            f"greedy speculative must reproduce greedy decoding (prompt {P})"
        accepted += stats["accepted"]
        drafted += stats["drafted"]
        assert stats["acceptance_length"] == 1 + stats["accepted"] / stats["drafted"]
    assert 0 < accepted < drafted, "the test must exercise both accepted and rejected drafts"


@pytest.mark.points(2)
def test_cache_is_rolled_back_after_rejected_drafts():
    model = tiny_model(vocab_size=4, head_scale=4.0)
    made = {}
    for name, owner in (("main", model), ("mtp", model.mtp[0].block)):
        def recording(batch_size, max_len, _new=owner.new_cache, _name=name):
            made[_name] = _new(batch_size, max_len)
            return made[_name]
        owner.new_cache = recording
    prompt = torch.tensor([[1, 3, 0]])
    out, stats = speculative_generate(model, prompt, 24, temperature=1.0,
                                      generator=torch.Generator().manual_seed(0))
    assert stats["drafted"] - stats["accepted"] >= 3, "need several rejections to test the rollback"
    # every position but the last token has been fed
    n = out.shape[1] - 1
    with torch.no_grad():
        fresh = [layer.new_cache(1, n) for layer in model.layers]
        h = model.forward_hidden(out[:, :n], 0, fresh)
        # positions the MTP module has certainly processed
        m = n - 2
        fresh_mtp = model.mtp[0].block.new_cache(1, m)
        model.mtp[0](h[:, :m], out[:, 1:m + 1], 0, fresh_mtp)
    for layer, (a, b) in enumerate(zip(made["main"], fresh)):
        torch.testing.assert_close(
            a.k[:, :, :n], b.k, atol=ATOL, rtol=0,
            msg=f"main cache layer {layer}: a rejected draft's entry survived")
        torch.testing.assert_close(a.v[:, :, :n], b.v, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        made["mtp"].k[:, :, :m], fresh_mtp.k, atol=ATOL, rtol=0,
        msg="the MTP cache must match the MTP chain run over the final sequence")


def tv_bound(p: torch.Tensor, n: int, delta: float = 1e-4) -> float:
    """A bound on the total variation between p and the empirical law of n samples from it.

    E[TV] <= 1/2 Σ_c sqrt(p_c (1 - p_c) / n) (each count's standard deviation), and one sample
    moves TV by at most 1/n, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2) = delta for
    t = sqrt(ln(1/delta) / 2n): a correct sampler fails with probability < delta (the seed is
    fixed).
    """
    expected = 0.5 * (p * (1 - p) / n).sqrt().sum().item()
    return expected + math.sqrt(math.log(1 / delta) / (2 * n))


def tv(x: torch.Tensor, y: torch.Tensor) -> float:
    """The total variation distance between two laws of the same shape."""
    return 0.5 * (x - y).abs().sum().item()


@pytest.mark.points(4)
def test_sampling_speculative_has_the_main_model_distribution():
    """The law of the first 3 new tokens (a, b, c) vs the exact main-model law, on V = 4.

    a is sampled at prefill; b is the first draft, accepted or resampled; c is the bonus token or
    the second draft. Power: two wrong samplers, "accept every draft" and "resample from p instead
    of max(0, p - q)", must land well outside the bound on the law of (a, b).
    """
    V = 4
    N = 4000
    tau = 1.0
    model = tiny_model(vocab_size=V, head_scale=2.0, seed=1)
    prompt = torch.tensor([[2, 0, 1]])
    with torch.no_grad():
        # a deliberately overconfident drafter: q far from p
        model.mtp[0].norm.weight.mul_(3.0)
    P = prompt.shape[1]
    conts = torch.cartesian_prod(*[torch.arange(V)] * 3)                          # [V^3, 3]
    with torch.no_grad():
        seqs = torch.cat([prompt.expand(len(conts), -1), conts], dim=1)
        h = model.forward_hidden(seqs)
        p = torch.softmax(model.logits(h) / tau, dim=-1)                          # [V^3, P+3, V]
        exact = torch.ones(len(conts), dtype=p.dtype)
        for j in range(3):
            exact *= p[:, P - 1 + j].gather(1, conts[:, j:j + 1]).squeeze(1)
        exact = exact.view(V, V, V)                                               # [a, b, c]
        h_mtp = model.mtp[0](h[:, :P], seqs[:, 1:P + 1])
        q = torch.softmax(model.mtp[0].logits(h_mtp)[:, -1] / tau, -1)
    # rows (a, 0, 0)
    first = conts[:, 1:].sum(1) == 0
    p_a = p[first, P - 1]                                                         # [V]
    p_b = p[first, P]                                                             # [V, V]
    q_b = q[first]                                                                # [V, V]
    # P(accept | a)
    beta = torch.minimum(p_b, q_b).sum(-1, keepdim=True)
    accept_all = p_a[:, None] * q_b
    resample_p = p_a[:, None] * (torch.minimum(p_b, q_b) + (1 - beta) * p_b)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V, V, dtype=p.dtype)
    acc = 0
    dr = 0
    for _ in range(N):
        out, st = speculative_generate(model, prompt, 3, temperature=tau, generator=g)
        counts[tuple(out[0, P:].tolist())] += 1
        acc += st["accepted"]
        dr += st["drafted"]
    exact_ab = exact.sum(-1)
    bound_ab = tv_bound(exact_ab, N)
    bound_abc = tv_bound(exact, N)
    assert 0 < acc < dr, "both branches (accept, resample) must occur"
    for name, wrong in (("accept every draft", accept_all), ("resample from p", resample_p)):
        assert tv(wrong, exact_ab) > 2 * bound_ab, \
            f"no power against '{name}': TV {tv(wrong, exact_ab):.3f}"
    assert tv(counts.sum(-1) / N, exact_ab) < bound_ab, \
        "the first draft's accept/resample is biased"
    assert tv(counts / N, exact) < bound_abc, "the bonus token or the second draft is biased"


@pytest.mark.points(0)
def test_bad_inputs_raise_value_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(model, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="MTP module"):
        speculative_generate(tiny_model(depth=0), torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_plain(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_plain(model, torch.zeros(1, 30, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="target"):
        mtp_loss(model.mtp, torch.zeros(1, 2, 16, dtype=torch.float64),
                 torch.zeros(1, 2, dtype=torch.long), 0.3)
    with pytest.raises(ValueError, match="n_mtp_depth"):
        MTPConfig(n_mtp_depth=-1)
    with pytest.raises(ValueError, match="width"):
        MTPModule(8, IdentityBlock(), nn.Embedding(5, 4), nn.Linear(4, 5))


def test_demo_small_reports_the_figures():
    r = demo(small=True)
    for key in ("loss_main_without_mtp", "loss_main_with_mtp", "acceptance_rate",
                "acceptance_length", "tokens_per_s_plain", "tokens_per_s_speculative", "speedup",
                "greedy_identical"):
        assert key in r, f"demo() must report {key}"
    assert r["greedy_identical"] is True
    assert 0 <= r["acceptance_rate"] <= 1
    assert r["acceptance_length"] == pytest.approx(1 + r["acceptance_rate"])
    assert all(isinstance(v, (int, float, bool)) for v in r.values()), "flat plain figures only"
    # the bands tests/grade.py checks on `python mtp.py --json --small`
    assert not demo_figures.unmet("mtp", r), "\n".join(demo_figures.unmet("mtp", r))
