"""Nothing lost, nothing silent: bad flags, files and interrupts fail early with one line."""
import json
import os

import numpy
import pytest
import torch

import distill
import grpo
import train


def tiny_run(out, steps=2, **fields):
    cfg = train.tiny_config(steps=steps, eval_interval=2, log_interval=1, out=str(out), **fields)
    return cfg, train.train(cfg)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 2-step tiny run (ckpt.pt at step 2, metrics.jsonl)."""
    out = tmp_path_factory.mktemp("done")
    tiny_run(out)
    return out


def error_of(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return e.value


def copy_run(src, dst):
    os.makedirs(dst)
    for name in ("ckpt.pt", "metrics.jsonl"):
        with open(src / name, "rb") as f, open(dst / name, "wb") as g:
            g.write(f.read())
    return dst


# ---------------------------------------------------------------- 1. nothing lost silently


def test_empty_sample_is_an_error_not_a_training_run(done_run):
    before = os.path.getmtime(done_run / "ckpt.pt")
    e = error_of(train.main, ["--tiny", "--sample", "", "--out", str(done_run)])
    assert "--sample needs a prompt" in str(e.code)
    assert os.path.getmtime(done_run / "ckpt.pt") == before


def test_fresh_run_refuses_a_folder_with_an_earlier_run(done_run, tmp_path):
    out = copy_run(done_run, tmp_path / "r")
    e = error_of(train.main, ["--tiny", "--steps", "2", "--out", str(out)])
    msg = str(e.code)
    assert str(out) in msg and "--resume" in msg and "--out" in msg and "\n" not in msg
    assert os.path.getsize(out / "metrics.jsonl") > 0, "metrics.jsonl kept"
    train.main(["--tiny", "--steps", "2", "--eval-interval", "2", "--out", str(out),
                "--overwrite", "--threads", "1"])


def test_grpo_and_distill_refuse_an_earlier_runs_folder(done_run):
    e = error_of(grpo.main, ["--init", str(done_run / "ckpt.pt"), "--out", str(done_run)])
    assert str(done_run) in str(e.code) and "--overwrite" in str(e.code)
    os.makedirs(done_run / "d", exist_ok=True)
    (done_run / "d" / "summary.json").write_text("{}")
    e = error_of(distill.main, ["--teacher", str(done_run / "ckpt.pt"), "--out",
                                str(done_run / "d")])
    assert "already holds" in str(e.code)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    cfg = train.tiny_config(steps=2, out=str(tmp_path), resume=True)
    assert "--resume but no checkpoint" in str(error_of(train.train, cfg).code)


def test_resume_at_or_past_steps_says_so(done_run, tmp_path, capsys):
    out = copy_run(done_run, tmp_path / "r")
    cfg = train.tiny_config(steps=1, out=str(out), resume=True)
    assert "already at step 2, past --steps 1" in str(error_of(train.train, cfg).code)
    # equal: nothing to do, exit 0 with a message
    cfg = train.tiny_config(steps=2, out=str(out), resume=True)
    assert train.train(cfg) == {}
    assert "nothing to do" in capsys.readouterr().out


# ---------------------------------------------------------------- 2. validated before step 1


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--grad-clip", "0"], "--grad-clip must be a finite number > 0"),
    (["--eval-interval", "0"], "--eval-interval must be positive"),
    (["--log-interval", "0"], "--log-interval must be positive"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--device", "bogus"], "is not auto, cpu, cuda"),
    (["--out", "/proc/robust_test"], "is not writable"),
    (["--max-digits", "16"], "over --max-seq-len"),
    (["--max-digits", "15"], "over --max-seq-len"),
    (["--max-seq-len", "64", "--seq-len", "64"], "over --max-seq-len"),
])
def test_bad_flags_fail_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_device_must_be_present():
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="mps"):
            train.check_device("mps")
    with pytest.raises(ValueError, match="CUDA GPU"):
        train.check_device(f"cuda:{torch.cuda.device_count()}")


def test_out_onto_or_below_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train.check_out_writable(str(f))
    with pytest.raises(ValueError, match="below the file"):
        train.check_out_writable(str(f / "sub"))
    train.check_out_writable(str(tmp_path / "new" / "deeper"))
    assert not os.path.exists(tmp_path / "new"), "the probe leaves nothing behind"


def test_defaults_and_tiny_still_fit():
    train.parse_config([])
    train.parse_config(["--tiny"])
    train.parse_config(["--max-digits", "12"])
    train.parse_config(["--max-digits", "14", "--world", "choice"])


@pytest.mark.parametrize("knob", [dict(lr=float("nan")), dict(bench_prompts=-1),
                                  dict(eval_interval=0), dict(threads=-1),
                                  dict(device="bogus"), dict(temperature=float("inf"))])
def test_grpo_rejects_bad_knobs(knob):
    with pytest.raises(ValueError):
        grpo.GRPOConfig(**knob).validate()


def test_grpo_bench_prompts_rejected_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_config(["--bench-prompts", "-1"])
    assert "bench_prompts" in capsys.readouterr().err


@pytest.mark.parametrize("knob", [dict(lr=float("nan")), dict(rl_lr=float("nan")),
                                  dict(threads=-1), dict(device="mps:0")])
def test_distill_rejects_bad_knobs(knob):
    with pytest.raises(ValueError):
        distill.DistillConfig(**knob).validate()


def test_sample_prompt_that_cannot_fit_is_an_error(done_run, capsys):
    # tiny models hold 128 tokens: <|bos|> + 127 digits leaves no room
    e = error_of(train.main, ["--tiny", "--out", str(done_run), "--sample", "1" * 127])
    assert "shorten the prompt" in str(e.code)
    capsys.readouterr()
    # 127 tokens (bos + 126 digits) still generate one token
    train.main(["--tiny", "--out", str(done_run), "--sample", "1" * 126])
    lines = capsys.readouterr().out.splitlines()
    greedy = [line for line in lines if line.startswith("greedy")][0]
    assert greedy.split(":", 1)[1].strip(), "at least one token generated"


# ---------------------------------------------------------------- 3. errors that crash handlers


@pytest.mark.parametrize("content", ["empty", "truncated"])
def test_empty_or_truncated_checkpoint_everywhere(done_run, tmp_path, content):
    out = tmp_path / content
    os.makedirs(out)
    data = b"" if content == "empty" else (done_run / "ckpt.pt").read_bytes()[:3000]
    (out / "ckpt.pt").write_bytes(data)
    calls = [(train.main, ["--tiny", "--sample", "1+2=", "--out", str(out)]),
             (train.main, ["--tiny", "--resume", "--steps", "4", "--out", str(out)]),
             (grpo.main, ["--init", str(out / "ckpt.pt"), "--out", str(tmp_path / "g")])]
    for fn, argv in calls:
        assert "not a readable checkpoint" in str(error_of(fn, argv).code)


def test_resume_with_another_size_names_the_fields(done_run, tmp_path):
    out = copy_run(done_run, tmp_path / "r")
    e = error_of(train.main, ["--tiny", "--resume", "--steps", "4", "--dim", "64",
                              "--out", str(out)])
    assert "dim 32 in the checkpoint, 64 asked" in str(e.code)


def test_grpo_refuses_a_text_checkpoint(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"hello world number {i}, more text here.\n" for i in range(300)))
    cfg = train.tiny_config(steps=2, eval_interval=2, out=str(tmp_path / "data"),
                            data=str(text))
    train.train(cfg)
    e = error_of(grpo.main, ["--init", str(tmp_path / "data" / "ckpt.pt"), "--out",
                             str(tmp_path / "g"), "--steps", "1"])
    assert "--data" in str(e.code) and "arithmetic world" in str(e.code)


def test_teacher_with_no_kept_sample_gives_a_clear_message(done_run, monkeypatch):
    teacher, enc, cfg, _ = train.load_checkpoint(str(done_run / "ckpt.pt"))
    monkeypatch.setattr(distill, "keep_trace", lambda *args: False)
    e = error_of(distill.teacher_traces, teacher, enc, [(1, 2), (3, 4)], 2, 1, 1.0)
    assert "kept none of the teacher's 2 samples" in str(e.code)


# ---------------------------------------------------------------- 4. interrupts and resumes


def test_ctrl_c_names_the_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    real_step = train.train_step

    def interrupted_at_3(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(train, "train_step", interrupted_at_3)
    argv = ["--tiny", "--steps", "6", "--eval-interval", "2", "--out", str(tmp_path)]
    assert error_of(train.main, argv).code == 130
    err = capsys.readouterr().err
    assert str(tmp_path / "ckpt.pt") in err and "python train.py --resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_resume_removes_temp_files_keeps_each_step_once_and_sums_wall_seconds(tmp_path):
    first = train.tiny_config(steps=6, eval_interval=2, log_interval=1, out=str(tmp_path))
    train.train(first, stop_at=3)
    (tmp_path / "ckpt.pt.tmp99999").write_bytes(b"half")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["elapsed_s"] > 0
    again = train.tiny_config(steps=6, eval_interval=2, log_interval=1, out=str(tmp_path),
                              resume=True)
    summary = train.train(again)
    assert not any(".tmp" in f for f in os.listdir(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) == list(range(1, 7))
    assert summary["wall_seconds"] >= ckpt["elapsed_s"]


# ---------------------------------------------------------------- 5. one judge


@pytest.mark.parametrize("target", [3, 3.0, numpy.float64(3), numpy.int64(3), torch.tensor(3)])
def test_accuracy_accepts_any_integral_target(target):
    assert grpo.accuracy_reward("<answer>3</answer>", target) == 1.0


@pytest.mark.parametrize("target", [3.5, numpy.float64(3.5), torch.tensor(3.5)])
def test_accuracy_never_matches_a_non_integral_target(target):
    assert grpo.accuracy_reward("<answer>3</answer>", target) == 0.0
    assert grpo.accuracy_reward("<answer>4</answer>", target) == 0.0


@pytest.mark.parametrize("text", ["<answer> </answer>", "<answer>3\x00</answer>",
                                  "<think>\x01</think><answer>3</answer>",
                                  "<answer>3\x07</answer>", "<think>  </think><answer>3</answer>",
                                  "<answer>\x7f3</answer>"])
def test_format_needs_printable_non_blank_bodies(text):
    assert grpo.format_reward(text) == 0.0


def test_format_keeps_the_batterys_contract():
    assert grpo.format_reward("<answer> 579</answer>") == 1.0
    assert grpo.accuracy_reward("<answer> 579</answer>", 579) == 0.0
    assert grpo.format_reward("<think>a b</think><answer>1</answer><|eos|>") == 1.0


# ---------------------------------------------------------------- 6. fault injection


def cli_run(out, extra=(), steps=40):
    import subprocess
    import sys
    argv = [sys.executable, "train.py", "--tiny", "--steps", str(steps), "--eval-interval", "5",
            "--log-interval", "1", "--eval-n", "4", "--threads", "1", "--out", str(out), *extra]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def last_step(metrics) -> int:
    """The highest step logged so far (0 before the first row)."""
    if not os.path.exists(metrics):
        return 0
    steps = [0]
    for line in open(metrics):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            # a row being written right now
            pass
    return max(steps)


@pytest.mark.faults
def test_sigkill_at_random_times_then_resume_equals_an_uninterrupted_run(tmp_path):
    import random
    import signal
    import time
    steps = 200
    rng = random.Random(0)
    ref = tmp_path / "ref"
    assert cli_run(ref, steps=steps).wait() == 0
    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"
    kills = 0
    finished = False
    while kills < 20 and not finished:
        resumed = os.path.exists(out / "ckpt.pt")
        seen = last_step(metrics)
        p = cli_run(out, ["--resume"] if resumed else ["--overwrite"], steps=steps)
        # kill at a random moment after the run has gone past where the last one was killed:
        # mid-step, mid-evaluation or mid-checkpoint-write, whatever the machine's speed
        deadline = time.time() + 120
        while p.poll() is None and last_step(metrics) <= seen and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
        else:
            finished = p.returncode == 0
    assert kills >= 20, f"only {kills} kills landed before the run finished"
    if not finished:
        assert cli_run(out, ["--resume"], steps=steps).wait() == 0
    a = torch.load(ref / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [json.loads(line) for line in open(metrics)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert [r["step"] for r in rows if "heldout_loss" in r] == list(range(5, steps + 1, 5))
    assert not any(".tmp" in f for f in os.listdir(out))
