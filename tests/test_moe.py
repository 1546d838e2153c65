"""Tests for moe.py: the V3 gate, sort-based dispatch, loss-free balancing, balance losses, MaxVio.

Tolerances: float64 equivalences of the same math use rtol 1e-12 (only summation order differs);
float32 ones use rtol 1e-5, atol 1e-6 (CPU float32 rounding on outputs of size ~1).
"""
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import demo_figures
import moe
from moe import Gate, MoE, MoEConfig

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)


def tiny(**kw) -> MoEConfig:
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                n_shared_experts=1)
    return MoEConfig(**{**base, **kw})


def naive_per_token(m: MoE, x):
    """y_t = shared(x_t) + sum_j g_tj * Expert_{i_tj}(x_t), a Python loop over tokens and their
    k slots."""
    flat = x.reshape(-1, x.size(-1))
    weights, indices = m.gate(flat)
    experts = [m.expert(i) for i in range(m.cfg.n_routed_experts)]
    rows = []
    for t in range(flat.size(0)):
        y = m.shared_experts(flat[t])
        for j in range(indices.size(1)):
            y = y + weights[t, j] * experts[indices[t, j]](flat[t])
        rows.append(y)
    return torch.stack(rows).view_as(x)


# ---- gate
@pytest.mark.points(3)
def test_bias_changes_selection_not_weights():
    gate = Gate(tiny())
    x = torch.randn(64, 16)
    w0, i0 = gate(x)
    # every token now picks expert 5
    gate.bias[5] = 10.0
    w1, i1 = gate(x)
    assert not torch.equal(i0, i1) and (i1 == 5).any(-1).all(), \
        "the bias must change which experts are chosen"
    s = torch.sigmoid(x @ gate.weight.detach().T)                         # the UNBIASED affinities
    expected = s.gather(1, i1) / s.gather(1, i1).sum(-1, keepdim=True)
    # no trace of the +10 in the weights
    torch.testing.assert_close(w1, expected, **F32)
    # a uniform bias changes nothing
    gate.bias.fill_(3.0)
    w2, i2 = gate(x)
    assert torch.equal(i2, i0)
    torch.testing.assert_close(w2, w0, **F32)


def test_bias_gets_no_gradient_and_is_saved():
    m = MoE(tiny(seq_aux_alpha=0.1, balance="aux"))
    y = m(torch.randn(2, 5, 16))
    (y.square().sum() + m.aux_loss).backward()
    assert not m.gate.bias.requires_grad and m.gate.bias.grad is None
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    assert all(p is not m.gate.bias for p in m.parameters()), \
        "the bias must be a buffer, not a parameter"
    assert "gate.bias" in m.state_dict() and m.state_dict()["gate.bias"].dtype == torch.float32


@pytest.mark.points(2)
def test_one_group_reduces_to_plain_topk():
    x = torch.randn(50, 16)
    gate = Gate(tiny(n_routed_experts=16, n_activated_experts=4))
    gate.bias.copy_(torch.randn(16) * 0.05)
    _, i = gate(x)
    plain = (torch.sigmoid(x @ gate.weight.detach().T) + gate.bias).topk(4).indices
    assert torch.equal(i, plain)
    grouped = Gate(tiny(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4,
                        n_limited_groups=4))
    grouped.load_state_dict(gate.state_dict())
    assert torch.equal(grouped(x)[1], plain), "keeping every group must also equal plain top-k"


@pytest.mark.points(3)
def test_masked_groups_are_never_selected():
    # Affinities all 0.5 (zero gate weights); the bias shapes the biased scores per group of 4:
    # group 0 holds the single best expert (1.4) but its top-2 sum is 1.3; groups 1 and 2 sum to
    # 1.6, 1.5. The kept groups' weak experts score -0.1, below a masked 0.0: masking must be
    # -inf, not 0 (issue #741).
    gate = Gate(tiny(n_routed_experts=16, n_activated_experts=2, n_expert_groups=4,
                     n_limited_groups=2))
    gate.weight.data.zero_()
    gate.bias.copy_(torch.tensor([.9, -.6, -.6, -.6, .3, .3, -.6, -.6, .25, .25, -.6, -.6,
                                  0, 0, 0, 0]))
    w, i = gate(torch.randn(8, 16))
    assert torch.equal(i.sort(-1).values, torch.tensor([[4, 5]] * 8)), \
        "expert 0's group is masked: never chosen"
    # unbiased: 0.5 / (0.5 + 0.5)
    torch.testing.assert_close(w, torch.full((8, 2), 0.5))
    gate4 = Gate(tiny(n_routed_experts=16, n_activated_experts=8, n_expert_groups=4,
                      n_limited_groups=2))
    # k = all 8 experts of the kept groups
    gate4.load_state_dict(gate.state_dict())
    assert set(gate4(torch.randn(8, 16))[1].flatten().tolist()) == set(range(4, 12)), \
        "masked groups are -inf"


@pytest.mark.points(2)
def test_weights_normalised_and_scaled_by_route_scale():
    x = torch.randn(20, 16)
    w, _ = Gate(tiny(route_scale=2.5))(x)
    torch.testing.assert_close(w.sum(-1), torch.full((20,), 2.5), **F32)
    # V2: softmax, not renormalised
    gate = Gate(tiny(score_func="softmax", route_scale=2.0))
    w, i = gate(x)
    p = torch.softmax(x @ gate.weight.detach().T, -1)
    torch.testing.assert_close(w, 2.0 * p.gather(1, i), **F32)
    assert (w.sum(-1) < 2.0).all()


# ---- dispatch
def test_sorted_dispatch_equals_naive_per_token_reference_float64():
    torch.manual_seed(1)
    m = MoE(tiny(n_routed_experts=8, n_activated_experts=3)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), naive_per_token(m, x), **F64)


def test_grouped_mm_path_equals_reference_and_loops_float32(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm; only the loop path exists")
    calls = []
    real = torch._grouped_mm

    def counting_grouped_mm(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting_grouped_mm)
    m = MoE(tiny(n_routed_experts=8, n_activated_experts=2))
    x = torch.randn(4, 9, 16)
    y = m(x)
    assert len(calls) == 3, "float32 on CPU with aligned sizes must take the grouped-matmul path"
    torch.testing.assert_close(y, naive_per_token(m, x), **F32)
    # the official torch.where loop
    torch.testing.assert_close(moe.official_loop_forward(m, x).view_as(y), y, **F32)
    params = [m.experts.w1, m.experts.w2, m.gate.weight]
    grads = torch.autograd.grad(y.sum(), params)
    m.dispatch = "loop"
    y_loop = m(x)
    torch.testing.assert_close(y_loop, y, **F32)
    for g, g_loop in zip(grads, torch.autograd.grad(y_loop.sum(), params)):
        torch.testing.assert_close(g_loop, g, **F32)


def test_no_token_is_dropped_even_when_all_choose_one_expert():
    m = MoE(tiny(n_activated_experts=2)).double()
    # every token routes to expert 3
    m.gate.bias[3] = 100.0
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    y = m(x)
    assert m.last_load[3] == 100 and m.last_load.sum() == 100 * 2, \
        "each token fills exactly k slots"
    torch.testing.assert_close(y, naive_per_token(m, x), **F64)


@pytest.mark.points(0)
def test_expert_helper_maps_to_the_official_layout():
    m = MoE(tiny())
    assert m.experts.w1.shape == (8, 8, 16) and m.experts.w2.shape == (8, 16, 8)
    e = m.expert(2)
    assert set(e.state_dict()) == {"w1.weight", "w2.weight", "w3.weight"}
    x = torch.randn(5, 16)
    h = F.silu(F.linear(x, m.experts.w1[2])) * F.linear(x, m.experts.w3[2])
    ref = F.linear(h, m.experts.w2[2])
    torch.testing.assert_close(e(x), ref, **F32)


# ---- balancing
@pytest.mark.points(3)
def test_bias_update_follows_sign_rule_once_per_step():
    m = MoE(tiny(bias_update_speed=0.01))
    x1 = torch.randn(2, 6, 16)
    x2 = torch.randn(3, 6, 16)
    m(x1)
    load = m.last_load.clone()
    # a second micro-batch, same step
    m(x2)
    load += m.last_load
    assert torch.equal(m.gate.bias, torch.zeros(8)), "forward must never touch the bias"
    used = m.update_bias()
    assert torch.equal(used, load.float())
    torch.testing.assert_close(m.gate.bias, 0.01 * torch.sign(load.float().mean() - load.float()))
    m.eval()
    m(x1)
    assert torch.equal(m.update_bias(), torch.zeros(8)), \
        "eval forwards must not count, and counts reset"
    for balance in ("aux", "none"):
        other = MoE(tiny(balance=balance))
        other(x1)
        assert other.update_bias().sum() == 2 * 6 * 2
        assert torch.equal(other.gate.bias, torch.zeros(8))


def _dist_worker(rank: int, port: int, out: str):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2)
    torch.manual_seed(0)
    m = MoE(tiny(bias_update_speed=0.1))
    if rank == 0:
        m.counts = torch.tensor([4, 0, 0, 0, 0, 0, 0, 0])
    else:
        m.counts = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1])
    load = m.update_bias()
    torch.save({"load": load, "bias": m.gate.bias.clone()}, os.path.join(out, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.points(2)
def test_bias_update_sums_loads_across_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_dist_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    # mean 11/8: expert 0 over, the rest under
    total = torch.tensor([4., 1, 1, 1, 1, 1, 1, 1])
    assert torch.equal(r0["load"], total) and torch.equal(r1["load"], total)
    torch.testing.assert_close(r0["bias"], 0.1 * torch.sign(total.mean() - total))
    assert torch.equal(r0["bias"], r1["bias"]), "every process must apply the same update"


def test_sequence_wise_loss_matches_hand_computation():
    # E = 4, k = 2, T = 2; the gate weight is the identity, so x = logit(s) gives these affinities.
    s = torch.tensor([[0.9, 0.6, 0.1, 0.4], [0.2, 0.8, 0.6, 0.4]])   # chosen: {0, 1} then {1, 2}
    # s' = s / 2 per row; P = mean_t s' = [.275, .35, .175, .2]; f = E/(kT) * counts = [1, 2, 1, 0]
    hand = 0.275 * 1 + 0.35 * 2 + 0.175 * 1 + 0.2 * 0                      # = 1.15
    # aux: the batch is this one sequence
    for balance, alpha in (("none", 1e-4), ("aux", 1e-4 + 1e-2)):
        m = MoE(MoEConfig(dim=4, moe_inter_dim=4, n_routed_experts=4, seq_aux_alpha=1e-4,
                          balance=balance))
        m.gate.weight.data = torch.eye(4)
        m(torch.logit(s)[None])
        assert math.isclose(m.aux_loss.item(), alpha * hand, rel_tol=1e-5)
    term = moe.balance_term(s[None], torch.tensor([[[0, 1], [1, 2]]]))
    assert math.isclose(term.item(), hand, rel_tol=1e-6)


def test_sequence_wise_loss_averages_over_sequences_and_is_zero_when_off():
    s = torch.rand(3, 5, 8) + 0.05
    idx = s.topk(2).indices
    per_seq = torch.stack([moe.balance_term(s[b:b + 1], idx[b:b + 1])[0] for b in range(3)])
    torch.testing.assert_close(moe.balance_term(s, idx), per_seq, **F32)
    m = MoE(tiny(seq_aux_alpha=0.0, balance="lossfree"))
    m(torch.randn(2, 4, 16))
    assert m.aux_loss.item() == 0.0


@pytest.mark.points(0)
def test_max_violation_on_known_loads():
    assert moe.max_violation(torch.tensor([10, 10, 10, 10])) == 0.0
    assert moe.max_violation(torch.tensor([40, 0, 0, 0])) == 3.0          # (40 - 10) / 10
    assert math.isclose(moe.max_violation(torch.tensor([2.0, 4.0, 6.0])), 0.5)
    with pytest.raises(ValueError, match="at least one routed token"):
        moe.max_violation(torch.zeros(4))


def test_model_helpers_sum_over_layers():
    model = torch.nn.Sequential(MoE(tiny(seq_aux_alpha=0.1)), MoE(tiny(seq_aux_alpha=0.1)))
    assert moe.moe_aux_loss(torch.nn.Linear(2, 2)).item() == 0.0
    model(torch.randn(2, 4, 16))
    torch.testing.assert_close(moe.moe_aux_loss(model), model[0].aux_loss + model[1].aux_loss)
    loads = [m.counts.clone() for m in model]
    stats = moe.update_gate_biases(model)
    assert math.isclose(stats["maxvio_batch"], sum(moe.max_violation(l) for l in loads) / 2)
    total, active = moe.param_counts(model)
    per_layer = 8 * 16 + 8 * 3 * 16 * 8 + 3 * 16 * 8                  # gate + 8 routed + 1 shared
    assert total == 2 * per_layer and active == total - 2 * 6 * 3 * 16 * 8, \
        "6 of 8 routed experts idle"


# ---- configs
@pytest.mark.points(0)
@pytest.mark.parametrize("kw, message", [
    (dict(n_routed_experts=4, n_activated_experts=5), "n_activated_experts=5"),
    (dict(n_expert_groups=2, n_limited_groups=3), "n_limited_groups=3"),
    (dict(n_routed_experts=8, n_expert_groups=3), "split evenly"),
    (dict(n_routed_experts=8, n_expert_groups=8, n_limited_groups=2), "top-2"),
    (dict(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=3),
     "kept groups"),
    (dict(score_func="relu"), "score_func"),
    (dict(balance="magic"), "balance"),
    (dict(bias_update_speed=-1.0), ">= 0"),
])
def test_bad_configs_raise_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        MoE(tiny(**kw))


def test_demo_small_reports_the_contract_keys():
    keys = {"maxvio_batch_start", "maxvio_batch_final", "maxvio_noise_floor", "maxvio_global_none",
            "maxvio_global_aux", "maxvio_global_lossfree", "loss_none", "loss_aux", "loss_lossfree"}
    out = moe.demo(small=True)
    assert keys <= set(out) and all(isinstance(v, (int, float)) for v in out.values())
    assert not any(k.startswith("ms_") for k in out), \
        "the dispatch's speed is ours, not the paper's claim: notebook 02 times it"
    assert out["maxvio_batch_final"] < out["maxvio_batch_start"], \
        "the bias must reduce the skewed router's MaxVio"
    # the bands tests/grade.py checks on `python moe.py --json --small`
    assert not demo_figures.unmet("moe", out), "\n".join(demo_figures.unmet("moe", out))


def test_bf16_autocast_runs_and_stays_close_to_float32():
    m = MoE(tiny(dim=64, moe_inter_dim=32))
    x = torch.randn(4, 32, 64)
    ref = m(x)
    for dispatch in ("grouped", "loop"):
        m.dispatch = dispatch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        # bf16 keeps ~3 significant digits
        torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_matches_float32_reference():
    m = MoE(tiny(dim=64, moe_inter_dim=32)).cuda()
    x = torch.randn(4, 32, 64, device="cuda")
    ref = m(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    # bf16 keeps ~3 significant digits
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_few_token_decode_path_equals_the_sorted_dispatch(monkeypatch):
    # all_experts (every expert on every token, gated; used without autograd for <= FEW_TOKENS
    # tokens) must give the dispatch's output, loads and no balance loss.
    calls = []
    real = moe.all_experts

    def spy(*args):
        calls.append(args[0].size(0))
        return real(*args)

    monkeypatch.setattr(moe, "all_experts", spy)
    torch.manual_seed(0)
    m = MoE(tiny()).double().eval()
    for n in (1, 5, moe.FEW_TOKENS):
        x = torch.randn(1, n, 16, dtype=torch.float64)
        slow = m(x).detach()
        slow_load = m.last_load.clone()
        assert m.aux_loss.item() > 0, "with autograd the sequence-wise loss is computed"
        with torch.no_grad():
            fast = m(x)
        assert calls[-1] == n, "without autograd a few tokens take the all-experts path"
        torch.testing.assert_close(fast, slow, **F64)
        assert torch.equal(m.last_load, slow_load)
        assert m.aux_loss.item() == 0.0, "without autograd the balance losses are skipped"
    with torch.no_grad():
        m(torch.randn(1, moe.FEW_TOKENS + 1, 16, dtype=torch.float64))
    assert calls[-1] == moe.FEW_TOKENS, "above FEW_TOKENS the sorted dispatch runs"
