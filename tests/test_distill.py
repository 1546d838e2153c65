"""distill.py: the rejection filter, the two distillation losses, the student, and an end-to-end smoke run."""
import json
import os

import pytest
import torch

import distill
import grpo
import mla
import train
from moe import MoE

WIDTH = 6


@pytest.fixture(autouse=True)
def _naive_decoding(monkeypatch):
    """Rollouts decode with MLA's naive attention, and the tiny teachers below are dense with no
    MTP module: distillation is an assignment graded alone, so MLA's, MoE's and MTP's regions
    (other assignments) must not decide these tests."""
    monkeypatch.setattr(mla.MLA, "_attend_absorb", mla.MLA._attend_naive)


def tiny_world():
    tc = train.TrainConfig(max_digits=WIDTH)
    enc, _, _ = train.make_tokenizer_and_world(tc, 8)
    return enc, tc


def traces_from_texts(enc, problems, texts):
    """A grpo.Rollout the way rollout() lays it out, for hand-written responses."""
    prompts = [train.encode(enc, p) for p in grpo.template(problems, WIDTH)]
    tokens, mask = grpo.layout(prompts, [train.encode(enc, r) for r in texts],
                               train.special_id(enc, "<|pad|>"))
    ids = [train.encode(enc, r) for r in texts]
    return grpo.Rollout(tokens, mask, torch.arange(len(texts)), torch.zeros(len(texts)),
                        list(texts), [a + b for a, b in problems], 0.0, ids)


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


@pytest.mark.points(0)
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


@pytest.mark.points(0)
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


@pytest.mark.points(0)
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


@pytest.mark.points(0)
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


@pytest.mark.points(0)
def test_smoke_run_end_to_end(tmp_path, monkeypatch):
    torch.manual_seed(0)
    # a tiny teacher on 2-digit sums, and RL on 2 prompts x G = 2: a smoke run, not a measurement
    tiny = train.tiny_config(steps=4, eval_interval=4, eval_n=8, out=str(tmp_path / "t"), device="cpu",
                             student=True)
    train.train(tiny)
    monkeypatch.setattr(grpo, "GRPOConfig", small_rl(grpo.GRPOConfig))
    cfg = distill.DistillConfig(teacher=str(tmp_path / "t" / "ckpt.pt"), out=str(tmp_path / "d"), seeds=2,
                                student_steps=3, trace_prompts=8, trace_samples=2, trace_temperature=1.0,
                                updates=2, batch_size=4, distill_rl_updates=1, n=4, device="cpu")
    # an untrained teacher is rarely right: accept every well-formed trace so the pipeline has data
    monkeypatch.setattr(distill, "keep_trace", lambda *args: True)
    s = distill.run(cfg)
    for key in ("teacher_accuracy", "student_base_accuracy", "student_rl_accuracy", "student_distill_accuracy",
                "student_distill_rl_accuracy", "student_token_kd_accuracy", "n_traces_kept", "seeds", "wall_seconds"):
        assert key in s, key
    assert s["seeds"] == 2 and s["n_traces_kept"] == 16 and len(s["student_rl_accuracy_by_seed"]) == 2
    assert json.load(open(tmp_path / "d" / "summary.json")) == s
    assert os.path.getsize(tmp_path / "d" / "distill.png") > 0 and (tmp_path / "d" / "table.md").exists()
    assert (tmp_path / "d" / "student" / "ckpt.pt").exists()


@pytest.mark.points(0)
def test_missing_teacher_and_bad_flags_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no teacher checkpoint"):
        distill.main(["--teacher", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit):
        distill.parse_config(["--seeds", "0"])


# ---- R1's recipe (--recipe r1): the stricter filter, the cold start, the stages chained

W4 = 4
SYM = "<think>" + train.readable_solution(4738, 2591, W4)          # right, one notation
WORD = "<think>" + train.readable_solution(4738, 2591, W4, "word")
SWITCHED = SYM.replace("3 + 9 + 0 = 12", "3 plus 9 plus 0 is 12")  # right, but mixed
R1_CASES = [(SYM, 60, True), (SYM + "<|eos|>", 60, True), (WORD, 60, False), (SWITCHED, 60, False),
            # right and well-formed but no column worked: nothing in the target notation
            ("<think>07329</think><answer>07329</answer>", 60, False),
            # a wrong sum in the right notation
            (SYM.replace("<answer>07329", "<answer>07330"), 60, False),
            # over-long: more tokens than allowed
            (SYM, 61, False)]


@pytest.mark.parametrize("text,n_tokens,kept", R1_CASES)
def test_r1_filter_keeps_right_single_notation_traces_of_bounded_length(text, n_tokens, kept):
    assert distill.keep_trace(text, 4738 + 2591, train.PROMPT_NOTATION, n_tokens, 60) is kept
    # distillation's filter (no notation, no length bound) keeps every right, well-formed one
    assert distill.keep_trace(text, 4738 + 2591) is (text.count("07330") == 0 and "07329" in text)


def test_cold_start_traces_are_the_rule_s_readable_solutions_laid_out_for_sft():
    enc, _ = tiny_world()
    problems = [(4738, 2591), (5, 7), (999999, 1)]
    cold = distill.cold_start_traces(enc, problems, WIDTH, train.special_id(enc, "<|pad|>"))
    assert cold.targets == [7329, 12, 1000000]
    for i, (a, b) in enumerate(problems):
        # the masked positions predict exactly the readable solution and its <|eos|>
        response = cold.tokens[i][cold.mask[i].nonzero().squeeze(1) + 1].tolist()
        assert enc.decode(response) == train.readable_solution(a, b, WIDTH) + "<|eos|>"
        assert cold.texts[i] == "<think>" + train.readable_solution(a, b, WIDTH)
        assert distill.keep_trace(cold.texts[i], a + b, train.PROMPT_NOTATION)
        prompt = cold.tokens[i][:int(cold.mask[i].nonzero()[0]) + 1].tolist()
        assert enc.decode(prompt) == grpo.template([(a, b)], WIDTH)[0]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny zero-world model (2-digit sums) and an R1-Zero run of 2 steps from it."""
    root = tmp_path_factory.mktemp("r1")
    torch.manual_seed(0)
    # module-scoped: the autouse naive-decoding fixture does not reach here
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mla.MLA, "_attend_absorb", mla.MLA._attend_naive)
        cfg = train.tiny_config(steps=30, eval_interval=30, out=str(root / "pre"), device="cpu",
                                student=True)
        train.train(cfg)
        model, enc, base_cfg, _ = train.load_checkpoint(str(root / "pre" / "ckpt.pt"))
        g = grpo.GRPOConfig(steps=2, n_prompts=2, group_size=2, n=4, pass_k=1, bench_prompts=0)
        summary = grpo.rl_train(model, enc, g, str(root / "zero"), base_cfg, verbose=False)
    grpo.write_outputs(summary, str(root / "zero"))
    return root


@pytest.mark.points(0)
def test_r1_pipeline_chains_its_stages_and_fine_tunes_the_base(tiny_base, tmp_path, monkeypatch):
    root = tiny_base
    base, _, _, _ = train.load_checkpoint(str(root / "pre" / "ckpt.pt"))
    base_sum = sum(p.double().sum().item() for p in base.parameters())
    started_from = []
    real_train = distill.distill_train

    def recording(model, traces, cfg, *args, **kwargs):
        started_from.append(sum(p.double().sum().item() for p in model.parameters()))
        return real_train(model, traces, cfg, *args, **kwargs)

    # a tiny model's stage 2 is rarely right: keep every trace so stage 3 has data
    monkeypatch.setattr(distill, "distill_train", recording)
    monkeypatch.setattr(distill, "keep_trace", lambda *args: True)
    monkeypatch.setattr(grpo, "GRPOConfig", small_rl(grpo.GRPOConfig))
    cfg = distill.DistillConfig(recipe="r1", init=str(root / "pre" / "ckpt.pt"),
                                rl_init=str(root / "zero"), out=str(tmp_path / "r1"),
                                cold_start=8, sft_updates=2, sft_batch_size=4, rl_steps=2,
                                rs_prompts=4, trace_samples=1, n=4, k=1, ablate=True,
                                device="cpu")
    s = distill.run_r1(cfg)
    names = [r["name"] for r in s["stages"]]
    assert names == ["base", "r1_zero", "cold_start", "reasoning_rl_no_consistency",
                     "reasoning_rl", "rejection_sft", "final_rl"]
    for key in ("r1_zero_accuracy", "r1_accuracy", "r1_zero_consistency", "r1_consistency",
                "r1_zero_steps_to_90", "r1_steps_to_90", "wall_seconds", "stages",
                "consistency_reward_accuracy_change"):
        assert key in s, key
    for r in s["stages"]:
        assert {"name", "accuracy", "consistency", "length", "steps"} <= set(r)
    # R1-Zero reused from --rl-init: its steps and its checkpoint's accuracy
    assert s["stages"][1]["steps"] == 2 and s["r1_zero_steps"] == 2 and s["r1_steps"] == 4
    assert s["r1_accuracy"] == s["stages"][-1]["accuracy"]
    # stage 1 and stage 3 both start from the base (R1 fine-tunes V3-Base, not the RL model)
    assert started_from == pytest.approx([base_sum, base_sum], rel=1e-9)
    assert json.load(open(tmp_path / "r1" / "summary.json")) == s
    for f in ("table.md", "r1.png", "cold_start/ckpt.pt", "reasoning_rl/metrics.jsonl",
              "rejection_sft/ckpt.pt", "final_rl/ckpt.pt"):
        assert (tmp_path / "r1" / f).exists(), f
    # the stage-4 checkpoint is R1: it loads like any checkpoint of the project
    final, _, final_cfg, _ = train.load_checkpoint(str(tmp_path / "r1" / "final_rl" / "ckpt.pt"))
    assert final_cfg.train.world == "zero"


def small_rl(config_class):
    """GRPOConfig with 2 prompts x G = 2 unless told otherwise: a smoke run, not a measurement."""
    def make(**kwargs):
        return config_class(**{"n_prompts": 2, "group_size": 2, **kwargs})
    return make


@pytest.mark.points(0)
def test_r1_recipe_checks_its_inputs_before_any_work(tiny_base, tmp_path):
    root = tiny_base
    with pytest.raises(SystemExit, match="no base checkpoint"):
        distill.main(["--recipe", "r1", "--init", str(tmp_path / "nope.pt"), "--out",
                      str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="no R1-Zero run"):
        distill.main(["--recipe", "r1", "--init", str(root / "pre" / "ckpt.pt"), "--rl-init",
                      str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        distill.parse_config(["--recipe", "r2"])
    with pytest.raises(SystemExit):
        distill.parse_config(["--recipe", "r1", "--consistency-weight", "-1"])
    assert distill.parse_config(["--recipe", "r1"]).out == "out/r1"
    assert distill.parse_config([]).out == "out/distill"
    # a choice-world base has no notations to be consistent in
    choice = train.tiny_config(steps=1, eval_interval=1, world="choice", student=True,
                               out=str(tmp_path / "choice"), device="cpu")
    train.train(choice)
    with pytest.raises(SystemExit, match="not a zero-world model"):
        distill.main(["--recipe", "r1", "--init", str(tmp_path / "choice" / "ckpt.pt"),
                      "--rl-init", "", "--out", str(tmp_path / "c")])


# ------------------------------------------------------------------------ on-policy distillation

@pytest.mark.points(0)
def test_reverse_kl_by_hand_zero_at_equal_masked_and_its_gradient_sign():
    # a vocabulary of 3: student p_s = softmax(s), teacher p_t = softmax(t) at one response position
    t = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]]])                  # [1, 2, 3]
    s = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])                                         # position 1: a prompt
    loss = distill.reverse_kl_loss(s, t, mask)
    p_s = torch.full((3,), 1 / 3)
    p_t = torch.tensor([0.0, 1.0, 2.0]).softmax(-1)
    by_hand = (p_s * (p_s.log() - p_t.log())).sum()
    assert torch.allclose(loss, by_hand, atol=1e-6) and loss.item() > 0
    loss.backward()
    # mass moves toward the token the teacher likes most, away from the one it likes least
    assert s.grad[0, 0, 2] < 0 < s.grad[0, 0, 0]
    assert torch.equal(s.grad[0, 1], torch.zeros(3)), "a masked (prompt) position gets no gradient"
    assert distill.reverse_kl_loss(t.clone(), t, torch.ones(1, 2)).abs().item() < 1e-6
    # reverse, not forward: KL(p_s || p_t) differs from kd_loss's KL(p_t || p_s)
    assert abs(distill.kd_loss(s.detach(), t, mask).item() - loss.item()) > 1e-3


@pytest.mark.points(0)
def test_on_policy_distillation_lowers_the_reverse_kl_and_counts_its_compute():
    torch.manual_seed(0)
    cfg = train.tiny_config(max_digits=2, width=64, student=True)
    enc, _, _ = train.make_tokenizer_and_world(cfg.train, 8)
    teacher = train.build_model(cfg, enc, "cpu")
    student = train.build_model(train.tiny_config(max_digits=2, student=True), enc, "cpu")
    problems = [(a, 2 * a % 97) for a in range(10, 40)]
    out = distill.on_policy_distill(student, teacher, enc, problems, 2, updates=12, n_prompts=2,
                                    G=4, lr=1e-2)
    losses = out["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert out["teacher_samples"] == 0, "on-policy distillation never samples the teacher"
    assert out["teacher_forward_rows"] == out["student_samples"] == 12 * 2 * 4
    assert out["teacher_forward_tokens"] >= out["teacher_forward_rows"]


# ------------------------------------------------------------------- the distilled family (--sizes)

@pytest.mark.points(0)
def test_family_students_are_dense_share_the_world_and_grow_as_named():
    cfg = train.Config()
    enc, _ = tiny_world()
    counts = []
    for size in distill.FAMILY:
        scfg = distill.family_config(cfg, size)
        model = train.build_model(scfg, enc, "cpu")
        assert not any(isinstance(m, MoE) for m in model.modules()) and len(model.mtp) == 0
        assert scfg.train.max_digits == cfg.train.max_digits and scfg.train.student
        counts.append(sum(p.numel() for p in model.parameters()))
    # about 0.15M, 0.4M and 1M parameters, smallest first
    for n, (low, high) in zip(counts, [(0.1e6, 0.2e6), (0.35e6, 0.45e6), (0.85e6, 1.15e6)]):
        assert low < n < high, counts
    assert counts == sorted(counts)
    # the middle size is the comparison's student itself
    assert distill.family_config(cfg, "0.4M").model == train.student_config(cfg).model


@pytest.mark.points(0)
def test_teacher_compute_counters_of_sft_and_kd():
    enc, _ = tiny_world()
    problems = [(4738, 2591), (1000, 0), (12, 34), (5, 5)]
    texts = [train.render(a, b, True, WIDTH)[1] for a, b in problems]
    traces = traces_from_texts(enc, problems, texts)
    # the trace pool of the first two problems keeps exactly their rows
    pool = distill.trace_pool(traces, 2)
    assert pool.texts == texts[:2] and torch.equal(pool.tokens, traces.tokens[:2])
    torch.manual_seed(0)
    cfg = train.Config()
    teacher = train.build_model(distill.family_config(cfg, "0.4M"), enc, "cpu")
    student = train.build_model(distill.family_config(cfg, "0.15M"), enc, "cpu")
    dcfg = distill.DistillConfig(updates=3, batch_size=2)
    counters = {"teacher_forward_rows": 0, "teacher_forward_tokens": 0}
    distill.distill_train(student, traces, dcfg, "seq", seed=0, counters=counters)
    assert counters == {"teacher_forward_rows": 0, "teacher_forward_tokens": 0}, "SFT: no teacher"
    distill.distill_train(student, traces, dcfg, "token", teacher, seed=0, counters=counters)
    # 3 updates x 2 traces; one pass over the 4 traces, then half of a second pass
    assert counters["teacher_forward_rows"] == 6
    per_trace = traces.mask.sum(1)
    scored = counters["teacher_forward_tokens"]
    assert per_trace.sum() < scored <= per_trace.sum() + 2 * per_trace.max()
    c = distill.teacher_compute(samples=8, sample_tokens=100, rows=6, tokens=50)
    assert c["teacher_tokens"] == 150 and c["teacher_samples"] == 8


@pytest.mark.points(0)
def test_interpolate_reads_a_curve_between_its_points():
    points = [(200.0, 0.6), (100.0, 0.4)]
    assert distill.interpolate(points, 150.0) == pytest.approx(0.5)
    assert distill.interpolate(points, 100.0) == pytest.approx(0.4)
    assert distill.interpolate(points, 250.0) is None


TINY_FAMILY = {"a": (16, 1, 2, 8, 8, 4, 8, 32), "b": (24, 1, 2, 8, 8, 4, 8, 48)}


@pytest.mark.points(0)
def test_family_run_writes_the_contract_and_resumes_by_cell(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tiny = train.tiny_config(steps=4, eval_interval=4, eval_n=8, out=str(tmp_path / "t"),
                             device="cpu", student=True)
    train.train(tiny)
    monkeypatch.setattr(grpo, "GRPOConfig", small_rl(grpo.GRPOConfig))
    monkeypatch.setattr(distill, "FAMILY", TINY_FAMILY)
    monkeypatch.setattr(distill, "ON_POLICY_EVALS", (1,))
    # an untrained teacher is rarely right: accept every trace so the pipeline has data
    monkeypatch.setattr(distill, "keep_trace", lambda *args: True)
    out = tmp_path / "fam"
    flags = ["--teacher", str(tmp_path / "t" / "ckpt.pt"), "--out", str(out), "--sizes", "2",
             "--seeds", "2", "--student-steps", "2", "--trace-prompts", "8", "--trace-samples",
             "2", "--trace-temperature", "1", "--updates", "2", "--batch-size", "4", "--n", "4",
             "--on-policy-prompts", "2", "--device", "cpu"]
    cells = []
    real_cell = distill.family_cell

    def counting(*args, **kwargs):
        cells.append(args[4:6])
        return real_cell(*args, **kwargs)

    monkeypatch.setattr(distill, "family_cell", counting)
    # one seed per process: no summary until the other seed's cells exist
    assert distill.run_family(distill.parse_config(flags + ["--only-seeds", "1"])) is None
    assert not (out / "summary.json").exists() and cells == [("a", 1), ("b", 1)]
    with pytest.raises(SystemExit, match="already holds an earlier run"):
        distill.main(flags)
    distill.main(flags + ["--resume"])
    assert cells[2:] == [("a", 0), ("b", 0)], "--resume keeps the finished cells"
    s = json.load(open(out / "summary.json"))
    assert s["teacher_accuracy"] >= 0 and [r["size"] for r in s["rows"]] == ["a", "b"]
    for row in s["rows"]:
        for m in ("base", "rl", "rl_3x", "sft", "kd", "on_policy", "distill_rl"):
            assert 0 <= row[m] <= 1 and row[f"{m}_std"] >= 0 and len(row[f"{m}_by_seed"]) == 2
        assert row["params"] > 0
    assert s["rows"][0]["params"] < s["rows"][1]["params"]
    assert (out / "table.md").exists() and os.path.getsize(out / "family.png") > 0
    cell = json.load(open(out / "b" / "seed0" / "cell.json"))
    m = cell["methods"]
    # teacher compute per method: SFT and KD sample 8 x 2 traces, KD also scores 2 x 4 rows,
    # on-policy scores the student's 2 updates x 2 prompts x G = 8 rows and samples nothing
    assert m["sft"]["teacher_samples"] == m["kd"]["teacher_samples"] == 16
    assert m["sft"]["teacher_forward_rows"] == 0 and m["kd"]["teacher_forward_rows"] == 8
    assert m["on_policy"]["teacher_samples"] == 0 and m["on_policy"]["teacher_forward_rows"] == 32
    assert all(m[k]["teacher_tokens"] == 0 for k in ("base", "rl", "rl_3x"))
    assert m["distill_rl"]["teacher_tokens"] == m["sft"]["teacher_tokens"] > 0
    assert (m["rl"]["updates"], m["rl_3x"]["updates"]) == (2, 6)
    # the curves: SFT on growing trace pools, on-policy after 1 and 2 updates
    assert [p["prompts"] for p in cell["curve"]["sft"]] == [1, 2, 4, 8]
    tokens = [p["teacher_tokens"] for p in cell["curve"]["sft"]]
    assert tokens == sorted(tokens) and tokens[-1] == m["sft"]["teacher_tokens"]
    assert [p["updates"] for p in cell["curve"]["on_policy"]] == [1, 2]


@pytest.mark.points(0)
def test_family_flags_fail_clearly(tmp_path):
    assert distill.parse_config(["--sizes", "3"]).out == "out/distill_family"
    for flags in (["--sizes", "4"], ["--sizes", "2", "--only-seeds", "3"],
                  ["--sizes", "2", "--only-seeds", "x"], ["--on-policy-prompts", "0"]):
        with pytest.raises(SystemExit):
            distill.parse_config(flags)
    with pytest.raises(SystemExit, match="--student cannot be combined with --sizes"):
        distill.main(["--sizes", "1", "--student", "s.pt", "--teacher", __file__,
                      "--out", str(tmp_path / "f")])
