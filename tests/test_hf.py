"""Every model the project trains goes into the Hugging Face ecosystem and back: Transformer.to_hf
computes our logits, train.export_hf writes a folder that transformers' Auto classes and pipeline
load offline and that generates and tokenizes exactly as we do, and `train.py --export-hf` is its
command line."""
import dataclasses
import os

import pytest
import torch

pytestmark = pytest.mark.train
pytest.importorskip("transformers", reason="transformers is a test dependency: "
                                           "pip install -r tests/requirements.txt")
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

import train  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread avoids stalls on a shared CPU

# float32 on a CPU, the same math in a different order (see test_parity.py): measured ~1e-6
ATOL = 1e-4
N_PROMPTS = 16
# strings beyond the corpus: every special, digit runs, whitespace runs, non-ASCII bytes
EXTRA_TEXTS = [
    "<|bos|>12+34=<think>2+4+0=06,_____6</think><answer>046</answer><|eos|><|pad|>",
    "0123456789 9876543210\n\n  tabs\tand   spaces  ", "héllo wörld ✓ 東京 🙂", "",
    "<answer><answer></answer>x<|eos|> <think> 7", "a  b   c\n \n"]


@pytest.fixture(scope="module")
def trained():
    """A tiny model (every component: MLA, dense FFN, MoE, MTP) after 160 AdamW steps on the
    world, its gate biases then drawn nonzero (training has not moved them: train_step does)."""
    torch.manual_seed(0)
    cfg = train.tiny_config()
    enc, heldout, world = train.make_tokenizer_and_world(cfg.train, N_PROMPTS)
    model = train.build_model(cfg, enc, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(160):
        batch = world.batch(range(8 * step, 8 * step + 8))
        loss = model(batch[:, :-1], batch[:, 1:])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(0.3 * torch.rand_like(b))
    return model.eval(), enc, heldout, world, cfg


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, enc = trained[:2]
    path = str(tmp_path_factory.mktemp("hf") / "export")
    written = train.export_hf(model, enc, path)
    return path, written


def prompts_of(heldout, width: int) -> list[str]:
    """Held-out prompts, left to the model's choice and made to think."""
    plain = [train.render(a, b, False, width)[0] for a, b in heldout]
    return plain + [p + "<think>" for p in plain]


@torch.no_grad()
def test_to_hf_logits_equal_ours_and_from_hf_returns_our_model(trained):
    model, enc, heldout, world, cfg = trained
    hf = model.to_hf()
    x = world.batch(range(1000, 1004))[:, :48]
    mine = model(x)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert (hf(x).logits - mine).abs().max().item() <= ATOL
    back = train.Transformer.from_hf(hf).eval()
    assert (back(x) - mine).abs().max().item() <= ATOL
    # the round trip keeps every weight but the MTP modules (transformers has none)
    ours = model.state_dict()
    for name, w in back.state_dict().items():
        assert torch.equal(w, ours[name]), name


def randomised(cfg: train.Config, enc) -> train.Transformer:
    """cfg's model with every weight redrawn (norms around 1, O(1) logits) and gate biases > 0."""
    torch.manual_seed(0)
    model = train.build_model(cfg, enc, "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(0.3 * torch.rand_like(b))
    return model.eval()


def dense_student() -> train.Config:
    return train.tiny_config(student=True)


def lora_query_four_groups_no_shared_expert() -> train.Config:
    cfg = train.tiny_config()
    cfg.model.mla.q_lora_rank = 8
    cfg.model.moe = dataclasses.replace(cfg.model.moe, n_routed_experts=8, n_shared_experts=0,
                                        n_activated_experts=3, n_expert_groups=4,
                                        n_limited_groups=2, route_scale=2.5)
    return cfg


# n_shared_experts = 0: HF builds empty shared-expert Linears, and torch warns initialising them
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make_cfg", [dense_student, lora_query_four_groups_no_shared_expert])
@torch.no_grad()
def test_to_hf_round_trips_every_kind_of_model(trained, make_cfg):
    enc, world = trained[1], trained[3]
    model = randomised(make_cfg(), enc)
    x = world.batch(range(1000, 1003))[:, :48]
    hf = model.to_hf()
    assert (hf(x).logits - model(x)).abs().max().item() <= ATOL
    assert (train.Transformer.from_hf(hf)(x) - model(x)).abs().max().item() <= ATOL


@torch.no_grad()
def test_to_hf_depends_on_the_gate_bias(trained):
    # control: the logits test above would catch a lost e_score_correction_bias
    model, enc, heldout, world, cfg = trained
    hf = model.to_hf()
    x = world.batch(range(1000, 1002))[:, :48]
    for name, b in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    assert (hf(x).logits - model(x)).abs().max().item() > 100 * ATOL


def test_export_writes_a_folder_of_a_deepseek_v3(exported):
    path, written = exported
    names = {os.path.basename(f) for f in written}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert train.is_hf_export(path)


def hf_greedy(hf, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """HF generate's greedy completions, a batch per prompt length (no padding), stopping at the
    exported generation_config's stop ids; each without the padding after its stop."""
    gen = hf.generation_config
    out = [[] for _ in prompts]
    for length in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == length]
        x = torch.tensor([prompts[i] for i in idx])
        y = hf.generate(x, max_new_tokens=n_new, do_sample=False,
                        eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id)
        for i, row in zip(idx, y[:, length:].tolist()):
            out[i] = [t for t in row if t != gen.pad_token_id]
    return out


@torch.no_grad()
def test_exported_greedy_generation_equals_ours(trained, exported):
    model, enc, heldout, world, cfg = trained
    hf = AutoModelForCausalLM.from_pretrained(exported[0]).eval()
    width = cfg.train.max_digits
    n_new = train.max_response_tokens(width, cfg.train.world, enc)
    ids = [train.encode(enc, p) for p in prompts_of(heldout, width)]
    mine = train.generate_ids(model, ids, n_new)
    assert hf.generation_config.eos_token_id == list(model.args.stop_ids)
    assert hf_greedy(hf, ids, n_new) == mine
    assert sum(r[-1] in model.args.stop_ids for r in mine) > 0, "some completions must stop"


def test_exported_tokenizer_encodes_and_decodes_like_ours(trained, exported):
    model, enc, heldout, world, cfg = trained
    tok = AutoTokenizer.from_pretrained(exported[0])
    texts = [world.corpus_sample(50)] + prompts_of(heldout, cfg.train.max_digits) + EXTRA_TEXTS
    for text in texts:
        ids = train.encode(enc, text)
        assert tok.encode(text, add_special_tokens=False) == ids, text[:80]
        assert tok.decode(ids) == enc.decode(ids) == text, text[:80]
    assert tok.convert_tokens_to_ids(train.SPECIALS) == [train.special_id(enc, s)
                                                         for s in train.SPECIALS]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


def test_tokenizer_conversion_recovers_hundreds_of_merges():
    # the world's BPE learns few merges (digits never merge): a text BPE (--data) learns many
    text = train.__doc__ + train.Transformer.generate.__doc__
    enc = train.build_tokenizer(train.learn_merges(text, n_merges=300))
    tok = train.hf_tokenizer(enc)
    assert enc.n_vocab > 256 + 250 + len(train.SPECIALS)
    for sample in [text, text.upper(), " ".join(reversed(text.split(" "))), *EXTRA_TEXTS]:
        ids = train.encode(enc, sample)
        assert tok.encode(sample, add_special_tokens=False) == ids
        assert tok.decode(ids) == sample


def test_pipeline_completes_a_prompt_like_ours(trained, exported):
    model, enc, heldout, world, cfg = trained
    prompt = prompts_of(heldout, cfg.train.max_digits)[0]
    n_new = train.max_response_tokens(cfg.train.max_digits, cfg.train.world, enc)
    pipe = pipeline("text-generation", model=exported[0])
    out = pipe(prompt, max_new_tokens=n_new, do_sample=False, return_full_text=False)
    mine = train.generate_ids(model, [train.encode(enc, prompt)], n_new)[0]
    # the pipeline drops special tokens when it decodes
    assert out[0]["generated_text"] == pipe.tokenizer.decode(mine, skip_special_tokens=True)


def test_cli_exports_a_checkpoint_and_errors_clearly(trained, tmp_path, capsys):
    model, enc, heldout, world, cfg = trained
    ckpt = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(ckpt, model, None, 60, cfg, enc)
    out = str(tmp_path / "hf")
    train.main(["--export-hf", out, "--ckpt", ckpt])
    assert "model.safetensors" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out)
    x = world.batch(range(1000, 1002))[:, :32]
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= ATOL
    # a previous export is replaced; a missing checkpoint or a foreign folder: one line each
    train.main(["--export-hf", out, "--ckpt", ckpt])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.main(["--export-hf", out, "--ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="not empty and not a previous export"):
        train.main(["--export-hf", str(tmp_path), "--ckpt", ckpt])
    # a checkpoint without its tokenizer
    state = torch.load(ckpt, weights_only=True)
    del state["tokenizer"]
    torch.save(state, ckpt)
    with pytest.raises(SystemExit, match="not a readable checkpoint.*re-run train.py"):
        train.main(["--export-hf", str(tmp_path / "hf2"), "--ckpt", ckpt])
    capsys.readouterr()


@pytest.mark.parametrize("change, option", [
    (dict(score_func="softmax"), "score_func"),
    (dict(norm_eps=1e-5), "norm_eps"),
])
def test_to_hf_refuses_what_hf_cannot_express(change, option):
    cfg = train.tiny_config()
    args = cfg.model
    args.vocab_size = 40
    args.norm_eps = change.get("norm_eps", args.norm_eps)
    args.moe.score_func = change.get("score_func", args.moe.score_func)
    args.__post_init__()
    with pytest.raises(ValueError, match=f"unsupported {option}"):
        train.Transformer(args).to_hf()


if __name__ == "__main__":          # python -m tests.test_hf: the figures the tests assert on
    print("run with pytest; the figures are in the issue's report")
