"""Tests for mla.py: the equivalences and invariants that make MLA correct, on tiny float32 layers.

Tolerance: naive and absorbed MLA (and cached vs full-sequence attention) are the same math in a
different association order, so in float32 they differ only by rounding, ~1e-7 on outputs of order
1; ATOL = RTOL = 1e-5 leaves ~50x headroom yet catches any real error (a wrong scale, a missing
position, a leaked future token all move outputs by > 1e-2).
"""
import dataclasses
import math

import pytest
import torch

import demo_figures
from mla import (DEEPSEEK_V3, MLA, MLACache, MLAConfig, apply_rotary_emb, demo, kv_cache_elements,
                 official_naive_decode, precompute_freqs_cis)

ATOL = RTOL = 1e-5
# Plain wq (V2-Lite) and the wq_a -> q_norm -> wq_b path (V3).
Q_LORA = [0, 24]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine OpenMP threads waiting
    for each other made these tests ~100x slower; restore the setting for other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(q_lora_rank: int = 0, **kw) -> MLA:
    cfg = MLAConfig(dim=32, n_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10, max_seq_len=64, **kw)
    return MLA(cfg).eval()


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.points(3)
@pytest.mark.parametrize("q_lora_rank", Q_LORA)
def test_absorbed_prefill_equals_naive(q_lora_rank):
    mla = make(q_lora_rank)
    x = torch.randn(2, 11, 32)
    close(mla(x, mode="absorb"), mla(x, mode="naive"))
    close(mla(x, 5, mode="absorb"), mla(x, 5, mode="naive"))


@pytest.mark.points(3)
@pytest.mark.parametrize("q_lora_rank", Q_LORA)
def test_absorbed_decode_equals_naive(q_lora_rank):
    mla = make(q_lora_rank)
    x = torch.randn(2, 20, 32)
    caches = {m: mla.new_cache(2) for m in ("naive", "absorb")}
    outs = {}
    for m, c in caches.items():
        outs[m] = [mla(x[:, :7], 0, c, mode=m)]
        outs[m] += [mla(x[:, p:p + 1], p, c, mode=m) for p in range(7, 20)]
    for a, b in zip(outs["naive"], outs["absorb"]):
        close(a, b)
    close(caches["naive"].c_kv, caches["absorb"].c_kv)


@pytest.mark.points(2)
@pytest.mark.parametrize("q_lora_rank", Q_LORA)
def test_official_naive_cache_decode_equals_absorbed(q_lora_rank):
    # the demo's fair baseline: full per-head K/V cached, as the official attn_impl="naive"
    mla = make(q_lora_rank)
    cfg = mla.cfg
    x = torch.randn(2, 20, 32)
    k_cache = torch.zeros(2, 64, cfg.n_heads, mla.qk_head_dim)
    v_cache = torch.zeros(2, 64, cfg.n_heads, cfg.v_head_dim)
    cache = mla.new_cache(2)
    close(official_naive_decode(mla, x[:, :7], 0, k_cache, v_cache), mla(x[:, :7], 0, cache))
    for p in range(7, 20):
        official = official_naive_decode(mla, x[:, p:p + 1], p, k_cache, v_cache)
        close(official, mla(x[:, p:p + 1], p, cache, mode="absorb"))


@pytest.mark.points(2)
@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_cached_incremental_decoding_equals_full_forward(mode):
    mla = make(24)
    x = torch.randn(2, 20, 32)
    full = mla(x)
    cache = mla.new_cache(2, max_len=20)
    chunks = []
    pos = 0
    # A prefill, single tokens, and chunks after a prefix.
    for size in (5, 1, 1, 4, 3, 1, 5):
        chunks.append(mla(x[:, pos:pos + size], pos, cache, mode=mode))
        pos += size
    close(torch.cat(chunks, dim=1), full)


@pytest.mark.points(2)
def test_cache_holds_only_latent_and_rope_key():
    mla = make(24)
    cache = mla.new_cache(2, max_len=10)
    names = {f.name for f in dataclasses.fields(MLACache)}
    assert names == {"c_kv", "k_pe"}, (
        f"the MLA cache must hold only c_kv and k_pe (that is the point of MLA); got {names}")
    per_token = cache.c_kv.shape[-1] + cache.k_pe.shape[-1]
    assert cache.c_kv.shape == (2, 10, 16) and cache.k_pe.shape == (2, 10, 6), (
        f"cache shapes must be [B, max_len, kv_lora_rank] and [B, max_len, qk_rope_head_dim]; got "
        f"{tuple(cache.c_kv.shape)} and {tuple(cache.k_pe.shape)}: per-head K/V do not belong here")
    assert per_token == kv_cache_elements(mla.cfg, "mla")[0] == 22
    # What is stored is the normalised latent and the rotated shared key, nothing else.
    x = torch.randn(2, 4, 32)
    mla(x, 3, cache)
    c_kv, k_pe = mla.wkv_a(x).split([16, 6], dim=-1)
    close(cache.c_kv[:, 3:7], mla.kv_norm(c_kv))
    close(cache.k_pe[:, 3:7], apply_rotary_emb(k_pe, mla.cos[3:7], mla.sin[3:7]))
    assert cache.c_kv[:, 7:].abs().max() == 0, "positions after start_pos+T must stay untouched"


@pytest.mark.points(0)
def test_naive_matches_attention_written_out_with_official_layouts():
    """q = [q_nope | q_pe] per head, wkv_a -> [c_kv | k_pe], wkv_b per head -> [k_nope | v],
    one rope key for all heads, scale 1/sqrt(dn + dr): written out with plain loops over heads."""
    mla = make(0)
    x = torch.randn(1, 9, 32)
    H = 3
    dn = 8
    dr = 6
    dv = 10
    T = 9
    cos, sin = mla.cos[:T], mla.sin[:T]
    q = mla.wq(x)[0].view(T, H, dn + dr)
    c_kv, k_pe = mla.wkv_a(x)[0].split([16, dr], dim=-1)
    k_pe = apply_rotary_emb(k_pe, cos, sin)                     # [T, dr]
    kv = mla.wkv_b(mla.kv_norm(c_kv)).view(T, H, dn + dv)
    heads = []
    for h in range(H):
        qh = torch.cat([q[:, h, :dn], apply_rotary_emb(q[:, h, dn:], cos, sin)], dim=-1)
        kh = torch.cat([kv[:, h, :dn], k_pe], dim=-1)
        s = qh @ kh.T / math.sqrt(dn + dr)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(s.softmax(-1) @ kv[:, h, dn:])
    close(mla(x)[0], mla.wo(torch.cat(heads, dim=-1)))


@pytest.mark.points(0)
def test_rope_matches_official_complex_interleaved_convention():
    cfg = MLAConfig(qk_rope_head_dim=8, max_seq_len=16)
    cos, sin = precompute_freqs_cis(cfg)
    assert cos.shape == sin.shape == (16, 4) and not cos.is_complex()
    x = torch.randn(2, 16, 3, 8)
    freqs = torch.outer(torch.arange(16.0), 10000.0 ** (-torch.arange(0, 8, 2) / 8))
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2)))
                             * torch.polar(torch.ones_like(freqs), freqs)[:, None]).flatten(-2)
    close(apply_rotary_emb(x, cos, sin), ref)


def test_rope_depends_only_on_relative_position():
    cfg = MLAConfig(qk_rope_head_dim=8, max_seq_len=64)
    cos, sin = precompute_freqs_cis(cfg)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        return apply_rotary_emb(q[None], cos[m:m + 1], sin[m:m + 1]) @ apply_rotary_emb(
            k[None], cos[n:n + 1], sin[n:n + 1]).T

    close(score(3, 1), score(40, 38))
    assert (score(3, 1) - score(3, 2)).abs() > 1e-3, "different offsets must give different scores"
    # The whole layer: the same tokens placed later in the sequence attend identically.
    mla = make(24)
    x = torch.randn(1, 10, 32)
    for mode in ("naive", "absorb"):
        close(mla(x, 0, mode=mode), mla(x, 37, mode=mode))


@pytest.mark.points(2)
@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_future_tokens_do_not_change_past_outputs(mode):
    mla = make(24)
    x = torch.randn(2, 12, 32)
    y = x.clone()
    y[:, 7:] = torch.randn(2, 5, 32)
    a, b = mla(x, mode=mode), mla(y, mode=mode)
    close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3, "changed tokens must change their own outputs"


@pytest.mark.points(0)
@pytest.mark.parametrize("q_lora_rank", Q_LORA)
def test_gradients_reach_every_parameter_in_training_path(q_lora_rank):
    mla = make(q_lora_rank).train()
    mla(torch.randn(2, 9, 32)).square().sum().backward()
    for name, p in mla.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.points(0)
def test_submodules_use_official_names_and_real_non_persistent_buffers():
    a, b = make(0), make(24)
    assert hasattr(a, "wq") and not hasattr(a, "wq_a"), "q_lora_rank=0 means one plain wq"
    assert all(hasattr(b, n) for n in ("wq_a", "q_norm", "wq_b")) and not hasattr(b, "wq")
    for n in ("wkv_a", "wkv_b", "wo", "wq_a", "wq_b"):
        assert getattr(b, n).bias is None, f"{n} must have no bias, as in the official code"
    assert isinstance(b.kv_norm, torch.nn.RMSNorm) and isinstance(b.q_norm, torch.nn.RMSNorm)
    assert not any(k.endswith(("cos", "sin")) for k in b.state_dict()), "RoPE tables are derived"
    assert not any(t.is_complex() for t in b.buffers()), "complex buffers break DDP broadcast"


def test_rollback_overwrites_cache_like_a_fresh_decode():
    mla = make(24)
    x = torch.randn(1, 10, 32)
    fresh = mla.new_cache(1, 16)
    reused = mla.new_cache(1, 16)
    mla(x[:, :8], 0, fresh)
    # Speculated 2 tokens too far, then rolled back to position 8.
    mla(x, 0, reused)
    close(mla(x[:, 8:9] * -1, 8, reused), mla(x[:, 8:9] * -1, 8, fresh))


@pytest.mark.points(0)
def test_cache_size_function_reproduces_v3_numbers():
    assert kv_cache_elements(DEEPSEEK_V3, "mla") == (512 + 64, 1152)
    assert kv_cache_elements(DEEPSEEK_V3, "mha") == (2 * 128 * 128, 65536)
    assert kv_cache_elements(DEEPSEEK_V3, "naive")[0] == 128 * (128 + 64 + 128) == 40960
    assert kv_cache_elements(DEEPSEEK_V3, "gqa", n_kv_heads=8)[0] == 2048
    assert kv_cache_elements(DEEPSEEK_V3, "mqa")[0] == 256
    assert kv_cache_elements(DEEPSEEK_V3, "mla", bytes_per_element=1)[1] == 576
    assert round(32768 / 576, 1) == 56.9


@pytest.mark.points(0)
@pytest.mark.parametrize("field,value,words", [
    ("qk_rope_head_dim", 7, "even"),
    ("n_heads", 0, "n_heads"),
    ("kv_lora_rank", -4, "kv_lora_rank"),
    ("q_lora_rank", -1, "q_lora_rank"),
    ("norm_eps", 0.0, "norm_eps"),
    ("attn_impl", "flash", "attn_impl"),
])
def test_bad_configs_raise_clear_errors(field, value, words):
    with pytest.raises(ValueError, match=words):
        MLA(dataclasses.replace(MLAConfig(), **{field: value}))


@pytest.mark.points(0)
def test_bad_inputs_raise_clear_errors():
    mla = make(0)
    cache = mla.new_cache(1, max_len=8)
    with pytest.raises(ValueError, match="exceed the cache"):
        mla(torch.randn(1, 3, 32), 6, cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        mla(torch.randn(1, 4, 32), 62)
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        mla(torch.randn(1, 4, 31))
    with pytest.raises(ValueError, match="mode"):
        mla(torch.randn(1, 4, 32), mode="flash")
    with pytest.raises(ValueError, match="kind"):
        kv_cache_elements(mla.cfg, "mlp")


def test_demo_small_reports_the_claims():
    res = demo(small=True)
    assert res["cache_elements_mla_v3"] == 576 and res["cache_elements_mha_v3"] == 32768
    assert res["cache_elements_naive_official_v3"] == 40960
    assert res["cache_elements_mla_tiny"] == 80 and res["cache_elements_mha_tiny"] == 256
    assert res["max_abs_diff_naive_absorb"] < ATOL and res["max_abs_diff_cached_vs_full"] < ATOL
    for ctx in (256, 512, 1024, 2048, 4096):
        assert res[f"decode_ms_naive_{ctx}"] > 0 and res[f"decode_ms_absorb_{ctx}"] > 0
    assert all(isinstance(v, (int, float, bool)) for v in res.values())
    # the bands tests/grade.py checks on `python mla.py --json --small`
    assert not demo_figures.unmet("mla", res), "\n".join(demo_figures.unmet("mla", res))
