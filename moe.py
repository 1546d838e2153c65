"""DeepSeekMoE with auxiliary-loss-free load balancing: DeepSeekMoE (Dai et al. 2024), DeepSeek-V3
§2.1.2, and Wang et al. 2024 (arXiv 2408.15664, "Auxiliary-Loss-Free Load Balancing").

Sections:
    config      MoEConfig and its checks
    experts     MLP (dense SwiGLU, shared experts), Expert, experts_forward (the sorted dispatch)
    gate        Gate: sigmoid affinities, a bias that only selects, group-limited top-k
    layer       MoE: shared + routed experts, balance losses, load bookkeeping, update_bias
    balancing   balance_term, loss_free_bias_update, max_violation, and the model-wide helpers
                update_gate_biases, moe_aux_loss, param_counts
    demo        (not needed to understand DeepSeekMoE) a skewed router, a tiny MoE LM trained
                three ways, the official per-expert loop, plot_loads, demo()

A dense FFN spends all its parameters on every token. An MoE layer keeps many small "fine-grained"
routed experts and runs only K of them per token, plus shared experts that every token uses (common
knowledge lives there, so the routed experts are free to specialise). Every expert is a SwiGLU:

    h'_t = u_t + sum_i FFN_shared_i(u_t) + sum_i g_i,t FFN_routed_i(u_t)
    s_i,t = sigmoid(u_t . e_i)                  affinity of token t to expert i (V2: softmax)
    chosen = TopK(s_i,t + b_i, K)               the bias b_i only CHOOSES experts ...
    g_i,t = route_scale * s_i,t / sum_{j chosen} s_j,t
                                                ... the weights use the UNBIASED s (sigmoid only)

Group-limited routing: a group's score is the sum of its top-2 biased affinities; only the best
topk_groups of n_groups stay, the others are set to -inf and can never be chosen (V3: 256 routed +
1 shared experts, K = 8, 8 groups keep 4, route_scale 2.5).

Unbalanced routing wastes compute and can collapse (a few experts get the tokens, so only they
learn, so they get the tokens). Instead of a loss that fights the language-modelling gradient, V3
nudges b, a buffer without gradient, once per optimizer step from the loads c_i of that step
(summed over all processes): b_i += gamma * sign(mean(c) - c_i), gamma = 1e-3. A tiny
complementary sequence-wise loss guards each sequence (eq. 17-20): L_Bal = alpha sum_i f_i P_i,
f_i = E/(K T) #{t: i chosen}, P_i = mean_t s_i,t / sum_j s_j,t, alpha = 1e-4; the conventional aux
loss (Wang et al.'s baseline) is the same over the whole batch with a larger alpha.
MaxVio = (max_i load_i - mean load) / mean load measures balance, per batch or over a whole set
(global).

Dispatch sorts tokens by expert so each expert's tokens are one contiguous segment, runs the
segments as one grouped matmul (torch._grouped_mm, else a per-expert loop), scales by g and adds
back to the tokens (index_add): no token is dropped. Decoding a few tokens without autograd takes
all_experts instead: every expert on every token, weighted by its gate (0 where not chosen), the
same sum with no sorting. Names follow deepseek-ai/DeepSeek-V3 inference/model.py.

demo(): (1) MaxVio_batch of a skewed frozen router under bias updates (gamma 1e-4/1e-3/1e-2)
against the noise floor of a random router; (2) a tiny MoE LM trained with no balancing, aux loss,
loss-free: held-out loss, MaxVio_global. The speed of the dispatch variants (grouped, sorted loop,
official loop, dense) is an implementation choice, not the paper's claim: notebooks/02_moe.ipynb
§7 measures it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


# ---- config
@dataclass
class MoEConfig:
    dim: int = 128
    moe_inter_dim: int = 64          # hidden width of each expert (fine-grained: narrow)
    n_routed_experts: int = 8        # N_r, the routed experts
    n_shared_experts: int = 1        # N_s, experts every token uses
    n_activated_experts: int = 2     # K_r, routed experts per token
    n_expert_groups: int = 1         # groups of routed experts (V3: 8, one per node)
    n_limited_groups: int = 1        # groups a token may route to (V3: 4)
    score_func: str = "sigmoid"      # "sigmoid" (V3) | "softmax" (V2)
    route_scale: float = 1.0         # the routed output's scale (V3: 2.5)
    balance: str = "lossfree"        # "lossfree" | "aux" | "none"
    bias_update_speed: float = 1e-3  # gamma
    # complementary sequence-wise balance loss (V3 eq. 17-20); 0 = off
    seq_aux_alpha: float = 1e-4
    # conventional auxiliary loss, used only when balance == "aux"
    aux_loss_alpha: float = 1e-2

    def validate(self) -> None:
        """Raise ValueError with a one-line message if the routing is impossible."""
        E = self.n_routed_experts
        k = self.n_activated_experts
        G = self.n_expert_groups
        Gk = self.n_limited_groups
        per_group = E // max(G, 1)
        checks = [
            (E >= 1 and self.n_shared_experts >= 0,
             "need n_routed_experts >= 1 and n_shared_experts >= 0"),
            (1 <= k <= E, f"n_activated_experts={k} must be in 1..n_routed_experts={E}"),
            (G >= 1 and E % G == 0,
             f"n_routed_experts={E} must split evenly into n_expert_groups={G}"),
            (1 <= Gk <= G, f"n_limited_groups={Gk} must be in 1..n_expert_groups={G}"),
            (G == 1 or per_group >= 2,
             "a group's score sums its top-2 experts: need >= 2 experts per group, "
             f"got {per_group}; use fewer groups"),
            (k <= Gk * per_group,
             f"n_activated_experts={k} exceeds the {Gk * per_group} experts of the "
             f"n_limited_groups={Gk} kept groups; keep more groups or activate fewer"),
            (self.score_func in ("sigmoid", "softmax"),
             f"score_func={self.score_func!r}: sigmoid|softmax"),
            (self.balance in ("lossfree", "aux", "none"),
             f"balance={self.balance!r}: use lossfree|aux|none"),
            (self.route_scale > 0, f"route_scale must be positive, got {self.route_scale}"),
            (min(self.bias_update_speed, self.seq_aux_alpha, self.aux_loss_alpha) >= 0,
             "bias_update_speed, seq_aux_alpha and aux_loss_alpha must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"MoEConfig: {msg}")


# ---- experts
class MLP(nn.Module):
    """Dense SwiGLU FFN, w2(silu(w1 x) * w3 x): the dense baseline and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Expert(MLP):
    """One routed expert with the official `experts.{i}.w1/w2/w3` layout (see MoE.expert)."""


def experts_forward(xs: Tensor, counts: Tensor, g: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                    grouped: bool = True, linear=F.linear) -> Tensor:
    """g * SwiGLU_e(x) for every row, each expert e on its contiguous segment of expert-sorted rows.

    Args: xs [M, dim] rows sorted by expert; counts [E] rows per expert; g [M] gate weights, applied
    to the hidden (w2 is linear: same result as scaling the output, cheaper when inter < dim);
    w1, w3 [E, inter, dim] and w2 [E, dim, inter] (expert i's nn.Linear weights are w1[i], w2[i],
    w3[i]). grouped: one torch._grouped_mm per weight on CPU (fp32/bf16, 16-byte aligned rows),
    else a loop over experts (also on GPUs: untested here, and F.linear follows autocast).
    linear: the GEMM of the loop (fp8.fp8_linear for FP8 training; any other than F.linear means
    the loop). Returns [M, dim].
    """
    # torch._grouped_mm wants 16-byte aligned rows; on CPU it takes fp32 or bf16, like the weights
    aligned = all(n * xs.element_size() % 16 == 0 for n in w1.shape[1:])
    on_cpu = xs.device.type == "cpu" and xs.dtype in (torch.float32, torch.bfloat16)
    same_dtype = w1.dtype == xs.dtype
    has_kernel = hasattr(torch, "_grouped_mm")
    if grouped and linear is F.linear and has_kernel and on_cpu and same_dtype and aligned:
        offs = counts.cumsum(0).to(torch.int32)                              # segment ends
        h = F.silu(torch._grouped_mm(xs, w1.mT, offs=offs))
        h = h * torch._grouped_mm(xs, w3.mT, offs=offs)                      # [M, inter]
        return torch._grouped_mm(h * g.unsqueeze(-1), w2.mT, offs=offs)      # [M, dim]
    # The per-expert loop: one GEMM per weight and expert; idle experts cost nothing.
    split = counts.tolist()
    ys = []
    for e, (xe, ge) in enumerate(zip(xs.split(split), g.split(split))):
        if split[e]:
            h = F.silu(linear(xe, w1[e])) * linear(xe, w3[e]) * ge.unsqueeze(-1)
            ys.append(linear(h, w2[e]))
    if not ys:
        return xs.new_zeros(0, w2.shape[1])
    return torch.cat(ys)


def all_experts(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                w3: Tensor) -> Tensor:
    """The decode path, for a few tokens: run EVERY routed expert on every token as three wide
    matmuls and weight each by its gate, which is 0 for the experts a token did not choose. E/k
    times the routed FLOPs, but no sorting, no data-dependent shapes (torch.compile traces it)
    and, below a few dozen tokens, faster than the dispatch. Same sum as experts_forward.
    Args: x [N, dim], weights and indices [N, k]. Returns [N, dim]."""
    E, inter, dim = w1.shape
    gates = x.new_zeros(x.size(0), E).scatter_(1, indices, weights)          # [N, E]
    h = F.silu(F.linear(x, w1.flatten(0, 1))) * F.linear(x, w3.flatten(0, 1))  # [N, E * inter]
    h = h.view(-1, E, inter) * gates.unsqueeze(-1)
    # w2 [E, dim, inter] -> [dim, E * inter]: one GEMM sums every expert's output
    return F.linear(h.flatten(1), w2.permute(1, 0, 2).flatten(1))


# Up to this many tokens, and without autograd, MoE.forward uses all_experts (measured on a 2-core
# CPU at the miniature's sizes: all_experts is faster below ~64 tokens; under torch.compile always).
FEW_TOKENS = 32


# ---- gate
class Gate(nn.Module):
    """Router: sigmoid (or softmax) affinities; the bias only selects; group-limited top-k."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        # init std 0.006, as V3 §4.2
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.dim) * 0.006)
        # HF's e_score_correction_bias: persistent, no gradient, changed only by MoE.update_bias.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Args: x [N, dim]. Returns weights [N, k] (x's dtype), indices [N, k], and the unbiased
        affinities scores [N, E] in fp32 with their gradient (for the balance losses)."""
        # routing in fp32, as in V3
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float())                # [N, E]
        if self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = scores.softmax(dim=-1)
        ### BEGIN SOLUTION: group-limited top-k of s+b; weights: unbiased s, normalised (V3 §2.1.2)
        # s + b serves selection only
        biased = scores.detach() + self.bias
        if self.n_groups > 1:
            biased = biased.view(x.size(0), self.n_groups, -1)               # [N, G, E/G]
            group_scores = biased.topk(2, dim=-1).values.sum(dim=-1)         # [N, G]
            keep = group_scores.topk(self.topk_groups, dim=-1).indices       # [N, topk_groups]
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = biased.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
        indices = biased.topk(self.topk, dim=-1).indices                     # [N, k]
        # the weights come from the UNBIASED s
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices, scores
        ### END SOLUTION

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x [N, dim]. Returns (weights [N, k], indices [N, k]), as the official Gate."""
        return self.route(x)[:2]


# ---- layer
class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts + gate-weighted routed experts, with balance bookkeeping.

    experts.w1, .w3 [E, inter, dim] and .w2 [E, dim, inter] stack the routed experts for the
    grouped matmul: the official `experts.{i}.w1.weight` is experts.w1[i] (MoE.expert(i) gives an
    Expert). dispatch: "grouped" or "loop". forward sets aux_loss and last_load [E], and in
    training mode adds the loads to `counts` until update_bias(). expert_linear: the routed
    experts' GEMM (fp8.swap_to_fp8 sets fp8.fp8_linear).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        E = cfg.n_routed_experts
        D = cfg.dim
        H = cfg.moe_inter_dim
        self.cfg = cfg
        self.dispatch = "grouped"
        self.gate = Gate(cfg)
        # [E, out, in] each, with nn.Linear's default init U(-1/sqrt(in), 1/sqrt(in))
        self.experts = nn.ParameterDict({
            "w1": nn.Parameter(torch.empty(E, H, D).uniform_(-D ** -0.5, D ** -0.5)),
            "w2": nn.Parameter(torch.empty(E, D, H).uniform_(-H ** -0.5, H ** -0.5)),
            "w3": nn.Parameter(torch.empty(E, H, D).uniform_(-D ** -0.5, D ** -0.5)),
        })
        self.shared_experts = None
        if cfg.n_shared_experts > 0:
            self.shared_experts = MLP(D, cfg.n_shared_experts * H)
        self.aux_loss = torch.zeros(())
        self.last_load = torch.zeros(E, dtype=torch.long)
        # A plain tensor, not a buffer: DDP re-broadcasts buffers from rank 0.
        self.counts = None
        self.expert_linear = F.linear

    def expert(self, i: int) -> Expert:
        """Routed expert i as a standalone Expert module (a copy of the stacked weights)."""
        e = Expert(self.cfg.dim, self.cfg.moe_inter_dim).to(self.experts.w1)
        e.load_state_dict({f"{n}.weight": self.experts[n][i] for n in ("w1", "w2", "w3")})
        return e

    def forward(self, x: Tensor) -> Tensor:
        """Args: x [B, T, dim]. Returns [B, T, dim]."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)                                              # [N, D]
        # 1. Route: k experts per token and their weights.
        weights, indices, scores = self.gate.route(x)                        # [N,k] [N,k] [N,E]
        k = indices.size(1)
        E = scores.size(1)
        # [E] tokens per expert (a scatter, not bincount: its shape never depends on the data)
        counts = indices.new_zeros(E).scatter_add_(0, indices.flatten(),
                                                   torch.ones_like(indices.flatten()))
        # 2. Run each token's k experts and add them up: none is dropped.
        # (compiled code cannot cut data-dependent segments: it always runs every expert)
        few = x.size(0) <= FEW_TOKENS or torch.compiler.is_compiling()
        if few and self.expert_linear is F.linear and not torch.is_grad_enabled():
            y = all_experts(x, weights, indices, self.experts.w1, self.experts.w2,
                            self.experts.w3)
        else:
            y = self.sorted_experts(x, weights, indices, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        # 3. Balance losses, alphas applied: V3's per sequence; the conventional one treats the
        #    whole batch as one row. They exist to be differentiated: skipped without autograd.
        loss = scores.new_zeros(())
        if self.cfg.seq_aux_alpha > 0 and torch.is_grad_enabled():
            per_seq = balance_term(scores.view(B, T, E), indices.view(B, T, k))
            loss = self.cfg.seq_aux_alpha * per_seq.mean()
        if self.cfg.balance == "aux" and torch.is_grad_enabled():
            loss = loss + self.cfg.aux_loss_alpha * balance_term(scores[None], indices[None])[0]
        self.aux_loss = loss
        # 4. Loads: of this call, and in training summed until update_bias().
        self.last_load = counts.detach()
        if self.training:
            self.counts = self.last_load if self.counts is None else self.counts + self.last_load
        return y.view(B, T, D)

    def sorted_experts(self, x: Tensor, weights: Tensor, indices: Tensor, counts: Tensor
                       ) -> Tensor:
        """The dispatch: sort the N*k (token, expert) slots by expert so that each expert's rows
        are one contiguous segment, run the segments, add each row back to its token. [N, D]."""
        k = indices.size(1)
        order = indices.flatten().argsort(stable=True)
        token = order // k                                                   # [N*k] slot tokens
        grouped = self.dispatch == "grouped"
        ys = experts_forward(x.index_select(0, token), counts, weights.flatten()[order],
                             self.experts.w1, self.experts.w2, self.experts.w3, grouped,
                             self.expert_linear)
        return ys.new_zeros(x.shape).index_add_(0, token, ys)               # [N, D]

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """Once per optimizer step, never inside forward: all-reduce the loads since the last call,
        apply b += gamma * sign(mean - load) if balance == "lossfree", reset. Returns that load,
        [E] float."""
        if self.counts is None:
            load = torch.zeros_like(self.gate.bias)
        else:
            load = self.counts.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if self.cfg.balance == "lossfree":
            loss_free_bias_update(self.gate.bias, load, self.cfg.bias_update_speed)
        self.counts = None
        return load


# ---- balancing
def balance_term(scores: Tensor, indices: Tensor) -> Tensor:
    """sum_i f_i P_i of each row, [B] (V3 eq. 18-20, no alpha): f_i = E/(k T) * #(i chosen in the
    row), P_i = row mean of s normalised over experts. Args: scores [B, T, E], indices [B, T, k]."""
    B, T, E = scores.shape
    k = indices.size(-1)
    ones = scores.new_ones(B, T * k)
    f = scores.new_zeros(B, E).scatter_add_(1, indices.reshape(B, T * k), ones)  # [B, E] counts
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)              # [B, E]
    return (f * (E / (k * T)) * P).sum(dim=-1)


@torch.no_grad()
def loss_free_bias_update(bias: Tensor, load: Tensor, gamma: float) -> None:
    """In place: b_i += gamma * sign(mean(load) - load_i) (Wang et al. 2024, Alg. 1).
    Args: bias [E], load [E]."""
    ### BEGIN SOLUTION: the auxiliary-loss-free bias update, in place (DeepSeek-V3 §2.1.2)
    # an all-zero load changes nothing
    bias += gamma * torch.sign(load.float().mean() - load.float())
    ### END SOLUTION


def max_violation(load: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load. Args: load [E], tokens per expert (in a
    batch, or summed over a whole evaluation set for MaxVio_global)."""
    load = torch.as_tensor(load, dtype=torch.float64)
    if load.numel() == 0 or load.mean() <= 0:
        raise ValueError("max_violation needs a non-empty load with at least one routed token")
    return ((load.max() - load.mean()) / load.mean()).item()


def update_gate_biases(model: nn.Module) -> dict:
    """Call update_bias on every MoE in model (once per optimizer step). Returns {"maxvio_batch":
    the step's MaxVio averaged over MoE layers (0.0 if none routed a token)}."""
    loads = [m.update_bias() for m in model.modules() if isinstance(m, MoE)]
    vios = [max_violation(load) for load in loads if load.sum() > 0]
    return {"maxvio_batch": sum(vios) / len(vios) if vios else 0.0}


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of aux_loss over every MoE in model (a zero scalar if there is none)."""
    losses = (m.aux_loss.float() for m in model.modules() if isinstance(m, MoE))
    return sum(losses, torch.zeros(()))


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): all parameters are active except the routed experts a token
    skips, (E - k) * 3 * dim * moe_inter_dim per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    cfgs = [m.cfg for m in model.modules() if isinstance(m, MoE)]
    idle = sum((c.n_routed_experts - c.n_activated_experts) * 3 * c.dim * c.moe_inter_dim
               for c in cfgs)
    return total, total - idle


# ---- demo (not needed to understand DeepSeekMoE)
def random_router_maxvio(n_tokens: int, n_experts: int, k: int, draws: int = 32,
                         seed: int = 0) -> tuple:
    """MaxVio_batch of a uniformly random top-k router: (simulated mean, analytic). Loads are
    Binomial(n, p=k/E); the top one is ~z_E = Phi^-1((E - .375)/(E + .25)) std devs up (Blom):
    z_E sqrt((1-p)/(np))."""
    g = torch.Generator().manual_seed(seed)
    vios = []
    for _ in range(draws):
        picks = torch.rand(n_tokens, n_experts, generator=g).topk(k).indices    # [n, k]
        vios.append(max_violation(torch.bincount(picks.flatten(), minlength=n_experts)))
    p = k / n_experts
    z = torch.special.ndtri(torch.tensor((n_experts - 0.375) / (n_experts + 0.25))).item()
    return sum(vios) / draws, z * math.sqrt((1 - p) / (n_tokens * p))


def skewed_router_run(gamma: float, steps: int, n_tokens: int = 4096, n_experts: int = 64,
                      k: int = 6, dim: int = 32, skew: float = 3.0, seed: int = 0) -> list[float]:
    """MaxVio_batch per step of a FIXED random gate whose inputs share a mean direction (so a few
    experts win most tokens); only the bias learns, by the sign rule after every batch."""
    gate = Gate(MoEConfig(dim=dim, n_routed_experts=n_experts, n_activated_experts=k))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_experts, dim, generator=g) / dim ** 0.5
    gate.weight = nn.Parameter(weight, requires_grad=False)
    shift = torch.randn(dim, generator=g) * skew / math.sqrt(dim)
    vios = []
    for _ in range(steps):
        indices = gate(torch.randn(n_tokens, dim, generator=g) + shift)[1]  # [n_tokens, k]
        load = torch.bincount(indices.flatten(), minlength=n_experts)
        vios.append(max_violation(load))
        loss_free_bias_update(gate.bias, load, gamma)
    return vios


def make_corpus(n_seqs: int, T: int, vocab: int, gen: torch.Generator, n_topics: int = 8) -> Tensor:
    """Toy text [n_seqs, T]: each sequence follows one of n_topics random Markov chains (4
    successors per token) over Zipf-frequent tokens, so routing by token identity is unbalanced
    by nature."""
    zipf = 1.0 / torch.arange(1, vocab + 1)
    succ_p = torch.tensor([0.55, 0.25, 0.15, 0.05])
    succ = torch.multinomial(zipf.repeat(n_topics * vocab, 1), 4, generator=gen)
    succ = succ.view(n_topics, vocab, 4)                                     # [topic, token, 4]
    topic = torch.randint(n_topics, (n_seqs,), generator=gen)
    x = [torch.multinomial(zipf, n_seqs, True, generator=gen)]
    for _ in range(T - 1):
        x.append(succ[topic, x[-1], torch.multinomial(succ_p, n_seqs, True, generator=gen)])
    return torch.stack(x, dim=1)


class CausalSelfAttention(nn.Module):
    """Plain multi-head causal self-attention: the demo's stand-in for MLA."""

    def __init__(self, wqkv: nn.Linear, wo: nn.Linear, n_heads: int):
        super().__init__()
        self.wqkv = wqkv
        self.wo = wo
        self.n_heads = n_heads

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(*qkv, is_causal=True)             # [B, H, T, D/H]
        return self.wo(a.transpose(1, 2).reshape(B, T, D))


class TinyBlock(nn.Module):
    """train.Block's pre-norm residuals and names: x + attn(attn_norm(x)), x + ffn(ffn_norm(x))."""

    def __init__(self, attn: nn.Module, ffn: MoE):
        super().__init__()
        self.attn_norm = nn.RMSNorm(ffn.cfg.dim, eps=1e-6)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(ffn.cfg.dim, eps=1e-6)
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class TinyMoELM(nn.Module):
    """Embedding -> n_layers x TinyBlock (causal attention, MoE FFN) -> RMSNorm -> logits."""

    def __init__(self, cfg: MoEConfig, vocab: int, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        D = cfg.dim
        self.embed = nn.Embedding(vocab, D)
        self.head = nn.Linear(D, vocab, bias=False)
        # Built kind by kind (all wqkv, all wo, all MoE): that order of random draws is the one
        # the README's figures come from.
        wqkv = [nn.Linear(D, 3 * D, bias=False) for _ in range(n_layers)]
        wo = [nn.Linear(D, D, bias=False) for _ in range(n_layers)]
        ffn = [MoE(cfg) for _ in range(n_layers)]
        attn = [CausalSelfAttention(q, o, n_heads) for q, o in zip(wqkv, wo)]
        self.layers = nn.ModuleList(TinyBlock(a, f) for a, f in zip(attn, ffn))
        self.norm = nn.RMSNorm(D, eps=1e-6)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)                                               # [B, T, D]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))                                       # [B, T, vocab]


def train_tiny_lm(balance: str, steps: int, seed: int = 0, vocab: int = 128, batch: int = 16,
                  T: int = 64, lr: float = 3e-3, **moe_kw) -> dict:
    """Train TinyMoELM with one balancing strategy (same seed: same data and init). Returns
    {"loss": held-out LM loss, "maxvio_global": of held-out loads, mean over layers,
    "load": [steps, E] layer-0 fractions}."""
    # 1. Data, model and optimizer, from the seed.
    torch.manual_seed(seed)
    moe_kw = {**dict(dim=64, moe_inter_dim=32, n_routed_experts=16, seq_aux_alpha=0.0), **moe_kw}
    cfg = MoEConfig(**moe_kw, balance=balance)
    data = make_corpus(batch * steps + 256, T + 1, vocab, torch.Generator().manual_seed(seed))
    model = TinyMoELM(cfg, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    moes = [layer.ffn for layer in model.layers]

    def lm_loss(x: Tensor) -> Tensor:
        return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    # 2. Train; the gate biases move once per optimizer step.
    history = []
    for step in range(steps):
        loss = lm_loss(data[step * batch:(step + 1) * batch]) + moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(moes[0].counts / moes[0].counts.sum())
        update_gate_biases(model)
    # 3. Evaluate on the held-out last 256 sequences: loss, and loads summed over the set.
    model.eval()
    losses = []
    loads = 0
    with torch.no_grad():
        for x in data[-256:].split(64):
            losses.append(lm_loss(x).item())
            loads = loads + torch.stack([m.last_load for m in moes])         # [layers, E]
    return {"loss": sum(losses) / len(losses),
            "maxvio_global": sum(map(max_violation, loads)) / len(loads),
            "load": torch.stack(history)}


def official_loop_forward(m: MoE, x: Tensor) -> Tensor:
    """MoE.forward as the official inference code loops, torch.where per expert (a reference for
    the tests and notebook 02's timing). Args: x [B, T, dim]. Returns [B*T, dim]."""
    x = x.reshape(-1, x.size(-1))
    weights, indices = m.gate(x)
    y = torch.zeros_like(x)
    for i in range(m.cfg.n_routed_experts):
        idx, top = torch.where(indices == i)                                 # its tokens and slots
        h = F.silu(F.linear(x[idx], m.experts.w1[i])) * F.linear(x[idx], m.experts.w3[i])
        y = y.index_add(0, idx, F.linear(h * weights[idx, top, None], m.experts.w2[i]))
    return y + m.shared_experts(x)


def plot_loads(loads: dict, path: str) -> None:
    """Save per-expert load / mean load over training (layer 0), one panel per strategy."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(loads), figsize=(4 * len(loads), 3), sharey=True)
    for ax, (name, load) in zip(axes, loads.items()):
        im = ax.imshow(load.T * load.size(1), aspect="auto", cmap="magma", vmin=0, vmax=4)
        ax.set(title=name, xlabel="training step", ylabel="expert")
    fig.colorbar(im, ax=axes, label="load / mean load")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def demo(small: bool = False, seed: int = 0, plot_path: str | None = None) -> dict:
    """The measurements of the module docstring, as flat keys of plain numbers; plot_path: where
    to save part 2's load-over-training figure (None: none)."""
    threads = torch.get_num_threads()
    out = {}
    # Tiny tensors on a shared CPU: one thread is faster, and its sums come in one order.
    torch.set_num_threads(1)
    try:
        # 1. Bias balancing of a skewed fixed router: 64 experts, top-6, 4096 tokens per batch.
        steps = 120 if small else 400
        for name in ("1e-4", "1e-3", "1e-2"):
            vios = skewed_router_run(float(name), steps, seed=seed)
            # the same first batch for every gamma
            out["maxvio_batch_start"] = vios[0]
            out[f"maxvio_batch_final_gamma_{name}"] = statistics.mean(vios[-steps // 4:])
        out["maxvio_batch_final"] = out["maxvio_batch_final_gamma_1e-3"]
        floor, floor_analytic = random_router_maxvio(4096, 64, 6, 8 if small else 32, seed)
        out["maxvio_noise_floor"] = floor
        out["maxvio_noise_floor_analytic"] = floor_analytic
        out["maxvio_final_over_floor"] = out["maxvio_batch_final"] / floor
        # 2. Tiny MoE LM three ways, same seed and steps. 300 steps are ~1000x fewer than the
        #    paper's, so loss-free uses part 1's fast gamma = 1e-2; the default 1e-3 is beside it.
        steps = 40 if small else 300
        loads = {}
        runs = {"none": {}, "aux": {}, "lossfree": dict(bias_update_speed=1e-2),
                "lossfree_gamma_1e-3": dict(bias_update_speed=1e-3)}
        for name, kw in runs.items():
            r = train_tiny_lm(name.split("_")[0], steps, seed=seed, **kw)
            out[f"loss_{name}"] = r["loss"]
            out[f"maxvio_global_{name}"] = r["maxvio_global"]
            loads[name] = r["load"]
        if plot_path:
            plot_loads({k: loads[k] for k in ("none", "aux", "lossfree")}, plot_path)
        # 3. Parameters of notebook 02's speed comparison: 16 routed experts top-2 + 1 shared,
        #    against a dense SwiGLU of the same active size (2 routed + 1 shared).
        cfg = MoEConfig(dim=256, moe_inter_dim=128, n_routed_experts=16, seq_aux_alpha=0)
        moe_total, moe_active = param_counts(MoE(cfg))
        out["params_moe_total"] = moe_total
        out["params_moe_active"] = moe_active
        out["params_dense"] = param_counts(MLP(cfg.dim, 3 * cfg.moe_inter_dim))[0]
    finally:
        torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="DeepSeekMoE demo: bias balancing, a tiny LM 3 ways")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON dict")
    ap.add_argument("--seed", type=int, default=0, help="seed of routers, data and init")
    ap.add_argument("--small", action="store_true", help="fewer steps and draws")
    ap.add_argument("--plot", default=os.path.join("out", "moe", "load_over_training.png"),
                    help="where to save the load-over-training figure; '': none")
    args = ap.parse_args()
    res = demo(small=args.small, seed=args.seed, plot_path=args.plot or None)
    if args.json:
        print(json.dumps(res))
    else:
        print("\n".join(f"{k:36s} {v:.4g}" for k, v in res.items()))
