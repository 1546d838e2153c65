"""grpo.py: rewards, rollouts, advantages, the clipped objective, its variants and the RL loop."""
import dataclasses
import json
import math
import os

import pytest
import torch

import grpo
import mla
import train
from mtp import MTPConfig
from test_train import tiny_config

torch.set_num_threads(1)  # tiny tensors: one thread avoids stalls on a shared CPU

# float64 on hand-built tensors: equal up to rounding of the same formula; float32 model paths: the
# same ops on the same inputs, so 1e-6 covers any reassociation.
TOL64, TOL32 = 1e-12, 1e-6


def policy_config(tmp_path, **train_kw) -> train.Config:
    """tiny_config with every FFN dense and no MTP module. GRPO is an assignment graded alone, so
    its policy must not run the MoE gate or the MTP module, which belong to other assignments
    (test_distill runs GRPO's loop on the full model)."""
    cfg = tiny_config(tmp_path, **train_kw)
    cfg.model = dataclasses.replace(cfg.model, n_dense_layers=cfg.model.n_layers,
                                    mtp=MTPConfig(n_mtp_depth=0))
    return cfg


@pytest.fixture(autouse=True)
def _naive_decoding(monkeypatch):
    """Rollouts decode with MLA's naive attention: the absorbed path is the MLA assignment, so an
    unfinished one must not fail GRPO's tests (test_mla proves the two paths equal)."""
    monkeypatch.setattr(mla.MLA, "_attend_absorb", mla.MLA._attend_naive)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random policy (MLA, dense FFNs) with its tokenizer and config."""
    torch.manual_seed(0)
    cfg = policy_config(tmp_path_factory.mktemp("grpo"))
    enc, _, _ = train.make_tokenizer_and_world(cfg.train, 8)
    return cfg, enc, train.build_model(cfg, enc, "cpu")


# ----------------------------------------------------------------------------- advantages


@pytest.mark.points(3)
@pytest.mark.parametrize("scale", ["mean", "std"])
def test_advantages_zero_for_equal_rewards_and_zero_mean_per_group(scale):
    rewards = torch.tensor([1., 1., 1., 1., 0., 1., 0., 0., 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    groups = torch.arange(3).repeat_interleave(4)
    A, zero_var = grpo.group_advantages(rewards, groups, scale)
    assert zero_var.tolist() == [True, False, True]
    assert torch.all(A[:4] == 0) and torch.all(A[8:] == 0), "a group of equal rewards carries no signal"
    for g in range(3):
        assert abs(A[groups == g].sum().item()) < TOL64, f"group {g}: advantages must sum to 0"
    # hand values for group 1, rewards [0, 1, 0, 0]: mean 0.25, population std sqrt(3)/4
    expect = torch.tensor([-0.25, 0.75, -0.25, -0.25], dtype=torch.float64)
    expect = expect / (math.sqrt(3) / 4) if scale == "std" else expect
    torch.testing.assert_close(A[4:8], expect, rtol=0, atol=TOL64)


@pytest.mark.points(2)
def test_groups_need_not_be_contiguous():
    rewards = torch.tensor([1., 0., 0., 1.])
    A, _ = grpo.group_advantages(rewards, torch.tensor([0, 1, 0, 1]), "mean")
    assert A.tolist() == [0.5, -0.5, -0.5, 0.5]


# ----------------------------------------------------------------------------- the objective


@pytest.mark.points(3)
def test_clipped_objective_matches_hand_computation_both_signs():
    # ratios 0.5, 1.0, 1.5 on three response tokens; eps_low = 0.2, eps_high = 0.3
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]] * 2, dtype=torch.float64)).requires_grad_()
    A, mask = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    loss, st = grpo.grpo_loss(logp, old, A, mask, eps_low=0.2, eps_high=0.3, aggregation="token")
    # A = +1: min(r, clip(r, 0.8, 1.3))        = [0.5, 1.0, 1.3]   (the 1.5 is clipped: no gain past 1.3)
    # A = -1: min(-r, -clip(r, 0.8, 1.3))      = [-0.8, -1.0, -1.5] (the 0.5 is clipped: no gain below 0.8)
    hand = -(0.5 + 1.0 + 1.3 - 0.8 - 1.0 - 1.5) / 6
    assert abs(loss.item() - hand) < TOL64
    assert abs(st["clip_frac"] - 2 / 6) < TOL64
    loss.backward()
    # d(-l)/d logp = -A r where unclipped, 0 where clipped; / 6 tokens
    expect = torch.tensor([[-0.5, -1.0, 0.0], [0.0, 1.0, 1.5]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, expect, rtol=0, atol=TOL64)


@pytest.mark.points(0)
def test_k3_is_nonnegative_and_zero_when_policies_equal():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 32, generator=g, dtype=torch.float64) - 2
    ref = torch.randn(64, 32, generator=g, dtype=torch.float64) - 2
    assert torch.all(grpo.k3_kl(logp, ref) >= 0)
    assert torch.all(grpo.k3_kl(logp, logp) == 0)
    # k3 is an unbiased estimate of KL(pi || ref): check on a categorical distribution by sampling
    p, q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = grpo.k3_kl(p.log()[x], q.log()[x]).mean().item()
    exact = (p * (p / q).log()).sum().item()
    assert abs(estimate - exact) < 0.01, f"k3 mean {estimate:.4f} vs exact KL {exact:.4f}"


@pytest.mark.points(2)
def test_kl_penalty_enters_loss_with_beta():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25, 0.25]], dtype=torch.float64))
    A, mask = torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    loss, st = grpo.grpo_loss(logp, None, A, mask, ref_logp=ref, beta=0.1)
    k3 = (0.5 - math.log(0.5) - 1 + 0) / 2          # token 1: ratio ref/pi = 0.5; token 2: equal
    assert abs(st["kl"] - k3) < TOL64 and abs(loss.item() - 0.1 * k3) < TOL64
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, None, A, mask, beta=0.1)


@pytest.mark.points(3)
@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_each_aggregation_matches_its_formula(aggregation):
    g = torch.Generator().manual_seed(1)
    N, T, L = 4, 6, 10
    logp = torch.randn(N, T, generator=g, dtype=torch.float64) * 0.1
    old = torch.randn(N, T, generator=g, dtype=torch.float64) * 0.1
    A = torch.tensor([1.0, -2.0, 0.5, 0.5], dtype=torch.float64)
    lengths = [1, 3, 6, 4]                              # very different lengths: the variants differ
    mask = torch.zeros(N, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    loss, _ = grpo.grpo_loss(logp, old, A, mask, eps_low=0.99, eps_high=1e9, aggregation=aggregation, max_len=L)
    l = [[math.exp(logp[i, t] - old[i, t]) * A[i].item() for t in range(T) if mask[i, t]] for i in range(N)]
    hand = {"seq": -sum(sum(li) / len(li) for li in l) / N,          # GRPO: mean over sequences of their means
            "token": -sum(map(sum, l)) / sum(lengths),                # DAPO: one mean over all tokens
            "constant": -sum(map(sum, l)) / (N * L)}[aggregation]     # Dr. GRPO: a constant denominator
    assert abs(loss.item() - hand) < TOL64


@pytest.mark.points(2)
def test_mu1_gradient_equals_reinforce_with_group_mean_baseline(tiny):
    cfg, enc, model = tiny
    g = torch.Generator().manual_seed(0)
    ro = grpo.rollout(model, enc, grpo.template([(3, 4), (12, 7)], 2), [7, 19], 4, 1.0, 12,
                      lambda text, y: float(len(text) % 3), g)
    A, _ = grpo.group_advantages(ro.rewards, ro.group_ids, "mean")
    grads = []
    for objective in ("grpo", "reinforce"):
        model.zero_grad()
        logp, _ = grpo.token_logprobs(model, ro.tokens)
        if objective == "grpo":
            loss, st = grpo.grpo_loss(logp, None, A, ro.mask, aggregation="token")
            assert st["ratio_mean"] == 1.0 and st["clip_frac"] == 0.0
        else:  # REINFORCE: -sum_i (r_i - mean_group(r)) sum_t log pi(o_it) / number of tokens
            baseline = torch.stack([ro.rewards[ro.group_ids == i].mean() for i in ro.group_ids])
            loss = -((ro.rewards - baseline)[:, None] * logp * ro.mask).sum() / ro.mask.sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0, "the rewards must differ within a group for this test to mean anything"
    torch.testing.assert_close(grads[0], grads[1], rtol=TOL32, atol=TOL32)


@pytest.mark.points(0)
def test_ratio_is_one_at_first_inner_step(tiny):
    cfg, enc, model = tiny
    model.train()
    ro = grpo.rollout(model, enc, grpo.template([(5, 6), (1, 23)], 2), [11, 24], 3, 1.0, 12,
                      generator=torch.Generator().manual_seed(2))
    old = grpo.frozen_logprobs(grpo.frozen_copy(model), ro.tokens)   # stored at sampling time (pi_old)
    logp, _ = grpo.token_logprobs(model, ro.tokens)     # first inner step, train mode
    ratio = torch.exp(logp - old)[ro.mask.bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=TOL32)


@pytest.mark.points(2)
def test_second_inner_step_uses_pi_old_stored_at_sampling(tiny):
    cfg, enc, model = tiny
    model = grpo.frozen_copy(model).train().requires_grad_(True)
    ro = grpo.rollout(model, enc, grpo.template([(5, 6), (1, 23)], 2), [11, 24], 4, 1.0, 12,
                      lambda text, y: float(len(text) % 2), torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gcfg = grpo.GRPOConfig(mu=2, eps_low=1e-3, eps_high=1e-3)
    stats = grpo.grpo_step(model, opt, grpo.frozen_copy(model), ro, gcfg, 12)   # stats of the 2nd inner step
    assert stats["ratio_mean"] != 1.0, "after one update pi_theta differs from the stored pi_old"
    assert stats["clip_frac"] > 0, "with eps = 1e-3 the second step must clip some tokens"


def test_zero_variance_groups_are_reported_and_optionally_skipped(tiny):
    cfg, enc, model = tiny
    model = grpo.frozen_copy(model).train().requires_grad_(True)
    ro = grpo.rollout(model, enc, grpo.template([(5, 6), (1, 23)], 2), [11, 24], 3, 1.0, 12,
                      lambda text, y: float(y == 11), torch.Generator().manual_seed(5))   # equal within groups
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = grpo.grpo_step(model, opt, grpo.frozen_copy(model), ro, grpo.GRPOConfig(skip_zero_var=True), 12)
    assert stats["zero_var_frac"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "no group left: no update"


# ----------------------------------------------------------------------------- rollouts and masking


@pytest.mark.points(0)
def test_group_ids_line_up_with_their_prompts(tiny):
    cfg, enc, model = tiny
    # prompts of different lengths: generate_ids batches them by length, out of order
    prompts, targets = ["<|bos|>12+3=", "<|bos|>4+5=", "<|bos|>100+99=", "<|bos|>7+80="], [15, 9, 199, 87]
    ro = grpo.rollout(model, enc, prompts, targets, 3, 1.0, 8, generator=torch.Generator().manual_seed(0))
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i, g in enumerate(ro.group_ids.tolist()):
        text = enc.decode(ro.tokens[i].tolist())
        assert text.startswith(prompts[g] + ro.texts[i]), f"row {i} is not an answer to prompt {g}"
        assert ro.targets[i] == targets[g]


@pytest.mark.points(0)
def test_mask_covers_exactly_the_response_and_padding_is_inert(tiny):
    cfg, enc, model = tiny
    ro = grpo.rollout(model, enc, ["<|bos|>1+2=", "<|bos|>345+6="], [3, 351], 4, 1.0, 10,
                      generator=torch.Generator().manual_seed(3))
    pad = model.args.pad_id
    for i in range(ro.tokens.shape[0]):
        picked = ro.tokens[i, 1:][ro.mask[i].bool()].tolist()      # the targets the loss sees
        assert enc.decode(picked) == ro.texts[i], "the loss must see the response tokens, no prompt, no pad"
        start = int(ro.mask[i].nonzero().max()) + 2                 # after the last response token
        assert torch.all(ro.tokens[i, start:] == pad), "right padding only"
    # Right padding: what sits in the padded positions cannot change a response token's log-prob.
    noisy = ro.tokens.clone()
    for i in range(noisy.shape[0]):
        start = int(ro.mask[i].nonzero().max()) + 2                 # first padded position of row i
        noisy[i, start:] = torch.randint(0, enc.n_vocab, (noisy.shape[1] - start,))
    m = ro.mask.bool()
    model.eval()
    torch.testing.assert_close(grpo.frozen_logprobs(model, ro.tokens)[m], grpo.frozen_logprobs(model, noisy)[m],
                               rtol=0, atol=TOL32)


# ----------------------------------------------------------------------------- rewards

# (completion, target, accuracy, format): strict parsing, never eval, a defined value for everything
BATTERY = [
    ("<answer>579</answer>", 579, 1, 1),
    ("<think>123+456:3+6+0=9,9 12+45:2+5+0=7,79 1+4:1+4+0=5,579</think><answer>579</answer>", 579, 1, 1),
    ("<answer>579</answer><|eos|>", 579, 1, 1),
    ("<answer>578</answer>", 579, 0, 1),                      # wrong, well-formed
    ("<answer>0579</answer>", 579, 1, 1),                     # zero-padded, as the world writes answers
    ("<answer>000</answer>", 0, 1, 1),
    ("<answer> 579</answer>", 579, 0, 1),
    ("<answer>579 </answer>", 579, 0, 1),
    ("<answer>+579</answer>", 579, 0, 1),
    ("<answer>579.0</answer>", 579, 0, 1),
    ("<answer>５７９</answer>", 579, 0, 1),                    # full-width digits: not ASCII
    ("<answer>٥٧٩</answer>", 579, 0, 1),                      # Arabic-Indic digits
    ("<answer>" + "9" * 5000 + "</answer>", int("9" * 40), 0, 1),   # huge number: capped, no int() on it
    ("<answer>" + "1" * 41 + "</answer>", int("1" * 41), 0, 1),    # past the 40-digit cap
    ("<answer>" + "0" * 38 + "42</answer>", 42, 1, 1),             # at the cap
    ("<answer>570+9</answer>", 579, 0, 1),                    # an expression is not evaluated
    ("<answer>__import__('os').system('rm -rf /')</answer>", 579, 0, 1),
    ("<answer></answer>", 0, 0, 0),                           # empty answer
    ("", 579, 0, 0),
    ("579", 579, 0, 0),
    ("<answer>579", 579, 0, 0),                               # unclosed
    ("579</answer>", 579, 0, 0),
    ("<answer>579</answer><answer>579</answer>", 579, 0, 0),  # repeated
    ("<answer>578</answer><answer>579</answer>", 579, 0, 0),  # several answers: no second chance
    ("<answer><answer>579</answer></answer>", 579, 0, 0),    # nested
    ("<think></think><answer>579</answer>", 579, 1, 0),       # empty think
    ("<think>a</think><think>b</think><answer>579</answer>", 579, 1, 0),   # two thinks
    ("<think>x<answer>1</answer></think><answer>579</answer>", 579, 0, 0),  # answer hidden in think
    ("<think>unclosed<answer>579</answer>", 579, 1, 0),
    ("<answer>579</answer></think>", 579, 1, 0),               # stray tag
    ("<answer>579</answer>trailing", 579, 1, 0),               # text after the answer
    ("preamble<answer>579</answer>", 579, 1, 0),
    ("<answer>579</answer>\n", 579, 1, 0),
    ("<think>ok</think>\n<answer>579</answer>", 579, 1, 0),
    ("<answer>579</answer><|eos|><|eos|>", 579, 1, 0),
    ("<ANSWER>579</ANSWER>", 579, 0, 0),
    ("<answer>5<!---->79</answer>", 579, 0, 0),
    ("<|pad|><answer>579</answer>", 579, 1, 0),
    ("<think>" + "<" * 10000 + "</think><answer>1</answer>", 1, 1, 0),  # pathological length: linear regex
]


@pytest.mark.points(0)
@pytest.mark.parametrize("completion,target,acc,fmt", BATTERY, ids=[repr(b[0][:30]) for b in BATTERY])
def test_reward_on_adversarial_strings(completion, target, acc, fmt):
    assert grpo.accuracy_reward(completion, target) == acc
    assert grpo.format_reward(completion) == fmt
    assert grpo.reward(completion, target) == acc + fmt, "the default reward is accuracy + format"
    assert grpo.reward(completion, target, "format") == fmt
    assert grpo.reward(completion, target, format_weight=0.5) == acc + 0.5 * fmt


@pytest.mark.points(0)
def test_reward_rejects_non_text():
    with pytest.raises(ValueError, match="str"):
        grpo.reward([1, 2, 3], 5)


# ----------------------------------------------------------------------------- the loop and the CLI


@pytest.mark.points(3)
def test_short_run_on_toy_setting_raises_the_reward(tmp_path):
    """Toy setting: a random tiny model, rewarded when its response contains the digit 7 (about 1 in 6
    random responses does). 20 GRPO steps through the real loop must raise the mean reward clearly."""
    torch.manual_seed(0)
    cfg = policy_config(tmp_path, max_digits=1)
    enc, _, _ = train.make_tokenizer_and_world(cfg.train, 8)
    model = train.build_model(cfg, enc, "cpu")
    gcfg = grpo.GRPOConfig(steps=20, n_prompts=8, group_size=8, lr=1e-2, n=8, pass_k=1, bench_prompts=0)
    summary = grpo.rl_train(model, enc, gcfg, str(tmp_path / "rl"), cfg, reward_fn=lambda text, target:
                            float("7" in text), verbose=False)
    grpo.write_outputs(summary, str(tmp_path / "rl"))
    rows = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    rewards = [r["reward"] for r in rows if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # seeds 0, 1, 2 measured (the dense policy): 0.15-0.23 -> 0.99-1.00
    assert last > first + 0.5, f"mean reward of the first 5 steps {first:.3f}, of the last 5 {last:.3f}"
    for name in ("ckpt.pt", "grpo.png", "summary.json", "metrics.jsonl"):
        assert (tmp_path / "rl" / name).exists(), f"rl_train + write_outputs must write {name}"
    assert set(summary) >= {"accuracy_before", "accuracy_after", "accuracy_t1_before", "accuracy_t1_after",
                            "think_rate_before", "think_rate_after", "length_before", "length_after",
                            "steps", "wall_seconds"}
    # the R1-Zero issue's contract: what the README, notebooks and checks read
    assert set(summary) >= {"format_rate_before", "format_rate_after",
                            "verification_rate_before", "verification_rate_after",
                            "correction_rate_after", "consistency_before", "consistency_after",
                            "mixing_rate_before", "mixing_rate_after", "steps_to_90"}
    step_rows = [r for r in rows if "reward" in r]
    assert all({"length", "verification_rate", "mixing_rate", "truncation_rate"} <= set(r)
               for r in step_rows)
    assert all(len(r["lengths"]) == 8 * 8 for r in step_rows)
    assert json.load(open(tmp_path / "rl" / "summary.json"))["steps"] == 20
    train.load_checkpoint(str(tmp_path / "rl" / "ckpt.pt"))      # the checkpoint format of train.py


@pytest.mark.points(0)
def test_eval_cli_loads_a_grpo_checkpoint_and_prints_json(tiny, tmp_path, capsys):
    cfg, enc, model = tiny
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, model, None, 3, cfg, enc)
    grpo.main(["--eval", path, "--n", "4", "--pass-k", "2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"accuracy", "accuracy_t1", "think_rate", "mean_length", "pass_at_k"}
    assert res["n"] == 4 and 0 <= res["accuracy"] <= 1


@pytest.mark.points(0)
def test_missing_checkpoint_tells_the_user_to_run_train_first(tmp_path):
    with pytest.raises(SystemExit, match="python train.py"):
        grpo.main(["--init", str(tmp_path / "nope.pt")])


@pytest.mark.points(0)
@pytest.mark.parametrize("knob", [dict(group_size=1), dict(advantage="median"), dict(aggregation="sum"),
                                  dict(mu=0), dict(beta=-1.0), dict(lr=0.0), dict(reward="length"), dict(eps_low=1.0)])
def test_bad_config_raises_value_error(knob):
    with pytest.raises(ValueError, match="GRPOConfig"):
        grpo.GRPOConfig(**knob).validate()


@pytest.mark.points(0)
def test_format_control_writes_to_its_own_folder():
    assert grpo.parse_config(["--reward", "format"]).out == "out/grpo_format_control"
    assert grpo.parse_config([]).out == "out/grpo"


def test_steps_to_90_is_the_first_evaluation_at_0_9(tiny, monkeypatch):
    """steps_to_90: the first RL step whose held-out evaluation reaches 0.9 (None if never)."""
    cfg, enc, model = tiny
    accuracies = iter([0.1, 0.5, 0.95, 0.85])
    real = grpo.evaluate_policy

    def scripted(*args, **kw):
        return {**real(*args, **kw), "accuracy": next(accuracies)}

    monkeypatch.setattr(grpo, "evaluate_policy", scripted)
    gcfg = grpo.GRPOConfig(steps=6, n_prompts=2, group_size=2, n=4, pass_k=1, eval_interval=2,
                           bench_prompts=0)
    summary = grpo.rl_train(train.Transformer(model.args), enc, gcfg, None, cfg, verbose=False)
    assert summary["steps_to_90"] == 4 and summary["accuracy_after"] == 0.85
    accuracies = iter([0.1, 0.5, 0.6, 0.7])
    assert grpo.rl_train(train.Transformer(model.args), enc, gcfg, None, cfg,
                         verbose=False)["steps_to_90"] is None


def test_compile_flag_compiles_the_rollouts_decode_step(tiny, monkeypatch):
    # --compile makes rl_train call compile_decode once before the first rollout (the compiled
    # step's equality with eager decoding is tested in test_train)
    cfg, enc, model = tiny
    calls = []
    monkeypatch.setattr(train.Transformer, "compile_decode", lambda self: calls.append(self))
    assert grpo.parse_config(["--compile"]).compile and not grpo.GRPOConfig().compile
    policy = train.Transformer(model.args)
    gcfg = grpo.GRPOConfig(steps=1, n_prompts=2, group_size=2, n=4, pass_k=1, bench_prompts=0,
                           compile=True)
    grpo.rl_train(policy, enc, gcfg, None, cfg, verbose=False)
    assert calls == [policy]
