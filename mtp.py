"""Multi-Token Prediction (MTP) and speculative decoding with it (DeepSeek-V3 §2.2, §5.4.3).

Sections:
    config            MTPConfig (D, λ)
    the MTP module    MTPModule (one depth) and mtp_logits (the causal chain over D depths)
    the loss          mtp_loss = (λ/D) Σ_k CE_k
    decoding          generate_plain; speculative_generate, a loop of draft and _verify
    demo              (not needed to understand MTP) a 16-block demo model, a toy language,
                      training with and without MTP, timing, demo()

A next-token model learns t_{i+1} from t_{<=i}. DeepSeek-V3 adds D small *sequential* modules:
module k at position i predicts t_{i+k+1}, one token beyond the module before it, by combining the
previous depth's hidden state with the embedding of the token k ahead:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]     (M_k = eh_proj, d x 2d)
    h^k_i  = TRM_k(h'^k_{1..i})                                    (one transformer block, causal)
    P^k_i  = OutHead(h^k_i)                                        (norm + the SHARED output head)

h^0 = the main model's last hidden states (before its final norm). Concatenation order: the paper
writes [RMSNorm(h) ; RMSNorm(Emb)], but the released V3 weights (and vLLM, SGLang) put the
embedding half first; we follow the weights: eh_proj(cat[enorm(embed(t)), hnorm(h)]).

The causal chain: depth k at position i sees tokens <= i+k (h^{k-1}_i saw <= i+k-1, plus
Emb(t_{i+k})) and predicts t_{i+k+1}, so no depth ever sees its own target. Parallel heads
(Gloeckle et al. 2024) predict every future token from the same h_i instead: head k never sees
t_{i+1..i+k}, so it must guess the tokens in between. The sequential design keeps the full chain
and lets the module refine h.

    L_MTP = (lambda / D) * sum_k CE_k      (lambda = 0.3 early in V3's training, then 0.1)

The embedding and output head are the main model's own objects (shared, not copied). At inference
the modules are dropped, or used as the drafter of speculative decoding (§5.4.3): the MTP module
proposes the next-next token, and ONE main-model forward on two tokens both checks it and gives the
token after it. V3 reports an 85-90% second-token acceptance rate and 1.8x tokens/s.

    greedy:   keep the draft iff it is the main model's argmax -> output identical to plain greedy.
    sampling: keep the draft d ~ q with probability min(1, p(d)/q(d)); otherwise resample from
              normalise(max(0, p - q)). The output is distributed exactly as the main model's p
              (Leviathan et al. 2023, Chen et al. 2023).

demo() trains a 16-block model with one MTP block on a toy language of multi-token words, with and
without MTP (same seed, steps and data), and measures: the main next-token loss of both (at this
scale MTP barely moves it, as Gloeckle et al. also found for small models), the second-token
acceptance rate, tokens/s at batch 1 with and without speculative decoding, and whether greedy
speculative decoding reproduces plain greedy decoding token for token.
"""
import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# ---- config

@dataclass
class MTPConfig:
    n_mtp_depth: int = 1        # D; 0 = no MTP
    mtp_lambda: float = 0.3     # λ, the MTP loss weight (V3: 0.3, then 0.1)

    def __post_init__(self):
        if self.n_mtp_depth < 0 or self.mtp_lambda < 0:
            raise ValueError(f"MTPConfig needs n_mtp_depth >= 0 and mtp_lambda >= 0, got "
                             f"{self.n_mtp_depth} and {self.mtp_lambda}: "
                             "use D = 0 to turn MTP off")


# ---- the MTP module

class MTPModule(nn.Module):
    """One MTP depth (names as in the released V3 weights: enorm, hnorm, eh_proj, block, norm).

    The shared embed and head are held by reference in a plain tuple, which nn.Module does not
    register: model.parameters(), model.state_dict() and the optimizer see them once, under the
    main model's names; MTPModule.parameters() lists only its own weights; model.to() moves them
    with the main model. (V3's checkpoint stores copies per MTP layer: load them into the shared
    ones.)
    """

    def __init__(self, dim: int, block: nn.Module, embed: nn.Embedding, head: nn.Linear,
                 norm_eps: float = 1e-6):
        super().__init__()
        if embed.embedding_dim != dim or head.in_features != dim:
            raise ValueError(f"MTPModule(dim={dim}) needs the main model's embed and head of "
                             f"width {dim}, got {embed.embedding_dim} and {head.in_features}")
        self.enorm = nn.RMSNorm(dim, eps=norm_eps)
        self.hnorm = nn.RMSNorm(dim, eps=norm_eps)
        # M_k
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        # TRM_k: the caller's transformer block (train.Block in train.py), so mtp.py needs no model
        self.block = block
        # the shared_head's own norm
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        # A tuple is not registered by nn.Module: the embedding and head stay shared, not copied.
        self._shared = (embed, head)

    @property
    def embed(self) -> nn.Embedding:
        """The main model's nn.Embedding (shared)."""
        return self._shared[0]

    @property
    def head(self) -> nn.Linear:
        """The main model's output nn.Linear (shared)."""
        return self._shared[1]

    def forward(self, h_prev: Tensor, next_tokens: Tensor, start_pos: int = 0,
                cache=None) -> Tensor:
        """Args: h_prev [B, T, d] previous depth's hidden states (pre final norm); next_tokens
        [B, T] with next_tokens[:, i] = t_{i+k} aligned with h_prev[:, i]; start_pos/cache for the
        block. Returns: h [B, T, d], this depth's hidden states (pre norm)."""
        if h_prev.shape[:2] != next_tokens.shape:
            raise ValueError(f"h_prev {tuple(h_prev.shape)} and next_tokens "
                             f"{tuple(next_tokens.shape)} must align position by position: "
                             "pass t_{i+k} beside h_i")
        ### BEGIN SOLUTION: eh_proj([enorm(Emb(t_i+k)); hnorm(h)]), then the block (V3 §2.2)
        x = torch.cat([self.enorm(self.embed(next_tokens)), self.hnorm(h_prev)], dim=-1)
        return self.block(self.eh_proj(x), start_pos=start_pos, cache=cache)   # [B, T, d]
        ### END SOLUTION

    def logits(self, h: Tensor) -> Tensor:
        """h [B, T, d] -> logits [B, T, V] through the module's norm and the shared head."""
        return self.head(self.norm(h))


def mtp_logits(mtp_modules: nn.ModuleList, h: Tensor, tokens: Tensor) -> list[Tensor]:
    """Run the D sequential modules along the causal chain.

    Args:
        mtp_modules: the D MTPModules, depth k = index + 1.
        h: [B, T, d] the main model's final hidden states (pre norm) for the inputs tokens[:, :T].
        tokens: [B, T'] with T' >= T; tokens[:, :T] are h's inputs and any extra columns are
            further targets (train.py passes T' = T + 1, the inputs plus the batch's last target).
    Returns: D tensors [B, L_k, V]. Depth k at position i reads h^{k-1}_i and t_{i+k} and predicts
        t_{i+k+1}, over the L_k = min(T, T' - k - 1) positions where that target exists (T - k - 1
        when T' = T); depth k+1 continues from the first L_{k+1} of depth k's states.
    """
    D = len(mtp_modules)
    T = h.shape[1]
    T_all = tokens.shape[1]
    if D == 0 or T_all < T or T_all - D - 1 < 1:
        raise ValueError(f"MTP needs >= 1 module and tokens covering h's {T} positions with a "
                         f"target at depth {D}: got {D} modules and {T_all} tokens")
    out = []
    h_k = h
    for k, module in enumerate(mtp_modules, start=1):
        # the positions whose target t_{i+k+1} exists
        L = min(T, T_all - k - 1)
        h_k = module(h_k[:, :L], tokens[:, k:k + L])                    # [B, L, d]
        out.append(module.logits(h_k))                                  # [B, L, V]
    return out


# ---- the loss

def mtp_loss(mtp_modules: nn.ModuleList, h: Tensor, tokens: Tensor, lam: float) -> Tensor:
    """L_MTP = (λ/D) Σ_k CE_k, CE_k depth k's mean cross-entropy over its L_k positions (see
    mtp_logits for the arguments and positions; lam = λ). Returns: a scalar."""
    logits = mtp_logits(mtp_modules, h, tokens)
    ce = []
    for k, lg in enumerate(logits, start=1):
        targets = tokens[:, k + 1:k + 1 + lg.shape[1]]                  # t_{i+k+1}, [B, L_k]
        ce.append(F.cross_entropy(lg.flatten(0, 1), targets.flatten()))
    return lam / len(logits) * torch.stack(ce).sum()


# ---- decoding

def _check_prompt(prompt: Tensor, max_new_tokens: int, temperature: float) -> Tensor:
    prompt = prompt[None] if prompt.dim() == 1 else prompt
    if prompt.dim() != 2 or prompt.shape[1] < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need a prompt [B, T] with T >= 1, max_new_tokens >= 1, "
                         f"temperature >= 0; got {tuple(prompt.shape)}, {max_new_tokens}, "
                         f"{temperature}")
    return prompt


def _pick(logits: Tensor, temperature: float, generator) -> tuple[Tensor, Tensor | None]:
    """logits [B, V] -> (token [B], probabilities [B, V] or None when greedy)."""
    if temperature == 0:
        return logits.argmax(-1), None
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs


@torch.inference_mode()
def generate_plain(model, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                   generator=None) -> Tensor:
    """One main-model forward per new token, with the KV cache.

    Args: prompt [B, P] (or [P]); temperature 0 = greedy; generator for sampling.
    Returns: [B, P + max_new_tokens], the prompt followed by the new tokens.
    """
    prompt = _check_prompt(prompt, max_new_tokens, temperature)
    B, P = prompt.shape
    cache = model.new_cache(B, P + max_new_tokens)
    h = model.forward_hidden(prompt, 0, cache)
    logits = model.logits(h[:, -1:])[:, -1]                                      # [B, V]
    new = []
    for n in range(P, P + max_new_tokens):
        new.append(_pick(logits, temperature, generator)[0])                      # [B]
        if len(new) < max_new_tokens:
            h = model.forward_hidden(new[-1][:, None], n, cache)
            logits = model.logits(h)[:, -1]
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


def _verify(logits: Tensor, draft: int, q: Tensor | None, temperature: float,
            generator) -> tuple[bool, int]:
    """Accept or reject the draft d for t_{n+1} (Leviathan et al. 2023, Chen et al. 2023).

    Args: logits [2, V], the main model's at positions n, n+1 (for t_{n+1}, then t_{n+2} after d);
        q [1, V] the drafter's probabilities (None when greedy); temperature 0 = greedy.
    Returns: (keep, token): if keep, d stands and token is the bonus t_{n+2}; otherwise token is
        the correction that replaces d as t_{n+1}.
    """
    # 1. Greedy: keep d iff it is the main model's argmax; the bonus is the argmax after it, the
    #    correction the argmax instead of it. Greedy speculative decoding = greedy decoding.
    if temperature == 0:
        best = logits.argmax(-1).tolist()
        keep = best[0] == draft
        return keep, best[1] if keep else best[0]
    ### BEGIN SOLUTION: keep d w.p. min(1, p/q), else resample norm(max(0, p - q)) (Leviathan 2023)
    p = torch.softmax(logits / temperature, dim=-1)                       # [2, V]
    # 2. Keep d with probability min(1, p(d)/q(d)): u < p/q for u ~ U[0, 1), written without the
    #    division.
    keep = bool(torch.rand((), generator=generator) * q[0, draft] < p[0, draft])
    # 3. Kept: the verifying forward also gave p(. | t_<=n, d): sample the bonus token from it.
    if keep:
        return True, int(torch.multinomial(p[1], 1, generator=generator))
    # 4. Rejected: resample from normalise(max(0, p - q)) (multinomial normalises). Then every
    #    token ends with probability p: min(p, q) through acceptance, the rest through here.
    residual = (p[0] - q[0]).clamp_min(0)                                  # [V]
    # p == q leaves no residual, but then d is never rejected: the fallback only avoids a crash.
    residual = residual if residual.sum() > 0 else p[0]
    return False, int(torch.multinomial(residual, 1, generator=generator))
    ### END SOLUTION


@torch.inference_mode()
def speculative_generate(model, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                         generator=None) -> tuple[Tensor, dict]:
    """Self-speculative decoding: model.mtp[0] drafts t_{n+1}, one main forward verifies it.

    Batch 1 only (acceptance is decided per sequence; batching needs ragged positions). Each step:
    the MTP module reads (h_{n-1}, t_n) and drafts d for t_{n+1}; the main model runs on [t_n, d]
    at positions n, n+1, giving p(. | t_<=n) to judge d and, if d is kept, p(. | t_<=n, d) for a
    bonus token. A rejected draft leaves a stale cache entry at n+1 that the next step overwrites
    (positions are explicit), so rolling the cache back costs nothing.
    Args: prompt [1, P] (or [P]); temperature 0 = greedy; generator for sampling.
    Returns: (tokens [1, P + max_new_tokens], stats: accepted, drafted, acceptance_rate,
        acceptance_length = 1 + accepted / drafted, the mean tokens per verifying forward).
    """
    prompt = _check_prompt(prompt, max_new_tokens, temperature)
    if prompt.shape[0] != 1 or len(model.mtp) == 0:
        raise ValueError(f"speculative_generate needs batch 1 and a model with an MTP module; "
                         f"got batch {prompt.shape[0]} and {len(model.mtp)} modules: "
                         "use generate_plain")
    mtp = model.mtp[0]
    device = prompt.device
    P = prompt.shape[1]
    total = P + max_new_tokens
    cache = model.new_cache(1, total)
    mtp_cache = mtp.block.new_cache(1, total)
    # 1. Prefill: the main model reads the prompt and picks the first new token.
    h = model.forward_hidden(prompt, 0, cache)                                   # [1, P, d]
    first = _pick(model.logits(h[:, -1]), temperature, generator)[0]
    toks = prompt[0].tolist() + [int(first)]
    # toks[n] is the newest token, not yet fed to the main model
    n = P
    # h holds the main model's states at positions mtp_from.., not yet read by the MTP module
    mtp_from = 0
    accepted = 0
    drafted = 0
    while n + 1 < total:
        # 2. Draft: the MTP module reads h at mtp_from..n-1 beside t_{mtp_from+1..n}; its last
        #    position drafts d for t_{n+1} (q = its probabilities).
        next_tokens = torch.tensor([toks[mtp_from + 1:n + 1]], device=device)
        h_mtp = mtp(h, next_tokens, mtp_from, mtp_cache)                    # [1, n - mtp_from, d]
        draft, q = _pick(mtp.logits(h_mtp[:, -1]), temperature, generator)    # [1], [1, V]
        draft = int(draft)
        drafted += 1
        # 3. Verify: one main forward on [t_n, d] at positions n, n+1, then accept or reject d.
        h = model.forward_hidden(torch.tensor([[toks[n], draft]], device=device), n, cache)
        keep, token = _verify(model.logits(h)[0], draft, q, temperature, generator)
        mtp_from = n
        # 4. Advance: two tokens (d and the bonus) if d was kept, else one (the correction).
        if keep:
            toks += [draft, token]
            accepted += 1
            n += 2
        else:
            toks.append(token)
            # position n+1's hidden state and cache entry are stale: the next step overwrites them
            h = h[:, :1]
            n += 1
    rate = accepted / max(drafted, 1)
    stats = {"accepted": accepted, "drafted": drafted, "acceptance_rate": rate,
             "acceptance_length": 1 + rate}
    return torch.tensor([toks[:total]], device=device), stats


# ---- demo (not needed to understand MTP)

@dataclass
class DemoConfig:
    vocab_size: int = 32
    dim: int = 48
    # deep and narrow: the one-block drafter is cheap beside 16 blocks
    n_layers: int = 16
    n_heads: int = 4
    inter_dim: int = 96
    # learned positions: train at the full length decoding reaches
    max_seq_len: int = 96
    norm_eps: float = 1e-6
    mtp: MTPConfig = field(default_factory=MTPConfig)


@dataclass
class KVCache:
    k: Tensor   # [B, H, max_len, head_dim]
    v: Tensor   # [B, H, max_len, head_dim]


class DemoAttention(nn.Module):
    """Multi-head attention with a KV cache written at explicit positions."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        # mask[i, j] = -inf where key j comes after query i; sliced for cached calls (not a weight)
        mask = torch.full((cfg.max_seq_len, cfg.max_seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        return KVCache(self.wo.weight.new_zeros(shape), self.wo.weight.new_zeros(shape))

    def forward(self, x: Tensor, start_pos: int = 0, cache: KVCache | None = None) -> Tensor:
        B, T, dim = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                  # 3 x [B, H, T, hd]
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # write positions start_pos.. (overwriting stale entries), attend to all before end
            end = start_pos + T
            cache.k[:, :, start_pos:end] = k
            cache.v[:, :, start_pos:end] = v
            mask = None if T == 1 else self.mask[start_pos:end, :end]          # [T, end]
            o = F.scaled_dot_product_attention(q, cache.k[:, :, :end], cache.v[:, :, :end],
                                               attn_mask=mask)
        return self.wo(o.transpose(1, 2).reshape(B, T, dim))                  # [B, T, dim]


class DemoMLP(nn.Module):
    """SwiGLU, w2(silu(w1 x) * w3 x): moe.py's dense MLP, restated so that mtp.py runs alone."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.inter_dim, bias=False)
        self.w2 = nn.Linear(cfg.inter_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.inter_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DemoBlock(nn.Module):
    """Pre-norm block with train.Block's names: attention with a KV cache, then a SwiGLU MLP."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = DemoAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = DemoMLP(cfg)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.attn.new_cache(batch_size, max_len)

    def forward(self, x: Tensor, start_pos: int = 0, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, cache)
        return x + self.ffn(self.ffn_norm(x))


class DemoTransformer(nn.Module):
    """embed + learned positions -> blocks -> norm -> head, plus D MTP modules."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(DemoBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Built last, so the main model's initial weights do not depend on D (fair comparisons).
        self.mtp = nn.ModuleList(
            MTPModule(cfg.dim, DemoBlock(cfg), self.embed, self.head, cfg.norm_eps)
            for _ in range(cfg.mtp.n_mtp_depth))

    def new_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        return [layer.new_cache(batch_size, max_len) for layer in self.layers]

    def forward_hidden(self, tokens: Tensor, start_pos: int = 0, cache=None) -> Tensor:
        """tokens [B, T] -> h [B, T, dim] before the final norm."""
        T = tokens.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len "
                             f"{self.cfg.max_seq_len}: use a shorter prompt or fewer new tokens")
        h = self.embed(tokens) + self.pos_embed.weight[start_pos:start_pos + T]  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if cache is None else cache[i])
        return h

    def logits(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    def loss(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens [B, T] -> (main CE + L_MTP, main CE, L_MTP), all scalars."""
        h = self.forward_hidden(tokens)
        ce = F.cross_entropy(self.logits(h[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        l_mtp = ce.new_zeros(())
        if len(self.mtp):
            l_mtp = mtp_loss(self.mtp, h, tokens, self.cfg.mtp.mtp_lambda)
        return ce + l_mtp, ce, l_mtp


def toy_language(vocab_size: int = 32, n_words: int = 24,
                 seed: int = 0) -> tuple[list[Tensor], Tensor]:
    """A lexicon of words of 2-5 tokens (distinct first tokens) and a word bigram grammar.

    Inside a word every token is fixed by the previous ones, so the next-next token is predictable
    except where a new word starts: the situation MTP drafting meets in text.
    Returns: (words, list of [len] token tensors; succ [n_words, n_words], word transition probs).
    """
    if n_words > vocab_size:
        raise ValueError(f"n_words ({n_words}) must be <= vocab_size ({vocab_size}): "
                         "first tokens differ")
    g = torch.Generator().manual_seed(seed)
    firsts = torch.randperm(vocab_size, generator=g)[:n_words]
    lengths = torch.randint(2, 6, (n_words,), generator=g)
    words = []
    for w in range(n_words):
        rest = torch.randint(vocab_size, (int(lengths[w]) - 1,), generator=g)
        words.append(torch.cat([firsts[w:w + 1], rest]))
    # each word is followed by one of 3 words
    succ = torch.zeros(n_words, n_words)
    for w in range(n_words):
        succ[w, torch.randperm(n_words, generator=g)[:3]] = torch.tensor([0.7, 0.2, 0.1])
    return words, succ


def sample_text(words: list[Tensor], succ: Tensor, batch: int, seq_len: int,
                generator) -> Tensor:
    """Rows of the toy language, each starting at a word boundary. Returns: [batch, seq_len]."""
    rows = []
    for _ in range(batch):
        w = int(torch.randint(len(words), (), generator=generator))
        row = []
        while len(row) < seq_len:
            row += words[w].tolist()
            w = int(torch.multinomial(succ[w], 1, generator=generator))
        rows.append(row[:seq_len])
    return torch.tensor(rows)


def entropy_rate(words: list[Tensor], succ: Tensor) -> float:
    """Entropy per token (nats), the best next-token loss: only word starts carry information, so
    H = sum_w pi_w H(succ_w) / sum_w pi_w len_w with pi the word chain's stationary distribution."""
    pi = torch.linalg.matrix_power(succ.double(), 512)[0]                        # [n_words]
    h_word = -(succ * succ.clamp_min(1e-12).log()).sum(-1).double()              # [n_words]
    lengths = torch.tensor([len(w) for w in words])
    return float((pi * h_word).sum() / (pi * lengths).sum())


def train_demo_model(cfg: DemoConfig, steps: int, seed: int, batch: int = 8, lr: float = 6e-3):
    """Train DemoTransformer(cfg) on toy-language rows of cfg.max_seq_len tokens with AdamW. The
    seed fixes the main model's initial weights and the data order whatever cfg.mtp says.
    Returns: (the model in eval mode, [(main CE, L_MTP) per step])."""
    torch.manual_seed(seed)
    model = DemoTransformer(cfg)
    words, succ = toy_language(cfg.vocab_size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    history = []
    for _ in range(steps):
        loss, ce, l_mtp = model.loss(sample_text(words, succ, batch, cfg.max_seq_len, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append((ce.item(), l_mtp.item()))
    return model.eval(), history


def interleaved_median(fns: list, repeats: int) -> list[float]:
    """Median seconds of each fn() over repeats calls, the calls alternated (f, g, f, g, ...) so
    that a change of machine load hits all alike; a first round of warm-up calls is dropped."""
    times = [[] for _ in fns]
    for _ in range(repeats + 1):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts[1:]) for ts in times]


def _rate(stats: list[dict]) -> float:
    return sum(s["accepted"] for s in stats) / sum(s["drafted"] for s in stats)


def demo(small: bool = False, seed: int = 0) -> dict:
    """Train with and without MTP, then measure acceptance and decoding speed. Returns flat figures.

    Runs on one thread: these matmuls are too small to gain from a second, and on a CPU shared
    with other processes two threads wait on each other (measured 88 vs 1,376 ms per training step).
    """
    steps = 40 if small else 250
    n_prompts = 1 if small else 8
    repeats = 3 if small else 7
    cfg = DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 1. Train twice, with and without MTP (same seed, steps and data).
        t0 = time.perf_counter()
        base = train_demo_model(DemoConfig(mtp=MTPConfig(n_mtp_depth=0)), steps, seed)[0]
        model = train_demo_model(cfg, steps, seed)[0]
        train_s = time.perf_counter() - t0
        # 2. The main next-token loss of both, and the MTP loss, on held-out rows.
        words, succ = toy_language(cfg.vocab_size, seed=seed)
        g_held_out = torch.Generator().manual_seed(seed + 2)
        held_out = sample_text(words, succ, 64, cfg.max_seq_len, g_held_out)
        with torch.inference_mode():
            loss_base = base.loss(held_out)[1].item()
            _, loss_main, l_mtp = model.loss(held_out)
        # 3. Acceptance, greedy and sampled, and greedy speculative == greedy plain.
        prompts = held_out[:n_prompts, :8]
        n_new = cfg.max_seq_len - 8
        g = torch.Generator().manual_seed(seed)
        identical = True
        greedy = []
        sampled = []
        for prompt in prompts:
            spec, st = speculative_generate(model, prompt, n_new)
            identical &= torch.equal(generate_plain(model, prompt[None], n_new), spec)
            greedy.append(st)
            st_s = speculative_generate(model, prompt, n_new, temperature=1.0, generator=g)
            sampled.append(st_s[1])
        # 4. Greedy tokens/s at batch 1, plain vs speculative (V3 §5.4.3).
        calls = [partial(fn, model, prompts[:1], n_new)
                 for fn in (generate_plain, speculative_generate)]
        t_plain, t_spec = interleaved_median(calls, repeats)
    finally:
        torch.set_num_threads(threads)
    tps_plain = n_new / t_plain
    tps_spec = n_new / t_spec
    params_main = [p for k, p in model.named_parameters() if not k.startswith("mtp.")]
    return {
        "steps": steps,
        "train_seconds": round(train_s, 1),
        "params_main": sum(p.numel() for p in params_main),
        "params_mtp": sum(p.numel() for p in model.mtp.parameters()),
        "loss_floor": round(entropy_rate(words, succ), 4),
        "loss_main_without_mtp": round(loss_base, 4),
        "loss_main_with_mtp": round(loss_main.item(), 4),
        "loss_mtp_depth1": round(l_mtp.item() / cfg.mtp.mtp_lambda, 4),
        "acceptance_rate": round(_rate(greedy), 4),
        "acceptance_length": round(1 + _rate(greedy), 4),
        "acceptance_rate_sampled": round(_rate(sampled), 4),
        "tokens_per_s_plain": round(tps_plain, 1),
        "tokens_per_s_speculative": round(tps_spec, 1),
        "speedup": round(tps_spec / tps_plain, 3),
        "greedy_identical": bool(identical),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON dict")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, data and sampling")
    parser.add_argument("--small", action="store_true", help="a shorter run (as in the tests)")
    args = parser.parse_args()
    result = demo(small=args.small, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(f"{k:28s} {v}" for k, v in result.items()))
