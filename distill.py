"""Distillation beats RL for small models: DeepSeek-R1 §2.4 and §4.1 in miniature.

R1 fine-tuned small dense models (Qwen, Llama) on 800k samples written by DeepSeek-R1, SFT only, and
found (R1 Table 6) that the distilled Qwen-32B beats the same model trained with large-scale RL
(AIME 72.6% vs 47.0%). A small model rarely SAMPLES the good behaviour, so RL has little to
reinforce; a teacher shows it directly. The recipe:

    1. rejection sampling   the RL teacher answers training prompts; keep only correct,
                            well-formed responses (grpo's rules: format == 1 and accuracy == 1)
    2. sequence-level KD    SFT on the kept traces, loss on response tokens only (prompt masked):
                            L = -(1/|o|) sum_t log p_student(o_t | q, o_<t)       (what R1 did)
    3. token-level KD       the teacher's whole next-token distribution at each response position
                            (possible because both share one tokenizer):
                            L = T^2 (1/|o|) sum_t KL(softmax(z_t/T) || softmax(z_s/T)),
                            z_t, z_s the teacher's and student's logits at (q, o_<t)

The comparison, per seed, from one pretrained student (train.py's student_config: dense, no MoE,
no MTP, 0.41M parameters vs the teacher's 1.9M), at EQUAL NUMBER OF UPDATES (--updates steps):
    (a) the student base (pretraining only)
    (b) + GRPO (grpo.rl_train on the student: 16 prompts x G = 8 rollouts per update)
    (c) + distillation (SFT on teacher traces, --batch-size traces per update), and token-level KD
    (d) optional (--distill-rl-updates N, off by default): distillation, then low-lr GRPO
Held-out greedy accuracy, averaged over --seeds post-training seeds (RL sampling and trace order;
the student is pretrained once, --student-seed), with the spread. The teacher's figures beside.
Writes out/distill/: summary.json, table.md, distill.png.

    python distill.py                         # teacher out/grpo/ckpt.pt -> out/distill/
    python distill.py --seeds 1 --updates 20  # quicker

--recipe r1 runs DeepSeek-R1's own multi-stage recipe instead (R1 §2.3, arXiv 2501.12948 v1),
beside R1-Zero (--rl-init: grpo.py's run), every stage from the same base (--init):
    1. cold start (§2.3.1)       SFT of the base on --cold-start readable traces written by the
                                 world's rule (train.readable_solution: one notation, a summary)
    2. reasoning RL (§2.3.2)     grpo.rl_train with accuracy + format + language consistency (the
                                 share of columns in the prompt's notation), summed as R1 does
    3. rejection sampling (§2.3.3) stage 2 answers --rs-prompts; keep_trace keeps the right,
                                 well-formed, single-notation, not over-long ones; SFT of the BASE
                                 on them (R1 fine-tunes V3-Base; its ~200k non-reasoning samples
                                 have no counterpart here)
    4. final RL (§2.3.4)         grpo.rl_train on the rule rewards (R1's helpfulness and
                                 harmlessness reward models have no counterpart here)
The SFT loss and the filter are distillation's, the RL loop is grpo.py's: each exists once.
Writes out/r1/: summary.json, table.md, r1.png, and <stage>/ckpt.pt for every stage.

    python distill.py --recipe r1             # out/pretrain + out/grpo -> out/r1/
    python distill.py --recipe r1 --ablate    # + stage 2 without the consistency reward
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import grpo
import train

METHODS = ("student_base", "student_rl", "student_distill", "student_token_kd",
           "student_distill_rl")
LABELS = {"student_base": "(a) student base",
          "student_rl": "(b) student + GRPO",
          "student_distill": "(c) student + distillation (SFT)",
          "student_token_kd": "(c') student + token-level KD",
          "student_distill_rl": "(d) distillation, then GRPO"}


@dataclass
class DistillConfig:
    teacher: str = "out/grpo/ckpt.pt"  # the RL teacher's checkpoint (python grpo.py writes it)
    student: str = ""             # a pretrained student checkpoint; "" = pretrain one here
    out: str = "out/distill"      # output folder: summary.json, table.md, distill.png
    overwrite: bool = False       # replace an earlier run's files in --out (else it refuses)
    seeds: int = 3                # post-training seeds (RL sampling, trace order)
    student_seed: int = 0         # the student's pretraining seed
    student_steps: int = 600      # pretraining steps of the student
    trace_prompts: int = 1024     # training prompts the teacher answers
    trace_samples: int = 2        # teacher samples per prompt (rejection sampling keeps right ones)
    trace_temperature: float = 0.6  # the teacher's sampling temperature
    updates: int = 40             # optimizer updates of (b), (c) and (c'): equal student compute
    batch_size: int = 128         # traces per distillation update (= GRPO's 16 x G = 8 rollouts)
    lr: float = 1e-3              # distillation lr (AdamW, constant after 5 warm-up steps)
    kd_temperature: float = 1.0   # the softening T of token-level KD
    rl_lr: float = 3e-4           # GRPO on the student (b): the best of a sweep, see the README
    distill_rl_updates: int = 0   # (d): GRPO updates after distillation (0 = skip)
    distill_rl_lr: float = 3e-5   # (d)'s lr: low, a high lr undoes what distillation taught
    n: int = 200                  # held-out evaluation problems
    threads: int = 0              # CPU threads (0 = torch's default)
    device: str = "auto"          # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    recipe: str = "distill"       # distill: the comparison above | r1: R1's multi-stage recipe
    init: str = "out/pretrain/ckpt.pt"  # r1: the base checkpoint (V3-Base's part)
    rl_init: str = "out/grpo"     # r1: an R1-Zero run (grpo.py's folder) to compare; '' = run one
    zero_steps: int = 40          # r1 with --rl-init '': R1-Zero's RL steps
    cold_start: int = 512         # r1: readable traces of the cold start, written by the rule
    sft_updates: int = 40         # r1: SFT updates of the cold start and of stage 3
    sft_batch_size: int = 32      # r1: traces per SFT update
    rl_steps: int = 10            # r1: steps of each RL stage (reasoning RL, final RL)
    consistency_weight: float = 1.0  # r1: the language-consistency reward's weight (R1: summed)
    final_consistency: bool = False  # r1: keep the consistency reward in the final RL too
    ablate: bool = False          # r1: also run reasoning RL without the consistency reward
    rs_prompts: int = 512         # r1: stage 3 samples these prompts --trace-samples times
    k: int = 2                    # r1: T = 1 samples per held-out problem (consistency, mixing)
    seed: int = 0                 # r1: seeds the RL sampling, the problems and the trace order
    sizes: int = 0                # the distilled family: the first K of FAMILY (0 = the comparison)
    on_policy_prompts: int = 16   # family: prompts per on-policy update (x G = 8 student samples)
    only_seeds: str = ""          # family: run just these seeds (comma list), e.g. one per process
    resume: bool = False          # family: keep the finished (size, seed) cells already in --out

    def validate(self) -> None:
        counts = (self.seeds, self.updates, self.batch_size, self.trace_prompts,
                  self.trace_samples, self.n, self.zero_steps, self.cold_start, self.sft_updates,
                  self.sft_batch_size, self.rl_steps, self.rs_prompts, self.k)
        if min(counts) < 1:
            raise ValueError("seeds, updates, batch_size, trace_prompts, trace_samples, n, "
                             "zero_steps, cold_start, sft_updates, sft_batch_size, rl_steps, "
                             "rs_prompts and k must be >= 1")
        if not 0 <= self.sizes <= len(FAMILY):
            raise ValueError(f"sizes must be 0 (the comparison) to {len(FAMILY)}, got {self.sizes}")
        if self.on_policy_prompts < 1:
            raise ValueError("on_policy_prompts must be >= 1")
        family_seeds(self)
        if self.recipe not in ("distill", "r1"):
            raise ValueError(f"recipe must be 'distill' or 'r1', got {self.recipe!r}")
        if not self.consistency_weight >= 0:
            raise ValueError("consistency_weight must be >= 0")
        if not self.trace_temperature >= 0:
            raise ValueError("trace_temperature must be >= 0")
        rates = {"--lr": self.lr, "--rl-lr": self.rl_lr, "--distill-rl-lr": self.distill_rl_lr,
                 "--kd-temperature": self.kd_temperature}
        train.check_shared(rates, self.threads, self.device, self.out)


# ---- teacher traces


def keep_trace(text: str, target: int, notation: str | None = None, n_tokens: int = 0,
               max_tokens: int = 0) -> bool:
    """Rejection sampling's filter: the response is well-formed (grpo.format_reward) AND its answer
    is right (grpo.accuracy_reward). Both are rules that parse the text; nothing is executed.
    R1's own filter (§2.3.3) also drops mixed-language and long traces: with `notation`, every
    worked column must be in it (and one at least); with max_tokens, n_tokens must not exceed it."""
    if notation is not None:
        trace = train.parse_trace(text)
        if trace["worked"] == 0 or trace["notations"].count(notation) != trace["worked"]:
            return False
    if max_tokens and n_tokens > max_tokens:
        return False
    ### BEGIN SOLUTION: rejection sampling: keep well-formed AND correct (R1 §2.3.3)
    return grpo.format_reward(text) == 1.0 and grpo.accuracy_reward(text, target) == 1.0
    ### END SOLUTION


@torch.no_grad()
def teacher_traces(teacher: train.Transformer, enc, problems: list[tuple[int, int]], width: int,
                   samples: int, temperature: float, seed: int = 0, chunk: int = 256,
                   world: str = "zero", notation: str | None = None, max_tokens: int = 0
                   ) -> tuple[grpo.Rollout, dict]:
    """The teacher answers every problem `samples` times; keep_trace filters (notation and
    max_tokens: R1's stricter filter). Returns the kept rows as a grpo.Rollout (tokens [N, T]
    right-padded, mask [N, T-1] on response tokens, group_ids the problem's index) and counts,
    with the teacher's generated tokens in all and per problem (tokens_by_prompt)."""
    g = torch.Generator(device=next(teacher.parameters()).device).manual_seed(seed)
    n_new = train.max_response_tokens(width, world, enc)
    kept = []
    n_generated = 0
    # the teacher's generated tokens per prompt: its sampling compute (family's counters)
    tokens_by_prompt = [0] * len(problems)
    # 1. sample in chunks, keeping the rows that pass the filter
    for i in range(0, len(problems), chunk):
        part = problems[i:i + chunk]
        ro = grpo.rollout(teacher, enc, grpo.template(part, width, world),
                          [a + b for a, b in part],
                          samples, temperature, n_new, generator=g)
        for j, (text, target) in enumerate(zip(ro.texts, ro.targets)):
            prompt = i + j // samples
            tokens_by_prompt[prompt] += len(ro.ids[j])
            n_tokens = len(ro.ids[j]) if max_tokens else 0
            if keep_trace(text, target, notation, n_tokens, max_tokens):
                kept.append((ro.tokens[j], ro.mask[j], text, target, prompt))
        n_generated += len(ro.texts)
    if not kept:
        raise SystemExit(f"error: rejection sampling kept none of the teacher's {n_generated} "
                         f"samples (none right and well-formed): train the teacher further "
                         f"(python grpo.py), or raise --trace-prompts / --trace-samples")
    # 2. align the chunks, each padded to its own length: F.pad to T (a negative pad crops)
    T = max(int(k[1].nonzero().max()) + 2 for k in kept)               # last response token + 1
    pad = teacher.args.pad_id
    tokens = torch.stack([F.pad(k[0], (0, T - len(k[0])), value=pad) for k in kept])
    mask = torch.stack([F.pad(k[1], (0, T - 1 - len(k[1]))) for k in kept])
    texts = [k[2] for k in kept]
    stats = {"n_traces_generated": n_generated, "n_traces_kept": len(kept),
             "think_rate_kept": grpo.mean_of(grpo.thinks, texts),
             "teacher_sample_tokens": sum(tokens_by_prompt), "tokens_by_prompt": tokens_by_prompt}
    # group_ids: the problem each kept trace answers (the family's smaller trace pools)
    traces = grpo.Rollout(tokens, mask, torch.tensor([k[4] for k in kept]),
                          torch.ones(len(kept)), texts, [k[3] for k in kept], 0.0)
    return traces, stats


# ---- the distillation losses: SFT, token-level KD, on-policy reverse KL


def response_logits(model: train.Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Main-head logits predicting tokens[:, 1:] (MTP modules ignored): [N, T] -> [N, T-1, V]."""
    return model.logits(model.forward_hidden(tokens[:, :-1], mode="naive")).float()


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level KD = SFT: mean NLL of the response tokens; prompt and padding positions
    (mask 0) contribute nothing. logits [N, T-1, V] predict tokens[:, 1:]; mask [N, T-1]."""
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")   # [N, T-1]
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Token-level KD (Hinton et al. 2015): T^2 x mean over response positions of
    KL(softmax(z_t/T) || softmax(z_s/T)). 0 iff the distributions agree at every masked position,
    > 0 otherwise. student_logits, teacher_logits [N, T-1, V]; mask [N, T-1]."""
    log_s = (student_logits / temperature).log_softmax(-1)
    log_t = (teacher_logits / temperature).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)                                    # [N, T-1]
    return temperature ** 2 * (kl * mask).sum() / mask.sum().clamp_min(1)


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation's loss: the mean over response positions of the REVERSE KL
    KL(p_student || p_teacher), over the whole vocabulary, at prefixes the student sampled itself.
    Mode-seeking (the student is pushed off tokens the teacher finds unlikely) and reward-free.
    0 iff the distributions agree at every masked position. student_logits, teacher_logits
    [N, T-1, V]; mask [N, T-1] (1 on the response, 0 on prompt and padding)."""
    log_s = student_logits.log_softmax(-1)
    log_t = teacher_logits.log_softmax(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)                                    # [N, T-1]
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def on_policy_distill(student: train.Transformer, teacher: train.Transformer, enc,
                      problems: list[tuple[int, int]], width: int, updates: int, n_prompts: int,
                      G: int, lr: float, seed: int = 0, world: str = "zero",
                      on_update=None) -> dict:
    """On-policy distillation, in place: each update the student samples G responses (T = 1) to
    n_prompts of the problems, the teacher scores every one of those tokens in one forward pass
    (no teacher sampling, no reward), and one AdamW step lowers reverse_kl_loss. Returns the
    losses and the compute counters: teacher_samples (0), teacher_forward_rows and
    teacher_forward_tokens (response tokens the teacher scored), student_samples.
    on_update(update, counters), if given, is called after every update (the family's curve)."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(f"on-policy-{seed}")
    gen = torch.Generator().manual_seed(seed)
    n_new = train.max_response_tokens(width, world, enc)
    counters = {"teacher_samples": 0, "teacher_forward_rows": 0, "teacher_forward_tokens": 0,
                "student_samples": 0}
    losses = []
    for step in range(updates):
        # 1. the student's own samples (no reward: the teacher's distribution is the signal)
        batch = [problems[rng.randrange(len(problems))] for _ in range(n_prompts)]
        prompts = [train.prompt_text(a, b, width, world) for a, b in batch]
        ro = grpo.rollout(student, enc, prompts, [a + b for a, b in batch], G, 1.0, n_new,
                          reward_fn=no_reward, generator=gen)
        # 2. the teacher's distribution at every sampled prefix, one forward pass, then the loss
        with torch.no_grad():
            teacher_logits = response_logits(teacher, ro.tokens)
        student.train()
        loss = reverse_kl_loss(response_logits(student, ro.tokens), teacher_logits, ro.mask)
        # 3. one AdamW step after a 5-step warm-up
        losses.append(warm_step(opt, loss, student, lr, step))
        counters["teacher_forward_rows"] += len(ro.tokens)
        counters["teacher_forward_tokens"] += int(ro.mask.sum())
        counters["student_samples"] += len(ro.tokens)
        if on_update is not None:
            on_update(step + 1, counters)
    return {"losses": losses, **counters}


def warm_step(opt, loss: torch.Tensor, model: torch.nn.Module, lr: float, step: int) -> float:
    """One AdamW step on loss, lr warmed up linearly over the first 5 steps, gradients clipped at
    norm 1 (both distillation loops). Returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / 5)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def no_reward(text: str, target: int) -> float:
    """On-policy distillation needs no reward: rollout() is given this one."""
    return 0.0


def distill_train(student: train.Transformer, traces: grpo.Rollout, cfg: DistillConfig,
                  mode: str = "seq", teacher: train.Transformer | None = None, seed: int = 0,
                  counters: dict | None = None) -> list[float]:
    """cfg.updates AdamW steps on minibatches of traces (shuffled epochs), in place. mode "seq":
    sft_loss; "token": kd_loss against the teacher's logits on the same traces. Returns the loss
    of every update. counters, if given (teacher_forward_rows, teacher_forward_tokens), adds
    the teacher's forward passes of "token": its rows and the response tokens it scored."""
    if mode not in ("seq", "token") or (mode == "token" and teacher is None):
        raise ValueError(f"mode must be 'seq' or 'token' (token needs the teacher), got {mode!r}")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    student.train()
    for step in range(cfg.updates):
        # 1. the next minibatch of a shuffled pass over the traces, padding columns trimmed
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(traces.tokens), generator=g)])
        idx = order[:cfg.batch_size]
        order = order[cfg.batch_size:]
        mask = traces.mask[idx]
        T = int(mask.nonzero()[:, 1].max()) + 2
        tokens = traces.tokens[idx][:, :T]
        mask = mask[:, :T - 1]
        # 2. the loss: SFT on the trace, or KL to the teacher's distribution at each position
        logits = response_logits(student, tokens)
        if mode == "seq":
            loss = sft_loss(logits, tokens, mask)
        else:
            with torch.no_grad():
                teacher_logits = response_logits(teacher, tokens)
            loss = kd_loss(logits, teacher_logits, mask, cfg.kd_temperature)
            if counters is not None:
                counters["teacher_forward_rows"] += len(idx)
                counters["teacher_forward_tokens"] += int(mask.sum())
        # 3. one AdamW step after a 5-step warm-up
        losses.append(warm_step(opt, loss, student, cfg.lr, step))
    return losses


# ---- the comparison


def trainable_copy(model: train.Transformer) -> train.Transformer:
    return grpo.frozen_copy(model).train().requires_grad_(True)


def pretrained_student(cfg: DistillConfig, teacher_cfg: train.Config, seed: int, device: str,
                       scfg: train.Config | None = None, out: str = ""):
    """--student CKPT, or pretrain one on the teacher's world with seed `seed`: scfg's model
    (default train.py's student_config) in `out` (default --out/student).
    Returns (model, tokenizer, Config)."""
    if cfg.student:
        model, enc, scfg, _ = train.load_checkpoint(cfg.student, device)
        return model, enc, scfg
    scfg = scfg or train.student_config(teacher_cfg)
    scfg.train = dataclasses.replace(scfg.train, steps=cfg.student_steps,
                                     eval_interval=cfg.student_steps, seed=seed, eval_n=cfg.n,
                                     resume=False, fp8=False, compile=False, device=device,
                                     out=out or os.path.join(cfg.out, "student"))
    train.train(scfg)
    model, enc, _, _ = train.load_checkpoint(os.path.join(scfg.train.out, "ckpt.pt"), device)
    return model, enc, scfg


def student_rl(model: train.Transformer, enc, scfg: train.Config, steps: int, lr: float, n: int,
               seed: int, eval_interval: int = 0, out_dir: str | None = None) -> dict:
    """grpo.py's own training loop on the student, in place: its defaults except steps and lr
    (held-out evaluations every eval_interval steps, default only at the end; out_dir keeps
    metrics.jsonl). Returns rl_train's summary (held-out accuracy before and after)."""
    g = grpo.GRPOConfig(steps=steps, lr=lr, n=n, pass_k=1, eval_interval=eval_interval or steps,
                        bench_prompts=0, seed=seed)
    return grpo.rl_train(model, enc, g, out_dir, scfg, verbose=False)


def pick(summary: dict, when: str) -> dict:
    """accuracy, think_rate and length of an rl_train summary, 'before' or 'after'."""
    return {k: summary[f"{k}_{when}"] for k in ("accuracy", "think_rate", "length")}


def one_seed(cfg: DistillConfig, teacher: train.Transformer, enc, traces: grpo.Rollout,
             student: train.Transformer, scfg: train.Config, seed: int) -> dict:
    """(a)-(d) from the pretrained student; `seed` drives RL sampling and the order of the traces.
    Returns {method: {accuracy, think_rate, length, seconds}}."""
    width = scfg.train.max_digits
    heldout = train.eval_split("heldout", cfg.n, width)
    torch.manual_seed(seed)
    out = {}

    def say(m: str) -> None:
        print(f"  seed {seed} | {LABELS[m]:34s} accuracy {out[m]['accuracy']:.3f} | "
              f"think rate {out[m]['think_rate']:.2f} | {out[m]['seconds']:.0f}s", flush=True)

    # 1. (a) and (b): the base, and GRPO on the student
    t = time.time()
    rl = student_rl(trainable_copy(student), enc, scfg, cfg.updates, cfg.rl_lr, cfg.n, seed)
    out["student_base"] = {**pick(rl, "before"), "seconds": 0.0}
    out["student_rl"] = {**pick(rl, "after"), "seconds": time.time() - t}
    say("student_base")
    say("student_rl")
    # 2. (c) and (c'): SFT on the traces, token-level KD; (d) GRPO after SFT if asked
    for method, mode in (("student_distill", "seq"), ("student_token_kd", "token")):
        t = time.time()
        model = trainable_copy(student)
        losses = distill_train(model, traces, cfg, mode, teacher, seed)
        seconds = time.time() - t
        ev = grpo.evaluate_policy(model, enc, heldout, width, k=1, seed=seed,
                                  world=scfg.train.world)
        out[method] = {"accuracy": ev["accuracy"], "think_rate": ev["think_rate"],
                       "length": ev["mean_length"], "seconds": seconds, "final_loss": losses[-1]}
        say(method)
        if mode == "seq" and cfg.distill_rl_updates:
            t = time.time()
            rl = student_rl(model, enc, scfg, cfg.distill_rl_updates, cfg.distill_rl_lr, cfg.n,
                            seed)
            out["student_distill_rl"] = {**pick(rl, "after"), "seconds": seconds + time.time() - t}
            say("student_distill_rl")
    return out


def summarize(per_seed: list[dict], teacher_ev: dict, trace_stats: dict, cfg: DistillConfig,
              wall: float) -> dict:
    """Flat summary: <method>_accuracy (mean over seeds), _std, _min, _max, _by_seed,
    _think_rate, _length, _seconds."""
    s = {"teacher_accuracy": teacher_ev["accuracy"], "teacher_think_rate": teacher_ev["think_rate"],
         "teacher_length": teacher_ev["mean_length"]}
    for m in (m for m in METHODS if m in per_seed[0]):
        acc = [r[m]["accuracy"] for r in per_seed]
        s[f"{m}_accuracy"] = statistics.mean(acc)
        s[f"{m}_accuracy_std"] = statistics.pstdev(acc)
        s[f"{m}_accuracy_min"] = min(acc)
        s[f"{m}_accuracy_max"] = max(acc)
        s[f"{m}_accuracy_by_seed"] = acc
        for key in ("think_rate", "length", "seconds"):
            s[f"{m}_{key}"] = statistics.mean(r[m][key] for r in per_seed)
    s["distill_minus_rl"] = s["student_distill_accuracy"] - s["student_rl_accuracy"]
    s["distill_over_teacher"] = s["student_distill_accuracy"] / max(s["teacher_accuracy"], 1e-9)
    s.update(**trace_stats, seeds=len(per_seed), updates=cfg.updates, batch_size=cfg.batch_size,
             distill_rl_updates=cfg.distill_rl_updates, rl_lr=cfg.rl_lr, lr=cfg.lr,
             wall_seconds=wall)
    return s


def table(s: dict) -> str:
    """The comparison as a markdown table (printed and saved as table.md)."""
    rows = ["| model | held-out accuracy (greedy) | spread over seeds | think rate | length |",
            "|---|---|---|---|---|",
            f"| teacher (GRPO checkpoint) | {s['teacher_accuracy']:.3f} | - | "
            f"{s['teacher_think_rate']:.2f} | {s['teacher_length']:.0f} |"]
    for m in (m for m in METHODS if f"{m}_accuracy" in s):
        rows.append(f"| {LABELS[m]} | {s[m + '_accuracy']:.3f} ± {s[m + '_accuracy_std']:.3f} | "
                    f"{s[m + '_accuracy_min']:.3f}-{s[m + '_accuracy_max']:.3f} | "
                    f"{s[m + '_think_rate']:.2f} | {s[m + '_length']:.0f} |")
    return "\n".join(rows)


def plot(s: dict, path: str) -> None:
    """Bar chart: mean accuracy per method with each seed as a dot; the teacher as a dashed line.
    A bare Figure, not pyplot: saving a file must not switch a notebook's backend."""
    from matplotlib.figure import Figure
    methods = [m for m in METHODS if f"{m}_accuracy" in s]
    x = range(len(methods))
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    colors = ["#999", "#d62728", "#2ca02c", "#98df8a", "#1f77b4"][:len(methods)]
    ax.bar(x, [s[m + "_accuracy"] for m in methods],
           yerr=[s[m + "_accuracy_std"] for m in methods], color=colors, capsize=4)
    for i, m in enumerate(methods):
        ax.plot([i] * s["seeds"], s[m + "_accuracy_by_seed"], "k.", alpha=0.6)
    ax.axhline(s["teacher_accuracy"], ls="--", color="k",
               label=f"teacher {s['teacher_accuracy']:.2f}")
    names = [LABELS[m].split(" ", 1)[1].replace("student + ", "+ ") for m in methods]
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylim=(0, 1.02), ylabel="held-out accuracy (greedy)",
           title=f"small dense student, {s['updates']} updates each, {s['seeds']} seeds")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: DistillConfig) -> dict:
    """The whole comparison; writes summary.json, table.md, distill.png to cfg.out."""
    cfg.validate()
    t0 = time.time()
    device = train.pick_device(cfg.device)
    # 1. the teacher, and its held-out figures
    teacher, enc, teacher_cfg, _ = train.load_checkpoint(cfg.teacher, device)
    teacher.eval().requires_grad_(False)
    os.makedirs(cfg.out, exist_ok=True)
    width = teacher_cfg.train.max_digits
    heldout = train.eval_split("heldout", cfg.n, width)
    world = teacher_cfg.train.world
    teacher_ev = grpo.evaluate_policy(teacher, enc, heldout, width, k=1, world=world)
    print(f"teacher {cfg.teacher}: held-out accuracy {teacher_ev['accuracy']:.3f}, think rate "
          f"{teacher_ev['think_rate']:.2f}", flush=True)
    # 2. rejection sampling on training prompts (never a held-out one)
    excluded = set(train.eval_split("heldout", max(cfg.n, teacher_cfg.train.eval_n), width))
    rng = random.Random("distill-traces")
    problems = grpo.training_problems(rng, cfg.trace_prompts, width, excluded)
    traces, trace_stats = teacher_traces(teacher, enc, problems, width, cfg.trace_samples,
                                         cfg.trace_temperature, world=world)
    print(f"rejection sampling: kept {trace_stats['n_traces_kept']} of "
          f"{trace_stats['n_traces_generated']} teacher samples (T = {cfg.trace_temperature}) | "
          f"{time.time() - t0:.0f}s", flush=True)
    # per-problem counts serve the family's smaller trace pools, not this summary
    trace_stats.pop("tokens_by_prompt")
    # 3. the student (same tokenizer as the teacher), then every method per seed
    student, student_enc, scfg = pretrained_student(cfg, teacher_cfg, cfg.student_seed, device)
    if train.tokenizer_state(student_enc) != train.tokenizer_state(enc):
        raise SystemExit("error: the student's tokenizer differs from the teacher's: traces and "
                         "token-level KD need one tokenizer; pretrain the student on the "
                         "teacher's world (omit --student)")
    per_seed = [one_seed(cfg, teacher, enc, traces, student, scfg, seed)
                for seed in range(cfg.seeds)]
    # 4. the files
    s = summarize(per_seed, teacher_ev, trace_stats, cfg, time.time() - t0)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(table(s) + "\n")
    plot(s, os.path.join(cfg.out, "distill.png"))
    return s


# ---- the distilled family (--sizes K): R1 Table 5 in miniature

# Dense students (no MoE, no MTP), smallest first: dim, layers, MLA heads, d_c, qk_nope, qk_rope,
# v head dims, FFN width. "0.4M" is train.student_config itself, the comparison's student.
FAMILY = {"0.15M": (64, 2, 4, 32, 16, 8, 16, 192),
          "0.4M": (96, 3, 4, 48, 24, 8, 24, 288),
          "1M": (128, 4, 4, 64, 32, 8, 32, 448)}
FAMILY_METHODS = ("base", "rl", "rl_3x", "sft", "kd", "on_policy", "distill_rl")
FAMILY_LABELS = {"base": "base", "rl": "+ RL", "rl_3x": "+ RL, 3x updates", "sft": "+ SFT",
                 "kd": "+ token KD", "on_policy": "+ on-policy", "distill_rl": "+ SFT, then RL"}
DISTILLATION = ("sft", "kd", "on_policy")
# the equal-teacher-compute curve: SFT on the traces of the first fraction of the teacher's
# prompts, and on-policy distillation evaluated after these updates (and after the last)
POOL_FRACTIONS = (0.125, 0.25, 0.5)
ON_POLICY_EVALS = (5, 10, 20)
# student samples per prompt in on-policy distillation: GRPO's G, so an update sees 128 rows
ON_POLICY_G = 8


def family_config(teacher_cfg: train.Config, size: str) -> train.Config:
    """The student Config of one FAMILY size: train.student_config with its model resized."""
    dim, layers, heads, d_c, d_nope, d_rope, d_v, inter = FAMILY[size]
    scfg = train.student_config(teacher_cfg)
    mla = dataclasses.replace(scfg.model.mla, n_heads=heads, kv_lora_rank=d_c,
                              qk_nope_head_dim=d_nope, qk_rope_head_dim=d_rope, v_head_dim=d_v)
    scfg.model = dataclasses.replace(scfg.model, dim=dim, n_layers=layers, n_dense_layers=layers,
                                     inter_dim=inter, mla=mla)
    return scfg


def family_seeds(cfg: DistillConfig) -> list[int]:
    """--only-seeds as a list (default: every seed, range(--seeds)); ValueError on a bad one."""
    if not cfg.only_seeds:
        return list(range(cfg.seeds))
    try:
        seeds = [int(x) for x in cfg.only_seeds.split(",")]
    except ValueError:
        raise ValueError(f"only_seeds must be a comma list of seeds, got {cfg.only_seeds!r}"
                         ) from None
    if not all(0 <= x < cfg.seeds for x in seeds):
        raise ValueError(f"only_seeds must lie in 0..{cfg.seeds - 1} (--seeds {cfg.seeds})")
    return seeds


def teacher_compute(samples: int = 0, sample_tokens: int = 0, rows: int = 0,
                    tokens: int = 0) -> dict:
    """A method's teacher compute: sequences it sampled and the tokens it generated, rows and
    response tokens it scored in forward passes; teacher_tokens adds both kinds of tokens (a
    generated token costs one cached forward step, about what a scored token costs)."""
    return {"teacher_samples": samples, "teacher_sample_tokens": sample_tokens,
            "teacher_forward_rows": rows, "teacher_forward_tokens": tokens,
            "teacher_tokens": sample_tokens + tokens}


def trace_pool(traces: grpo.Rollout, n_problems: int) -> grpo.Rollout:
    """The kept traces of the first n_problems problems (group_ids is each trace's problem)."""
    rows = (traces.group_ids < n_problems).nonzero()[:, 0].tolist()
    return grpo.Rollout(traces.tokens[rows], traces.mask[rows], traces.group_ids[rows],
                        traces.rewards[rows], [traces.texts[i] for i in rows],
                        [traces.targets[i] for i in rows], 0.0)


def write_json(path: str, obj) -> None:
    """Atomic: a temp file, then a rename (a killed run never leaves half a cell)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def family_cell(cfg: DistillConfig, teacher: train.Transformer, enc, teacher_cfg: train.Config,
                size: str, seed: int, device: str, folder: str) -> dict:
    """One (size, seed) cell: pretrain the student with `seed`, sample the teacher's traces with
    `seed`, then every method from that one student. Returns {size, seed, params, methods:
    {method: held-out accuracy, think_rate, length, seconds, updates, teacher compute}, curve}."""
    width = teacher_cfg.train.max_digits
    world = teacher_cfg.train.world
    heldout = train.eval_split("heldout", cfg.n, width)
    t_cell = time.time()
    methods = {}
    curve = {"sft": [], "on_policy": []}

    def held_out(model: train.Transformer) -> dict:
        ev = grpo.evaluate_policy(model, enc, heldout, width, k=1, seed=seed, world=world,
                                  modes=("greedy",))
        return {"accuracy": ev["accuracy"], "think_rate": ev["think_rate"],
                "length": ev["mean_length"]}

    def record(method: str, figures: dict, seconds: float, updates: int, compute: dict) -> None:
        methods[method] = {**figures, "seconds": seconds, "updates": updates, **compute}
        print(f"  {size} seed {seed} | {FAMILY_LABELS[method]:17s} accuracy "
              f"{figures['accuracy']:.3f} | teacher tokens {compute['teacher_tokens']:,} | "
              f"{seconds:.0f}s | cell {time.time() - t_cell:.0f}s", flush=True)

    # 1. the student of this size, pretrained with this seed (its spread is in the figures)
    torch.manual_seed(seed)
    scfg = family_config(teacher_cfg, size)
    student, _, scfg = pretrained_student(cfg, teacher_cfg, seed, device, scfg,
                                          os.path.join(folder, "student"))
    params = sum(p.numel() for p in student.parameters())
    # 2. rejection sampling with this seed: the prompts and the teacher's samples
    excluded = set(train.eval_split("heldout", max(cfg.n, teacher_cfg.train.eval_n), width))
    rng = random.Random(f"distill-traces-{seed}")
    problems = grpo.training_problems(rng, cfg.trace_prompts, width, excluded)
    traces, stats = teacher_traces(teacher, enc, problems, width, cfg.trace_samples,
                                   cfg.trace_temperature, seed=seed, world=world)
    sampled = teacher_compute(stats["n_traces_generated"], stats["teacher_sample_tokens"])
    # 3. the base, RL at the same updates and at 3x: one run of 3x, evaluated every --updates
    rl_dir = os.path.join(folder, "rl")
    student_rl(trainable_copy(student), enc, scfg, 3 * cfg.updates, cfg.rl_lr, cfg.n, seed,
               eval_interval=cfg.updates, out_dir=rl_dir)
    with open(os.path.join(rl_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in rows if "heldout_accuracy" in r}
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    for method, step in (("base", 0), ("rl", cfg.updates), ("rl_3x", 3 * cfg.updates)):
        figures = {key: evals[step][f"heldout_{name}"]
                   for key, name in (("accuracy", "accuracy"), ("think_rate", "think_rate"),
                                     ("length", "mean_length"))}
        seconds = elapsed.get(step, 0.0) if step else 0.0
        record(method, figures, seconds, step, teacher_compute())
    curve["rl"] = [{"updates": s, "accuracy": r["heldout_accuracy"], "teacher_tokens": 0}
                   for s, r in evals.items()]
    # 4. SFT on every kept trace, and on the smaller pools of the equal-compute curve
    for fraction in POOL_FRACTIONS + (1.0,):
        t = time.time()
        n_problems = int(fraction * len(problems))
        pool = trace_pool(traces, n_problems)
        if not len(pool.tokens):
            # a tiny run's smallest pool may keep nothing: no point on the curve
            continue
        model = trainable_copy(student)
        distill_train(model, pool, cfg, "seq", seed=seed)
        seconds = time.time() - t
        figures = held_out(model)
        compute = teacher_compute(n_problems * cfg.trace_samples,
                                  sum(stats["tokens_by_prompt"][:n_problems]))
        curve["sft"].append({"prompts": n_problems, "traces": len(pool.tokens),
                             "accuracy": figures["accuracy"], **compute})
        if fraction == 1.0:
            record("sft", figures, seconds, cfg.updates, compute)
            sft_model = model
            sft_compute = compute
    # 5. token-level KD on every kept trace: the teacher also scores each minibatch
    t = time.time()
    model = trainable_copy(student)
    counters = {"teacher_forward_rows": 0, "teacher_forward_tokens": 0}
    distill_train(model, traces, cfg, "token", teacher, seed, counters)
    compute = teacher_compute(sampled["teacher_samples"], sampled["teacher_sample_tokens"],
                              counters["teacher_forward_rows"], counters["teacher_forward_tokens"])
    record("kd", held_out(model), time.time() - t, cfg.updates, compute)
    # 6. on-policy distillation on the same prompts: no teacher sample, no reward
    t = time.time()
    model = trainable_copy(student)
    evaluating = 0.0

    def on_update(update: int, counts: dict) -> None:
        nonlocal evaluating
        if update in ON_POLICY_EVALS and update < cfg.updates:
            t_eval = time.time()
            point = {"updates": update, "accuracy": held_out(model)["accuracy"],
                     **teacher_compute(rows=counts["teacher_forward_rows"],
                                       tokens=counts["teacher_forward_tokens"])}
            curve["on_policy"].append(point)
            evaluating += time.time() - t_eval

    counts = on_policy_distill(model, teacher, enc, problems, width, cfg.updates,
                               cfg.on_policy_prompts, ON_POLICY_G, cfg.lr, seed, world, on_update)
    figures = held_out(model)
    compute = teacher_compute(rows=counts["teacher_forward_rows"],
                              tokens=counts["teacher_forward_tokens"])
    curve["on_policy"].append({"updates": cfg.updates, "accuracy": figures["accuracy"],
                               **compute})
    record("on_policy", figures, time.time() - t - evaluating, cfg.updates, compute)
    # 7. distillation, then RL: GRPO on the SFT student at the low lr of (d)
    t = time.time()
    rl = student_rl(sft_model, enc, scfg, cfg.updates, cfg.distill_rl_lr, cfg.n, seed)
    record("distill_rl", pick(rl, "after"), methods["sft"]["seconds"] + time.time() - t,
           2 * cfg.updates, sft_compute)
    return {"size": size, "seed": seed, "params": params, "methods": methods, "curve": curve,
            "n_traces_kept": stats["n_traces_kept"], "seconds": time.time() - t_cell}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """The piecewise-linear curve through points (x, y), sorted by x, at x (None outside it)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def mean_curve(cells: list[dict], name: str) -> list[dict]:
    """One curve of every seed, point by point: mean teacher tokens, mean and spread of the
    accuracy."""
    out = []
    for points in zip(*(c["curve"][name] for c in cells)):
        acc = [p["accuracy"] for p in points]
        point = {"teacher_tokens": statistics.mean(p["teacher_tokens"] for p in points),
                 "accuracy": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc)}
        if "updates" in points[0]:
            point["updates"] = points[0]["updates"]
        if "prompts" in points[0]:
            point["prompts"] = points[0]["prompts"]
        out.append(point)
    return out


def summarize_family(cells: dict, sizes: list[str], teacher_ev: dict, cfg: DistillConfig,
                     wall: float) -> dict:
    """summary.json of the family: teacher_accuracy and one row per size with params and, per
    method, the held-out accuracy's mean over seeds, _std and _by_seed, the teacher compute
    (mean), and the curves; then the figures the README states."""
    rows = []
    for size in sizes:
        per_seed = [cells[(size, seed)] for seed in range(cfg.seeds)]
        row = {"size": size, "params": per_seed[0]["params"]}
        for m in FAMILY_METHODS:
            acc = [c["methods"][m]["accuracy"] for c in per_seed]
            row[m] = statistics.mean(acc)
            row[f"{m}_std"] = statistics.pstdev(acc)
            row[f"{m}_by_seed"] = acc
        row["teacher_tokens"] = {m: statistics.mean(c["methods"][m]["teacher_tokens"]
                                                    for c in per_seed) for m in FAMILY_METHODS}
        row["teacher_samples"] = {m: statistics.mean(c["methods"][m]["teacher_samples"]
                                                     for c in per_seed) for m in FAMILY_METHODS}
        row["curve"] = {name: mean_curve(per_seed, name) for name in ("sft", "on_policy", "rl")}
        row["best_distillation"] = max(DISTILLATION, key=row.get)
        row["distill_minus_rl_3x"] = row[row["best_distillation"]] - row["rl_3x"]
        row["best_over_teacher"] = row[row["best_distillation"]] / max(teacher_ev["accuracy"],
                                                                       1e-9)
        # on-policy at the SFT run's teacher compute, read off the mean on-policy curve
        points = [(p["teacher_tokens"], p["accuracy"]) for p in row["curve"]["on_policy"]]
        row["on_policy_at_sft_teacher_tokens"] = interpolate(points, row["teacher_tokens"]["sft"])
        rows.append(row)
    best = [r[r["best_distillation"]] for r in rows]
    return {"teacher_accuracy": teacher_ev["accuracy"], "teacher": cfg.teacher, "rows": rows,
            "distill_beats_rl_3x_everywhere": all(r["distill_minus_rl_3x"] > 0 for r in rows),
            "largest_over_teacher": rows[-1]["best_over_teacher"],
            "rises_with_size": all(a < b for a, b in zip(best, best[1:])),
            "sizes": sizes, "seeds": cfg.seeds, "updates": cfg.updates,
            "batch_size": cfg.batch_size, "on_policy_prompts": cfg.on_policy_prompts,
            "on_policy_G": ON_POLICY_G, "student_steps": cfg.student_steps,
            "trace_prompts": cfg.trace_prompts, "trace_samples": cfg.trace_samples,
            "lr": cfg.lr, "rl_lr": cfg.rl_lr, "distill_rl_lr": cfg.distill_rl_lr,
            "cell_seconds": sum(c["seconds"] for c in cells.values()), "wall_seconds": wall}


def family_table(s: dict) -> str:
    """The family as markdown: accuracy per size and method, then each method's teacher tokens."""
    head = " | ".join(FAMILY_LABELS[m] for m in FAMILY_METHODS)
    lines = [f"| student | params | {head} |", "|---" * (len(FAMILY_METHODS) + 2) + "|"]
    for r in s["rows"]:
        cells = " | ".join(f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in FAMILY_METHODS)
        lines.append(f"| {r['size']} | {r['params']:,} | {cells} |")
    lines += [f"\nteacher (held-out greedy): {s['teacher_accuracy']:.3f}; {s['seeds']} seeds, "
              "each pretraining its student", "",
              "| student | " + " | ".join(f"teacher tokens, {FAMILY_LABELS[m]}"
                                         for m in DISTILLATION)
              + " | on-policy at SFT's teacher tokens |", "|---" * 5 + "|"]
    for r in s["rows"]:
        at = r["on_policy_at_sft_teacher_tokens"]
        lines.append(f"| {r['size']} | " + " | ".join(f"{r['teacher_tokens'][m]:,.0f}"
                                                      for m in DISTILLATION)
                     + f" | {'-' if at is None else f'{at:.3f}'} (SFT {r['sft']:.3f}) |")
    return "\n".join(lines)


def family_plot(s: dict, path: str) -> None:
    """family.png: held-out accuracy vs student size per method (R1 Table 5's shape) with the
    teacher's line; accuracy vs teacher tokens for SFT (smaller trace pools) and on-policy
    distillation (after more updates). A bare Figure, not pyplot."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    params = [r["params"] for r in s["rows"]]
    for m in FAMILY_METHODS:
        left.errorbar(params, [r[m] for r in s["rows"]], yerr=[r[m + "_std"] for r in s["rows"]],
                      marker="o", capsize=3, label=FAMILY_LABELS[m])
    for ax in (left, right):
        ax.axhline(s["teacher_accuracy"], ls="--", color="k",
                   label=f"teacher {s['teacher_accuracy']:.2f}")
        ax.set(xscale="log", ylim=(0, 1.02), ylabel="held-out accuracy (greedy)")
    left.set(xlabel="student parameters", title=f"{s['updates']} updates each (RL: also 3x), "
                                                 f"{s['seeds']} seeds")
    left.legend(fontsize=7)
    for r, color in zip(s["rows"], ("#1f77b4", "#ff7f0e", "#2ca02c")):
        for name, style in (("sft", "s-"), ("on_policy", "o--")):
            points = r["curve"][name]
            right.plot([p["teacher_tokens"] for p in points], [p["accuracy"] for p in points],
                       style, color=color, label=f"{r['size']} {FAMILY_LABELS[name]}")
    right.set(xlabel="teacher tokens (generated + scored)",
              title="equal teacher compute: SFT (trace pools) vs on-policy")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_family(cfg: DistillConfig) -> dict | None:
    """--sizes K: every (size, seed) cell not finished in cfg.out (cell.json), then, once all
    are there, summary.json, table.md and family.png. Returns the summary (None while cells
    of other seeds are missing: an --only-seeds run)."""
    cfg.validate()
    t0 = time.time()
    device = train.pick_device(cfg.device)
    teacher, enc, teacher_cfg, _ = train.load_checkpoint(cfg.teacher, device)
    teacher.eval().requires_grad_(False)
    width = teacher_cfg.train.max_digits
    heldout = train.eval_split("heldout", cfg.n, width)
    teacher_ev = grpo.evaluate_policy(teacher, enc, heldout, width, k=1,
                                      world=teacher_cfg.train.world, modes=("greedy",))
    print(f"teacher {cfg.teacher}: held-out accuracy {teacher_ev['accuracy']:.3f}", flush=True)
    sizes = list(FAMILY)[:cfg.sizes]
    cells = {}
    # 1. the cells this run is asked for; a finished one is kept with --resume
    for size in sizes:
        for seed in family_seeds(cfg):
            folder = os.path.join(cfg.out, size, f"seed{seed}")
            path = os.path.join(folder, "cell.json")
            if cfg.resume and os.path.isfile(path):
                print(f"{size} seed {seed}: kept {path}", flush=True)
                continue
            os.makedirs(folder, exist_ok=True)
            print(f"{size} seed {seed}: pretraining, then every method", flush=True)
            write_json(path, family_cell(cfg, teacher, enc, teacher_cfg, size, seed, device,
                                         folder))
    # 2. the summary, once every seed of every size is there
    for size in sizes:
        for seed in range(cfg.seeds):
            path = os.path.join(cfg.out, size, f"seed{seed}", "cell.json")
            if os.path.isfile(path):
                with open(path) as f:
                    cells[(size, seed)] = json.load(f)
    missing = len(sizes) * cfg.seeds - len(cells)
    if missing:
        print(f"{missing} cells still missing in {cfg.out}: when the other seeds are done, "
              f"rerun with --resume (and without --only-seeds) to write the summary", flush=True)
        return None
    s = summarize_family(cells, sizes, teacher_ev, cfg, time.time() - t0)
    write_json(os.path.join(cfg.out, "summary.json"), s)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(family_table(s) + "\n")
    family_plot(s, os.path.join(cfg.out, "family.png"))
    return s


# ---- R1's own recipe (--recipe r1)


# the stages of the pipeline, in order, and what each row of the table calls them
R1_STAGES = {"base": "base (pretrained, V3-Base's part)",
             "r1_zero": "R1-Zero: GRPO on the base, accuracy + format",
             "cold_start": "1. cold start: SFT of the base on readable traces",
             "reasoning_rl_no_consistency": "2'. reasoning RL without it (ablation)",
             "reasoning_rl": "2. reasoning RL, + language consistency",
             "rejection_sft": "3. rejection sampling, SFT of the base",
             "final_rl": "4. final RL (R1)"}


def cold_start_traces(enc, problems: list[tuple[int, int]], width: int, pad_id: int
                      ) -> grpo.Rollout:
    """R1 §2.3.1's cold-start data, written by the world's rule (train.readable_solution), never
    by a model: after the template, the draft, every column in the prompt's notation and a
    summary, then <|eos|>. Laid out as a grpo.Rollout, like sampled traces, for distill_train."""
    prompts = grpo.template(problems, width)
    rows = [train.encode(enc, p) for p in prompts]
    eos = train.special_id(enc, "<|eos|>")
    responses = [train.readable_solution(a, b, width) for a, b in problems]
    ids = [train.encode(enc, r) + [eos] for r in responses]
    tokens, mask = grpo.layout(rows, ids, pad_id)
    return grpo.Rollout(tokens, mask, torch.zeros(len(rows), dtype=torch.long),
                        torch.ones(len(rows)), ["<think>" + r for r in responses],
                        [a + b for a, b in problems], 0.0, ids)


def stage_row(name: str, ev: dict, steps: int, seconds: float, steps_to_90=None) -> dict:
    """One row of the table from grpo.evaluate_policy's figures: greedy accuracy and length; the
    T = 1 samples' language consistency, mixing and verification (greedy decoding of a model
    that samples mixing 15% of the time never mixes: the distribution is what a user meets)."""
    return {"name": name, "accuracy": ev["accuracy"], "accuracy_t1": ev["accuracy_t1"],
            "consistency": ev["language_consistency_t1"],
            "consistency_greedy": ev["language_consistency"], "mixing_rate": ev["mixing_rate_t1"],
            "length": ev["mean_length"], "length_t1": ev["mean_length_t1"],
            "verification_rate": ev["verification_rate_t1"], "steps": steps,
            "steps_to_90": steps_to_90, "seconds": seconds}


def rl_figures(summary: dict) -> dict:
    """grpo.rl_train's held-out figures after RL, under evaluate_policy's names."""
    return {key: summary[f"{key.replace('mean_', '')}_after"] for key in grpo.SUMMARY_KEYS}


def r1_rl(model: train.Transformer, enc, base_cfg: train.Config, cfg: DistillConfig, name: str,
          steps: int, consistency_weight: float, before: dict | None = None) -> dict:
    """One RL stage with grpo.py's own loop (no second RL loop), in place: accuracy + format
    (+ consistency_weight x language consistency); metrics.jsonl and ckpt.pt in out/<name>/.
    before: the start's figures if measured. Returns the stage's row."""
    t = time.time()
    g = grpo.GRPOConfig(steps=steps, n=cfg.n, pass_k=cfg.k, bench_prompts=0, seed=cfg.seed,
                        consistency_weight=consistency_weight)
    summary = grpo.rl_train(model, enc, g, os.path.join(cfg.out, name), base_cfg, verbose=False,
                            before=before)
    return stage_row(name, rl_figures(summary), steps, time.time() - t, summary["steps_to_90"])


def r1_sft(base: train.Transformer, enc, base_cfg: train.Config, cfg: DistillConfig, name: str,
           traces: grpo.Rollout, heldout: list) -> tuple[train.Transformer, dict]:
    """SFT of a fresh copy of the BASE on traces (the paper fine-tunes V3-Base at stages 1 and
    3), with distillation's own sft_loss; saved to out/<name>/ckpt.pt. Returns (model, row);
    the row's "figures" (evaluate_policy's, the next RL stage's start) leave before the files."""
    t = time.time()
    model = trainable_copy(base)
    sft = dataclasses.replace(cfg, updates=cfg.sft_updates, batch_size=cfg.sft_batch_size)
    distill_train(model, traces, sft, "seq", seed=cfg.seed)
    seconds = time.time() - t
    os.makedirs(os.path.join(cfg.out, name), exist_ok=True)
    train.save_checkpoint(os.path.join(cfg.out, name, "ckpt.pt"), model, None, cfg.sft_updates,
                          base_cfg, enc)
    ev = grpo.evaluate_policy(model, enc, heldout, base_cfg.train.max_digits, cfg.k, cfg.seed)
    return model, {**stage_row(name, ev, 0, seconds), "figures": ev}


def r1_zero(base: train.Transformer, enc, base_cfg: train.Config, cfg: DistillConfig,
            heldout: list, base_ev: dict) -> dict:
    """R1-Zero to compare with: --rl-init's run (grpo.py's folder or its ckpt.pt), evaluated as
    every stage is, or grpo.rl_train on the base here (--zero-steps steps, accuracy + format;
    base_ev: the base's figures, its step 0)."""
    if not cfg.rl_init:
        row = r1_rl(trainable_copy(base), enc, base_cfg, cfg, "r1_zero", cfg.zero_steps, 0.0,
                    base_ev)
        return {**row, "name": "r1_zero"}
    folder = zero_folder(cfg)
    model, zero_enc, zero_cfg, _ = train.load_checkpoint(os.path.join(folder, "ckpt.pt"),
                                                            next(base.parameters()).device)
    if train.tokenizer_state(zero_enc) != train.tokenizer_state(enc):
        raise SystemExit(f"error: --rl-init {cfg.rl_init} was trained in another world than "
                         f"--init {cfg.init} (their tokenizers differ)")
    ev = grpo.evaluate_policy(model, enc, heldout, zero_cfg.train.max_digits, cfg.k, cfg.seed)
    return stage_row("r1_zero", ev, *rl_record(folder))


def zero_folder(cfg: DistillConfig) -> str:
    """The R1-Zero run's folder: --rl-init (a folder or its ckpt.pt), or out/r1_zero if run here."""
    if not cfg.rl_init:
        return os.path.join(cfg.out, "r1_zero")
    return cfg.rl_init if os.path.isdir(cfg.rl_init) else os.path.dirname(cfg.rl_init)


def rl_record(folder: str) -> tuple[int, float, int | None]:
    """(steps, seconds, steps_to_90) of a grpo.py run, read from its metrics.jsonl (a run stopped
    after its last checkpoint has no summary.json): the last step row, and the first held-out
    evaluation at 0.9 or more."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    steps = [r for r in rows if "elapsed_s" in r]
    reached = [r["step"] for r in rows if r.get("heldout_accuracy", 0.0) >= 0.9]
    return (steps[-1]["step"] if steps else 0, steps[-1]["elapsed_s"] if steps else 0.0,
            reached[0] if reached else None)


def r1_steps_to_90(rows: dict, cfg: DistillConfig):
    """RL steps R1's pipeline spends before held-out greedy accuracy first reaches 0.9, counted
    through both RL stages (0: the cold start already does); None if it never does."""
    if rows["reasoning_rl"]["steps_to_90"] is not None:
        return rows["reasoning_rl"]["steps_to_90"]
    if rows["final_rl"]["steps_to_90"] is not None:
        return cfg.rl_steps + rows["final_rl"]["steps_to_90"]
    return None


def run_r1(cfg: DistillConfig) -> dict:
    """R1 §2.3 in miniature (arXiv 2501.12948 v1): cold start, reasoning RL with the language-
    consistency reward, rejection sampling and SFT of the base, a final RL; beside R1-Zero.
    Writes summary.json, table.md and r1.png to cfg.out, and each stage's ckpt.pt (metrics.jsonl
    for RL) in cfg.out/<stage>/."""
    cfg.validate()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = train.pick_device(cfg.device)
    base, enc, base_cfg, _ = train.load_checkpoint(cfg.init, device)
    if base_cfg.train.world != "zero" or base_cfg.train.data:
        raise SystemExit(f"error: --init {cfg.init} is not a zero-world model: R1's recipe needs "
                         f"its two notations (pretrain with `python train.py`)")
    base.eval().requires_grad_(False)
    os.makedirs(cfg.out, exist_ok=True)
    width = base_cfg.train.max_digits
    heldout = train.eval_split("heldout", cfg.n, width)
    excluded = set(train.eval_split("heldout", max(cfg.n, base_cfg.train.eval_n), width))
    rows = {}

    def say(name: str) -> None:
        r = rows[name]
        print(f"{R1_STAGES[name]:48s} accuracy {r['accuracy']:.3f} | consistency (T = 1) "
              f"{r['consistency']:.3f} | mixing {r['mixing_rate']:.3f} | length {r['length']:.0f}"
              f" | {r['steps']} RL steps | {time.time() - t0:.0f}s", flush=True)

    # 0. the base and R1-Zero, evaluated as every stage is
    base_ev = grpo.evaluate_policy(base, enc, heldout, width, cfg.k, cfg.seed)
    rows["base"] = stage_row("base", base_ev, 0, 0.0)
    say("base")
    rows["r1_zero"] = r1_zero(base, enc, base_cfg, cfg, heldout, base_ev)
    say("r1_zero")
    # 1. cold start: SFT of the base on a few hundred readable traces made by the rule
    rng = random.Random(f"r1-cold-start-{cfg.seed}")
    problems = grpo.training_problems(rng, cfg.cold_start, width, excluded)
    cold = cold_start_traces(enc, problems, width, base.args.pad_id)
    cold_model, rows["cold_start"] = r1_sft(base, enc, base_cfg, cfg, "cold_start", cold, heldout)
    cold_ev = rows["cold_start"].pop("figures")
    say("cold_start")
    # 2. reasoning RL with the consistency reward (and, as a control, without it)
    if cfg.ablate:
        rows["reasoning_rl_no_consistency"] = r1_rl(trainable_copy(cold_model), enc, base_cfg,
                                                    cfg, "reasoning_rl_no_consistency",
                                                    cfg.rl_steps, 0.0, cold_ev)
        say("reasoning_rl_no_consistency")
    rl_model = trainable_copy(cold_model)
    rows["reasoning_rl"] = r1_rl(rl_model, enc, base_cfg, cfg, "reasoning_rl", cfg.rl_steps,
                                 cfg.consistency_weight, cold_ev)
    say("reasoning_rl")
    # 3. rejection sampling from stage 2 (right, well-formed, one notation, not over-long),
    # then SFT of the BASE on what is kept
    t = time.time()
    rng = random.Random(f"r1-rejection-{cfg.seed}")
    problems = grpo.training_problems(rng, cfg.rs_prompts, width, excluded)
    eos = [train.special_id(enc, "<|eos|>")]
    longest = len(train.encode(enc, train.readable_solution(0, 0, width))) + len(eos)
    kept, kept_stats = teacher_traces(rl_model.eval(), enc, problems, width, cfg.trace_samples,
                                      cfg.trace_temperature, cfg.seed, world="zero",
                                      notation=train.PROMPT_NOTATION, max_tokens=longest)
    kept_stats.pop("tokens_by_prompt")
    print(f"rejection sampling: kept {kept_stats['n_traces_kept']} of "
          f"{kept_stats['n_traces_generated']} samples of stage 2 (T = {cfg.trace_temperature}) "
          f"| {time.time() - t:.0f}s", flush=True)
    sft_model, rows["rejection_sft"] = r1_sft(base, enc, base_cfg, cfg, "rejection_sft", kept,
                                              heldout)
    rows["rejection_sft"]["seconds"] += time.time() - t
    sft_ev = rows["rejection_sft"].pop("figures")
    say("rejection_sft")
    # 4. the final RL, from the stage-3 model, on the rule rewards
    final_weight = cfg.consistency_weight if cfg.final_consistency else 0.0
    rows["final_rl"] = r1_rl(sft_model, enc, base_cfg, cfg, "final_rl", cfg.rl_steps,
                             final_weight, sft_ev)
    say("final_rl")
    # 5. the files
    s = {"r1_zero_accuracy": rows["r1_zero"]["accuracy"],
         "r1_accuracy": rows["final_rl"]["accuracy"],
         "r1_zero_consistency": rows["r1_zero"]["consistency"],
         "r1_consistency": rows["final_rl"]["consistency"],
         "r1_zero_mixing_rate": rows["r1_zero"]["mixing_rate"],
         "r1_mixing_rate": rows["final_rl"]["mixing_rate"],
         "r1_zero_steps_to_90": rows["r1_zero"]["steps_to_90"],
         "r1_steps_to_90": r1_steps_to_90(rows, cfg),
         "r1_zero_steps": rows["r1_zero"]["steps"], "r1_steps": 2 * cfg.rl_steps,
         "stages": list(rows.values()), "n_cold_start": cfg.cold_start, **kept_stats,
         "seed": cfg.seed, "init": cfg.init, "rl_init": cfg.rl_init, "n": cfg.n, "k": cfg.k,
         "consistency_weight": cfg.consistency_weight, "final_consistency": cfg.final_consistency,
         "wall_seconds": time.time() - t0}
    if cfg.ablate:
        with_it, without = rows["reasoning_rl"], rows["reasoning_rl_no_consistency"]
        s["consistency_reward_accuracy_change"] = with_it["accuracy"] - without["accuracy"]
        s["consistency_reward_consistency_change"] = with_it["consistency"] - without["consistency"]
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(r1_table(s) + "\n")
    r1_plot(s, cfg, os.path.join(cfg.out, "r1.png"))
    return s


def r1_table(s: dict) -> str:
    """R1-Zero vs each R1 stage as a markdown table (printed and saved as table.md)."""
    lines = ["| stage | held-out accuracy (greedy) | language consistency (T = 1) | mixing "
             "(T = 1) | length (greedy) | verification (T = 1) | RL steps | to 0.9 | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["stages"]:
        to_90 = "never" if r["steps_to_90"] is None else r["steps_to_90"]
        if r["steps"] == 0:
            to_90 = "-"
        lines.append(f"| {R1_STAGES[r['name']]} | {r['accuracy']:.3f} | {r['consistency']:.3f} | "
                     f"{r['mixing_rate']:.3f} | {r['length']:.0f} | "
                     f"{r['verification_rate']:.3f} | {r['steps']} | {to_90} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def r1_plot(s: dict, cfg: DistillConfig, path: str) -> None:
    """r1.png: per stage, accuracy and language consistency (bars); held-out accuracy along the RL
    steps of R1-Zero and of R1's two RL stages (their metrics.jsonl). A bare Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.2))
    ax, curve = fig.subplots(1, 2)
    names = [r["name"] for r in s["stages"]]
    x = torch.arange(len(names)).tolist()
    for shift, key, color in ((-0.2, "accuracy", "#1f77b4"), (0.2, "consistency", "#2ca02c")):
        ax.bar([i + shift for i in x], [r[key] for r in s["stages"]], width=0.4, color=color,
               label=key + (" (greedy)" if key == "accuracy" else " (T = 1)"))
    ax.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set(ylim=(0, 1.05), title="R1-Zero and R1's stages (held-out)")
    ax.legend(fontsize=8, loc="lower right")
    # the RL curves: R1's final RL continues where reasoning RL's step count ended
    folders = {"R1-Zero": zero_folder(cfg),
               "2. reasoning RL": os.path.join(cfg.out, "reasoning_rl"),
               "4. final RL": os.path.join(cfg.out, "final_rl")}
    for label, folder in folders.items():
        metrics = os.path.join(folder, "metrics.jsonl")
        if not os.path.isfile(metrics):
            continue
        points = [json.loads(line) for line in open(metrics)]
        offset = cfg.rl_steps if label == "4. final RL" else 0
        points = [(r["step"] + offset, r["heldout_accuracy"]) for r in points
                  if "heldout_accuracy" in r]
        curve.plot(*zip(*points), "o-", label=label)
    curve.axhline(0.9, ls=":", color="k")
    curve.set(xlabel="RL steps", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02),
              title="accuracy along RL")
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- command line


def parse_config(argv: list[str] | None = None) -> DistillConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = train.config_from_flags(DistillConfig(), argv, __doc__)
    if cfg.recipe == "r1":
        train.set_out_unless_given(cfg, argv, "out/r1")
    elif cfg.sizes:
        train.set_out_unless_given(cfg, argv, "out/distill_family")
    return cfg


def main_r1(cfg: DistillConfig) -> None:
    """--recipe r1: check the inputs before any work, then run_r1."""
    if not os.path.isfile(cfg.init):
        raise SystemExit(f"error: no base checkpoint at {cfg.init}: run `python train.py` first "
                         f"(or pass --init CKPT)")
    files = [os.path.join(zero_folder(cfg), f) for f in ("ckpt.pt", "metrics.jsonl")]
    if cfg.rl_init and not all(map(os.path.isfile, files)):
        raise SystemExit(f"error: no R1-Zero run at {cfg.rl_init}: run `python grpo.py` first, "
                         f"or pass --rl-init '' to run R1-Zero here ({cfg.zero_steps} steps)")
    if not cfg.overwrite:
        train.check_fresh_out(cfg.out, ("summary.json", "table.md", "final_rl"),
                              resume_flag=False)
    s = run_r1(cfg)
    print(r1_table(s))
    ratio = ""
    if s["r1_zero_steps_to_90"] and s["r1_steps_to_90"] is not None:
        ratio = f" ({s['r1_steps_to_90'] / s['r1_zero_steps_to_90']:.2f}x)"
    print(f"R1-Zero {s['r1_zero_accuracy']:.3f} accuracy, {s['r1_zero_consistency']:.3f} "
          f"consistency, 0.9 after {s['r1_zero_steps_to_90']} RL steps | R1 "
          f"{s['r1_accuracy']:.3f}, {s['r1_consistency']:.3f}, 0.9 after {s['r1_steps_to_90']}"
          f"{ratio} | {s['wall_seconds']:.0f}s | {cfg.out}/summary.json")


def main_family(cfg: DistillConfig) -> None:
    """--sizes K: check the inputs before any work, then run_family."""
    if cfg.student:
        raise SystemExit("error: --student cannot be combined with --sizes: the family "
                         "pretrains a student of every size (and seed) itself")
    if not (cfg.overwrite or cfg.resume):
        train.check_fresh_out(cfg.out, ("summary.json", *FAMILY))
    s = run_family(cfg)
    if s is None:
        return
    print(family_table(s))
    print(f"distillation beats RL at 3x updates at every size: "
          f"{s['distill_beats_rl_3x_everywhere']} | largest student / teacher: "
          f"{100 * s['largest_over_teacher']:.0f}% | {s['wall_seconds']:.0f}s | "
          f"{cfg.out}/summary.json")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.recipe == "r1":
        main_r1(cfg)
        return
    if not os.path.isfile(cfg.teacher):
        raise SystemExit(f"error: no teacher checkpoint at {cfg.teacher}: run `python train.py` "
                         f"then `python grpo.py` first (or pass --teacher CKPT)")
    if cfg.sizes:
        main_family(cfg)
        return
    if not cfg.overwrite:
        files = ("summary.json", "table.md", os.path.join("student", "ckpt.pt"))
        train.check_fresh_out(cfg.out, files, resume_flag=False)
    s = run(cfg)
    print(table(s))
    print(f"distilled - RL-only: {100 * s['distill_minus_rl']:+.1f} points | distilled / teacher: "
          f"{100 * s['distill_over_teacher']:.0f}% | {s['wall_seconds']:.0f}s | "
          f"{cfg.out}/summary.json")


if __name__ == "__main__":
    main(sys.argv[1:])
