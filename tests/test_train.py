"""train.py: the assembled model, its tokenizer and world, generation, checkpoints and the loop."""
import json
import os
import random
import re
import shutil

import pytest
import torch

import train
from mla import MLACache
from moe import MoE, update_gate_biases

torch.set_num_threads(1)  # tiny tensors: one thread avoids stalls on a shared CPU


def tiny_config(tmp_path, **train_kw) -> train.Config:
    """A model of a few thousand parameters; every component (MLA, dense FFN, MoE, MTP) present."""
    args = train.parse_config(["--tiny", "--max-seq-len", "256", "--batch-size", "4", "--eval-n", "4",
                               "--log-interval", "1", "--out", str(tmp_path / "run")])
    for k, v in train_kw.items():
        setattr(args.train, k, v)
    return args


@pytest.fixture
def tiny(tmp_path):
    cfg = tiny_config(tmp_path)
    enc, heldout, world = train.make_tokenizer_and_world(cfg.train, 8)
    model = train.build_model(cfg, enc, "cpu")
    return cfg, enc, heldout, world, model


def test_tokenizer_round_trips_and_splits_digits(tiny):
    _, enc, _, _, _ = tiny
    text = "<|bos|>90817+02345=<think>7+5+0=12,_____2 1+4+1=06,____62</think><answer>093162</answer><|eos|>"
    ids = train.encode(enc, text)
    assert enc.decode(ids) == text
    for d in "0123456789":
        assert train.encode(enc, d) == [enc.encode_single_token(d)]
    digit_ids = {enc.encode_single_token(d) for d in "0123456789"}
    # every digit in the text is its own token: as many digit tokens as digits
    assert sum(i in digit_ids for i in ids) == sum(c.isdigit() for c in re.sub(r"<[^>]*>", "", text))
    for name in train.SPECIALS:
        assert train.encode(enc, name) == [train.special_id(enc, name)], f"{name} must be one token"


def test_tokenizer_survives_checkpoint_state(tiny):
    _, enc, _, _, _ = tiny
    enc2 = train.tokenizer_from_state(train.tokenizer_state(enc))
    text = "<|bos|>12+345=<answer>357</answer>"
    assert enc2.encode(text, allowed_special="all") == train.encode(enc, text)


def test_think_steps_compute_the_sum():
    rng = random.Random(0)
    for _ in range(500):
        width = rng.randint(1, 6)
        a, b = rng.randrange(10 ** width), rng.randrange(10 ** width)
        prompt, response = train.render(a, b, True, width)
        assert prompt == f"<|bos|>{a:0{width}d}+{b:0{width}d}="
        steps = re.search(r"<think>(.*)</think>", response).group(1).split(" ")
        assert len(steps) == width + 1, "one step per column, plus the final carry"
        digits, carry = "", 0
        for step, (x0, y0) in zip(steps, zip(f"{a:0{width}d}"[::-1] + "0", f"{b:0{width}d}"[::-1] + "0")):
            x, y, c, s, so_far = re.match(r"(\d)\+(\d)\+(\d)=(\d\d),([_\d]+)$", step).groups()
            x, y, c, s = map(int, (x, y, c, s))
            assert len(so_far) == width + 1, "the answer-so-far has the answer's fixed width"
            assert (x, y, c) == (int(x0), int(y0), carry), f"step {step} reads the wrong column or carry"
            assert x + y + c == s
            digits, carry = str(s % 10) + digits, s // 10
            assert so_far == digits.rjust(width + 1, "_")
        assert int(digits) == a + b and train.parse_answer(response) == a + b


def test_hasty_direct_answers_forget_exactly_the_carries():
    rng = random.Random(1)
    for _ in range(500):
        a, b = rng.randrange(10 ** rng.randint(1, 6)), rng.randrange(10 ** rng.randint(1, 6))
        w = max(len(str(a)), len(str(b)))
        no_carry = all(int(x) + int(y) < 10 for x, y in zip(str(a).zfill(w), str(b).zfill(w)))
        assert (train.hasty_sum(a, b) == a + b) == no_carry
        assert train.hasty_sum(a, b) % 10 == (a + b) % 10          # the last column never has a carry in
        hasty, worked = train.render(a, b, False, 6, hasty=True)[1], train.render(a, b, True, 6, hasty=True)[1]
        assert train.parse_answer(hasty) == train.hasty_sum(a, b) and train.parse_answer(worked) == a + b
    assert train.hasty_sum(4738, 2591) == 6229 and train.hasty_sum(999, 1) == 990


def test_heldout_problems_never_appear_in_training_data(tmp_path):
    # With 1-digit operands there are only 100 problems: hold out 30 and read 300 training rows.
    cfg = tiny_config(tmp_path, max_digits=1)
    enc, heldout, world = train.make_tokenizer_and_world(cfg.train, 30)
    assert len(set(heldout)) == 30
    seen = set()
    for j in range(300):
        text = enc.decode(world.row(j))
        seen |= {(int(a), int(b)) for a, b in re.findall(r"<\|bos\|>(\d+)\+(\d+)=", text)}
    assert len(seen) > 50, "the training stream should cover most of the 70 allowed problems"
    assert not seen & set(heldout), f"held-out problems leaked into training: {sorted(seen & set(heldout))[:5]}"


def test_harder_split_has_more_digits_than_training():
    problems = train.eval_split("harder", 50, max_digits=3)
    assert all(1000 <= a < 10000 and 1000 <= b < 10000 for a, b in problems)


def test_cached_generation_equals_uncached(tiny):
    _, enc, heldout, _, model = tiny
    model.eval()
    prompts = torch.tensor([train.encode(enc, train.render(a, b, False, 2)[0]) for a, b in [(12, 34), (56, 78)]])
    cached = model.generate(prompts, 40, temperature=0.0)
    uncached = model.generate(prompts, 40, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached), "absorbed-MLA cached decoding must reproduce full recomputation"


def test_finished_rows_leave_the_batch_without_changing_any_row(tiny, monkeypatch):
    # generate() drops finished rows (and their cache) once a quarter of the batch has stopped;
    # each row must still be what it is when generated alone (greedy)
    _, enc, _, _, model = tiny
    compacted = []

    def spy(c_kv, k_pe):
        compacted.append(c_kv.size(0))
        return MLACache(c_kv, k_pe)

    monkeypatch.setattr(train, "MLACache", spy)
    model.eval()
    problems = [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89), (10, 20), (31, 41), (59, 26)]
    x = torch.tensor([train.encode(enc, train.render(a, b, False, 2)[0]) for a, b in problems])
    free = model.generate(x, 24, temperature=0.0)
    # stop at tokens some rows emit early and others late or never
    model.args.stop_ids = tuple(sorted({int(free[i, x.size(1) + 2 + i]) for i in range(0, 8, 3)}))
    batch = model.generate(x, 24, temperature=0.0)
    stopped = [bool(set(r.tolist()) & set(model.args.stop_ids)) for r in batch[:, x.size(1):]]
    assert 2 <= sum(stopped) < 8, "the test needs rows that stop early and rows that go on"
    assert compacted and min(compacted) < 8, "finished rows must have left the batch"
    for i in range(len(problems)):
        alone = model.generate(x[i:i + 1], 24, temperature=0.0)[0]
        assert torch.equal(batch[i, :len(alone)], alone)
        assert (batch[i, len(alone):] == model.args.pad_id).all()


def test_sampled_generation_is_reproducible_with_a_generator(tiny):
    _, enc, _, _, model = tiny
    x = torch.tensor([train.encode(enc, "<|bos|>1+2=")] * 3)
    runs = [model.generate(x, 20, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)


def test_inverse_cdf_sampling_follows_the_distribution_and_never_picks_zero_probability():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    draws = train.sample_next(logits, 1.0, None, g)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    p = logits[0].double().softmax(-1)
    # 20,000 draws: the standard error of each frequency is <= 0.0036; 5 of them is 0.018
    assert (freq - p).abs().max() < 0.018
    assert freq[4] == 0, "a token of probability 0 (masked) must never be drawn"
    # top_k=2 keeps the two largest; temperature 0 is argmax
    top2 = train.sample_next(logits[:2000], 1.0, 2, g)
    assert set(top2.tolist()) == {0, 1}
    assert torch.equal(train.sample_next(logits[:3], 0.0, None), torch.zeros(3, dtype=torch.long))


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decode_generates_what_eager_decode_does(tiny, monkeypatch):
    _, enc, _, _, model = tiny
    model.eval()
    rows = [train.encode(enc, train.render(a, b, False, 2)[0]) for a, b in [(12, 34), (5, 6)]]
    x = torch.tensor(rows)
    eager = model.generate(x, 30, temperature=0.0)
    assert model.compile_decode(), "torch.compile of the decode step must work on this machine"
    # one step at position 3 over an empty cache, in inference mode as generate() runs it
    with torch.inference_mode():
        tokens = x[:, :1].clone()
        torch.testing.assert_close(model.compiled_decode(tokens, 3, model.new_cache(2, 8)),
                                   model.decode_step(tokens, 3, model.new_cache(2, 8)))
    assert torch.equal(model.generate(x, 30, temperature=0.0), eager)
    # a failing compiler leaves generation eager and working
    model.compiled_decode = None

    def broken(fn, **kw):
        def fails(*args):
            raise RuntimeError("no C++ compiler")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    assert not model.compile_decode() and model.compiled_decode is None
    assert torch.equal(model.generate(x, 30, temperature=0.0), eager)


def test_bench_reports_the_contract_keys_with_and_without_transformers(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, batch_size=2)
    cfg.train.seq_len = 64
    res = train.bench(cfg, repeats=1, contexts=(64, 1024), compile=False)
    for key in ("tokens_per_s_ours", "tokens_per_s_dense", "slowdown_vs_dense", "tokens_per_s_hf",
                "decode_tokens_per_s_ours_b1", "decode_tokens_per_s_hf_b1",
                "rollout_tokens_per_s_ours_b128", "attainable_flops", "mfu_train"):
        assert res[key] > 0, key
    assert 0 < res["mfu_train"] < 1 and 0 < res["mfu_decode_b1"] < 1
    # MTP keeps more for backward than the next-token loss alone
    assert res["activation_bytes_ours"] > res["activation_bytes_ours_lm"] > 0
    assert res["activation_bytes_hf"] > 0 and res["activation_bytes_dense"] > 0
    assert res["speedup_vs_hf_train"] == res["tokens_per_s_ours_lm"] / res["tokens_per_s_hf"]
    # both caches hold the latent (transformers >= 5) or HF's holds per-head K/V (4.x): never less
    assert res["cache_bytes_per_token_layer_hf"] >= res["cache_bytes_per_token_layer_ours"]
    assert [(r["batch"], r["context"]) for r in res["decode"]] == [(1, 64), (1, 1024), (128, 64),
                                                                  (128, 1024)]

    def missing(purpose):
        raise SystemExit(f"error: pip install transformers to {purpose} (it is optional)")

    monkeypatch.setattr(train, "import_transformers", missing)
    res = train.bench(cfg, repeats=1, contexts=(64, 1024), compile=False)
    assert res["tokens_per_s_hf"] is None and res["decode_tokens_per_s_hf_b1"] is None
    assert res["tokens_per_s_ours"] > 0 and "speedup_vs_hf_train" not in res
    # --ckpt: a missing file fails before any timing; a real one adds its rollouts
    cfg.train.ckpt = str(tmp_path / "none.pt")
    with pytest.raises(SystemExit, match="no such file"):
        train.bench(cfg)


def test_activation_bytes_counts_what_backward_keeps_once_and_not_the_weights():
    # Linear keeps its input x [4, 3] (and its weight: a parameter, not counted); relu keeps its
    # output [4, 5]; sum keeps nothing: 4 * (12 + 20) bytes
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 5, bias=False)
    x = torch.randn(4, 3)

    def loss():
        h = m(x).relu()
        # h used twice: its storage is counted once
        return (h * h).sum() + h.sum()

    assert train.activation_bytes(m, loss) == 4 * (12 + 20)
    assert m.weight.grad is not None, "the backward ran"


def test_checkpoint_rollouts_count_the_generated_tokens(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, eval_interval=2)
    train.train(cfg)
    res = train.checkpoint_rollouts(os.path.join(cfg.train.out, "ckpt.pt"), compile=False,
                                    repeats=1)
    assert set(res) == {"rollout_tokens_per_s_ckpt", "rollout_mean_length_ckpt"}
    assert res["rollout_tokens_per_s_ckpt"] > 0
    assert 0 < res["rollout_mean_length_ckpt"] <= train.max_response_tokens(2, "zero", None)


def test_gate_biases_change_once_per_optimizer_step_not_per_micro_batch(tiny):
    _, _, _, world, model = tiny
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes, "the tiny model must contain MoE layers"
    before = [m.gate.bias.clone() for m in moes]
    for micro in range(3):  # gradient accumulation: forward/backward only
        batch = world.batch(range(4 * micro, 4 * micro + 4))
        loss, _ = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for m, b in zip(moes, before):
            assert torch.equal(m.gate.bias, b), "the bias must not move inside forward or per micro-batch"
    assert all(m.gate.bias.grad is None for m in moes), "the bias receives no gradient"
    update_gate_biases(model)
    assert any(not torch.equal(m.gate.bias, b) for m, b in zip(moes, before)), "one update per step"


def test_smoke_run_lowers_the_loss(tmp_path):
    cfg = tiny_config(tmp_path, steps=40, eval_interval=40, lr=1e-2, warmup=2)
    summary = train.train(cfg)
    rows = [json.loads(l) for l in open(os.path.join(cfg.train.out, "metrics.jsonl")) if '"loss"' in l]
    assert rows[-1]["ce"] < rows[0]["ce"] - 1.0, f"loss should fall: {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}"
    for key in ["heldout_accuracy_think", "heldout_accuracy_greedy", "think_rate_greedy",
                "mean_length_greedy", "tokens_per_second", "params_total", "params_active", "wall_seconds"]:
        assert key in summary
    assert summary["params_active"] < summary["params_total"]
    assert summary["heldout_loss"] < rows[0]["ce"] - 1.0, "the held-out loss falls with the training loss"
    assert os.path.exists(os.path.join(cfg.train.out, "pretrain.png"))


def test_heldout_loss_rows_are_unseen_and_the_same_for_every_seed(tmp_path):
    worlds = [train.make_tokenizer_and_world(tiny_config(tmp_path, seed=s).train, 8)[2] for s in (0, 1)]
    assert worlds[0].row(3, stream="heldout") == worlds[1].row(3, stream="heldout")
    assert worlds[0].row(3, stream="heldout") not in [worlds[0].row(j) for j in range(200)]


def test_resume_continues_exactly(tmp_path):
    kw = dict(steps=6, eval_interval=3, warmup=2)
    full = tiny_config(tmp_path / "a", **kw)
    train.train(full)
    part = tiny_config(tmp_path / "b", **kw)
    train.train(part, stop_at=3)                     # "interrupted" after the step-3 checkpoint
    part.train.resume = True
    train.train(part)

    def losses(cfg):
        rows = [json.loads(l) for l in open(os.path.join(cfg.train.out, "metrics.jsonl"))]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}
    a, b = losses(full), losses(part)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)], f"resumed losses differ: {a} vs {b}"


def test_checkpoint_round_trip(tiny, tmp_path):
    cfg, enc, _, _, model = tiny
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, model, None, 5, cfg, enc)
    model2, enc2, cfg2, ckpt = train.load_checkpoint(path)
    assert ckpt["step"] == 5 and cfg2 == cfg
    x = torch.tensor([train.encode(enc, "<|bos|>12+34=")])
    assert torch.equal(model.eval()(x), model2.eval()(x))
    assert not any(f.startswith("ckpt.pt.tmp") for f in os.listdir(tmp_path)), "no temp file left behind"


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        train.load_checkpoint(str(path))
    with pytest.raises(SystemExit, match="run `python train.py` first"):
        train.load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--seq-len", "4096"], "exceeds --max-seq-len"),
    (["--n-activated-experts", "99"], ""),
    (["--qk-rope-head-dim", "7"], ""),
])
def test_bad_flags_fail_early_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(argv)
    err = capsys.readouterr().err
    assert "error" in err and message in err
