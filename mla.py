"""Multi-head Latent Attention (MLA): DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1.

Sections (each fenced `# ---- name`):
  config      MLAConfig, and DEEPSEEK_V3 (the real sizes, for the cache table)
  RoPE        precompute_freqs_cis, apply_rotary_emb (decoupled rotary part)
  MLA         MLACache (the latent cache) and MLA (the layer, naive and absorbed attention)
  cache size  kv_cache_elements (MHA / GQA / MQA / MLA, DeepSeek-V2 Table 1)
  demo        demo() and the CLI (not needed to understand MLA)

The problem. At decode time a transformer keeps, for every past token and every layer, the keys and
values of all heads: 2 * n_h * d_h numbers per token per layer for multi-head attention (MHA). At
DeepSeek-V3's sizes (128 heads of 128) that is 32,768 numbers; the KV cache, not the weights, then
limits batch size and context length. GQA/MQA shrink it by sharing K/V heads, at a cost in quality.

The idea. MLA caches one small latent per token instead, and rebuilds every head's key and value
from it with an up-projection (low-rank joint compression):

    c_kv = RMSNorm(W_DKV h)                  [kv_lora_rank]           (wkv_a, kv_norm)
    k_C  = W_UK c_kv,  v = W_UV c_kv         [n_h, d_h] each           (wkv_b -> [k_nope | v])
    k_R  = RoPE(W_KR h)                      [d_R], ONE key for all heads (the other part of wkv_a)
    q    = W_UQ RMSNorm(W_DQ h)              [n_h, d_h + d_R]          (wq_a, q_norm, wq_b; or wq)
    q_i  = [q_C,i | RoPE(q_R,i)],  k_i = [k_C,i | k_R]
    o_i  = sum_t softmax_t(q_i . k_t,i / sqrt(d_h + d_R)) v_t,i,    u = W_O [o_1; ...; o_nh]   (wo)

Only c_kv and k_R are cached: kv_lora_rank + d_R = 512 + 64 = 576 numbers per token per layer in V3,
56.9x less than MHA's 32,768.

Absorption. Because W_UK sits between the query and the cached latent with nothing in between,
    q_C,i . (W_UK,i c_kv) = (W_UK,i^T q_C,i) . c_kv      and      o_i = W_UV,i (sum_t p_t c_kv,t),
so decoding can attend over the latent cache directly, never materialising per-head K or V: two
products over the cache (scores, then weighted latents) plus two tiny per-head projections. Over
the cache this is multi-query attention: every head's folded query meets ONE shared key per token,
[c_kv | k_pe] (576 numbers in V3), and one shared value, c_kv (512).
This only works because RoPE is *decoupled*: had we rotated k_C = R_t W_UK c_kv, the product
q^T R_s^T R_t W_UK = q^T R_(t-s) W_UK would depend on the position pair and could not be folded
into the query once (the notebook shows the algebra failing numerically). So RoPE gets its own small
query/key part, and the shared rope key k_R is cached as is, after rotation.

Two implementations, selectable per call (mode=) or per module (cfg.attn_impl):
  "naive"  materialise per-head K and V from the latent and call scaled_dot_product_attention.
           The training/prefill path. With a cache it must re-expand the whole latent every step.
  "absorb" fold W_UK into the query and W_UV after attention; attend over the latent cache.
           The decode path. Same math, reassociated: equal to "naive" to float32 rounding.

Names follow deepseek-ai/DeepSeek-V3 inference/model.py (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b,
wo; interleaved-pair RoPE as its complex multiplication). Not included: YaRN context extension
(the official mscale/rope_factor), tensor parallelism, FP8 weights.

demo() measures (1) the cache table for MHA/GQA/MQA/MLA at V3's real sizes and at our tiny sizes,
(2) max |naive - absorbed| over a prefill plus 64 cached decode steps, (3) decode time per token at
contexts 256..4096 on CPU with batch 1: absorbed, the official naive cache (full per-head K/V,
official_naive_decode) and re-expanding the latent every step (mode="naive" with a cache).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("naive", "absorb")


# ---- config
@dataclass
class MLAConfig:
    """Sizes of one MLA layer (defaults: a tiny layer that runs in milliseconds on a CPU)."""
    dim: int = 128
    # attention heads
    n_heads: int = 4
    # 0 -> plain wq (DeepSeek-V2-Lite); > 0 -> wq_a, q_norm, wq_b
    q_lora_rank: int = 0
    # d_c, the cached latent width
    kv_lora_rank: int = 64
    # d_h, the content part of each query/key head
    qk_nope_head_dim: int = 32
    # d_R, the rotary part (one shared key)
    qk_rope_head_dim: int = 16
    # the value width of each head
    v_head_dim: int = 32
    max_seq_len: int = 512
    # RoPE base frequency
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # default mode when a cache is given: "naive" | "absorb"
    attn_impl: str = "absorb"

    def validate(self) -> None:
        """Raise ValueError with a one-line message if a field cannot work."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "q_lora_rank":
                if v < 0:
                    raise ValueError(f"MLAConfig.q_lora_rank must be >= 0 (0 = plain wq), got {v}")
            elif f.name != "attn_impl" and not v > 0:
                raise ValueError(f"MLAConfig.{f.name} must be positive, got {v}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even (RoPE rotates pairs), "
                             f"got {self.qk_rope_head_dim}")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"MLAConfig.attn_impl must be one of {IMPLS}, got {self.attn_impl!r}")


# DeepSeek-V3 (671B) attention sizes, used for the cache table (never instantiated as a module).
DEEPSEEK_V3 = MLAConfig(dim=7168, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        max_seq_len=163840)


# ---- RoPE
def precompute_freqs_cis(cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles pos * theta^(-2i/d_R) for every position, as real cos and sin.

    Returns:
        (cos, sin), each float32 [max_seq_len, qk_rope_head_dim // 2].
    """
    d = cfg.qk_rope_head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angles in cos/sin (the official convention).

    Args:
        x: [B, T, d_R] or [B, T, H, d_R] (T is axis 1; any axes between T and the last are heads),
            or [T, d_R].
        cos, sin: [T, d_R // 2], the rows for the positions of x's T axis.
    Returns:
        Same shape and dtype as x; computed in float32 like the official complex multiplication.
    """
    xp = x.float().unflatten(-1, (-1, 2))                       # [..., d_R/2, 2]
    x0 = xp[..., 0]
    x1 = xp[..., 1]
    shape = (cos.size(0),) + (1,) * max(x.dim() - 3, 0) + (cos.size(1),)
    cos = cos.view(shape)
    sin = sin.view(shape)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ---- MLA
@dataclass
class MLACache:
    """The latent KV cache of ONE layer: all that decoding needs to remember per token.

    Rolling back (speculative decoding) = calling forward again with an earlier start_pos: the
    entries from there on are overwritten, and attention never reads past start_pos + T.
    """
    c_kv: torch.Tensor            # [B, max_len, kv_lora_rank]   normalised latent (after kv_norm)
    k_pe: torch.Tensor            # [B, max_len, qk_rope_head_dim] shared rope key (after RoPE)


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE and a latent KV cache (see module doc)."""

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        H = cfg.n_heads
        dn = cfg.qk_nope_head_dim
        dr = cfg.qk_rope_head_dim
        dv = cfg.v_head_dim
        self.qk_head_dim = dn + dr
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + dr, bias=False)
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (dn + dv), bias=False)
        self.wo = nn.Linear(H * dv, cfg.dim, bias=False)
        self.softmax_scale = self.qk_head_dim ** -0.5
        # Real cos/sin, not a complex tensor: DDP broadcasts buffers, and not complex ones.
        cos, sin = precompute_freqs_cis(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None,
                  dtype=None) -> MLACache:
        """An empty (zero) latent cache for this layer: kv_lora_rank + d_R elements per token.

        Args:
            batch_size: B. max_len: positions it can hold (default and upper bound:
                cfg.max_seq_len).
            device, dtype: default to those of the module's weights.
        """
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if batch_size < 1 or not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"new_cache needs batch_size >= 1 and 1 <= max_len <= max_seq_len "
                             f"({self.cfg.max_seq_len}), got {batch_size}, {max_len}")
        w = self.wkv_a.weight
        kw = dict(device=device or w.device, dtype=dtype or w.dtype)
        return MLACache(c_kv=torch.zeros(batch_size, max_len, self.cfg.kv_lora_rank, **kw),
                        k_pe=torch.zeros(batch_size, max_len, self.cfg.qk_rope_head_dim, **kw))

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: MLACache | None = None,
                mode: str | None = None) -> torch.Tensor:
        """Causal self-attention of x's tokens, at positions start_pos .. start_pos+T-1.

        Args:
            x: [B, T, dim]. start_pos: position of x[:, 0] (shared by the batch).
            cache: if given, c_kv/k_pe of positions [start_pos, start_pos+T) are written into it
                and x attends over [0, start_pos+T). Calling again with an earlier start_pos rolls
                the cache back (entries are overwritten). Without a cache, x attends to itself only.
                The cache is written in place: decode under torch.no_grad().
            mode: "naive" or "absorb"; default cfg.attn_impl with a cache, "naive" without.
        Returns:
            [B, T, dim].
        """
        cfg = self.cfg
        B, T = self._check(x, start_pos, cache, mode)
        mode = mode or (cfg.attn_impl if cache is not None else "naive")
        end = start_pos + T
        # 1-2. Queries, the latent and the shared rope key of x's tokens.
        q_nope, q_pe, c_kv, k_pe = self.project(x, start_pos)
        # 3. Write them into the cache and attend over everything cached so far.
        if cache is not None:
            cache.c_kv[:B, start_pos:end] = c_kv
            cache.k_pe[:B, start_pos:end] = k_pe
            c_kv = cache.c_kv[:B, :end]                        # [B, end, kv_lora_rank]
            k_pe = cache.k_pe[:B, :end]                        # [B, end, dr]
        # 4. Causal mask. Query s sits at position start_pos+s, key t at end-Tk+t; only a
        # multi-token call needs a mask.
        Tk = c_kv.size(1)
        mask = None
        if T > 1:
            q_pos = torch.arange(start_pos, end, device=x.device)
            mask = torch.arange(end - Tk, end, device=x.device) <= q_pos[:, None]   # [T, Tk]
        # 5. Attend (naive or absorbed: the same math) and project the heads back to dim.
        attend = self._attend_naive if mode == "naive" else self._attend_absorb
        o = attend(q_nope, q_pe, c_kv, k_pe, mask)            # [B, T, H, dv]
        return self.wo(o.flatten(2))

    def project(self, x: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, ...]:
        """x [B, T, dim] at positions start_pos.. -> q_nope [B, T, H, dn], q_pe [B, T, H, dr]
        (rotated), c_kv [B, T, kv_lora_rank] (normalised) and k_pe [B, T, dr] (rotated)."""
        cfg = self.cfg
        B, T, _ = x.shape
        cos = self.cos[start_pos:start_pos + T]
        sin = self.sin[start_pos:start_pos + T]
        # 1. Queries: content part q_nope and rotary part q_pe of every head.
        q = self.wq(x) if cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, cfg.n_heads, self.qk_head_dim)        # [B, T, H, dn + dr]
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin)
        # 2. The latent and the one shared rope key: all that is cached.
        c_kv, k_pe = self.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)                              # [B, T, kv_lora_rank]
        k_pe = apply_rotary_emb(k_pe, cos, sin)                # [B, T, dr], one key for all heads
        return q_nope, q_pe, c_kv, k_pe

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The latent [B, T, kv_lora_rank] and rope key [B, T, dr] -> every head's key
        [B, T, H, dn + dr] = [W_UK c_kv | k_pe] and value [B, T, H, dv] = W_UV c_kv."""
        cfg = self.cfg
        B, T, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(B, T, cfg.n_heads, -1)     # [B, T, H, dn + dv]
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None].expand(-1, -1, cfg.n_heads, -1)   # [B, T, H, dr]
        return torch.cat([k_nope, k_pe], dim=-1), v

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Materialise per-head K = [k_nope | k_pe] and V from the latent; SDPA.

        Returns [B, T, H, dv].
        """
        cfg = self.cfg
        Tk = c_kv.size(1)
        k, v = self.expand_kv(c_kv, k_pe)                      # [B, Tk, H, dn + dr], [.., dv]
        q = torch.cat([q_nope, q_pe], dim=-1)                  # [B, T, H, dn + dr]
        # PyTorch's fused (flash) kernels want one head width for q, k and v; with dv < dn + dr
        # SDPA falls back to its unfused math path (2x slower on a CPU here). Zero columns of v
        # give zero columns of the output, dropped after.
        v = F.pad(v, (0, max(self.qk_head_dim - cfg.v_head_dim, 0)))
        # A square mask is plain causal: let SDPA use its own causal kernel.
        causal = mask is not None and mask.size(0) == Tk
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # [B, H, T|Tk, .]
            attn_mask=None if causal else mask, is_causal=causal, scale=self.softmax_scale)
        return o.transpose(1, 2)[..., :cfg.v_head_dim]         # [B, T, H, dv]

    def _attend_absorb(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attend over the latent directly: W_UK folded into q, W_UV applied after.

        Returns [B, T, H, dv].
        """
        ### BEGIN SOLUTION: absorbed MLA: fold W_UK into q, apply W_UV after attention (V2 §2.1.2)
        cfg = self.cfg
        wkv_b = self.wkv_b.weight.view(cfg.n_heads, -1, cfg.kv_lora_rank)  # [H, dn + dv, c], a view
        w_uk = wkv_b[:, :cfg.qk_nope_head_dim]                              # [H, dn, c]
        w_uv = wkv_b[:, cfg.qk_nope_head_dim:]                              # [H, dv, c]
        B, T, H, _ = q_nope.shape
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)                # [B, T, H, c]
        # Over the cache this is multi-query attention: all T*H queries (rows) meet ONE shared key
        # per token, [c_kv | k_pe], and one shared value, c_kv; a batched matmul each.
        scores = q_lat.flatten(1, 2) @ c_kv.mT + q_pe.flatten(1, 2) @ k_pe.mT    # [B, T*H, Tk]
        scores = scores.view(B, T, H, -1) * self.softmax_scale                  # [B, T, H, Tk]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        p = scores.softmax(dim=-1, dtype=torch.float32).type_as(q_lat)
        o_lat = (p.flatten(1, 2) @ c_kv).view(B, T, H, -1)                   # [B, T, H, c]
        return torch.einsum("bshc,hdc->bshd", o_lat, w_uv)                  # [B, T, H, dv]
        ### END SOLUTION

    def _check(self, x, start_pos, cache, mode) -> tuple[int, int]:
        """Fail early, with a message, on inputs that would otherwise break deep inside torch."""
        if x.dim() != 3 or x.size(-1) != self.cfg.dim:
            raise ValueError(f"MLA expects x of shape [B, T, {self.cfg.dim}], got {list(x.shape)}")
        if mode is not None and mode not in IMPLS:
            raise ValueError(f"mode must be one of {IMPLS} or None, got {mode!r}")
        B, T, _ = x.shape
        end = start_pos + T
        if start_pos < 0 or end > self.cfg.max_seq_len:
            raise ValueError(f"positions [{start_pos}, {end}) are outside [0, max_seq_len="
                             f"{self.cfg.max_seq_len}): raise MLAConfig.max_seq_len")
        if cache is not None:
            cb, max_len = cache.c_kv.shape[:2]
            if end > max_len:
                raise ValueError(f"sequence would exceed the cache: positions up to {end} > cache "
                                 f"max_len {max_len}; allocate new_cache(max_len=...) larger")
            if B > cb:
                raise ValueError(f"batch {B} is larger than the cache's batch {cb}")
        return B, T


# ---- cache size
def kv_cache_elements(cfg: MLAConfig, kind: str, n_kv_heads: int = 8,
                      bytes_per_element: int = 2) -> tuple[int, int]:
    """KV-cache size per token per layer (DeepSeek-V2 Table 1), with d_h = cfg.qk_nope_head_dim.

    Args:
        cfg: attention sizes. kind: "mha" (2 n_h d_h), "gqa" (2 n_kv_heads d_h), "mqa" (2 d_h),
            "mla" (kv_lora_rank + d_R), or "naive" (the official naive MLA cache: full per-head
            K of dn + d_R and V of dv, n_h (dn + d_R + dv)).
        n_kv_heads: K/V head groups for "gqa". bytes_per_element: 2 for bf16.
    Returns:
        (elements, bytes) per token per layer.
    """
    H = cfg.n_heads
    dh = cfg.qk_nope_head_dim
    if kind == "gqa" and not (1 <= n_kv_heads <= H and H % n_kv_heads == 0):
        raise ValueError(f"gqa needs n_kv_heads dividing n_heads={H}, got {n_kv_heads}")
    sizes = {"mha": 2 * H * dh,
             "gqa": 2 * n_kv_heads * dh,
             "mqa": 2 * dh,
             "mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
             "naive": H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)}
    if kind not in sizes:
        raise ValueError(f"kind must be one of {tuple(sizes)}, got {kind!r}")
    return sizes[kind], sizes[kind] * bytes_per_element


# ---- demo (not needed to understand MLA)
CACHE_KINDS = ("mha", "gqa", "mqa", "mla", "naive")
DECODE_CONTEXTS = (256, 512, 1024, 2048, 4096)


def official_naive_decode(mla: MLA, x: torch.Tensor, start_pos: int, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> torch.Tensor:
    """The official code's attn_impl="naive" decode: every head's full key [dn + d_R] and value
    [dv] are cached (n_h (dn + d_R + dv) numbers per token per layer: 40,960 at V3's sizes, 71x
    MLA's 576); the new tokens' K/V are expanded once, written, and attended with SDPA.
    Args: x [B, T, dim]; k_cache [B, L, H, dn + dr], v_cache [B, L, H, dv]. Returns [B, T, dim]."""
    B, T, _ = x.shape
    end = start_pos + T
    q_nope, q_pe, c_kv, k_pe = mla.project(x, start_pos)
    k_cache[:B, start_pos:end], v_cache[:B, start_pos:end] = mla.expand_kv(c_kv, k_pe)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)              # [B, H, T, dn + dr]
    k = k_cache[:B, :end].transpose(1, 2)
    v = v_cache[:B, :end].transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1 and start_pos == 0,
                                       scale=mla.softmax_scale)
    return mla.wo(o.transpose(1, 2).flatten(2))


DECODE_MODES = ("absorb", "official", "naive")


def _decode_ms(mla: MLA, cache: MLACache, kv: tuple, ctx: int, reps: int) -> dict[str, float]:
    """Median ms to decode one token at position ctx (attending over ctx+1 cached tokens), per
    mode: absorbed over the latent, the official naive K/V cache, and re-expanding the latent.

    The modes alternate within each repeat so that machine noise hits all alike; one warm-up each.
    Each call rewrites cache position ctx with the same values, so repeats are identical.
    """
    x = torch.randn(1, 1, mla.cfg.dim)
    calls = {"absorb": lambda: mla(x, start_pos=ctx, cache=cache, mode="absorb"),
             "official": lambda: official_naive_decode(mla, x, ctx, *kv),
             "naive": lambda: mla(x, start_pos=ctx, cache=cache, mode="naive")}
    times = {m: [] for m in DECODE_MODES}
    for r in range(reps + 1):
        for m in DECODE_MODES:
            t0 = time.perf_counter()
            calls[m]()
            if r:
                times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: statistics.median(v) for m, v in times.items()}


@torch.no_grad()
def demo(small: bool = False, seed: int = 0) -> dict:
    """Measure the three claims of the module docstring; returns flat keys of plain numbers."""
    torch.manual_seed(seed)
    out: dict = {}
    tiny = MLAConfig()
    # 1. KV-cache elements per token per layer, V3's real sizes and ours.
    for tag, cfg in (("v3", DEEPSEEK_V3), ("tiny", tiny)):
        for kind in CACHE_KINDS:
            e, b = kv_cache_elements(cfg, kind, n_kv_heads=min(8, cfg.n_heads // 2))
            name = "naive_official" if kind == "naive" else kind
            out[f"cache_elements_{name}_{tag}"] = e
            out[f"cache_bytes_bf16_{name}_{tag}"] = b
        out[f"cache_ratio_mha_over_mla_{tag}"] = round(
            out[f"cache_elements_mha_{tag}"] / out[f"cache_elements_mla_{tag}"], 2)

    # 2. naive vs absorbed over a prefill then token-by-token decoding, and vs one full forward.
    n_prefill = 32
    n_decode = 16 if small else 64
    mla = MLA(replace(tiny, q_lora_rank=48)).eval()
    x = torch.randn(2, n_prefill + n_decode, tiny.dim)
    outs = {}
    for m in IMPLS:
        cache = mla.new_cache(2)
        ys = [mla(x[:, :n_prefill], 0, cache, mode=m)]
        ys += [mla(x[:, p:p + 1], p, cache, mode=m) for p in range(n_prefill, x.size(1))]
        outs[m] = torch.cat(ys, dim=1)
    out["decode_steps"] = n_decode
    out["max_abs_diff_naive_absorb"] = (outs["naive"] - outs["absorb"]).abs().max().item()
    out["max_abs_diff_cached_vs_full"] = (outs["absorb"] - mla(x)).abs().max().item()

    # 3. decode time per token at growing contexts, batch 1. One thread: on a shared 2-core
    # machine this made the naive/absorb ratio steadier than letting the two modes fight for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L = DECODE_CONTEXTS[-1] + 1
        mla = MLA(replace(tiny, max_seq_len=L)).eval()
        cache = mla.new_cache(1)
        kv = (torch.zeros(1, L, tiny.n_heads, mla.qk_head_dim),
              torch.zeros(1, L, tiny.n_heads, tiny.v_head_dim))
        # Fill both caches once; each timed call then decodes at one position of them.
        prompt = torch.randn(1, L, tiny.dim)
        mla(prompt, 0, cache, mode="naive")
        official_naive_decode(mla, prompt, 0, *kv)
        for ctx in DECODE_CONTEXTS:
            ms = _decode_ms(mla, cache, kv, ctx, reps=10 if small else 50)
            for m in DECODE_MODES:
                out[f"decode_ms_{m}_{ctx}"] = ms[m]
            out[f"decode_speedup_{ctx}"] = ms["naive"] / ms["absorb"]
            out[f"decode_speedup_vs_official_{ctx}"] = ms["official"] / ms["absorb"]
        # the two caches' bytes per token per layer at our sizes, float32
        for kind, name in (("naive", "official"), ("mla", "mla")):
            _, nbytes = kv_cache_elements(tiny, kind, bytes_per_element=4)
            out[f"cache_bytes_fp32_{name}_tiny"] = nbytes
    finally:
        torch.set_num_threads(threads)
    return out


def _print_table(res: dict) -> None:
    """Print demo()'s figures as the three small tables of the module docstring."""
    print("KV cache per token per layer (elements)    MHA     GQA    MQA   MLA  naive-MLA")
    for tag in ("v3", "tiny"):
        names = ("naive_official" if k == "naive" else k for k in CACHE_KINDS)
        row = [res[f"cache_elements_{k}_{tag}"] for k in names]
        print(f"  {tag:<40}" + "".join(f"{v:>7,}" for v in row)
              + f"   MHA/MLA = {res[f'cache_ratio_mha_over_mla_{tag}']}x")
    print(f"max |naive - absorbed| over prefill + {res['decode_steps']} decode steps: "
          f"{res['max_abs_diff_naive_absorb']:.2e} (cached vs full: "
          f"{res['max_abs_diff_cached_vs_full']:.2e})")
    print("decode ms/token (batch 1, CPU, 1 thread)   absorb  official  re-expand   "
          "official/absorb  re-expand/absorb")
    for ctx in DECODE_CONTEXTS:
        print(f"  context {ctx:<32}{res[f'decode_ms_absorb_{ctx}']:>7.3f}"
              f"{res[f'decode_ms_official_{ctx}']:>10.3f}{res[f'decode_ms_naive_{ctx}']:>11.3f}"
              f"{res[f'decode_speedup_vs_official_{ctx}']:>17.2f}x"
              f"{res[f'decode_speedup_{ctx}']:>17.1f}x")
    print(f"  cache bytes per token per layer (fp32): official "
          f"{res['cache_bytes_fp32_official_tiny']}, MLA latent {res['cache_bytes_fp32_mla_tiny']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description="MLA demo: cache sizes, naive == absorbed, decode speed")
    ap.add_argument("--json", action="store_true",
                    help="print the measured figures as one JSON dict")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the demo's inputs")
    ap.add_argument("--small", action="store_true", help="fewer steps and repeats")
    args = ap.parse_args()
    res = demo(small=args.small, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)
