"""GRPO with rule-based rewards: R1-Zero in miniature (DeepSeekMath §4.1, DeepSeek-R1 §2.2).

The idea: RL without a value network or a reward model. For each prompt q, sample a GROUP of G
responses from the policy, score each with a rule, and let the group be its own baseline: a
response is pushed up or down by how much better it did than its siblings.

    A_i    = (r_i - mean(r)) / std(r)       GRPO, DeepSeekMath eq. 3 (advantage="std"; we use
                                            the population std, ddof 0, of the G rewards)
    A_i    =  r_i - mean(r)                 Dr. GRPO, Liu et al. 2025 (advantage="mean")
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    l_it   = min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it
    KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1    (k3, DeepSeekMath eq. 4: >= 0;
                                                            unbiased only for tokens sampled
                                                            from the current policy pi_theta)
    J      = mean_i (1/|o_i|) sum_t l_it    GRPO, DeepSeekMath eq. 3 (aggregation="seq")
           = sum_it l_it / sum_i |o_i|      DAPO, Yu et al. 2025 (aggregation="token")
           = sum_it l_it / (N L_max)        Dr. GRPO (aggregation="constant")

pi_old sampled the batch; we take mu gradient steps on it, then sample again. With mu = 1
(default) rho == 1, the clip never acts and the gradient is REINFORCE with a group-mean baseline;
the logged loss is ~0 (advantages average to 0), as expected. Clipping (and DAPO's clip-higher,
eps_high > eps_low) acts when mu > 1, with pi_old's log-probs stored at sampling time. So the
default run is Dr. GRPO's advantage with DAPO's token mean, mu = 1, beta = 0, not DeepSeekMath's
GRPO as written (--advantage std --aggregation seq --beta 0.04 --mu 2 is closer to it).

R1-Zero's template (R1 Table 1, arXiv 2501.12948 v1 §2.2.3) tells the model to reason inside
<think>...</think> first, then answer inside <answer>...</answer>. A tiny model cannot read an
instruction, so our template writes the tag it asks for: the prompt is `<|bos|>{a}+{b}=<think>`
and every response thinks. The rule rewards (§2.2.2), summed, parsed and never executed
(train.parse_answer and train.well_formed: the one judge of the project), score the whole
response, the template's <think> included:
    accuracy  exactly one <answer>...</answer>, its text ASCII digits (at most 40), equal to
              the target
    format    one non-empty <think>...</think>, then exactly one non-empty <answer>...</answer>,
              nothing else. `--reward format` rewards this alone: a control with no accuracy jump.
    language consistency  (R1 §2.3.2, off by default: --consistency-weight 1 adds it) the share
              of the columns worked inside <think> written in the prompt's notation (symbols);
              distill.py --recipe r1 uses it in DeepSeek-R1's own recipe.

What RL can grow here (train.py's zero world): the corpus's writers draft a hasty answer, then
work columns from the right and mostly stop early, so the pretrained model thinks briefly and is
often wrong; working more columns is longer and more often right, a few writers (~4%) check the
rest and correct a slip, and ~15% switch notation midway. R1-Zero's length growth (Fig. 3),
"aha" checks (§2.2.4) and language mixing (§2.3) are then RL amplifying behaviours the base model
samples rarely, which is what they are at this scale: nothing here appears from nothing.

Defaults, chosen for stability at this scale: 16 prompts x G = 8, T = 1, mu = 1, advantage
r - mean (Dr. GRPO), token mean (DAPO), beta = 0 (a KL penalty collapsed small runs; k3 is kept,
tested and logged), AdamW lr 1e-4: a fresh AdamW moves every weight by ~lr per step
(m/sqrt(v) ~ sign g), and 3e-4 already damaged the pretrained scratchpad skill. MTP modules are
ignored (the loss uses the main head); MoE gate biases keep balancing once per optimizer step.

    python grpo.py                      # RL from out/pretrain/ckpt.pt -> out/grpo/
    python grpo.py --reward format      # the format-only control -> out/grpo_format_control/
    python grpo.py --eval CKPT --json   # evaluate any checkpoint: greedy, T = 1, pass@k

The file, in reading order: config; rule-based rewards; rollouts; the GRPO objective
(group_advantages, k3_kl, grpo_loss); evaluation and the aha exhibit; the RL loop (grpo_step,
rl_train); the run's files and rollout speed; command line.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch

import train

AGGREGATIONS = ("seq", "token", "constant")
# printed each step
STEP_LOG = ("reward", "accuracy", "length", "steps_worked", "verification_rate", "mixing_rate",
            "kl", "entropy", "zero_var_frac")


@dataclass
class GRPOConfig:
    steps: int = 40               # RL steps (one rollout batch each)
    n_prompts: int = 16           # prompts per rollout batch
    group_size: int = 8           # G responses per prompt
    temperature: float = 1.0      # sampling temperature of the rollouts
    lr: float = 1e-4              # AdamW learning rate
    mu: int = 1                   # gradient steps per rollout batch (1: rho == 1, REINFORCE)
    eps_low: float = 0.2          # clip range below 1
    eps_high: float = 0.2         # clip range above 1 (DAPO's clip-higher: 0.28)
    beta: float = 0.0             # KL-to-reference coefficient (k3 estimator)
    advantage: str = "mean"       # "mean": r - mean (Dr. GRPO) | "std": / std (GRPO)
    aggregation: str = "token"    # "seq" (GRPO) | "token" (DAPO) | "constant" (Dr. GRPO)
    skip_zero_var: bool = False   # drop groups whose rewards are all equal (no signal)
    reward: str = "accuracy"      # "accuracy" (+ format_weight x format) | "format" (control)
    format_weight: float = 1.0    # the format reward's weight beside accuracy (R1: summed)
    consistency_weight: float = 0.0  # weight of R1 2.3.2 language-consistency reward (0: R1-Zero)
    n: int = 200                  # evaluation problems
    pass_k: int = 4               # T = 1 samples per evaluation problem (pass@1 and pass@k)
    eval_interval: int = 5        # evaluate (steps_to_90) and save every this many steps
    bench_prompts: int = 4        # prompts (x G) of the rollout-speed benchmark; 0 = skip
    split: str = "heldout"        # --eval split: "heldout" | "harder"
    eval: str = ""                # --eval CKPT: evaluate a checkpoint and exit
    json: bool = False            # print the result as one JSON line
    init: str = "out/pretrain/ckpt.pt"  # the pretrained checkpoint RL starts from
    out: str = "out/grpo"         # output folder: ckpt.pt, metrics.jsonl, summary.json, grpo.png
    overwrite: bool = False       # replace an earlier run's files in --out (else it refuses)
    device: str = "auto"          # auto | cpu | cuda | mps
    threads: int = 0              # CPU threads (0: torch's default, all cores)
    compile: bool = False         # torch.compile the decode step of rollouts (once, ~15 s)
    seed: int = 0                 # seeds the rollouts and the training prompts

    def validate(self) -> None:
        """Raise ValueError with a one-line message for a knob that cannot work."""
        checks = [
            (min(self.steps, self.n_prompts, self.mu, self.n, self.pass_k,
                 self.eval_interval) >= 1,
             "steps, n_prompts, mu, n, pass_k and eval_interval must be >= 1"),
            (self.bench_prompts >= 0, "bench_prompts must be >= 0 (0 = skip the benchmark)"),
            (self.group_size >= 2, "group_size must be >= 2: a group of one has no baseline"),
            (min(self.temperature, self.lr) > 0 and min(self.beta, self.consistency_weight) >= 0,
             "need temperature, lr > 0 and beta, consistency_weight >= 0"),
            (0 <= self.eps_low < 1 and self.eps_high >= 0,
             "need 0 <= eps_low < 1 and eps_high >= 0"),
            (self.advantage in ("mean", "std"), "advantage must be 'mean' or 'std'"),
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}"),
            (self.reward in ("accuracy", "format"), "reward must be 'accuracy' or 'format'"),
            (self.split in ("heldout", "harder"), "split must be 'heldout' or 'harder'")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GRPOConfig: {msg}")
        # --eval only reads a checkpoint: --out is not written
        rates = {"--lr": self.lr, "--temperature": self.temperature}
        train.check_shared(rates, self.threads, self.device, None if self.eval else self.out)


# ---- rule-based rewards


def format_reward(completion: str) -> float:
    """1.0 if completion is [<think>text</think>]<answer>text</answer>[<|eos|>], else 0.0. In the
    zero world every response starts with the template's <think>, so this is R1's format: one
    non-empty think block, then exactly one answer, nothing else."""
    return float(train.well_formed(completion))


def accuracy_reward(completion: str, target) -> float:
    """1.0 if train.parse_answer finds the one answer block and it equals target, else 0.0.
    target: any integral number (3, 3.0, numpy.int64(3), torch.tensor(3)); 3.5 never matches."""
    answer = train.parse_answer(completion)
    # a 0-d tensor or numpy scalar becomes a Python number; a float must be integral
    value = target.item() if hasattr(target, "item") else target
    if isinstance(value, float) and not value.is_integer():
        return 0.0
    return float(answer is not None and bool(answer == value))


def consistency_reward(completion: str) -> float:
    """R1's language-consistency reward (§2.3.2): the share of the reasoning in the target
    language, here of the columns worked inside <think>...</think> written in the prompt's
    notation (train.PROMPT_NOTATION). 0.0 when no column is worked: an empty or absent
    reasoning, or notation words that make no step, earn nothing."""
    return train.parse_trace(completion)["language_consistency"]


def reward(completion: str, target: int, kind: str = "accuracy", format_weight: float = 1.0,
           consistency_weight: float = 0.0) -> float:
    """The training reward: accuracy + format_weight x format (R1 §2.2.2 sums the two rule
    rewards) + consistency_weight x language consistency (R1 §2.3.2 adds it, summed), or format
    alone (the control). completion: the whole response, the template's <think> included."""
    if not isinstance(completion, str):
        raise ValueError(f"a completion must be a str, got {type(completion).__name__}: "
                         f"decode the ids first")
    if kind == "format":
        return format_reward(completion)
    total = accuracy_reward(completion, target) + format_weight * format_reward(completion)
    if consistency_weight:
        total += consistency_weight * consistency_reward(completion)
    return total


def thinks(completion: str) -> bool:
    """The reasoning rate counts responses that open with a think block."""
    return completion.startswith("<think>")


def mean_of(fn, *columns) -> float:
    """The mean of fn over rows of columns, e.g. mean_of(accuracy_reward, texts, targets)."""
    return sum(float(fn(*row)) for row in zip(*columns)) / len(columns[0])


# ---- rollouts


def template(problems: list[tuple[int, int]], width: int, world: str = "zero") -> list[str]:
    """The prompts: `<|bos|>{a}+{b}=<think>` at `width` digits (R1 Table 1's think-first template,
    the instruction written as the tag it asks for); the choice world's bare task without it."""
    return [train.prompt_text(a, b, width, world) for a, b in problems]


def training_problems(rng: random.Random, k: int, width: int, excluded: set
                      ) -> list[tuple[int, int]]:
    """k problems from the training distribution (1..width digits), held-out problems excluded."""
    problems = []
    while len(problems) < k:
        p = train.sample_problem(rng, 1, width)
        if p not in excluded:
            problems.append(p)
    return problems


@dataclass
class Rollout:
    tokens: torch.Tensor          # [N, T] prompt + response, right-padded with pad_id (N = P * G)
    mask: torch.Tensor            # [N, T-1] 1.0 where the target tokens[:, t+1] is a response token
    group_ids: torch.Tensor       # [N] which prompt each row answers
    rewards: torch.Tensor         # [N]
    texts: list                   # [N] decoded responses, the template's <think> included
    targets: list                 # [N] each row's right answer
    seconds: float                # time spent generating
    ids: list = field(default_factory=list)  # [N] each response's generated token ids


def layout(prompts: list[list[int]], responses: list[list[int]], pad_id: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + response ids, right-padded: tokens [N, T], and mask [N, T-1], 1.0 where
    the next token tokens[:, t+1] is a response token (what a loss on the response counts)."""
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T - 1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    return tokens, mask


def rollout(model: train.Transformer, enc, prompts: list[str], targets: list[int], G: int,
            temperature: float, max_new_tokens: int, reward_fn=accuracy_reward, generator=None,
            use_cache: bool = True) -> Rollout:
    """Sample G responses per prompt with the model's cached generate (eval mode: MoE loads not
    counted), score them with reward_fn(text, target), lay them out right-padded. Args: prompts
    [P], targets [P]. Returns N = P*G rows; row i answers prompt group_ids[i] = i // G."""
    # 1. generate, in eval mode, timing only the sampling
    rows = [train.encode(enc, p) for p in prompts for _ in range(G)]
    was_training = model.training
    t0 = time.perf_counter()
    responses = train.generate_ids(model.eval(), rows, max_new_tokens, temperature, generator,
                                   use_cache=use_cache)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    # 2. right-padded prompt + response, and the mask of the positions predicting the response
    tokens, mask = layout(rows, responses, model.args.pad_id)
    # 3. score the decoded texts, with the part of the response the template wrote
    opened = ["<think>" if p.endswith("<think>") else "" for p in prompts for _ in range(G)]
    texts = [o + enc.decode(r) for o, r in zip(opened, responses)]
    row_targets = [y for y in targets for _ in range(G)]
    rewards = [reward_fn(t, y) for t, y in zip(texts, row_targets)]
    dev = next(model.parameters()).device
    group_ids = torch.arange(len(prompts)).repeat_interleave(G)
    return Rollout(tokens.to(dev), mask.to(dev), group_ids.to(dev),
                   torch.tensor(rewards, device=dev), texts, row_targets, seconds, responses)


def token_logprobs(model: train.Transformer, tokens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token t+1 | tokens <= t) under the main head (MTP modules ignored), and the entropy
    of that distribution (no grad). Args: tokens [N, T]. Returns logp [N, T-1], entropy [N, T-1]."""
    h = model.forward_hidden(tokens[:, :-1], mode="naive")
    logp_all = model.logits(h).float().log_softmax(-1)                      # [N, T-1, V]
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)             # [N, T-1]
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@torch.no_grad()
def frozen_logprobs(frozen: train.Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """token_logprobs of a frozen_copy, without grad: pi_old or pi_ref. Returns [N, T-1]."""
    return token_logprobs(frozen, tokens)[0]


def frozen_copy(model: train.Transformer) -> train.Transformer:
    """A frozen copy (state_dict, not deepcopy: a module may hold a graph tensor, e.g. the MoE's
    aux_loss)."""
    ref = train.Transformer(model.args).to(next(model.parameters()).device)
    ref.load_state_dict(model.state_dict())
    return ref.eval().requires_grad_(False)


# ---- the GRPO objective


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "mean"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = r_i - mean_g (scale="mean", Dr. GRPO) or (r_i - mean_g) / std_g (scale="std", GRPO),
    with mean_g and the population std_g over row i's group g; exactly 0 in a group of equal
    rewards. Args: rewards [N], group_ids [N] in 0..n_groups-1.
    Returns A [N], zero_var [n_groups] (bool)."""
    ### BEGIN SOLUTION: group-relative advantages, r - mean or / std (DeepSeekMath §4.1.2)
    r = rewards.double()
    n = int(group_ids.max()) + 1

    def per_group_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, group_ids, x)

    count = per_group_sum(torch.ones_like(r))
    mean = per_group_sum(r) / count                                          # [n_groups]
    std = (per_group_sum((r - mean[group_ids]) ** 2) / count).sqrt()
    zero_var = std < 1e-8
    A = r - mean[group_ids]
    if scale == "std":
        A = A / std[group_ids].clamp_min(1e-8)
    return torch.where(zero_var[group_ids], 0.0, A).to(rewards.dtype), zero_var
    ### END SOLUTION


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta: x - log x - 1
    with x = pi_ref/pi_theta (Schulman 2020; DeepSeekMath eq. 4). >= 0 always, 0 iff equal;
    unbiased only for samples from the current policy. Args [N, T]."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean of x over the positions where mask is 1."""
    return ((x * mask).sum() / mask.sum().clamp_min(1)).item()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, ref_logp: torch.Tensor | None = None, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, aggregation: str = "token",
              max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """-J, the clipped GRPO objective negated for minimisation (formulas in the module docstring).

    Args: logp [N, T] log pi_theta of the sampled tokens (with grad); old_logp [N, T] log pi_old,
    or None for pi_old = pi_theta (mu = 1); advantages [N]; mask [N, T] 1 on response tokens;
    ref_logp [N, T] log pi_ref (required if beta > 0; if given, its KL is also reported);
    aggregation "seq" | "token" | "constant" (sum / (N * max_len), max_len default T).
    Returns (loss, {clip_frac, kl, ratio_mean})."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probs of the frozen reference policy)")
    ### BEGIN SOLUTION: the clipped objective, k3 penalty, aggregation (DeepSeekMath §4.1.1)
    # 1. the ratio to pi_old (identically 1, with the gradient of logp, when mu = 1)
    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))     # [N, T]
    A = advantages[:, None]
    # 2. the clipped surrogate minus the KL penalty, per response token
    surrogate = torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = -(surrogate - beta * kl) * mask                                      # [N, T]
    # 3. aggregate over tokens and sequences
    if aggregation == "seq":
        loss = (per_token.sum(1) / mask.sum(1).clamp_min(1)).mean()
    elif aggregation == "token":
        loss = per_token.sum() / mask.sum().clamp_min(1)
    else:
        loss = per_token.sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    with torch.no_grad():
        clipped = ((A > 0) & (ratio > 1 + eps_high)) | ((A < 0) & (ratio < 1 - eps_low))
        stats = {"clip_frac": masked_mean(clipped, mask), "kl": masked_mean(kl, mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats
    ### END SOLUTION


# ---- evaluation


def evaluate_policy(model: train.Transformer, enc, problems: list[tuple[int, int]], width: int,
                    k: int = 4, seed: int = 0, world: str = "zero",
                    modes: tuple = ("greedy", "t1")) -> dict:
    """train.evaluate's greedy and T = 1 modes on the world's template, under RL's names:
    accuracy, think_rate, format_rate, mean_length, steps_worked, verification_rate,
    correction_rate, consistency, mixing_rate, truncation_rate (greedy), the same with _t1 (k
    samples per problem at T = 1; accuracy_t1 is pass@1), pass_at_k, k, n; modes may add
    "textbook" (made to work every column: accuracy_textbook, ...)."""
    ev = train.evaluate(model, enc, problems, width, modes=modes, k=k, seed=seed, world=world)
    return {key.replace("_greedy", ""): v for key, v in ev.items()}


def evaluate_checkpoint(path: str, n: int = 200, split: str = "heldout", k: int = 4, seed: int = 0,
                        device: str = "cpu") -> dict:
    """Load any checkpoint of this project and evaluate_policy it on train.eval_split(split, n)."""
    model, enc, cfg, _ = train.load_checkpoint(path, device)
    problems = train.eval_split(split, n, cfg.train.max_digits)
    width = cfg.train.max_digits + (split == "harder")
    world = cfg.train.world
    modes = ("greedy", "t1") + (("textbook",) if world == "zero" else ())
    return {"split": split, **evaluate_policy(model, enc, problems, width, k, seed, world, modes)}


def is_aha(text: str, target: int) -> bool:
    """The aha pattern, by rule: the response checks its work, the check ends on a different
    number than its first pass (a slip found), it says so (' wrong'), and its answer is right."""
    trace = train.parse_trace(text)
    says_so = text.split("</think>", 1)[0].endswith(train.VERDICTS[1])
    return trace["corrected"] and says_so and train.parse_answer(text) == target


def behaviours(texts: list[str], targets: list[int], width: int) -> dict:
    """Does checking pay? The share and the accuracy of responses that stop early (some columns
    left as drafted, no check), check, or work every column, e.g. early_accuracy, early_share."""
    kinds = {"early": [], "check": [], "full": []}
    for text, target in zip(texts, targets):
        trace = train.parse_trace(text)
        kind = "check" if trace["verified"] else "full" if trace["worked"] > width else "early"
        kinds[kind].append(train.parse_answer(text) == target)
    out = {}
    for kind, right in kinds.items():
        out[f"{kind}_share"] = len(right) / len(texts)
        out[f"{kind}_accuracy"] = sum(right) / len(right) if right else None
    return out


@torch.no_grad()
def aha_exhibit(model: train.Transformer, enc, problems: list[tuple[int, int]], width: int,
                world: str = "zero", k: int = 4, seed: int = 0, show: int = 3) -> dict:
    """Sample k responses per problem at T = 1 and keep, by is_aha, those in which the model
    verifies, finds its own slip and fixes it. Returns aha_rate, aha_traces (up to `show`) and
    the behaviours of the samples."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    prompts = template(problems, width, world)
    targets = [a + b for a, b in problems]
    ro = rollout(model, enc, prompts, targets, k, 1.0, train.max_response_tokens(width, world, enc),
                 accuracy_reward, g)
    prompt_of = [p for p in prompts for _ in range(k)]
    # the text includes the template's <think>: print the prompt without it
    found = [p.removesuffix("<think>") + t for p, t, y in zip(prompt_of, ro.texts, ro.targets)
             if is_aha(t, y)]
    return {"aha_rate": len(found) / len(ro.texts), "aha_traces": found[:show],
            **behaviours(ro.texts, ro.targets, width)}


# ---- the RL loop


def grpo_step(model: train.Transformer, opt: torch.optim.Optimizer, ref: train.Transformer,
              ro: Rollout, cfg: GRPOConfig, max_len: int) -> dict:
    """One GRPO update on one rollout batch: group advantages, zero-variance groups counted (and
    dropped if cfg.skip_zero_var), pi_old stored if mu > 1, then mu optimizer steps."""
    # 1. advantages; the rows that carry signal
    A, zero_var = group_advantages(ro.rewards, ro.group_ids, cfg.advantage)
    keep = torch.ones_like(A, dtype=torch.bool)
    if cfg.skip_zero_var:
        keep = ~zero_var[ro.group_ids]
    tokens = ro.tokens[keep]
    mask = ro.mask[keep]
    A = A[keep]
    # what is reported if nothing is kept
    stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio_mean": 1.0, "entropy": 0.0}
    if not keep.any():
        return {**stats, "zero_var_frac": zero_var.float().mean().item()}
    # 2. pi_old (only needed when mu > 1) and pi_ref, both frozen
    old_logp = frozen_logprobs(frozen_copy(model), tokens) if cfg.mu > 1 else None
    ref_logp = frozen_logprobs(ref, tokens)
    # 3. mu optimizer steps on this batch
    for _ in range(cfg.mu):
        logp, entropy = token_logprobs(model, tokens)
        loss, st = grpo_loss(logp, old_logp, A, mask, ref_logp, cfg.eps_low, cfg.eps_high,
                             cfg.beta, cfg.aggregation, max_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # once per optimizer step, as in pretraining
        train.update_gate_biases(model)
        stats = {**st, "loss": loss.item(), "entropy": masked_mean(entropy, mask)}
    return {**stats, "zero_var_frac": zero_var.float().mean().item()}


def rl_train(model: train.Transformer, enc, cfg: GRPOConfig, out_dir: str | None,
             base_cfg: train.Config, reward_fn=None, verbose: bool = True,
             before: dict | None = None) -> dict:
    """GRPO on model, in place. Writes metrics.jsonl and ckpt.pt (train.py's format) to out_dir as
    it goes (None: nothing); write_outputs adds summary.json and grpo.png. Returns the summary.
    base_cfg: the pretraining Config (the world and its width; saved in the checkpoints).
    reward_fn(text, target) -> float overrides cfg.reward / cfg.format_weight. before: the
    model's evaluate_policy figures (cfg.n, cfg.pass_k, cfg.seed) if already measured."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    if cfg.compile:
        model.compile_decode()
    width = base_cfg.train.max_digits
    world = base_cfg.train.world
    device = next(model.parameters()).device
    n_new = train.max_response_tokens(width, world, enc)
    heldout = train.eval_split("heldout", cfg.n, width)
    # never trained on: every problem any evaluation of this world uses
    excluded = set(train.eval_split("heldout", max(cfg.n, base_cfg.train.eval_n), width))
    rng = random.Random(f"grpo-{cfg.seed}")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    # pi_ref: for the KL penalty and the KL metric
    ref = frozen_copy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    metrics = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        open(metrics, "w").close()

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    def log_row(row: dict) -> None:
        if metrics:
            train.append_jsonl(metrics, row)

    def score(text: str, target: int) -> float:
        if reward_fn is not None:
            return reward_fn(text, target)
        return reward(text, target, cfg.reward, cfg.format_weight, cfg.consistency_weight)

    def held_out_eval(step: int, k: int, ev: dict | None = None) -> dict:
        if ev is None:
            ev = evaluate_policy(model, enc, heldout, width, k, cfg.seed, world)
        log_row({"step": step, **{"heldout_" + key: v for key, v in ev.items()}})
        shown = ("accuracy", "mean_length", "verification_rate", "mixing_rate", "accuracy_t1")
        say(f"eval @ {step}: held-out " + " | ".join(f"{k} {ev[k]:.3f}" for k in shown))
        return ev

    t_start = time.time()
    before = held_out_eval(0, cfg.pass_k, before)
    after = before
    steps_to_90 = 0 if before["accuracy"] >= 0.9 else None
    model.train()
    for step in range(1, cfg.steps + 1):
        # 1. a rollout batch on fresh training problems, scored by the rule
        problems = training_problems(rng, cfg.n_prompts, width, excluded)
        prompts = template(problems, width, world)
        targets = [a + b for a, b in problems]
        ro = rollout(model, enc, prompts, targets, cfg.group_size, cfg.temperature, n_new, score,
                     gen)
        # 2. one GRPO update on it
        stats = grpo_step(model, opt, ref, ro, cfg, n_new)
        # 3. log what the rollouts did (trace_metrics' mean_length is logged as length)
        figures = train.trace_metrics(ro.texts, ro.ids, n_new)
        figures["length"] = figures.pop("mean_length")
        row = {"step": step, "reward": ro.rewards.mean().item(),
               "accuracy": mean_of(accuracy_reward, ro.texts, ro.targets), **figures, **stats,
               "lengths": [len(r) for r in ro.ids],
               "rollout_tokens_per_s": sum(map(len, ro.ids)) / ro.seconds,
               "elapsed_s": time.time() - t_start}
        log_row(row)
        say(f"step {step:3d}/{cfg.steps} | " + " | ".join(f"{k} {row[k]:.3g}" for k in STEP_LOG)
            + f" | {row['rollout_tokens_per_s']:,.0f} rollout tok/s | {row['elapsed_s']:.0f}s")
        # 4. evaluate and save now and then (pass@k only at the end)
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            after = held_out_eval(step, cfg.pass_k if step == cfg.steps else 1)
            if steps_to_90 is None and after["accuracy"] >= 0.9:
                steps_to_90 = step
            if out_dir:
                ckpt = os.path.join(out_dir, "ckpt.pt")
                train.save_checkpoint(ckpt, model, opt, step, base_cfg, enc)
    summary = {}
    for when, ev in (("before", before), ("after", after)):
        for key in SUMMARY_KEYS:
            summary[f"{key.replace('mean_', '')}_{when}"] = ev[key]
    summary.update(steps_to_90=steps_to_90, steps=cfg.steps, wall_seconds=time.time() - t_start,
                   n=cfg.n, pass_k=cfg.pass_k, world=world)
    for key in ("reward", "format_weight", "consistency_weight", "advantage", "aggregation", "lr",
                "beta", "mu", "seed"):
        summary[key] = getattr(cfg, key)
    return summary


# the held-out figures the summary keeps, before and after RL (mean_length as length_*)
SUMMARY_KEYS = ("accuracy", "accuracy_t1", "pass_at_k", "think_rate", "format_rate",
                "mean_length", "steps_worked", "verification_rate", "correction_rate",
                "consistency", "mixing_rate", "truncation_rate", "mean_length_t1",
                "verification_rate_t1", "mixing_rate_t1", "consistency_t1", "steps_worked_t1",
                "language_consistency", "language_consistency_t1")


# ---- the run's files and rollout speed


def write_outputs(summary: dict, out_dir: str) -> None:
    """summary.json and grpo.png beside rl_train's metrics.jsonl (and aha.txt when the summary
    carries aha_traces)."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if "aha_traces" in summary:
        parts = [("the trained model", summary["aha_traces"]),
                 ("the base model, before RL", summary.get("aha_traces_before", []))]
        with open(os.path.join(out_dir, "aha.txt"), "w") as f:
            for who, traces in parts:
                f.write(f"# {who}: {len(traces)} shown (is_aha: a check that found a slip and "
                        f"fixed it, T = 1 held-out samples)\n")
                f.write("".join(t + "\n" for t in traces) + "\n")
    plot_run(os.path.join(out_dir, "metrics.jsonl"), out_dir)


def plot_run(metrics_path: str, out_dir: str) -> None:
    """grpo.png: accuracy and reward; mean response length (R1 Fig. 3 in miniature); the rates of
    reasoning behaviours; the rollouts' length histograms at the start, middle and end. A bare
    Figure, not pyplot: saving must not switch a notebook's backend."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in open(metrics_path)]
    steps = [r for r in rows if "lengths" in r]
    fig = Figure(figsize=(12, 7.5))
    axes = fig.subplots(2, 2).ravel()
    panels = [(axes[0], ("reward", "accuracy", "heldout_accuracy"), "accuracy and reward"),
              (axes[1], ("length", "heldout_mean_length"), "mean response length (tokens)"),
              (axes[2], ("verification_rate", "mixing_rate", "heldout_verification_rate",
                         "heldout_mixing_rate", "truncation_rate"), "share of responses")]
    for ax, keys, title in panels:
        # training rollouts (T = 1) every step; held-out (greedy) every evaluation
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), "o-" if "heldout" in key else "-", label=key)
        ax.set(xlabel="RL step", title=title)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 2.02 if max(r.get("reward", 0) for r in rows) > 1 else 1.02)
    axes[2].set_ylim(-0.02, 1.02)
    if steps:
        # the length distribution shifts (R1 Fig. 3 shows its mean): at the start, at the first
        # step whose mean length is halfway from the start's to the end's, and at the end
        half = (steps[0]["length"] + steps[-1]["length"]) / 2
        mid = next((r for r in steps if r["length"] >= half), steps[len(steps) // 2])
        picks = {"start": steps[0], "halfway": mid, "end": steps[-1]}
        top = max(max(r["lengths"]) for r in picks.values())
        for name, r in picks.items():
            axes[3].hist(r["lengths"], bins=24, range=(0, top), alpha=0.5,
                         label=f"{name} (step {r['step']})")
        axes[3].set(xlabel="response length (tokens)", ylabel="rollouts",
                    title="rollout lengths")
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "grpo.png"), dpi=110)


def rollout_speed(model: train.Transformer, enc, prompts: list[str], targets: list[int], G: int,
                  max_new_tokens: int, seed: int = 0, repeats: int = 3) -> dict:
    """Rollout tokens/s with the MLA latent cache (absorbed decode) vs recomputing the whole
    sequence at every new token, on the same rollout batch and seed (train.interleaved_median)."""
    device = next(model.parameters()).device
    n_tokens = {}

    def timed(use_cache: bool):
        def run_once():
            g = torch.Generator(device=device).manual_seed(seed)
            ro = rollout(model, enc, prompts, targets, G, 1.0, max_new_tokens, generator=g,
                         use_cache=use_cache)
            n_tokens[use_cache] = ro.mask.sum().item()
        return run_once

    med = train.interleaved_median({"cached": timed(True), "uncached": timed(False)}, repeats)
    out = {"rollout_tokens_per_s_cached": n_tokens[True] / med["cached"],
           "rollout_tokens_per_s_uncached": n_tokens[False] / med["uncached"]}
    out["rollout_cache_speedup"] = (out["rollout_tokens_per_s_cached"]
                                    / out["rollout_tokens_per_s_uncached"])
    return out


# ---- command line


def parse_config(argv: list[str] | None = None) -> GRPOConfig:
    """GRPOConfig from flags generated from its fields (train.add_flags): --group-size 8, ..."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = train.config_from_flags(GRPOConfig(), argv, __doc__)
    if cfg.reward == "format":
        train.set_out_unless_given(cfg, argv, "out/grpo_format_control")
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    device = train.pick_device(cfg.device)
    if cfg.eval:
        res = evaluate_checkpoint(cfg.eval, cfg.n, cfg.split, cfg.pass_k, cfg.seed, device)
        if cfg.json:
            print(json.dumps(res))
        else:
            print("\n".join(f"{k:>16}  {v}" for k, v in res.items()))
        return
    if not os.path.isfile(cfg.init):
        raise SystemExit(f"error: no checkpoint at {cfg.init}: run `python train.py` first "
                         f"(or pass --init CKPT)")
    if not cfg.overwrite:
        train.check_fresh_out(cfg.out, ("ckpt.pt", "metrics.jsonl", "summary.json"),
                              resume_flag=False)
    model, enc, base_cfg, _ = train.load_checkpoint(cfg.init, device)
    if base_cfg.train.data:
        raise SystemExit(f"error: {cfg.init} was pretrained on --data {base_cfg.train.data}: "
                         f"GRPO needs the arithmetic world (its reward would always be 0); "
                         f"pass --init a checkpoint of `python train.py` without --data")
    print(f"GRPO from {cfg.init} | {cfg.steps} steps x {cfg.n_prompts} prompts x "
          f"G = {cfg.group_size} -> {cfg.out}")
    width = base_cfg.train.max_digits
    world = base_cfg.train.world
    heldout = train.eval_split("heldout", cfg.n, width)
    # what the base samples at T = 1: how often it checks, and whether checking pays
    base = aha_exhibit(model, enc, heldout, width, world, cfg.pass_k, cfg.seed)
    summary = rl_train(model, enc, cfg, cfg.out, base_cfg)
    summary.update({f"{key}_before": v for key, v in base.items()})
    # the aha exhibit: real T = 1 samples of the trained model on held-out problems
    aha = aha_exhibit(model, enc, heldout, width, world, cfg.pass_k, cfg.seed)
    summary.update({key if key == "aha_traces" else f"{key}_after": v for key, v in aha.items()})
    print(f"aha: {aha['aha_rate']:.1%} of T = 1 held-out samples verify, find a slip and fix it "
          f"(base: {base['aha_rate']:.1%})")
    for who, traces in (("trained", aha["aha_traces"]), ("base", base["aha_traces"])):
        print("".join(f"  {who}: {t}\n" for t in traces), end="")
    if cfg.bench_prompts:
        rng = random.Random(f"grpo-bench-{cfg.seed}")
        problems = training_problems(rng, cfg.bench_prompts, width, set())
        # one timed call of each after a warm-up: recomputing ~160-token responses is slow
        summary.update(rollout_speed(model, enc, template(problems, width, world),
                                     [a + b for a, b in problems], cfg.group_size,
                                     train.max_response_tokens(width, world, enc), cfg.seed,
                                     repeats=1))
    write_outputs(summary, cfg.out)
    if cfg.json:
        print(json.dumps(summary))
    else:
        print("\n".join(f"{k:>30}  {v}" for k, v in summary.items() if "aha_traces" not in k))


if __name__ == "__main__":
    main()
