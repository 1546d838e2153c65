"""DeepSeekMoE with auxiliary-loss-free load balancing: DeepSeekMoE (Dai et al. 2024), DeepSeek-V3
§2.1.2, and Wang et al. 2024 (arXiv 2408.15664, "Auxiliary-Loss-Free Load Balancing").

A dense FFN spends all its parameters on every token. An MoE layer keeps many small "fine-grained"
routed experts and runs only K of them per token, plus shared experts that every token uses (common
knowledge lives there, so the routed experts are free to specialise). Every expert is a SwiGLU:

    h'_t = u_t + sum_i FFN_shared_i(u_t) + sum_i g_i,t FFN_routed_i(u_t)
    s_i,t = sigmoid(u_t . e_i)                           affinity of token t to expert i (V2: softmax)
    chosen = TopK(s_i,t + b_i, K)                        the bias b_i only CHOOSES experts ...
    g_i,t = route_scale * s_i,t / sum_{j chosen} s_j,t   ... the weights use the UNBIASED s (sigmoid only)

Group-limited routing: a group's score is the sum of its top-2 biased affinities; only the best
topk_groups of n_groups stay, the others are set to -inf and can never be chosen (V3: 256 routed +
1 shared experts, K = 8, 8 groups keep 4, route_scale 2.5).

Unbalanced routing wastes compute and can collapse (a few experts get the tokens, so only they learn,
so they get the tokens). Instead of a loss that fights the language-modelling gradient, V3 nudges b, a
buffer without gradient, once per optimizer step from the loads c_i of that step (summed over all
processes): b_i += gamma * sign(mean(c) - c_i), gamma = 1e-3. A tiny complementary sequence-wise loss
guards each sequence (eq. 17-20): L_Bal = alpha sum_i f_i P_i, f_i = E/(K T) #{t: i chosen}, P_i =
mean_t s_i,t / sum_j s_j,t, alpha = 1e-4; the conventional aux loss (Wang et al.'s baseline) is the same
over the whole batch with a larger alpha. MaxVio = (max_i load_i - mean load) / mean load measures
balance, per batch or over a whole set (global).

Dispatch sorts tokens by expert so each expert's tokens are one contiguous segment, runs the segments as
one grouped matmul (torch._grouped_mm, else a per-expert loop), scales by g and adds back to the tokens
(index_add): no token is dropped. Names follow deepseek-ai/DeepSeek-V3 inference/model.py.
demo(): (1) MaxVio_batch of a skewed frozen router under bias updates (gamma 1e-4/1e-3/1e-2) against
the noise floor of a random router; (2) a tiny MoE LM trained with no balancing, aux loss, loss-free:
held-out loss, MaxVio_global; (3) forward+backward time: grouped, loops, dense of equal active size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MoEConfig:
    dim: int = 128
    moe_inter_dim: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "sigmoid"      # "sigmoid" (V3) | "softmax" (V2)
    route_scale: float = 1.0
    balance: str = "lossfree"        # "lossfree" | "aux" | "none"
    bias_update_speed: float = 1e-3  # gamma
    seq_aux_alpha: float = 1e-4      # complementary sequence-wise balance loss (V3 eq. 17-20); 0 = off
    aux_loss_alpha: float = 1e-2     # conventional auxiliary loss, used only when balance == "aux"

    def validate(self) -> None:
        """Raise ValueError with a one-line message if the routing is impossible."""
        E, k = self.n_routed_experts, self.n_activated_experts
        G, Gk = self.n_expert_groups, self.n_limited_groups
        per_group = E // max(G, 1)
        for ok, msg in [
            (E >= 1 and self.n_shared_experts >= 0, "need n_routed_experts >= 1 and n_shared_experts >= 0"),
            (1 <= k <= E, f"n_activated_experts={k} must be in 1..n_routed_experts={E}"),
            (G >= 1 and E % G == 0, f"n_routed_experts={E} must split evenly into n_expert_groups={G}"),
            (1 <= Gk <= G, f"n_limited_groups={Gk} must be in 1..n_expert_groups={G}"),
            (G == 1 or per_group >= 2, "a group's score sums its top-2 experts: need >= 2 experts per group, "
                                       f"got {per_group}; use fewer groups"),
            (k <= Gk * per_group, f"n_activated_experts={k} exceeds the {Gk * per_group} experts of the "
                                  f"n_limited_groups={Gk} kept groups; keep more groups or activate fewer"),
            (self.score_func in ("sigmoid", "softmax"), f"score_func={self.score_func!r}: sigmoid|softmax"),
            (self.balance in ("lossfree", "aux", "none"), f"balance={self.balance!r}: use lossfree|aux|none"),
            (self.route_scale > 0, f"route_scale must be positive, got {self.route_scale}"),
            (min(self.bias_update_speed, self.seq_aux_alpha, self.aux_loss_alpha) >= 0,
             "bias_update_speed, seq_aux_alpha and aux_loss_alpha must be >= 0")]:
            if not ok:
                raise ValueError(f"MoEConfig: {msg}")


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


class Gate(nn.Module):
    """Router: sigmoid (or softmax) affinities; the bias only selects; group-limited top-k."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.dim) * 0.006)  # V3 §4.2 init std
        # HF's e_score_correction_bias: persistent, no gradient, changed only by MoE.update_bias.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Args: x [N, dim]. Returns weights [N, k] (x's dtype), indices [N, k], and the unbiased
        affinities scores [N, E] in fp32 with their gradient (for the balance losses)."""
        with torch.autocast(x.device.type, enabled=False):                  # routing in fp32, as in V3
            scores = F.linear(x.float(), self.weight.float())                # [N, E]
        scores = scores.sigmoid() if self.score_func == "sigmoid" else scores.softmax(dim=-1)
        ### BEGIN SOLUTION: group-limited top-k of s + b; weights: the unbiased s, normalised (DeepSeek-V3 §2.1.2)
        biased = scores.detach() + self.bias                                 # for selection only
        if self.n_groups > 1:
            biased = biased.view(x.size(0), self.n_groups, -1)               # [N, G, E/G]
            group_scores = biased.topk(2, dim=-1).values.sum(dim=-1)          # [N, G]
            keep = group_scores.topk(self.topk_groups, dim=-1).indices       # [N, topk_groups]
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = biased.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
        indices = biased.topk(self.topk, dim=-1).indices                     # [N, k]
        weights = scores.gather(1, indices)                                  # the UNBIASED s
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices, scores
        ### END SOLUTION

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x [N, dim]. Returns (weights [N, k], indices [N, k]), as the official Gate."""
        return self.route(x)[:2]


def experts_forward(xs: Tensor, counts: Tensor, g: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                    grouped: bool = True, linear=F.linear) -> Tensor:
    """g * SwiGLU_e(x) for every row, each expert e on its contiguous segment of expert-sorted rows.
    Args: xs [M, dim] rows sorted by expert; counts [E] rows per expert; g [M] gate weights, applied to
    the hidden (w2 is linear: same result as scaling the output, cheaper when inter < dim); w1, w3
    [E, inter, dim] and w2 [E, dim, inter] (expert i's nn.Linear weights are w1[i], w2[i], w3[i]).
    grouped: one torch._grouped_mm per weight on CPU (fp32/bf16, 16-byte aligned rows), else a loop over
    experts (also on GPUs: untested here, and F.linear follows autocast). linear: the GEMM of the loop
    (fp8.fp8_linear for FP8 training; any other than F.linear means the loop). Returns [M, dim].
    """
    aligned = all(n * xs.element_size() % 16 == 0 for n in w1.shape[1:])     # 16-byte rows
    cpu_ok = xs.device.type == "cpu" and xs.dtype in (torch.float32, torch.bfloat16) and w1.dtype == xs.dtype
    if grouped and linear is F.linear and hasattr(torch, "_grouped_mm") and cpu_ok and aligned:
        offs = counts.cumsum(0).to(torch.int32)                              # segment ends
        h = F.silu(torch._grouped_mm(xs, w1.mT, offs=offs)) * torch._grouped_mm(xs, w3.mT, offs=offs)
        return torch._grouped_mm(h * g.unsqueeze(-1), w2.mT, offs=offs)      # [M, inter] -> [M, dim]
    ys, split = [], counts.tolist()
    for e, (xe, ge) in enumerate(zip(xs.split(split), g.split(split))):    # per-expert loop fallback
        if split[e]:                                                         # idle experts: no GEMM
            ys.append(linear(F.silu(linear(xe, w1[e])) * linear(xe, w3[e]) * ge.unsqueeze(-1), w2[e]))
    return torch.cat(ys) if ys else xs.new_zeros(0, w2.shape[1])


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts + gate-weighted routed experts, with balance bookkeeping.

    experts.w1, .w3 [E, inter, dim] and .w2 [E, dim, inter] stack the routed experts for the grouped matmul:
    the official `experts.{i}.w1.weight` is experts.w1[i] (MoE.expert(i) gives an Expert). dispatch:
    "grouped" or "loop". forward sets aux_loss and last_load [E], and in training mode adds the loads to
    `counts` until update_bias(): a plain tensor, not a buffer, as DDP re-broadcasts buffers from rank 0.
    expert_linear: the routed experts' GEMM (fp8.swap_to_fp8 sets fp8.fp8_linear).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.cfg, self.dispatch, E, D, H = cfg, "grouped", cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.gate = Gate(cfg)
        self.experts = nn.ParameterDict({n: nn.Parameter(torch.empty(E, o, i).uniform_(-i ** -0.5, i ** -0.5))
                                         for n, (o, i) in (("w1", (H, D)), ("w2", (D, H)), ("w3", (H, D)))})
        self.shared_experts = MLP(D, cfg.n_shared_experts * H) if cfg.n_shared_experts > 0 else None
        self.aux_loss, self.last_load, self.counts = torch.zeros(()), torch.zeros(E, dtype=torch.long), None
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
        weights, indices, scores = self.gate.route(x)                        # [N, k], [N, k], [N, E]
        k, E = indices.size(1), scores.size(1)
        flat = indices.flatten()                                             # [N*k] expert of each slot
        order = flat.argsort(stable=True)                                    # slots sorted by expert
        token = order // k                                                   # token of each sorted slot
        counts = torch.bincount(flat, minlength=E)                           # [E] segment lengths
        ys = experts_forward(x[token], counts, weights.flatten()[order], self.experts.w1,
                             self.experts.w2, self.experts.w3, self.dispatch == "grouped",
                             self.expert_linear)                                         # [N*k, D]
        y = ys.new_zeros(x.shape).index_add_(0, token, ys)                   # combine: [N, D]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        loss = scores.new_zeros(())                                          # balance losses, alphas applied
        if self.cfg.seq_aux_alpha > 0:                                      # V3's, per sequence
            loss = self.cfg.seq_aux_alpha * balance_term(scores.view(B, T, E), indices.view(B, T, k)).mean()
        if self.cfg.balance == "aux":                                       # conventional: batch = one row
            loss = loss + self.cfg.aux_loss_alpha * balance_term(scores[None], indices[None])[0]
        self.aux_loss = loss
        self.last_load = counts.detach()
        if self.training:
            self.counts = self.last_load if self.counts is None else self.counts + self.last_load
        return y.view(B, T, D)

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """Once per optimizer step, never inside forward: all-reduce the loads since the last call, apply
        b += gamma * sign(mean - load) if balance == "lossfree", reset. Returns that load, [E] float."""
        load = self.counts.float() if self.counts is not None else torch.zeros_like(self.gate.bias)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if self.cfg.balance == "lossfree":
            loss_free_bias_update(self.gate.bias, load, self.cfg.bias_update_speed)
        self.counts = None
        return load


def balance_term(scores: Tensor, indices: Tensor) -> Tensor:
    """sum_i f_i P_i of each row, [B] (V3 eq. 18-20, no alpha): f_i = E/(k T) * #(i chosen in the row),
    P_i = row mean of s normalised over experts. Args: scores [B, T, E], indices [B, T, k]."""
    (B, T, E), k = scores.shape, indices.size(-1)
    f = scores.new_zeros(B, E).scatter_add_(1, indices.reshape(B, T * k), scores.new_ones(B, T * k))
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)              # [B, E]
    return (f * (E / (k * T)) * P).sum(dim=-1)


@torch.no_grad()
def loss_free_bias_update(bias: Tensor, load: Tensor, gamma: float) -> None:
    """In place: b_i += gamma * sign(mean(load) - load_i) (Wang et al. 2024, Alg. 1). Args: [E], [E]."""
    ### BEGIN SOLUTION: the auxiliary-loss-free bias update, in place (DeepSeek-V3 §2.1.2)
    bias += gamma * torch.sign(load.float().mean() - load.float())          # all-zero load: no change
    ### END SOLUTION


def max_violation(load: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load. Args: load [E], tokens per expert (in a batch,
    or summed over a whole evaluation set for MaxVio_global)."""
    load = torch.as_tensor(load, dtype=torch.float64)
    if load.numel() == 0 or load.mean() <= 0:
        raise ValueError("max_violation needs a non-empty load with at least one routed token")
    return ((load.max() - load.mean()) / load.mean()).item()


def update_gate_biases(model: nn.Module) -> dict:
    """Call update_bias on every MoE in model (once per optimizer step). Returns {"maxvio_batch": the
    step's MaxVio averaged over MoE layers (0.0 if none routed a token)}."""
    loads = [m.update_bias() for m in model.modules() if isinstance(m, MoE)]
    vios = [max_violation(load) for load in loads if load.sum() > 0]
    return {"maxvio_batch": sum(vios) / len(vios) if vios else 0.0}


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of aux_loss over every MoE in model (a zero scalar if there is none)."""
    return sum((m.aux_loss.float() for m in model.modules() if isinstance(m, MoE)), torch.zeros(()))


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): all parameters are active except the routed experts a token skips,
    (E - k) * 3 * dim * moe_inter_dim per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    idle = sum((m.cfg.n_routed_experts - m.cfg.n_activated_experts) * 3 * m.cfg.dim * m.cfg.moe_inter_dim
               for m in model.modules() if isinstance(m, MoE))
    return total, total - idle


# ----------------------------------------------------------------------------- demo
def random_router_maxvio(n_tokens: int, n_experts: int, k: int, draws: int = 32, seed: int = 0) -> tuple:
    """MaxVio_batch of a uniformly random top-k router: (simulated mean, analytic). Loads are Binomial(n,
    p=k/E); the top one is ~z_E = Phi^-1((E - .375)/(E + .25)) std devs up (Blom): z_E sqrt((1-p)/(np))."""
    g = torch.Generator().manual_seed(seed)
    picks = (torch.rand(n_tokens, n_experts, generator=g).topk(k).indices for _ in range(draws))  # [n, k]
    vios = [max_violation(torch.bincount(p.flatten(), minlength=n_experts)) for p in picks]
    p, z = k / n_experts, torch.special.ndtri(torch.tensor((n_experts - 0.375) / (n_experts + 0.25))).item()
    return sum(vios) / draws, z * math.sqrt((1 - p) / (n_tokens * p))


def skewed_router_run(gamma: float, steps: int, n_tokens: int = 4096, n_experts: int = 64, k: int = 6,
                      dim: int = 32, skew: float = 3.0, seed: int = 0) -> list[float]:
    """MaxVio_batch per step of a FIXED random gate whose inputs share a mean direction (so a few experts
    win most tokens); only the bias learns, by the sign rule after every batch."""
    gate, g = Gate(MoEConfig(dim=dim, n_routed_experts=n_experts, n_activated_experts=k)), torch.Generator()
    gate.weight = nn.Parameter(torch.randn(n_experts, dim, generator=g.manual_seed(seed)) / dim ** 0.5, False)
    shift, vios = torch.randn(dim, generator=g) * skew / math.sqrt(dim), []
    for _ in range(steps):
        indices = gate(torch.randn(n_tokens, dim, generator=g) + shift)[1]          # [n_tokens, k]
        load = torch.bincount(indices.flatten(), minlength=n_experts)
        vios.append(max_violation(load))
        loss_free_bias_update(gate.bias, load, gamma)
    return vios


def make_corpus(n_seqs: int, T: int, vocab: int, gen: torch.Generator, n_topics: int = 8) -> Tensor:
    """Toy text [n_seqs, T]: each sequence follows one of n_topics random Markov chains (4 successors per
    token) over Zipf-frequent tokens, so routing by token identity is unbalanced by nature."""
    zipf, succ_p = 1.0 / torch.arange(1, vocab + 1), torch.tensor([0.55, 0.25, 0.15, 0.05])
    succ = torch.multinomial(zipf.repeat(n_topics * vocab, 1), 4, generator=gen).view(n_topics, vocab, 4)
    topic = torch.randint(n_topics, (n_seqs,), generator=gen)
    x = [torch.multinomial(zipf, n_seqs, True, generator=gen)]
    for _ in range(T - 1):
        x.append(succ[topic, x[-1], torch.multinomial(succ_p, n_seqs, True, generator=gen)])
    return torch.stack(x, dim=1)


class TinyMoELM(nn.Module):
    """Embedding -> n_layers x (causal attention, MoE FFN) with pre-norm residuals -> logits."""

    def __init__(self, cfg: MoEConfig, vocab: int, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        D, self.n_heads = cfg.dim, n_heads
        self.embed, self.head = nn.Embedding(vocab, D), nn.Linear(D, vocab, bias=False)
        self.norms = nn.ModuleList(nn.RMSNorm(D, eps=1e-6) for _ in range(2 * n_layers + 1))
        self.wqkv = nn.ModuleList(nn.Linear(D, 3 * D, bias=False) for _ in range(n_layers))
        self.wo = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(n_layers))
        self.ffn = nn.ModuleList(MoE(cfg) for _ in range(n_layers))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)                                               # [B, T, D]
        B, T, D = h.shape
        for i, (wqkv, wo, ffn) in enumerate(zip(self.wqkv, self.wo, self.ffn)):
            qkv = wqkv(self.norms[2 * i](h)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(*qkv, is_causal=True)         # [B, H, T, D/H]
            h = h + wo(a.transpose(1, 2).reshape(B, T, D))
            h = h + ffn(self.norms[2 * i + 1](h))
        return self.head(self.norms[-1](h))                                  # [B, T, vocab]


def train_tiny_lm(balance: str, steps: int, seed: int = 0, vocab: int = 128, batch: int = 16, T: int = 64,
                  lr: float = 3e-3, **moe_kw) -> dict:
    """Train TinyMoELM with one balancing strategy (same seed: same data and init). Returns {"loss": held-out
    LM loss, "maxvio_global": of held-out loads, mean over layers, "load": [steps, E] layer-0 fractions}."""
    torch.manual_seed(seed)
    cfg = MoEConfig(**{**dict(dim=64, moe_inter_dim=32, n_routed_experts=16, seq_aux_alpha=0.0), **moe_kw},
                    balance=balance)
    data = make_corpus(batch * steps + 256, T + 1, vocab, torch.Generator().manual_seed(seed))
    model = TinyMoELM(cfg, vocab)
    opt, history = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), []
    lm_loss = lambda x: F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())  # noqa: E731
    for step in range(steps):
        loss = lm_loss(data[step * batch:(step + 1) * batch]) + moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(model.ffn[0].counts / model.ffn[0].counts.sum())
        update_gate_biases(model)                                            # once per optimizer step
    model.eval()
    with torch.no_grad():
        losses, loads = [], 0
        for x in data[-256:].split(64):                                      # held out
            losses.append(lm_loss(x).item())
            loads = loads + torch.stack([m.last_load for m in model.ffn])    # [layers, E]
    return {"loss": sum(losses) / len(losses), "maxvio_global": sum(map(max_violation, loads)) / len(loads),
            "load": torch.stack(history)}


def official_loop_forward(m: MoE, x: Tensor) -> Tensor:
    """MoE.forward as the official inference code loops, torch.where per expert (a timing baseline).
    Args: x [B, T, dim]. Returns [B*T, dim]."""
    x, (w1, w2, w3) = x.reshape(-1, x.size(-1)), (m.experts.w1, m.experts.w2, m.experts.w3)
    (weights, indices), y = m.gate(x), torch.zeros_like(x)
    for i in range(w1.size(0)):
        idx, top = torch.where(indices == i)                                 # its tokens and their slot
        h = F.silu(F.linear(x[idx], w1[i])) * F.linear(x[idx], w3[i]) * weights[idx, top, None]
        y = y.index_add(0, idx, F.linear(h, w2[i]))
    return y + m.shared_experts(x)


def time_fwd_bwd(fns: dict, x: Tensor, repeats: int) -> dict:
    """Median ms of forward+backward of each function; interleaved, so machine noise hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats + 2):                                            # the first 2 are warm-up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x).square().mean().backward()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(ts[2:]) for name, ts in times.items()}


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
    """The three measurements of the module docstring, as flat keys of plain numbers; plot_path: where
    to save part 2's load-over-training figure (None: none)."""
    threads, out = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # tiny tensors on a shared CPU: one thread is faster, and timings steadier
    try:
        # 1. Bias balancing of a skewed fixed router: 64 experts, top-6, 4096 tokens per batch.
        steps = 120 if small else 400
        for name, gamma in (("1e-4", 1e-4), ("1e-3", 1e-3), ("1e-2", 1e-2)):
            vios = skewed_router_run(gamma, steps, seed=seed)
            out["maxvio_batch_start"] = vios[0]                                # same first batch for all
            out[f"maxvio_batch_final_gamma_{name}"] = statistics.mean(vios[-steps // 4:])
        out["maxvio_batch_final"] = out["maxvio_batch_final_gamma_1e-3"]
        floor = random_router_maxvio(4096, 64, 6, 8 if small else 32, seed)
        out["maxvio_noise_floor"], out["maxvio_noise_floor_analytic"] = floor
        out["maxvio_final_over_floor"] = out["maxvio_batch_final"] / out["maxvio_noise_floor"]
        # 2. Tiny MoE LM three ways, same seed and steps. 300 steps are ~1000x fewer than the paper's, so
        #    loss-free uses part 1's fast gamma = 1e-2; the default 1e-3 is reported beside it.
        steps, loads = (40 if small else 300), {}
        for name, kw in (("none", {}), ("aux", {}), ("lossfree", dict(bias_update_speed=1e-2)),
                         ("lossfree_gamma_1e-3", dict(bias_update_speed=1e-3))):
            r = train_tiny_lm(name.split("_")[0], steps, seed=seed, **kw)
            out[f"loss_{name}"], out[f"maxvio_global_{name}"] = r["loss"], r["maxvio_global"]
            loads[name] = r["load"]
        if plot_path:
            plot_loads({k: loads[k] for k in ("none", "aux", "lossfree")}, plot_path)
        # 3. Speed on 4096 tokens: 16 routed experts top-2 + 1 shared vs a dense SwiGLU of equal active size.
        torch.manual_seed(seed)
        cfg = MoEConfig(dim=256, moe_inter_dim=128, n_routed_experts=16, seq_aux_alpha=0)  # top-2, 1 shared
        moe, dense = MoE(cfg), MLP(cfg.dim, (2 + 1) * cfg.moe_inter_dim)     # active: 2 routed + 1 shared
        run = lambda dispatch: lambda x: (setattr(moe, "dispatch", dispatch), moe(x))[1]  # noqa: E731
        fns = {"moe_grouped": run("grouped"), "moe_sorted_loop": run("loop"),
               "moe_loop": lambda x: official_loop_forward(moe, x), "dense_same_active": dense}
        ms = time_fwd_bwd(fns, torch.randn(1, 1024 if small else 4096, cfg.dim), 3 if small else 15)
        out.update({f"ms_{k}": v for k, v in ms.items()})
        out["moe_over_dense"] = ms["moe_grouped"] / ms["dense_same_active"]
        out["params_moe_total"], out["params_moe_active"] = param_counts(moe)
        out["params_dense"] = param_counts(dense)[0]
    finally:
        torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="DeepSeekMoE demo: bias balancing, a tiny LM three ways, speed")
    ap.add_argument("--json", action="store_true", help="print the measured figures as one JSON dict")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--plot", default=os.path.join("out", "moe", "load_over_training.png"), help="'': none")
    args = ap.parse_args()
    res = demo(small=args.small, seed=args.seed, plot_path=args.plot or None)
    print(json.dumps(res) if args.json else "\n".join(f"{k:36s} {v:.4g}" for k, v in res.items()))
