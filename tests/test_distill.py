"""distill.py: the rejection filter, the two distillation losses, the student, and an end-to-end smoke run."""
import json
import os

import pytest
import torch

import distill
import grpo
import train
from moe import MoE

WIDTH = 6


def tiny_world():
    tc = train.TrainConfig(max_digits=WIDTH)
    enc, _, _ = train.make_tokenizer_and_world(tc, 8)
    return enc, tc


def traces_from_texts(enc, problems, texts):
    """A grpo.Rollout the way rollout() lays it out, for hand-written responses."""
    prompts = grpo.template(problems, WIDTH)
    rows = [(train.encode(enc, p), train.encode(enc, r)) for p, r in zip(prompts, texts)]
    T = max(len(p) + len(r) for p, r in rows)
    tokens, mask = torch.full((len(rows), T), train.special_id(enc, "<|pad|>")), torch.zeros(len(rows), T - 1)
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
    return grpo.Rollout(tokens, mask, torch.arange(len(rows)), torch.zeros(len(rows)), list(texts),
                        [a + b for a, b in problems], 0.0)


# ----------------------------------------------------------------------------- rejection sampling

GOOD_THINK = train.render(4738, 2591, True, WIDTH)[1]          # correct, reasons
GOOD_DIRECT = train.render(4738, 2591, False, WIDTH)[1]        # correct, answers directly
CASES = [(GOOD_THINK, True), (GOOD_DIRECT, True), (GOOD_THINK + "<|eos|>", True),
         ("<answer>0007330</answer>", False),                              # wrong
         ("<think>x</think><answer>0007329</answer><answer>0007329</answer>", False),   # two answers
         ("<think>x<answer>0007329</answer>", False),                      # unclosed think
         ("<answer>0007329", False), ("7329", False), ("", False),         # no answer block
         ("<think></think><answer>0007329</answer>", False),               # empty think
         ("hello <answer>0007329</answer>", False)]                        # text outside the blocks


@pytest.mark.parametrize("text,kept", CASES)
def test_keep_trace_is_correct_and_well_formed(text, kept):
    assert distill.keep_trace(text, 4738 + 2591) is kept


def test_teacher_traces_keeps_exactly_the_good_rows(monkeypatch):
    enc, _ = tiny_world()
    problems = [(4738, 2591), (12, 7), (999, 1), (5, 5)]
    texts = [GOOD_THINK, "<answer>0000018</answer>", train.render(999, 1, True, WIDTH)[1], "<answer>0000010"]
    fake = traces_from_texts(enc, problems, texts)
    monkeypatch.setattr(grpo, "rollout", lambda *a, **k: fake)
    teacher = train.build_model(train.student_config(), enc, "cpu")
    kept, stats = distill.teacher_traces(teacher, enc, problems, WIDTH, samples=1, temperature=1.0)
    assert stats["n_traces_generated"] == 4 and stats["n_traces_kept"] == 2
    assert kept.texts == [texts[0], texts[2]] and kept.targets == [4738 + 2591, 1000]
    for i, j in enumerate((0, 2)):                           # the kept rows are the original rows, re-padded
        n = int(fake.mask[j].sum())
        assert torch.equal(kept.mask[i][kept.mask[i] > 0], fake.mask[j][fake.mask[j] > 0])
        assert enc.decode(kept.tokens[i][kept.mask[i].nonzero().squeeze(1) + 1].tolist()) == texts[j]
        assert int(kept.mask[i].sum()) == n


# ----------------------------------------------------------------------------- the losses


def test_sft_loss_counts_response_tokens_only():
    enc, _ = tiny_world()
    ro = traces_from_texts(enc, [(4738, 2591), (3, 4)], [GOOD_THINK, "<answer>0000007</answer>"])
    V = enc.n_vocab
    logits = torch.randn(2, ro.tokens.shape[1] - 1, V)
    loss = distill.sft_loss(logits, ro.tokens, ro.mask)
    nll = torch.nn.functional.cross_entropy(logits[ro.mask > 0], ro.tokens[:, 1:][ro.mask > 0])
    assert torch.allclose(loss, nll)
    prompt_pos = (ro.mask == 0)
    changed = logits.clone()
    changed[prompt_pos] += 5 * torch.randn_like(changed[prompt_pos])    # prompt and padding: no effect
    assert torch.allclose(distill.sft_loss(changed, ro.tokens, ro.mask), loss)
    changed[ro.mask > 0] += 5 * torch.randn_like(changed[ro.mask > 0])  # response: changes it
    assert not torch.allclose(distill.sft_loss(changed, ro.tokens, ro.mask), loss)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_zero_iff_equal(temperature):
    torch.manual_seed(0)
    t, mask = torch.randn(3, 5, 11), torch.tensor([[0, 1, 1, 1, 0]] * 3, dtype=torch.float)
    assert distill.kd_loss(t.clone(), t, mask, temperature).abs().item() < 1e-6
    assert distill.kd_loss(t + 3.0, t, mask).abs().item() < 1e-6               # a constant shift: same softmax
    s = t.clone()
    s[:, 0] += torch.randn(3, 11)                                              # masked position only: still 0
    assert distill.kd_loss(s, t, mask, temperature).abs().item() < 1e-6
    s[:, 2] += torch.randn(3, 11)
    kd = distill.kd_loss(s, t, mask, temperature)
    p_t, log_s = (t[:, 2] / temperature).softmax(-1), (s[:, 2] / temperature).log_softmax(-1)
    by_hand = temperature ** 2 * (p_t * (p_t.log() - log_s)).sum(-1).sum() / mask.sum()
    assert kd.item() > 0 and torch.allclose(kd, by_hand, atol=1e-6)


@pytest.mark.parametrize("mode", ["seq", "token"])
def test_distill_train_lowers_its_loss(mode):
    torch.manual_seed(0)
    enc, _ = tiny_world()
    problems = [(a * 7919 % 99999, a * 104729 % 9999) for a in range(1, 17)]
    ro = traces_from_texts(enc, problems, [train.render(a, b, True, WIDTH)[1] for a, b in problems])
    student = train.build_model(train.student_config(), enc, "cpu")
    teacher = train.build_model(train.student_config(), enc, "cpu") if mode == "token" else None
    cfg = distill.DistillConfig(updates=30, batch_size=8, lr=3e-3)
    losses = distill.distill_train(student, ro, cfg, mode, teacher)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="token needs the teacher"):
        distill.distill_train(student, ro, cfg, "token", None)


# ----------------------------------------------------------------------------- the student


def test_student_is_smaller_dense_and_shares_the_tokenizer():
    cfg = train.Config()
    student_cfg = train.student_config(cfg)
    enc, _ = tiny_world()
    teacher, student = train.build_model(cfg, enc, "cpu"), train.build_model(student_cfg, enc, "cpu")
    assert train.param_counts(student)[0] < train.param_counts(teacher)[0] / 4
    assert student_cfg.model.dim < cfg.model.dim and student_cfg.model.n_layers < cfg.model.n_layers
    assert not any(isinstance(m, MoE) for m in student.modules()) and len(student.mtp) == 0
    assert any(isinstance(m, MoE) for m in teacher.modules())
    assert student_cfg.train.max_digits == cfg.train.max_digits            # the same world
    other_seed = train.TrainConfig(seed=7)
    assert train.tokenizer_state(train.make_tokenizer_and_world(other_seed, 8)[0]) == train.tokenizer_state(enc)
    assert train.parse_config(["--student"]).model.n_dense_layers == student_cfg.model.n_layers


# ----------------------------------------------------------------------------- end to end


def test_smoke_run_end_to_end(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tc = train.TrainConfig(steps=4, batch_size=4, seq_len=64, eval_interval=4, eval_n=8, out=str(tmp_path / "t"),
                           device="cpu")
    train.train(train.Config(train=tc))
    cfg = distill.DistillConfig(teacher=str(tmp_path / "t" / "ckpt.pt"), out=str(tmp_path / "d"), seeds=2,
                                student_steps=3, trace_prompts=8, trace_samples=2, trace_temperature=1.0,
                                updates=2, batch_size=4, distill_rl_updates=1, n=4, device="cpu")
    # an untrained teacher is rarely right: accept every well-formed trace so the pipeline has data
    monkeypatch.setattr(distill, "keep_trace", lambda text, target: True)
    s = distill.run(cfg)
    for key in ("teacher_accuracy", "student_base_accuracy", "student_rl_accuracy", "student_distill_accuracy",
                "student_distill_rl_accuracy", "student_token_kd_accuracy", "n_traces_kept", "seeds", "wall_seconds"):
        assert key in s, key
    assert s["seeds"] == 2 and s["n_traces_kept"] == 16 and len(s["student_rl_accuracy_by_seed"]) == 2
    assert json.load(open(tmp_path / "d" / "summary.json")) == s
    assert os.path.getsize(tmp_path / "d" / "distill.png") > 0 and (tmp_path / "d" / "table.md").exists()
    assert (tmp_path / "d" / "student" / "ckpt.pt").exists()


def test_missing_teacher_and_bad_flags_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no teacher checkpoint"):
        distill.main(["--teacher", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit):
        distill.parse_config(["--seeds", "0"])
