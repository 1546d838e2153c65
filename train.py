"""The miniature DeepSeek-V3: the assembled model, its world and tokenizer, and pretraining.

This is the wiring file. It assembles the concept files into DeepSeek-V3's architecture (V3 §2):

    Block       = x + MLA(RMSNorm(x)); x + FFN(RMSNorm(x)), FFN dense for the first
                  n_dense_layers (V3 keeps 3 dense) and DeepSeekMoE after
    Transformer = embed -> blocks -> RMSNorm -> head, plus D MTP modules sharing embed and head
    loss        = CE(next token) + L_MTP (λ/D Σ CE_k) + sequence-wise balance loss;
                  MoE gate biases updated once per optimizer step (auxiliary-loss-free balancing)

The data is addition under R1-Zero's think-first template, where reasoning is verifiable and pays:
writers draft a hasty answer (carries forgotten), work columns from the right and mostly stop early
(a few check, some switch notation); textbook examples work every column. So the base model *can*
work it all but stops at its draft: RL (grpo.py) must find that working on pays.

The file, in reading order (sections fenced with `# ---- name`):
    config          ModelArgs, TrainConfig, Config; tiny_config and student_config
    the model       Block, Transformer (forward, decode_step, generate), sample_next
    tokenizer       byte-level BPE learned from the world, digits always single tokens
    the world       the addition problems, their renderings, World (the training stream)
    --data FILE     TextData: any UTF-8 text instead of the world
    evaluation      generate_ids/texts, the one answer judge (parse_answer), evaluate
    checkpoints     atomic save, weights_only load
    training        setup, train_step, evaluate_and_save, train
    benchmark       interleaved_median, a dense GPT, matmul roof and FLOPs, bench
    interop         Transformer.from_hf / to_hf, export_hf (Hugging Face DeepseekV3 + tokenizer)
    command line    flags generated from the config dataclasses

    python train.py                      # pretrain (minutes on a laptop CPU), writes out/pretrain/
    python train.py --sample "123+456="  # complete prompts with the checkpoint
    python train.py --bench              # speed vs transformers, a dense GPT, the machine
    python train.py --student            # distill.py's smaller dense student (no MoE, no MTP)
    python train.py --tiny               # a model of a few thousand parameters (tests, notebooks)
    python train.py --export-hf DIR      # a folder transformers' from_pretrained loads
    python train.py --fp8 | --compile | --data FILE  # FP8 Linears (V3 §3.3), compile, text
    torchrun --standalone --nproc_per_node=2 train.py # DDP (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, is_dataclass

import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fp8 import swap_to_fp8
from mla import MLA, MLACache, MLAConfig
from moe import MLP, MoE, MoEConfig, moe_aux_loss, param_counts, update_gate_biases
from mtp import MTPConfig, MTPModule, mtp_loss

# ---- config


def default_moe() -> MoEConfig:
    """The miniature's DeepSeekMoE: 8 routed experts of width 96, 2 active, plus 1 shared."""
    return MoEConfig(moe_inter_dim=96, n_routed_experts=8, n_activated_experts=2)


@dataclass
class ModelArgs:
    vocab_size: int = 0           # set from the tokenizer
    dim: int = 128                # model width (every component follows it)
    n_layers: int = 4             # transformer blocks
    n_dense_layers: int = 1       # the first layers use a dense FFN (V3: 3 of 61)
    inter_dim: int = 384          # dense FFN hidden size
    max_seq_len: int = 512        # longest sequence the RoPE tables and caches hold
    norm_eps: float = 1e-6        # RMSNorm epsilon
    pad_id: int = 0               # set from the tokenizer
    stop_ids: tuple = ()          # generation stops at these; set from the tokenizer
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=default_moe)
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def __post_init__(self):
        # one width for every component: the sub-configs follow `dim`
        self.mla.dim = self.dim
        self.moe.dim = self.dim
        self.mla.max_seq_len = self.max_seq_len
        self.mla.norm_eps = self.norm_eps
        self.stop_ids = tuple(self.stop_ids)


@dataclass
class TrainConfig:
    steps: int = 600              # optimizer steps
    batch_size: int = 16          # sequences per micro-batch per process
    grad_accum: int = 1           # micro-batches per optimizer step
    seq_len: int = 256            # tokens per training row
    lr: float = 3e-3              # peak AdamW learning rate
    min_lr_frac: float = 0.1      # the cosine decays to this share of lr
    warmup: int = 25              # linear warm-up steps
    weight_decay: float = 0.1     # AdamW weight decay
    grad_clip: float = 1.0        # gradient-norm clip
    max_digits: int = 6           # operands have 1..max_digits digits (written at this width)
    world: str = "zero"           # zero: think first, thoroughness varies (R1-Zero) | choice
    work_frac: float = 0.4        # zero world: writers' mean chance to work one more column
    verify_frac: float = 0.04     # zero world: share of hasty solutions that re-check
    word_frac: float = 0.3        # zero world: share of solutions written in words
    switch_frac: float = 0.15     # zero world: share that switch notation midway
    textbook_frac: float = 0.5    # zero world: share of examples worked in full by a textbook
    think_frac: float = 0.35      # choice world: share of step-by-step answers in the corpus
    hasty: bool = True            # choice world: direct answers forget carries (hasty_sum)
    eval_interval: int = 300      # evaluate and save a checkpoint every this many steps
    eval_n: int = 200             # held-out problems per evaluation
    log_interval: int = 25        # a log line every this many steps (and at least every 10 s)
    device: str = "auto"          # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    threads: int = 0              # CPU threads (0: torch's default)
    seed: int = 0                 # seeds the weights and the training stream
    out: str = "out/pretrain"     # output folder: ckpt.pt, metrics.jsonl, summary.json, a plot
    resume: bool = False          # continue from <out>/ckpt.pt
    overwrite: bool = False       # a fresh run replaces an earlier run's files in --out
    sample: str = ""              # complete this prompt with <out>/ckpt.pt and exit
    bench: bool = False           # print speed vs transformers, a dense GPT and the roof; exit
    export_hf: str = ""           # write a Hugging Face folder to this path from --ckpt and exit
    ckpt: str = ""                # read by --export-hf ('': <out>/ckpt.pt); --bench: its rollouts
    fp8: bool = False             # Linears in block-scaled FP8 (V3 §3.3)
    compile: bool = False         # torch.compile the training step (slow to compile on a CPU)
    data: str = ""                # a UTF-8 text file to pretrain on instead of the world
    student: bool = False         # distill.py's small dense student (student_config)
    tiny: bool = False            # a model of a few thousand parameters (tiny_config)


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainConfig = field(default_factory=TrainConfig)


def tiny_config(width: int = 32, student: bool = False, **train_fields) -> Config:
    """A miniature of the miniature on 2-digit sums, trained in seconds on a CPU: what the tests,
    the notebooks' small mode and `--tiny` use. Every component (MLA, dense FFN, MoE, MTP) is
    present; width 32 has 2 layers, width 64 (notebooks' tiny teacher) 3. student: every layer
    dense, no MoE and no MTP (a tiny distill.py student). train_fields override TrainConfig."""
    mla = MLAConfig(n_heads=width // 16, kv_lora_rank=width // 2, qk_nope_head_dim=width // 4,
                    qk_rope_head_dim=width // 8, v_head_dim=width // 4)
    n_layers = 3 if width >= 64 else 2
    model = ModelArgs(dim=width, n_layers=n_layers, inter_dim=2 * width, max_seq_len=128, mla=mla,
                      moe=MoEConfig(moe_inter_dim=width // 2, n_routed_experts=4,
                                    n_activated_experts=2))
    if student:
        model = dataclasses.replace(model, n_dense_layers=n_layers, inter_dim=3 * width,
                                    mtp=MTPConfig(n_mtp_depth=0))
    tc = TrainConfig(seq_len=128, batch_size=4, max_digits=2, eval_n=32, student=student,
                     tiny=True)
    return Config(model=model, train=dataclasses.replace(tc, **train_fields))


def student_config(cfg: Config | None = None) -> Config:
    """distill.py's student (R1 §2.4: small DENSE models): cfg's world and tokenizer, 3/4 of the
    width and depth, no MoE, no MTP: 0.41M parameters vs 1.9M (1.0M active)."""
    mla = MLAConfig(n_heads=4, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=8,
                    v_head_dim=24)
    model = ModelArgs(dim=96, n_layers=3, n_dense_layers=3, inter_dim=288, mla=mla,
                      mtp=MTPConfig(n_mtp_depth=0))
    tc = dataclasses.replace((cfg or Config()).train, student=True)
    return Config(model=model, train=tc)


# ---- the model


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense FFN or DeepSeekMoE (V3 Fig. 2)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = MLA(args.mla)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim)
        else:
            self.ffn = MoE(args.moe)

    def forward(self, x, start_pos: int = 0, cache=None, mode: str | None = None):
        x = x + self.attn(self.attn_norm(x), start_pos, cache, mode)
        return x + self.ffn(self.ffn_norm(x))

    def new_cache(self, batch_size: int, max_len: int):
        p = self.attn_norm.weight
        return self.attn.new_cache(batch_size, max_len, device=p.device, dtype=p.dtype)


class Transformer(nn.Module):
    """DeepSeek-V3 in miniature: embed -> blocks -> norm -> head, with D MTP modules beside."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        # MTP depth k uses one more block of the kind the last layer has (MoE in V3).
        mtp = [MTPModule(args.dim, Block(args.n_layers, args), self.embed, self.head, args.norm_eps)
               for _ in range(args.mtp.n_mtp_depth)]
        self.mtp = nn.ModuleList(mtp)
        # set by compile_decode(); generate() then uses it instead of decode_step
        self.compiled_decode = None
        # PyTorch's default init (scaled by fan-in) on purpose: a fixed std of 0.02 (nanoGPT, tuned
        # at width 768) shrinks every signal at width 128, and the model then stalls for hundreds
        # of steps.

    def new_cache(self, batch_size: int, max_len: int) -> list:
        return [layer.new_cache(batch_size, max_len) for layer in self.layers]

    @torch.no_grad()
    def decode_step(self, tokens, start_pos: int, cache: list):
        """One cached step of generation: tokens [B, T] at positions start_pos.. against the
        latent cache (absorbed attention) -> the last position's logits [B, V], float32."""
        h = self.forward_hidden(tokens, start_pos, cache, mode="absorb")
        return self.logits(h[:, -1]).float()

    def compile_decode(self) -> bool:
        """Make generate() use a torch.compile'd decode_step: at batch 1 most of a step's time is
        Python and per-op overhead, which compiling fuses away. One compilation (dynamic shapes)
        serves every position and batch; it takes ~10-20 s on a CPU, so it pays in long runs,
        not in tests. Falls back to eager (returns False, says why) if compiling fails."""
        compiled = torch.compile(self.decode_step, dynamic=True)
        try:
            # warm up as generate() calls it (inference mode, its tensors), at batch 2 and
            # position 2: torch specialises sizes 0 and 1, and would compile again for others
            with torch.inference_mode():
                tokens = torch.zeros(2, 1, dtype=torch.long, device=self.head.weight.device)
                compiled(tokens, 2, self.new_cache(2, 5))
        except Exception as e:
            # no C++ compiler, an op inductor cannot lower, ...: generation still works, eagerly
            note(f"compile_decode: torch.compile failed ({type(e).__name__}: {e}); decoding "
                 f"eagerly")
            return False
        self.compiled_decode = compiled
        return True

    def forward_hidden(self, tokens, start_pos: int = 0, cache=None, mode: str | None = None):
        """tokens [B, T] -> hidden states [B, T, dim] before the final norm."""
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if cache is None else cache[i], mode)
        return h

    def logits(self, h):
        return self.head(self.norm(h))

    def forward(self, tokens, targets=None):
        """tokens [B, T] -> logits [B, T, V]; with targets [B, T], the training loss and parts."""
        h = self.forward_hidden(tokens, mode="naive")
        logits = self.logits(h)
        if targets is None:
            return logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        # MTP depth k at position i predicts the token k+1 ahead: the inputs plus the last target.
        full = torch.cat([tokens, targets[:, -1:]], dim=1)
        if len(self.mtp):
            mtp = mtp_loss(self.mtp, h, full, self.args.mtp.mtp_lambda)
        else:
            mtp = ce.new_zeros(())
        aux = moe_aux_loss(self)
        return ce + mtp + aux, {"ce": ce.detach(), "mtp": mtp.detach(), "aux": aux.detach()}

    @torch.inference_mode()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True):
        """Continue every row of tokens [B, T] (temperature 0 = greedy). Rows stop at a stop token
        (then pad); the loop stops when all rows have. Returns [B, T + n_new]. Decoding uses the
        MLA latent cache with absorbed attention; use_cache=False recomputes everything."""
        B, T = tokens.shape
        if T + max_new_tokens > self.args.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len ({self.args.max_seq_len}): shorten the prompt or "
                             f"generate fewer")
        if max_new_tokens <= 0:
            return tokens
        stop = torch.tensor(self.args.stop_ids, dtype=torch.long, device=tokens.device)
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        out = tokens.new_full((B, T + max_new_tokens), self.args.pad_id)
        out[:, :T] = tokens
        # the rows of `out` still in the batch being decoded (and in the cache), and which of
        # them have finished
        live = torch.arange(B, device=tokens.device)
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        step = self.compiled_decode or self.decode_step
        # 1. prefill: the whole prompt at once (fills the latent cache)
        if use_cache:
            logits = self.decode_step(tokens, 0, cache)
        for n in range(T, T + max_new_tokens):
            # 2. sample the next token of every row (without a cache, from everything so far
            # again); finished rows get padding
            if not use_cache:
                h = self.forward_hidden(out[live, :n], mode="naive")
                logits = self.logits(h[:, -1]).float()
            nxt = sample_next(logits, temperature, top_k, generator)
            nxt = nxt.masked_fill(done, self.args.pad_id)
            out[live, n] = nxt
            done |= torch.isin(nxt, stop)
            if done.all() or n + 1 == T + max_new_tokens:
                break
            # 3. once a quarter of the batch has finished, drop those rows and their cache: each
            # would cost a full row per step to generate padding (rollouts' lengths vary a lot).
            # At least 2 rows stay: a compiled decode step would compile again for batch 1.
            n_done = int(done.sum())
            if 4 * n_done >= len(live) and len(live) - n_done >= 2:
                keep = ~done
                live, nxt, done = live[keep], nxt[keep], done[keep]
                if use_cache:
                    cache = [MLACache(c.c_kv[keep], c.k_pe[keep]) for c in cache]
            # 4. decode one position: the new token against the cache
            if use_cache:
                logits = step(nxt[:, None], n, cache)
        return out[:, :n + 1]


def sample_next(logits, temperature: float, top_k: int | None, generator=None):
    """logits [B, V] -> token ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Inverse-CDF sampling: one uniform u per row in (0, total], the first token whose cumulative
    # probability reaches u. The same distribution as torch.multinomial, ~15x faster on a CPU
    # (which draws an exponential per token); a token of probability 0 is never picked.
    cdf = logits.softmax(-1).cumsum(-1)                                      # [B, V]
    u = 1 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    return (cdf < u * cdf[:, -1:]).sum(-1)


# ---- tokenizer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<think>", "</think>", "<answer>", "</answer>"]
# Digits are always single tokens: they never share a pre-token chunk, so no merge can join them.
PAT_STR = r""" ?[^\s\d]+|\d|\s+(?!\S)|\s+"""


def learn_merges(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE: from the 256 bytes, repeatedly merge the most frequent adjacent pair."""
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
        words = Counter({merge_pair(w, a, b): c for w, c in words.items()})
    return ranks


def merge_pair(w: tuple, a: bytes, b: bytes) -> tuple:
    """w with every adjacent (a, b) replaced by a + b, left to right."""
    out = []
    i = 0
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
    """What a checkpoint stores to rebuild the tokenizer (plain types: weights_only-safe)."""
    return {"ranks": [[k.hex(), v] for k, v in enc._mergeable_ranks.items()]}


def tokenizer_from_state(state: dict) -> tiktoken.Encoding:
    return build_tokenizer({bytes.fromhex(k): v for k, v in state["ranks"]})


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def special_id(enc: tiktoken.Encoding, name: str) -> int:
    return enc.encode_single_token(name)


# ---- the world


def think_steps(a: int, b: int, width: int) -> str:
    """Column addition, right to left, one column per step: the two digits, the carry in, their
    sum, then the answer so far (padded with '_' to the answer's width). For 4738+2591 at width 4:
    '8+1+0=09,____9 3+9+0=12,___29 7+5+1=13,__329 4+2+1=07,_7329 0+0+0=00,07329'.
    Operands are written at a fixed width and every step has the same length, so each thing a step
    needs sits at a fixed distance (a lookup a tiny model learns quickly), and the final answer is
    a copy of the last step's answer-so-far. The choice world's reasoning."""
    da = str(a).zfill(width)[::-1]
    db = str(b).zfill(width)[::-1]
    steps = []
    carry = 0
    so_far = ""
    for x, y in zip(da + "0", db + "0"):
        s = int(x) + int(y) + carry
        so_far = str(s % 10) + so_far
        steps.append(f"{x}+{y}+{carry}={s:02d},{so_far:_>{width + 1}}")
        carry = s // 10
    return " ".join(steps)


# A worked column in each notation ("language"): the digits, the carry in, their two-digit sum.
# Both are 11 tokens long (' +', ' =', ' plus', ' is' are merged tokens, digits single), so a step
# has the same length in either and only the notation differs.
NOTATIONS = {"sym": "{x} + {y} + {c} = {s:02d}", "word": "{x} plus {y} plus {c} is {s:02d}"}
STEP = re.compile(r"(?:(?P<sym>\d \+ \d \+ \d = \d\d)|(?P<word>\d plus \d plus \d is \d\d)),"
                  r"(?P<so_far>[\d:]+)")
CHECK = " check "
VERDICTS = (" ok", " wrong")
# Beta concentration of the writers' thoroughness: 1 spreads it over the whole range, with most
# mass near 0 when work_frac is small
THOROUGHNESS = 1.0
# In the answer so far, ':' separates the drafted digits (left) from the worked ones (right): the
# next column to work is the digit left of it, a cue beside the step, not counted from the start
MARK = ":"
# What heads a textbook's worked example in the corpus (see zero_example)
TEXTBOOK = "Worked example: "
# The prompt `a+b=` is written in symbols: R1's language-consistency reward (§2.3.2) scores the
# share of the reasoning in the question's language, so here the share of columns in "sym"
PROMPT_NOTATION = "sym"
# What ends a readable solution's reasoning (R1's cold start: <reasoning_process>, then a
# <summary>): the sum restated in the solution's notation
SUMMARIES = {"sym": " so {a} + {b} = {s}", "word": " so {a} plus {b} is {s}"}


def draft(a: int, b: int, width: int) -> str:
    """The hasty first guess of the zero world's solutions: hasty_sum, at the answer's width."""
    return f"{hasty_sum(a, b):0{width + 1}d}"


def column_steps(a: int, b: int, width: int, columns: range, notation: list[str], so_far: str
                 ) -> tuple[list[str], str]:
    """Work `columns` (right to left, each after all lower ones are worked): per column the two
    digits, the carry in, their sum in its notation, then the whole answer so far with that
    column's digit put right and MARK moved left of it: 'x + y + c = ss,DDDD:DDD'. Every step has
    the same length and the so-far copies the previous one but for one digit, so each thing a
    step needs sits at a fixed distance (a lookup a tiny model learns quickly). Returns (steps,
    the last answer so far, without the mark)."""
    da = str(a).zfill(width)[::-1] + "0"
    db = str(b).zfill(width)[::-1] + "0"
    n = width + 1
    lower = 10 ** columns.start
    carry = int(a % lower + b % lower >= lower)
    steps = []
    for i in columns:
        s = int(da[i]) + int(db[i]) + carry
        so_far = so_far[:n - 1 - i] + str(s % 10) + so_far[n - i:]
        work = NOTATIONS[notation[i]].format(x=da[i], y=db[i], c=carry, s=s)
        steps.append(f"{work},{so_far[:n - 1 - i]}{MARK}{so_far[n - 1 - i:]}")
        carry = s // 10
    return steps, so_far


def zero_solution(a: int, b: int, width: int, rng: random.Random, tc: TrainConfig
                  ) -> tuple[str, int]:
    """One solution of the R1-Zero world (what follows the template's <think>) and its answer.
    The writer guesses hastily (the draft: carries forgotten), then works columns from the right,
    correcting the draft, and stops when it feels sure: after each column it goes on with chance
    p, its thoroughness, p ~ Beta(mean tc.work_frac), mostly small. Stopping early leaves the
    higher columns as drafted: wrong if one of them carries or receives a carry. A share
    tc.word_frac writes in words, a share tc.switch_frac switches notation at a random column
    (code-switching); a share tc.verify_frac of the early stoppers check: ' check ', the
    remaining columns worked, then ' ok', or ' wrong' when the check changed the answer (the aha
    pattern). Example (4738+2591 at width 4, stopped after 2 columns, then checked):
    '06229 8 + 1 + 0 = 09,0622:9 3 + 9 + 0 = 12,062:29 check 7 + 5 + 1 = 13,06:329
    4 + 2 + 1 = 07,0:7329 0 + 0 + 0 = 00,:07329 wrong</think><answer>07329</answer>'."""
    n = width + 1
    p = rng.betavariate(tc.work_frac * THOROUGHNESS, (1 - tc.work_frac) * THOROUGHNESS)
    k = 0
    while k < n and rng.random() < p:
        k += 1
    first = "word" if rng.random() < tc.word_frac else "sym"
    other = "sym" if first == "word" else "word"
    switch_at = rng.randrange(1, n) if rng.random() < tc.switch_frac else n
    notation = [first if i < switch_at else other for i in range(n)]
    guess = draft(a, b, width)
    steps, so_far = column_steps(a, b, width, range(k), notation, guess)
    text = " ".join([guess] + steps)
    if k < n and rng.random() < tc.verify_frac:
        check, checked = column_steps(a, b, width, range(k, n), notation, so_far)
        text += CHECK + " ".join(check) + VERDICTS[checked != so_far]
        so_far = checked
    return f"{text}</think><answer>{so_far}</answer>", int(so_far)


def readable_solution(a: int, b: int, width: int, notation: str | None = None) -> str:
    """A readable solution (R1 §2.3.1's cold-start data, written by a rule, never by a model): the
    draft, every column worked in ONE notation, then a summary restating the sum in it. At width
    4: '06229 8 + 1 + 0 = 09,0622:9 ... 0 + 0 + 0 = 00,:07329 so 4738 + 2591 = 07329' then
    '</think><answer>07329</answer>'. No check: nothing is left as drafted. notation: None is
    PROMPT_NOTATION, read at call time."""
    notation = notation or PROMPT_NOTATION
    n = width + 1
    guess = draft(a, b, width)
    steps, so_far = column_steps(a, b, width, range(n), [notation] * n, guess)
    summary = SUMMARIES[notation].format(a=f"{a:0{width}d}", b=f"{b:0{width}d}", s=so_far)
    return f"{' '.join([guess] + steps)}{summary}</think><answer>{so_far}</answer>"


def hasty_sum(a: int, b: int) -> int:
    """What a hasty writer answers without working it out: each column's digit sum mod 10, carries
    forgotten. Right exactly when no column carries (4738+2591 -> 6229, not 7329)."""
    w = max(len(str(a)), len(str(b)))
    columns = zip(str(a).zfill(w), str(b).zfill(w))
    return int("".join(str((int(x) + int(y)) % 10) for x, y in columns))


def prompt_text(a: int, b: int, width: int, world: str = "zero") -> str:
    """The template: the task, numbers zero-padded to `width` digits like an odometer. The R1-Zero
    world's template opens the thinking (R1 Table 1 asks for reasoning in <think> first: a tiny
    model cannot read that instruction, so the template writes the tag); the choice world's
    prompt is the bare task and leaves the choice to the model."""
    return f"<|bos|>{a:0{width}d}+{b:0{width}d}=" + ("<think>" if world == "zero" else "")


def render(a: int, b: int, think: bool, width: int, hasty: bool = False) -> tuple[str, str]:
    """One problem of the choice world as (prompt, response), the answer zero-padded to width+1.
    The prompt never says which style to use. hasty: a direct answer is hasty_sum (the corpus's
    direct answers; a worked answer is always right)."""
    prompt = prompt_text(a, b, width, "choice")
    reasoning = f"<think>{think_steps(a, b, width)}</think>" if think else ""
    answer = hasty_sum(a, b) if hasty and not think else a + b
    return prompt, f"{reasoning}<answer>{answer:0{width + 1}d}</answer>"


def render_example(a: int, b: int, rng: random.Random, tc: TrainConfig) -> str:
    """One corpus example, prompt and response, of tc.world. In the zero world a share
    tc.textbook_frac are a textbook's worked examples: headed TEXTBOOK before the prompt, every
    column worked, no draft left standing. The base model learns the skill from them (the
    relative positions inside an example are the same with or without the heading) while the
    template, which has no heading, draws the hasty writers: what it can do, it rarely does."""
    if tc.world == "zero":
        width = tc.max_digits
        if rng.random() < tc.textbook_frac:
            thorough = dataclasses.replace(tc, work_frac=0.999999, verify_frac=0.0)
            return TEXTBOOK + prompt_text(a, b, width) + zero_solution(a, b, width, rng,
                                                                        thorough)[0]
        return prompt_text(a, b, width) + zero_solution(a, b, width, rng, tc)[0]
    think = rng.random() < tc.think_frac
    return "".join(render(a, b, think, tc.max_digits, tc.hasty))


def parse_trace(response: str) -> dict:
    """What a response's reasoning did, parsed (never evaluated): worked (columns worked out),
    notations (theirs, in order), verified (it has a check), corrected (the check ended on a
    different number than the first pass: the draft or the last answer so far before the
    check), consistency (share of worked columns in the majority notation; 1.0 with none),
    language_consistency (share in PROMPT_NOTATION, R1's target language; 0.0 with none) and
    mixed (both notations used)."""
    think = response.split("<think>", 1)[1] if "<think>" in response else ""
    passes = think.split("</think>", 1)[0].split(CHECK)
    ends = []
    notations = []
    for i, text in enumerate(passes):
        guess = re.match(r"\d+", text) if i == 0 else None
        last = guess[0] if guess else None
        for m in STEP.finditer(text):
            notations.append("sym" if m["sym"] else "word")
            last = m["so_far"].replace(MARK, "")
        ends.append(last)
    counts = Counter(notations)
    verified = len(passes) > 1
    return {"worked": len(notations), "notations": notations, "verified": verified,
            "corrected": verified and ends[0] != ends[-1],
            "consistency": max(counts.values()) / len(notations) if notations else 1.0,
            "language_consistency": counts[PROMPT_NOTATION] / max(len(notations), 1),
            "mixed": len(counts) > 1}


def sample_problem(rng: random.Random, min_digits: int, max_digits: int) -> tuple[int, int]:
    def number() -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)
    return number(), number()


def eval_split(split: str, n: int, max_digits: int, seed: int = 1234) -> list[tuple[int, int]]:
    """Held-out problems (same digit range as training, excluded from it) or a harder split
    (max_digits + 1 digits, never seen in training)."""
    if split not in ("heldout", "harder"):
        raise ValueError(f"unknown split {split!r}: use 'heldout' or 'harder'")
    rng = random.Random(f"{split}-{seed}")
    lo, hi = (1, max_digits) if split == "heldout" else (max_digits + 1, max_digits + 1)
    out = []
    while len(out) < n:
        p = sample_problem(rng, lo, hi)
        if p not in out:
            out.append(p)
    return out


class World:
    """The training stream: row j of the corpus is a deterministic function of (seed, j), so any
    process, any resume, any batch split sees exactly the same data. The held-out problems never
    occur in it; evaluate() measures the model on them."""

    def __init__(self, enc: tiktoken.Encoding, tc: TrainConfig, heldout):
        self.enc = enc
        self.tc = tc
        self.problems = list(heldout)
        self.heldout = set(self.problems)
        self.eos = special_id(enc, "<|eos|>")

    def example(self, rng: random.Random) -> list[int]:
        while (p := sample_problem(rng, 1, self.tc.max_digits)) in self.heldout:
            pass
        return encode(self.enc, render_example(*p, rng, self.tc)) + [self.eos]

    def row(self, j: int, stream: str | None = None) -> list[int]:
        rng = random.Random(f"{self.tc.seed if stream is None else stream}-{j}")
        toks = []
        while len(toks) < self.tc.seq_len + 1:
            toks += self.example(rng)
        return toks[: self.tc.seq_len + 1]

    def batch(self, rows: range) -> torch.Tensor:
        return torch.tensor([self.row(j) for j in rows])          # [B, seq_len + 1]

    def corpus_sample(self, n_rows: int = 200) -> str:
        return "".join(self.enc.decode(self.row(-1 - j)) for j in range(n_rows))

    def evaluate(self, model: nn.Module, final: bool = False, n_rows: int = 64) -> dict:
        """Accuracy on the held-out problems (made to think, own choice), and next-token CE on
        rows no run trains on, the same for every --seed (runs compare on one text). final: also
        the harder split (one more digit than training ever saw), keys harder_*."""
        rows = torch.tensor([self.row(j, stream="heldout") for j in range(n_rows)])
        width = self.tc.max_digits
        modes = ("think", "greedy") + (("textbook",) if self.tc.world == "zero" else ())
        out = {**evaluate(model, self.enc, self.problems, width, modes, world=self.tc.world),
               "heldout_loss": heldout_ce(model, rows, self.tc.batch_size)}
        if final:
            harder = eval_split("harder", max(1, len(self.problems) // 2), width)
            ev = evaluate(model, self.enc, harder, width + 1, world=self.tc.world)
            out.update({"harder_" + k: v for k, v in ev.items() if k.startswith("accuracy")})
        return out


def corpus_text(tc: TrainConfig, n: int = 3000) -> str:
    """Text to learn BPE merges from (before the tokenizer exists). Independent of --seed: every
    model of one world shares a tokenizer (distill.py's token-level KD compares logits)."""
    rng = random.Random("merges-0")
    return "".join(render_example(*sample_problem(rng, 1, tc.max_digits), rng, tc)
                   for _ in range(n))


def make_tokenizer(tc: TrainConfig) -> tiktoken.Encoding:
    """The world's tokenizer: 64 BPE merges learned from corpus_text."""
    return build_tokenizer(learn_merges(corpus_text(tc), n_merges=64))


def make_tokenizer_and_world(tc: TrainConfig, n_heldout: int):
    """The world's tokenizer, its held-out problems and its World. Returns (enc, heldout, world)."""
    enc = make_tokenizer(tc)
    heldout = eval_split("heldout", n_heldout, tc.max_digits)
    return enc, heldout, World(enc, tc, heldout)


# ---- --data FILE: any UTF-8 text


class TextData:
    """--data: a text as the corpus. Its last 10% of tokens is held out; training row j is the
    window at an offset drawn from (seed, j), so sharding and resuming work as for World."""

    def __init__(self, tokens: list[int], tc: TrainConfig):
        n_held = max(len(tokens) // 10, tc.seq_len + 1)
        self.tc = tc
        self.L = tc.seq_len + 1
        self.train_ids = torch.tensor(tokens[:-n_held])
        self.held_ids = torch.tensor(tokens[-n_held:])

    def batch(self, rows: range) -> torch.Tensor:                   # [B, seq_len + 1]
        n_offsets = len(self.train_ids) - self.L + 1
        offsets = [random.Random(f"{self.tc.seed}-{j}").randrange(n_offsets) for j in rows]
        return torch.stack([self.train_ids[o:o + self.L] for o in offsets])

    def evaluate(self, model: nn.Module, final: bool = False) -> dict:
        """Next-token cross-entropy over consecutive held-out windows (at most eval_n of them)."""
        n = min(len(self.held_ids) // self.L, self.tc.eval_n)
        windows = self.held_ids[: n * self.L].view(n, self.L)
        return {"heldout_loss": heldout_ce(model, windows, self.tc.batch_size)}


@torch.no_grad()
def heldout_ce(model: nn.Module, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of model on rows [n, seq_len + 1] (eval mode, no MTP)."""
    was_training = model.training
    rows = rows.to(next(model.parameters()).device)
    model.eval()
    ce = 0.0
    for w in rows.split(batch_size):
        ce += model(w[:, :-1], w[:, 1:])[1]["ce"].item() * len(w)
    model.train(was_training)
    return ce / len(rows)


def make_text_data(tc: TrainConfig) -> tuple[tiktoken.Encoding, None, TextData]:
    """--data: BPE merges learned from the file's first 200k characters; the file as TextData."""
    try:
        with open(tc.data, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --data {tc.data}: cannot read it as UTF-8 text ({e}); "
                         f"pass a text file")
    enc = build_tokenizer(learn_merges(text[:200_000], n_merges=256))
    tokens = enc.encode_ordinary(text)
    need = 10 * (tc.seq_len + 1)
    if len(tokens) < need:
        raise SystemExit(f"error: --data {tc.data} is too small: {len(tokens)} tokens, need {need} "
                         f"(10 windows of --seq-len {tc.seq_len} + 1); use a larger file or a "
                         f"smaller --seq-len")
    return enc, None, TextData(tokens, tc)


# ---- generation and evaluation


def generate_ids(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, generator=None, batch_size: int = 256,
                 use_cache: bool = True) -> list[list[int]]:
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
            y = model.generate(x, max_new_tokens, temperature, generator=generator,
                               use_cache=use_cache)
            for i, row in zip(chunk, y[:, length:].tolist()):
                out[i] = [t for t in row if t != model.args.pad_id]
    return out


def generate_texts(model: Transformer, enc, prompts: list[str], max_new_tokens: int,
                   temperature: float = 0.0, generator=None) -> list[str]:
    """Complete text prompts (see generate_ids)."""
    prompt_ids = [encode(enc, p) for p in prompts]
    ids = generate_ids(model, prompt_ids, max_new_tokens, temperature, generator)
    return [enc.decode(r) for r in ids]


MAX_ANSWER_DIGITS = 40
# A block's text: printable and not blank (one character besides whitespace, no control
# characters such as NUL), no tag characters (a stray or nested tag breaks it).
_BODY = r"(?=[^<>]*[^<>\s])[^<>\x00-\x1f\x7f-\x9f]+"
WELL_FORMED = re.compile(rf"(?:<think>{_BODY}</think>)?<answer>{_BODY}</answer>(?:<\|eos\|>)?")
ANSWER_BLOCK = re.compile(r"<answer>([^<>]*)</answer>")


def parse_answer(response: str) -> int | None:
    """The one judge of an answer, for evaluation, rewards and rejection sampling: the integer in
    the response's ONLY <answer>...</answer> block, whose text must be 1..40 ASCII digits (leading
    zeros allowed: the world writes answers zero-padded); None otherwise. The text is parsed,
    never evaluated."""
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return None
    m = ANSWER_BLOCK.search(response)
    s = m.group(1) if m else ""
    if not (0 < len(s) <= MAX_ANSWER_DIGITS and s.isascii() and s.isdigit()):
        return None
    return int(s)


def well_formed(response: str) -> bool:
    """[<think>text</think>]<answer>text</answer>[<|eos|>] exactly, each text printable and
    not blank."""
    return WELL_FORMED.fullmatch(response) is not None


def longest_responses(width: int, world: str = "zero") -> list[str]:
    """The longest responses of each kind at this width (after the template): the zero world's
    draft, one column, a check that works the rest and the verdict, and the readable solution
    (R1's cold start and what it grows); the choice world's worked solution. Token counts do not
    depend on the digits (each digit is one token) nor on the notation."""
    if world == "choice":
        return [render(0, 0, True, width)[1]]
    n = width + 1
    steps, so_far = column_steps(0, 0, width, range(n), ["word"] * n, draft(0, 0, width))
    body = " ".join([so_far, steps[0]]) + CHECK + " ".join(steps[1:]) + VERDICTS[1]
    return [f"{body}</think><answer>{so_far}</answer>", readable_solution(0, 0, width, "word")]


def max_response_tokens(width: int, world: str = "zero", enc=None) -> int:
    """The generation cap: the longest response's tokens (characters without a tokenizer: each
    token is at least one character) plus slack."""
    texts = longest_responses(width, world)
    return max(len(t) if enc is None else len(encode(enc, t)) for t in texts) + 8


def world_tokens_bound(width: int, world: str = "zero", enc=None) -> int:
    """Tokens the longest evaluation sequence at this width can take: the template (special
    tokens count one each, every other character at most one) then max_response_tokens."""
    prompt = prompt_text(10 ** width - 1, 10 ** width - 1, width, world)
    n_prompt = len(re.sub(r"<\|?/?\w+\|?>", "S", prompt))
    return n_prompt + max_response_tokens(width, world, enc)


def trace_metrics(texts: list[str], ids: list[list[int]], n_new: int) -> dict:
    """What a batch of responses did (texts include the template's <think>; ids are the generated
    tokens): think_rate, format_rate, mean_length (generated tokens), steps_worked (columns worked
    out per response), verification_rate, correction_rate (share of responses whose check changed
    the answer), consistency (mean share of a trace in its majority notation), mixing_rate (share
    using both notations), language_consistency (of all columns worked in the batch, the share in
    PROMPT_NOTATION: R1's language consistency) and truncation_rate (responses that hit the cap
    n_new: no answer, so reward 0, counted here rather than silently)."""
    traces = [parse_trace(t) for t in texts]
    n = len(texts)
    worked = sum(t["worked"] for t in traces)
    in_notation = sum(t["notations"].count(PROMPT_NOTATION) for t in traces)

    def share(values) -> float:
        return sum(map(float, values)) / n

    return {"think_rate": share(t.startswith("<think>") for t in texts),
            "format_rate": share(map(well_formed, texts)),
            "mean_length": share(map(len, ids)),
            "steps_worked": share(t["worked"] for t in traces),
            "verification_rate": share(t["verified"] for t in traces),
            "correction_rate": share(t["corrected"] for t in traces),
            "consistency": share(t["consistency"] for t in traces),
            "mixing_rate": share(t["mixed"] for t in traces),
            "language_consistency": in_notation / max(worked, 1),
            "truncation_rate": share(len(r) >= n_new and "<|eos|>" not in t
                                     for r, t in zip(ids, texts))}


@torch.no_grad()
def evaluate(model: Transformer, enc, problems: list[tuple[int, int]], width: int,
             modes: tuple = ("think", "greedy"), k: int = 4, seed: int = 0,
             world: str = "zero") -> dict:
    """How well the model adds, judged by parse_answer. Modes, each giving accuracy_<mode> and
    trace_metrics' figures with _<mode> (think_rate, mean_length, verification_rate, ...):
        think   greedy, made to reason (the prompt ends with <think>)
        greedy  greedy on the world's template (zero: it opens <think>, so this IS think mode,
                generated once; choice: the bare task, the model's own choice)
        t1      k samples per problem at T = 1 (accuracy_t1 is pass@1), plus pass_at_k
        textbook  greedy after the textbook's heading (zero world): made to work every column
    `width`: the digits problems are written with (training max_digits; one more for 'harder')."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    n_new = max_response_tokens(width, world, enc)
    targets = [a + b for a, b in problems]
    out = {}
    done = {}
    for mode in modes:
        # 1. the prompts of this mode, repeated k times for sampling
        prompts = [prompt_text(a, b, width, "zero" if mode == "think" else world)
                   for a, b in problems]
        if mode == "textbook":
            prompts = [TEXTBOOK + prompt_text(a, b, width) for a, b in problems]
        n_samples = k if mode == "t1" else 1
        temperature = 1.0 if mode == "t1" else 0.0
        opened = "<think>" if prompts[0].endswith("<think>") else ""
        # modes whose prompts are the same (zero world: think == greedy) are generated once
        key = (prompts[0], temperature)
        if key not in done:
            rows = [encode(enc, p) for p in prompts for _ in range(n_samples)]
            # 2. generate: greedy, or at T = 1 with the seeded generator
            ids = generate_ids(model, rows, n_new, temperature, g)
            # 3. judge: the response includes the tag the template opened
            texts = [opened + enc.decode(r) for r in ids]
            right = [parse_answer(t) == y for t, y in zip(texts, [y for y in targets
                                                                  for _ in range(n_samples)])]
            done[key] = (right, trace_metrics(texts, ids, n_new))
        right, figures = done[key]
        out[f"accuracy_{mode}"] = sum(right) / len(right)
        out.update({f"{name}_{mode}": v for name, v in figures.items()})
        if mode == "t1":
            per_problem = torch.tensor(right, dtype=torch.float).view(len(problems), k)
            out["pass_at_k"] = per_problem.amax(1).mean().item()
            out["k"] = k
    model.train(was_training)
    return {**out, "n": len(problems)}


# ---- checkpoints


def save_checkpoint(path: str, model: Transformer, opt, step: int, cfg: Config, enc,
                    elapsed_s: float = 0.0) -> None:
    """Atomic: a temp file beside the target, then a rename (a crash never leaves half a file).
    elapsed_s: the run's training seconds so far (a resumed run's wall_seconds adds them)."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict() if opt else None,
             "step": step, "config": dataclasses.asdict(cfg), "tokenizer": tokenizer_state(enc),
             "rng": torch.get_rng_state(), "elapsed_s": elapsed_s}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from dataclasses.asdict output (as stored in checkpoints)."""
    m = dict(d["model"])
    m["mla"] = MLAConfig(**m["mla"])
    m["moe"] = MoEConfig(**m["moe"])
    m["mtp"] = MTPConfig(**m["mtp"])
    known = {f.name for f in fields(TrainConfig)}
    # checkpoints written before a TrainConfig field existed still load (the field's default)
    tc = TrainConfig(**{k: v for k, v in d["train"].items() if k in known})
    return Config(model=ModelArgs(**m), train=tc)


def load_checkpoint(path: str, device: str = "cpu"
                    ) -> tuple[Transformer, tiktoken.Encoding, Config, dict]:
    """Model, tokenizer and config from a checkpoint (weights_only: no code is unpickled)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}: run `python train.py` first "
                         f"(or pass the right path)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = config_from_dict(ckpt["config"])
        enc = tokenizer_from_state(ckpt["tokenizer"])
        model = Transformer(cfg.model).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        # a user's file: say what is wrong in one line, not a torch traceback
        first = (str(e).splitlines() or [""])[0][:200]
        raise SystemExit(f"error: {path} is not a readable checkpoint of this project "
                         f"({type(e).__name__}: {first}); re-run train.py to make one")
    return model, enc, cfg, ckpt


# ---- training


def check_device(name: str) -> None:
    """--device must be auto, cpu, cuda, cuda:N or mps, and present here (ValueError if not)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r} is not auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= n:
            raise ValueError(f"--device {name} but {n} CUDA GPU(s) are visible; use --device "
                             f"cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps but MPS (Apple silicon) is not available here; use "
                         "--device cpu or auto")


def check_out_writable(out: str) -> None:
    """--out must be a folder this process can create files in (ValueError if not). Probes with
    a temporary folder that is removed at once: nothing is left behind."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out} is a file, not a folder: pass a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out} lies below the file {parent}: pass a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        raise ValueError(f"--out {out} is not writable ({e.strerror} in {parent}): pass a "
                         f"folder you can write to")


def check_shared(rates: dict[str, float], threads: int, device: str, out: str | None) -> None:
    """The checks every script's config makes (train.py, grpo.py, distill.py): each rate (flag
    name -> value) finite and > 0, --threads >= 0, --device known and present, --out writable.
    Raises ValueError with a one-line message. out None: the script writes no --out."""
    for flag, value in rates.items():
        # nan slips through comparisons such as min(1.0, nan) or nan <= 0
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a finite number > 0 (got {value})")
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default; got {threads})")
    check_device(device)
    if out is not None:
        check_out_writable(out)


def check_fresh_out(out: str, files: tuple, resume_flag: bool = True) -> None:
    """A fresh run refuses an --out that holds another run's files (SystemExit, one line):
    nothing a user did is overwritten silently. --overwrite skips this check."""
    found = [f for f in files if os.path.exists(os.path.join(out, f))]
    if not found:
        return
    ways = "--resume to continue it, " if resume_flag else ""
    raise SystemExit(f"error: {out} already holds an earlier run ({', '.join(found)}): pass "
                     f"{ways}--overwrite to replace it, or a new --out (or remove the folder)")


def pick_device(name: str) -> str:
    """--device: auto picks cuda (this process's GPU under torchrun), then mps, then cpu."""
    try:
        check_device(name)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if name != "auto":
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


def build_model(cfg: Config, enc: tiktoken.Encoding, device: str) -> Transformer:
    """The Transformer of cfg.model, with the tokenizer's vocabulary, padding and stop ids."""
    m = cfg.model
    m.vocab_size = enc.n_vocab
    m.pad_id = special_id(enc, "<|pad|>")
    m.stop_ids = (special_id(enc, "</answer>"), special_id(enc, "<|eos|>"))
    return Transformer(m).to(device)


def compile_for_training(model: nn.Module, ddp: nn.Module) -> nn.Module:
    """torch.compile the (DDP-wrapped) model for training. The MoE layers switch to their
    per-expert loop: torch._grouped_mm runs fp32 on a CPU, but its compile-time shape check
    accepts only bf16."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.dispatch = "loop"
    return torch.compile(ddp)


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@dataclass
class Run:
    """Everything one pretraining run holds between steps (made by setup)."""
    cfg: Config
    model: Transformer
    ddp: nn.Module                # the model as trained: DDP-wrapped and/or compiled
    opt: torch.optim.Optimizer
    enc: tiktoken.Encoding
    data: World | TextData        # batch(rows) and evaluate(model, final)
    device: str
    rank: int
    world_size: int
    start: int                    # the first step to run (resume)
    ckpt_path: str
    metrics_path: str
    elapsed_s: float = 0.0        # training seconds before this process (a resume's earlier parts)


def remove_stale_temp_files(ckpt_path: str) -> None:
    """save_checkpoint's temp files (ckpt.pt.tmp<PID>) left by a killed run."""
    folder = os.path.dirname(ckpt_path) or "."
    prefix = os.path.basename(ckpt_path) + ".tmp"
    for name in os.listdir(folder):
        if name.startswith(prefix):
            os.remove(os.path.join(folder, name))


def drop_rows_after(metrics_path: str, step: int) -> None:
    """A resume from `step` repeats the steps after it: their old rows go (each step once)."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    tmp = f"{metrics_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, metrics_path)


def flat_fields(d: dict) -> dict:
    """Leaf fields of a nested asdict (the flag names: dim, kv_lora_rank, ...)."""
    out = {}
    for k, v in d.items():
        out.update(flat_fields(v) if isinstance(v, dict) else {k: v})
    return out


def config_differences(stored: Config, asked: Config) -> list[str]:
    """What differs between a checkpoint's model (and world) and the one asked for, as
    'dim 32 in the checkpoint, 64 asked'."""
    a = flat_fields(dataclasses.asdict(stored.model))
    b = flat_fields(dataclasses.asdict(asked.model))
    for name in ("max_digits", "data"):
        a[name] = getattr(stored.train, name)
        b[name] = getattr(asked.train, name)
    return [f"{k} {a[k]!r} in the checkpoint, {b[k]!r} asked" for k in a if a[k] != b.get(k)]


def resume_from(ckpt_path: str, cfg: Config, model: Transformer, opt, enc, device: str
                ) -> tuple[int, float]:
    """Load --resume's checkpoint into model and opt; returns (its step, its elapsed seconds).
    SystemExit, one line, when there is none, it is of another size, or it is past --steps."""
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: --resume but no checkpoint at {ckpt_path}: drop --resume to "
                         f"start afresh, or pass the --out of the run to continue")
    _, stored_enc, stored, ckpt = load_checkpoint(ckpt_path, device)
    diffs = config_differences(stored, cfg)
    if diffs or tokenizer_state(stored_enc) != tokenizer_state(enc):
        raise SystemExit(f"error: {ckpt_path} is another model than the one asked for "
                         f"({'; '.join(diffs) or 'the tokenizer differs'}): pass the flags "
                         f"it was trained with, or a new --out")
    step = ckpt["step"]
    if step > cfg.train.steps:
        raise SystemExit(f"error: {ckpt_path} is already at step {step}, past --steps "
                         f"{cfg.train.steps}: pass --steps above {step} to train further")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    # checkpoints written before elapsed_s existed count as 0 seconds
    return step, float(ckpt.get("elapsed_s", 0.0))


def setup(cfg: Config) -> Run:
    """Data, model, optimizer, and the checkpoint to resume from, for this process."""
    tc = cfg.train
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    os.makedirs(tc.out, exist_ok=True)
    ckpt_path = os.path.join(tc.out, "ckpt.pt")
    metrics_path = os.path.join(tc.out, "metrics.jsonl")
    # 1. the data and its tokenizer: the world, or --data's text
    if tc.data:
        enc, _, data = make_text_data(tc)
    else:
        enc, _, data = make_tokenizer_and_world(tc, tc.eval_n)
    # 2. the model; V3 §3.3: embedding, output head, gate and norms stay in high precision
    model = build_model(cfg, enc, device)
    if tc.fp8:
        swap_to_fp8(model)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95),
                            weight_decay=tc.weight_decay)
    # 3. resume, or start afresh (a fresh run's metrics start empty)
    if rank == 0:
        remove_stale_temp_files(ckpt_path)
        remove_stale_temp_files(metrics_path)
    start = 0
    elapsed_s = 0.0
    if tc.resume:
        start, elapsed_s = resume_from(ckpt_path, cfg, model, opt, enc, device)
        if rank == 0:
            drop_rows_after(metrics_path, start)
        log(f"resumed from {ckpt_path} at step {start}", rank)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    # 4. the model as trained: wrapped for DDP, compiled if asked
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    if tc.compile:
        ddp = compile_for_training(model, ddp)
    return Run(cfg, model, ddp, opt, enc, data, device, rank, world_size, start, ckpt_path,
               metrics_path, elapsed_s)


def train_step(run: Run, step: int) -> tuple[torch.Tensor, dict, dict]:
    """One optimizer step: grad_accum micro-batches of this process's rows, clip, AdamW, then the
    gate-bias update. Returns the last micro-batch's loss, its parts, and the balance stats."""
    tc = run.cfg.train
    autocast = nullcontext()
    if run.device.startswith("cuda"):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, tc)
    rows_per_step = tc.batch_size * tc.grad_accum * run.world_size
    for micro in range(tc.grad_accum):
        # row indices are global, so every process and every resume sees the same stream
        first = step * rows_per_step + (micro * run.world_size + run.rank) * tc.batch_size
        batch = run.data.batch(range(first, first + tc.batch_size)).to(run.device)
        sync = micro == tc.grad_accum - 1 or run.world_size == 1
        with autocast, (nullcontext() if sync else run.ddp.no_sync()):
            loss, parts = run.ddp(batch[:, :-1], batch[:, 1:])
            (loss / tc.grad_accum).backward()
    if not torch.isfinite(loss):
        raise SystemExit(f"error: loss became {loss.item()} at step {step}; the last good "
                         f"checkpoint is kept at {run.ckpt_path}. Try a lower --lr or --grad-clip.")
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    # once per optimizer step, from this step's loads
    balance = update_gate_biases(run.model)
    return loss, parts, balance


# beside the accuracies, what each evaluation's log line shows
EVAL_SHOWN = ("think_rate_greedy", "mean_length_greedy", "verification_rate_greedy",
              "mixing_rate_greedy", "heldout_loss")


def evaluate_and_save(run: Run, done: int, elapsed_s: float = 0.0) -> dict:
    """Evaluate on held-out data, log to metrics.jsonl, save the checkpoint; returns the figures.
    elapsed_s: the run's training seconds so far (stored in the checkpoint)."""
    tc = run.cfg.train
    ev = run.data.evaluate(run.model, final=done == tc.steps)
    append_jsonl(run.metrics_path, {"step": done, **ev})
    shown = [k for k in ev if k.startswith("accuracy") or k in EVAL_SHOWN]
    log(f"eval @ {done}: " + " | ".join(f"{k} {ev[k]:.4g}" for k in shown))
    save_checkpoint(run.ckpt_path, run.model, run.opt, done, run.cfg, run.enc, elapsed_s)
    return ev


def train(cfg: Config, stop_at: int | None = None) -> dict:
    """Pretrain; returns the summary dict. stop_at ends the run early (as if interrupted)."""
    tc = cfg.train
    run = setup(cfg)
    total, active = param_counts(run.model)
    log(f"model: {total:,} parameters, {active:,} active per token | vocab {run.enc.n_vocab} | "
        f"device {run.device} | {run.world_size} process(es)", run.rank)
    if run.start >= tc.steps:
        log(f"{run.ckpt_path} is already at step {run.start} = --steps: nothing to do; pass a "
            f"larger --steps to train further", run.rank)
        return {}
    t0 = time.time()
    last_log = t0
    tokens_seen = 0
    summary = {}
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)
    for step in range(run.start, end):
        loss, parts, balance = train_step(run, step)
        tokens_seen += tc.batch_size * tc.grad_accum * tc.seq_len * run.world_size
        done = step + 1
        if run.rank != 0:
            continue
        # log every log_interval steps, and never stay silent for more than 10 seconds
        if done % tc.log_interval == 0 or done == tc.steps or time.time() - last_log > 10:
            last_log = time.time()
            el = last_log - t0
            row = {"step": done, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                   "lr": lr_at(step, tc), "tokens_per_s": tokens_seen / el, "elapsed_s": el,
                   **{k: float(v) for k, v in balance.items()}}
            append_jsonl(run.metrics_path, row)
            eta = el / (done - run.start) * (tc.steps - done)
            log(f"step {done:5d}/{tc.steps} | loss {row['loss']:.4f} (ce {row['ce']:.4f}) | "
                f"{row['tokens_per_s']:,.0f} tok/s | {el:.0f}s elapsed, ETA {eta:.0f}s")
        if done % tc.eval_interval == 0 or done == tc.steps:
            ev = evaluate_and_save(run, done, run.elapsed_s + time.time() - t0)
            summary = {"heldout_" + k if k.startswith("accuracy") else k: v for k, v in ev.items()}
    if run.rank == 0 and summary:
        el = time.time() - t0
        # wall_seconds covers the whole run, resumed parts included
        summary.update(tokens_per_second=tokens_seen / el, params_total=total,
                       params_active=active, wall_seconds=run.elapsed_s + el, steps=tc.steps,
                       final_loss=loss.item())
        with open(os.path.join(tc.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_metrics(run.metrics_path, tc.out, tc.world)
        log(f"done in {el:.0f}s; summary in {os.path.join(tc.out, 'summary.json')}")
    return summary


def plot_metrics(metrics_path: str, out: str, world: str = "zero") -> None:
    """pretrain.png. A bare Figure, not pyplot: saving must not switch a notebook's backend."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in open(metrics_path)]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "heldout_loss" in r]
    steps = [r["step"] for r in train_rows]
    fig = Figure(figsize=(10, 3.5))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(steps, [r["ce"] for r in train_rows], label="next-token CE")
    a1.plot(steps, [r["mtp"] for r in train_rows], label="MTP loss (λ-weighted)")
    a1.set(xlabel="step", ylabel="loss", title="pretraining loss")
    a1.legend()
    curves = [("accuracy_think", "accuracy when made to think"),
              ("accuracy_greedy", "accuracy, own choice"), ("think_rate_greedy", "think rate")]
    if world == "zero":
        # every response thinks: what varies is how far it works and whether it checks
        curves = [("accuracy_greedy", "accuracy (template, greedy)"),
                  ("accuracy_textbook", "accuracy made to work every column"),
                  ("verification_rate_greedy", "verification rate"),
                  ("mixing_rate_greedy", "mixing rate")]
    if eval_rows and "accuracy_think" in eval_rows[0]:
        for key, label in curves:
            points = [(r["step"], r[key]) for r in eval_rows if key in r]
            if points:
                a2.plot(*zip(*points), marker="o", label=label)
        a2.set(xlabel="step", ylim=(-0.02, 1.02), title="held-out evaluation (greedy)")
    else:
        a2.plot([r["step"] for r in eval_rows], [r["heldout_loss"] for r in eval_rows],
                marker="o", label="held-out loss")
        a2.set(xlabel="step", title="held-out next-token CE")
    a2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pretrain.png"), dpi=110)


# ---- benchmark


def interleaved_median(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each zero-argument fn in fns. The calls are interleaved (a, b,
    a, b, ...) so that a noisy, shared machine slows every candidate alike; compare ratios from
    one call. The one timer of train.py, grpo.py and the notebooks."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


class GPTBlock(nn.Module):
    """A plain dense GPT block (multi-head attention + SwiGLU), named like Block: the baseline
    MLA + MoE is compared to."""

    def __init__(self, dim: int, n_heads: int, inter_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = MLP(dim, inter_dim)

    def attn(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, -1).unbind(2)       # [B, T, H, hd]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # [B, H, T, hd]
        return self.wo(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's attainable fp32 FLOP/s, the roof our figures are measured against: the
    fastest of `repeats` n x n matrix products (2 n^3 FLOPs each) at torch's thread setting."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    # one product to warm up, then the fastest of the timed ones
    a @ b
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(seconds)


def activation_bytes(model: nn.Module, loss_fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of one loss_fn() (activations: what
    sets a training step's peak memory beside the weights), each storage counted once, the
    model's own parameters not counted. Runs the backward too."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = loss_fn()
    loss.backward()
    return sum(kept.values())


def train_flops_per_token(model: Transformer, seq_len: int) -> float:
    """FLOPs of one training token (forward + backward = 3 x forward): 6 per active weight used
    in a matmul (the input embedding is a lookup; each MTP module runs the head again) plus
    causal attention over seq_len / 2 keys on average in every block (scores and values)."""
    a = model.args
    _, active = param_counts(model)
    depth = len(model.mtp)
    matmul_weights = active - a.vocab_size * a.dim + depth * a.vocab_size * a.dim
    m = a.mla
    per_key = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    attention = 2 * (a.n_layers + depth) * (seq_len + 1) / 2 * per_key
    return 3 * (2 * matmul_weights + attention)


def decode_flops_per_token(model: Transformer, context: int) -> float:
    """FLOPs of one absorbed decode step at this context (main model only, MTP unused): 2 per
    active weight in a matmul, plus per layer and head the scores over [c_kv | k_pe] and the
    weighted latents (2 c + d_R per key)."""
    a = model.args
    _, active = param_counts(model)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    m = a.mla
    per_key = m.n_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
    return 2 * (active - mtp - a.vocab_size * a.dim) + 2 * a.n_layers * context * per_key


def ours_decode_step(model: Transformer, batch: int, context: int, n_steps: int):
    """A zero-argument call that greedily decodes n_steps tokens in batch rows after a prompt of
    `context` tokens (prefilled once, in one row, and copied to every row), and the cache's bytes
    at that context. Each call starts again at `context`: entries after it are overwritten."""
    cache = model.new_cache(batch, context + n_steps)
    with torch.inference_mode():
        one = model.new_cache(1, context)
        model.forward_hidden(torch.zeros(1, context, dtype=torch.long), 0, one, mode="naive")
        for layer, prefilled in zip(cache, one):
            layer.c_kv[:, :context] = prefilled.c_kv
            layer.k_pe[:, :context] = prefilled.k_pe
    first = torch.zeros(batch, 1, dtype=torch.long)

    @torch.inference_mode()
    def step():
        decode = model.compiled_decode or model.decode_step
        tok = first
        for pos in range(context, context + n_steps):
            tok = decode(tok, pos, cache).argmax(-1, keepdim=True)

    nbytes = sum(t[:, :context].nbytes for layer in cache for t in (layer.c_kv, layer.k_pe))
    return step, nbytes


def hf_decode_step(hf: nn.Module, batch: int, context: int, n_steps: int):
    """The same for transformers' DeepseekV3ForCausalLM and its default DynamicCache (what
    generate() uses): the same prompt prefilled once and repeated over the batch, cropped back to
    `context` after each call. transformers 5 caches MLA's latent and re-expands per-head K and V at
    every step; 4.x cached the per-head K and V (the official naive cache)."""
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.inference_mode():
        prompt = torch.zeros(1, context, dtype=torch.long)
        cache = getattr(hf(input_ids=prompt, use_cache=True), kw)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    first = torch.zeros(batch, 1, dtype=torch.long)

    @torch.inference_mode()
    def step():
        tok = first
        for _ in range(n_steps):
            logits = hf(input_ids=tok, use_cache=True, **{kw: cache}).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
        # back to `context` (a negative count removes that many tokens, in 4.x and 5.x alike)
        cache.crop(-n_steps)

    return step, sum(t.nbytes for t in tensors)


def checkpoint_rollouts(path: str, compile: bool, repeats: int = 3) -> dict:
    """Rollouts of a trained checkpoint as grpo.py samples them: 16 held-out prompts x 8 samples
    at T = 1, the world's response cap, its stop tokens (finished rows leave the batch). Generated
    (non-padding) tokens/s, median of `repeats` after a warm-up, eager and compiled."""
    model, enc, ckpt_cfg, _ = load_checkpoint(path)
    model.eval()
    width = ckpt_cfg.train.max_digits
    world = ckpt_cfg.train.world
    n_new = max_response_tokens(width, world, enc)
    rows = [encode(enc, prompt_text(a, b, width, world))
            for a, b in eval_split("heldout", 16, width) for _ in range(8)]
    lengths = []

    def median_tokens() -> float:
        # the repeats' token counts (the warm-up's is the first)
        return sorted(lengths[1:])[(len(lengths) - 1) // 2]

    def sample():
        ids = generate_ids(model, rows, n_new, 1.0, torch.Generator().manual_seed(len(lengths)))
        lengths.append(sum(map(len, ids)))

    out = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled" and not (compile and model.compile_decode()):
            break
        lengths.clear()
        sec = interleaved_median({"rollout": sample}, repeats, warmup=1)["rollout"]
        key = "rollout_tokens_per_s_ckpt" + ("_compiled" if mode == "compiled" else "")
        out[key] = median_tokens() / sec
    out["rollout_mean_length_ckpt"] = median_tokens() / len(rows)
    return out


BENCH_CONTEXTS = (256, 1024, 4096)


def note(msg: str) -> None:
    """Progress on stderr: stdout carries only the result (the benchmark's JSON)."""
    print(msg, file=sys.stderr, flush=True)


def bench(cfg: Config, repeats: int = 5, contexts: tuple = BENCH_CONTEXTS,
          compile: bool = True) -> dict:
    """Speed, in one run so that ratios are fair on a shared machine (stderr says what it is
    doing). Training tokens/s (forward + backward) of our model, of transformers'
    DeepseekV3ForCausalLM on the same weights (next-token loss only: HF has no MTP, so ours is
    timed both ways), and of a dense GPT whose FFN makes its parameters equal our ACTIVE count;
    greedy decode tokens/s at batch 1 and 128, contexts BENCH_CONTEXTS, each with its own cache
    (ours the MLA latent, HF's the per-head K/V); batch-128 rollouts at T = 1; the machine's
    matmul FLOP/s and the model-FLOPs utilisation (MFU) of training and batch-1 decode. With
    --ckpt, also the rollouts of that trained model (checkpoint_rollouts): real lengths and stops.
    contexts must include 1024 (the contract's decode keys); compile: also time compile_decode."""
    if 1024 not in contexts:
        raise ValueError(f"bench: contexts must include 1024, got {contexts}")
    tc = cfg.train
    if tc.ckpt and not os.path.isfile(tc.ckpt):
        raise SystemExit(f"error: --ckpt {tc.ckpt}: no such file (a checkpoint of train.py or "
                         f"grpo.py, e.g. out/grpo/ckpt.pt)")
    m = cfg.model
    enc, _, world = make_tokenizer_and_world(tc, 16)
    # longer RoPE tables for the decode contexts (the weights do not depend on max_seq_len)
    n_decode = 16
    big = dataclasses.replace(cfg, model=dataclasses.replace(
        m, max_seq_len=max(m.max_seq_len, max(contexts) + n_decode)))
    ours = build_model(big, enc, "cpu")
    m = ours.args
    _, active = param_counts(ours)
    # non-embedding parameters per layer; attention 4 dim^2, SwiGLU 3 dim inter
    per_layer = (active - 2 * m.vocab_size * m.dim) / m.n_layers
    inter = max(8, round((per_layer - 4 * m.dim * m.dim) / (3 * m.dim)))
    blocks = [GPTBlock(m.dim, m.mla.n_heads, inter) for _ in range(m.n_layers)]
    dense = nn.Sequential(nn.Embedding(m.vocab_size, m.dim), *blocks, nn.RMSNorm(m.dim),
                          nn.Linear(m.dim, m.vocab_size, bias=False))
    try:
        hf = ours.to_hf().train()
    except SystemExit as e:
        note(f"bench: no transformers column ({e})")
        hf = None
    batch = world.batch(range(tc.batch_size))
    x = batch[:, :-1]
    y = batch[:, 1:]

    def loss_ours():
        return ours(x, y)[0]

    def loss_ours_lm():
        return F.cross_entropy(ours(x).flatten(0, 1), y.flatten())

    def loss_dense():
        return F.cross_entropy(dense(x).flatten(0, 1), y.flatten())

    def loss_hf():
        return F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), y.flatten())

    def backward_of(loss_fn):
        def step():
            loss_fn().backward()
        return step

    # name -> (the model, its loss on the batch)
    losses = {"ours": (ours, loss_ours), "ours_lm": (ours, loss_ours_lm),
              "dense": (dense, loss_dense)}
    if hf is not None:
        losses["hf"] = (hf, loss_hf)
    note(f"bench: training steps of {x.numel()} tokens, {repeats} repeats each, interleaved")
    med = interleaved_median({k: backward_of(fn) for k, (_, fn) in losses.items()}, repeats,
                             warmup=2)
    tps = {name: x.numel() / s for name, s in med.items()}
    memory = {f"activation_bytes_{k}": activation_bytes(*v) for k, v in losses.items()}
    out = {"tokens_per_s_ours": tps["ours"], "tokens_per_s_dense": tps["dense"],
           "params_active_ours": active,
           "params_dense": sum(p.numel() for p in dense.parameters()),
           "slowdown_vs_dense": med["ours"] / med["dense"],
           "tokens_per_s_ours_lm": tps["ours_lm"], "tokens_per_s_hf": tps.get("hf")}
    if hf is not None:
        out["speedup_vs_hf_train"] = tps["ours_lm"] / tps["hf"]
    out.update(memory)
    ours.eval()
    if hf is not None:
        hf.eval()
    # decode: batch 1 and 128 at each context; ours vs HF, interleaved per row
    rows = []
    for b, n_steps in ((1, n_decode), (128, 4)):
        for ctx in contexts:
            note(f"bench: greedy decode, batch {b}, context {ctx}")
            fn, nbytes = ours_decode_step(ours, b, ctx, n_steps)
            fns = {"ours": fn}
            row = {"batch": b, "context": ctx, "cache_bytes_ours": nbytes}
            if hf is not None:
                fns["hf"], row["cache_bytes_hf"] = hf_decode_step(hf, b, ctx, n_steps)
            sec = interleaved_median(fns, 3 if b == 1 else 1, warmup=1)
            row.update({f"tokens_per_s_{k}": b * n_steps / s for k, s in sec.items()})
            rows.append(row)
    out["decode"] = rows
    at_1024 = next(r for r in rows if r["batch"] == 1 and r["context"] == 1024)
    out["decode_tokens_per_s_ours_b1"] = at_1024["tokens_per_s_ours"]
    out["decode_tokens_per_s_hf_b1"] = at_1024.get("tokens_per_s_hf")
    if hf is not None:
        out["speedup_vs_hf_decode_b1"] = at_1024["tokens_per_s_ours"] / at_1024["tokens_per_s_hf"]
    # KV-cache bytes per token per layer (float32), from the caches' own tensors
    per = contexts[-1] * m.n_layers
    last = rows[len(contexts) - 1]
    out["cache_bytes_per_token_layer_ours"] = last["cache_bytes_ours"] / per
    if hf is not None:
        out["cache_bytes_per_token_layer_hf"] = last["cache_bytes_hf"] / per
    # rollouts: what grpo.py does, 128 rows sampled at T = 1 (no stop token: every row runs on)
    note("bench: batch-128 rollouts at T = 1")
    ours.args.stop_ids = ()
    prompts = batch[:128, :32]
    prompts = prompts.repeat(-(-128 // len(prompts)), 1)[:128]
    n_new = 128
    g = torch.Generator().manual_seed(0)

    def rollout():
        ours.generate(prompts, n_new, temperature=1.0, generator=g)

    sec = interleaved_median({"rollout": rollout}, 1, warmup=1)["rollout"]
    out["rollout_tokens_per_s_ours_b128"] = 128 * n_new / sec
    # the same two with the decode step compiled (compile_decode; eager is the default)
    if compile:
        note("bench: compiling the decode step (torch.compile, dynamic shapes)")
    t0 = time.perf_counter()
    if compile and ours.compile_decode():
        out["compile_s"] = time.perf_counter() - t0
        fn, _ = ours_decode_step(ours, 1, 1024, n_decode)
        # batch 1 is compiled separately (torch specialises size 1): warm-up twice
        sec = interleaved_median({"b1": fn}, 3, warmup=2)["b1"]
        out["decode_tokens_per_s_ours_b1_compiled"] = n_decode / sec
        sec = interleaved_median({"rollout": rollout}, 1, warmup=1)["rollout"]
        out["rollout_tokens_per_s_ours_b128_compiled"] = 128 * n_new / sec
        ours.compiled_decode = None
    # the machine's limit: MFU of training, and how far batch-1 decode is from arithmetic
    note("bench: this machine's matmul FLOP/s")
    flops = matmul_flops()
    out["attainable_flops"] = flops
    out["mfu_train"] = train_flops_per_token(ours, x.size(1)) * tps["ours"] / flops
    decode_flops = decode_flops_per_token(ours, 1024)
    out["decode_limit_tokens_per_s_b1"] = flops / decode_flops
    out["mfu_decode_b1"] = decode_flops * out["decode_tokens_per_s_ours_b1"] / flops
    if tc.ckpt:
        note(f"bench: rollouts of {tc.ckpt}, as grpo.py samples them")
        out.update(checkpoint_rollouts(tc.ckpt, compile))
    out["threads"] = torch.get_num_threads()
    try:
        # Unix only (not on Windows): the whole process's peak resident memory, all of the above
        # included; Linux reports KiB
        import resource
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        pass
    return out


# ---- Hugging Face interop

# Hugging Face DeepseekV3 parameter names -> ours, applied in order (gate_up_proj first: it holds
# "up_proj"). Both directions read it: from_hf renames HF's tensors, to_hf finds the tensor of ours
# that fills each of HF's.
HF_NAMES = [
    ("gate_up_proj", "w13"), ("model.embed_tokens", "embed"), ("model.norm", "norm"),
    ("lm_head", "head"), ("model.layers", "layers"), ("self_attn.q_proj", "attn.wq"),
    ("self_attn.q_a_proj", "attn.wq_a"), ("self_attn.q_a_layernorm", "attn.q_norm"),
    ("self_attn.q_b_proj", "attn.wq_b"), ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a"),
    ("self_attn.kv_a_layernorm", "attn.kv_norm"), ("self_attn.kv_b_proj", "attn.wkv_b"),
    ("self_attn.o_proj", "attn.wo"), ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"), ("mlp.", "ffn."), ("gate_proj", "w1"),
    ("up_proj", "w3"), ("down_proj", "w2"), ("e_score_correction_bias", "bias")]
# HF DeepseekV3Config fields -> ModelArgs fields (dotted: a sub-config), read both ways.
HF_CONFIG = [
    ("vocab_size", "vocab_size"), ("hidden_size", "dim"), ("num_hidden_layers", "n_layers"),
    ("first_k_dense_replace", "n_dense_layers"), ("intermediate_size", "inter_dim"),
    ("max_position_embeddings", "max_seq_len"), ("rms_norm_eps", "norm_eps"),
    ("num_attention_heads", "mla.n_heads"), ("q_lora_rank", "mla.q_lora_rank"),
    ("kv_lora_rank", "mla.kv_lora_rank"), ("qk_nope_head_dim", "mla.qk_nope_head_dim"),
    ("qk_rope_head_dim", "mla.qk_rope_head_dim"), ("v_head_dim", "mla.v_head_dim"),
    ("moe_intermediate_size", "moe.moe_inter_dim"), ("n_routed_experts", "moe.n_routed_experts"),
    ("n_shared_experts", "moe.n_shared_experts"),
    ("num_experts_per_tok", "moe.n_activated_experts"), ("n_group", "moe.n_expert_groups"),
    ("topk_group", "moe.n_limited_groups"), ("routed_scaling_factor", "moe.route_scale")]
# HF writes "none" where we write these values (q_lora_rank 0: no low-rank query).
HF_NONE = {"q_lora_rank": 0, "n_group": 1, "topk_group": 1}
# transformers 4.x: a module per expert (5.x stacks them, as we do)
PER_EXPERT = re.compile(r"(.*experts)\.(\d+)\.(w\d)\.weight")


def check_hf_config(hf_model: nn.Module) -> None:
    """Raise ValueError naming any option of an HF DeepseekV3 config we do not implement."""
    c = hf_model.config
    rope = hf_rope(c)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for bad, option in [
            (c.tie_word_embeddings, "tie_word_embeddings=True (V3 has a separate output head)"),
            (c.attention_bias, "attention_bias=True (MLA's projections have no bias)"),
            (rope_type != "default",
             f"rope scaling {rope} (YaRN is not implemented: use rope_type 'default')"),
            (c.hidden_act != "silu",
             f"hidden_act={c.hidden_act!r} (the experts are SwiGLU: 'silu')"),
            (not c.norm_topk_prob, "norm_topk_prob=False (V3 normalises the sigmoid gate weights)"),
            (c.rms_norm_eps != 1e-6, f"rms_norm_eps={c.rms_norm_eps} (HF's q/kv norms keep 1e-6)"),
            (not hasattr(hf_model, "lm_head"), "model without lm_head (pass a "
                                               "DeepseekV3ForCausalLM)")]:
        if bad:
            raise ValueError(f"Transformer.from_hf: unsupported {option}")


def hf_rope(c) -> dict:
    """The RoPE settings of an HF config (transformers 5 names them rope_parameters)."""
    return dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})


def args_from_hf(c) -> ModelArgs:
    """ModelArgs equal to an HF DeepseekV3 config (no MTP modules, no stop ids)."""
    rope = hf_rope(c)
    kw = {"mla": {}, "moe": {}, "": {}}
    for theirs, ours in HF_CONFIG:
        sub, _, name = ours.rpartition(".")
        value = getattr(c, theirs)
        kw[sub][name] = HF_NONE.get(theirs, value) if value is None else value
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    mla = MLAConfig(**kw["mla"], rope_theta=theta)
    return ModelArgs(**kw[""], pad_id=c.pad_token_id or 0, mla=mla, moe=MoEConfig(**kw["moe"]),
                     mtp=MTPConfig(n_mtp_depth=0))


def our_name(hf_name: str) -> str:
    """The name of our tensor that holds HF's tensor hf_name."""
    for theirs, ours in HF_NAMES:
        hf_name = hf_name.replace(theirs, ours)
    return hf_name


def from_hf(cls, hf_model: nn.Module) -> Transformer:
    """Our model with the config and weights of a Hugging Face DeepseekV3ForCausalLM (float32, no
    MTP modules, no stop ids). Raises ValueError naming any config option we do not implement."""
    check_hf_config(hf_model)
    c = hf_model.config
    model = cls(args_from_hf(c))
    H = c.num_attention_heads
    dn = c.qk_nope_head_dim
    dr = c.qk_rope_head_dim
    kv = c.kv_lora_rank
    # HF's non-interleaved RoPE rotates pairs (x_i, x_i+d/2), ours (official) (x_2i, x_2i+1):
    # reorder the rope rows of the query and key projections
    rows = slice(None)
    if not getattr(c, "rope_interleave", True):
        rows = torch.arange(dr).view(2, -1).T.flatten()
    sd = {}
    for name, w in hf_model.state_dict().items():
        # n_shared_experts = 0: HF keeps empty Linears
        if w.numel() == 0:
            continue
        name = our_name(name)
        w = w.detach().float().clone()
        if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
            w.view(H, dn + dr, -1)[:, dn:] = w.view(H, dn + dr, -1)[:, dn:][:, rows]
        elif name.endswith("attn.wkv_a.weight"):
            w[kv:] = w[kv:][rows]
        m = PER_EXPERT.match(name)
        if name.endswith("experts.w13"):
            # [E, 2 inter, dim] = [gate; up]
            sd[name[:-2] + "1"], sd[name[:-2] + "3"] = w.chunk(2, dim=1)
        elif m:
            # stacked below
            sd.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = w
        else:
            sd[name] = w
    for k, v in sd.items():
        if isinstance(v, dict):
            sd[k] = torch.stack([v[i] for i in sorted(v)])
    model.load_state_dict(sd)
    return model


def import_transformers(purpose: str):
    """The transformers module, or a one-line exit: it is optional (not in requirements.txt)."""
    try:
        import transformers
    except ImportError:
        raise SystemExit(f"error: pip install transformers to {purpose} (it is optional)")
    return transformers


def hf_config(args: ModelArgs, **token_ids):
    """The DeepseekV3Config on which HF computes exactly our model. Raises ValueError naming what
    HF's DeepseekV3 cannot express. token_ids: bos/eos/pad_token_id."""
    transformers = import_transformers("export to Hugging Face")
    has_moe = args.n_layers > args.n_dense_layers
    for bad, option in [
            (has_moe and args.moe.score_func != "sigmoid",
             f"score_func={args.moe.score_func!r} (HF's DeepseekV3 router is sigmoid)"),
            (args.norm_eps != 1e-6, f"norm_eps={args.norm_eps} (HF's q/kv norms keep 1e-6)")]:
        if bad:
            raise ValueError(f"Transformer.to_hf: unsupported {option}")
    kw = {}
    for theirs, ours in HF_CONFIG:
        sub, _, name = ours.rpartition(".")
        kw[theirs] = getattr(getattr(args, sub) if sub else args, name)
    # HF reads q_lora_rank 0 as a low-rank query of rank 0: None is its "plain wq"
    kw["q_lora_rank"] = kw["q_lora_rank"] or None
    # the training-only settings (balance, bias_update_speed, the aux losses) do not change the
    # forward pass; rope_interleave=True is our (the official code's) pairing: no row reordering
    return transformers.DeepseekV3Config(
        **kw, num_key_value_heads=args.mla.n_heads, hidden_act="silu", norm_topk_prob=True,
        tie_word_embeddings=False, attention_bias=False, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": args.mla.rope_theta},
        num_mtp_layers=0, **token_ids)


@torch.no_grad()
def to_hf(self: Transformer, **token_ids) -> nn.Module:
    """A transformers DeepseekV3ForCausalLM with our config and weights (float32, eval mode): the
    inverse of Transformer.from_hf. The MTP modules are left out: transformers' DeepseekV3 has no
    MTP weights to load (the released V3 checkpoint stores them as an extra layer 61, which
    transformers skips), and they only train and draft, never change the next-token logits.
    Raises ValueError naming what HF cannot express. token_ids: bos/eos/pad_token_id for the
    config (pad defaults to our pad_id)."""
    transformers = import_transformers("export to Hugging Face")
    token_ids.setdefault("pad_token_id", self.args.pad_id)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(self.args, **token_ids)).float().eval()
    ours = {k: v.detach().float() for k, v in self.state_dict().items()}
    used = set()
    # 1. fill every HF tensor from the tensor of ours HF_NAMES names (empty ones: no shared expert)
    for name, w in hf.state_dict().items():
        if w.numel() == 0:
            continue
        mine = our_name(name)
        m = PER_EXPERT.match(mine)
        if mine.endswith("experts.w13"):
            # [E, 2 inter, dim] = [gate; up]
            parts = [mine[:-2] + "1", mine[:-2] + "3"]
            w.copy_(torch.cat([ours[p] for p in parts], dim=1))
        elif m:
            parts = [f"{m[1]}.{m[3]}"]
            w.copy_(ours[parts[0]][int(m[2])])
        else:
            parts = [mine]
            w.copy_(ours[mine])
        used.update(parts)
    # 2. everything of ours but the MTP modules must have gone somewhere
    left = [k for k in ours if k not in used and not k.startswith("mtp.")]
    if left:
        raise ValueError(f"Transformer.to_hf: no HF tensor for {left[:3]}")
    return hf


# Defined here, in the interop section, and attached as Transformer.from_hf and .to_hf (the
# documented names).
Transformer.from_hf = classmethod(from_hf)
Transformer.to_hf = to_hf


def bpe_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair tiktoken's BPE joins last to make token: token's bytes merged by lower ranks only
    (always the lowest-ranked adjacent pair first) until two parts are left."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if best >= rank:
            raise ValueError(f"token {token!r} is not reachable by merges of lower rank")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def hf_tokenizer(enc: tiktoken.Encoding, model_max_length: int | None = None):
    """Our tiktoken BPE as a transformers PreTrainedTokenizerFast that encodes and decodes
    identically: the same ranks as a byte-level BPE (merges recovered by bpe_merge, in rank
    order), the same PAT_STR split, the specials as added tokens with our ids."""
    transformers = import_transformers("export to Hugging Face")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    # 1. byte-level BPE: each byte is one printable character (GPT-2's table), as tokenizers wants
    byte_char = bytes_to_unicode()

    def chars(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    ranks = enc._mergeable_ranks
    vocab = {chars(t): r for t, r in ranks.items()}
    merges = [tuple(map(chars, bpe_merge(ranks, t)))
              for t in sorted(ranks, key=ranks.get) if len(t) > 1]
    # ignore_merges: a chunk that is a whole token is that token (as in tiktoken)
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    # 2. split like tiktoken's pat_str, then map bytes to characters (no regex of its own)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # 3. the specials, after the ranks, in our id order
    specials = sorted(enc._special_tokens, key=enc._special_tokens.get)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for s in specials:
        if tok.token_to_id(s) != enc._special_tokens[s]:
            raise ValueError(f"special token {s} would get id {tok.token_to_id(s)}, not "
                             f"{enc._special_tokens[s]}")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        model_max_length=model_max_length)


def is_hf_export(path: str) -> bool:
    """Whether path holds a previous export (a DeepseekV3 config.json), which may be replaced."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") == "deepseek_v3"
    except (OSError, ValueError):
        return False


def export_hf(model: Transformer, enc: tiktoken.Encoding, path: str) -> list[str]:
    """Write a Hugging Face folder that AutoModelForCausalLM and AutoTokenizer.from_pretrained
    load offline: config.json, model.safetensors, generation_config.json (greedy, stopping at our
    stop ids) and the tokenizer (hf_tokenizer). Refuses a non-empty folder that is not a previous
    export. Returns the files written."""
    transformers = import_transformers("export to Hugging Face")
    # 1. never overwrite a folder of something else
    if os.path.isdir(path) and os.listdir(path) and not is_hf_export(path):
        raise SystemExit(f"error: {path} is not empty and not a previous export: pass an empty "
                         f"or new folder")
    # 2. the model, its config carrying our special ids
    ids = {name: special_id(enc, tok) for name, tok in
           [("bos", "<|bos|>"), ("eos", "<|eos|>"), ("pad", "<|pad|>")]}
    stop = list(model.args.stop_ids) or [special_id(enc, "</answer>"), ids["eos"]]
    hf = model.to_hf(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    hf.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=stop, pad_token_id=ids["pad"], do_sample=False)
    # 3. write the model and the tokenizer
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path)
    hf_tokenizer(enc, model.args.max_seq_len).save_pretrained(path)
    return sorted(os.path.join(path, f) for f in os.listdir(path))


def export_main(cfg: Config) -> None:
    """--export-hf DIR: the checkpoint --ckpt (or <out>/ckpt.pt) as a Hugging Face folder."""
    path = cfg.train.ckpt or os.path.join(cfg.train.out, "ckpt.pt")
    model, enc, _, _ = load_checkpoint(path)
    try:
        written = export_hf(model.eval(), enc, cfg.train.export_hf)
    except ValueError as e:
        raise SystemExit(f"error: {path} cannot be exported: {e}")
    print(f"exported {path} to {cfg.train.export_hf}:")
    for f in written:
        print(f"  {os.path.basename(f):24s} {os.path.getsize(f):>10,d} bytes")


# ---- command line

# Sub-config fields that follow ModelArgs and so get no flag of their own.
DERIVED = {"dim", "max_seq_len", "norm_eps"}
# Set from the tokenizer, never by a flag.
FROM_TOKENIZER = {"vocab_size", "pad_id", "stop_ids"}


def field_help(cls) -> dict[str, str]:
    """Each dataclass field's description: the comment on its line in cls's source, else the
    comment lines just above it. The dataclass is the one place a flag is described."""
    helps = {}
    above = []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+=", s)
        # a field's trailing comment starts at two spaces and a '#' (no default holds that)
        trailing = s.partition("  #")[2].strip(" #")
        if m:
            helps[m[1]] = trailing or " ".join(above)
        above = []
    return helps


def add_flags(parser: argparse.ArgumentParser, dc, skip=()) -> None:
    """One flag per dataclass field (--n-layers for n_layers), recursing into sub-configs; each
    flag's help is the field's comment and its default, once."""
    helps = field_help(type(dc))
    for f in fields(dc):
        value = getattr(dc, f.name)
        flag = "--" + f.name.replace("_", "-")
        if is_dataclass(value):
            # sub-configs of ModelArgs follow its dim etc.: no flags for those
            add_flags(parser, value, DERIVED if isinstance(dc, ModelArgs) else ())
        elif f.name in skip or f.name in FROM_TOKENIZER:
            continue
        elif isinstance(value, bool):
            parser.add_argument(flag, dest=f.name, default=value,
                                action=argparse.BooleanOptionalAction,
                                help=f"{helps.get(f.name, '')} (default: {value})".strip())
        else:
            parser.add_argument(flag, dest=f.name, type=type(value), default=value,
                                help=f"{helps.get(f.name, '')} (default: {value!r})".strip())


def apply_flags(dc, args: argparse.Namespace, skip=()) -> None:
    for f in fields(dc):
        value = getattr(dc, f.name)
        if is_dataclass(value):
            apply_flags(value, args, DERIVED if isinstance(dc, ModelArgs) else ())
        elif f.name not in skip and hasattr(args, f.name):
            setattr(dc, f.name, getattr(args, f.name))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept; each flag's default shown once (add_flags writes it)."""

    def _get_help_string(self, action):
        return action.help or ""


def validate_config(cfg) -> None:
    cfg.validate()


def config_from_flags(cfg, argv: list[str] | None, description: str, check=validate_config):
    """Fill the dataclass cfg from flags generated from its fields; check(cfg) raising ValueError
    becomes argparse's one-line usage error. Shared by train, grpo and distill."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_flags(parser, cfg)
    apply_flags(cfg, parser.parse_args(argv))
    try:
        check(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def set_out_unless_given(cfg, argv: list[str], out: str) -> None:
    """Point cfg.out at `out` unless --out was passed: a variant run gets its own folder."""
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        cfg.out = out


def check_config(cfg: Config) -> None:
    cfg.model.__post_init__()
    cfg.model.mla.validate()
    cfg.model.moe.validate()
    tc = cfg.train
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_n", "max_digits",
                "eval_interval", "log_interval")
    for name in positive:
        if getattr(tc, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be positive (got {getattr(tc, name)})")
    if tc.world not in ("zero", "choice"):
        raise ValueError(f"--world {tc.world!r}: use 'zero' (R1-Zero's think-first world) or "
                         f"'choice' (think or answer directly)")
    shares = {"--work-frac": (tc.work_frac, 0 < tc.work_frac < 1)}
    for name in ("verify_frac", "word_frac", "switch_frac", "think_frac", "textbook_frac"):
        value = getattr(tc, name)
        shares["--" + name.replace("_", "-")] = (value, 0 <= value <= 1)
    for flag, (value, ok) in shares.items():
        if not ok:
            raise ValueError(f"{flag} {value}: a share, between 0 and 1 (--work-frac strictly)")
    if tc.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds --max-seq-len {cfg.model.max_seq_len}")
    # --sample and --export-hf only read --out
    writes_out = not (tc.sample or tc.export_hf)
    check_shared({"--lr": tc.lr, "--grad-clip": tc.grad_clip}, tc.threads, tc.device,
                 tc.out if writes_out else None)
    # the final evaluation's harder split writes one digit more than training
    width = tc.max_digits + 1
    need = 0 if tc.data else world_tokens_bound(width, tc.world, make_tokenizer(tc))
    if not tc.data and need > cfg.model.max_seq_len:
        raise ValueError(f"--max-digits {tc.max_digits}: the harder split's prompt + worked "
                         f"answer (width {width}) need up to {need} tokens, over --max-seq-len "
                         f"{cfg.model.max_seq_len}: lower --max-digits or raise --max-seq-len")


def parse_config(argv: list[str] | None = None) -> Config:
    """Config from flags. --tiny and --student choose the starting config whose values the other
    flags default to (and override)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--student", action="store_true")
    pre.add_argument("--tiny", action="store_true")
    pre.add_argument("--sample", default=None)
    known = pre.parse_known_args(argv)[0]
    # an empty --sample would otherwise start a training run over <out>'s files
    if known.sample is not None and not known.sample.strip():
        raise SystemExit('error: --sample needs a prompt (got an empty one), e.g. '
                         '--sample "123+456="')
    if known.tiny:
        cfg = tiny_config(student=known.student)
    elif known.student:
        cfg = student_config()
    else:
        cfg = Config()
    return config_from_flags(cfg, argv, __doc__, check_config)


def sample_main(cfg: Config) -> None:
    """--sample PROMPT: greedy and three T = 1 completions from <out>/ckpt.pt."""
    model, enc, ckpt_cfg, _ = load_checkpoint(os.path.join(cfg.train.out, "ckpt.pt"))
    model.eval()
    # --data models were trained without <|bos|>
    plain = cfg.train.sample.startswith("<|bos|>") or ckpt_cfg.train.data
    prompt = cfg.train.sample if plain else "<|bos|>" + cfg.train.sample
    g = torch.Generator().manual_seed(cfg.train.seed)
    n_prompt = len(encode(enc, prompt))
    # generate() holds prompt + new tokens within max_seq_len
    n_new = min(model.args.max_seq_len - n_prompt, 160)
    if n_new < 1:
        raise SystemExit(f"error: --sample's prompt is {n_prompt} tokens; this model holds "
                         f"{model.args.max_seq_len} (prompt + completion): shorten the prompt "
                         f"to at most {model.args.max_seq_len - 1} tokens")
    print(f"prompt: {prompt}")
    print(f"greedy : {generate_texts(model, enc, [prompt], n_new)[0]}")
    for r in generate_texts(model, enc, [prompt] * 3, n_new, temperature=1.0, generator=g):
        print(f"T=1    : {r}")


def interrupted_message(out: str, argv: list[str]) -> str:
    """What Ctrl-C prints: the last good checkpoint and the command that resumes from it."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        return f"interrupted before the first checkpoint: nothing saved in {out}"
    # the same flags again, minus the ones that would start afresh, plus --resume
    kept = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite")]
    if "--out" not in kept and not any(a.startswith("--out=") for a in kept):
        kept += ["--out", out]
    command = shlex.join(["python", "train.py", "--resume", *kept])
    return f"interrupted: the last good checkpoint is {ckpt_path}; resume with `{command}`"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.sample:
        return sample_main(cfg)
    if cfg.train.export_hf:
        return export_main(cfg)
    if cfg.train.bench:
        print(json.dumps(bench(cfg), indent=2))
        return
    if not (cfg.train.resume or cfg.train.overwrite):
        check_fresh_out(cfg.train.out, ("ckpt.pt", "metrics.jsonl"))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # before init: NCCL binds each process to its own GPU
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(cfg)
        # rank 0 still evaluates and saves: tearing gloo down under it aborts the other ranks
        if dist.is_initialized():
            dist.barrier()
    except KeyboardInterrupt:
        # Ctrl-C: one line naming what survives and how to go on, no traceback; 130 = SIGINT
        print(interrupted_message(cfg.train.out, sys.argv[1:] if argv is None else argv),
              file=sys.stderr, flush=True)
        raise SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
