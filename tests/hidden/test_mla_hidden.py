"""Hidden tests of the MLA assignment (absorbed attention): shapes the public tests do not use,
and the one thing an output comparison cannot see, that the absorbed path never expands the
latent into per-head keys and values.

Tolerance: as tests/test_mla.py, float32 rounding of the same math (1e-5).
"""
import pytest
import torch

from mla import MLA, MLAConfig

ATOL = RTOL = 1e-5
# (n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim): one
# head, a value wider than the key, an odd latent width, a tiny rope part.
SHAPES = [(1, 0, 12, 8, 4, 8), (2, 16, 9, 4, 2, 12), (5, 0, 20, 6, 8, 3)]


def make(n_heads, q_lora_rank, kv_lora_rank, dn, dr, dv) -> MLA:
    cfg = MLAConfig(dim=24, n_heads=n_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
                    qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, max_seq_len=32)
    return MLA(cfg).eval()


@pytest.mark.points(2)
@pytest.mark.parametrize("shape", SHAPES)
def test_absorbed_equals_naive_on_other_shapes(shape):
    mla = make(*shape)
    x = torch.randn(3, 13, 24)
    close = dict(atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(mla(x, mode="absorb"), mla(x, mode="naive"), **close)
    caches = {m: mla.new_cache(3) for m in ("naive", "absorb")}
    with torch.no_grad():
        for m, c in caches.items():
            mla(x[:, :6], 0, c, mode=m)
        for p in range(6, 13):
            step = {m: mla(x[:, p:p + 1], p, c, mode=m) for m, c in caches.items()}
            torch.testing.assert_close(step["absorb"], step["naive"], **close)


@pytest.mark.points(2)
def test_absorbed_decode_never_expands_the_latent():
    """The point of absorption: W_UK and W_UV are folded into the query and the output, so the
    cache is read as it is ([B, T, d_c]) and wkv_b is never applied to it."""
    mla = make(3, 0, 16, 8, 6, 10)
    cache = mla.new_cache(2)
    x = torch.randn(2, 9, 24)

    def refuse(*args, **kwargs):
        raise AssertionError("the absorbed path must not expand the latent into per-head K/V "
                             "(it called expand_kv or wkv_b on the cache)")

    mla.expand_kv = refuse
    mla.wkv_b.register_forward_pre_hook(refuse)
    with torch.no_grad():
        mla(x[:, :5], 0, cache, mode="absorb")
        for p in range(5, 9):
            mla(x[:, p:p + 1], p, cache, mode="absorb")
