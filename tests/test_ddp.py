"""train.py beyond one process: torchrun/DDP equals one process on the same global batch; and the
options that make the miniature real: --fp8 (FP8 Linear layers) and --data FILE (any UTF-8 text)."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

import train
from fp8 import Fp8Linear, swap_to_fp8

pytestmark = pytest.mark.train
torch.set_num_threads(1)  # tiny tensors: one thread avoids stalls on a shared CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny", "--batch-size", "16", "--eval-n", "2", "--eval-interval", "1000", "--log-interval", "1",
        "--warmup", "1", "--device", "cpu"]
# float32, the same sums in another order (gloo all-reduces two half-batch gradients; one process sums
# the whole batch at once), through 3 AdamW steps, which rescale small gradients to full-size updates:
# measured max difference 1.5e-6 (in the output head), against 9.7e-3 moved from the initial weights.
TOL = 1e-5


def state(path: str) -> dict:
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def ddp_and_single_runs(out: pathlib.Path) -> tuple[dict, dict, dict, str]:
    """3 steps of global batch 8 by torchrun (2 processes x 2 rows x 2 micro-batches) and by one process
    (4 rows x 2 micro-batches). Returns the 1-process, 2-process and initial weights, and torchrun's stdout."""
    steps = ["--steps", "3", "--grad-accum", "2"]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *TINY, *steps, "--batch-size", "2", "--out", str(out / "ddp")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    cfg = train.parse_config([*TINY, *steps, "--batch-size", "4", "--out", str(out / "one")])
    train.train(cfg)
    torch.manual_seed(cfg.train.seed)                  # train() seeds, then builds, exactly like this
    init = train.build_model(cfg, train.make_tokenizer_and_world(cfg.train, 2)[0], "cpu").state_dict()
    return state(out / "one"), state(out / "ddp"), init, ddp.stdout


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    one, two, init, stdout = ddp_and_single_runs(tmp_path)
    assert max_diff(one, two) <= TOL
    # Controls: the steps moved the weights far beyond TOL, and the gate biases (compared above: they
    # follow the loads all-reduced over the processes) moved too.
    assert max_diff(one, init) > 100 * TOL
    biases = [k for k in one if k.endswith("gate.bias")]
    assert biases and all(one[k].abs().max() > 0 for k in biases), "loss-free balancing must have acted"
    # Logging, evaluation and checkpoints happen once, on rank 0.
    assert stdout.count("step     3/3") == 1 and stdout.count("eval @ 3") == 1 and "2 process(es)" in stdout
    summary = json.load(open(tmp_path / "ddp" / "summary.json"))
    assert summary["steps"] == 3 and "heldout_accuracy_think" in summary


def test_fp8_swaps_linears_but_keeps_embedding_head_gate_and_norms():
    cfg = train.parse_config(TINY)
    enc = train.make_tokenizer_and_world(cfg.train, 2)[0]
    model = train.swap_to_fp8(train.build_model(cfg, enc, "cpu"))
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    plain = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert {"layers.0.attn.wq", "layers.0.attn.wkv_a", "layers.0.attn.wkv_b", "layers.0.attn.wo",
            "layers.0.ffn.w1", "layers.1.ffn.shared_experts.w2", "mtp.0.eh_proj"} <= fp8
    assert plain == {"head"}, f"only the output head stays a high-precision Linear, got {plain}"
    assert isinstance(model.embed, torch.nn.Embedding) and not isinstance(model.layers[1].ffn.gate, Fp8Linear)


def test_fp8_routed_experts_compute_in_fp8():
    """The routed experts are stacked weights, not Linears: swap_to_fp8 switches their GEMMs to FP8 too."""
    cfg = train.parse_config(TINY)
    moe = train.build_model(cfg, train.make_tokenizer_and_world(cfg.train, 2)[0], "cpu").layers[1].ffn
    moe.shared_experts = None                       # what remains is the routed experts' output
    x = torch.randn(2, 16, 32)
    y = moe(x)
    swap_to_fp8(moe)
    y8 = moe(x)
    rel = ((y8 - y).norm() / y.norm()).item()
    assert 1e-3 < rel < 0.08, f"routed experts: FP8 vs FP32 relative difference {rel:.3g}"
    y8.square().sum().backward()
    assert all(p.grad.abs().max() > 0 for p in moe.experts.values()), "FP8 experts must pass gradients"


def test_fp8_training_runs_and_lowers_the_loss(tmp_path):
    cfg = train.parse_config([*TINY, "--steps", "8", "--lr", "1e-2", "--fp8", "--out", str(tmp_path)])
    train.train(cfg)
    losses = [r["ce"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "ce" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses


def text_file(tmp_path, n_chars: int) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()[:n_chars], encoding="utf-8")
    return str(path)


def test_data_file_pretrains_evaluates_and_samples(tmp_path, capsys):
    out = str(tmp_path / "run")
    summary = train.train(train.parse_config([*TINY, "--steps", "4", "--batch-size", "2", "--out", out,
                                              "--data", text_file(tmp_path, 20_000)]))
    assert 0 < summary["heldout_loss"] < 20 and "harder_accuracy_think" not in summary
    train.main(["--sample", "def train(", "--out", out])
    printed = capsys.readouterr().out
    assert "prompt: def train(" in printed and "<|bos|>" not in printed, "text models are prompted without <|bos|>"


def test_data_rows_are_a_function_of_seed_and_row_index(tmp_path):
    cfg = train.parse_config([*TINY, "--data", text_file(tmp_path, 20_000)])
    enc, _, data = train.make_text_data(cfg.train)
    a, b = data.batch(range(0, 4)), data.batch(range(2, 6))
    assert a.shape == (4, cfg.train.seq_len + 1)
    assert torch.equal(a[2:], b[:2]), "row j must not depend on the batch it is in"
    text = enc.decode(a[0].tolist())
    assert text in open(text_file(tmp_path, 20_000), encoding="utf-8").read(), "a row is a window of the file"


def latin1_file(tmp_path) -> str:
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 4000)
    return str(tmp_path / "latin1.txt")


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.txt"), "cannot read it as UTF-8"),
    (latin1_file, "cannot read it as UTF-8"),
    (lambda p: text_file(p, 300), "too small"),
])
def test_bad_data_files_fail_with_a_clear_message(tmp_path, make, message):
    cfg = train.parse_config([*TINY, "--data", make(tmp_path)])
    with pytest.raises(SystemExit, match=message):
        train.make_text_data(cfg.train)


if __name__ == "__main__":          # python -m tests.test_ddp: the figures the DDP test asserts on
    with tempfile.TemporaryDirectory() as d:
        one, two, init, _ = ddp_and_single_runs(pathlib.Path(d))
    print(f"max |2 processes - 1 process| after 3 steps = {max_diff(one, two):.1e} "
          f"(the steps moved the weights by up to {max_diff(one, init):.1e})")
