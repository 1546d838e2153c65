"""One diagram per concept, drawn in code so the labels follow the code and nothing downloads.

Sections (each fenced `# ---- name`):
  helpers       Diagram (a Figure Jupyter can show), new_axes, box, arrow, note
  diagrams      draw_model, draw_mla, draw_moe, draw_mtp, draw_fp8, draw_grpo
  command line  DIAGRAMS, save_all and main: `python notebooks/diagrams.py [--out DIR]`

Every draw_* returns a matplotlib.figure.Figure (a Diagram, which adds _repr_png_) built without
pyplot, so drawing or saving one never switches a notebook's backend; a notebook cell that ends
with `draw_mla()` displays it. The sizes
on the diagrams are read from the code: mla.DEEPSEEK_V3 and mla.kv_cache_elements (the cache),
train.ModelArgs (the miniature), moe.MoEConfig (the router), mtp.MTPConfig (D and λ), fp8.BLOCK
and fp8.E4M3 (tiles, N_C and 448), grpo.GRPOConfig (G, ε, β, μ). Pass another config to draw
another size: draw_mla(train.ModelArgs().mla) draws the miniature's layer.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys

import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

# The concept files live one folder up; a notebook's working directory is notebooks/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fp8
import grpo
import mla
import moe
import mtp
import train

# DeepSeek-V3's router (V3 §4.2 and the released config): 256 routed + 1 shared experts of width
# 2048, 8 active, 8 groups of which 4 are kept, route scale 2.5. No module is built from it.
DEEPSEEK_V3_MOE = moe.MoEConfig(dim=7168, moe_inter_dim=2048, n_routed_experts=256,
                                n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                                n_limited_groups=4, route_scale=2.5)
DEEPSEEK_V3_LAYERS = 61
DEEPSEEK_V3_DENSE_LAYERS = 3

# One colour per kind of thing, the same in every diagram.
INPUT = "#eeeeee"
ATTN = "#cfe2f3"
FFN = "#d9ead3"
CACHE = "#fff2cc"
HEAD = "#f4cccc"
RULE = "#e6d7f2"
MASKED = "#bbbbbb"


# ---- helpers
class Diagram(Figure):
    """A Figure that shows itself in Jupyter even where pyplot was never imported: IPython displays
    an object through its _repr_png_ when no backend has registered a formatter for figures."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def new_axes(fig: Figure, where: int | tuple = 111, width: float = 10, height: float = 10):
    """An axes on fig with data coordinates [0, width] x [0, height], no ticks, no frame."""
    ax = fig.add_subplot(where)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    return ax


def box(ax, x: float, y: float, w: float, h: float, text: str, color: str = INPUT,
        fontsize: float = 9, dashed: bool = False, bold: bool = False) -> FancyBboxPatch:
    """A rounded box of size w x h centred on (x, y), with text in its middle."""
    style = "round,pad=0.02,rounding_size=0.1"
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=color,
                           edgecolor="#333333", linewidth=1.0, linestyle="--" if dashed else "-")
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize,
            fontweight="bold" if bold else "normal")
    return patch


def arrow(ax, start: tuple, end: tuple, text: str = "", color: str = "#333333",
          dashed: bool = False, fontsize: float = 8, rad: float = 0.0) -> None:
    """An arrow from start to end (data coordinates), with an optional label at its middle."""
    props = dict(arrowstyle="-|>", color=color, linewidth=1.2, shrinkA=0, shrinkB=0,
                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}")
    ax.annotate("", xy=end, xytext=start, arrowprops=props)
    if text:
        mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        ax.text(mid[0], mid[1], text, ha="center", va="center", fontsize=fontsize, color=color,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5))


def note(ax, x: float, y: float, text: str, fontsize: float = 8, color: str = "#333333",
         ha: str = "left") -> None:
    """Free text: an explanation beside the boxes."""
    ax.text(x, y, text, ha=ha, va="center", fontsize=fontsize, color=color)


# ---- diagrams
def _layers(first: int, last: int) -> str:
    """'layer 3' or 'layers 1..3': the layer ids a stack of blocks covers."""
    return f"layer {first}" if first == last else f"layers {first}..{last}"


def draw_model(args: train.ModelArgs | None = None) -> Figure:
    """The assembled miniature DeepSeek-V3 (train.Transformer, V3 Fig. 2 and Fig. 3).

    Args: args: the model's sizes (default train.ModelArgs(), what `python train.py` trains).
    """
    args = args or train.ModelArgs()
    fig = Diagram(figsize=(12, 8.5))
    ax = new_axes(fig, width=12, height=10)
    ax.set_title("The assembled model: train.Transformer (DeepSeek-V3 §2, Fig. 2-3)", fontsize=12)
    vocab = args.vocab_size or "V"
    m = args.moe
    n_dense = args.n_dense_layers
    n_moe = args.n_layers - n_dense
    # 1. The main model, bottom to top.
    x = 3.3
    box(ax, x, 0.6, 3.6, 0.6, "tokens t_1 .. t_T")
    box(ax, x, 1.7, 3.6, 0.7, f"embed: Embedding({vocab}, {args.dim})")
    arrow(ax, (x, 0.9), (x, 1.35))
    # the top edge of the last box drawn: the next arrow starts there
    top = 2.05
    if n_dense:
        dense = (f"Block x {n_dense}  ({_layers(0, n_dense - 1)})\n"
                 f"x + MLA(RMSNorm(x))\nx + dense FFN(RMSNorm(x)), SwiGLU width {args.inter_dim}")
        box(ax, x, 3.2, 5.4, 1.4, dense, ATTN)
        arrow(ax, (x, top), (x, 2.5))
        top = 3.9
    if n_moe:
        routed = (f"Block x {n_moe}  ({_layers(n_dense, args.n_layers - 1)})\n"
                  f"x + MLA(RMSNorm(x))\nx + DeepSeekMoE(RMSNorm(x)):\n"
                  f"{m.n_shared_experts} shared + {m.n_activated_experts} of "
                  f"{m.n_routed_experts} routed experts")
        box(ax, x, 5.3, 5.4, 1.6, routed, FFN)
        arrow(ax, (x, top), (x, 4.5))
        top = 6.1
    box(ax, x, 7.0, 3.6, 0.6, "norm: RMSNorm")
    arrow(ax, (x, top), (x, 6.7))
    box(ax, x, 8.0, 3.6, 0.7, f"head: Linear({args.dim}, {vocab})", HEAD)
    arrow(ax, (x, 7.3), (x, 7.65))
    box(ax, x, 9.2, 3.6, 0.6, "P^0: the next token t_{i+1}", HEAD)
    arrow(ax, (x, 8.35), (x, 8.9))
    # 2. The MTP modules, sharing the embedding and the head (mtp.MTPModule).
    D = args.mtp.n_mtp_depth
    x2 = 9.4
    if D == 0:
        note(ax, x2, 5.3, "no MTP modules (n_mtp_depth = 0)", fontsize=10, ha="center")
    else:
        depths = "k = 1" if D == 1 else f"k = 1..{D}"
        mod = (f"MTP module, depth {depths} (mtp.MTPModule)\n"
               "eh_proj([enorm(Emb(t_{i+k})) ;\n hnorm(h^{k-1}_i)])\n"
               "-> block (a train.Block) -> norm")
        box(ax, x2, 5.3, 4.6, 1.6, mod, FFN)
        box(ax, x2, 8.0, 3.4, 0.7, f"P^k: the token t_{{i+k+1}}", HEAD)
        arrow(ax, (x2, 6.1), (x2, 7.65), "the same head")
        arrow(ax, (x + 2.7, 5.3), (x2 - 2.3, 5.3))
        note(ax, (x + x2) / 2 + 0.2, 5.55, "h^0 (pre norm)", fontsize=8, ha="center")
        arrow(ax, (x + 1.8, 1.7), (x2, 4.5), dashed=True, rad=0.15)
        note(ax, 7.3, 2.9, "the same Emb", fontsize=8)
        arrow(ax, (x + 1.8, 8.0), (x2 - 1.7, 8.0), "shared", dashed=True)
        loss = ("loss = CE(P^0) + L_MTP + the balance loss\n"
                f"L_MTP = (λ / D) Σ_k CE(P^k),  D = {D},  λ = {args.mtp.mtp_lambda}")
        note(ax, x2, 9.2, loss, fontsize=9, ha="center")
    facts = (f"this model: dim {args.dim}, {args.n_layers} layers ({n_dense} dense),\n"
             f"MLA d_c = {args.mla.kv_lora_rank}, d_R = {args.mla.qk_rope_head_dim}; "
             "V = the tokenizer's vocabulary\n"
             f"DeepSeek-V3: dim {mla.DEEPSEEK_V3.dim}, {DEEPSEEK_V3_LAYERS} layers "
             f"({DEEPSEEK_V3_DENSE_LAYERS} dense),\nd_c = {mla.DEEPSEEK_V3.kv_lora_rank}, "
             "D = 1")
    note(ax, 7.9, 1.3, facts, fontsize=8, color="#555555")
    return fig


def draw_mla(cfg: mla.MLAConfig = mla.DEEPSEEK_V3) -> Figure:
    """Multi-head Latent Attention at decode time, with absorption (V2 §2.1.2-2.1.3, V3 §2.1.1).

    Args: cfg: the layer's sizes (default mla.DEEPSEEK_V3, the real ones).
    """
    H = cfg.n_heads
    dc = cfg.kv_lora_rank
    dr = cfg.qk_rope_head_dim
    dn = cfg.qk_nope_head_dim
    dv = cfg.v_head_dim
    cached = mla.kv_cache_elements(cfg, "mla")[0]
    mha = mla.kv_cache_elements(cfg, "mha")[0]
    fig = Diagram(figsize=(13, 8.5))
    ax = new_axes(fig, width=13, height=10)
    ax.set_title("MLA with absorption: attend over the latent cache (mla.MLA._attend_absorb)",
                 fontsize=12)
    box(ax, 6.5, 0.5, 3.2, 0.6, f"h_t  [{cfg.dim}]")
    # 1. The key/value side: one latent and one shared rope key per token, and only they are cached.
    box(ax, 3.0, 1.9, 4.2, 0.8, f"wkv_a = [W_DKV ; W_KR]\n{cfg.dim} -> d_c + d_R = {dc} + {dr}",
        ATTN)
    arrow(ax, (5.0, 0.7), (3.6, 1.5))
    box(ax, 1.9, 3.3, 2.2, 0.7, f"kv_norm -> c_KV\n[d_c = {dc}]", ATTN)
    box(ax, 4.3, 3.3, 2.2, 0.7, f"RoPE -> k_R\n[d_R = {dr}], all heads", ATTN)
    arrow(ax, (2.5, 2.3), (1.9, 2.95))
    arrow(ax, (3.5, 2.3), (4.3, 2.95))
    cache = (f"the cache, per token per layer\nc_KV ; k_R = {dc} + {dr} = {cached} numbers\n"
             f"(MHA: 2 n_h d_h = {mha:,}, {mha / cached:.1f}x more)")
    box(ax, 3.1, 5.0, 4.8, 1.1, cache, CACHE, fontsize=10, bold=True)
    arrow(ax, (1.9, 3.65), (2.3, 4.45))
    arrow(ax, (4.3, 3.65), (3.9, 4.45))
    # 2. The query side: W_UK folded into the query, so no per-head key is ever built.
    if cfg.q_lora_rank:
        q_text = f"wq_a -> q_norm -> wq_b\n{cfg.dim} -> {cfg.q_lora_rank} -> n_h (d_h + d_R)"
    else:
        q_text = f"wq\n{cfg.dim} -> n_h (d_h + d_R)"
    box(ax, 10.0, 1.9, 4.2, 0.8, q_text, ATTN)
    arrow(ax, (8.0, 0.7), (9.4, 1.5))
    box(ax, 8.9, 3.3, 2.4, 0.7, f"q_C  [n_h = {H}, d_h = {dn}]", ATTN)
    box(ax, 11.4, 3.3, 2.4, 0.7, f"RoPE -> q_R\n[{H}, {dr}]", ATTN)
    arrow(ax, (9.4, 2.3), (8.9, 2.95))
    arrow(ax, (10.6, 2.3), (11.4, 2.95))
    box(ax, 8.9, 4.9, 3.0, 0.9, f"W_UK folded into the query\nq_C W_UK -> [{H}, d_c = {dc}]",
        HEAD, bold=True)
    arrow(ax, (8.9, 3.65), (8.9, 4.45))
    # 3. Scores and the weighted latents, over the cache: multi-query attention.
    score = (f"scores = (q_C W_UK) . c_KV + q_R . k_R,   / sqrt(d_h + d_R) = sqrt({dn + dr})\n"
             f"every head meets ONE shared {cached}-d key and ONE shared {dc}-d value (c_KV)")
    box(ax, 6.5, 6.6, 8.4, 0.9, score, ATTN)
    arrow(ax, (3.1, 5.55), (4.3, 6.15))
    arrow(ax, (8.9, 5.35), (8.3, 6.15))
    arrow(ax, (11.4, 3.65), (10.2, 6.15))
    box(ax, 6.5, 7.9, 6.0, 0.7, f"softmax, then Σ_t p_t c_KV,t  -> [{H}, d_c = {dc}]", ATTN)
    arrow(ax, (6.5, 7.05), (6.5, 7.55))
    box(ax, 6.5, 9.0, 6.0, 0.7, f"W_UV applied after attention -> [{H}, d_v = {dv}] -> wo",
        HEAD, bold=True)
    arrow(ax, (6.5, 8.25), (6.5, 8.65))
    why = ("W_UK, W_UV: the two halves\nof wkv_b, per head.\n\n"
           "Why it works: RoPE is\ndecoupled. Rotating W_UK c_KV\nwould put R_(t-s) between\n"
           "q and W_UK: no single matrix\ncould be folded into the query.")
    note(ax, 0.1, 8.3, why, fontsize=8, color="#555555")
    return fig


def _expert_grid(ax, cfg: moe.MoEConfig, x0: float, y0: float, width: float, seed: int) -> float:
    """The routed experts as cells in their groups: an example routing of one token, with masked
    groups greyed (-inf) and the K chosen experts marked (positions drawn at random, not scored).
    Returns the x centre of the first kept group that holds a chosen expert."""
    E = cfg.n_routed_experts
    G = cfg.n_expert_groups
    per_group = E // G
    rng = random.Random(seed)
    kept = sorted(rng.sample(range(G), cfg.n_limited_groups))
    candidates = [g * per_group + j for g in kept for j in range(per_group)]
    chosen = set(rng.sample(candidates, cfg.n_activated_experts))
    gap = 0.15
    gw = (width - gap * (G - 1)) / G
    cols = max(1, min(per_group, 8))
    rows = -(-per_group // cols)
    cw = gw / cols
    ch = min(cw, 0.18)
    used = sorted({e // per_group for e in chosen})
    for g in range(G):
        gx = x0 + g * (gw + gap)
        colour = FFN if g in kept else MASKED
        ax.add_patch(Rectangle((gx, y0), gw, rows * ch, facecolor=colour, edgecolor="#333333"))
        label = f"group {g}" if g in kept else f"group {g}: -inf"
        ax.text(gx + gw / 2, y0 + rows * ch + 0.12, label, ha="center", fontsize=7)
        for j in range(per_group):
            e = g * per_group + j
            if e in chosen:
                cx = gx + (j % cols) * cw
                cy = y0 + (rows - 1 - j // cols) * ch
                ax.add_patch(Rectangle((cx, cy), cw, ch, facecolor="#cc0000", edgecolor="none"))
    return x0 + used[0] * (gw + gap) + gw / 2


def draw_moe(cfg: moe.MoEConfig = DEEPSEEK_V3_MOE) -> Figure:
    """DeepSeekMoE dispatch: shared + routed experts, a bias that selects but never weights,
    group-limited routing (DeepSeekMoE; V3 §2.1.2; moe.Gate and moe.MoE).

    Args: cfg: the layer's sizes (default DEEPSEEK_V3_MOE, V3's router).
    """
    cfg.validate()
    E = cfg.n_routed_experts
    K = cfg.n_activated_experts
    fig = Diagram(figsize=(13, 9))
    ax = new_axes(fig, width=13, height=10)
    ax.set_title("DeepSeekMoE: the bias b selects, the weights use the unbiased s (moe.Gate)",
                 fontsize=12)
    box(ax, 6.5, 0.4, 3.6, 0.5, f"token u_t  [{cfg.dim}]")
    box(ax, 6.5, 1.4, 5.4, 0.6, f"affinities s_i = {cfg.score_func}(u_t . e_i),  i = 1..{E}  "
        "(fp32)", RULE)
    arrow(ax, (6.5, 0.65), (6.5, 1.1))
    # 1. Selection: s + b, group-limited.
    if cfg.n_expert_groups > 1:
        groups = (f"a group's score = the sum of its top-2 (s + b)\n"
                  f"keep {cfg.n_limited_groups} of {cfg.n_expert_groups} groups, "
                  "the others -> -inf\n")
    else:
        groups = "one group: no group limit\n"
    select = f"SELECT with s + b: the bias b selects only\n{groups}indices = top-{K} of (s + b)"
    box(ax, 3.0, 3.1, 5.2, 1.4, select, RULE)
    arrow(ax, (5.2, 1.7), (3.8, 2.4))
    # 2. Weighting: the unbiased s, normalised.
    if cfg.score_func == "sigmoid":
        weight = (f"WEIGHT with the unbiased s (no b)\n"
                  f"g_i = {cfg.route_scale:g} x s_i / Σ_(j chosen) s_j\n"
                  f"(sigmoid: normalised over the {K} chosen)")
    else:
        weight = (f"WEIGHT with the unbiased s (no b)\ng_i = {cfg.route_scale:g} x s_i\n"
                  "(softmax, V2: already sums to 1 over all experts)")
    box(ax, 10.0, 3.1, 5.0, 1.4, weight, RULE)
    arrow(ax, (7.8, 1.7), (9.2, 2.4))
    arrow(ax, (5.6, 3.1), (7.5, 3.1), "indices")
    bias = ("b: a buffer, no gradient; changed once\nper optimizer step from that step's\n"
            f"loads c_i: b_i += γ sign(mean(c) - c_i),\nγ = {cfg.bias_update_speed:g}")
    note(ax, 0.2, 1.1, bias, fontsize=8, color="#555555")
    # 3. The experts of the example token.
    used_x = _expert_grid(ax, cfg, 0.5, 5.3, 12.0, seed=0)
    masked = "; all in kept groups, grey groups are masked" if cfg.n_expert_groups > 1 else ""
    note(ax, 6.5, 4.95, f"one token's routing, an example: {K} chosen experts (red) of {E}"
         f"{masked}", fontsize=8, ha="center")
    arrow(ax, (3.0, 3.8), (used_x, 5.15))
    # 4. Dispatch and combine.
    dispatch = ("routed experts: sort tokens by expert -> one segment each -> grouped GEMM "
                "(SwiGLU w1, w2, w3)\n-> scale by g -> index_add back to the tokens; "
                f"no token dropped; expert width {cfg.moe_inter_dim}")
    box(ax, 4.6, 7.4, 8.4, 0.8, dispatch, FFN, fontsize=8)
    arrow(ax, (10.0, 3.8), (7.5, 7.0), rad=0.2)
    note(ax, 10.15, 4.05, "g", fontsize=10)
    arrow(ax, (used_x, 6.05), (used_x, 7.0))
    shared = (f"{cfg.n_shared_experts} shared expert(s)\nevery token, weight 1\n"
              f"width {cfg.n_shared_experts * cfg.moe_inter_dim}")
    box(ax, 11.2, 7.4, 2.8, 0.9, shared, FFN, fontsize=8)
    out = "h'_t = u_t + Σ FFN_shared(u_t) + Σ_(i chosen) g_i FFN_i(u_t)"
    box(ax, 6.5, 8.8, 9.0, 0.6, out, FFN, bold=True)
    arrow(ax, (4.6, 7.8), (5.6, 8.5))
    arrow(ax, (11.2, 7.85), (9.5, 8.5))
    active = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim
    note(ax, 6.5, 9.55, f"active FFN width per token: ({K} + {cfg.n_shared_experts}) x "
         f"{cfg.moe_inter_dim} = {active:,}", fontsize=8, ha="center", color="#555555")
    return fig


def draw_mtp(cfg: mtp.MTPConfig | None = None) -> Figure:
    """Multi-Token Prediction's causal chain and speculative verification (V3 §2.2, §5.4.3).

    Args: cfg: D and λ (default mtp.MTPConfig(), the miniature's and V3's D = 1).
    """
    cfg = cfg or mtp.MTPConfig()
    D = cfg.n_mtp_depth
    fig = Diagram(figsize=(15, 8))
    left = new_axes(fig, 121, width=10, height=10)
    left.set_title(f"The MTP chain (mtp.MTPModule, mtp.mtp_logits), D = {D}", fontsize=12)
    # 1. The chain: each depth refines the previous depth's state with one more token's embedding.
    box(left, 3.6, 0.6, 6.0, 0.7, "main model: h^0_i, before its final norm", ATTN)
    box(left, 8.3, 0.6, 2.6, 0.7, "P^0_i: t_{i+1}", HEAD)
    arrow(left, (6.6, 0.6), (7.0, 0.6))
    # Two depths show the step from depth to depth: beyond D dashed, past 2 only a note.
    drawn = 2
    if D > 2:
        note(left, 6.7, 7.0, f"depths 3..{D} repeat the step", fontsize=8, color="#555555")
    y = 1.6
    h_from = (1.2, 0.95)
    for k in range(1, drawn + 1):
        extra = k > D
        box(left, 3.6, y + 0.5, 6.0, 0.6, f"[enorm(Emb(t_{{i+{k}}})) ; hnorm(h^{k - 1}_i)]",
            INPUT, dashed=extra, fontsize=8)
        box(left, 3.6, y + 1.5, 6.0, 0.7, f"eh_proj (2d -> d) -> block TRM_{k} -> h^{k}_i",
            FFN, dashed=extra, fontsize=8)
        box(left, 8.3, y + 1.5, 2.6, 0.8, f"norm -> shared head\nP^{k}_i: t_{{i+{k + 1}}}",
            HEAD, dashed=extra, fontsize=8)
        arrow(left, (3.6, y + 0.8), (3.6, y + 1.15))
        arrow(left, (6.6, y + 1.5), (7.0, y + 1.5))
        arrow(left, h_from, (1.2, y + 0.2), f"h^{k - 1}", dashed=extra)
        if extra:
            note(left, 6.7, y + 0.5, f"depth {k}: only when D >= {k}", fontsize=8,
                 color="#555555")
        h_from = (1.2, y + 1.85)
        y += 2.6
    loss = (f"L_MTP = (λ / D) Σ_k CE_k,  λ = {cfg.mtp_lambda} (V3: 0.3, then 0.1)\n"
            "depth k at position i sees the tokens <= i+k and predicts t_{i+k+1}:\n"
            "no depth sees its own target; Emb and the head are the main model's")
    note(left, 0.3, 7.8, loss, fontsize=8)
    # 2. Speculative decoding: the MTP module drafts, one main forward verifies.
    right = new_axes(fig, 122, width=10, height=10)
    right.set_title("Speculative decoding: draft, then verify (mtp._verify)", fontsize=12)
    box(right, 5.0, 9.0, 8.6, 0.8, "draft: the MTP module reads (h_{n-1}, t_n)\n"
        "and drafts d ~ q for t_{n+1}", FFN)
    box(right, 5.0, 7.6, 8.6, 0.8, "ONE main-model forward on [t_n, d] at positions n, n+1:\n"
        "p(. | t_<=n) judges d;  p(. | t_<=n, d) is ready for a bonus token", ATTN)
    arrow(right, (5.0, 8.6), (5.0, 8.0))
    box(right, 5.0, 6.1, 7.0, 0.9, "accept d with probability min(1, p(d) / q(d))\n"
        "(greedy: accept iff d = argmax p)", RULE, bold=True)
    arrow(right, (5.0, 7.2), (5.0, 6.55))
    box(right, 2.5, 4.2, 4.6, 1.1, "accepted: keep d and sample\nthe bonus t_{n+2} from\n"
        "p(. | t_<=n, d): 2 tokens", FFN)
    box(right, 7.5, 4.2, 4.6, 1.1, "rejected: resample t_{n+1}\nfrom norm(max(0, p - q)):\n"
        "1 token", HEAD)
    arrow(right, (3.8, 5.65), (2.9, 4.75), "yes")
    arrow(right, (6.2, 5.65), (7.1, 4.75), "no")
    exact = ("Every token ends with probability p: min(p, q) through acceptance, the rest\n"
             "through the residual, so the output is distributed as plain sampling from the\n"
             "main model (Leviathan et al. 2023, Chen et al. 2023). Greedy speculative\n"
             "decoding reproduces greedy decoding token for token.\n"
             "V3 §5.4.3 reports 85-90% second-token acceptance and 1.8x tokens/s.")
    note(right, 0.3, 2.2, exact, fontsize=8)
    return fig


def draw_fp8() -> Figure:
    """Block-scaled FP8: 1 x 128 activation tiles, 128 x 128 weight blocks, per-tile scales, and
    the K loop promoted to FP32 every N_C elements (V3 §3.3.2; fp8.act_quant, fp8.fp8_gemm)."""
    n = fp8.BLOCK
    fmax = torch.finfo(fp8.E4M3).max
    fig = Diagram(figsize=(15, 6.5))
    left = new_axes(fig, 121, width=10, height=8)
    left.set_title("Fine-grained scales (fp8.act_quant, fp8.weight_quant)", fontsize=12)
    # 1. Activations A [M, K]: one scale per row per 128 columns; an outlier spoils only its tile.
    kb = 4
    rows = 6
    cw = 0.9
    rh = 0.32
    x0 = 0.6
    y0 = 4.2
    for r in range(rows):
        for k in range(kb):
            outlier = (r, k) == (2, 1)
            colour = "#e06666" if outlier else ("#cfe2f3" if (r + k) % 2 else "#9fc5e8")
            cell = Rectangle((x0 + k * cw, y0 + (rows - 1 - r) * rh), cw, rh, facecolor=colour,
                             edgecolor="#333333", linewidth=0.6)
            left.add_patch(cell)
    note(left, x0 + kb * cw / 2, y0 + rows * rh + 0.35, f"activations A [M, K]: 1 x {n} tiles",
         fontsize=9, ha="center")
    note(left, x0 + kb * cw / 2, y0 - 0.35, f"one scale a_s[m, k] per tile; K = {kb} x {n}",
         fontsize=8, ha="center")
    note(left, x0 + kb * cw + 0.15, y0 + 3.5 * rh, "<- an outlier: only\n"
         f"   its tile's {n} values\n   get a coarse scale", fontsize=7, color="#cc0000")
    # 2. Weights B [N, K]: one scale per 128 x 128 block.
    nb = 2
    bw = 0.8
    bx = 6.6
    for r in range(nb):
        for k in range(kb):
            colour = "#d9ead3" if (r + k) % 2 else "#b6d7a8"
            cell = Rectangle((bx + k * bw, y0 + (nb - 1 - r) * bw + 0.3), bw, bw,
                             facecolor=colour, edgecolor="#333333", linewidth=0.6)
            left.add_patch(cell)
    note(left, bx + kb * bw / 2, y0 + nb * bw + 0.65, f"weights B [N, K]: {n} x {n} blocks",
         fontsize=9, ha="center")
    note(left, bx + kb * bw / 2, y0 - 0.35, f"one scale b_s[n // {n}, k] per block", fontsize=8,
         ha="center")
    scales = (f"E4M3 (fp8.E4M3) for every tensor: max {fmax:g}\n"
              f"s = max(amax, {fp8.AMAX_FLOOR:g}) / {fmax:g},   q = x / s   (clamped, then cast)\n"
              "UE8M0 scales: s rounded UP to a power of two, 2^ceil(log2 s), so |q| <= "
              f"{fmax:g}\n"
              "per-tensor scaling instead: one outlier pushes EVERY value towards zero")
    note(left, 0.3, 2.2, scales, fontsize=8)
    # 3. The GEMM's K loop with promotion.
    right = new_axes(fig, 122, width=10, height=8)
    right.set_title(f"The K loop, promoted every N_C = {n} elements (fp8.fp8_gemm)", fontsize=12)
    y = 7.0
    for k in range(kb):
        box(right, 3.0, y, 5.6, 0.7, f"K block {k}: FP8 MMA on the tensor core\n"
            f"A_k @ B_k^T, {n} products, ~14-bit accumulator", ATTN, fontsize=8)
        scale = f"x a_s[m, {k}] x b_s[n // {n}, {k}]\nadd to C in FP32"
        box(right, 8.3, y, 3.2, 0.7, scale, CACHE, fontsize=8)
        arrow(right, (5.8, y), (6.8, y))
        note(right, 6.3, y + 0.2, "promote", fontsize=7, ha="center")
        if k < kb - 1:
            arrow(right, (8.3, y - 0.35), (8.3, y - 0.85))
        y -= 1.2
    formula = (f"C[m, n] = Σ_k a_s[m, k] b_s[n // {n}, k] (A_k @ B_k^T)[m, n]   "
               f"(k: {n}-wide K blocks)\n"
               "Without promotion the whole K-sum stays in the ~14-bit accumulator and drifts:\n"
               "nearly 2% maximum relative error at K = 4096 (V3 §3.3.2); notebook 04 measures\n"
               "our model of it. Fp8Linear runs Fprop, Dgrad and Wgrad this way (V3 Fig. 6).")
    note(right, 0.2, 1.3, formula, fontsize=8)
    return fig


def draw_grpo(cfg: grpo.GRPOConfig | None = None) -> Figure:
    """The GRPO loop with rule rewards: R1-Zero in miniature (DeepSeekMath §4.1, R1 §2.2).

    Args: cfg: the run's knobs (default grpo.GRPOConfig(), what `python grpo.py` runs).
    """
    cfg = cfg or grpo.GRPOConfig()
    G = cfg.group_size
    fig = Diagram(figsize=(13, 8.5))
    ax = new_axes(fig, width=13, height=10)
    ax.set_title(f"GRPO: {cfg.n_prompts} prompts x G = {G} responses per step (grpo.grpo_step)",
                 fontsize=12)
    prompt = grpo.template([(47, 85)], width=2)[0]
    box(ax, 2.3, 8.8, 4.0, 0.9, f"prompt q, the think-first template\n{prompt}")
    box(ax, 7.3, 8.8, 4.6, 0.9, f"the policy π_θ samples G = {G} responses\n"
        f"o_1 .. o_{G} at temperature {cfg.temperature:g}", ATTN)
    arrow(ax, (4.3, 8.8), (5.0, 8.8))
    # 1. One group: example rewards (accuracy + format: 2 right, 1 well-formed but wrong, 0
    #    malformed) and the advantages they give.
    shown = min(G, 8)
    rewards = [(2, 0, 1, 2, 0, 0, 2, 1)[i % 8] for i in range(shown)]
    mean = statistics.fmean(rewards)
    spread = statistics.pstdev(rewards) if cfg.advantage == "std" else 1.0
    step = 12.0 / shown
    for i in range(shown):
        x = 0.5 + step * (i + 0.5)
        advantage = (rewards[i] - mean) / spread
        shown_a = "0" if advantage == 0 else f"{advantage:+.2g}"
        box(ax, x, 7.0, step - 0.2, 0.8, f"o_{i + 1}\nr = {rewards[i]},  A = {shown_a}",
            RULE, fontsize=8)
    arrow(ax, (7.3, 8.35), (7.3, 7.4))
    if cfg.reward == "format":
        rule = "rule reward r_i = format only (the control run)"
    else:
        rule = f"rule reward r_i = accuracy + {cfg.format_weight:g} x format"
    note(ax, 6.5, 6.25, f"{rule}; parsed strictly (train.parse_answer, train.well_formed), "
         "never executed; no reward model", fontsize=8, ha="center")
    # 2. Advantages, objective, update.
    if cfg.advantage == "std":
        adv = "A_i = (r_i - mean(r)) / std(r)   (GRPO, DeepSeekMath eq. 3)"
    else:
        adv = "A_i = r_i - mean(r)   (Dr. GRPO; --advantage std divides by std(r): GRPO)"
    box(ax, 6.5, 5.1, 10.0, 0.8, f"group-relative advantages: {adv}\n"
        "a group whose rewards are all equal has every A_i = 0: no signal", FFN)
    arrow(ax, (6.5, 5.95), (6.5, 5.55))
    objective = (f"ρ = π_θ / π_old per token;   l = min(ρ A, clip(ρ, 1 - {cfg.eps_low:g}, "
                 f"1 + {cfg.eps_high:g}) A) - β KL_k3(π_θ || π_ref),   β = {cfg.beta:g}\n"
                 f"aggregated by the {cfg.aggregation} mean  (seq: GRPO, token: DAPO, "
                 f"constant: Dr. GRPO)")
    box(ax, 6.5, 3.6, 11.6, 0.9, objective, HEAD)
    arrow(ax, (6.5, 4.65), (6.5, 4.1))
    box(ax, 6.5, 2.1, 6.0, 0.7, f"AdamW step, lr {cfg.lr:g};  μ = {cfg.mu} step(s) per batch",
        ATTN)
    arrow(ax, (6.5, 3.1), (6.5, 2.5))
    # 3. Back to sampling with the updated policy, around the right-hand side.
    ax.plot([9.5, 12.6, 12.6], [2.1, 2.1, 8.8], color="#333333", linewidth=1.2)
    arrow(ax, (12.6, 8.8), (9.65, 8.8))
    ax.text(12.75, 5.5, "the updated policy samples again", rotation=90, ha="center",
            va="center", fontsize=8)
    if cfg.mu == 1:
        mu_note = "μ = 1: ρ ≡ 1 and the clip never acts: REINFORCE with a group-mean baseline"
    else:
        mu_note = f"μ = {cfg.mu}: π_old's log-probs are stored at sampling time; the clip acts"
    note(ax, 6.5, 1.2, mu_note, fontsize=8, ha="center", color="#555555")
    return fig


# ---- command line
DIAGRAMS = {"model": draw_model, "mla": draw_mla, "moe": draw_moe, "mtp": draw_mtp,
            "fp8": draw_fp8, "grpo": draw_grpo}
DEFAULT_OUT = os.path.join(ROOT, "notebooks", "figures")


def save_all(out_dir: str = DEFAULT_OUT, dpi: int = 100) -> list[str]:
    """Draw every diagram and write out_dir/diagram_<name>.png; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, draw in DIAGRAMS.items():
        path = os.path.join(out_dir, f"diagram_{name}.png")
        draw().savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the six concept diagrams as PNG files "
                                     "(diagram_<name>.png); other files in the folder are kept.")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the PNG files (default: notebooks/figures)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default: 100)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a folder: pass a folder")
    for path in save_all(args.out, args.dpi):
        print(path)


if __name__ == "__main__":
    main()
