"""Our Transformer is DeepSeek-V3 itself: on the same weights it equals Hugging Face transformers'
independent DeepseekV3ForCausalLM (Transformer.from_hf), logits and greedy tokens alike."""
import pytest
import torch

pytestmark = pytest.mark.train
pytest.importorskip("transformers", reason="transformers is a test dependency: "
                                           "pip install -r tests/requirements.txt")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import train  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread avoids stalls on a shared CPU

# float32 on a CPU; the two models do the same math in a different order (HF: per-head K/V and
# rotate-by-halves RoPE, its own RMSNorm and RoPE tables; ours: absorbed decoding, complex-style RoPE).
# 1e-4 is the bound; measured ~3e-6 here, at logits of magnitude ~3.
ATOL = 1e-4
VOCAB = 97

# Two tiny configs that differ in every option from_hf maps (the second has 4 expert groups, keeps 2).
CONFIGS = {
    "plain_wq_one_group_interleaved_rope": dict(
        q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=True, first_k_dense_replace=1,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5),
    "lora_wq_four_groups_rotate_half_rope": dict(
        q_lora_rank=24, n_group=4, topk_group=2, rope_interleave=False, first_k_dense_replace=0,
        n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=3, routed_scaling_factor=1.5),
}


def hf_model(**overrides) -> DeepseekV3ForCausalLM:
    """A tiny randomly initialised HF DeepSeek-V3 (no download), every weight redrawn (see below)."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
              pad_token_id=0, **CONFIGS["plain_wq_one_group_interleaved_rope"])
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**kw, **overrides})).float().eval()
    # HF starts norms at 1, the gate bias at 0 and weights at std 0.02: a swapped norm or a lost bias would
    # go unseen and logits would sit near 0. So: norms around 1, weights giving O(1) logits, a sharp gate.
    # The gate biases are drawn >= 0: transformers' router (like the official code before a fix, issue
    # #741) has masked the dropped groups with 0.0 rather than -inf in some versions (5.24, here: -inf);
    # sigmoid scores + a bias >= 0 keep every allowed score > 0, so both masks choose the same experts.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name
                    else torch.randn_like(p) * (0.5 if name.endswith("gate.weight") else 0.15))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.rand_like(b))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = hf_model(**CONFIGS[request.param])
    return hf, train.Transformer.from_hf(hf).eval()


@torch.no_grad()
def logits_both(hf, ours) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [3, 24, VOCAB] of HF's model and ours on the same batch of random sequences."""
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    return hf(tokens).logits, ours(tokens)


@torch.no_grad()
def greedy_both(hf, ours) -> tuple[torch.Tensor, torch.Tensor]:
    """32 greedy tokens after 3 random 8-token prompts: HF's generate, and ours (absorbed MLA cache)."""
    prompts = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None                       # no stop token on either side
    theirs = hf.generate(prompts, max_new_tokens=32, do_sample=False, pad_token_id=0)
    return theirs, ours.generate(prompts, 32, temperature=0.0)


def test_logits_equal_hf_deepseek_v3(pair):
    theirs, mine = logits_both(*pair)
    assert mine.shape == theirs.shape == (3, 24, VOCAB)
    assert (mine - theirs).abs().max().item() <= ATOL


def test_parity_depends_on_the_gate_bias_and_the_groups(pair):
    # Controls: the logits test above would catch a lost e_score_correction_bias or group limit.
    hf, ours = pair
    theirs = logits_both(hf, ours)[0]
    gates = [m.gate for m in ours.modules() if isinstance(m, train.MoE)]
    saved = [(g.bias.clone(), g.topk_groups) for g in gates]
    try:
        for g in gates:
            g.bias.zero_()
        assert (logits_both(hf, ours)[1] - theirs).abs().max() > 100 * ATOL, "the gate bias must change routing"
        for g, (bias, _) in zip(gates, saved):
            g.bias.copy_(bias)
            g.topk_groups = g.n_groups                     # no group limit
        if gates[0].n_groups > 1:
            assert (logits_both(hf, ours)[1] - theirs).abs().max() > 100 * ATOL, "group limiting must matter"
    finally:
        for g, (bias, keep) in zip(gates, saved):
            g.bias.copy_(bias)
            g.topk_groups = keep


@torch.no_grad()
def test_greedy_generation_with_absorbed_cache_equals_hf_generate(pair):
    hf, ours = pair
    assert all(layer.attn.cfg.attn_impl == "absorb" for layer in ours.layers), "decode must use absorption"
    assert ours.args.stop_ids == () and len(ours.mtp) == 0
    theirs, mine = greedy_both(hf, ours)
    assert mine.shape == theirs.shape == (3, 40)
    assert torch.equal(mine, theirs), f"first mismatch at {(mine != theirs).nonzero()[0].tolist()}"


@pytest.mark.parametrize("overrides, option", [
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 16}), "rope scaling"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
])
def test_unsupported_config_options_fail_naming_the_option(overrides, option):
    with pytest.raises(ValueError, match=f"unsupported {option}"):
        train.Transformer.from_hf(hf_model(**overrides))


if __name__ == "__main__":          # python -m tests.test_parity: the figures the tests assert on
    for name, overrides in CONFIGS.items():
        hf = hf_model(**overrides)
        ours = train.Transformer.from_hf(hf).eval()
        (a, b), (ga, gb) = logits_both(hf, ours), greedy_both(hf, ours)
        print(f"{name}: max |logits - HF| = {(a - b).abs().max().item():.1e} (max |logit| "
              f"{a.abs().max().item():.1f}); greedy tokens identical: {torch.equal(ga, gb)} ({gb.shape[0]} x 32)")
