"""Multi-Token Prediction (MTP) and speculative decoding with it (DeepSeek-V3 §2.2, §5.4.3).

A next-token model learns t_{i+1} from t_{<=i}. DeepSeek-V3 adds D small *sequential* modules:
module k at position i predicts t_{i+k+1}, one token beyond the module before it, by combining the
previous depth's hidden state with the embedding of the token k ahead:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]     (M_k = eh_proj, d x 2d)
    h^k_i  = TRM_k(h'^k_{1..i})                                    (one transformer block, causal)
    P^k_i  = OutHead(h^k_i)                                        (norm + the SHARED output head)

h^0 = the main model's last hidden states (before its final norm). Concatenation order: the paper
writes [RMSNorm(h) ; RMSNorm(Emb)], but the released V3 weights (and vLLM, SGLang) put the embedding
half first; we follow the weights: eh_proj(cat[enorm(embed(t)), hnorm(h)]).

The causal chain: depth k at position i sees tokens <= i+k (h^{k-1}_i saw <= i+k-1, plus Emb(t_{i+k}))
and predicts t_{i+k+1}, so no depth ever sees its own target. Parallel heads (Gloeckle et al. 2024)
predict every future token from the same h_i instead: head k never sees t_{i+1..i+k}, so it must
guess the tokens in between. The sequential design keeps the full chain and lets the module refine h.

    L_MTP = (lambda / D) * sum_k CE_k      (lambda = 0.3 early in V3's training, then 0.1)

The embedding and output head are the main model's own objects (shared, not copied). At inference
the modules are dropped, or used as the drafter of speculative decoding (§5.4.3): the MTP module
proposes the next-next token, and ONE main-model forward on two tokens both checks it and gives the
token after it. V3 reports an 85-90% second-token acceptance rate and 1.8x tokens/s.

    greedy:   keep the draft iff it is the main model's argmax -> output identical to plain greedy.
    sampling: keep the draft d ~ q with probability min(1, p(d)/q(d)); otherwise resample from
              normalise(max(0, p - q)). The output is distributed exactly as the main model's p.

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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MTPConfig:
    n_mtp_depth: int = 1        # D; 0 = no MTP
    mtp_lambda: float = 0.3     # λ

    def __post_init__(self):
        if self.n_mtp_depth < 0 or self.mtp_lambda < 0:
            raise ValueError(f"MTPConfig needs n_mtp_depth >= 0 and mtp_lambda >= 0, got "
                             f"{self.n_mtp_depth} and {self.mtp_lambda}: use D = 0 to turn MTP off")


class MTPModule(nn.Module):
    """One MTP depth (names as in the released V3 weights: enorm, hnorm, eh_proj, block, norm).

    The shared embed and head are held by reference in a plain tuple, which nn.Module does not
    register: model.parameters(), model.state_dict() and the optimizer see them once, under the
    main model's names; MTPModule.parameters() lists only its own weights; model.to() moves them
    with the main model. (V3's checkpoint stores copies per MTP layer: load them into the shared ones.)
    """

    def __init__(self, dim: int, block: nn.Module, embed: nn.Embedding, head: nn.Linear,
                 norm_eps: float = 1e-6):
        super().__init__()
        if embed.embedding_dim != dim or head.in_features != dim:
            raise ValueError(f"MTPModule(dim={dim}) needs the main model's embed and head of width "
                             f"{dim}, got {embed.embedding_dim} and {head.in_features}")
        self.enorm = nn.RMSNorm(dim, eps=norm_eps)
        self.hnorm = nn.RMSNorm(dim, eps=norm_eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)      # M_k
        self.block = block                                       # TRM_k, the caller's block
        self.norm = nn.RMSNorm(dim, eps=norm_eps)                # the shared_head's own norm
        self._shared = (embed, head)                             # not registered: shared, not copied

    embed = property(lambda self: self._shared[0], doc="the main model's nn.Embedding (shared)")
    head = property(lambda self: self._shared[1], doc="the main model's output nn.Linear (shared)")

    def forward(self, h_prev: Tensor, next_tokens: Tensor, start_pos: int = 0, cache=None) -> Tensor:
        """Args: h_prev [B, T, d] previous depth's hidden states (pre final norm); next_tokens [B, T]
        with next_tokens[:, i] = t_{i+k} aligned with h_prev[:, i]; start_pos/cache for the block.
        Returns: h [B, T, d], this depth's hidden states (pre norm)."""
        if h_prev.shape[:2] != next_tokens.shape:
            raise ValueError(f"h_prev {tuple(h_prev.shape)} and next_tokens {tuple(next_tokens.shape)} "
                             "must align position by position: pass t_{i+k} beside h_i")
        ### BEGIN SOLUTION: MTP module: eh_proj([enorm(Emb(t_i+k)); hnorm(h)]), then the block (DeepSeek-V3 §2.2)
        x = torch.cat([self.enorm(self.embed(next_tokens)), self.hnorm(h_prev)], dim=-1)  # [B, T, 2d]
        return self.block(self.eh_proj(x), start_pos=start_pos, cache=cache)            # [B, T, d]
        ### END SOLUTION

    def logits(self, h: Tensor) -> Tensor:
        """h [B, T, d] -> logits [B, T, V] through the module's norm and the shared head."""
        return self.head(self.norm(h))


def mtp_logits(mtp_modules: nn.ModuleList, h: Tensor, tokens: Tensor) -> list[Tensor]:
    """Run the D sequential modules along the causal chain.

    Args:
        mtp_modules: the D MTPModules, depth k = index + 1.
        h: [B, T, d] the main model's final hidden states (pre norm) for the inputs tokens[:, :T].
        tokens: [B, T'] with T' >= T; tokens[:, :T] are h's inputs and any extra columns are further
            targets (train.py passes T' = T + 1, the inputs plus the batch's last target).
    Returns: D tensors [B, L_k, V]. Depth k at position i reads h^{k-1}_i and t_{i+k} and predicts
        t_{i+k+1}, over the L_k = min(T, T' - k - 1) positions where that target exists (T - k - 1
        when T' = T); depth k+1 continues from the first L_{k+1} of depth k's states.
    """
    D, T, T_all = len(mtp_modules), h.shape[1], tokens.shape[1]
    if D == 0 or T_all < T or T_all - D - 1 < 1:
        raise ValueError(f"MTP needs >= 1 module and tokens covering h's {T} positions with a target "
                         f"at depth {D}: got {D} modules and {T_all} tokens")
    out, h_k = [], h
    for k, module in enumerate(mtp_modules, start=1):
        L = min(T, T_all - k - 1)                                      # positions with a target
        h_k = module(h_k[:, :L], tokens[:, k:k + L])                    # [B, L, d]
        out.append(module.logits(h_k))                                  # [B, L, V]
    return out


def mtp_loss(mtp_modules: nn.ModuleList, h: Tensor, tokens: Tensor, lam: float) -> Tensor:
    """L_MTP = (λ/D) Σ_k CE_k, CE_k depth k's mean cross-entropy over its L_k positions (see
    mtp_logits for the arguments and positions; lam = λ). Returns: a scalar."""
    logits = mtp_logits(mtp_modules, h, tokens)
    ce = [F.cross_entropy(lg.flatten(0, 1), tokens[:, k + 1:k + 1 + lg.shape[1]].flatten())
          for k, lg in enumerate(logits, start=1)]
    return lam / len(logits) * torch.stack(ce).sum()


# ----------------------------------------------------------------------------- decoding

def _check_prompt(prompt: Tensor, max_new_tokens: int, temperature: float) -> Tensor:
    prompt = prompt[None] if prompt.dim() == 1 else prompt
    if prompt.dim() != 2 or prompt.shape[1] < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"need a prompt [B, T] with T >= 1, max_new_tokens >= 1, temperature >= 0; "
                         f"got {tuple(prompt.shape)}, {max_new_tokens}, {temperature}")
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
    logits = model.logits(model.forward_hidden(prompt, 0, cache)[:, -1:])[:, -1]   # [B, V]
    new = []
    for n in range(P, P + max_new_tokens):
        new.append(_pick(logits, temperature, generator)[0])                      # [B]
        if len(new) < max_new_tokens:
            logits = model.logits(model.forward_hidden(new[-1][:, None], n, cache))[:, -1]
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


@torch.inference_mode()
def speculative_generate(model, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
                         generator=None) -> tuple[Tensor, dict]:
    """Self-speculative decoding: model.mtp[0] drafts t_{n+1}, one main forward verifies it.

    Batch 1 only (acceptance is decided per sequence; batching needs ragged positions). Each step:
    the MTP module reads (h_{n-1}, t_n) and drafts d for t_{n+1}; the main model runs on [t_n, d] at
    positions n, n+1, giving p(. | t_<=n) to judge d and, if d is kept, p(. | t_<=n, d) for a bonus
    token. A rejected draft leaves a stale cache entry at n+1 that the next step overwrites
    (positions are explicit), so rolling the cache back costs nothing.
    Args: prompt [1, P] (or [P]); temperature 0 = greedy; generator for sampling.
    Returns: (tokens [1, P + max_new_tokens], stats: accepted, drafted, acceptance_rate,
        acceptance_length = 1 + accepted / drafted, the mean tokens per verifying forward).
    """
    prompt = _check_prompt(prompt, max_new_tokens, temperature)
    if prompt.shape[0] != 1 or len(model.mtp) == 0:
        raise ValueError(f"speculative_generate needs batch 1 and a model with an MTP module; got "
                         f"batch {prompt.shape[0]} and {len(model.mtp)} modules: use generate_plain")
    mtp, P, greedy = model.mtp[0], prompt.shape[1], temperature == 0
    total = P + max_new_tokens
    cache, mtp_cache = model.new_cache(1, total), mtp.block.new_cache(1, total)
    as_input = lambda ids: torch.tensor([ids], device=prompt.device)              # noqa: E731
    h = model.forward_hidden(prompt, 0, cache)                                    # [1, P, d]
    toks = prompt[0].tolist() + [int(_pick(model.logits(h[:, -1]), temperature, generator)[0])]
    n, mtp_from, accepted, drafted = P, 0, 0, 0   # toks[n] is the newest token, not yet fed
    while n + 1 < total:
        # Draft: the MTP module at positions mtp_from..n-1 (the new main states); the last drafts.
        h_mtp = mtp(h, as_input(toks[mtp_from + 1:n + 1]), mtp_from, mtp_cache)  # [1, n - mtp_from, d]
        draft, q = _pick(mtp.logits(h_mtp[:, -1]), temperature, generator)     # [1], [1, V]
        draft = int(draft)
        # Verify: one main forward on [t_n, draft] at positions n, n+1.
        h = model.forward_hidden(as_input([toks[n], draft]), n, cache)         # [1, 2, dim]
        logits = model.logits(h)[0]                                             # [2, V]
        drafted, mtp_from = drafted + 1, n
        if greedy:   # keep the draft iff it is the main model's argmax; bonus = argmax after it
            best = logits.argmax(-1).tolist()
            keep, bonus, fix = best[0] == draft, best[1], best[0]
        else:        # keep with probability min(1, p/q), else resample from norm(max(0, p - q))
            ### BEGIN SOLUTION: accept w.p. min(1, p/q) (set keep, bonus), else fix ~ norm(max(0, p - q)) (V3 §5.4.3)
            p = torch.softmax(logits / temperature, dim=-1)                      # [2, V]
            keep = bool(torch.rand((), generator=generator) * q[0, draft] < p[0, draft])
            if keep:
                bonus = int(torch.multinomial(p[1], 1, generator=generator))
            else:
                residual = (p[0] - q[0]).clamp_min(0)                            # [V]
                residual = residual if residual.sum() > 0 else p[0]              # p == q: never rejects
                fix = int(torch.multinomial(residual, 1, generator=generator))
            ### END SOLUTION
        if keep:
            toks += [draft, bonus]
            accepted, n = accepted + 1, n + 2
        else:        # position n+1's hidden state and cache entry are stale: the next step overwrites
            toks.append(fix)
            h, n = h[:, :1], n + 1
    rate = accepted / max(drafted, 1)
    return as_input(toks[:total]), {"accepted": accepted, "drafted": drafted, "acceptance_rate": rate,
                                    "acceptance_length": 1 + rate}


# ----------------------------------------------------------------------------- the demo model

@dataclass
class DemoConfig:
    vocab_size: int = 32
    dim: int = 48
    n_layers: int = 16          # deep and narrow: the one-block drafter is cheap beside 16 blocks
    n_heads: int = 4
    inter_dim: int = 96
    max_seq_len: int = 96       # learned positions: train at the full length decoding reaches
    norm_eps: float = 1e-6
    mtp: MTPConfig = field(default_factory=MTPConfig)


@dataclass
class KVCache:
    k: Tensor   # [B, H, max_len, head_dim]
    v: Tensor   # [B, H, max_len, head_dim]


class DemoBlock(nn.Module):
    """Minimal pre-norm block: multi-head attention with a KV cache, then a SwiGLU MLP."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        dim, self.n_heads, self.head_dim = cfg.dim, cfg.n_heads, cfg.dim // cfg.n_heads
        # mask[i, j] = -inf where key j comes after query i; sliced for cached calls (not a weight).
        mask = torch.full((cfg.max_seq_len, cfg.max_seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.attn_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim, eps=cfg.norm_eps)
        self.w1 = nn.Linear(dim, cfg.inter_dim, bias=False)
        self.w2 = nn.Linear(cfg.inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, cfg.inter_dim, bias=False)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        return KVCache(self.wo.weight.new_zeros(shape), self.wo.weight.new_zeros(shape))

    def forward(self, x: Tensor, start_pos: int = 0, cache: KVCache | None = None) -> Tensor:
        B, T, dim = x.shape
        qkv = self.wqkv(self.attn_norm(x)).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                    # 3 x [B, H, T, hd]
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:   # write positions start_pos.. (overwriting stale entries), attend to all before end
            end = start_pos + T
            cache.k[:, :, start_pos:end], cache.v[:, :, start_pos:end] = k, v
            mask = None if T == 1 else self.mask[start_pos:end, :end]              # [T, end]
            o = F.scaled_dot_product_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], attn_mask=mask)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, dim))                  # [B, T, dim]
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class DemoTransformer(nn.Module):
    """embed + learned positions -> blocks -> norm -> head, plus D MTP modules (the model protocol)."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(DemoBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Built last, so the main model's initial weights do not depend on D (fair comparisons).
        self.mtp = nn.ModuleList(MTPModule(cfg.dim, DemoBlock(cfg), self.embed, self.head, cfg.norm_eps)
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
        lam = self.cfg.mtp.mtp_lambda
        l_mtp = mtp_loss(self.mtp, h, tokens, lam) if len(self.mtp) else ce.new_zeros(())
        return ce + l_mtp, ce, l_mtp


# ----------------------------------------------------------------------------- the demo task

def toy_language(vocab_size: int = 32, n_words: int = 24, seed: int = 0) -> tuple[list[Tensor], Tensor]:
    """A lexicon of words of 2-5 tokens (distinct first tokens) and a word bigram grammar.

    Inside a word every token is fixed by the previous ones, so the next-next token is predictable
    except where a new word starts: the situation MTP drafting meets in text.
    Returns: (words, list of [len] token tensors; succ [n_words, n_words], word transition probs).
    """
    if n_words > vocab_size:
        raise ValueError(f"n_words ({n_words}) must be <= vocab_size ({vocab_size}): first tokens differ")
    g = torch.Generator().manual_seed(seed)
    firsts = torch.randperm(vocab_size, generator=g)[:n_words]
    lengths = torch.randint(2, 6, (n_words,), generator=g)
    words = [torch.cat([firsts[w:w + 1], torch.randint(vocab_size, (int(lengths[w]) - 1,), generator=g)])
             for w in range(n_words)]
    succ = torch.zeros(n_words, n_words)                  # each word is followed by one of 3 words
    for w in range(n_words):
        succ[w, torch.randperm(n_words, generator=g)[:3]] = torch.tensor([0.7, 0.2, 0.1])
    return words, succ


def sample_text(words: list[Tensor], succ: Tensor, batch: int, seq_len: int, generator) -> Tensor:
    """Rows of the toy language, each starting at a word boundary. Returns: [batch, seq_len]."""
    rows = []
    for _ in range(batch):
        w, row = int(torch.randint(len(words), (), generator=generator)), []
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
    return float((pi * h_word).sum() / (pi * torch.tensor([len(w) for w in words])).sum())


def train_demo_model(cfg: DemoConfig, steps: int, seed: int, batch: int = 8, lr: float = 6e-3):
    """Train DemoTransformer(cfg) on toy-language rows of cfg.max_seq_len tokens with AdamW. The seed
    fixes the main model's initial weights and the data order whatever cfg.mtp says.
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


def _speed(model: DemoTransformer, prompt: Tensor, n_new: int, repeats: int) -> tuple[float, float]:
    """Greedy tokens/s at batch 1, plain and speculative: a warm-up, interleaved runs, medians."""
    times = {generate_plain: [], speculative_generate: []}
    for _ in range(repeats + 1):
        for fn, ts in times.items():
            t0 = time.perf_counter()
            fn(model, prompt, n_new)
            ts.append(time.perf_counter() - t0)
    return tuple(n_new / statistics.median(ts[1:]) for ts in times.values())


def demo(small: bool = False, seed: int = 0) -> dict:
    """Train with and without MTP, then measure acceptance and decoding speed. Returns flat figures.

    Runs on one thread: these matmuls are too small to gain from a second, and on a CPU shared with
    other processes two threads wait on each other (measured 88 vs 1,376 ms per training step).
    """
    steps, n_prompts, repeats = (40, 1, 3) if small else (250, 8, 7)
    cfg, t0, threads = DemoConfig(), time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = train_demo_model(DemoConfig(mtp=MTPConfig(n_mtp_depth=0)), steps, seed)[0]
        model = train_demo_model(cfg, steps, seed)[0]
        train_s = time.perf_counter() - t0
        words, succ = toy_language(cfg.vocab_size, seed=seed)
        held_out = sample_text(words, succ, 64, cfg.max_seq_len, torch.Generator().manual_seed(seed + 2))
        with torch.inference_mode():
            loss_base = base.loss(held_out)[1].item()
            _, loss_main, l_mtp = model.loss(held_out)
        prompts, n_new = held_out[:n_prompts, :8], cfg.max_seq_len - 8
        identical, n, g = True, [0, 0, 0, 0], torch.Generator().manual_seed(seed)
        for prompt in prompts:
            spec, st = speculative_generate(model, prompt, n_new)
            identical &= torch.equal(generate_plain(model, prompt[None], n_new), spec)
            st_s = speculative_generate(model, prompt, n_new, temperature=1.0, generator=g)[1]
            n = [a + b for a, b in zip(n, (st["accepted"], st["drafted"], st_s["accepted"], st_s["drafted"]))]
        tps_plain, tps_spec = _speed(model, prompts[:1], n_new, repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "steps": steps, "train_seconds": round(train_s, 1),
        "params_main": sum(p.numel() for k, p in model.named_parameters() if not k.startswith("mtp.")),
        "params_mtp": sum(p.numel() for p in model.mtp.parameters()),
        "loss_floor": round(entropy_rate(words, succ), 4),
        "loss_main_without_mtp": round(loss_base, 4), "loss_main_with_mtp": round(loss_main.item(), 4),
        "loss_mtp_depth1": round(l_mtp.item() / cfg.mtp.mtp_lambda, 4),
        "acceptance_rate": round(n[0] / n[1], 4), "acceptance_length": round(1 + n[0] / n[1], 4),
        "acceptance_rate_sampled": round(n[2] / n[3], 4),
        "tokens_per_s_plain": round(tps_plain, 1), "tokens_per_s_speculative": round(tps_spec, 1),
        "speedup": round(tps_spec / tps_plain, 3), "greedy_identical": bool(identical),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON dict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a shorter run (as in the tests)")
    args = parser.parse_args()
    result = demo(small=args.small, seed=args.seed)
    print(json.dumps(result) if args.json else "\n".join(f"{k:28s} {v}" for k, v in result.items()))
