"""The miniature DeepSeek-V3: model, tokenizer, a verifiable reasoning world, and pretraining.

This is the wiring file. It assembles the concept files into DeepSeek-V3's architecture (V3 §2):

    Block       = x + MLA(RMSNorm(x)); x + FFN(RMSNorm(x)), FFN dense for the first
                  n_dense_layers (V3 keeps 3 dense) and DeepSeekMoE after
    Transformer = embed -> blocks -> RMSNorm -> head, plus D MTP modules sharing embed and head
    loss        = CE(next token) + L_MTP (λ/D Σ CE_k) + sequence-wise balance loss;
                  MoE gate biases updated once per optimizer step (auxiliary-loss-free balancing)

The data is a world where reasoning is *verifiable* and *pays*, which is what the R1 story needs:
multi-digit addition, answered either directly (`<answer>0006229</answer>`) or step by step
(`<think>8+1+0=09,______9 3+9+0=12,_____29 ...</think><answer>0007329</answer>`, one column at a
time with its carry). The corpus mostly answers directly, and its direct answers are hasty: written
without working, they forget carries (right only when no column carries; `--no-hasty` makes them
exact, and a 4-layer model then learns to answer most problems directly). So the pretrained model
*can* reason (force `<think>` and it is right) but rarely *chooses* to, and its own quick answers
are usually wrong. grpo.py's RL must discover that thinking pays, as R1-Zero did.

    python train.py                    # pretrain (≈ minutes on a laptop CPU), writes out/pretrain/
    python train.py --sample "123+456="  # complete prompts with the checkpoint
    python train.py --bench            # tokens/s of this model vs a plain dense GPT of equal active size
    python train.py --student          # distill.py's smaller dense student (no MoE, no MTP)
    python train.py --fp8 | --compile | --data FILE   # FP8 Linears (V3 §3.3), torch.compile, any UTF-8 text
    torchrun --standalone --nproc_per_node=2 train.py # DistributedDataParallel (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, is_dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tiktoken

from fp8 import swap_to_fp8
from mla import MLA, MLAConfig
from moe import MLP, MoE, MoEConfig, moe_aux_loss, param_counts, update_gate_biases
from mtp import MTPConfig, MTPModule, mtp_loss

# ----------------------------------------------------------------------------- config


@dataclass
class ModelArgs:
    vocab_size: int = 0           # set from the tokenizer
    dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1       # the first layers use a dense FFN (V3: 3 of 61)
    inter_dim: int = 384          # dense FFN hidden size
    max_seq_len: int = 512
    norm_eps: float = 1e-6
    pad_id: int = 0               # set from the tokenizer
    stop_ids: tuple = ()          # generation stops at these (end of answer); set from the tokenizer
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(moe_inter_dim=96, n_routed_experts=8,
                                                             n_activated_experts=2))
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def __post_init__(self):      # one width for every component: the sub-configs follow `dim`
        self.mla.dim = self.moe.dim = self.dim
        self.mla.max_seq_len, self.mla.norm_eps = self.max_seq_len, self.norm_eps
        self.stop_ids = tuple(self.stop_ids)


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16          # sequences per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 25
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_digits: int = 6           # training operands have 1..max_digits digits (written at this width)
    think_frac: float = 0.35      # share of step-by-step answers in the corpus
    hasty: bool = True            # the corpus's direct answers forget carries (hasty_sum); worked ones are right
    eval_interval: int = 300
    eval_n: int = 200
    log_interval: int = 25
    device: str = "auto"
    seed: int = 0
    out: str = "out/pretrain"
    resume: bool = False
    sample: str = ""
    bench: bool = False
    fp8: bool = False             # Linears in block-scaled FP8 (embed, head, gate, norms stay high precision)
    compile: bool = False         # torch.compile the training forward/backward (slow to compile on a CPU)
    data: str = ""                # a UTF-8 text file to pretrain on instead of the reasoning world
    student: bool = False         # distill.py's small dense student (student_config) instead of the MoE model


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainConfig = field(default_factory=TrainConfig)


def student_config(cfg: Config | None = None) -> Config:
    """The student distill.py distils into (R1 §2.4: small DENSE models): same world and tokenizer as
    cfg, 3/4 of the width and depth, no MoE (every layer dense), no MTP: 0.41M parameters vs 1.9M (1.0M
    active). A 2-layer, width-64 student (0.14M) learned nothing in 600 steps, not even the hasty sums."""
    mla = MLAConfig(n_heads=4, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=24)
    model = ModelArgs(dim=96, n_layers=3, n_dense_layers=3, inter_dim=288, mla=mla, mtp=MTPConfig(n_mtp_depth=0))
    tc = dataclasses.replace((cfg or Config()).train, student=True)
    return Config(model=model, train=tc)


# Sub-config fields that follow ModelArgs and so get no flag of their own.
DERIVED = {"dim", "max_seq_len", "norm_eps"}


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from dataclasses.asdict output (as stored in checkpoints)."""
    m = dict(d["model"])
    m["mla"], m["moe"], m["mtp"] = MLAConfig(**m["mla"]), MoEConfig(**m["moe"]), MTPConfig(**m["mtp"])
    return Config(model=ModelArgs(**m), train=TrainConfig(**d["train"]))


# ----------------------------------------------------------------------------- tokenizer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<think>", "</think>", "<answer>", "</answer>"]
# Digits are always single tokens: they never share a pre-token chunk, so no merge can join them.
PAT_STR = r""" ?[^\s\d]+|\d|\s+(?!\S)|\s+"""


def learn_merges(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair."""
    ranks = {bytes([i]): i for i in range(256)}
    for s in SPECIALS:
        text = text.replace(s, " ")
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(PAT_STR, text))
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs or pairs.most_common(1)[0][1] < 2:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        words = Counter({_merge(w, a, b): c for w, c in words.items()})
    return ranks


def _merge(w: tuple, a: bytes, b: bytes) -> tuple:
    out, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return tuple(out)


def build_tokenizer(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding("mini-deepseek", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens=specials)


def tokenizer_state(enc: tiktoken.Encoding) -> dict:
    """What a checkpoint stores to rebuild the tokenizer exactly (plain types: weights_only-safe)."""
    return {"ranks": [[k.hex(), v] for k, v in enc._mergeable_ranks.items()]}


def tokenizer_from_state(state: dict) -> tiktoken.Encoding:
    return build_tokenizer({bytes.fromhex(k): v for k, v in state["ranks"]})


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def special_id(enc: tiktoken.Encoding, name: str) -> int:
    return enc.encode_single_token(name)


# ----------------------------------------------------------------------------- reasoning world


def think_steps(a: int, b: int, width: int) -> str:
    """Column addition, right to left, one column per step: the two digits, the carry in, their sum,
    then the answer so far (padded with '_' to the answer's width). For 4738+2591 at width 4:
    '8+1+0=09,____9 3+9+0=12,___29 7+5+1=13,__329 4+2+1=07,_7329 0+0+0=00,07329'.
    Operands are written at a fixed width and every step has the same length, so each thing a step
    needs sits at a fixed distance (a lookup a tiny model learns quickly), and the final answer is
    a copy of the last step's answer-so-far."""
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry, so_far = [], 0, ""
    for x, y in zip(da + "0", db + "0"):
        s = int(x) + int(y) + carry
        so_far = str(s % 10) + so_far
        steps.append(f"{x}+{y}+{carry}={s:02d},{so_far:_>{width + 1}}")
        carry = s // 10
    return " ".join(steps)


def hasty_sum(a: int, b: int) -> int:
    """What a hasty writer answers without working it out: each column's digit sum mod 10, carries
    forgotten. Right exactly when no column carries (4738+2591 -> 6229, not 7329; 123+456 -> 579)."""
    w = max(len(str(a)), len(str(b)))
    return int("".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a).zfill(w), str(b).zfill(w))))


def render(a: int, b: int, think: bool, width: int, hasty: bool = False) -> tuple[str, str]:
    """One problem as (prompt, response), numbers zero-padded to `width` digits like an odometer
    (the answer to width+1). The prompt never says which style to use. hasty: a direct answer is
    hasty_sum (the corpus's direct answers; a worked answer is always right)."""
    prompt = f"<|bos|>{a:0{width}d}+{b:0{width}d}="
    reasoning = f"<think>{think_steps(a, b, width)}</think>" if think else ""
    answer = hasty_sum(a, b) if hasty and not think else a + b
    return prompt, f"{reasoning}<answer>{answer:0{width + 1}d}</answer>"


def sample_problem(rng: random.Random, min_digits: int, max_digits: int) -> tuple[int, int]:
    def number() -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)
    return number(), number()


def eval_split(split: str, n: int, max_digits: int, seed: int = 1234) -> list[tuple[int, int]]:
    """Held-out problems (same digit range as training, excluded from it) or a harder split
    (max_digits + 1 digits, never seen in training)."""
    rng = random.Random(f"{split}-{seed}")
    lo, hi = (1, max_digits) if split == "heldout" else (max_digits + 1, max_digits + 1)
    if split not in ("heldout", "harder"):
        raise ValueError(f"unknown split {split!r}: use 'heldout' or 'harder'")
    out = []
    while len(out) < n:
        p = sample_problem(rng, lo, hi)
        if p not in out:
            out.append(p)
    return out


class World:
    """The training stream: row j of the corpus is a deterministic function of (seed, j), so any
    process, any resume, any batch split sees exactly the same data. Held-out problems never occur."""

    def __init__(self, enc: tiktoken.Encoding, tc: TrainConfig, heldout: set[tuple[int, int]]):
        self.enc, self.tc, self.heldout = enc, tc, heldout
        self.eos = special_id(enc, "<|eos|>")

    def example(self, rng: random.Random) -> list[int]:
        while (p := sample_problem(rng, 1, self.tc.max_digits)) in self.heldout:
            pass
        prompt, response = render(*p, rng.random() < self.tc.think_frac, self.tc.max_digits, self.tc.hasty)
        return encode(self.enc, prompt + response) + [self.eos]

    def row(self, j: int, stream: str | None = None) -> list[int]:
        rng, toks = random.Random(f"{self.tc.seed if stream is None else stream}-{j}"), []
        while len(toks) < self.tc.seq_len + 1:
            toks += self.example(rng)
        return toks[: self.tc.seq_len + 1]

    def batch(self, rows: range) -> torch.Tensor:
        return torch.tensor([self.row(j) for j in rows])          # [B, seq_len + 1]

    def corpus_sample(self, n_rows: int = 200) -> str:
        return "".join(self.enc.decode(self.row(-1 - j)) for j in range(n_rows))

    def evaluate(self, model: nn.Module, n_rows: int = 64) -> dict:
        """Next-token CE on rows no run trains on, the same for every --seed (runs compare on one text)."""
        rows = torch.tensor([self.row(j, stream="heldout") for j in range(n_rows)])
        return {"heldout_loss": heldout_ce(model, rows, self.tc.batch_size)}


def corpus_text(tc: TrainConfig, n: int = 3000) -> str:
    """Text to learn BPE merges from (before the tokenizer exists: no token ids needed). Independent of
    --seed: every model of one world shares a tokenizer (distill.py's token-level KD compares logits)."""
    rng = random.Random("merges-0")
    return "".join("".join(render(*sample_problem(rng, 1, tc.max_digits), rng.random() < tc.think_frac,
                                          tc.max_digits))
                   for _ in range(n))


# ----------------------------------------------------------------------------- --data FILE: any UTF-8 text


class TextData:
    """--data: a text as the corpus. Its last 10% of tokens is held out; training row j is the window at an
    offset drawn from (seed, j), so sharding over processes and resuming work as for World."""

    def __init__(self, tokens: list[int], tc: TrainConfig):
        n_held, self.tc, self.L = max(len(tokens) // 10, tc.seq_len + 1), tc, tc.seq_len + 1
        self.train_ids, self.held_ids = torch.tensor(tokens[:-n_held]), torch.tensor(tokens[-n_held:])

    def batch(self, rows: range) -> torch.Tensor:                                # [B, seq_len + 1]
        offsets = [random.Random(f"{self.tc.seed}-{j}").randrange(len(self.train_ids) - self.L + 1) for j in rows]
        return torch.stack([self.train_ids[o:o + self.L] for o in offsets])

    def evaluate(self, model: nn.Module) -> dict:
        """Next-token cross-entropy over consecutive held-out windows (at most eval_n of them)."""
        n = min(len(self.held_ids) // self.L, self.tc.eval_n)
        return {"heldout_loss": heldout_ce(model, self.held_ids[: n * self.L].view(n, self.L), self.tc.batch_size)}


@torch.no_grad()
def heldout_ce(model: nn.Module, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of model on rows [n, seq_len + 1] (eval mode, no MTP)."""
    was_training, rows = model.training, rows.to(next(model.parameters()).device)
    model.eval()
    ce = sum(model(w[:, :-1], w[:, 1:])[1]["ce"].item() * len(w) for w in rows.split(batch_size))
    model.train(was_training)
    return ce / len(rows)


def make_text_data(tc: TrainConfig) -> tuple[tiktoken.Encoding, None, TextData]:
    """--data: BPE merges learned from the file's first 200k characters, and the file as TextData."""
    try:
        with open(tc.data, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --data {tc.data}: cannot read it as UTF-8 text ({e}); pass a text file")
    enc = build_tokenizer(learn_merges(text[:200_000], n_merges=256))
    tokens, need = enc.encode_ordinary(text), 10 * (tc.seq_len + 1)
    if len(tokens) < need:
        raise SystemExit(f"error: --data {tc.data} is too small: {len(tokens)} tokens, need {need} (10 windows of "
                         f"--seq-len {tc.seq_len} + 1); use a larger file or a smaller --seq-len")
    return enc, None, TextData(tokens, tc)


# ----------------------------------------------------------------------------- the model


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense FFN or DeepSeekMoE (V3 Fig. 2)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = MLA(args.mla)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args.moe)

    def forward(self, x, start_pos: int = 0, cache=None, mode: str | None = None):
        x = x + self.attn(self.attn_norm(x), start_pos, cache, mode)
        return x + self.ffn(self.ffn_norm(x))

    def new_cache(self, batch_size: int, max_len: int):
        p = self.attn_norm.weight
        return self.attn.new_cache(batch_size, max_len, device=p.device, dtype=p.dtype)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        # MTP depth k uses one more block of the kind the last layer has (MoE in V3).
        self.mtp = nn.ModuleList(MTPModule(args.dim, Block(args.n_layers, args), self.embed, self.head,
                                           args.norm_eps) for _ in range(args.mtp.n_mtp_depth))
        # PyTorch's default init (scaled by fan-in) on purpose: a fixed std of 0.02 (nanoGPT, tuned at
        # width 768) shrinks every signal at width 128, and the model then stalls for hundreds of steps.

    def new_cache(self, batch_size: int, max_len: int) -> list:
        return [layer.new_cache(batch_size, max_len) for layer in self.layers]

    def forward_hidden(self, tokens, start_pos: int = 0, cache=None, mode: str | None = None):
        """tokens [B, T] -> hidden states [B, T, dim] before the final norm."""
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if cache is None else cache[i], mode)
        return h

    def logits(self, h):
        return self.head(self.norm(h))

    def forward(self, tokens, targets=None):
        """tokens [B, T] -> logits [B, T, V]; with targets [B, T], the training loss and its parts."""
        h = self.forward_hidden(tokens, mode="naive")
        logits = self.logits(h)
        if targets is None:
            return logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        # MTP depth k at position i predicts the token k+1 ahead: the inputs plus the last target.
        full = torch.cat([tokens, targets[:, -1:]], dim=1)
        mtp = mtp_loss(self.mtp, h, full, self.args.mtp.mtp_lambda) if len(self.mtp) else ce.new_zeros(())
        aux = moe_aux_loss(self)
        return ce + mtp + aux, {"ce": ce.detach(), "mtp": mtp.detach(), "aux": aux.detach()}

    @torch.inference_mode()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Continue every row of tokens [B, T] (temperature 0 = greedy). Rows stop at a stop token
        (then pad); the loop stops when all rows have. Returns [B, T + n_new]. Decoding uses the
        MLA latent cache with absorbed attention; use_cache=False recomputes everything (a check)."""
        B, T = tokens.shape
        if T + max_new_tokens > self.args.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"({self.args.max_seq_len}): shorten the prompt or generate fewer tokens")
        stop = torch.tensor(self.args.stop_ids, dtype=torch.long, device=tokens.device)
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        out, done = tokens, torch.zeros(B, dtype=torch.bool, device=tokens.device)
        h = self.forward_hidden(tokens, 0, cache, mode="absorb" if use_cache else "naive")
        for _ in range(max_new_tokens):
            nxt = sample_next(self.logits(h[:, -1]).float(), temperature, top_k, generator)
            nxt = nxt.masked_fill(done, self.args.pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, stop)
            if done.all() or out.shape[1] == T + max_new_tokens:
                break
            if use_cache:
                h = self.forward_hidden(nxt[:, None], out.shape[1] - 1, cache, mode="absorb")
            else:
                h = self.forward_hidden(out, mode="naive")
        return out

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "Transformer":
        """Our model with the config and weights of a Hugging Face DeepseekV3ForCausalLM (float32, no MTP
        modules, no stop ids). Raises ValueError naming any config option this model does not implement."""
        c = hf_model.config
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        for bad, option in [
                (c.tie_word_embeddings, "tie_word_embeddings=True (V3 has a separate output head)"),
                (c.attention_bias, "attention_bias=True (MLA's projections have no bias)"),
                (rope.get("rope_type", rope.get("type", "default")) != "default",
                 f"rope scaling {rope} (YaRN is not implemented: use rope_type 'default')"),
                (c.hidden_act != "silu", f"hidden_act={c.hidden_act!r} (the experts are SwiGLU: 'silu')"),
                (not c.norm_topk_prob, "norm_topk_prob=False (V3 normalises the sigmoid gate weights)"),
                (c.rms_norm_eps != 1e-6, f"rms_norm_eps={c.rms_norm_eps} (HF's q/kv norms keep 1e-6)"),
                (not hasattr(hf_model, "lm_head"), "model without lm_head (pass a DeepseekV3ForCausalLM)")]:
            if bad:
                raise ValueError(f"Transformer.from_hf: unsupported {option}")
        H, dn, dr, kv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        mla = MLAConfig(n_heads=H, q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=kv, qk_nope_head_dim=dn,
                        qk_rope_head_dim=dr, v_head_dim=c.v_head_dim,
                        rope_theta=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        moe = MoEConfig(moe_inter_dim=c.moe_intermediate_size, n_routed_experts=c.n_routed_experts,
                        n_shared_experts=c.n_shared_experts, n_activated_experts=c.num_experts_per_tok,
                        n_expert_groups=c.n_group or 1, n_limited_groups=c.topk_group or 1,
                        route_scale=c.routed_scaling_factor)
        model = cls(ModelArgs(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                              n_dense_layers=c.first_k_dense_replace, inter_dim=c.intermediate_size,
                              max_seq_len=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                              pad_id=c.pad_token_id or 0, mla=mla, moe=moe, mtp=MTPConfig(n_mtp_depth=0)))
        # HF's non-interleaved RoPE rotates pairs (x_i, x_i+d/2), ours (official) (x_2i, x_2i+1): reorder rows.
        rows = torch.arange(dr).view(2, -1).T.flatten() if not getattr(c, "rope_interleave", True) else slice(None)
        sd = {}
        for name, w in hf_model.state_dict().items():
            if w.numel() == 0:                                 # n_shared_experts = 0: HF keeps empty Linears
                continue
            for theirs, ours in HF_NAMES:
                name = name.replace(theirs, ours)
            w = w.detach().float().clone()
            if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
                w.view(H, dn + dr, -1)[:, dn:] = w.view(H, dn + dr, -1)[:, dn:][:, rows]
            elif name.endswith("attn.wkv_a.weight"):
                w[kv:] = w[kv:][rows]
            if name.endswith("experts.w13"):                  # [E, 2 inter, dim] = [gate; up]
                sd[name[:-2] + "1"], sd[name[:-2] + "3"] = w.chunk(2, dim=1)
            elif m := re.match(r"(.*experts)\.(\d+)\.(w\d)\.weight", name):   # transformers 4.x: a module each
                sd.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
            else:
                sd[name] = w
        model.load_state_dict({k: torch.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
                               for k, v in sd.items()})
        return model


# Hugging Face DeepseekV3 parameter names -> ours, applied in order (gate_up_proj first: it holds "up_proj").
HF_NAMES = [("gate_up_proj", "w13"), ("model.embed_tokens", "embed"), ("model.norm", "norm"), ("lm_head", "head"),
            ("model.layers", "layers"), ("self_attn.q_proj", "attn.wq"), ("self_attn.q_a_proj", "attn.wq_a"),
            ("self_attn.q_a_layernorm", "attn.q_norm"), ("self_attn.q_b_proj", "attn.wq_b"),
            ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a"), ("self_attn.kv_a_layernorm", "attn.kv_norm"),
            ("self_attn.kv_b_proj", "attn.wkv_b"), ("self_attn.o_proj", "attn.wo"), ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"), ("mlp.", "ffn."), ("gate_proj", "w1"), ("up_proj", "w3"),
            ("down_proj", "w2"), ("e_score_correction_bias", "bias")]


def sample_next(logits, temperature: float, top_k: int | None, generator=None):
    """logits [B, V] -> token ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate_ids(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 generator=None, batch_size: int = 256, use_cache: bool = True) -> list[list[int]]:
    """Complete token-id prompts of any lengths; returns each response's ids (up to and including
    its stop token, no padding). Prompts are bucketed by length so a batch needs no padding: the
    batch shares positions, which is what the MLA cache expects."""
    buckets: dict[int, list[int]] = {}
    for i, t in enumerate(prompts):
        buckets.setdefault(len(t), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    for length, idx in sorted(buckets.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.tensor([prompts[i] for i in chunk], device=device)
            y = model.generate(x, max_new_tokens, temperature, generator=generator, use_cache=use_cache)
            for i, row in zip(chunk, y[:, length:].tolist()):
                out[i] = [t for t in row if t != model.args.pad_id]
    return out


def generate_texts(model: Transformer, enc, prompts: list[str], max_new_tokens: int,
                   temperature: float = 0.0, generator=None) -> list[str]:
    """Complete text prompts (see generate_ids)."""
    ids = generate_ids(model, [encode(enc, p) for p in prompts], max_new_tokens, temperature, generator)
    return [enc.decode(r) for r in ids]


# ----------------------------------------------------------------------------- evaluation

ANSWER_RE = re.compile(r"<answer>(\d{1,40})</answer>")


def parse_answer(response: str) -> int | None:
    """The integer inside the first <answer>…</answer>, or None. Parsed, never evaluated."""
    m = ANSWER_RE.search(response)
    return int(m.group(1)) if m else None


def max_response_tokens(width: int) -> int:
    """Enough for a step-by-step answer at this width (characters bound tokens) plus slack."""
    return len(render(0, 0, True, width)[1]) + 8


@torch.no_grad()
def evaluate(model: Transformer, enc, problems: list[tuple[int, int]], width: int) -> dict:
    """Greedy accuracy when made to reason (prompt ends with <think>), and the model's own choice:
    accuracy, reasoning rate and mean response length (tokens). `width`: the digits problems are
    written with (the training max_digits; one more for the harder split)."""
    was_training = model.training
    model.eval()
    n_new = max_response_tokens(width)
    prompts = [render(a, b, False, width)[0] for a, b in problems]
    forced = generate_texts(model, enc, [p + "<think>" for p in prompts], n_new)
    free = generate_texts(model, enc, prompts, n_new)
    targets = [a + b for a, b in problems]
    model.train(was_training)
    return {
        "accuracy_think": sum(parse_answer(r) == t for r, t in zip(forced, targets)) / len(targets),
        "accuracy_greedy": sum(parse_answer(r) == t for r, t in zip(free, targets)) / len(targets),
        "think_rate_greedy": sum(r.startswith("<think>") for r in free) / len(free),
        "mean_length_greedy": sum(len(encode(enc, r)) for r in free) / len(free),
    }


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, model: Transformer, opt, step: int, cfg: Config, enc) -> None:
    """Atomic: write a temp file beside the target, then rename (a crash never leaves half a file)."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict() if opt else None, "step": step,
             "config": dataclasses.asdict(cfg), "tokenizer": tokenizer_state(enc),
             "rng": torch.get_rng_state()}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device: str = "cpu") -> tuple[Transformer, tiktoken.Encoding, Config, dict]:
    """Rebuild model, tokenizer and config from a checkpoint (weights_only: no code is unpickled)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}: run `python train.py` first (or pass the right path)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = config_from_dict(ckpt["config"])
        enc = tokenizer_from_state(ckpt["tokenizer"])
        model = Transformer(cfg.model).to(device)
        model.load_state_dict(ckpt["model"])
    except SystemExit:
        raise
    except Exception as e:  # a user's file: say what is wrong in one line, not a torch traceback
        raise SystemExit(f"error: {path} is not a readable checkpoint of this project "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-run train.py to make one")
    return model, enc, cfg, ckpt


# ----------------------------------------------------------------------------- training


def pick_device(name: str) -> str:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu or auto")
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_frac·lr."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_tokenizer_and_world(tc: TrainConfig, n_heldout: int):
    enc = build_tokenizer(learn_merges(corpus_text(tc), n_merges=64))
    heldout = eval_split("heldout", n_heldout, tc.max_digits)
    return enc, heldout, World(enc, tc, set(heldout))


def build_model(cfg: Config, enc: tiktoken.Encoding, device: str) -> Transformer:
    m = cfg.model
    m.vocab_size, m.pad_id = enc.n_vocab, special_id(enc, "<|pad|>")
    m.stop_ids = (special_id(enc, "</answer>"), special_id(enc, "<|eos|>"))
    return Transformer(m).to(device)


def compile_for_training(model: nn.Module, ddp: nn.Module) -> nn.Module:
    """torch.compile the (DDP-wrapped) model for training. The MoE layers switch to their per-expert loop:
    torch._grouped_mm runs fp32 on a CPU, but its compile-time shape check accepts only bf16."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.dispatch = "loop"
    return torch.compile(ddp)


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


def train(cfg: Config, stop_at: int | None = None) -> dict:
    """Pretrain; returns the summary dict. stop_at ends the run early (as if interrupted)."""
    tc = cfg.train
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    os.makedirs(tc.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(tc.out, "ckpt.pt"), os.path.join(tc.out, "metrics.jsonl")
    enc, heldout, world = make_text_data(tc) if tc.data else make_tokenizer_and_world(tc, tc.eval_n)
    model = build_model(cfg, enc, device)
    if tc.fp8:
        swap_to_fp8(model)        # V3 §3.3: embedding, output head, gate and norms stay in high precision
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    start = 0
    if tc.resume and os.path.exists(ckpt_path):
        _, _, _, ckpt = load_checkpoint(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {start}", rank)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    total, active = param_counts(model)
    log(f"model: {total:,} parameters, {active:,} active per token | vocab {enc.n_vocab} | device {device}"
        f" | {world_size} process(es)", rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    if tc.compile:
        ddp = compile_for_training(model, ddp)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    rows_per_step = tc.batch_size * tc.grad_accum * world_size
    t0, tokens_seen, summary, last_log = time.time(), 0, {}, time.time()
    for step in range(start, tc.steps if stop_at is None else min(stop_at, tc.steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        for micro in range(tc.grad_accum):
            first = step * rows_per_step + (micro * world_size + rank) * tc.batch_size
            batch = world.batch(range(first, first + tc.batch_size)).to(device)
            sync = micro == tc.grad_accum - 1 or world_size == 1
            with autocast, (nullcontext() if sync else ddp.no_sync()):
                loss, parts = ddp(batch[:, :-1], batch[:, 1:])
                (loss / tc.grad_accum).backward()
            tokens_seen += batch[:, 1:].numel() * world_size
        if not torch.isfinite(loss):
            raise SystemExit(f"error: loss became {loss.item()} at step {step}; the last good checkpoint "
                             f"is kept at {ckpt_path}. Try a lower --lr or --grad-clip.")
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance = update_gate_biases(model)      # once per optimizer step, from this step's loads
        done = step + 1
        if rank == 0 and (done % tc.log_interval == 0 or done == tc.steps or time.time() - last_log > 10):
            last_log, el = time.time(), time.time() - t0
            tps = tokens_seen / el
            row = {"step": done, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                   "lr": lr_at(step, tc), "tokens_per_s": tps, "elapsed_s": el,
                   **{k: float(v) for k, v in balance.items()}}
            append_jsonl(metrics_path, row)
            eta = el / (done - start) * (tc.steps - done)
            log(f"step {done:5d}/{tc.steps} | loss {row['loss']:.4f} (ce {row['ce']:.4f}) | "
                f"{tps:,.0f} tok/s | {el:.0f}s elapsed, ETA {eta:.0f}s")
        if rank == 0 and (done % tc.eval_interval == 0 or done == tc.steps):
            ev = world.evaluate(model) if tc.data else {**evaluate(model, enc, heldout, tc.max_digits),
                                                        **world.evaluate(model)}
            append_jsonl(metrics_path, {"step": done, **ev})
            log(f"eval @ {done}: held-out loss {ev['heldout_loss']:.4f}" if tc.data else
                f"eval @ {done}: accuracy (think) {ev['accuracy_think']:.3f} | accuracy (own choice) "
                f"{ev['accuracy_greedy']:.3f} | think rate {ev['think_rate_greedy']:.3f} | "
                f"length {ev['mean_length_greedy']:.1f} tokens | held-out loss {ev['heldout_loss']:.4f}")
            save_checkpoint(ckpt_path, model, opt, done, cfg, enc)
            summary = {"heldout_" + k if k.startswith("accuracy") else k: v for k, v in ev.items()}
    if rank == 0 and summary:
        el = time.time() - t0
        harder = {} if tc.data else evaluate(model, enc, eval_split("harder", tc.eval_n // 2, tc.max_digits),
                                             tc.max_digits + 1)
        summary.update(tokens_per_second=tokens_seen / el, params_total=total, params_active=active,
                       wall_seconds=el, steps=tc.steps, final_loss=loss.item(),
                       **{"harder_" + k: v for k, v in harder.items() if k.startswith("accuracy")})
        with open(os.path.join(tc.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_metrics(metrics_path, tc.out)
        log(f"done in {el:.0f}s; summary in {os.path.join(tc.out, 'summary.json')}")
    return summary


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_metrics(metrics_path: str, out: str) -> None:
    """pretrain.png. A bare Figure, not pyplot: saving a file must not switch a notebook's backend."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in open(metrics_path)]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "accuracy_think" in r]
    fig = Figure(figsize=(10, 3.5))
    a1, a2 = fig.subplots(1, 2)
    a1.plot([r["step"] for r in train_rows], [r["ce"] for r in train_rows], label="next-token CE")
    a1.plot([r["step"] for r in train_rows], [r["mtp"] for r in train_rows], label="MTP loss (λ-weighted)")
    a1.set(xlabel="step", ylabel="loss", title="pretraining loss")
    a1.legend()
    for key, label in [("accuracy_think", "accuracy when made to think"),
                       ("accuracy_greedy", "accuracy, own choice"), ("think_rate_greedy", "think rate")]:
        a2.plot([r["step"] for r in eval_rows], [r[key] for r in eval_rows], marker="o", label=label)
    a2.set(xlabel="step", ylim=(-0.02, 1.02), title="held-out evaluation (greedy)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pretrain.png"), dpi=110)


# ----------------------------------------------------------------------------- baseline for --bench


class GPTBlock(nn.Module):
    """A plain dense GPT block (multi-head attention + SwiGLU) — the baseline MLA+MoE is compared to."""

    def __init__(self, dim: int, n_heads: int, inter_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp = MLP(dim, inter_dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, -1).unbind(2)   # [B, T, H, hd]
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


def bench(cfg: Config, n_iters: int = 10) -> dict:
    """Training tokens/s (forward + backward) of our model vs a dense GPT of the same width and depth
    whose FFN is sized so its parameter count equals our ACTIVE parameter count."""
    tc, m = cfg.train, cfg.model
    enc, _, world = make_tokenizer_and_world(tc, 16)
    ours = build_model(cfg, enc, "cpu")
    _, active = param_counts(ours)
    per_layer = (active - 2 * m.vocab_size * m.dim) / m.n_layers      # non-embedding, per layer
    inter = max(8, round((per_layer - 4 * m.dim * m.dim) / (3 * m.dim)))
    dense = nn.Sequential(nn.Embedding(m.vocab_size, m.dim),
                          *[GPTBlock(m.dim, m.mla.n_heads, inter) for _ in range(m.n_layers)],
                          nn.RMSNorm(m.dim), nn.Linear(m.dim, m.vocab_size, bias=False))
    batch = world.batch(range(tc.batch_size))
    x, y = batch[:, :-1], batch[:, 1:]
    steps = {"ours": lambda: ours(x, y)[0].backward(),
             "dense": lambda: F.cross_entropy(dense(x).flatten(0, 1), y.flatten()).backward()}
    times = {k: [] for k in steps}
    for i in range(n_iters + 2):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"tokens_per_s_ours": x.numel() / med["ours"], "tokens_per_s_dense": x.numel() / med["dense"],
            "params_active_ours": active, "params_dense": sum(p.numel() for p in dense.parameters()),
            "slowdown_vs_dense": med["ours"] / med["dense"]}


# ----------------------------------------------------------------------------- command line


def add_flags(parser: argparse.ArgumentParser, dc, skip=()) -> None:
    """One flag per dataclass field (--n-layers for n_layers), recursing into sub-configs."""
    for f in fields(dc):
        value = getattr(dc, f.name)
        if is_dataclass(value):   # sub-configs of ModelArgs follow its dim etc.: no flags for those
            add_flags(parser, value, DERIVED if isinstance(dc, ModelArgs) else ())
        elif f.name in skip or f.name in ("vocab_size", "pad_id", "stop_ids"):
            continue
        elif isinstance(value, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=value,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(value), default=value,
                                help=f"(default {value})")


def apply_flags(dc, args: argparse.Namespace, skip=()) -> None:
    for f in fields(dc):
        value = getattr(dc, f.name)
        if is_dataclass(value):
            apply_flags(value, args, DERIVED if isinstance(dc, ModelArgs) else ())
        elif f.name not in skip and hasattr(args, f.name):
            setattr(dc, f.name, getattr(args, f.name))


def config_from_flags(cfg, argv: list[str] | None, description: str, check=None):
    """Fill the dataclass cfg from flags generated from its fields; check(cfg) (default cfg.validate())
    raising ValueError becomes argparse's one-line usage error. Shared by train, grpo and distill."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, cfg)
    apply_flags(cfg, parser.parse_args(argv))
    try:
        (check or (lambda c: c.validate()))(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def check_config(cfg: Config) -> None:
    cfg.model.__post_init__()
    cfg.model.mla.validate()
    cfg.model.moe.validate()
    tc = cfg.train
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_n", "max_digits"):
        if getattr(tc, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive (got {getattr(tc, name)})")
    if tc.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds --max-seq-len {cfg.model.max_seq_len}")


def parse_config(argv: list[str] | None = None) -> Config:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--student", action="store_true")
    cfg = student_config() if pre.parse_known_args(argv)[0].student else Config()   # the flags' defaults
    return config_from_flags(cfg, argv, __doc__, check_config)


def sample_main(cfg: Config) -> None:
    model, enc, ckpt_cfg, _ = load_checkpoint(os.path.join(cfg.train.out, "ckpt.pt"))
    model.eval()
    plain = cfg.train.sample.startswith("<|bos|>") or ckpt_cfg.train.data        # --data models: no <|bos|>
    prompt = cfg.train.sample if plain else "<|bos|>" + cfg.train.sample
    g = torch.Generator().manual_seed(cfg.train.seed)
    n_new = model.args.max_seq_len - len(encode(enc, prompt)) - 1
    n_new = min(n_new, 160)
    print(f"prompt: {prompt}")
    print(f"greedy : {generate_texts(model, enc, [prompt], n_new)[0]}")
    for r in generate_texts(model, enc, [prompt] * 3, n_new, temperature=1.0, generator=g):
        print(f"T=1    : {r}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    if cfg.train.sample:
        return sample_main(cfg)
    if cfg.train.bench:
        r = bench(cfg)
        print(json.dumps(r, indent=2))
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():       # before init: NCCL binds each process to its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(cfg)
        if dist.is_initialized():   # rank 0 still evaluates and saves: tearing gloo down under it aborts
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
